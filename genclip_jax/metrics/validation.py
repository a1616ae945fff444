"""Checks and normalises the inputs of the metrics: anomaly maps, GT masks, image scores, labels.

Every check raises a `ValueError` naming the argument and saying what was expected and what was
got. Validated arrays come back without copies where possible: maps/scores keep their float dtype
(ties must not merge), masks/labels become boolean.
"""

from __future__ import annotations

import numpy as np


def _real_array(x, name: str) -> np.ndarray:
    """Returns `x` as a non-empty real numeric array (bool/int become float32/float64)."""
    arr = np.asarray(x)
    if arr.dtype.kind == "b":
        arr = arr.astype(np.float32)
    elif arr.dtype.kind in "iu":
        arr = arr.astype(np.float64)
    elif arr.dtype.kind != "f":
        raise ValueError(f"{name}: expected a real numeric array, got dtype {arr.dtype}")
    if arr.size == 0:
        raise ValueError(f"{name}: expected a non-empty array, got shape {arr.shape}")
    lo, hi = arr.min(), arr.max()  # NaN propagates through min/max, so this finds NaN and inf
    if not (np.isfinite(lo) and np.isfinite(hi)):
        bad = arr[~np.isfinite(arr)]
        n_nan = int(np.count_nonzero(np.isnan(bad)))
        raise ValueError(
            f"{name}: expected finite values, got {n_nan} NaN and {bad.size - n_nan} infinite "
            f"value(s) among {arr.size}"
        )
    return arr


def _binary_array(x, name: str) -> np.ndarray:
    """Returns `x` (values in {0, 1}, any numeric dtype or bool) as a boolean array."""
    arr = np.asarray(x)
    if arr.dtype.kind == "b":
        return arr
    if arr.dtype.kind not in "iuf":
        raise ValueError(f"{name}: expected a binary array in {{0, 1}}, got dtype {arr.dtype}")
    nonzero = arr != 0
    nonzero_values = arr[nonzero]  # NaN is nonzero, so it lands here too
    if not np.all(nonzero_values == 1):
        bad = np.unique(nonzero_values[nonzero_values != 1])
        shown = ", ".join(repr(v.item()) for v in bad[:5]) + (", ..." if bad.size > 5 else "")
        raise ValueError(
            f"{name}: expected binary values in {{0, 1}}, got {bad.size} other distinct "
            f"value(s): {shown}"
        )
    return nonzero


def check_maps_masks(maps, masks) -> tuple[np.ndarray, np.ndarray]:
    """Validates pixel-level inputs.

    Args:
      maps: (N, H, W) real anomaly maps, finite.
      masks: (N, H, W) ground-truth masks with values in {0, 1}.

    Returns:
      (maps (N, H, W) float array, masks (N, H, W) bool array).
    """
    maps_arr = np.asarray(maps)
    masks_arr = np.asarray(masks)
    if maps_arr.ndim != 3:
        raise ValueError(
            f"maps: expected shape (N, H, W), got {maps_arr.shape} "
            "(squeeze a channel axis of size 1 first)"
        )
    if masks_arr.shape != maps_arr.shape:
        raise ValueError(
            f"masks: expected the shape of maps {maps_arr.shape}, got {masks_arr.shape}"
        )
    return _real_array(maps_arr, "maps"), _binary_array(masks_arr, "masks")


def check_scores_labels(scores, labels) -> tuple[np.ndarray, np.ndarray]:
    """Validates image-level inputs.

    Args:
      scores: (N,) real image anomaly scores, finite.
      labels: (N,) image labels with values in {0, 1} (1 = anomalous).

    Returns:
      (scores (N,) float array, labels (N,) bool array).
    """
    scores_arr = np.asarray(scores)
    labels_arr = np.asarray(labels)
    if scores_arr.ndim != 1:
        raise ValueError(f"scores: expected shape (N,), got {scores_arr.shape}")
    if labels_arr.shape != scores_arr.shape:
        raise ValueError(
            f"labels: expected the shape of scores {scores_arr.shape}, got {labels_arr.shape}"
        )
    return _real_array(scores_arr, "scores"), _binary_array(labels_arr, "labels")
