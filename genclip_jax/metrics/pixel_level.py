"""Pixel-level ranking metrics over all pixels of a class: AUROC, AP, F1-max.

The AUPRO, the other pixel-level metric, lives in `genclip_jax.metrics.aupro`.
"""

from __future__ import annotations

from genclip_jax.metrics.ranking import (
    RankStatistics,
    auroc,
    average_precision,
    f1_max,
    rank_statistics,
)
from genclip_jax.metrics.validation import check_maps_masks


def pixel_rank_statistics(maps, masks) -> RankStatistics:
    """`RankStatistics` of all pixels: maps (N, H, W) real, masks (N, H, W) in {0, 1}.

    Compute it once to derive several pixel metrics (as `compute_class_metrics` does).
    """
    maps, masks = check_maps_masks(maps, masks)
    return rank_statistics(maps, masks)


def pixel_auroc(maps, masks) -> float:
    """Pixel AUROC = sklearn `roc_auc_score(masks.ravel(), maps.ravel())`.

    Args:
      maps: (N, H, W) anomaly maps (real, finite).
      masks: (N, H, W) GT masks in {0, 1}.

    Returns NaN with an `UndefinedMetricWarning` when no pixel (or every pixel) is anomalous.
    """
    return auroc(pixel_rank_statistics(maps, masks), "pixel_auroc")


def pixel_ap(maps, masks) -> float:
    """Pixel AP = sklearn `average_precision_score(masks.ravel(), maps.ravel())`.

    maps, masks: (N, H, W). NaN with a warning when no pixel is anomalous.
    """
    return average_precision(pixel_rank_statistics(maps, masks), "pixel_ap")


def pixel_f1_max(maps, masks) -> float:
    """Pixel F1-max: max over all distinct thresholds of 2PR/(P+R).

    maps, masks: (N, H, W). NaN with a warning when no pixel is anomalous.
    """
    return f1_max(pixel_rank_statistics(maps, masks), "pixel_f1_max")
