"""Training losses of AnomalyCLIP (pure JAX): focal, binary Dice, cross-entropy.

Spec ``anomalyclip.md`` §5.1-5.3. Every loss takes an optional ``valid`` (B,) mask for padded
batches: rows with ``valid == 0`` contribute nothing (their values are selected away with
``jnp.where``, so even NaN/inf there does not reach the forward value) and the mean is taken over
the valid rows only. With ``valid=None`` or all rows valid the value is the reference's. For
finite gradients, padded rows should still hold finite inputs (e.g. copies of a real row): a
non-finite value in an unselected row can still poison gradients through ``where``.
If no row is valid the loss is 0.

Pixel losses count only the rows whose mask is known (`pixel_rows`): a defect labelled without a
mask trains the image loss only, and a batch without any masked row gives pixel losses of 0.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["anomalyclip_local_loss", "cross_entropy", "dice_loss", "focal_loss", "pixel_rows"]


def pixel_rows(batch: dict) -> jax.Array | None:
    """(B,) bool: the rows a pixel loss counts, `valid & has_mask` (either may be absent)."""
    rows = [batch[k].astype(bool) for k in ("valid", "has_mask") if batch.get(k) is not None]
    if not rows:
        return None
    return rows[0] if len(rows) == 1 else rows[0] & rows[1]


def _row_mask(valid: jax.Array | None, batch: int, name: str) -> jax.Array:
    """(B,) bool mask of the rows that count; all rows when ``valid`` is None."""
    if valid is None:
        return jnp.ones((batch,), dtype=bool)
    valid = jnp.asarray(valid)
    if valid.shape != (batch,):
        raise ValueError(f"{name}: valid must have shape (B,) = ({batch},), got {valid.shape}")
    return valid.astype(bool)


def _masked_mean(values: jax.Array, valid: jax.Array) -> jax.Array:
    """Mean of ``values`` (B, ...) over all elements of the valid rows (plain mean if all)."""
    keep = jnp.broadcast_to(valid.reshape((-1,) + (1,) * (values.ndim - 1)), values.shape)
    total = jnp.sum(jnp.where(keep, values, 0.0))
    count = jnp.sum(keep.astype(values.dtype))
    return total / jnp.maximum(count, 1.0)


def focal_loss(
    probs: jax.Array,
    gt: jax.Array,
    gamma: float = 2.0,
    smooth: float = 1e-5,
    valid: jax.Array | None = None,
) -> jax.Array:
    """Focal loss on probabilities (AnomalyCLIP ``FocalLoss()``, alpha = 1, no non-linearity).

    Per pixel: ``oh = clip(one_hot(gt, 2), smooth, 1 - smooth)``, ``pt = Σ_c oh_c p_c + smooth``,
    ``l = -(1 - pt)^gamma · log(pt)``; returns the mean over pixels (of the valid images).

    Args:
      probs: (B, H, W, 2) probabilities [normal, abnormal] (already softmaxed and upsampled).
      gt: (B, H, W) ground truth in {0, 1} (cast to int by truncation like ``.long()``).
      valid: optional (B,) mask of real (non-padding) images.

    Returns:
      scalar loss.
    """
    if probs.ndim != 4 or probs.shape[-1] != 2:
        raise ValueError(f"focal_loss: probs must be (B, H, W, 2), got {probs.shape}")
    if gt.shape != probs.shape[:-1]:
        raise ValueError(f"focal_loss: gt must be (B, H, W) = {probs.shape[:-1]}, got {gt.shape}")
    valid = _row_mask(valid, probs.shape[0], "focal_loss")
    one_hot = jax.nn.one_hot(gt.astype(jnp.int32), 2, dtype=probs.dtype)
    # smooth / (num_classes - 1) with num_classes = 2
    one_hot = jnp.clip(one_hot, smooth, 1.0 - smooth)
    pt = jnp.sum(one_hot * probs, axis=-1) + smooth
    per_pixel = -1.0 * jnp.power(1.0 - pt, gamma) * jnp.log(pt)
    return _masked_mean(per_pixel, valid)


def dice_loss(x: jax.Array, y: jax.Array, valid: jax.Array | None = None) -> jax.Array:
    """Binary Dice loss ``1 - mean_n (2 Σ x y + 1) / (Σ x + Σ y + 1)`` (sums per image).

    Args:
      x: (B, H, W) predicted probabilities.
      y: (B, H, W) targets in [0, 1].
      valid: optional (B,) mask of real images; the mean runs over valid images.

    Returns:
      scalar loss.
    """
    if x.shape != y.shape or x.ndim < 2:
        raise ValueError(f"dice_loss: x and y must both be (B, H, W), got {x.shape} and {y.shape}")
    valid = _row_mask(valid, x.shape[0], "dice_loss")
    x_flat = x.reshape(x.shape[0], -1)
    y_flat = y.reshape(y.shape[0], -1).astype(x.dtype)
    dice = (2.0 * jnp.sum(x_flat * y_flat, axis=1) + 1.0) / (
        jnp.sum(x_flat, axis=1) + jnp.sum(y_flat, axis=1) + 1.0
    )
    count = jnp.sum(valid.astype(dice.dtype))
    loss = 1.0 - jnp.sum(jnp.where(valid, dice, 0.0)) / jnp.maximum(count, 1.0)
    return jnp.where(count > 0, loss, 0.0)


def cross_entropy(
    logits: jax.Array, labels: jax.Array, valid: jax.Array | None = None
) -> jax.Array:
    """Softmax cross-entropy ``mean_b -log softmax(logits_b)[label_b]`` (torch F.cross_entropy).

    Args:
      logits: (B, K) logits (K = 2: [normal, abnormal]).
      labels: (B,) integer labels in [0, K).
      valid: optional (B,) mask of real images.

    Returns:
      scalar loss.
    """
    if logits.ndim != 2 or labels.shape != logits.shape[:1]:
        raise ValueError(
            f"cross_entropy: logits must be (B, K) and labels (B,), got {logits.shape} and "
            f"{labels.shape}"
        )
    valid = _row_mask(valid, logits.shape[0], "cross_entropy")
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(log_probs, labels.astype(jnp.int32)[:, None], axis=-1)[:, 0]
    return _masked_mean(nll, valid)


def anomalyclip_local_loss(
    probs: jax.Array, gt: jax.Array, valid: jax.Array | None = None
) -> jax.Array:
    """One layer's pixel loss ``focal(P, gt) + dice(P[..., 1], gt) + dice(P[..., 0], 1 - gt)``.

    Args:
      probs: (B, H, W, 2) upsampled probabilities [normal, abnormal].
      gt: (B, H, W) binary mask.

    Returns:
      scalar loss (sum it over layers, then ``4 * local + cross_entropy`` for AnomalyCLIP).
    """
    return (
        focal_loss(probs, gt, valid=valid)
        + dice_loss(probs[..., 1], gt, valid=valid)
        + dice_loss(probs[..., 0], 1.0 - gt, valid=valid)
    )
