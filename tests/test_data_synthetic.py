"""Synthetic MVTec-layout dataset: layout, meta.json, exact visible defects, determinism."""

import pathlib

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from genclip_jax.data import meta as meta_lib
from genclip_jax.data import synthetic


def _files(root: pathlib.Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> pathlib.Path:
    root = tmp_path_factory.mktemp("synthetic")
    synthetic.write_synthetic_dataset(root, image_size=64)
    return root


def test_layout_and_meta(dataset):
    meta = meta_lib.read_meta(dataset / "meta.json", check_files=True)
    assert list(meta["test"]) == sorted(synthetic.CLASSES)
    for cls in synthetic.CLASSES:
        test = meta["test"][cls]
        assert len(meta["train"][cls]) == 4
        assert len(test) == 4 + 2 * len(synthetic.DEFECTS)
        assert {e["specie_name"] for e in test} == {"good", *synthetic.DEFECTS}
        assert all(e["anomaly"] == (e["specie_name"] != "good") for e in test)
    assert (dataset / "disc/ground_truth/crack/001_mask.png").is_file()


def test_defects_are_exact_binary_masks_and_visible(dataset):
    meta = meta_lib.read_meta(dataset / "meta.json")
    for entry in meta_lib.split_entries(meta, "test"):
        image = np.asarray(Image.open(dataset / entry["img_path"]), np.float32) / 255
        assert image.shape == (64, 64, 3)
        if not entry["anomaly"]:
            continue
        mask_image = Image.open(dataset / entry["mask_path"])
        assert mask_image.mode == "L"
        mask = np.asarray(mask_image)
        assert set(np.unique(mask)) == {0, 255}
        defect = mask > 0
        ring = ndimage.binary_dilation(defect, iterations=3) & ~defect
        # The defect changes local statistics: its mean colour is far from its surroundings'.
        contrast = np.abs(image[defect].mean(0) - image[ring].mean(0)).max()
        assert contrast > 0.1, (entry["img_path"], contrast)


def test_deterministic_by_seed(tmp_path, dataset):
    synthetic.write_synthetic_dataset(tmp_path / "again", image_size=64)
    assert _files(tmp_path / "again") == _files(dataset)
    synthetic.write_synthetic_dataset(tmp_path / "seed1", image_size=64, seed=1)
    other = _files(tmp_path / "seed1")
    assert other.keys() == _files(dataset).keys()
    assert other["disc/test/good/000.png"] != _files(dataset)["disc/test/good/000.png"]


def test_subset_gives_the_same_files(tmp_path, dataset):
    synthetic.write_synthetic_dataset(
        tmp_path, classes=("disc",), defects=("spot",), image_size=64, n_train_good=1
    )
    full = _files(dataset)
    subset = {k: v for k, v in _files(tmp_path).items() if k != "meta.json"}
    assert subset and all(full[k] == v for k, v in subset.items())


def test_unknown_names():
    with pytest.raises(ValueError, match=r"unknown classes/defects \['cube', 'dent'\]"):
        synthetic.write_synthetic_dataset("/nonexistent", classes=("cube",), defects=("dent",))
