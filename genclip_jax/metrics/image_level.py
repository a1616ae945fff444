"""Image-level ranking metrics: AUROC, AP, F1-max of image scores against image labels."""

from __future__ import annotations

from genclip_jax.metrics.ranking import (
    RankStatistics,
    auroc,
    average_precision,
    f1_max,
    rank_statistics,
)
from genclip_jax.metrics.validation import check_scores_labels


def image_rank_statistics(scores, labels) -> RankStatistics:
    """`RankStatistics` of images: scores (N,) real, labels (N,) in {0, 1}."""
    scores, labels = check_scores_labels(scores, labels)
    return rank_statistics(scores, labels)


def image_auroc(scores, labels) -> float:
    """Image AUROC = sklearn `roc_auc_score(labels, scores)`.

    Args:
      scores: (N,) image anomaly scores (real, finite).
      labels: (N,) image labels in {0, 1}, 1 = anomalous.

    Returns NaN with an `UndefinedMetricWarning` when only one label is present.
    """
    return auroc(image_rank_statistics(scores, labels), "image_auroc")


def image_ap(scores, labels) -> float:
    """Image AP = sklearn `average_precision_score(labels, scores)`; NaN if no anomalous image.

    scores, labels: (N,).
    """
    return average_precision(image_rank_statistics(scores, labels), "image_ap")


def image_f1_max(scores, labels) -> float:
    """Image F1-max over all distinct thresholds; NaN if no anomalous image.

    scores, labels: (N,).
    """
    return f1_max(image_rank_statistics(scores, labels), "image_f1_max")
