"""Checkpointer and params exports: exact round trips, keep-N, sharded restore, read-only
readers, refusals, failed saves, runs of earlier versions."""

import errno
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import DATA_DIR
from flax import struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from genclip_jax import checkpoint


@struct.dataclass
class TrainState:
    step: jax.Array
    params: dict
    opt_state: optax.OptState


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


def _rest(state: TrainState) -> dict:
    return {"step": state.step, "opt_state": state.opt_state}


def _save(ckpt: checkpoint.Checkpointer, step: int, state: TrainState) -> bool:
    return ckpt.save(step, state.params, _rest(state))


def _assert_bitwise_equal(a, b) -> None:
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert np.asarray(x).dtype == np.asarray(y).dtype
        assert np.asarray(x).shape == np.asarray(y).shape
        assert np.asarray(x).tobytes() == np.asarray(y).tobytes()


def _tree_listing(root: pathlib.Path) -> dict[str, tuple]:
    """Every path under `root` with its kind, size and modification time."""
    return {str(p.relative_to(root)): (p.is_dir(), p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*"))}


def test_params_and_train_state_round_trip_exactly_as_two_items(tmp_path):
    state = _state()
    with checkpoint.Checkpointer(tmp_path) as ckpt:
        assert ckpt.latest_step() is None
        assert _save(ckpt, 7, state)
        params, rest = ckpt.restore(state.params, _rest(state))
        only_params = ckpt.restore_params(state.params)
    _assert_bitwise_equal(params, state.params)
    _assert_bitwise_equal(only_params, state.params)
    _assert_bitwise_equal(rest, _rest(state))
    assert isinstance(rest["opt_state"][0], optax.ScaleByAdamState)
    assert params["proj"].dtype == jnp.bfloat16
    assert {"params", "train"} <= {p.name for p in (tmp_path / "7").iterdir()}


def test_keeps_last_n_and_reports_latest(tmp_path):
    state = _state()
    with checkpoint.Checkpointer(tmp_path, keep=2) as ckpt:
        for step in (1, 2, 3, 4):
            _save(ckpt, step, state.replace(step=jnp.asarray(step, jnp.int32)))
        assert not _save(ckpt, 4, state)  # same step again: skipped, no error
        assert ckpt.latest_step() == 4
        assert ckpt.all_steps() == [3, 4]
        assert int(ckpt.restore(state.params, _rest(state), step=3)[1]["step"]) == 3
        with pytest.raises(FileNotFoundError, match=r"step 1 .*available steps: \[3, 4\]"):
            ckpt.restore_params(state.params, step=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["3", "4"]
    with checkpoint.Checkpointer(tmp_path) as ckpt:  # resume sees them
        assert ckpt.latest_step() == 4


def test_restore_without_checkpoint_says_so(tmp_path):
    with (
        checkpoint.Checkpointer(tmp_path) as ckpt,
        pytest.raises(FileNotFoundError, match="no checkpoint to restore"),
    ):
        ckpt.restore_params(_state().params)


def test_restore_onto_replicated_mesh_from_abstract_template(tmp_path):
    assert jax.device_count() == 8
    state = _state()
    replicated = NamedSharding(Mesh(np.array(jax.devices()), ("data",)), PartitionSpec())
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), state.params
    )
    with checkpoint.Checkpointer(tmp_path) as ckpt:
        _save(ckpt, 1, state)
        restored = ckpt.restore_params(abstract)
    for leaf in jax.tree.leaves(restored):
        assert leaf.sharding == replicated
    _assert_bitwise_equal(restored, state.params)


def test_shape_mismatch_names_leaves_and_shapes(tmp_path):
    with checkpoint.Checkpointer(tmp_path) as ckpt:
        _save(ckpt, 1, _state(width=8))
        with pytest.raises(checkpoint.ShapeMismatchError) as info:
            ckpt.restore(_state(width=16).params, _rest(_state(width=16)))
        with pytest.raises(checkpoint.ShapeMismatchError, match=r"prompt.ctx: checkpoint"):
            ckpt.restore_params(_state(width=16).params)
    message = str(info.value)
    assert "prompt.ctx: checkpoint (4, 8) vs template (4, 16)" in message
    assert "another config" in message
    assert info.value.stored["prompt.ctx"] == (4, 8)


def test_interrupted_save_is_cleaned_by_the_trainer_only(tmp_path):
    state = _state()
    with checkpoint.Checkpointer(tmp_path) as ckpt:
        _save(ckpt, 1, state)
    # What a save killed mid-write leaves behind: an unfinished Orbax tmp dir for step 2.
    leftover = tmp_path / "2.orbax-checkpoint-tmp-1700000000"
    (leftover / "params").mkdir(parents=True)
    (leftover / "params" / "partial").write_bytes(b"\0" * 10)
    before = _tree_listing(tmp_path)
    with checkpoint.Checkpointer(tmp_path, read_only=True) as reader:  # e.g. eval beside train
        assert reader.all_steps() == [1]
        _assert_bitwise_equal(reader.restore_params(state.params), state.params)
    assert _tree_listing(tmp_path) == before  # nothing removed, written or touched
    with checkpoint.Checkpointer(tmp_path) as ckpt:
        assert ckpt.latest_step() == 1
        assert _save(ckpt, 2, state)
        assert ckpt.all_steps() == [1, 2]
    assert not leftover.exists()


def test_read_only_checkpointer_never_writes(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoints folder"):
        checkpoint.Checkpointer(tmp_path / "absent", read_only=True)
    assert not (tmp_path / "absent").exists()
    with checkpoint.Checkpointer(tmp_path) as ckpt:
        _save(ckpt, 1, _state())
    with checkpoint.Checkpointer(tmp_path, read_only=True) as reader, pytest.raises(
        RuntimeError, match="read-only"
    ):
        _save(reader, 2, _state())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["1"]


def test_a_non_finite_state_is_never_saved(tmp_path):
    state = _state()
    broken = {"prompt": {"ctx": state.params["prompt"]["ctx"].at[0, 0].set(jnp.nan)},
              "proj": state.params["proj"]}
    with checkpoint.Checkpointer(tmp_path) as ckpt:
        _save(ckpt, 1, state)
        with pytest.raises(ValueError, match=r"step 2: non-finite values in \['params\.prompt"
                           r"\.ctx'\].*last complete checkpoint is step 1"):
            ckpt.save(2, broken, _rest(state))
        assert ckpt.all_steps() == [1]


def test_a_failed_save_names_the_cause_and_the_last_good_checkpoint(tmp_path, monkeypatch):
    with checkpoint.Checkpointer(tmp_path) as ckpt:
        _save(ckpt, 1, _state())

        def full_disk(*args, **kwargs):
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(ckpt._manager, "save", full_disk)
        with pytest.raises(checkpoint.CheckpointSaveError) as info:
            _save(ckpt, 2, _state())
    message = str(info.value)
    assert "could not save the checkpoint of step 2" in message
    assert "No space left on device" in message
    assert f"last complete checkpoint is step 1 ({tmp_path / '1'})" in message


def test_a_run_of_genclip_jax_0_1_0_restores(tmp_path):
    """tests/data/run_v0.1.0: written by the 0.1.0 trainer (one `default` item per step)."""
    run = DATA_DIR / "run_v0.1.0"
    expected = dict(np.load(run / "params.npz"))
    template = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in expected.items()}
    before = _tree_listing(run)
    with checkpoint.Checkpointer(run / "checkpoints", read_only=True) as reader:
        assert reader.all_steps() == [1]
        params = reader.restore_params(template)
        tx = optax.adam(1e-3)
        full_params, rest = reader.restore(params, {"step": jnp.zeros((), jnp.int32),
                                                    "opt_state": tx.init(params)})
    for name, value in expected.items():
        np.testing.assert_array_equal(params[name], value)
        np.testing.assert_array_equal(full_params[name], value)
    assert int(rest["step"]) == 2  # 12 images in batches of 8: 2 steps in its one epoch
    assert isinstance(rest["opt_state"][0], optax.ScaleByAdamState)
    assert _tree_listing(run) == before


def test_params_export_round_trip(tmp_path):
    params = _state().params
    info = {"method": "anomalyclip", "prompts": {"n_ctx": 4, "layers": (6, 12)}}
    checkpoint.save_params(tmp_path / "export", params, info)
    loaded, loaded_info = checkpoint.load_params(tmp_path / "export")
    _assert_bitwise_equal(loaded, params)
    assert loaded_info == {"method": "anomalyclip", "prompts": {"n_ctx": 4, "layers": [6, 12]}}
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
