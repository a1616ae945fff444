"""End to end on 8 fake CPU devices: train, feature cache, resume (also after a kill), eval."""

from __future__ import annotations

import json
import pathlib
import signal
import subprocess
import sys
import time

import jax.numpy as jnp
import numpy as np
import pytest
from train_helpers import (
    RecordingWriter,
    assert_trees_equal,
    cli_overrides,
    subprocess_env,
    tiny_config,
    write_dataset,
)

from genclip_jax import defaults, evaluate, train
from genclip_jax.data import pipeline

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def reference(data_root, tmp_path_factory):
    """An uninterrupted, uncached 2-epoch run: (workdir, final state, recorded metrics)."""
    workdir = tmp_path_factory.mktemp("reference")
    writer = RecordingWriter()
    state = train.train(tiny_config(data_root), str(workdir), writer)
    return workdir, state, writer


def _final_state(config, workdir: pathlib.Path, writer=None):
    return train.train(config, str(workdir), writer or RecordingWriter())


def test_two_epochs_lower_the_loss_and_eval_writes_tables_and_heatmaps(reference, data_root):
    workdir, state, writer = reference
    assert int(state.step) == 4  # 2 epochs x 2 steps (12 images, global batch 8)
    (_, first), (_, second) = writer.scalars["epoch/loss"]
    assert second < first
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["1", "2"]

    rows = evaluate.evaluate(tiny_config(data_root), str(workdir))  # from the latest checkpoint
    assert list(rows) == ["disc"]
    assert all(0.0 <= v <= 1.0 for v in rows["disc"].values())
    out = workdir / "eval" / data_root.name
    for name in ("metrics.md", "metrics.csv", "metrics.json", "eval.json"):
        assert (out / name).stat().st_size > 0
    assert json.loads((out / "eval.json").read_text())["model"] == str(workdir / "checkpoints/2")
    panels = sorted((out / "heatmaps").rglob("*.png"))
    assert len(panels) == 2  # eval.heatmaps_per_class of the tiny config


def test_cached_features_give_the_same_steps_without_decoding_images(
    reference, data_root, tmp_path, monkeypatch
):
    _, ref_state, ref_writer = reference
    transforms = []
    original = pipeline.resize_image
    monkeypatch.setattr(
        pipeline, "resize_image", lambda *a, **k: transforms.append(1) or original(*a, **k)
    )
    config = tiny_config(data_root)
    config.train.cache_features = True
    writer = RecordingWriter()
    state = _final_state(config, tmp_path, writer)
    assert len(transforms) == 12  # the first epoch only: the second reads the cache
    steps, losses = zip(*writer.scalars["train/loss"], strict=True)
    ref_steps, ref_losses = zip(*ref_writer.scalars["train/loss"], strict=True)
    assert steps == ref_steps == (1, 2, 3, 4)
    np.testing.assert_allclose(losses, ref_losses, rtol=0, atol=1e-6)
    assert_trees_equal(state.params, ref_state.params)


def test_resume_after_an_epoch_is_bit_for_bit(reference, data_root, tmp_path):
    _, ref_state, _ = reference
    config = tiny_config(data_root)
    config.train.epochs = 1
    _final_state(config, tmp_path)
    config.train.epochs = 2  # an allowed change when resuming
    writer = RecordingWriter()
    state = _final_state(config, tmp_path, writer)
    assert [step for step, _ in writer.scalars["train/loss"]] == [3, 4]  # epoch 2 only
    assert_trees_equal(state.params, ref_state.params)
    assert_trees_equal(state.opt_state, ref_state.opt_state)


def test_a_workdir_of_another_config_is_refused(reference, data_root):
    workdir, _, _ = reference
    config = tiny_config(data_root)
    config.prompts.n_ctx = 5
    with pytest.raises(ValueError, match=r"cannot resume(.|\n)*prompts\.n_ctx: 4 \(run\) vs 5"):
        train.train(config, str(workdir), RecordingWriter())


def _completed_epochs(workdir: pathlib.Path) -> list[int]:
    ckpt_dir = workdir / "checkpoints"
    return sorted(int(p.name) for p in ckpt_dir.iterdir() if p.name.isdigit()) if (
        ckpt_dir.is_dir()) else []


def test_killed_training_resumes_bit_for_bit(reference, data_root, tmp_path):
    """SIGKILL `genclip-jax train` once epoch 1 is checkpointed, then resume in that workdir."""
    workdir = tmp_path / "killed"
    command = [sys.executable, "-m", "genclip_jax.cli", "train", f"--workdir={workdir}",
               *cli_overrides(data_root), "--config.train.epochs=1000"]
    log = tmp_path / "train.log"
    with log.open("w") as out:
        process = subprocess.Popen(command, cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                                   env=subprocess_env())
    try:
        deadline = time.monotonic() + 180
        while not _completed_epochs(workdir):
            assert process.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "no checkpoint after 180 s:\n" + log.read_text()
            time.sleep(0.02)
        process.send_signal(signal.SIGKILL)
    finally:
        process.kill()
        process.wait()
    done = _completed_epochs(workdir)[-1]
    config = tiny_config(data_root)
    config.train.epochs = done + 1
    state = _final_state(config, workdir)
    # A kill that lands after epoch 2 (a slow machine) needs an uninterrupted twin of its length.
    expected = reference[1] if done == 1 else _final_state(config, tmp_path / "uninterrupted")
    assert int(state.step) == 2 * (done + 1)
    assert_trees_equal(state.params, expected.params)



class _MaskProbe:
    """A method whose loss is a weight times the mean of the mask; it records the mask's dtype."""

    def __init__(self):
        self.seen = []

    def init(self, rng):
        del rng
        return {"w": jnp.float32(1.0)}

    def loss(self, params, clip_params, feats, batch):
        del clip_params, feats
        self.seen.append(batch["mask"].dtype)
        total = params["w"] * jnp.mean(batch["mask"] * 1.0)
        return total, {"total": total, "local": total, "ce": total}


def test_the_train_step_gives_the_loss_the_pipeline_mask_as_float32():
    """Batches carry bool masks (a quarter of float32's bytes); the loss is written for floats."""
    mask = np.zeros((2, 4, 4), bool)
    mask[0, :2] = True  # a quarter of the pixels
    method, tx = _MaskProbe(), train.make_optimizer(defaults.base_config().train)
    state = train.create_train_state(method, tx, 0)
    _, metrics = train.make_update_fn(method, tx)(state, {}, {}, {"mask": mask})
    assert method.seen == [jnp.float32]
    assert float(metrics.compute()["loss"]) == 0.25
