"""TFDS builders: build on synthetic trees without TensorFlow, read back, compare to meta.json."""

import shutil
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from genclip_jax.data import meta as meta_lib
from genclip_jax.data import pipeline, synthetic
from genclip_jax.data.tfds import builders


@pytest.fixture(scope="module")
def mvtec_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("mvtec")
    synthetic.write_synthetic_dataset(
        root,
        classes=("disc", "checker"),
        defects=("spot", "missing"),
        image_size=32,
        n_train_good=1,
        n_test_good=1,
        n_test_defect_per_type=1,
    )
    return root


@pytest.fixture(scope="module")
def visa_root(tmp_path_factory, mvtec_root):
    """A VisA tree (CSV rows deliberately not in path order) from the synthetic images."""
    root = tmp_path_factory.mktemp("visa")
    rows = ["object,split,label,image,mask"]
    for cls in ("disc", "checker"):
        folder = root / cls / "Data"
        (folder / "Images" / "Anomaly").mkdir(parents=True)
        (folder / "Masks" / "Anomaly").mkdir(parents=True)
        (folder / "Images" / "Normal").mkdir(parents=True)
        normal = f"{cls}/Data/Images/Normal/0000.JPG"
        Image.open(mvtec_root / cls / "test/good/000.png").save(root / normal, quality=90)
        rows.append(f"{cls},train,normal,{normal},")
        for i, defect in enumerate(("spot", "missing")):
            image = f"{cls}/Data/Images/Anomaly/{9 - i:03d}.JPG"
            mask = f"{cls}/Data/Masks/Anomaly/{9 - i:03d}.png"
            Image.open(mvtec_root / cls / f"test/{defect}/000.png").save(root / image)
            shutil.copy(mvtec_root / cls / f"ground_truth/{defect}/000_mask.png", root / mask)
            rows.append(f"{cls},test,anomaly,{image},{mask}")
        rows.append(f"{cls},test,normal,{normal},")
    (root / "split_csv").mkdir()
    (root / "split_csv" / "1cls.csv").write_text("\n".join(rows) + "\n")
    return root


def _prepare(builder_cls, manual_dir, data_dir):
    builder = builder_cls(data_dir=str(data_dir))
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=str(manual_dir))
    )
    return builder


@pytest.mark.parametrize(
    ("builder_cls", "dataset", "root_fixture"),
    [(builders.MvtecAd, "mvtec", "mvtec_root"), (builders.Visa, "visa", "visa_root")],
)
def test_builder_yields_the_meta_json_samples(
    request, tmp_path, builder_cls, dataset, root_fixture
):
    root = request.getfixturevalue(root_fixture)
    meta = meta_lib.generate_meta(dataset, root)
    builder = _prepare(builder_cls, root, tmp_path)
    assert builder.info.file_format.value == "array_record"
    for split in ("train", "test"):
        entries = meta_lib.split_entries(meta, split)
        source = builders.data_source(builder, split)
        assert [source[i]["img_path"].decode() for i in range(len(source))] == [
            e["img_path"] for e in entries
        ]  # same samples, same order
        from_tfds = pipeline.Dataset.from_tfds(source)
        from_meta = pipeline.Dataset.from_entries(root, entries)
        for i, entry in enumerate(entries):
            example = source[i]
            assert example["image"] == (root / entry["img_path"]).read_bytes()  # not re-encoded
            assert example["label"] == entry["anomaly"]
            assert example["cls_name"].decode() == entry["cls_name"]
            assert example["specie_name"].decode() == entry["specie_name"]
            a, b = from_tfds.load(i, 24), from_meta.load(i, 24)
            assert a.keys() == b.keys()
            for key in a:
                np.testing.assert_array_equal(a[key], b[key], err_msg=f"{entry} {key}")
    assert "tensorflow" not in sys.modules


def test_read_back_from_directory_with_default_decoding(tmp_path, mvtec_root):
    builder = _prepare(builders.MvtecAd, mvtec_root, tmp_path)
    source = tfds.builder_from_directory(builder.data_dir).as_data_source(split="test")
    meta = meta_lib.read_meta(mvtec_root / "meta.json")
    for i, entry in enumerate(meta_lib.split_entries(meta, "test")):
        example = source[i]
        image = np.asarray(Image.open(mvtec_root / entry["img_path"]).convert("RGB"))
        np.testing.assert_array_equal(example["image"], image)
        expected = np.zeros(image.shape[:2], bool)
        if entry["mask_path"]:
            expected = np.asarray(Image.open(mvtec_root / entry["mask_path"])) > 0
        np.testing.assert_array_equal(example["mask"][..., 0] > 0, expected)


def test_manual_dir_with_wrong_layout(tmp_path, mvtec_root):
    with pytest.raises(ValueError, match=r"visa: .*expected layout .*1cls\.csv"):
        _prepare(builders.Visa, mvtec_root, tmp_path)
