"""The image sets a user points a command at (calibration images, references): a dataset root
with meta.json, a plain good/defect folder (`make-meta --dataset=folder` layout), or any folder
of images (one subfolder per class, or flat: one class named after the folder).

Each resolves to (root, meta entries): entries carry the class, the label (0 good, 1 defective)
and the mask path when known, so they feed `pipeline.Dataset.from_entries` like a test split.
"""

from __future__ import annotations

import pathlib
from collections.abc import Sequence

from genclip_jax.data import meta as meta_lib
from genclip_jax.data import pipeline

ROLES = ("normal", "labelled")


def _layout(path: pathlib.Path) -> str:
    if (path / "meta.json").is_file():
        return "meta"
    if any((d / "good").is_dir() for d in path.iterdir() if d.is_dir()):
        return "folder"
    return "images"


def _plain_images(path: pathlib.Path, label: int) -> list[dict]:
    """Every image under `path`: a class per subfolder, or one class named after `path` when
    images lie directly in it."""
    entries, _ = pipeline.scan_image_folder(path)
    flat = any("/" not in e["img_path"] for e in entries)
    for e in entries:
        e["cls_name"] = path.resolve().name if flat else e["img_path"].split("/", 1)[0]
        e["anomaly"] = label
    return entries


def image_set(path: str, role: str, what: str, split: str | None = None) -> list[dict]:
    """Meta entries (img_path relative to `path`) of the image set at `path`.

    `role="normal"`: the good images only (a dataset root: of its train split). `"labelled"`:
    every image with its label and mask (a dataset root: its test split; a folder of plain images
    counts as defective, without masks). `split` overrides a dataset root's split. `what` names
    the set in errors (e.g. "--normal").
    """
    if role not in ROLES:
        raise ValueError(f"image_set: role must be one of {ROLES}, got {role!r}")
    root = pathlib.Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"{what}={path}: expected a folder of images or a dataset root, "
                                "found no such folder")
    layout = _layout(root)
    split = split or ("train" if role == "normal" else "test")
    if layout == "meta":
        meta = meta_lib.read_meta(root / "meta.json", root=root, check_files=True)
        entries = meta_lib.split_entries(meta, split, None)
    elif layout == "folder":
        meta, _ = meta_lib.folder_meta(root, test_fraction=0.0)
        entries = meta_lib.split_entries(meta, "train", None)
    else:
        entries = _plain_images(root, label=0 if role == "normal" else 1)
    if role == "normal":
        entries = [e for e in entries if not e["anomaly"]]
    if not entries:
        source = {"meta": f"the {split} split of its meta.json",
                  "folder": "its <class>/good folders", "images": "it"}[layout]
        raise ValueError(f"{what}={path}: expected {role} images in {source}, found none")
    return entries


def class_counts(entries: Sequence[dict]) -> dict[str, int]:
    """{class: number of entries} in first-seen order."""
    counts: dict[str, int] = {}
    for e in entries:
        counts[e["cls_name"]] = counts.get(e["cls_name"], 0) + 1
    return counts
