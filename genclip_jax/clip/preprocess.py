"""CLIP's input normalisation, once on the host (numpy) and once on device (a lookup table).

The host pipeline hands the model uint8 pixels (a quarter of float32's bytes in host memory and
host-to-device transfers); the vision tower normalises them on device with `model_input`. Both
give exactly torch's ToTensor + Normalize: `normalize` runs its float32 operations in its order,
and `model_input` gathers from a table that `normalize` itself made from the 256 values of each
channel. Computing (x / 255 - mean) / std in XLA instead is not bit-identical (XLA rewrites the
divisions: up to 4.8e-7 apart on CPU).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

CLIP_MEAN = np.array((0.48145466, 0.4578275, 0.40821073), np.float32)
CLIP_STD = np.array((0.26862954, 0.26130258, 0.27577711), np.float32)


@functools.lru_cache(maxsize=4)
def _flat_mean_std(image_size: int) -> tuple[np.ndarray, np.ndarray]:
    # Tiled to the flat image: numpy broadcasting over a last axis of 3 is ~15x slower.
    pixels = image_size * image_size
    return np.tile(CLIP_MEAN, pixels), np.tile(CLIP_STD, pixels)


def normalize(pixels: np.ndarray) -> np.ndarray:
    """(S, S, 3) uint8 -> float32 CLIP-normalised, in the float32 operations and order of torch's
    ToTensor + Normalize: bit-identical."""
    size = pixels.shape[0]
    mean, std = _flat_mean_std(size)
    x = np.array(pixels, np.float32).reshape(-1)
    x /= np.float32(255)
    x -= mean
    x /= std
    return x.reshape(size, size, 3)


@functools.cache
def normalize_table() -> np.ndarray:
    """(256, 3) float32: row v is `normalize` of the pixel (v, v, v); every value of every
    channel, as a 16 x 16 image of grey pixels."""
    grey = np.repeat(np.arange(256, dtype=np.uint8), 3).reshape(16, 16, 3)
    return normalize(grey).reshape(256, 3)


def model_input(images: jax.Array) -> jax.Array:
    """(..., 3) uint8 pixels -> float32 CLIP-normalised, bit-identical to `normalize` (a gather
    from `normalize_table`); floating-point images are taken as normalised already and pass
    through unchanged. Decided by dtype when traced."""
    if jnp.issubdtype(images.dtype, jnp.floating):
        return images
    if images.dtype != jnp.uint8:
        raise ValueError(f"images: expected uint8 pixels or CLIP-normalised floats, got "
                         f"{images.dtype}")
    table = jnp.asarray(normalize_table())
    return table[images.astype(jnp.int32), jnp.arange(3)]
