"""Evaluation metrics (pure numpy): AUROC, AP, F1-max (pixel and image level), AUPRO, tables."""

from genclip_jax.metrics.aupro import (
    AUPRO_MODES,
    ReferenceProCurve,
    exact_pro_curve,
    label_regions,
    pixel_aupro,
    reference_aupro_points,
    reference_pro_curve,
)
from genclip_jax.metrics.image_level import (
    image_ap,
    image_auroc,
    image_f1_max,
    image_rank_statistics,
)
from genclip_jax.metrics.pixel_level import (
    pixel_ap,
    pixel_auroc,
    pixel_f1_max,
    pixel_rank_statistics,
)
from genclip_jax.metrics.ranking import RankStatistics, auroc, average_precision, f1_max
from genclip_jax.metrics.report import (
    COUNT_COLUMNS,
    IMAGE_METRICS,
    MEAN_ROW,
    METRIC_NAMES,
    PIXEL_METRICS,
    class_mean,
    compute_class_metrics,
    format_csv,
    format_json,
    format_markdown,
    write_tables,
)
from genclip_jax.metrics.undefined import UndefinedMetricWarning

__all__ = [
    "AUPRO_MODES",
    "COUNT_COLUMNS",
    "IMAGE_METRICS",
    "MEAN_ROW",
    "METRIC_NAMES",
    "PIXEL_METRICS",
    "RankStatistics",
    "ReferenceProCurve",
    "UndefinedMetricWarning",
    "auroc",
    "average_precision",
    "class_mean",
    "compute_class_metrics",
    "exact_pro_curve",
    "f1_max",
    "format_csv",
    "format_json",
    "format_markdown",
    "image_ap",
    "image_auroc",
    "image_f1_max",
    "image_rank_statistics",
    "label_regions",
    "pixel_ap",
    "pixel_aupro",
    "pixel_auroc",
    "pixel_f1_max",
    "pixel_rank_statistics",
    "reference_aupro_points",
    "reference_pro_curve",
    "write_tables",
]
