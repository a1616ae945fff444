"""Heatmap overlays for a person to look at: image, anomaly map in colour, GT outline."""

from __future__ import annotations

import collections
import io
import os
import pathlib
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw

from genclip_jax.files import write_atomic

# Piecewise-linear "jet": blue -> cyan -> yellow -> red.
_STOPS = np.array([0.0, 0.35, 0.65, 1.0])
_COLOURS = np.array([[0, 0, 160], [0, 220, 255], [255, 230, 0], [200, 0, 0]], np.float64)
OUTLINE_RGB = (0, 255, 0)


def colourize(values: np.ndarray) -> np.ndarray:
    """(H, W) values in [0, 1] -> (H, W, 3) uint8 colours."""
    v = np.clip(np.nan_to_num(values), 0.0, 1.0)
    rgb = np.stack([np.interp(v, _STOPS, _COLOURS[:, c]) for c in range(3)], axis=-1)
    return rgb.round().astype(np.uint8)


def outline(mask: np.ndarray) -> np.ndarray:
    """(H, W) bool: mask pixels with a 4-neighbour outside the mask."""
    m = np.asarray(mask) > 0.5
    padded = np.pad(m, 1, mode="edge")
    inner = (padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:])
    return m & ~inner


def overlay(
    image: np.ndarray,
    anomaly_map: np.ndarray,
    mask: np.ndarray | None = None,
    value_range: tuple[float, float] | None = None,
    alpha: float = 0.5,
) -> np.ndarray:
    """Blends the coloured map over the image and draws the GT outline.

    Args:
      image: (H, W, 3) uint8.
      anomaly_map: (H, W) float; scaled to [0, 1] with `value_range` (default: its own min/max).
      mask: optional (H, W) GT mask.

    Returns:
      (H, W, 3) uint8.
    """
    if image.shape[:2] != anomaly_map.shape:
        raise ValueError(
            f"overlay: image {image.shape[:2]} and anomaly_map {anomaly_map.shape} differ in size"
        )
    lo, hi = value_range if value_range else (float(anomaly_map.min()), float(anomaly_map.max()))
    scaled = (anomaly_map - lo) / (hi - lo) if hi > lo else np.zeros_like(anomaly_map)
    blend = (1 - alpha) * image.astype(np.float64) + alpha * colourize(scaled)
    out = blend.round().astype(np.uint8)
    if mask is not None:
        out[outline(mask)] = OUTLINE_RGB
    return out


def _relative_input(img_path: str) -> pathlib.PurePosixPath:
    path = pathlib.PurePosixPath(img_path)
    if path.is_absolute() or ".." in path.parts or not path.name:
        raise ValueError(
            f"heatmap input path {img_path!r}: expected a relative file path without '..' "
            "components (its panel goes to the same relative path under the output folder)"
        )
    return path


def panel_names(img_paths: Sequence[str]) -> list[str]:
    """Relative POSIX path of the panel of each input, all distinct, mirroring the inputs' folders.

    Each is the input path with its suffix replaced by `.png` (`a/b.jpg` -> `a/b.png`). Inputs of
    one folder that would share a name (`a/b.png`, `a/b.jpg`) keep their full file name plus
    `.png` (`a/b.png.png`, `a/b.jpg.png`), so no panel silently overwrites another. A name still
    taken by an earlier input, or by a folder of the output (`a.png/` next to `a.jpg`), gets
    `~1`, `~2`, ... before `.png`, in input order.
    """
    paths = [_relative_input(p) for p in img_paths]
    plain = [p.with_suffix(".png").as_posix() for p in paths]
    shared = collections.Counter(plain)
    wanted = [
        name if shared[name] == 1 else f"{path.as_posix()}.png"
        for path, name in zip(paths, plain, strict=True)
    ]
    reserved = set(wanted)
    taken = {parent.as_posix() for p in paths for parent in p.parents}  # a file can't be a folder
    names = []
    for name in wanted:
        candidate, k = name, 0
        while candidate in taken or (k and candidate in reserved):
            k += 1
            candidate = f"{name.removesuffix('.png')}~{k}.png"
        taken.add(candidate)
        names.append(candidate)
    return names


def colour_bar(height: int, value_range: tuple[float, float], width: int = 64) -> np.ndarray:
    """(height, width, 3) uint8: the colour scale, high values on top, with the range's ends
    written beside it, so that panels on one fixed range can be compared by eye."""
    ramp = colourize(np.linspace(1.0, 0.0, height))[:, None, :]
    bar = np.full((height, width, 3), 255, np.uint8)
    bar[:, : width // 3] = ramp
    image = Image.fromarray(bar)
    draw = ImageDraw.Draw(image)
    draw.text((width // 3 + 2, 0), f"{value_range[1]:.3g}", fill=(0, 0, 0))
    draw.text((width // 3 + 2, height - 12), f"{value_range[0]:.3g}", fill=(0, 0, 0))
    return np.asarray(image)


def caption(panel: np.ndarray, text: str, colour: tuple[int, int, int] = (0, 0, 0)) -> np.ndarray:
    """`panel` with a white band below holding one line of `text`."""
    band = Image.new("RGB", (panel.shape[1], 16), (255, 255, 255))
    ImageDraw.Draw(band).text((4, 2), text, fill=colour)
    return np.concatenate([panel, np.asarray(band)], axis=0)


def write_png(path: str | os.PathLike, pixels: np.ndarray) -> pathlib.Path:
    """Writes uint8 pixels ((H, W) or (H, W, 3)) as a PNG, atomically; returns the path."""
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return write_atomic(path, buffer.getvalue())


def save_panel(
    path: str | os.PathLike,
    image: np.ndarray,
    anomaly_map: np.ndarray,
    mask: np.ndarray | None = None,
    value_range: tuple[float, float] | None = None,
    text: str | None = None,
    text_colour: tuple[int, int, int] = (0, 0, 0),
) -> pathlib.Path:
    """Writes [image | overlay] side by side as a PNG (atomically); returns the path. With a
    fixed `value_range`, a colour bar of it follows; `text` goes on a band below."""
    panel = np.concatenate([image, overlay(image, anomaly_map, mask, value_range)], axis=1)
    if value_range is not None:
        panel = np.concatenate([panel, colour_bar(panel.shape[0], value_range)], axis=1)
    if text is not None:
        panel = caption(panel, text, text_colour)
    return write_png(path, panel)
