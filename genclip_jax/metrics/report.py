"""Per-class metric rows, their unweighted class mean, and the Markdown / CSV / JSON tables.

The papers report every metric per class and the unweighted mean over classes, x100 with one
decimal. `compute_class_metrics` gives one class's row; `write_tables` writes
`<stem>.md` (x100, 1 decimal), `<stem>.csv` and `<stem>.json` (full precision) atomically.
NaN (an undefined metric) is written "nan" in Markdown/CSV and null in JSON; the class mean of a
metric averages the classes where it is defined, with a warning naming the other classes.
Count columns (`COUNT_COLUMNS`: how many images a row's metrics rest on) are written as integers
and summed in the mean row.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path

from genclip_jax.files import write_atomic
from genclip_jax.metrics.aupro import pixel_aupro
from genclip_jax.metrics.image_level import image_rank_statistics
from genclip_jax.metrics.pixel_level import pixel_rank_statistics
from genclip_jax.metrics.ranking import auroc, average_precision, f1_max

IMAGE_METRICS = ("image_auroc", "image_ap", "image_f1_max")
PIXEL_METRICS = ("pixel_auroc", "pixel_aupro", "pixel_ap", "pixel_f1_max")
METRIC_NAMES = IMAGE_METRICS + PIXEL_METRICS
# Defective images (in the image metrics) and those with a mask (in the pixel metrics): added by
# the evaluator when some defects have no mask.
COUNT_COLUMNS = ("defective", "defective_with_mask")
MEAN_ROW = "mean"

_FROM_STATS = {"auroc": auroc, "ap": average_precision, "f1_max": f1_max}


def compute_class_metrics(
    maps=None,
    masks=None,
    scores=None,
    labels=None,
    metrics: Iterable[str] = METRIC_NAMES,
    aupro_mode: str = "reference",
    max_fpr: float = 0.3,
) -> dict[str, float]:
    """All requested metrics of one class (pixel ranking metrics share one sort).

    Args:
      maps, masks: (N, H, W) anomaly maps and GT masks in {0, 1}; needed for pixel_* metrics.
      scores, labels: (N,) image scores and labels in {0, 1}; needed for image_* metrics.
      metrics: names from `METRIC_NAMES`, in the order wanted.
      aupro_mode, max_fpr: passed to `pixel_aupro`.

    Returns:
      {metric: value} in the order of `metrics`; NaN (with a warning) where undefined.
    """
    metrics = list(metrics)
    unknown = [m for m in metrics if m not in METRIC_NAMES]
    if unknown:
        raise ValueError(f"metrics: expected names from {METRIC_NAMES}, got unknown {unknown}")
    for level, needed in (("pixel", ("maps", "masks")), ("image", ("scores", "labels"))):
        wanted = [m for m in metrics if m.startswith(level + "_")]
        given = {"maps": maps, "masks": masks, "scores": scores, "labels": labels}
        missing = [name for name in needed if given[name] is None]
        if wanted and missing:
            raise ValueError(f"{', '.join(missing)}: required by {wanted}, got None")
    stats = {}
    if any(m in IMAGE_METRICS for m in metrics):
        stats["image"] = image_rank_statistics(scores, labels)
    if any(m in PIXEL_METRICS and m != "pixel_aupro" for m in metrics):
        stats["pixel"] = pixel_rank_statistics(maps, masks)
    row = {}
    for name in metrics:
        if name == "pixel_aupro":
            row[name] = pixel_aupro(maps, masks, max_fpr=max_fpr, mode=aupro_mode)
        else:
            level, kind = name.split("_", 1)
            row[name] = _FROM_STATS[kind](stats[level], name)
    return row


def _columns(rows: Mapping[str, Mapping[str, float]]) -> list[str]:
    if not rows:
        raise ValueError("rows: expected at least one class, got none")
    first_name, first = next(iter(rows.items()))
    for name, row in rows.items():
        if not isinstance(name, str) or not name:
            raise ValueError(f"rows: expected non-empty class names, got {name!r}")
        if name == MEAN_ROW:
            raise ValueError(f"rows: the class name {MEAN_ROW!r} is reserved for the mean row")
        if set(row) != set(first):
            raise ValueError(
                f"rows[{name!r}]: expected the metrics of {first_name!r} {sorted(first)}, "
                f"got {sorted(row)}"
            )
    known = [m for m in METRIC_NAMES if m in first]
    return known + [m for m in first if m not in METRIC_NAMES]


def class_mean(rows: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """Unweighted mean over classes of every metric; NaN values are left out (with a warning
    listing the classes); NaN if no class has a value."""
    mean = {}
    for metric in _columns(rows):
        values = {name: float(row[metric]) for name, row in rows.items()}
        if metric in COUNT_COLUMNS:
            mean[metric] = float(sum(values.values()))
            continue
        defined = [v for v in values.values() if not math.isnan(v)]
        undefined = [name for name, v in values.items() if math.isnan(v)]
        if undefined:
            warnings.warn(
                f"{metric} is NaN for classes {undefined}; the class mean averages the other "
                f"{len(defined)} class(es)",
                UserWarning,
                stacklevel=2,
            )
        mean[metric] = math.fsum(defined) / len(defined) if defined else float("nan")
    return mean


def _with_mean(rows) -> tuple[list[str], dict[str, dict[str, float]]]:
    columns = _columns(rows)
    table = {name: {m: float(row[m]) for m in columns} for name, row in rows.items()}
    table[MEAN_ROW] = class_mean(rows)
    return columns, table


def _cell(column: str, value: float) -> str:
    if math.isnan(value):
        return "nan"
    return f"{int(value)}" if column in COUNT_COLUMNS else f"{100 * value:.1f}"


def _markdown(columns: list[str], table: dict[str, dict[str, float]]) -> str:
    lines = [
        "| class | " + " | ".join(columns) + " |",
        "|---|" + "---:|" * len(columns),
    ]
    for name, row in table.items():
        cells = [_cell(m, v) for m, v in row.items()]
        lines.append(f"| {name.replace('|', chr(92) + '|')} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _csv(columns: list[str], table: dict[str, dict[str, float]]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["class", *columns])
    for name, row in table.items():
        writer.writerow([name, *("nan" if math.isnan(v) else str(int(v)) if m in COUNT_COLUMNS
                                 else repr(v) for m, v in row.items())])
    return buffer.getvalue()


def _json(columns: list[str], table: dict[str, dict[str, float]]) -> str:
    clean = {
        name: {m: None if math.isnan(v) else int(v) if m in COUNT_COLUMNS else v
               for m, v in row.items()}
        for name, row in table.items()
    }
    mean = clean.pop(MEAN_ROW)
    document = {"metrics": columns, "classes": clean, "mean": mean}
    return json.dumps(document, indent=1, allow_nan=False) + "\n"


_RENDERERS = {"md": _markdown, "csv": _csv, "json": _json}


def format_markdown(rows: Mapping[str, Mapping[str, float]], title: str = "") -> str:
    """Markdown table: one row per class plus the mean row, values x100 with one decimal;
    under a `# title` line when given."""
    return (f"# {title}\n\n" if title else "") + _markdown(*_with_mean(rows))


def format_csv(rows: Mapping[str, Mapping[str, float]]) -> str:
    """CSV: header `class,<metrics>`, one row per class plus the mean row, full precision."""
    return _csv(*_with_mean(rows))


def format_json(rows: Mapping[str, Mapping[str, float]]) -> str:
    """JSON `{"metrics": [...], "classes": {class: {metric: value}}, "mean": {...}}`.

    NaN is written as null.
    """
    return _json(*_with_mean(rows))


def write_tables(
    rows: Mapping[str, Mapping[str, float]], out_dir: str | os.PathLike, stem: str = "metrics",
    title: str = "",
) -> dict[str, Path]:
    """Writes `<stem>.md`, `<stem>.csv`, `<stem>.json` into `out_dir` (created if needed).

    Args:
      rows: {class name: {metric: value}}, every class with the same metrics, in report order.
      out_dir: output folder.
      stem: file name without extension.
      title: the Markdown table's heading (none when empty).

    Returns:
      {"md": path, "csv": path, "json": path}.
    """
    # Validate and render everything first: bad rows write nothing.
    columns, table = _with_mean(rows)
    texts = {ext: render(columns, table) for ext, render in _RENDERERS.items()}
    if title:
        texts["md"] = f"# {title}\n\n" + texts["md"]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for ext, text in texts.items():
        paths[ext] = out / f"{stem}.{ext}"
        write_atomic(paths[ext], text)
    return paths
