"""Multi-host for real on one machine: 2 processes x 4 CPU devices over loopback (gloo) give the
same training and the same tables (zero- and few-shot) as 1 process x 8 devices."""

from __future__ import annotations

import json
import shutil

import jax
import numpy as np
import pytest
from multihost_helpers import launch
from train_helpers import tiny_config, write_dataset

from genclip_jax import checkpoint, evaluate, train_eval
from genclip_jax.backbone import load_backbone
from genclip_jax.methods import create_method


def _final_params(config, workdir):
    clip_config, _ = load_backbone(config.model)
    shapes = jax.eval_shape(create_method(config, clip_config).init, jax.random.PRNGKey(0))
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    template = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                            shapes)
    with checkpoint.Checkpointer(workdir / "checkpoints", read_only=True) as ckpt:
        return jax.device_get(ckpt.restore_params(template))


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def single(data_root, tmp_path_factory):
    """(config, workdir) of the one-process run: trained and evaluated."""
    config = tiny_config(data_root)
    config.train.epochs = 1
    config.eval.heatmaps_per_class = 0
    workdir = tmp_path_factory.mktemp("single")
    train_eval.train_and_evaluate(config, str(workdir))
    return config, workdir


def test_two_processes_match_one(data_root, single, tmp_path):
    config, single = single
    multi = tmp_path / "multi"
    results = launch(multi, data_root, 2)
    for i, (output, code) in enumerate(results):
        assert code == 0, f"process {i} failed:\n{output[-4000:]}"

    want, got = _final_params(config, single), _final_params(config, multi)
    for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got), strict=True):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=0, atol=1e-6)
    # The gradient all-reduce runs in another order over gloo, so the params (and so the metric
    # values) agree to float rounding, not bit for bit: the printed table is identical.
    single_out, multi_out = (run / "eval" / data_root.name for run in (single, multi))
    want_rows = json.loads((single_out / "metrics.json").read_text())["classes"]
    got_rows = json.loads((multi_out / "metrics.json").read_text())["classes"]
    assert got_rows.keys() == want_rows.keys()
    for cls, row in want_rows.items():
        for name, value in row.items():
            assert got_rows[cls][name] == pytest.approx(value, abs=1e-6), (cls, name)
    md = "metrics.md"
    assert (multi_out / md).read_text() == (single_out / md).read_text()


def test_processes_with_different_configs_stop_before_training(data_root, tmp_path):
    results = launch(tmp_path / "w", data_root, 2,
                      extra=lambda pid: [f"--config.train.lr={1e-3 * (pid + 1)}"])
    assert all(code != 0 for _, code in results)
    assert any("processes disagree on the config" in out for out, _ in results)
    assert not (tmp_path / "w" / "checkpoints").is_dir() or not any(
        (tmp_path / "w" / "checkpoints").iterdir())


def test_few_shot_eval_on_two_processes_matches_one(data_root, single, tmp_path):
    """The references' bank is encoded over both processes' devices and replicated: the few-shot
    tables equal the single-process ones (both evaluate the one-process run)."""
    refs = tmp_path / "refs" / "disc"
    refs.mkdir(parents=True)
    for image in sorted((data_root / "disc" / "test" / "good").glob("*.png"))[:2]:
        shutil.copy(image, refs / image.name)
    config, run = single
    config = config.copy_and_resolve_references()
    config.fewshot.k, config.fewshot.reference = 2, str(tmp_path / "refs")
    single = tmp_path / "single"
    evaluate.evaluate(config, str(run), out=str(single))
    multi = tmp_path / "multi"
    results = launch(run, data_root, 2, command="eval", extra=lambda pid: [
        "--config.fewshot.k=2", f"--config.fewshot.reference={tmp_path / 'refs'}",
        f"--out={multi}"])
    for i, (output, code) in enumerate(results):
        assert code == 0, f"process {i} failed:\n{output[-4000:]}"
    name = "metrics_2shot_seed0"
    want = json.loads((single / f"{name}.json").read_text())["classes"]
    got = json.loads((multi / f"{name}.json").read_text())["classes"]
    assert got.keys() == want.keys() == {"disc"}
    for metric, value in want["disc"].items():
        assert got["disc"][metric] == pytest.approx(value, abs=1e-6), metric
