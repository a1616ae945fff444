"""AUPRO: area under the per-region-overlap (PRO) curve up to a false-positive-rate limit.

Ground-truth regions are the 8-connected components of each image's mask; PRO(t) is the mean,
over ALL regions of ALL images of the class, of the fraction of the region predicted anomalous at
threshold t; FPR(t) is pooled over all normal pixels of all images. Two modes:

* ``"reference"``: exactly the official AnomalyCLIP evaluator (`metrics.cal_pro_score`, after
  cflow-ad): thresholds ``np.arange(lo, hi, (hi - lo) / 200)`` on the map min/max (the step is
  computed in the maps' dtype, float32 for float32 maps; the thresholds are float64),
  prediction ``map > t``, keep points with FPR < max_fpr (strict), min-max rescale the kept FPRs
  to [0, 1] and integrate PRO over them with the trapezoid rule (sklearn ``auc``).
* ``"exact"``: the usual definition (MVTec / anomalib): every distinct map value is a threshold,
  prediction ``map >= t``, (0, 0) prepended, the curve cut at FPR = max_fpr with linear
  interpolation of PRO, trapezoid area divided by max_fpr.

Both are vectorised: regions are labelled once per image (`scipy.ndimage.label`), never per
threshold. The reference mode bins every pixel into the ~200 threshold intervals and counts
(region, bin) pairs with one `np.bincount`; reverse cumulative sums give the per-region counts
above every threshold at once. The exact mode sorts the pixels once (only those above the
FPR-limit threshold) and takes cumulative sums of per-pixel weights.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from genclip_jax.metrics.undefined import undefined_metric
from genclip_jax.metrics.validation import check_maps_masks

AUPRO_MODES = ("reference", "exact")

# 8-connectivity inside each image, no connectivity across the image axis of an (N, H, W) stack.
_STRUCTURE = np.zeros((3, 3, 3), dtype=bool)
_STRUCTURE[1] = True
# Pixels per chunk in the reference mode (bounds its float/intp temporaries to ~5 MB).
_CHUNK_PIXELS = 1 << 18


def label_regions(masks: np.ndarray) -> tuple[np.ndarray, int]:
    """Labels the 8-connected GT regions of every image with labels unique across images.

    Args:
      masks: (N, H, W) bool.

    Returns:
      (labels (N, H, W) int32, 0 = normal pixel, 1..R = region id; R = number of regions).
    """
    labels, n_regions = ndimage.label(masks, structure=_STRUCTURE)
    return labels, int(n_regions)


def _validate_options(max_fpr: float, mode: str | None = None) -> None:
    if mode is not None and mode not in AUPRO_MODES:
        raise ValueError(f"mode: expected one of {AUPRO_MODES}, got {mode!r}")
    if not 0.0 < max_fpr <= 1.0:
        raise ValueError(f"max_fpr: expected a value in (0, 1], got {max_fpr!r}")


def _trapezoid_auc(x: np.ndarray, y: np.ndarray) -> float:
    """sklearn `auc`: trapezoid area under y(x) for monotone x (decreasing x gives +area)."""
    dx = np.diff(x)
    direction = 1.0
    if np.any(dx < 0):
        if not np.all(dx <= 0):
            raise ValueError(f"x: expected monotone values, got {x!r}")
        direction = -1.0
    return float(direction * np.trapezoid(y, x))


# --------------------------------------------------------------------------------------------
# reference mode
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReferenceProCurve:
    """PRO/FPR at the reference evaluator's thresholds (all of them, before the FPR cut).

    Attributes:
      thresholds: (K,) float64 ascending, ``np.arange(lo, hi, (hi - lo) / max_steps)`` with
        lo, hi and the step in the maps' dtype.
      fpr: (K,) float64, non-increasing.
      pro: (K,) float64, non-increasing.
    """

    thresholds: np.ndarray
    fpr: np.ndarray
    pro: np.ndarray


def _reference_thresholds(maps: np.ndarray, max_steps: int) -> np.ndarray:
    """The reference's thresholds, bit for bit: min/max and step stay in the maps' dtype
    (float32 maps give a float32 step), `np.arange` returns float64 values."""
    lo, hi = maps.min(), maps.max()
    if lo == hi:
        return np.zeros(0, np.float64)
    return np.arange(lo, hi, (hi - lo) / max_steps).astype(np.float64, copy=False)


def _comparable_thresholds(thresholds: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Thresholds rounded DOWN to `dtype`: for v of that dtype, v > t  <=>  v > result.

    (If t is not representable, the largest representable value below it, r, satisfies
    r < t < next(r), so v > t <=> v >= next(r) <=> v > r.)
    """
    rounded = thresholds.astype(dtype)
    above = rounded.astype(np.float64) > thresholds
    rounded[above] = np.nextafter(rounded[above], dtype.type(-np.inf))
    return rounded


def _threshold_bins(values: np.ndarray, thresholds: np.ndarray, limits: np.ndarray) -> np.ndarray:
    """For each value v (flat, float), the number of thresholds t < v, i.e. v > t.

    Equals `np.searchsorted(limits, values, side="left")` (`limits`: `thresholds` rounded down to
    the values' dtype), but the bin comes from arithmetic on the equally spaced thresholds; only
    values whose estimate is within a proven rounding-error bound of a bin edge go through the
    exact binary search (a few per thousand), which is several times faster.
    """
    k = thresholds.size
    dtype = values.dtype
    lo = float(thresholds[0])
    step = (float(thresholds[-1]) - lo) / (k - 1) if k > 1 else 1.0
    # Error of r = (v - lo) / step against the exact position: a few ulps of |v|, |lo|, and of
    # the k float64 thresholds, in units of step; 16x margin.
    scale = max(abs(lo), abs(float(thresholds[-1])) + step) / step + k + 1
    tol = 16 * 4 * float(np.finfo(dtype).eps) * scale + 32 * 2.0**-52 * scale
    if tol >= 0.25:  # badly conditioned (huge offset / tiny range): exact search for all
        return np.searchsorted(limits, values, side="left")
    pos = values - dtype.type(lo)
    pos *= dtype.type(1.0 / step)
    bins = np.floor(pos)
    pos -= bins  # fractional part
    bins += 1.0
    np.clip(bins, 0, k, out=bins)
    bins = bins.astype(np.intp)
    unsure = np.flatnonzero((pos < tol) | (pos > 1.0 - tol))
    bins[unsure] = np.searchsorted(limits, values[unsure], side="left")
    return bins


def _reverse_cumsum_above(hist: np.ndarray) -> np.ndarray:
    """hist (..., K+1) counts per bin b (b = #thresholds below the value) -> (..., K) counts of
    values above each threshold k, i.e. the sum over bins b > k."""
    return np.cumsum(hist[..., ::-1], axis=-1)[..., ::-1][..., 1:]


def _reference_pro_curve(maps: np.ndarray, masks: np.ndarray, max_steps: int) -> ReferenceProCurve:
    thresholds = _reference_thresholds(maps, max_steps)
    k = thresholds.size
    flat_maps = maps.reshape(-1)
    limits = _comparable_thresholds(thresholds, flat_maps.dtype)

    def bins_of(values: np.ndarray) -> np.ndarray:
        if k == 0:
            return np.zeros(values.size, np.intp)
        return _threshold_bins(values, thresholds, limits)

    # All pixels, in chunks to bound the temporaries: histogram over the K+1 bins.
    all_hist = np.zeros(k + 1, np.int64)
    for start in range(0, flat_maps.size, _CHUNK_PIXELS):
        all_hist += np.bincount(bins_of(flat_maps[start : start + _CHUNK_PIXELS]), minlength=k + 1)
    # Anomalous pixels, one image at a time (temporaries of one image): a histogram per region,
    # regions in the order `label_regions` numbers them over the stack.
    region_hists = []
    for image in np.flatnonzero(masks.reshape(masks.shape[0], -1).any(axis=1)):
        inside = masks[image]
        labels, n_regions = ndimage.label(inside, structure=_STRUCTURE[1])
        region_of = labels[inside].astype(np.intp) - 1
        region_hists.append(np.bincount(
            region_of * (k + 1) + bins_of(maps[image][inside]), minlength=n_regions * (k + 1)
        ).reshape(n_regions, k + 1))
    region_hist = np.concatenate(region_hists)
    normal_hist = all_hist - region_hist.sum(axis=0)
    n_normal = int(normal_hist.sum())
    area = region_hist.sum(axis=1)
    fpr = _reverse_cumsum_above(normal_hist) / n_normal
    pro = (_reverse_cumsum_above(region_hist) / area[:, None]).mean(axis=0)
    return ReferenceProCurve(thresholds=thresholds, fpr=fpr, pro=pro)


def reference_pro_curve(maps, masks, max_steps: int = 200) -> ReferenceProCurve:
    """PRO/FPR of the official evaluator at its `max_steps`-step thresholds (before the cut).

    Args:
      maps: (N, H, W) anomaly maps; masks: (N, H, W) in {0, 1} with anomalous and normal pixels.
    """
    maps, masks = check_maps_masks(maps, masks)
    _require_both_classes(masks, "reference_pro_curve")
    return _reference_pro_curve(maps, masks, max_steps)


def _reference_points(curve: ReferenceProCurve, max_fpr: float) -> tuple[np.ndarray, np.ndarray]:
    keep = curve.fpr < max_fpr
    fpr = curve.fpr[keep]
    if fpr.size == 0:
        return fpr, curve.pro[keep]
    span = fpr.max() - fpr.min()
    with np.errstate(invalid="ignore", divide="ignore"):
        return (fpr - fpr.min()) / span, curve.pro[keep]


def reference_aupro_points(
    maps, masks, max_fpr: float = 0.3, max_steps: int = 200
) -> tuple[np.ndarray, np.ndarray]:
    """The (x, y) the official evaluator passes to sklearn `auc`, in threshold order.

    Returns:
      (fpr_normalized (M,) float64: the kept FPRs (< max_fpr) min-max rescaled to [0, 1],
       decreasing; pro (M,) float64 at the same thresholds).
    """
    _validate_options(max_fpr)
    return _reference_points(reference_pro_curve(maps, masks, max_steps), max_fpr)


def _reference_aupro(maps, masks, max_fpr: float, max_steps: int) -> float:
    curve = _reference_pro_curve(maps, masks, max_steps)
    if curve.thresholds.size == 0:
        warnings.warn(
            "pixel_aupro (reference mode): the maps are constant, so the reference evaluator "
            f"has no threshold (it would fail); returning the chance level max_fpr / 2 = "
            f"{max_fpr / 2}, as the exact mode does",
            UserWarning,
            stacklevel=3,
        )
        return max_fpr / 2
    x, y = _reference_points(curve, max_fpr)
    if x.size < 2 or not np.all(np.isfinite(x)):
        return undefined_metric(
            "pixel_aupro (reference mode)",
            f"{x.size} threshold(s) have FPR < {max_fpr} with a FPR span of "
            f"{np.ptp(curve.fpr[curve.fpr < max_fpr]) if x.size else 0.0}; the min-max "
            "rescaling needs two points with distinct FPRs",
            stacklevel=4,
        )
    return _trapezoid_auc(x, y)


# --------------------------------------------------------------------------------------------
# exact mode
# --------------------------------------------------------------------------------------------


def _exact_curve_from(
    values: np.ndarray, labels: np.ndarray, area: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(FPR, PRO) at every distinct value of `values` (descending thresholds, map >= t), with
    (0, 0) prepended. labels: region id per value (0 = normal); area: (R+1,) pixels per label."""
    n_regions = area.size - 1
    order = np.argsort(values)[::-1]
    values = values[order]
    labels = labels[order]
    weight = np.zeros(area.size, np.float64)
    weight[1:] = 1.0 / (area[1:] * n_regions)
    false_pos = np.cumsum(labels == 0, dtype=np.int64)
    pro = np.cumsum(weight[labels])
    last_of_tie = np.flatnonzero(np.append(values[1:] != values[:-1], True))
    fpr = np.concatenate(([0.0], false_pos[last_of_tie] / area[0]))
    pro = np.concatenate(([0.0], pro[last_of_tie]))
    return fpr, pro


def _exact_curve(
    maps: np.ndarray, masks: np.ndarray, max_fpr: float
) -> tuple[np.ndarray, np.ndarray]:
    labels, n_regions = label_regions(masks)
    area = np.bincount(labels.ravel(), minlength=n_regions + 1)
    n_normal = int(area[0])
    # Only thresholds down to the one where FPR first exceeds max_fpr matter: the k-th largest
    # normal value, k = floor(max_fpr * n_normal) + 1. Pixels below it never enter the curve.
    k = min(n_normal, int(np.floor(max_fpr * n_normal)) + 1)
    cut = np.partition(maps[~masks], n_normal - k)[n_normal - k]
    selected = maps >= cut
    fpr, pro = _exact_curve_from(maps[selected], labels[selected], area)
    if fpr[-1] < max_fpr:  # rounding corner case: fall back to the full curve
        fpr, pro = _exact_curve_from(maps.ravel(), labels.ravel(), area)
    end = int(np.searchsorted(fpr, max_fpr, side="right"))  # fpr[:end] <= max_fpr
    x, y = fpr[:end], pro[:end]
    if x[-1] < max_fpr:
        x1, y1 = fpr[end], pro[end]
        y_cut = y[-1] + (y1 - y[-1]) * (max_fpr - x[-1]) / (x1 - x[-1])
        x = np.append(x, max_fpr)
        y = np.append(y, y_cut)
    return x, y


def exact_pro_curve(maps, masks, max_fpr: float = 0.3) -> tuple[np.ndarray, np.ndarray]:
    """The exact-mode PRO curve, cut at FPR = max_fpr with linear interpolation.

    Args:
      maps: (N, H, W) anomaly maps; masks: (N, H, W) in {0, 1} with anomalous and normal pixels.

    Returns:
      (fpr (M,) non-decreasing from 0 to max_fpr, pro (M,)), both float64.
    """
    _validate_options(max_fpr)
    maps, masks = check_maps_masks(maps, masks)
    _require_both_classes(masks, "exact_pro_curve")
    return _exact_curve(maps, masks, max_fpr)


# --------------------------------------------------------------------------------------------
# public metric
# --------------------------------------------------------------------------------------------


def _require_both_classes(masks: np.ndarray, caller: str) -> None:
    n_anomalous = int(np.count_nonzero(masks))
    if n_anomalous in (0, masks.size):
        raise ValueError(
            f"masks: {caller} needs anomalous and normal pixels, got {n_anomalous} anomalous "
            f"of {masks.size}"
        )


def pixel_aupro(
    maps, masks, max_fpr: float = 0.3, mode: str = "reference", max_steps: int = 200
) -> float:
    """Pixel AUPRO of one class.

    Args:
      maps: (N, H, W) anomaly maps (real, finite).
      masks: (N, H, W) GT masks in {0, 1}.
      max_fpr: FPR limit (0.3 in the papers).
      mode: "reference" (the official AnomalyCLIP evaluator, the papers' numbers) or "exact"
        (every threshold, cut and normalised at max_fpr; MVTec / anomalib definition).
      max_steps: number of threshold steps of the reference mode (200 in the reference).

    Returns:
      the AUPRO in [0, 1]; NaN with an `UndefinedMetricWarning` when no pixel is anomalous or
      none is normal (or, reference mode, when fewer than two kept thresholds have distinct
      FPRs). Constant maps give the chance level max_fpr / 2 (with a warning in reference mode,
      whose evaluator cannot handle them).
    """
    _validate_options(max_fpr, mode)
    maps, masks = check_maps_masks(maps, masks)
    n_anomalous = int(np.count_nonzero(masks))
    if n_anomalous == 0:
        return undefined_metric("pixel_aupro", "no anomalous pixel (no GT region)")
    if n_anomalous == masks.size:
        return undefined_metric("pixel_aupro", "no normal pixel (FPR undefined)")
    if mode == "exact":
        x, y = _exact_curve(maps, masks, max_fpr)
        return float(np.trapezoid(y, x) / max_fpr)
    return _reference_aupro(maps, masks, max_fpr, max_steps)
