"""Synthetic defects pasted on normal training images, with their exact masks.

For users who have normal images only (or few defects): `train.synthetic_anomalies` turns a
fraction of each epoch's normal samples into defective ones on the fly. Kinds:

  * "cutpaste": a patch cut from the same image, scaled, colour-jittered and rotated, pasted
    elsewhere (CutPaste, Li et al. 2021); the mask is the pasted footprint;
  * "perlin": a Perlin-noise-shaped region blended with a procedural texture (DRAEM, Zavrtanik et
    al. 2021); the mask is the region;
  * "scratch", "spot", "crack": the painted defects of `data.synthetic`.

Every pixel a defect changes is inside its mask and every pixel outside is left untouched, so the
mask is exact. Which samples get a defect depends only on (seed, epoch) and the labels, and the
defect of a sample only on (seed, epoch, dataset index): never on the batch size or host count.
The work happens on the resized uint8 image (`pipeline.Dataset.load`), in the decode threads.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence

import numpy as np
from PIL import Image, ImageEnhance

from genclip_jax.data import synthetic

KINDS = ("cutpaste", "perlin", "scratch", "spot", "crack")
_CHOICE, _DEFECT = 0, 1  # rng stream tags: which samples, and each sample's defect


@functools.lru_cache(maxsize=4)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    coords = (np.arange(size) + 0.5) / size
    return tuple(np.meshgrid(coords, coords, indexing="ij"))


def cutpaste(rng: np.random.Generator, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(S, S, 3) uint8 -> (image with a pasted patch, bool (S, S) mask of the pasted pixels)."""
    size = pixels.shape[0]
    area = rng.uniform(0.02, 0.12) * size * size
    ratio = np.exp(rng.uniform(np.log(0.3), np.log(1 / 0.3)))
    h = int(np.clip(round(np.sqrt(area * ratio)), 2, size // 2))
    w = int(np.clip(round(np.sqrt(area / ratio)), 2, size // 2))
    y0, x0 = rng.integers(0, size - h + 1), rng.integers(0, size - w + 1)
    patch = Image.fromarray(pixels[y0 : y0 + h, x0 : x0 + w])
    scale = rng.uniform(0.8, 1.2)
    patch = patch.resize((max(2, round(w * scale)), max(2, round(h * scale))), Image.BILINEAR)
    for enhance in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
        patch = enhance(patch).enhance(rng.uniform(0.6, 1.4))
    angle = rng.uniform(-45, 45)
    footprint = Image.new("L", patch.size, 255).rotate(angle, Image.NEAREST, expand=True)
    patch = patch.rotate(angle, Image.BILINEAR, expand=True)
    ph, pw = patch.size[1], patch.size[0]
    ty, tx = rng.integers(0, size - ph + 1), rng.integers(0, size - pw + 1)
    mask = np.zeros((size, size), bool)
    mask[ty : ty + ph, tx : tx + pw] = np.asarray(footprint) > 0
    out = pixels.copy()
    out[mask] = np.asarray(patch)[np.asarray(footprint) > 0]
    return out, mask


def perlin_noise(rng: np.random.Generator, size: int, cells: tuple[int, int]) -> np.ndarray:
    """(S, S) float32 2-D gradient (Perlin) noise with `cells` (rows, cols) lattice cells.

    Evaluated on at most 128 x 128 points and resized bilinearly (the noise is smooth at that
    scale): 20x cheaper at 518, so that augmentation does not starve the device.
    """
    low = min(size, 128)
    noise = _perlin_at(rng, low, cells)
    if low == size:
        return noise
    image = Image.fromarray(np.ascontiguousarray(noise))
    return np.asarray(image.resize((size, size), Image.BILINEAR))


def _perlin_at(rng: np.random.Generator, size: int, cells: tuple[int, int]) -> np.ndarray:
    angles = rng.uniform(0, 2 * np.pi, size=(cells[0] + 1, cells[1] + 1))
    gy, gx = np.sin(angles).astype(np.float32), np.cos(angles).astype(np.float32)
    pos = [(np.arange(size, dtype=np.float32) + 0.5) / size * c for c in cells]
    cell = [np.minimum(p.astype(np.int64), c - 1) for p, c in zip(pos, cells, strict=True)]
    frac = [p - i for p, i in zip(pos, cell, strict=True)]
    fy, fx = frac[0][:, None], frac[1][None, :]

    def corner(dy: int, dx: int) -> np.ndarray:
        rows, cols = np.ix_(cell[0] + dy, cell[1] + dx)
        return gy[rows, cols] * (fy - dy) + gx[rows, cols] * (fx - dx)

    u, v = (t * t * t * (t * (t * 6 - 15) + 10) for t in (fy, fx))  # Perlin's fade curve
    top = corner(0, 0) + v * (corner(0, 1) - corner(0, 0))
    bottom = corner(1, 0) + v * (corner(1, 1) - corner(1, 0))
    return top + u * (bottom - top)


def perlin(rng: np.random.Generator, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """DRAEM-style: a Perlin region covering 2-12 % of the image, where a procedural texture
    (coloured noise) is blended in with the image's weight beta in [0.1, 0.6]."""
    size = pixels.shape[0]
    shape_noise = perlin_noise(rng, size, tuple(2 ** rng.integers(1, 4, size=2)))
    area = max(1, int(rng.uniform(0.02, 0.12) * size * size))
    mask = shape_noise >= np.partition(shape_noise.reshape(-1), -area)[-area]
    texture_noise = perlin_noise(rng, size, tuple(2 ** rng.integers(3, 6, size=2)))[mask]
    t = (texture_noise - texture_noise.min()) / max(np.ptp(texture_noise), 1e-6)
    low, high = rng.uniform(0, 255, size=(2, 3)).astype(np.float32)
    beta = rng.uniform(0.1, 0.6)
    blend = beta * pixels[mask] + (1 - beta) * (low + t[:, None] * (high - low))
    out = pixels.copy()
    out[mask] = np.clip(np.round(blend), 0, 255).astype(np.uint8)
    return out, mask


def painted(
    kind: str, rng: np.random.Generator, pixels: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """A scratch, spot or crack of `data.synthetic` painted anywhere on the image."""
    size = pixels.shape[0]
    mask = np.zeros((size, size), bool)
    for _ in range(100):  # a defect thinner than a pixel of a tiny image can miss every centre
        mask, colour = synthetic.defect_mask(kind, rng, _grid(size), None, 1.0 / size)
        if mask.any():
            break
    else:
        raise ValueError(f"a {kind} does not fit a {size}x{size} image")
    fill = colour * 255 + rng.normal(0, 5, size=(int(mask.sum()), 3))
    out = pixels.copy()
    out[mask] = np.clip(np.round(fill), 0, 255).astype(np.uint8)
    return out, mask


_MAKERS: dict[str, Callable[[np.random.Generator, np.ndarray], tuple[np.ndarray, np.ndarray]]] = {
    "cutpaste": cutpaste,
    "perlin": perlin,
    **{k: functools.partial(painted, k) for k in ("scratch", "spot", "crack")},
}


@dataclasses.dataclass(frozen=True)
class AnomalySynthesizer:
    """`fraction` of the normal samples of each epoch get one defect of a kind drawn from `kinds`
    with probabilities proportional to `weights`."""

    seed: int
    fraction: float
    kinds: Sequence[str] = KINDS
    weights: Sequence[float] = (1.0,) * len(KINDS)

    def __post_init__(self):
        unknown = [k for k in self.kinds if k not in _MAKERS]
        if unknown or not self.kinds:
            raise ValueError(f"kinds: expected some of {list(KINDS)}, got {list(self.kinds)}")
        if len(self.weights) != len(self.kinds) or min(self.weights) < 0 or not sum(self.weights):
            raise ValueError(
                f"weights: expected {len(self.kinds)} non-negative numbers (one per kind of "
                f"{list(self.kinds)}) with a positive sum, got {list(self.weights)}"
            )

    def chosen(self, labels: np.ndarray, epoch: int) -> np.ndarray:
        """(N,) bool: the normal samples (label 0) that get a defect in `epoch`: exactly
        round(fraction x normal count) of them, drawn by a permutation seeded by (seed, epoch)."""
        order = np.random.default_rng([self.seed, epoch, _CHOICE]).permutation(len(labels))
        normal = order[np.asarray(labels)[order] == 0]
        out = np.zeros(len(labels), bool)
        out[normal[: round(self.fraction * len(normal))]] = True
        return out

    def apply(
        self, pixels: np.ndarray, index: int, epoch: int
    ) -> tuple[np.ndarray, np.ndarray, str]:
        """(image with a defect, its bool (S, S) mask, "synthetic_<kind>") for sample `index`."""
        rng = np.random.default_rng([self.seed, epoch, index, _DEFECT])
        p = np.asarray(self.weights, np.float64)
        kind = self.kinds[rng.choice(len(self.kinds), p=p / p.sum())]
        out, mask = _MAKERS[kind](rng, pixels)
        return out, mask, f"synthetic_{kind}"

    def for_epoch(self, labels: np.ndarray, epoch: int) -> Callable:
        """The `pipeline.Synthesize` hook of one epoch."""
        chosen = self.chosen(labels, epoch)
        return lambda index, pixels: (
            self.apply(pixels, index, epoch) if chosen[index] else None
        )
