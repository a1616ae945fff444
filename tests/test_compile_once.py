"""Jitted steps compile once per (method, config): a second ablation seed traces none of them
again, and the training loop reads the device only to log and before a checkpoint."""

from __future__ import annotations

import jax
import pytest
from jax._src import dispatch
from train_helpers import RecordingWriter

from genclip_jax import ablate, defaults, evaluate, train, train_eval
from genclip_jax.backbone import load_backbone
from genclip_jax.data.synthetic import write_synthetic_dataset

STEPS = ("_update", "encode_images", "predict", "class_image_features")


@pytest.fixture(scope="module")
def genclip_config(tmp_path_factory):
    data = tmp_path_factory.mktemp("data")
    write_synthetic_dataset(data, classes=("disc",), defects=("spot", "scratch"), image_size=56,
                            n_train_good=1, n_test_good=2, n_test_defect_per_type=1)
    config = defaults.tiny_config("genclip")  # CNF rule B: the class-embedding step runs too
    config.model.image_size = 56
    config.genclip.gqp_len = config.genclip.state_len = 2
    config.train.epochs, config.train.progress = 1, False
    config.eval.heatmaps_per_class = 0
    config.eval.metrics = ["image_auroc", "pixel_auroc"]
    config.data.train_root = config.data.test_root = str(data)
    return config


def test_a_second_ablation_seed_traces_no_step_again(genclip_config, tmp_path, monkeypatch):
    built = {}

    def cached_backbone(model_cfg, check=None):  # the same frozen weights for every run
        if "clip" not in built:
            built["clip"] = load_backbone(model_cfg)
        if check is not None:
            check(built["clip"][0])
        return built["clip"]

    monkeypatch.setattr(train, "load_backbone", cached_backbone)
    monkeypatch.setattr(evaluate, "load_backbone", cached_backbone)
    traces: list[list[str]] = []
    run = train_eval.train_and_evaluate

    def counted_run(config, workdir):
        traces.append([])
        return run(config, workdir)

    def listener(event, duration, *, fun_name="", **_):
        if event == dispatch.JAXPR_TRACE_EVENT and traces and fun_name in STEPS:
            traces[-1].append(fun_name)

    monkeypatch.setattr(train_eval, "train_and_evaluate", counted_run)
    jax.clear_caches()  # what earlier tests compiled would hide the first seed's traces
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        ablate.run_ablation(genclip_config, str(tmp_path), ["dual_branch"], seeds=[0, 1])
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    first, second = traces
    assert set(first) == set(STEPS), first  # each step traced by the first seed...
    assert second == []  # ...and reused by the second


@pytest.mark.parametrize(("log_every", "reads"), [(1000, [4, 4]), (3, [3, 1, 2, 2])])
def test_the_loop_reads_metrics_only_to_log_and_before_a_checkpoint(
    genclip_config, tmp_path, monkeypatch, log_every, reads
):
    config = genclip_config.copy_and_resolve_references()
    config.train.epochs, config.train.batch_size = 2, 1  # 4 images: 4 steps an epoch
    config.parallel.num_devices = 1
    config.train.log_every_steps = log_every
    config.data.test_root = ""
    seen = []
    read = train._read_checked

    def counted(pending, *args):
        seen.append(len(pending))
        return read(pending, *args)

    monkeypatch.setattr(train, "_read_checked", counted)
    writer = RecordingWriter()
    state = train.train(config, str(tmp_path / "run"), writer)
    assert int(state.step) == 8 and seen == reads
    logged = [step for step, _ in writer.scalars.get("train/loss", [])]
    assert logged == [s for s in range(1, 9) if s % log_every == 0]
