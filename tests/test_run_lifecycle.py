"""A run you can trust: evaluation never changes a run, failed starts never block a workdir,
faults stop training with what was finished kept, and nothing is silently overwritten."""

from __future__ import annotations

import contextlib
import csv
import errno
import json
import os
import pathlib
import shutil
import sys
import time

import jax
import numpy as np
import pytest
from conftest import DATA_DIR
from PIL import Image
from train_helpers import tiny_config, write_dataset

from genclip_jax import evaluate, predict, train
from genclip_jax.data import meta as meta_lib


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def run(data_root, tmp_path_factory):
    """A finished 1-epoch run (no evaluation yet)."""
    config = tiny_config(data_root)
    config.train.epochs = 1
    workdir = tmp_path_factory.mktemp("runs") / "run"
    train.train(config, str(workdir))
    return workdir


def _listing(root: pathlib.Path, skip: tuple[str, ...] = ()) -> dict[str, tuple]:
    """Every path under `root` (but those under `skip`) with its size and mtime."""
    return {
        rel: (p.is_dir(), p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(root.rglob("*"))
        if not (rel := p.relative_to(root).as_posix()).startswith(skip)
    }


def _copy_dataset(data_root: pathlib.Path, dest: pathlib.Path) -> pathlib.Path:
    shutil.copytree(data_root, dest)
    return dest


def _eval_config(data_root: pathlib.Path, test_root: pathlib.Path):
    """The README's eval: the run's config file, another test root, no training root."""
    config = tiny_config(data_root)
    config.data.train_root = ""
    config.data.test_root = str(test_root)
    return config


# Paths under which any attempt to write, create, rename or delete raises EROFS, as on a
# read-only mount (an audit hook cannot be removed: it stays installed, inert when empty).
_READ_ONLY: list[str] = []
_WRITE_EVENTS = {"os.mkdir", "os.rename", "os.remove", "os.rmdir", "shutil.rmtree", "os.chmod",
                 "os.truncate", "os.utime", "os.symlink", "os.link"}


def _read_only_hook(event: str, args: tuple) -> None:
    if not _READ_ONLY:
        return
    if event == "open":
        path, mode, flags = args
        writes = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
            isinstance(flags, int) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))
        paths = [path] if writes else []
    elif event in _WRITE_EVENTS:
        paths = [a for a in args if isinstance(a, str | bytes | os.PathLike)]
    else:
        return
    for path in paths:
        if isinstance(path, str | os.PathLike) and os.path.abspath(path).startswith(_READ_ONLY[0]):
            raise PermissionError(errno.EROFS, f"read-only file system ({event})", str(path))


sys.addaudithook(_read_only_hook)


@contextlib.contextmanager
def _read_only(folder: pathlib.Path):
    _READ_ONLY.append(str(folder))
    try:
        yield
    finally:
        _READ_ONLY.clear()


def test_eval_and_predict_never_write_into_the_run(run, data_root, tmp_path):
    target = _copy_dataset(data_root, tmp_path / "target_a")
    before = _listing(run)
    config = _eval_config(data_root, target)
    with _read_only(run):  # e.g. a shared model folder: any write attempt would fail
        rows = evaluate.evaluate(config, str(run), out=str(tmp_path / "tables"))
        predict.predict_folder(config, str(run), str(target / "disc" / "test"),
                               str(tmp_path / "pred"))
    assert _listing(run) == before
    assert (tmp_path / "pred" / "scores.csv").is_file()
    evaluate.evaluate(config, str(run))  # default output: RUN/eval/target_a, nothing else
    assert _listing(run, skip=("eval",)) == before  # config.json, checkpoints, logs
    assert sorted(p.name for p in (run / "eval").iterdir()) == ["target_a"]
    out = run / "eval" / "target_a"
    assert (out / "metrics.md").read_text() == (tmp_path / "tables" / "metrics.md").read_text()
    assert json.loads((out / "metrics.json").read_text())["classes"]["disc"] == pytest.approx(
        rows["disc"])
    assert json.loads((out / "eval.json").read_text())["test_root"] == str(target)


def test_a_second_target_gets_its_own_folder_and_a_rerun_replaces_one_whole(
    run, data_root, tmp_path
):
    first, second = (_copy_dataset(data_root, tmp_path / n) for n in ("set_one", "set_two"))
    evaluate.evaluate(_eval_config(data_root, first), str(run))
    one = run / "eval" / "set_one"
    one_before = _listing(one)
    assert len(list((one / "heatmaps").rglob("*.png"))) == 2
    evaluate.evaluate(_eval_config(data_root, second), str(run))
    assert _listing(one) == one_before  # the first target's tables are kept
    config = _eval_config(data_root, first)
    config.eval.heatmaps_per_class = 1
    evaluate.evaluate(config, str(run))
    assert len(list((one / "heatmaps").rglob("*.png"))) == 1  # no stale heatmap mixed in
    assert (run / "eval" / "set_two" / "metrics.md").is_file()
    assert not [p for p in (run / "eval").iterdir() if p.name.startswith(".")]


def test_eval_out_elsewhere_and_never_over_foreign_files(run, data_root, tmp_path):
    target = _copy_dataset(data_root, tmp_path / "target")
    config = _eval_config(data_root, target)
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "keep.jpg").write_text("a user's file")
    start = time.monotonic()
    with pytest.raises(ValueError, match="holds files that genclip-jax did not write"):
        evaluate.evaluate(config, str(run), out=str(photos))
    assert time.monotonic() - start < 5
    assert [p.name for p in photos.iterdir()] == ["keep.jpg"]
    evaluate.evaluate(config, str(run), out=str(tmp_path / "results"))
    assert (tmp_path / "results" / "metrics.csv").is_file()


def test_a_read_only_run_needs_an_out_elsewhere(run, data_root, tmp_path, monkeypatch):
    target = _copy_dataset(data_root, tmp_path / "target")
    config = _eval_config(data_root, target)
    real_access = evaluate.files.os.access
    monkeypatch.setattr(  # what a read-only mount answers for the run
        evaluate.files.os, "access",
        lambda path, mode: not str(path).startswith(str(run)) and real_access(path, mode))
    with pytest.raises(PermissionError, match=r"default of --out, in the run .*give a writable"):
        evaluate.evaluate(config, str(run))
    with pytest.raises(PermissionError, match="predict output"):
        predict.predict_folder(config, str(run), str(target / "disc" / "test"))
    evaluate.evaluate(config, str(run), out=str(tmp_path / "elsewhere"))


def test_eval_checks_every_listed_file_and_class_name_before_predicting(
    run, data_root, tmp_path, monkeypatch
):
    monkeypatch.setattr(evaluate, "load_model", lambda *a, **k: pytest.fail("model loaded"))
    broken = _copy_dataset(data_root, tmp_path / "broken")
    victim = sorted((broken / "disc" / "test").rglob("*.png"))[-1]
    victim.unlink()
    with pytest.raises(FileNotFoundError, match=victim.name):
        evaluate.evaluate(_eval_config(data_root, broken), str(run))

    renamed = _copy_dataset(data_root, tmp_path / "renamed")
    meta = json.loads((renamed / "meta.json").read_text())
    meta["test"] = {"mean": [{**e, "cls_name": "mean"} for e in meta["test"]["disc"]]}
    (renamed / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"meta\.json: class 'mean' is reserved"):
        evaluate.evaluate(_eval_config(data_root, renamed), str(run))
    assert not (run / "eval" / "broken").exists() and not (run / "eval" / "renamed").exists()


def test_eval_and_predict_of_a_missing_run_fail_before_loading_the_backbone(
    data_root, tmp_path, monkeypatch
):
    monkeypatch.setattr(evaluate, "load_model", lambda *a, **k: pytest.fail("model loaded"))
    config = _eval_config(data_root, data_root)
    for call in (lambda: evaluate.evaluate(config, str(tmp_path / "typo")),
                 lambda: predict.predict_folder(config, str(tmp_path / "typo"), str(data_root),
                                                str(tmp_path / "out"))):
        with pytest.raises(FileNotFoundError, match=r"no checkpoint in .*typo/checkpoints: train "
                           "first, or set eval.params"):
            call()
    assert not (tmp_path / "typo").exists() and not (tmp_path / "out").exists()


def test_an_empty_training_split_is_named(data_root, tmp_path):
    config = tiny_config(data_root)
    config.data.train_split = "train"  # the set has no train images
    with pytest.raises(ValueError, match=r"meta\.json: no images in split 'train'; nothing to"):
        train.train(config, str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_a_failed_start_never_blocks_the_corrected_command(data_root, tmp_path, caplog):
    workdir = tmp_path / "run"
    config = tiny_config(data_root)
    config.train.batch_size = 0
    with pytest.raises(ValueError, match=r"train\.batch_size: expected an integer >= 1, got 0"):
        train.train(config, str(workdir))
    assert not workdir.exists()
    # A run that died before its first checkpoint left a config.json of another model behind.
    config = tiny_config(data_root)
    config.prompts.n_ctx = 6
    evaluate.run_dir.RunDir(workdir).write_config(config)
    corrected = tiny_config(data_root)
    corrected.train.epochs = 1
    with caplog.at_level("INFO"):
        train.train(corrected, str(workdir))
    assert "has no checkpoint yet: starting the run afresh" in caplog.text
    assert json.loads((workdir / "config.json").read_text())["prompts"]["n_ctx"] == 4


@pytest.mark.parametrize("log_every", [1, 1000])  # read every step, or only before the save
def test_a_diverging_loss_stops_at_its_step_and_is_never_saved(data_root, tmp_path, log_every):
    config = tiny_config(data_root)
    config.train.lr = 1e30
    config.train.log_every_steps = log_every
    with pytest.raises(train.NonFiniteLossError) as info:
        train.train(config, str(tmp_path / "run"))
    message = str(info.value)
    assert message.startswith("step 2 (epoch 1): the loss is not finite (image_loss=nan "
                              "local_loss=nan loss=nan); training stopped")
    assert "There is no complete checkpoint yet" in message and "train.lr (now 1e+30)" in message
    assert not evaluate.run_dir.RunDir(tmp_path / "run").has_checkpoint()


def test_a_run_of_genclip_jax_0_1_0_evaluates_and_resumes(data_root, tmp_path, monkeypatch):
    """tests/data/run_v0.1.0 was trained with data.train_root "data" (relative)."""
    monkeypatch.chdir(tmp_path)
    _copy_dataset(data_root, tmp_path / "data")
    shutil.copytree(DATA_DIR / "run_v0.1.0", tmp_path / "run",
                    ignore=shutil.ignore_patterns("*.npz"))
    config = tiny_config(pathlib.Path("data"))
    model = evaluate.load_model(config, str(tmp_path / "run"))
    expected = np.load(DATA_DIR / "run_v0.1.0" / "params.npz")
    for name, value in jax.device_get(model.params).items():
        np.testing.assert_array_equal(value, expected[name])
    assert model.source == str(tmp_path / "run" / "checkpoints" / "1")
    config.train.epochs = 2
    state = train.train(config, str(tmp_path / "run"))
    assert int(state.step) == 4
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["1", "2"]


def test_predict_names_every_heatmap_apart(run, data_root, tmp_path):
    source = sorted((data_root / "disc" / "test").rglob("*.png"))[:3]
    folder = tmp_path / "images"
    (folder / "a").mkdir(parents=True)
    shutil.copy(source[0], folder / "a" / "b.png")
    Image.open(source[1]).convert("RGB").save(folder / "a" / "b.jpg")
    shutil.copy(source[2], folder / "a_b.png")
    config = _eval_config(data_root, data_root)
    scores = predict.predict_folder(config, str(run), str(folder), str(tmp_path / "out"))
    with scores.open() as f:
        rows = list(csv.DictReader(f))
    assert [(r["image"], r["heatmap"]) for r in rows] == [
        ("a/b.jpg", "heatmaps/a/b.jpg.png"), ("a/b.png", "heatmaps/a/b.png.png"),
        ("a_b.png", "heatmaps/a_b.png")]
    for row in rows:
        assert (tmp_path / "out" / row["heatmap"]).is_file()
    assert len({float(r["image_score"]) for r in rows}) == 3  # three different images


def test_predict_refuses_an_out_inside_the_images(run, data_root, tmp_path):
    images = _copy_dataset(data_root / "disc" / "test", tmp_path / "images")
    config = _eval_config(data_root, data_root)
    for out, message in ((images / "results", "is inside --images"),
                         (images, "is inside --images"),
                         (tmp_path, "is inside --out")):
        with pytest.raises(ValueError, match=message):
            predict.predict_folder(config, str(run), str(images), str(out))
    assert sorted(p.name for p in images.iterdir()) == sorted(
        p.name for p in (data_root / "disc" / "test").iterdir())


def test_predict_skips_non_finite_float_images_with_one_warning(run, data_root, tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    gray = np.asarray(Image.open(sorted((data_root / "disc" / "test").rglob("*.png"))[0])
                      .convert("L"), np.float32)
    Image.fromarray(gray / 255.0).save(folder / "unit.tif")  # float in [0, 1]
    Image.fromarray(gray.astype(np.uint8)).save(folder / "eight.png")
    broken = gray / 255.0
    broken[0, 0] = np.inf
    Image.fromarray(broken).save(folder / "inf.tif")
    config = _eval_config(data_root, data_root)
    with pytest.warns(UserWarning, match=r"skipped 1 file\(s\).*\['inf\.tif'\]"):
        scores = predict.predict_folder(config, str(run), str(folder), str(tmp_path / "out"))
    with scores.open() as f:
        rows = {r["image"]: float(r["image_score"]) for r in csv.DictReader(f)}
    assert rows.keys() == {"eight.png", "unit.tif"}
    assert rows["unit.tif"] == pytest.approx(rows["eight.png"], abs=1e-6)  # not a black image


def test_meta_of_the_synthetic_set_is_unchanged_by_all_of_this(data_root):
    meta = meta_lib.read_meta(data_root / "meta.json")
    assert sum(len(v) for v in meta["test"].values()) == 12
