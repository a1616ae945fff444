"""meta.json: generators on tiny trees of each raw layout, validation errors, atomic writes."""

import json
import pathlib
import shutil

import numpy as np
import pytest
from PIL import Image

from genclip_jax.data import meta as meta_lib


def _image(path: pathlib.Path, value: int = 100, size=(8, 6), mode="RGB") -> pathlib.Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, value if mode == "L" else (value, value, value)).save(path)
    return path


def _mask(path: pathlib.Path, defect: bool = True, size=(8, 6)) -> pathlib.Path:
    array = np.zeros(size[::-1], np.uint8)
    if defect:
        array[1:3, 2:4] = 255
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def _mvtec_tree(
    root: pathlib.Path, normal: str = "good", img_ext=".png", mask_ext=".png", mask_suffix="_mask"
) -> None:
    for cls in ("zeta", "alpha"):  # created out of order: the generator sorts
        for i in range(2):
            _image(root / cls / "train" / normal / f"{i:03d}{img_ext}")
        _image(root / cls / "test" / normal / f"000{img_ext}")
        for i in range(2):
            _image(root / cls / "test" / "scratch" / f"{i:03d}{img_ext}")
            _mask(root / cls / "ground_truth" / "scratch" / f"{i:03d}{mask_suffix}{mask_ext}")
    (root / "license.txt").write_text("not a class")


@pytest.mark.parametrize("dataset", ["mvtec", "mpdd", "dtd"])
def test_mvtec_like_layout(tmp_path, dataset):
    _mvtec_tree(tmp_path)
    meta = meta_lib.generate_meta(dataset, tmp_path)
    assert list(meta["test"]) == ["alpha", "zeta"]
    assert [e["img_path"] for e in meta["train"]["alpha"]] == [
        "alpha/train/good/000.png",
        "alpha/train/good/001.png",
    ]
    assert meta["test"]["alpha"] == [
        {
            "img_path": "alpha/test/good/000.png",
            "mask_path": "",
            "cls_name": "alpha",
            "specie_name": "good",
            "anomaly": 0,
        },
        {
            "img_path": "alpha/test/scratch/000.png",
            "mask_path": "alpha/ground_truth/scratch/000_mask.png",
            "cls_name": "alpha",
            "specie_name": "scratch",
            "anomaly": 1,
        },
        {
            "img_path": "alpha/test/scratch/001.png",
            "mask_path": "alpha/ground_truth/scratch/001_mask.png",
            "cls_name": "alpha",
            "specie_name": "scratch",
            "anomaly": 1,
        },
    ]
    meta_lib.validate_meta(meta, root=tmp_path, check_files=True)


def test_btad_ok_ko_bmp_images_and_same_stem_masks(tmp_path):
    _mvtec_tree(tmp_path, normal="ok", img_ext=".bmp", mask_ext=".png", mask_suffix="")
    meta = meta_lib.generate_meta("btad", tmp_path)
    entries = meta["test"]["zeta"]
    assert [(e["specie_name"], e["anomaly"]) for e in entries] == [
        ("ok", 0),
        ("scratch", 1),
        ("scratch", 1),
    ]
    assert entries[1]["img_path"] == "zeta/test/scratch/000.bmp"
    assert entries[1]["mask_path"] == "zeta/ground_truth/scratch/000.png"
    # BTAD class 03 has .bmp masks: the same stem rule finds them.
    for p in (tmp_path / "zeta" / "ground_truth" / "scratch").iterdir():
        p.rename(p.with_suffix(".bmp"))
    assert meta_lib.generate_meta("btad", tmp_path)["test"]["zeta"][1]["mask_path"].endswith(
        "000.bmp"
    )


def test_mvtec_missing_mask_and_missing_ground_truth(tmp_path):
    _mvtec_tree(tmp_path)
    (tmp_path / "alpha/ground_truth/scratch/001_mask.png").unlink()
    with pytest.raises(ValueError, match=r"no mask for .*001\.png.*001_mask"):
        meta_lib.generate_meta("mvtec", tmp_path)
    _image(tmp_path / "zeta/test/hole/000.png")
    shutil.rmtree(tmp_path / "alpha")  # leave only the class with a maskless defect
    with pytest.raises(ValueError, match=r"hole.*mask folder .*ground_truth/hole.*missing"):
        meta_lib.generate_meta("mvtec", tmp_path)


def _write_visa(root: pathlib.Path, rows, header="object,split,label,image,mask") -> None:
    (root / "split_csv").mkdir(parents=True, exist_ok=True)
    (root / "split_csv" / "1cls.csv").write_text("\n".join([header, *rows]) + "\n")


def test_visa_csv(tmp_path):
    rows = [
        "pcb1,train,normal,pcb1/Data/Images/Normal/0001.JPG,",
        "candle,test,anomaly,candle/Data/Images/Anomaly/000.JPG,candle/Data/Masks/Anomaly/000.png",
        "candle,test,normal,candle/Data/Images/Normal/0005.JPG,",
        "candle,test,anomaly,candle/Data/Images/Anomaly/002.JPG,candle/Data/Masks/Anomaly/002.png",
    ]
    _write_visa(tmp_path, rows)
    meta = meta_lib.generate_meta("VisA", tmp_path)
    assert meta["train"] == {
        "pcb1": [
            {
                "img_path": "pcb1/Data/Images/Normal/0001.JPG",
                "mask_path": "",
                "cls_name": "pcb1",
                "specie_name": "",
                "anomaly": 0,
            }
        ]
    }
    test = meta["test"]["candle"]
    assert [e["img_path"].split("/")[-1] for e in test] == ["000.JPG", "0005.JPG", "002.JPG"]
    assert [e["anomaly"] for e in test] == [1, 0, 1]
    assert test[0]["mask_path"] == "candle/Data/Masks/Anomaly/000.png"
    assert test[1]["mask_path"] == ""


def test_visa_bad_rows(tmp_path):
    _write_visa(tmp_path, ["candle,test,broken,a.JPG,"])
    with pytest.raises(ValueError, match=r"1cls\.csv:2: expected .*label.*got .*'broken'"):
        meta_lib.generate_meta("visa", tmp_path)
    _write_visa(tmp_path, [], header="a,b,c")
    with pytest.raises(ValueError, match="expected header"):
        meta_lib.generate_meta("visa", tmp_path)


def test_sdd_parts(tmp_path):
    for kos, defects in (("kos02", {1}), ("kos01", {10})):
        for part in (0, 1, 10):
            _image(tmp_path / kos / f"Part{part}.jpg")
            _mask(tmp_path / kos / f"Part{part}_label.bmp", defect=part in defects)
    meta = meta_lib.generate_meta("sdd", tmp_path)
    assert meta["train"] == {}
    entries = meta["test"][meta_lib.SDD_CLASS]
    assert [e["img_path"] for e in entries] == [
        "kos01/Part0.jpg",
        "kos01/Part1.jpg",
        "kos01/Part10.jpg",
        "kos02/Part0.jpg",
        "kos02/Part1.jpg",
        "kos02/Part10.jpg",
    ]
    assert [e["anomaly"] for e in entries] == [0, 0, 1, 0, 1, 0]
    assert entries[2]["mask_path"] == "kos01/Part10_label.bmp"
    assert entries[0]["mask_path"] == ""


def _dagm_tree(root: pathlib.Path) -> None:
    for cls in ("Class10", "Class2"):
        for split in ("Train", "Test"):
            folder = root / cls / split
            lines = ["1"]
            for i, defect in enumerate((False, True, False)):
                name = f"{i:04d}.PNG"
                _image(folder / name, mode="L")
                if defect:
                    _mask(folder / "Label" / f"{i:04d}_label.PNG")
                lines.append(
                    f"{i + 1}\t{int(defect)}\t{name}\t0\t{f'{i:04d}_label.PNG' if defect else 0}"
                )
            (folder / "Label" / "Labels.txt").write_text("\n".join(lines) + "\n")


def test_dagm(tmp_path):
    _dagm_tree(tmp_path)
    meta = meta_lib.generate_meta("dagm", tmp_path)
    assert list(meta["test"]) == ["Class2", "Class10"]  # natural order
    entries = meta["train"]["Class2"]
    assert [e["anomaly"] for e in entries] == [0, 1, 0]
    assert entries[1]["mask_path"] == "Class2/Train/Label/0001_label.PNG"
    assert entries[1]["img_path"] == "Class2/Train/0001.PNG"
    meta_lib.validate_meta(meta, root=tmp_path, check_files=True)


def test_dagm_labels_txt_disagrees(tmp_path):
    _dagm_tree(tmp_path)
    (tmp_path / "Class2/Test/Label/0001_label.PNG").unlink()
    with pytest.raises(ValueError, match=r"Labels\.txt says defect=1 for 0001\.PNG.*missing"):
        meta_lib.generate_meta("dagm", tmp_path)


def test_unknown_dataset_and_wrong_layout(tmp_path):
    with pytest.raises(ValueError, match=r"unknown dataset 'kitti'.*'mvtec'"):
        meta_lib.generate_meta("kitti", tmp_path)
    _mvtec_tree(tmp_path)
    with pytest.raises(ValueError, match=r"visa: .*expected layout .*1cls\.csv.*found.*alpha/"):
        meta_lib.generate_meta("visa", tmp_path)
    for dataset in ("sdd", "dagm"):
        with pytest.raises(ValueError, match=f"{dataset}: .*expected layout"):
            meta_lib.generate_meta(dataset, tmp_path)
    _write_visa(tmp_path / "visa_root", [])
    with pytest.raises(ValueError, match=r"mvtec: .*expected layout .*ground_truth.*split_csv/"):
        meta_lib.generate_meta("mvtec", tmp_path / "visa_root")
    with pytest.raises(FileNotFoundError, match="not a directory"):
        meta_lib.generate_meta("mvtec", tmp_path / "nope")


def _valid_meta() -> dict:
    entry = {
        "img_path": "a/test/good/0.png",
        "mask_path": "",
        "cls_name": "a",
        "specie_name": "good",
        "anomaly": 0,
    }
    return {"train": {}, "test": {"a": [dict(entry), dict(entry, anomaly=1)]}}


@pytest.mark.parametrize(
    ("mutate", "pattern"),
    [
        (lambda m: m.pop("train"), r"m\.json: expected top-level keys .*missing \['train'\]"),
        (lambda m: m.update(test=[]), r"\['test'\] expected an object .*got list"),
        (lambda m: m["test"].update(a={}), r"\['test'\]\['a'\]: expected a list .*got dict"),
        (
            lambda m: m["test"]["a"][1].pop("specie_name"),
            r"\['test'\]\['a'\]\[1\]: missing field 'specie_name' \(expected str\)",
        ),
        (
            lambda m: m["test"]["a"][1].update(anomaly="1"),
            r"\['a'\]\[1\]\['anomaly'\]: expected int, got str '1'",
        ),
        (
            lambda m: m["test"]["a"][1].update(anomaly=True),
            r"\['a'\]\[1\]\['anomaly'\]: expected int, got bool",
        ),
        (
            lambda m: m["test"]["a"][0].update(anomaly=2),
            r"\['a'\]\[0\]\['anomaly'\]: expected 0 or 1, got 2",
        ),
        (
            lambda m: m["test"]["a"][0].update(img_path=None),
            r"\['a'\]\[0\]\['img_path'\]: expected str, got NoneType",
        ),
        (
            lambda m: m["test"]["a"][1].update(cls_name="b"),
            r"\['a'\]\[1\]\['cls_name'\]: expected 'a' \(the class key\), got 'b'",
        ),
    ],
)
def test_validation_errors(mutate, pattern):
    meta = _valid_meta()
    mutate(meta)
    with pytest.raises(ValueError, match=pattern):
        meta_lib.validate_meta(meta, source="m.json")


def test_check_files(tmp_path):
    meta = _valid_meta()
    _image(tmp_path / "a/test/good/0.png")
    meta_lib.validate_meta(meta, root=tmp_path, check_files=True)
    meta["test"]["a"][1]["mask_path"] = "a/ground_truth/x/0_mask.png"
    with pytest.raises(
        FileNotFoundError,
        match=r"\['a'\]\[1\]\['mask_path'\]: file "
        r"'a/ground_truth/x/0_mask\.png' not found",
    ):
        meta_lib.validate_meta(meta, root=tmp_path, check_files=True)


def test_read_write_roundtrip_and_bad_json(tmp_path):
    path = meta_lib.write_meta(_valid_meta(), tmp_path / "sub" / "meta.json")
    assert meta_lib.read_meta(path) == _valid_meta()
    assert [p.name for p in path.parent.iterdir()] == ["meta.json"]  # no temp file left
    path.write_text("{ not json")
    with pytest.raises(ValueError, match=r"meta\.json: not valid JSON"):
        meta_lib.read_meta(path)
    with pytest.raises(FileNotFoundError, match="make_meta"):
        meta_lib.read_meta(tmp_path / "absent.json")


def test_write_is_atomic(tmp_path, monkeypatch):
    path = meta_lib.write_meta(_valid_meta(), tmp_path / "meta.json")
    before = path.read_bytes()
    bad = _valid_meta()
    bad["test"]["a"][0]["anomaly"] = 5
    with pytest.raises(ValueError):
        meta_lib.write_meta(bad, path)

    def crash(*args, **kwargs):
        raise OSError("disk full")

    other = _valid_meta()
    other["test"]["a"].pop()
    monkeypatch.setattr(meta_lib.json, "dumps", crash)
    with pytest.raises(OSError, match="disk full"):
        meta_lib.write_meta(other, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["meta.json"]


def test_make_meta(tmp_path):
    _mvtec_tree(tmp_path)
    path = meta_lib.make_meta("mvtec", str(tmp_path))
    assert path == tmp_path / "meta.json"
    assert json.loads(path.read_text()) == meta_lib.generate_meta("mvtec", tmp_path)
    out = meta_lib.make_meta("mvtec", str(tmp_path), str(tmp_path / "o" / "m.json"))
    assert out.read_text() == path.read_text()


def test_make_meta_keeps_an_existing_file_unless_overwrite(tmp_path):
    path = tmp_path / "meta.json"
    path.write_text("hand-edited\n")
    # Refused before scanning: the tree does not even match the layout.
    with pytest.raises(FileExistsError) as err:
        meta_lib.make_meta("mvtec", str(tmp_path))
    assert str(err.value) == (
        f"{path} already exists: expected a new path, or pass --overwrite (overwrite=True) to "
        "replace it"
    )
    assert path.read_text() == "hand-edited\n"
    _mvtec_tree(tmp_path)
    assert meta_lib.make_meta("mvtec", str(tmp_path), overwrite=True) == path
    assert json.loads(path.read_text()) == meta_lib.generate_meta("mvtec", tmp_path)


def test_split_entries(tmp_path):
    _mvtec_tree(tmp_path)
    meta = meta_lib.generate_meta("mvtec", tmp_path)
    assert len(meta_lib.split_entries(meta)) == 6
    assert {e["cls_name"] for e in meta_lib.split_entries(meta, "test", ["zeta"])} == {"zeta"}
    with pytest.raises(ValueError, match=r"classes \['nope'\] not in split 'test'"):
        meta_lib.split_entries(meta, "test", ["nope"])
    with pytest.raises(ValueError, match="unknown split 'val'"):
        meta_lib.split_entries(meta, "val")
