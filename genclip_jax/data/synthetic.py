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


def _segment_distance(yx: _Grid, p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Distance of every pixel to the segment p-q (points as (y, x))."""
    y, x = yx
    d = q - p
    t = np.clip(((y - p[0]) * d[0] + (x - p[1]) * d[1]) / max(float(d @ d), 1e-12), 0, 1)
    return np.hypot(y - p[0] - t * d[0], x - p[1] - t * d[1])


def _point_in(rng: np.random.Generator, support: np.ndarray, margin: float) -> np.ndarray:
    """A random (y, x) in [0, 1) inside `support`, at least `margin` from the border."""
    ys, xs = np.nonzero(support)
    size = support.shape[0]
    keep = (np.minimum(ys, xs) >= margin * size) & (np.maximum(ys, xs) < (1 - margin) * size)
    i = rng.integers(keep.sum())
    return (np.array([ys[keep][i], xs[keep][i]]) + 0.5) / size


def _defect(
    kind: str, rng: np.random.Generator, yx: _Grid, support: np.ndarray, pixel: float
) -> tuple[np.ndarray, np.ndarray | None]:
    """(mask, colour) of one defect; colour None means 'show the background' (missing piece)."""
    y, x = yx
    start = _point_in(rng, support, 0.2)
    if kind == "scratch":
        direction = rng.normal(size=2)
        end = start + direction / np.linalg.norm(direction) * rng.uniform(0.3, 0.5)
        mask = _segment_distance(yx, start, end) < max(0.008, 0.8 * pixel)
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
            mask |= _segment_distance(yx, point, nxt) < max(0.012, 1.2 * pixel)
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
            mask, colour = _defect(defect, rng, yx, support, 1.0 / size)
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
) -> pathlib.Path:
    """Writes `<root>/<cls>/{train/good, test/{good,<defect>}, ground_truth/<defect>}` PNGs and
    `<root>/meta.json` (via the MVTec generator); returns the meta.json path.

    Defaults give 3 classes x 12 test images at 128 px: small enough for CI, enough for a demo.
    """
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
                _save_png(image, root / cls / split / specie / f"{i:03d}.png")
                if specie != "good":
                    mask_path = root / cls / "ground_truth" / specie / f"{i:03d}_mask.png"
                    _save_png(mask.astype(np.uint8) * 255, mask_path)
    return meta_lib.make_meta("mvtec", str(root), overwrite=True)
