"""A small MVTec-layout dataset with exact defect masks, for tests, CI and the offline demo.

Every class is a procedural image family (textures: 'stripes', 'checker'; object: 'disc' on a
plain background); defects ('scratch', 'spot', 'crack', 'missing') are painted in colours far
from the class palette, so they change local pixel statistics and a model can learn them. The
mask of a defect is exactly the set of pixels it painted. Same seed -> same PNG bytes.
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Callable, Sequence

import numpy as np
from PIL import Image

from genclip_jax.data import meta as meta_lib

CLASSES = ("stripes", "checker", "disc")
DEFECTS = ("scratch", "spot", "crack", "missing")
LAYOUTS = ("mvtec", "folder")

_Grid = tuple[np.ndarray, np.ndarray]  # (y, x) pixel-centre coordinates in [0, 1), each (S, S)
_Scene = tuple[np.ndarray, np.ndarray, np.ndarray]  # image, object support, what a hole reveals
_HOLE = np.array([0.1, 0.1, 0.1])  # a missing piece of a texture shows a dark hole


def _stripes(rng: np.random.Generator, yx: _Grid) -> _Scene:
    y, x = yx
    angle = rng.uniform(-0.3, 0.3) + rng.choice([0.0, np.pi / 2])
    period = rng.uniform(0.10, 0.16)
    phase = rng.uniform(0, 2 * np.pi)
    t = 0.5 + 0.5 * np.sin(2 * np.pi * (x * np.cos(angle) + y * np.sin(angle)) / period + phase)
    dark, light = np.array([0.15, 0.25, 0.45]), np.array([0.55, 0.70, 0.90])
    image = dark + t[..., None] * (light - dark)
    return image, np.ones(y.shape, bool), np.broadcast_to(_HOLE, image.shape)


def _checker(rng: np.random.Generator, yx: _Grid) -> _Scene:
    y, x = yx
    cell = rng.uniform(0.12, 0.2)
    oy, ox = rng.uniform(0, cell, size=2)
    parity = (np.floor((y + oy) / cell) + np.floor((x + ox) / cell)) % 2
    a, b = np.array([0.80, 0.78, 0.70]), np.array([0.35, 0.45, 0.30])
    image = a + parity[..., None] * (b - a)
    return image, np.ones(y.shape, bool), np.broadcast_to(_HOLE, image.shape)


def _disc(rng: np.random.Generator, yx: _Grid) -> _Scene:
    y, x = yx
    cy, cx = rng.uniform(0.45, 0.55, size=2)
    radius = rng.uniform(0.30, 0.36)
    r = np.hypot(y - cy, x - cx)
    support = r < radius
    background = np.array([0.92, 0.92, 0.90]) - 0.1 * y[..., None]
    shade = 1.0 - 0.5 * (r / radius)[..., None] ** 2  # a domed, lit object
    body = np.array([0.85, 0.65, 0.20]) * shade
    image = np.where(support[..., None], body, background)
    return image, support, background


_FAMILIES: dict[str, Callable[[np.random.Generator, _Grid], _Scene]] = {
    "stripes": _stripes,
    "checker": _checker,
    "disc": _disc,
}


def _segment_mask(yx: _Grid, p: np.ndarray, q: np.ndarray, width: float) -> np.ndarray:
    """Pixels closer than `width` to the segment p-q (points as (y, x)); the distance is computed
    only in the segment's bounding box grown by `width`, outside of which no pixel can be."""
    y, x = yx
    mask = np.zeros(y.shape, bool)
    rows = np.flatnonzero(np.abs(y[:, 0] - np.clip(y[:, 0], *sorted((p[0], q[0])))) <= width)
    cols = np.flatnonzero(np.abs(x[0] - np.clip(x[0], *sorted((p[1], q[1])))) <= width)
    if not len(rows) or not len(cols):
        return mask
    box = np.s_[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    yy, xx = y[box], x[box]
    d = q - p
    t = np.clip(((yy - p[0]) * d[0] + (xx - p[1]) * d[1]) / max(float(d @ d), 1e-12), 0, 1)
    mask[box] = np.hypot(yy - p[0] - t * d[0], xx - p[1] - t * d[1]) < width
    return mask


def _point_in(
    rng: np.random.Generator, support: np.ndarray | None, margin: float
) -> np.ndarray:
    """A random (y, x) in [0, 1) inside `support` (None: anywhere), at least `margin` from the
    border."""
    if support is None:
        return rng.uniform(margin, 1 - margin, size=2)
    ys, xs = np.nonzero(support)
    size = support.shape[0]
    keep = (np.minimum(ys, xs) >= margin * size) & (np.maximum(ys, xs) < (1 - margin) * size)
    i = rng.integers(keep.sum())
    return (np.array([ys[keep][i], xs[keep][i]]) + 0.5) / size


def defect_mask(
    kind: str, rng: np.random.Generator, yx: _Grid, support: np.ndarray | None, pixel: float
) -> tuple[np.ndarray, np.ndarray | None]:
    """(mask, colour) of one defect of `kind` (one of DEFECTS) placed inside `support` (None:
    anywhere) on the pixel-centre grid `yx`; `pixel` is one pixel's size in [0, 1) units.
    Colour None means 'show the background' (missing piece)."""
    y, x = yx
    start = _point_in(rng, support, 0.2)
    if kind == "scratch":
        direction = rng.normal(size=2)
        end = start + direction / np.linalg.norm(direction) * rng.uniform(0.3, 0.5)
        mask = _segment_mask(yx, start, end, max(0.008, 0.8 * pixel))
        return mask, np.array([0.95, 0.20, 0.90])
    if kind == "spot":
        ry, rx = rng.uniform(0.04, 0.08, size=2)
        mask = ((y - start[0]) / ry) ** 2 + ((x - start[1]) / rx) ** 2 < 1
        return mask, np.array([0.45, 0.10, 0.05])
    if kind == "crack":
        mask = np.zeros(y.shape, bool)
        point, heading = start, rng.uniform(0, 2 * np.pi)
        for _ in range(6):
            heading += rng.uniform(-0.8, 0.8)
            nxt = point + 0.06 * np.array([np.sin(heading), np.cos(heading)])
            mask |= _segment_mask(yx, point, nxt, max(0.012, 1.2 * pixel))
            point = nxt
        return mask, np.array([0.05, 0.05, 0.05])
    if kind == "missing":  # a bite out of the object, or a hole in a texture
        radius = rng.uniform(0.08, 0.12)
        return np.hypot(y - start[0], x - start[1]) < radius, None
    raise ValueError(f"unknown defect {kind!r}: expected one of {DEFECTS}")


def render(
    family: str, defect: str | None, rng: np.random.Generator, size: int
) -> tuple[np.ndarray, np.ndarray]:
    """One (image uint8 (S, S, 3), mask bool (S, S)) of `family`, with `defect` (None = good)."""
    coords = (np.arange(size) + 0.5) / size
    yx = tuple(np.meshgrid(coords, coords, indexing="ij"))
    image, support, revealed = _FAMILIES[family](rng, yx)
    image = image + rng.normal(0, 0.02, size=image.shape)  # sensor noise: no two goods are equal
    mask = np.zeros((size, size), bool)
    if defect is not None:
        while mask.sum() < 4:  # resample the (rare) defect that misses the object
            mask, colour = defect_mask(defect, rng, yx, support, 1.0 / size)
            mask &= support
        fill = revealed if colour is None else colour + rng.normal(0, 0.02, size=image.shape)
        image = np.where(mask[..., None], fill, image)
    return np.clip(np.round(image * 255), 0, 255).astype(np.uint8), mask


def _save_png(array: np.ndarray, path: pathlib.Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, format="PNG")


def write_synthetic_dataset(
    root: str | os.PathLike,
    *,
    seed: int = 0,
    classes: Sequence[str] = CLASSES,
    defects: Sequence[str] = DEFECTS,
    image_size: int = 128,
    n_train_good: int = 4,
    n_test_good: int = 4,
    n_test_defect_per_type: int = 2,
    layout: str = "mvtec",
) -> pathlib.Path:
    """Writes `<root>/<cls>/{train/good, test/{good,<defect>}, ground_truth/<defect>}` PNGs and
    `<root>/meta.json` (via the MVTec generator); returns the meta.json path.

    `layout="folder"` writes the same images as plain folders instead, `<root>/<cls>/good/`,
    `<root>/<cls>/<defect>/` and `<root>/<cls>/masks/<defect>/` (what users have; see
    `meta.folder_meta`), and no meta.json; returns the root.
    Defaults give 3 classes x 12 test images at 128 px: small enough for CI, enough for a demo.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout: expected one of {list(LAYOUTS)}, got {layout!r}")
    unknown = sorted(set(classes) - set(_FAMILIES)) + sorted(set(defects) - set(DEFECTS))
    if unknown:
        raise ValueError(
            f"unknown classes/defects {unknown}: expected classes from {CLASSES} "
            f"and defects from {DEFECTS}"
        )
    root = pathlib.Path(root)
    jobs = [("train", "good", n_train_good), ("test", "good", n_test_good)]
    jobs += [("test", d, n_test_defect_per_type) for d in defects]
    for cls in classes:
        for split, specie, count in jobs:
            for i in range(count):
                # Seeded by names, not positions: a subset of classes/defects gives the same files.
                rng = np.random.default_rng(
                    [
                        seed,
                        CLASSES.index(cls),
                        ("train", "test").index(split),
                        (("good", *DEFECTS)).index(specie),
                        i,
                    ]
                )
                image, mask = render(cls, None if specie == "good" else specie, rng, image_size)
                name = f"{i:03d}.png" if layout == "mvtec" else f"{split}_{i:03d}.png"
                folder = root / cls / split if layout == "mvtec" else root / cls
                _save_png(image, folder / specie / name)
                if specie != "good":
                    masks = "ground_truth" if layout == "mvtec" else meta_lib.FOLDER_MASKS
                    mask_path = root / cls / masks / specie / name.replace(".png", "_mask.png")
                    _save_png(mask.astype(np.uint8) * 255, mask_path)
    if layout == "folder":
        return root
    return meta_lib.make_meta("mvtec", str(root), overwrite=True)
