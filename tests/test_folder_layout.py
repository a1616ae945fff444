"""make-meta --dataset=folder: plain good/defect folders with optional masks, the deterministic
stratified split, the summary, and the warnings and errors of real user folders."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys
import warnings

import pytest
from PIL import Image

from genclip_jax.data import meta, pipeline
from genclip_jax.data.synthetic import write_synthetic_dataset

REPO = pathlib.Path(__file__).resolve().parents[1]


def _png(path: pathlib.Path, size=(32, 24), value=100) -> pathlib.Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("L", size, value).save(path)
    return path


def _tree(root: pathlib.Path) -> pathlib.Path:
    """Class `part`: 10 good (two in a subfolder), 5 'dent' with masks (one named _mask, one
    nested), 3 'defect' without masks."""
    for i in range(8):
        _png(root / "part" / "good" / f"{i}.png")
    for i in range(2):
        _png(root / "part" / "good" / "line2" / f"{i}.png")
    for i in range(4):
        _png(root / "part" / "dent" / f"{i}.png")
    _png(root / "part" / "dent" / "cam2" / "0.jpg")
    for i in range(3):
        _png(root / "part" / "masks" / "dent" / f"{i}.png", value=255)
    _png(root / "part" / "masks" / "dent" / "3_mask.png", value=255)
    _png(root / "part" / "masks" / "dent" / "cam2" / "0.png", value=255)
    for i in range(3):
        _png(root / "part" / "defect" / f"{i}.bmp")
    return root


def test_entries_masks_and_a_stratified_deterministic_split(tmp_path):
    root = _tree(tmp_path / "data")
    data, summary = meta.folder_meta(root, test_fraction=0.2, seed=0)
    assert summary == {"part": {"good": 10, "defective": 8, "with mask": 5, "unreadable": 0,
                                "train": 14, "test": 4}}
    entries = data["train"]["part"] + data["test"]["part"]
    by_path = {e["img_path"]: e for e in entries}
    assert by_path["part/dent/3.png"]["mask_path"] == "part/masks/dent/3_mask.png"
    assert by_path["part/dent/cam2/0.jpg"]["mask_path"] == "part/masks/dent/cam2/0.png"
    assert by_path["part/defect/1.bmp"]["mask_path"] == ""
    assert by_path["part/defect/1.bmp"]["anomaly"] == 1
    assert by_path["part/good/line2/1.png"] == {
        "img_path": "part/good/line2/1.png", "mask_path": "", "cls_name": "part",
        "specie_name": "good", "anomaly": 0}
    test = data["test"]["part"]
    assert sum(e["anomaly"] for e in test) == 2 and len(test) == 4  # 20 % of 10 and of 8
    again, _ = meta.folder_meta(root, test_fraction=0.2, seed=0)
    assert again == data
    other, _ = meta.folder_meta(root, test_fraction=0.2, seed=1)
    assert {e["img_path"] for e in other["test"]["part"]} != {e["img_path"] for e in test}
    everything, summary = meta.folder_meta(root, test_fraction=0.0)
    assert everything["test"] == {} and len(everything["train"]["part"]) == 18
    meta.validate_meta(data, root=root, check_files=True)


def test_the_pipeline_reads_a_folder_set_with_and_without_masks(tmp_path):
    root = _tree(tmp_path / "data")
    meta.make_meta("folder", str(root), test_fraction=0.0)
    entries = meta.split_entries(meta.read_meta(root / "meta.json"), "train")
    dataset = pipeline.Dataset.from_entries(root, entries)
    has_mask = {dataset.read(i).img_path: dataset.read(i, False).has_mask
                for i in range(len(dataset))}
    assert has_mask["part/dent/0.png"] and has_mask["part/good/0.png"]
    assert not has_mask["part/defect/0.bmp"]
    zeros = pipeline.Dataset.from_entries(root, entries, missing_mask="zeros")
    assert all(zeros.read(i, False).has_mask for i in range(len(zeros)))
    with pytest.raises(ValueError, match=r"missing_mask: expected one of \['ignore', 'zeros'\]"):
        pipeline.Dataset.from_entries(root, entries, missing_mask="skip")


def test_user_folder_problems_are_warned_once_and_counted(tmp_path):
    root = _tree(tmp_path / "data")
    (root / "part" / "good" / "broken.png").write_bytes(b"\x89PNG not really")
    (root / "part" / "good" / "notes.txt").write_text("not an image")
    (root / "part" / "scratch").mkdir()
    _png(root / "part" / "masks" / "good" / "0.png", value=255)  # a mask of a good image
    _png(root / "only_good" / "good" / "0.png")
    _png(root / "only_bad" / "crack" / "0.png")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        data, summary = meta.folder_meta(root, test_fraction=0.0)
    messages = [str(w.message) for w in caught]

    def one(pattern: str) -> str:
        found = [m for m in messages if pattern in m]
        assert len(found) == 1, (pattern, messages)
        return found[0]

    assert "['part/good/broken.png']" in one("1 unreadable image(s) of class 'part' skipped")
    assert summary["part"]["unreadable"] == 1 and summary["part"]["good"] == 10
    one(f"{root / 'part' / 'scratch'} holds no images")
    one(f"{root / 'part' / 'masks' / 'good' / '0.png'} is a non-empty mask of the good image")
    assert "synthetic_anomalies" in one("class 'only_good' has normal images only")
    assert "cannot be calibrated" in one("class 'only_bad' has no good images")
    assert len(messages) == 5
    assert data["train"]["only_good"][0]["anomaly"] == 0
    assert all(e["mask_path"] == "" for e in data["train"]["part"] if e["anomaly"] == 0)


def test_a_mask_of_another_size_names_both_files_and_sizes(tmp_path):
    root = _tree(tmp_path / "data")
    _png(root / "part" / "masks" / "dent" / "0.png", size=(30, 24), value=255)
    with pytest.raises(ValueError) as err:
        meta.folder_meta(root)
    message = str(err.value)
    assert f"mask {root / 'part' / 'masks' / 'dent' / '0.png'} (30x24)" in message
    assert f"its image {root / 'part' / 'dent' / '0.png'} (32x24, WxH)" in message


@pytest.mark.parametrize("layout,hint", [("mvtec", "mvtec"), ("visa", "visa")])
def test_a_published_layout_given_as_folder_names_the_right_dataset(tmp_path, layout, hint):
    if layout == "mvtec":
        write_synthetic_dataset(tmp_path, classes=("disc",), image_size=32, n_train_good=1,
                                n_test_good=1, n_test_defect_per_type=1)
    else:
        _png(tmp_path / "candle" / "Data" / "Images" / "Normal" / "0.JPG")
        (tmp_path / "split_csv").mkdir()
    with pytest.raises(ValueError, match=f"looks like a {hint} layout.*--dataset={hint}"):
        meta.folder_meta(tmp_path)


def test_the_synthetic_folder_layout_round_trips_through_make_meta(tmp_path):
    """`genclip-jax synthetic --layout=folder` + `make-meta --dataset=folder`: the CLI path of
    the README, with its summary table; an existing meta.json is kept without --overwrite."""
    out = tmp_path / "own"
    cli = [sys.executable, "-m", "genclip_jax.cli"]
    subprocess.run([*cli, "synthetic", "--layout=folder", f"--out={out}"], check=True,
                   cwd=REPO, capture_output=True)
    assert not (out / "meta.json").exists()
    assert sorted(p.name for p in (out / "disc").iterdir()) == [
        "crack", "good", "masks", "missing", "scratch", "spot"]
    result = subprocess.run(
        [*cli, "make-meta", "--dataset=folder", f"--root={out}", "--test-fraction", "0.25",
         "--seed=3"], cwd=REPO, capture_output=True, text=True, check=True)
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["class", "good", "defective", "with", "mask", "unreadable",
                                "train", "test"]
    assert lines[1].split() == ["checker", "8", "8", "8", "0", "12", "4"]
    assert lines[4].split() == ["total", "24", "24", "24", "0", "36", "12"]
    data = json.loads((out / "meta.json").read_text())
    assert {e["anomaly"] for e in data["test"]["disc"]} == {0, 1}
    again = subprocess.run([*cli, "make-meta", "--dataset=folder", f"--root={out}"],
                           cwd=REPO, capture_output=True, text=True)
    assert again.returncode == 1 and "already exists" in again.stderr
    assert json.loads((out / "meta.json").read_text()) == data


def test_the_split_does_not_depend_on_other_classes(tmp_path):
    root = _tree(tmp_path / "a")
    alone, _ = meta.folder_meta(root, test_fraction=0.3, seed=5)
    for i in range(4):
        _png(root / "another" / "good" / f"{i}.png")
    with_other, _ = meta.folder_meta(root, test_fraction=0.3, seed=5)
    assert with_other["test"]["part"] == alone["test"]["part"]
    assert len(with_other["test"]["another"]) == 1  # round(0.3 x 4)
