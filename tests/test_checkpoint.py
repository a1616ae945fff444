"""Checkpointer and params exports: exact round trips, keep-N, sharded restore, refusals."""

import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from genclip_jax import checkpoint


@struct.dataclass
class TrainState:
    step: jax.Array
    params: dict
    opt_state: optax.OptState


def _config(width: int = 8, epochs: int = 2) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.workdir = "/somewhere"
    config.model = ml_collections.ConfigDict({"width": width, "layers": (6, 12)})
    config.train = ml_collections.ConfigDict({"epochs": epochs, "lr": 1e-3})
    config.eval = ml_collections.ConfigDict({"batch_size": 4})
    return config


def _state(width: int = 8, seed: int = 0) -> TrainState:
    k1, k2 = jax.random.split(jax.random.key(seed))
    params = {
        "prompt": {"ctx": jax.random.normal(k1, (4, width))},
        "proj": jax.random.normal(k2, (width, 3)).astype(jnp.bfloat16),
    }
    tx = optax.adam(1e-3)
    opt_state = tx.init(params)
    grads = jax.tree.map(jnp.ones_like, params)
    _, opt_state = tx.update(grads, opt_state, params)  # non-trivial mu/nu/count
    return TrainState(step=jnp.asarray(7, jnp.int32), params=params, opt_state=opt_state)


def _assert_bitwise_equal(a, b) -> None:
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert np.asarray(x).dtype == np.asarray(y).dtype
        assert np.asarray(x).shape == np.asarray(y).shape
        assert np.asarray(x).tobytes() == np.asarray(y).tobytes()


def test_train_state_round_trip_is_exact(tmp_path):
    state = _state()
    with checkpoint.Checkpointer(tmp_path, _config()) as ckpt:
        assert ckpt.latest_step() is None
        assert ckpt.save(7, state)
        ckpt.wait()
        restored = ckpt.restore(state)
    _assert_bitwise_equal(restored, state)
    assert isinstance(restored, TrainState)
    assert isinstance(restored.opt_state[0], optax.ScaleByAdamState)
    assert restored.params["proj"].dtype == jnp.bfloat16
    assert json.loads((tmp_path / "config.json").read_text())["model"]["width"] == 8


def test_keeps_last_n_and_reports_latest(tmp_path):
    state = _state()
    with checkpoint.Checkpointer(tmp_path, _config(), keep=2) as ckpt:
        for step in (1, 2, 3, 4):
            ckpt.save(step, state.replace(step=jnp.asarray(step, jnp.int32)))
        assert not ckpt.save(4, state)  # same step again: skipped, no error
        ckpt.wait()
        assert ckpt.latest_step() == 4
        assert ckpt.all_steps() == [3, 4]
        assert int(ckpt.restore(state, step=3).step) == 3
        with pytest.raises(FileNotFoundError, match=r"step 1 .*available steps: \[3, 4\]"):
            ckpt.restore(state, step=1)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["3", "4"]
    with checkpoint.Checkpointer(tmp_path, _config()) as ckpt:  # resume sees them
        assert ckpt.latest_step() == 4


def test_save_interval_and_force(tmp_path):
    state = _state()
    with checkpoint.Checkpointer(tmp_path, _config(), save_interval_steps=10) as ckpt:
        assert not ckpt.save(5, state)
        assert ckpt.save(5, state, force=True)  # e.g. the last step of training
        assert ckpt.save(10, state)
        ckpt.wait()
        assert ckpt.all_steps() == [5, 10]


def test_restore_without_checkpoint_says_so(tmp_path):
    with (
        checkpoint.Checkpointer(tmp_path, _config()) as ckpt,
        pytest.raises(FileNotFoundError, match="no checkpoint to restore"),
    ):
        ckpt.restore(_state())


def test_restore_onto_replicated_mesh(tmp_path):
    assert jax.device_count() == 8
    state = _state()
    replicated = NamedSharding(Mesh(np.array(jax.devices()), ("data",)), PartitionSpec())
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), state
    )
    with checkpoint.Checkpointer(tmp_path, _config()) as ckpt:
        ckpt.save(1, state)
        ckpt.wait()
        restored = ckpt.restore(abstract)
    for leaf in jax.tree.leaves(restored):
        assert leaf.sharding == replicated
    _assert_bitwise_equal(restored, state)


def test_refuses_workdir_of_another_config(tmp_path):
    checkpoint.Checkpointer(tmp_path, _config(width=8)).close()
    changed = _config(width=16)
    changed.model.layers = (6, 24)
    with pytest.raises(ValueError) as info:
        checkpoint.Checkpointer(tmp_path, changed)
    message = str(info.value)
    assert "model.width: 8 -> 16" in message
    assert "model.layers: [6, 12] -> [6, 24]" in message
    assert "new workdir" in message
    assert json.loads((tmp_path / "config.json").read_text())["model"]["width"] == 8


def test_allows_mutable_fields_and_records_new_config(tmp_path):
    checkpoint.Checkpointer(tmp_path, _config(epochs=2)).close()
    resumed = _config(epochs=5)
    resumed.eval.batch_size = 32
    resumed.workdir = "/elsewhere"
    checkpoint.Checkpointer(tmp_path, resumed).close()
    assert json.loads((tmp_path / "config.json").read_text())["train"]["epochs"] == 5
    # The allow-list is a parameter: without train.epochs in it, the same change is refused.
    with pytest.raises(ValueError, match=r"train.epochs: 5 -> 6"):
        checkpoint.Checkpointer(tmp_path, _config(epochs=6), mutable_fields=("eval.*",))


def test_config_differences_reports_added_and_removed_fields():
    old = {"model": {"width": 8, "dpam": True}, "eval": {"x": 1}}
    new = {"model": {"width": 8, "heads": 2}, "eval": {"x": 2}}
    assert checkpoint.config_differences(old, new) == {
        "model.dpam": (True, "<absent>"),
        "model.heads": ("<absent>", 2),
    }


def test_shape_mismatch_names_leaves_and_shapes(tmp_path):
    with checkpoint.Checkpointer(tmp_path, _config()) as ckpt:
        ckpt.save(1, _state(width=8))
        ckpt.wait()
        with pytest.raises(ValueError) as info:
            ckpt.restore(_state(width=16))
    message = str(info.value)
    assert "params.prompt.ctx: checkpoint (4, 8) vs template (4, 16)" in message
    assert "opt_state.0.mu.proj: checkpoint (8, 3) vs template (16, 3)" in message
    assert "another config" in message


def test_interrupted_save_leaves_previous_checkpoint_usable(tmp_path):
    state = _state()
    with checkpoint.Checkpointer(tmp_path, _config()) as ckpt:
        ckpt.save(1, state)
    # What a save killed mid-write leaves behind: an unfinished Orbax tmp dir for step 2.
    leftover = tmp_path / "checkpoints" / "2.orbax-checkpoint-tmp-1700000000"
    (leftover / "default").mkdir(parents=True)
    (leftover / "default" / "partial").write_bytes(b"\0" * 10)
    with checkpoint.Checkpointer(tmp_path, _config()) as ckpt:
        assert ckpt.latest_step() == 1
        _assert_bitwise_equal(ckpt.restore(state), state)
        assert ckpt.save(2, state)
        ckpt.wait()
        assert ckpt.all_steps() == [1, 2]
    assert not leftover.exists()


def test_params_export_round_trip(tmp_path):
    params = _state().params
    config = _config()
    checkpoint.save_params(tmp_path / "export", params, config)
    loaded, loaded_config = checkpoint.load_params(tmp_path / "export")
    _assert_bitwise_equal(loaded, params)
    assert loaded_config == checkpoint.config_to_dict(config)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]  # no staging left over

    checkpoint.save_params(tmp_path / "bare", params)
    assert checkpoint.load_params(tmp_path / "bare")[1] is None


def test_params_export_onto_sharded_template(tmp_path):
    params = _state().params
    checkpoint.save_params(tmp_path / "export", params)
    replicated = NamedSharding(Mesh(np.array(jax.devices()), ("data",)), PartitionSpec())
    template = jax.device_put(params, replicated)
    loaded, _ = checkpoint.load_params(tmp_path / "export", template)
    assert all(leaf.sharding == replicated for leaf in jax.tree.leaves(loaded))
    _assert_bitwise_equal(loaded, params)
    with pytest.raises(ValueError, match=r"prompt.ctx: checkpoint \(4, 8\) vs template \(4, 16\)"):
        checkpoint.load_params(tmp_path / "export", _state(width=16).params)


def test_params_export_refuses_to_clobber(tmp_path):
    target = tmp_path / "export"
    target.mkdir()  # an empty directory is fine to fill
    checkpoint.save_params(target, {"a": jnp.zeros(3)}, {"v": 1})
    with pytest.raises(ValueError, match="not empty; pass overwrite=True"):
        checkpoint.save_params(target, {"a": jnp.ones(3)})
    assert checkpoint.load_params(target)[1] == {"v": 1}
    checkpoint.save_params(target, {"a": jnp.ones(3)}, {"v": 2}, overwrite=True)
    loaded, config = checkpoint.load_params(target)
    assert config == {"v": 2}
    np.testing.assert_array_equal(loaded["a"], np.ones(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]


def test_load_params_rejects_other_directories(tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a params export"):
        checkpoint.load_params(tmp_path)
