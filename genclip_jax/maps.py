"""Patch/text similarities, image logits and anomaly maps (pure JAX, channels-last).

Channel convention: index 0 = normal, 1 = abnormal (text features are stacked in that order).
Follows AnomalyCLIP (spec ``anomalyclip.md`` §4): softmax over the two prompts of cosine
similarities divided by a temperature, CLS token dropped, bilinear upsampling of the
*probabilities*, per-layer maps ``(p_abn + 1 - p_nor) / 2`` reduced over layers, Gaussian blur
equal to ``scipy.ndimage.gaussian_filter(sigma=4)``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "anomaly_map",
    "gaussian_blur",
    "gaussian_kernel",
    "image_logits",
    "image_score",
    "l2_normalize",
    "patch_probabilities",
    "upsample",
]

_HIGHEST = jax.lax.Precision.HIGHEST
MAP_REDUCTIONS = ("sum", "mean")  # over layers: AnomalyCLIP sums, GenCLIP averages


def l2_normalize(x: jax.Array) -> jax.Array:
    """``x / ||x||`` along the last axis (no epsilon, like the reference ``x / x.norm()``)."""
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


def _text_per_image(text_features: jax.Array, batch: int, dim: int, name: str) -> jax.Array:
    """Text features (2, D) or (B, 2, D) -> (B or 1, 2, D), checked against the image side."""
    if text_features.ndim == 2:
        text_features = text_features[None]
    if text_features.ndim != 3 or text_features.shape[-2] != 2:
        raise ValueError(
            f"{name}: text_features must be (2, D) or (B, 2, D) with rows [normal, abnormal], "
            f"got shape {text_features.shape}"
        )
    if text_features.shape[-1] != dim:
        raise ValueError(
            f"{name}: feature dims differ: image side D={dim}, text_features {text_features.shape}"
        )
    if text_features.shape[0] not in (1, batch):
        raise ValueError(
            f"{name}: per-image text_features {text_features.shape} do not match batch {batch}"
        )
    return text_features


def patch_probabilities(
    patch_features: jax.Array, text_features: jax.Array, temperature: float = 0.07
) -> jax.Array:
    """Per-patch [normal, abnormal] probabilities on the patch grid.

    Args:
      patch_features: (B, N, D) tokens of one layer, row 0 = CLS (dropped), N - 1 = h * w
        with h = w.
      text_features: (2, D) shared or (B, 2, D) per image, rows [normal, abnormal].
      temperature: softmax temperature (logits = cosine / temperature).

    Returns:
      (B, h, w, 2) ``softmax(normalize(F) @ normalize(T)^T / temperature)`` without CLS.
    """
    if patch_features.ndim != 3:
        raise ValueError(
            f"patch_probabilities: patch_features must be (B, N, D), got {patch_features.shape}"
        )
    B, N, D = patch_features.shape
    side = math.isqrt(max(N - 1, 0))
    if N < 2 or side * side != N - 1:
        raise ValueError(
            "patch_probabilities: patch_features (B, N, D) must hold CLS + a square grid "
            f"(N - 1 = h * h), got N = {N}"
        )
    text = _text_per_image(text_features, B, D, "patch_probabilities")
    logits = jnp.einsum(
        "bnd,bkd->bnk",
        l2_normalize(patch_features[:, 1:]),
        l2_normalize(text),
        precision=_HIGHEST,
    )
    probs = jax.nn.softmax(logits / temperature, axis=-1)
    return probs.reshape(B, side, side, 2)


def image_logits(
    global_features: jax.Array, text_features: jax.Array, temperature: float = 0.07
) -> jax.Array:
    """Image-level logits ``normalize(g) @ normalize(T)^T / temperature``.

    Args:
      global_features: (B, D) image embeddings (not necessarily normalised).
      text_features: (2, D) shared or (B, 2, D) per image, rows [normal, abnormal].

    Returns:
      (B, 2) logits [normal, abnormal].
    """
    if global_features.ndim != 2:
        raise ValueError(
            f"image_logits: global_features must be (B, D), got {global_features.shape}"
        )
    B, D = global_features.shape
    text = _text_per_image(text_features, B, D, "image_logits")
    sims = jnp.einsum(
        "bd,bkd->bk", l2_normalize(global_features), l2_normalize(text), precision=_HIGHEST
    )
    return sims / temperature


def image_score(logits: jax.Array) -> jax.Array:
    """Image anomaly score ``softmax(logits)[:, 1]``: (B, 2) logits -> (B,)."""
    if logits.ndim != 2 or logits.shape[-1] != 2:
        raise ValueError(f"image_score: logits must be (B, 2), got {logits.shape}")
    return jax.nn.softmax(logits, axis=-1)[:, 1]


def upsample(probs: jax.Array, size: int | Sequence[int]) -> jax.Array:
    """Bilinear resize with half-pixel centres, (B, h, w, C) -> (B, H, W, C).

    Equal to torch ``F.interpolate(mode="bilinear", align_corners=False)`` (no antialiasing,
    border samples clamped) in both directions. ``size`` is an int (square) or (H, W).
    """
    if probs.ndim != 4:
        raise ValueError(f"upsample: probs must be (B, h, w, C), got {probs.shape}")
    H, W = (size, size) if isinstance(size, int) else tuple(size)
    B, _, _, C = probs.shape
    return jax.image.resize(
        probs, (B, H, W, C), method="linear", antialias=False, precision=_HIGHEST
    )


def gaussian_kernel(sigma: float = 4.0, truncate: float = 4.0) -> np.ndarray:
    """scipy.ndimage's 1-D Gaussian: ``w[k] ∝ exp(-k²/(2σ²))``, |k| <= int(truncate·σ + 0.5)."""
    if not sigma > 0:
        raise ValueError(f"gaussian_kernel: sigma must be > 0, got {sigma}")
    radius = int(truncate * float(sigma) + 0.5)
    k = np.arange(-radius, radius + 1, dtype=np.float64)
    w = np.exp(-0.5 / float(sigma) ** 2 * k * k)
    return w / w.sum()


def _blur_axis(x: jax.Array, weights: np.ndarray, axis: int) -> jax.Array:
    radius = (len(weights) - 1) // 2
    pad = [(0, 0)] * x.ndim
    pad[axis] = (radius, radius)
    # scipy mode "reflect" (d c b a | a b c d | d c b a) is numpy/jnp pad mode "symmetric".
    padded = jnp.pad(x, pad, mode="symmetric")
    n = x.shape[axis]
    out = jnp.zeros_like(x)
    for i, w in enumerate(weights.astype(np.float32)):
        out = out + w * jax.lax.slice_in_dim(padded, i, i + n, axis=axis)
    return out


@functools.partial(jax.jit, static_argnames=("sigma", "truncate"))
def _gaussian_blur(maps: jax.Array, sigma: float, truncate: float) -> jax.Array:
    weights = gaussian_kernel(sigma, truncate)
    x = maps.astype(jnp.float32)
    return _blur_axis(_blur_axis(x, weights, axis=1), weights, axis=2)


def gaussian_blur(maps: jax.Array, sigma: float = 4.0, truncate: float = 4.0) -> jax.Array:
    """Per-image Gaussian smoothing equal to ``scipy.ndimage.gaussian_filter(m, sigma)``.

    Separable (rows then columns, like scipy), boundary mode "reflect", float32, compiled
    (jit-able inside other functions); ``sigma`` and ``truncate`` are static Python numbers.

    Args:
      maps: (B, H, W) anomaly maps.

    Returns:
      (B, H, W) float32 smoothed maps.
    """
    if maps.ndim != 3:
        raise ValueError(f"gaussian_blur: maps must be (B, H, W), got {maps.shape}")
    return _gaussian_blur(jnp.asarray(maps), sigma=float(sigma), truncate=float(truncate))


def anomaly_map(per_layer_probs: jax.Array | Sequence[jax.Array], reduce: str = "sum") -> jax.Array:
    """Combine per-layer probability maps into one anomaly map.

    Args:
      per_layer_probs: (L, B, H, W, 2) array or a sequence of L (B, H, W, 2) maps.
      reduce: "sum" over layers (AnomalyCLIP) or "mean" (GenCLIP).

    Returns:
      (B, H, W) ``reduce_l (p_l[..., 1] + 1 - p_l[..., 0]) / 2``.
    """
    if reduce not in MAP_REDUCTIONS:
        raise ValueError(f"anomaly_map: reduce must be one of {MAP_REDUCTIONS}, got {reduce!r}")
    if not isinstance(per_layer_probs, jax.Array | np.ndarray):
        if len(per_layer_probs) == 0:
            raise ValueError("anomaly_map: per_layer_probs is empty (expected >= 1 layer)")
        per_layer_probs = jnp.stack(list(per_layer_probs))
    if per_layer_probs.ndim != 5 or per_layer_probs.shape[-1] != 2:
        raise ValueError(
            "anomaly_map: per_layer_probs must be (L, B, H, W, 2) or a list of (B, H, W, 2), "
            f"got shape {per_layer_probs.shape}"
        )
    per_layer = (per_layer_probs[..., 1] + 1.0 - per_layer_probs[..., 0]) / 2.0
    return per_layer.sum(axis=0) if reduce == "sum" else per_layer.mean(axis=0)
