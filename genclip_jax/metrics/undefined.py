"""Undefined metric values: NaN plus a warning that names the metric and the reason."""

from __future__ import annotations

import warnings


class UndefinedMetricWarning(UserWarning):
    """A metric has no defined value for the given inputs (e.g. AUROC without anomalies)."""


def undefined_metric(metric: str, reason: str, stacklevel: int = 3) -> float:
    """Warns `"<metric> is undefined: <reason>; returning NaN"` and returns NaN."""
    warnings.warn(
        f"{metric} is undefined: {reason}; returning NaN",
        UndefinedMetricWarning,
        stacklevel=stacklevel,
    )
    return float("nan")
