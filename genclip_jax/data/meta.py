"""meta.json: read, validate, write, and generate it from the raw layout of each dataset.

meta.json is the interchange format of AnomalyCLIP/AdaCLIP (specs §8), so files written by the
reference code load here and ours load there:

    {"train": {cls: [entry, ...]}, "test": {cls: [entry, ...]}}
    entry = {"img_path", "mask_path", "cls_name", "specie_name", "anomaly"}

Paths are relative to the dataset root; normal samples have ``mask_path == ''`` and
``anomaly == 0``. An anomalous entry with ``mask_path == ''`` is allowed (image-level labels only;
the reference then uses an all-zero mask).

Generators pair images with masks by file stem (``000.png`` <-> ``000_mask.png`` or
``000.<ext>``) where the reference pairs sorted lists by index: the result is the same on intact
downloads, and a missing or extra mask is an error instead of a silent shift.
"""

from __future__ import annotations

import csv
import functools
import json
import os
import pathlib
import re
import warnings
import zlib
from collections.abc import Callable, Iterable

import numpy as np
from PIL import Image

from genclip_jax.files import write_atomic

Meta = dict[str, dict[str, list[dict]]]

SPLITS = ("train", "test")
IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"})
ENTRY_FIELDS: dict[str, type] = {
    "img_path": str,
    "mask_path": str,
    "cls_name": str,
    "specie_name": str,
    "anomaly": int,
}


# ----------------------------------------------------------------------------------------------
# Validation, reading, writing.


def validate_meta(
    meta: object,
    *,
    source: str | os.PathLike = "meta.json",
    root: str | os.PathLike | None = None,
    check_files: bool = False,
) -> Meta:
    """Checks the schema (and optionally that listed files exist under `root`); returns `meta`.

    Errors name `source`, the split, the class, the entry index and the field, with what was
    expected and what was got, so a hand-edited file can be fixed without reading this code.
    """
    if not isinstance(meta, dict):
        raise ValueError(
            f"{source}: expected a JSON object at top level, got {type(meta).__name__}"
        )
    missing = [s for s in SPLITS if s not in meta]
    if missing:
        raise ValueError(f"{source}: expected top-level keys {list(SPLITS)}, missing {missing}")
    if check_files and root is None:
        raise ValueError("validate_meta: check_files=True needs the dataset root")
    for split in SPLITS:
        classes = meta[split]
        if not isinstance(classes, dict):
            raise ValueError(
                f"{source}: [{split!r}] expected an object {{class: [entries]}}, "
                f"got {type(classes).__name__}"
            )
        for cls, entries in classes.items():
            where = f"{source}: [{split!r}][{cls!r}]"
            if not isinstance(entries, list):
                raise ValueError(
                    f"{where}: expected a list of entries, got {type(entries).__name__}"
                )
            for i, entry in enumerate(entries):
                _validate_entry(entry, cls, f"{where}[{i}]", root if check_files else None)
    return meta


def _validate_entry(entry: object, cls: str, where: str, root: str | os.PathLike | None) -> None:
    if not isinstance(entry, dict):
        raise ValueError(f"{where}: expected an entry object, got {type(entry).__name__}")
    for field, kind in ENTRY_FIELDS.items():
        if field not in entry:
            raise ValueError(f"{where}: missing field {field!r} (expected {kind.__name__})")
        value = entry[field]
        if not isinstance(value, kind) or isinstance(value, bool):
            raise ValueError(
                f"{where}[{field!r}]: expected {kind.__name__}, got {type(value).__name__} "
                f"{value!r}"
            )
    if entry["anomaly"] not in (0, 1):
        raise ValueError(f"{where}['anomaly']: expected 0 or 1, got {entry['anomaly']!r}")
    if not entry["img_path"]:
        raise ValueError(f"{where}['img_path']: expected a path relative to the root, got ''")
    if entry["cls_name"] != cls:
        raise ValueError(
            f"{where}['cls_name']: expected {cls!r} (the class key), got {entry['cls_name']!r}"
        )
    if root is not None:
        for field in ("img_path", "mask_path"):
            if entry[field] and not (pathlib.Path(root) / entry[field]).is_file():
                raise FileNotFoundError(
                    f"{where}[{field!r}]: file {entry[field]!r} not found under root {root}"
                )


def read_meta(
    path: str | os.PathLike, *, root: str | os.PathLike | None = None, check_files: bool = False
) -> Meta:
    """Loads and validates a meta.json (`root` defaults to its folder)."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"meta file {path} not found (create it with make_meta)")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e
    return validate_meta(
        meta, source=path, root=path.parent if root is None else root, check_files=check_files
    )


def write_meta(meta: Meta, path: str | os.PathLike) -> pathlib.Path:
    """Validates, then writes atomically (temp file + os.replace): never half a file on a crash."""
    path = pathlib.Path(path)
    validate_meta(meta, source=path)
    return write_atomic(path, json.dumps(meta, indent=4) + "\n")


# ----------------------------------------------------------------------------------------------
# Generators from raw layouts.


def _entry(
    root: pathlib.Path,
    img: pathlib.Path,
    mask: pathlib.Path | None,
    cls: str,
    specie: str,
    anomaly: bool,
) -> dict:
    return {
        "img_path": img.relative_to(root).as_posix(),
        "mask_path": mask.relative_to(root).as_posix() if mask is not None else "",
        "cls_name": cls,
        "specie_name": specie,
        "anomaly": int(anomaly),
    }


def _natural_key(name: str) -> list:
    """Sort key where 'Class10' follows 'Class9' and 'Part10' follows 'Part9'."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def _images(folder: pathlib.Path) -> list[pathlib.Path]:
    return sorted(
        (p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS),
        key=lambda p: _natural_key(p.name),
    )


def _subdirs(folder: pathlib.Path) -> list[pathlib.Path]:
    return sorted((p for p in folder.iterdir() if p.is_dir()), key=lambda p: _natural_key(p.name))


def _layout_error(dataset: str, root: pathlib.Path, expected: str) -> ValueError:
    found = sorted(p.name + ("/" if p.is_dir() else "") for p in root.iterdir())[:12]
    return ValueError(
        f"{dataset}: {root} does not match the expected layout {expected}; "
        f"found at the top: {found or 'nothing'}"
    )


def _check_root(root: str | os.PathLike) -> pathlib.Path:
    root = pathlib.Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"dataset root {root} is not a directory")
    return root


def _by_stem(folder: pathlib.Path) -> dict[str, pathlib.Path]:
    return {p.stem: p for p in _images(folder)} if folder.is_dir() else {}


def _find_mask(
    masks: dict[str, pathlib.Path], img: pathlib.Path, mask_dir: pathlib.Path
) -> pathlib.Path:
    """The mask of `img` among `masks` (by stem): `<stem>_mask.<ext>` or `<stem>.<ext>`."""
    mask = masks.get(f"{img.stem}_mask", masks.get(img.stem))
    if mask is None:
        raise ValueError(
            f"no mask for {img}: expected {img.stem}_mask.<ext> or {img.stem}.<ext> in {mask_dir}"
        )
    return mask


def _mvtec_like(root: str | os.PathLike, *, dataset: str, normal: str) -> Meta:
    """`<cls>/{train,test}/<specie>/<img>` + `<cls>/ground_truth/<specie>/<mask>`; `normal` names
    the defect-free specie ('good' for MVTec/MPDD/DTD, 'ok' for BTAD)."""
    root = _check_root(root)
    classes = [d for d in _subdirs(root) if (d / "test").is_dir()]
    if not classes:
        raise _layout_error(
            dataset,
            root,
            f"<root>/<class>/{{train,test}}/<specie>/<image> with '{normal}' for normal "
            "samples and <root>/<class>/ground_truth/<specie>/<mask>",
        )
    meta: Meta = {split: {} for split in SPLITS}
    for cls_dir in classes:
        for split in SPLITS:
            if not (cls_dir / split).is_dir():
                continue
            entries = meta[split].setdefault(cls_dir.name, [])
            for specie_dir in _subdirs(cls_dir / split):
                anomalous = specie_dir.name != normal
                mask_dir = cls_dir / "ground_truth" / specie_dir.name
                if anomalous and not mask_dir.is_dir():
                    raise ValueError(
                        f"{dataset}: {specie_dir} holds defect images but the mask folder "
                        f"{mask_dir} is missing (normal samples must be in '{normal}')"
                    )
                masks = _by_stem(mask_dir)
                for img in _images(specie_dir):
                    mask = _find_mask(masks, img, mask_dir) if anomalous else None
                    entries.append(
                        _entry(root, img, mask, cls_dir.name, specie_dir.name, anomalous)
                    )
    return meta


def _visa(root: str | os.PathLike) -> Meta:
    """VisA: rows of `split_csv/1cls.csv` (object, split, label, image, mask); classes sorted,
    rows in file order within a class, as the reference `visa.py`."""
    root = _check_root(root)
    csv_path = root / "split_csv" / "1cls.csv"
    if not csv_path.is_file():
        raise _layout_error(
            "visa", root, "<root>/split_csv/1cls.csv with columns object,split,label,image,mask"
        )
    with csv_path.open(newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    expected_header = ["object", "split", "label", "image", "mask"]
    if not rows or [c.strip() for c in rows[0]] != expected_header:
        raise ValueError(
            f"{csv_path}: expected header {expected_header}, "
            f"got {rows[0] if rows else 'an empty file'}"
        )
    meta: Meta = {split: {} for split in SPLITS}
    by_class: dict[str, list[list[str]]] = {}
    for line, row in enumerate(rows[1:], start=2):
        if len(row) != 5:
            raise ValueError(f"{csv_path}:{line}: expected 5 columns, got {len(row)}: {row}")
        obj, split, label, image, mask = (c.strip() for c in row)
        if split not in SPLITS or label not in ("normal", "anomaly"):
            raise ValueError(
                f"{csv_path}:{line}: expected split in {list(SPLITS)} and label in "
                f"['normal', 'anomaly'], got split={split!r} label={label!r}"
            )
        by_class.setdefault(obj, []).append([split, label, image, mask])
    for cls in sorted(by_class):
        for split, label, image, mask in by_class[cls]:
            anomalous = label == "anomaly"
            meta[split].setdefault(cls, []).append(
                {
                    "img_path": image,
                    "mask_path": mask if anomalous else "",
                    "cls_name": cls,
                    "specie_name": "",
                    "anomaly": int(anomalous),
                }
            )
    return meta


SDD_CLASS = "electrical commutators"  # class name of KolektorSDD in the reference dataset.py


def _sdd(root: str | os.PathLike) -> Meta:
    """KolektorSDD: `kosNN/PartN.jpg` + `kosNN/PartN_label.bmp`; a part is anomalous iff its label
    mask has a nonzero pixel. No train/test split exists: everything goes to 'test'."""
    root = _check_root(root)
    folders = [d for d in _subdirs(root) if re.fullmatch(r"kos\d+", d.name)]
    if not folders:
        raise _layout_error("sdd", root, "<root>/kos01..kos50/PartN.jpg + PartN_label.bmp")
    entries = []
    for folder in folders:
        files = _by_stem(folder)
        for stem, img in files.items():
            if stem.endswith("_label"):
                continue
            label = files.get(f"{stem}_label")
            if label is None:
                raise ValueError(f"sdd: no label mask for {img}: expected {img.stem}_label.bmp")
            with Image.open(label) as m:
                anomalous = bool(np.asarray(m.convert("L")).any())
            entries.append(
                _entry(root, img, label if anomalous else None, SDD_CLASS, "", anomalous)
            )
    return {"train": {}, "test": {SDD_CLASS: entries}}


def _dagm_labels(path: pathlib.Path) -> dict[str, int]:
    """Labels.txt: a header line, then `id  defect(0/1)  image  ?  label_image` rows."""
    labels = {}
    for line_no, line in enumerate(path.read_text().splitlines()[1:], start=2):
        cols = line.split()
        if not cols:
            continue
        if len(cols) < 3 or cols[1] not in ("0", "1"):
            raise ValueError(
                f"{path}:{line_no}: expected 'id defect(0/1) image ...', got {line.strip()!r}"
            )
        labels[cols[2]] = int(cols[1])
    return labels


def _dagm(root: str | os.PathLike) -> Meta:
    """DAGM 2007: `ClassN/{Train,Test}/<img>.PNG`, defect masks `.../Label/<stem>_label.PNG`.
    An image is anomalous iff its label mask exists; `Label/Labels.txt`, if present, must agree.
    """
    root = _check_root(root)
    classes = [d for d in _subdirs(root) if re.fullmatch(r"Class\d+", d.name)]
    if not classes:
        raise _layout_error(
            "dagm",
            root,
            "<root>/Class1..Class10/{Train,Test}/<image>.PNG with "
            "Label/<stem>_label.PNG and Label/Labels.txt",
        )
    meta: Meta = {split: {} for split in SPLITS}
    for cls_dir in classes:
        for split, folder in (("train", cls_dir / "Train"), ("test", cls_dir / "Test")):
            if not folder.is_dir():
                continue
            label_dir = folder / "Label"
            labels_txt = label_dir / "Labels.txt"
            listed = _dagm_labels(labels_txt) if labels_txt.is_file() else None
            masks = _by_stem(label_dir)
            entries = meta[split].setdefault(cls_dir.name, [])
            for img in _images(folder):
                mask = masks.get(f"{img.stem}_label")
                if listed is not None and listed.get(img.name, mask is not None) != (
                    mask is not None
                ):
                    raise ValueError(
                        f"dagm: {labels_txt} says defect={listed[img.name]} for {img.name} but "
                        f"the label mask {'exists' if mask else 'is missing'} in {label_dir}"
                    )
                entries.append(_entry(root, img, mask, cls_dir.name, "", mask is not None))
    return meta


# ----------------------------------------------------------------------------------------------
# Plain folders: what users have.

FOLDER_GOOD, FOLDER_MASKS = "good", "masks"
SUMMARY_COLUMNS = ("good", "defective", "with mask", "unreadable", "train", "test")


def _images_under(folder: pathlib.Path) -> list[pathlib.Path]:
    """Every image file below `folder` (any depth), in natural order of the relative path."""
    return sorted(
        (p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS),
        key=lambda p: _natural_key(p.relative_to(folder).as_posix()),
    )


def _readable(path: pathlib.Path) -> tuple[int, int] | None:
    """The (width, height) of an image file PIL can open and verify, else None."""
    try:
        with Image.open(path) as image:
            size = image.size
            image.verify()
        return size
    except Exception:  # PIL raises many kinds for a bad file
        return None


def _not_another_layout(root: pathlib.Path) -> None:
    """A dataset in a known layout given as a plain folder: name the right --dataset."""
    hint = None
    if (root / "split_csv").is_dir():
        hint = "visa"
    for cls in _subdirs(root):
        names = {p.name for p in cls.iterdir() if p.is_dir()}
        if {"train", "test"} <= names or "ground_truth" in names:
            hint = hint or "mvtec"
        elif {"Train", "Test"} & names:
            hint = hint or "dagm"
        elif (cls / "Data" / "Images").is_dir():
            hint = hint or "visa"
    if hint:
        raise ValueError(
            f"folder: {root} looks like a {hint} layout, not <root>/<class>/{{good,<defect>}}/; "
            f"use --dataset={hint} (or another of {sorted(GENERATORS)})"
        )


def _folder_class(
    root: pathlib.Path, cls_dir: pathlib.Path
) -> tuple[list[dict], list[dict], dict[str, int]]:
    """(good entries, defect entries, counts) of one class folder; warns about what it skips."""
    good, defects, unreadable = [], [], []
    masks_dir = cls_dir / FOLDER_MASKS
    for specie_dir in _subdirs(cls_dir):
        if specie_dir.name == FOLDER_MASKS:
            continue
        anomalous = specie_dir.name != FOLDER_GOOD
        images = _images_under(specie_dir)
        if not images:
            warnings.warn(f"folder: {specie_dir} holds no images; skipped", UserWarning,
                          stacklevel=3)
        for img in images:
            size = _readable(img)
            if size is None:
                unreadable.append(img.relative_to(root).as_posix())
                continue
            rel = img.relative_to(specie_dir).with_suffix("")
            mask = next(
                (m for name in (f"{rel.name}_mask", rel.name)
                 for m in sorted((masks_dir / specie_dir.name / rel.parent).glob(f"{name}.*"))
                 if m.suffix.lower() in IMAGE_EXTENSIONS),
                None,
            )
            if mask is not None and not anomalous:
                with Image.open(mask) as m:
                    if np.asarray(m.convert("L")).any():
                        warnings.warn(f"folder: {mask} is a non-empty mask of the good image "
                                      f"{img}; ignored (good images have no defect)",
                                      UserWarning, stacklevel=3)
                mask = None
            if mask is not None:
                mask_size = _readable(mask)
                if mask_size != size:
                    got = "unreadable" if mask_size is None else "{}x{}".format(*mask_size)
                    raise ValueError(f"folder: mask {mask} ({got}) does not match its image "
                                     f"{img} ({size[0]}x{size[1]}, WxH)")
            entry = _entry(root, img, mask, cls_dir.name, specie_dir.name, anomalous)
            (defects if anomalous else good).append(entry)
    if unreadable:
        warnings.warn(f"folder: {len(unreadable)} unreadable image(s) of class {cls_dir.name!r} "
                      f"skipped: {unreadable}", UserWarning, stacklevel=3)
    counts = {"good": len(good), "defective": len(defects),
              "with mask": sum(bool(e["mask_path"]) for e in defects),
              "unreadable": len(unreadable)}
    return good, defects, counts


def folder_meta(
    root: str | os.PathLike, *, test_fraction: float = 0.2, seed: int = 0
) -> tuple[Meta, dict[str, dict[str, int]]]:
    """meta.json of `<root>/<class>/good/**` + `<root>/<class>/<defect type>/**`, masks optional
    in `<root>/<class>/masks/<defect type>/` (same relative path and stem, `_mask` suffix
    allowed), and a summary {class: {column: count}} (`SUMMARY_COLUMNS`).

    Each class is split into train/test by `test_fraction`, separately for its good and its
    defective images (stratified), by a permutation seeded by (seed, class name): the same files
    always give the same split. Unreadable images are skipped with one warning per class.
    """
    if not 0 <= test_fraction <= 1:
        raise ValueError(f"folder: test_fraction must be in [0, 1], got {test_fraction}")
    root = _check_root(root)
    _not_another_layout(root)
    classes = [d for d in _subdirs(root) if d.name != FOLDER_MASKS]
    if not classes:
        raise _layout_error("folder", root, "<root>/<class>/good/<images> and "
                            "<root>/<class>/<defect type>/<images>")
    meta: Meta = {split: {} for split in SPLITS}
    summary = {}
    for cls_dir in classes:
        good, defects, counts = _folder_class(root, cls_dir)
        if not good and not defects:
            warnings.warn(f"folder: class {cls_dir.name!r} has no readable images; skipped",
                          UserWarning, stacklevel=2)
            continue
        if not defects:
            warnings.warn(
                f"folder: class {cls_dir.name!r} has normal images only: usable to train with "
                "train.synthetic_anomalies, to calibrate and as few-shot references, but its "
                "test split measures false alarms only", UserWarning, stacklevel=2)
        if not good:
            warnings.warn(
                f"folder: class {cls_dir.name!r} has no good images: usable to train, but its "
                "test split has no normal image (image AUROC undefined) and it cannot be "
                "calibrated", UserWarning, stacklevel=2)
        for group, entries in enumerate((good, defects)):
            rng = np.random.default_rng([seed, zlib.crc32(cls_dir.name.encode()), group])
            test = set(rng.permutation(len(entries))[: round(test_fraction * len(entries))])
            for i, entry in enumerate(entries):
                meta["test" if i in test else "train"].setdefault(cls_dir.name, []).append(entry)
        counts["train"] = len(meta["train"].get(cls_dir.name, []))
        counts["test"] = len(meta["test"].get(cls_dir.name, []))
        summary[cls_dir.name] = counts
    return meta, summary


def format_summary(summary: dict[str, dict[str, int]]) -> str:
    """The make-meta table of a folder dataset: one row per class and the total."""
    total = {c: sum(row[c] for row in summary.values()) for c in SUMMARY_COLUMNS}
    width = max(len("class"), len("total"), *map(len, summary))
    lines = [f"{'class':<{width}}  " + "  ".join(f"{c:>10}" for c in SUMMARY_COLUMNS)]
    for name, row in {**summary, "total": total}.items():
        lines.append(f"{name:<{width}}  " + "  ".join(f"{row[c]:>10}" for c in SUMMARY_COLUMNS))
    return "\n".join(lines)


GENERATORS: dict[str, Callable[[str | os.PathLike], Meta]] = {
    "mvtec": functools.partial(_mvtec_like, dataset="mvtec", normal="good"),
    "mpdd": functools.partial(_mvtec_like, dataset="mpdd", normal="good"),
    "btad": functools.partial(_mvtec_like, dataset="btad", normal="ok"),
    "dtd": functools.partial(_mvtec_like, dataset="dtd", normal="good"),
    "visa": _visa,
    "sdd": _sdd,
    "dagm": _dagm,
    "folder": lambda root: folder_meta(root)[0],
}


def generate_meta(dataset: str, root: str | os.PathLike) -> Meta:
    """Builds meta.json content from the raw folder layout of `dataset` (a key of GENERATORS)."""
    if dataset.lower() not in GENERATORS:
        raise ValueError(f"unknown dataset {dataset!r}: expected one of {sorted(GENERATORS)}")
    return GENERATORS[dataset.lower()](root)


def make_meta(
    dataset: str, root: str, out: str | None = None, *, overwrite: bool = False,
    test_fraction: float = 0.2, seed: int = 0,
) -> pathlib.Path:
    """Generates, checks (every listed file must exist) and writes meta.json; the CLI entry point.

    `out` defaults to `<root>/meta.json`; returns the path written. An existing file is kept
    unless `overwrite` (meta.json files get hand-edited), checked before any scanning.
    `test_fraction` and `seed` split the "folder" layout (`folder_meta`), whose summary table is
    printed; the published datasets come with their own split.
    """
    out_path = pathlib.Path(out) if out is not None else pathlib.Path(root) / "meta.json"
    if out_path.exists() and not overwrite:
        raise FileExistsError(
            f"{out_path} already exists: expected a new path, or pass --overwrite "
            "(overwrite=True) to replace it"
        )
    if dataset.lower() == "folder":
        meta, summary = folder_meta(root, test_fraction=test_fraction, seed=seed)
        print(format_summary(summary))
    else:
        meta = generate_meta(dataset, root)
    validate_meta(meta, source=out_path, root=root, check_files=True)
    return write_meta(meta, out_path)


def split_entries(
    meta: Meta, split: str = "test", classes: Iterable[str] | None = None
) -> list[dict]:
    """Entries of `split`, classes in meta key order (as the reference Dataset concatenates them).

    `classes` restricts to those classes (still in key order); an unknown one is an error.
    """
    if split not in meta:
        raise ValueError(f"unknown split {split!r}: expected one of {sorted(meta)}")
    available = meta[split]
    if classes is not None:
        wanted = set(classes)
        unknown = sorted(wanted - set(available))
        if unknown:
            raise ValueError(
                f"classes {unknown} not in split {split!r}: expected some of {list(available)}"
            )
        return [e for cls, es in available.items() if cls in wanted for e in es]
    return [e for es in available.values() for e in es]
