"""Metric tables: per-class rows, unweighted class mean, Markdown / CSV / JSON, atomic writes."""

from __future__ import annotations

import csv
import json
import math
import os
import pathlib

import numpy as np
import pytest

from genclip_jax.metrics import (
    METRIC_NAMES,
    UndefinedMetricWarning,
    class_mean,
    compute_class_metrics,
    format_markdown,
    image_ap,
    image_auroc,
    image_f1_max,
    pixel_ap,
    pixel_aupro,
    pixel_auroc,
    pixel_f1_max,
    write_tables,
)
from genclip_jax.metrics import report as report_module

DATA = pathlib.Path(__file__).parent / "data" / "metrics_seed0.npz"


@pytest.fixture(scope="module")
def class_data():
    with np.load(DATA) as data:
        return {k: data[k] for k in ("maps", "masks", "scores", "labels")}


def test_compute_class_metrics_equals_the_functions(class_data):
    d = class_data
    row = compute_class_metrics(d["maps"], d["masks"], d["scores"], d["labels"])
    assert list(row) == list(METRIC_NAMES)
    expected = {
        "image_auroc": image_auroc(d["scores"], d["labels"]),
        "image_ap": image_ap(d["scores"], d["labels"]),
        "image_f1_max": image_f1_max(d["scores"], d["labels"]),
        "pixel_auroc": pixel_auroc(d["maps"], d["masks"]),
        "pixel_aupro": pixel_aupro(d["maps"], d["masks"]),
        "pixel_ap": pixel_ap(d["maps"], d["masks"]),
        "pixel_f1_max": pixel_f1_max(d["maps"], d["masks"]),
    }
    assert row == expected
    exact = compute_class_metrics(
        d["maps"], d["masks"], metrics=["pixel_aupro"], aupro_mode="exact"
    )
    assert exact == {"pixel_aupro": pixel_aupro(d["maps"], d["masks"], mode="exact")}
    image_only = compute_class_metrics(scores=d["scores"], labels=d["labels"],
                                       metrics=("image_ap", "image_auroc"))
    assert list(image_only) == ["image_ap", "image_auroc"]


def test_compute_class_metrics_errors(class_data):
    d = class_data
    with pytest.raises(ValueError, match=r"metrics: .*unknown \['pixel_iou'\]"):
        compute_class_metrics(d["maps"], d["masks"], metrics=["pixel_iou"])
    with pytest.raises(ValueError, match=r"scores, labels: required by \['image_auroc'\]"):
        compute_class_metrics(d["maps"], d["masks"], metrics=["pixel_auroc", "image_auroc"])
    with pytest.raises(ValueError, match=r"masks: required by"):
        compute_class_metrics(d["maps"], metrics=["pixel_aupro"])


ROWS = {
    "carpet": {"image_auroc": 0.99123, "pixel_auroc": 0.9, "pixel_aupro": 0.81234567891234},
    "bottle": {"image_auroc": 0.5, "pixel_auroc": 0.8, "pixel_aupro": 0.7},
    "zipper": {"image_auroc": 0.25, "pixel_auroc": float("nan"), "pixel_aupro": 0.6},
}


def test_class_mean_unweighted_and_nan_warning():
    with pytest.warns(UserWarning, match=r"pixel_auroc is NaN for classes \['zipper'\]"):
        mean = class_mean(ROWS)
    assert mean["image_auroc"] == pytest.approx((0.99123 + 0.5 + 0.25) / 3, abs=1e-15)
    assert mean["pixel_auroc"] == pytest.approx(0.85, abs=1e-15)
    assert mean["pixel_aupro"] == pytest.approx((0.81234567891234 + 0.7 + 0.6) / 3, abs=1e-15)
    with pytest.warns(UserWarning):
        assert math.isnan(class_mean({"a": {"m": float("nan")}})["m"])


def test_write_tables(tmp_path):
    with pytest.warns(UserWarning, match="zipper"):
        paths = write_tables(ROWS, tmp_path / "out", stem="table")
    assert {k: p.name for k, p in paths.items()} == {
        "md": "table.md", "csv": "table.csv", "json": "table.json"
    }
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "table.csv", "table.json", "table.md"
    ]  # no temporary file left behind

    md = paths["md"].read_text().splitlines()
    assert md[0] == "| class | image_auroc | pixel_auroc | pixel_aupro |"
    assert md[2] == "| carpet | 99.1 | 90.0 | 81.2 |"
    assert md[4] == "| zipper | 25.0 | nan | 60.0 |"
    assert md[5] == "| mean | 58.0 | 85.0 | 70.4 |"

    with paths["csv"].open() as f:
        table = list(csv.reader(f))
    assert table[0] == ["class", "image_auroc", "pixel_auroc", "pixel_aupro"]
    assert [r[0] for r in table[1:]] == ["carpet", "bottle", "zipper", "mean"]
    assert float(table[1][3]) == 0.81234567891234  # full precision
    assert table[3][2] == "nan"

    doc = json.loads(paths["json"].read_text())
    assert doc["metrics"] == ["image_auroc", "pixel_auroc", "pixel_aupro"]
    assert list(doc["classes"]) == ["carpet", "bottle", "zipper"]
    assert doc["classes"]["carpet"]["pixel_aupro"] == 0.81234567891234
    assert doc["classes"]["zipper"]["pixel_auroc"] is None
    assert doc["mean"]["pixel_auroc"] == pytest.approx(0.85, abs=1e-15)


def test_write_tables_from_computed_rows(tmp_path, class_data):
    d = class_data
    rows = {"seed0": compute_class_metrics(d["maps"], d["masks"], d["scores"], d["labels"])}
    with pytest.warns(UndefinedMetricWarning):
        rows["no_defect"] = compute_class_metrics(
            d["maps"], np.zeros_like(d["masks"]), d["scores"], d["labels"]
        )
    with pytest.warns(UserWarning, match=r"NaN for classes \['no_defect'\]"):
        paths = write_tables(rows, tmp_path)
    doc = json.loads(paths["json"].read_text())
    assert doc["mean"]["pixel_aupro"] == rows["seed0"]["pixel_aupro"]
    assert doc["classes"]["no_defect"]["pixel_aupro"] is None
    assert doc["mean"]["image_auroc"] == rows["seed0"]["image_auroc"]


@pytest.mark.parametrize(
    "rows, match",
    [
        ({}, r"rows: expected at least one class"),
        ({"a": {"m": 0.1}, "b": {"n": 0.2}}, r"rows\['b'\]: expected the metrics of 'a'"),
        ({"mean": {"m": 0.1}}, r"rows: the class name 'mean' is reserved"),
        ({"": {"m": 0.1}}, r"rows: expected non-empty class names"),
    ],
)
def test_bad_rows_write_nothing(tmp_path, rows, match):
    with pytest.raises(ValueError, match=match):
        write_tables(rows, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_failed_write_leaves_old_file_and_no_temp(tmp_path, monkeypatch):
    rows = {"a": {"m": 0.5}}
    write_tables(rows, tmp_path)
    before = (tmp_path / "metrics.md").read_text()

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(report_module.os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        write_tables({"a": {"m": 0.25}}, tmp_path)
    assert (tmp_path / "metrics.md").read_text() == before
    assert sorted(os.listdir(tmp_path)) == ["metrics.csv", "metrics.json", "metrics.md"]


def test_markdown_escapes_pipes():
    assert "| a\\|b | 50.0 |" in format_markdown({"a|b": {"m": 0.5}})
