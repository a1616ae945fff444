"""Which config fields a run pins, and how output folders are replaced."""

from __future__ import annotations

import json
import logging

import pytest

from genclip_jax import defaults, files, run_dir


def _run(tmp_path, config, with_checkpoint: bool = True) -> run_dir.RunDir:
    run = run_dir.RunDir(tmp_path / "run")
    run.path.mkdir()
    run.write_config(config)
    if with_checkpoint:
        (run.checkpoints / "2" / "params").mkdir(parents=True)
    return run


def test_every_listed_field_exists():
    flat = run_dir._flat(run_dir.config_to_dict(defaults.base_config()))
    for field in run_dir.MODEL_FIELDS + run_dir.TRAINING_FIELDS:
        assert any(run_dir._covered(name, [field]) for name in flat), field
    assert not set(run_dir.MODEL_FIELDS) & set(run_dir.TRAINING_FIELDS)


def test_eval_ignores_data_roots_batch_sizes_eval_and_training_recipe(tmp_path):
    trained = defaults.tiny_config()
    trained.data.train_root, trained.data.test_root = "/data/visa", "/data/mvtec"
    run = _run(tmp_path, trained)
    other = defaults.tiny_config()  # the README's eval: no train root, another target
    other.data.test_root = "/data/mpdd"
    other.eval.batch_size, other.train.batch_size, other.train.lr = 1, 2, 0.5
    other.eval.metrics = ["image_auroc"]
    other.genclip.fusion_w, other.anomalyclip.sigma = 0.1, 2.0
    other.model.compute_dtype = "bfloat16"
    run.check_readable(other)


@pytest.mark.parametrize(("field", "value"), [
    ("method", "genclip"), ("model.clip", "openai/clip-vit-base-patch16"),
    ("prompts.n_ctx", 5), ("prompts.abnormal_state", "broken {}"), ("genclip.layers", [6, 12]),
    ("model.random_arch.vision_layers", 12), ("model.dpam_start", 0),
])
def test_eval_refuses_a_different_model(tmp_path, field, value):
    run = _run(tmp_path, defaults.tiny_config())
    config = defaults.tiny_config()
    *parents, leaf = field.split(".")
    node = config
    for key in parents:
        node = node[key]
    old = node[leaf]
    node[leaf] = value
    with pytest.raises(ValueError) as info:
        run.check_readable(config)
    message = str(info.value)
    assert message.startswith(f"cannot evaluate this run: {run.path} holds a run whose config")
    assert f"  {field}: {json.loads(json.dumps(old))!r} (run) vs {value!r} (now)" in message


def test_resume_also_pins_the_training_recipe_but_not_its_length(tmp_path):
    run = _run(tmp_path, defaults.tiny_config())
    longer = defaults.tiny_config()
    longer.train.epochs, longer.train.cache_features, longer.data.prefetch = 9, True, 0
    longer.parallel.num_devices, longer.train.log_every_steps = 1, 5
    run.check_resumable(longer)
    faster = defaults.tiny_config()
    faster.train.lr = 1e-2
    with pytest.raises(ValueError, match=r"cannot resume training(.|\n)*train\.lr: 0\.001 \(run\) "
                       r"vs 0\.01 \(now\)"):
        run.check_resumable(faster)
    run.check_readable(faster)  # but it may evaluate the run


def test_a_config_without_checkpoint_is_no_run_yet(tmp_path, caplog):
    run = _run(tmp_path, defaults.tiny_config(), with_checkpoint=False)
    changed = defaults.tiny_config()
    changed.prompts.n_ctx = 7
    with caplog.at_level(logging.INFO):
        run.check_resumable(changed)
    assert [r.getMessage() for r in caplog.records] == [
        f"{run.path} has no checkpoint yet: starting the run afresh with this config"]
    with pytest.raises(FileNotFoundError, match=r"no checkpoint in .*train first"):
        run.check_readable(changed)


def test_a_run_written_before_a_field_existed_takes_its_default(tmp_path):
    run = _run(tmp_path, defaults.tiny_config())
    saved = json.loads(run.config_path.read_text())
    del saved["genclip"]["use_mvp"]
    run.config_path.write_text(json.dumps(saved))
    run.check_readable(defaults.tiny_config())
    changed = defaults.tiny_config()
    changed.genclip.use_mvp = False
    with pytest.raises(ValueError, match=r"genclip\.use_mvp: True \(run\) vs False \(now\)"):
        run.check_readable(changed)


def test_a_broken_config_json_is_named(tmp_path):
    run = _run(tmp_path, defaults.tiny_config())
    run.config_path.write_text("{not json")
    with pytest.raises(ValueError, match=r"config\.json: not a valid JSON config"):
        run.check_readable(defaults.tiny_config())


def test_staged_output_replaces_the_folder_whole_or_not_at_all(tmp_path):
    out = tmp_path / "eval" / "mvtec"
    with run_dir.staged_output(files.check_replaceable(out, "--out")) as stage:
        (stage / "metrics.md").write_text("first")
        (stage / "heatmaps").mkdir()
        (stage / "heatmaps" / "stale.png").write_text("x")
    assert (out / "metrics.md").read_text() == "first"
    with run_dir.staged_output(files.check_replaceable(out, "--out")) as stage:
        (stage / "metrics.md").write_text("second")
    assert sorted(p.name for p in out.iterdir()) == [files.OUTPUT_MARKER, "metrics.md"]
    assert (out / "metrics.md").read_text() == "second"  # no stale heatmap left behind
    with pytest.raises(RuntimeError, match="boom"), run_dir.staged_output(out) as stage:
        (stage / "metrics.md").write_text("third")
        raise RuntimeError("boom")
    assert (out / "metrics.md").read_text() == "second"
    assert sorted(p.name for p in out.parent.iterdir()) == ["mvtec"]  # no staging left


def test_a_folder_of_someone_elses_files_is_never_replaced(tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "part1.jpg").write_text("a user's file")
    with pytest.raises(ValueError, match="holds files that genclip-jax did not write"):
        files.check_replaceable(photos, "--out")
    (tmp_path / "empty").mkdir()
    files.check_replaceable(tmp_path / "empty", "--out")
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="is a file"):
        files.check_replaceable(tmp_path / "file", "--out")


def test_an_unwritable_place_is_refused_without_writing(tmp_path, monkeypatch):
    files.check_writable(tmp_path / "new" / "deeper", "--out")
    assert not (tmp_path / "new").exists()
    monkeypatch.setattr(files.os, "access", lambda path, mode: False)  # a read-only mount
    with pytest.raises(PermissionError, match=rf"--out: cannot write into {tmp_path}/new"):
        files.check_writable(tmp_path / "new", "--out")
