"""Metrics: parity with the official AnomalyCLIP evaluator's fixtures, sklearn cross-checks,
properties, edge cases and error paths.

Fixture files come from `GENCLIP_METRIC_FIXTURES` (paths separated by ':'), by default every
`tests/data/metrics_*.npz` with a `.json` sidecar of the same stem; an `<stem>_anomalib.json`
next to it adds the exact-AUPRO check.
"""

from __future__ import annotations

import json
import os
import pathlib
import warnings

import numpy as np
import pytest
from skimage import measure
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

from genclip_jax.metrics import (
    UndefinedMetricWarning,
    exact_pro_curve,
    image_ap,
    image_auroc,
    image_f1_max,
    pixel_ap,
    pixel_aupro,
    pixel_auroc,
    pixel_f1_max,
    pixel_rank_statistics,
    reference_aupro_points,
    reference_pro_curve,
)
from genclip_jax.metrics import aupro as aupro_module
from genclip_jax.metrics import ranking as ranking_module
from genclip_jax.metrics.ranking import auroc, rank_statistics

DATA_DIR = pathlib.Path(__file__).parent / "data"
TOL = 1e-6


def _fixture_paths() -> list[pathlib.Path]:
    env = os.environ.get("GENCLIP_METRIC_FIXTURES")
    if env:
        return [pathlib.Path(p) for p in env.split(":") if p]
    return sorted(p for p in DATA_DIR.glob("metrics_*.npz") if p.with_suffix(".json").exists())


FIXTURES = _fixture_paths()


@pytest.fixture(scope="module", params=FIXTURES, ids=[p.stem for p in FIXTURES])
def fixture(request):
    path = request.param
    if not path.exists():
        raise FileNotFoundError(f"GENCLIP_METRIC_FIXTURES: {path} does not exist")
    with np.load(path) as data:
        arrays = {key: data[key] for key in data.files}
    anomalib = path.with_name(f"{path.stem}_anomalib.json")
    extra = json.loads(anomalib.read_text())["values"] if anomalib.exists() else None
    return arrays, extra


def test_fixtures_found():
    assert FIXTURES, "no metrics_*.npz fixture with a .json sidecar in tests/data"


# ----------------------------------------------------------------------------------------------
# parity with the reference fixtures
# ----------------------------------------------------------------------------------------------

_SCALAR_METRICS = {
    "ref.pixel_auroc": lambda d: pixel_auroc(d["maps"], d["masks"]),
    "ref.pixel_aupro": lambda d: pixel_aupro(d["maps"], d["masks"], mode="reference"),
    "ref.image_auroc": lambda d: image_auroc(d["scores"], d["labels"]),
    "ref.image_ap": lambda d: image_ap(d["scores"], d["labels"]),
    "nonref.pixel_f1_max": lambda d: pixel_f1_max(d["maps"], d["masks"]),
    "nonref.image_f1_max": lambda d: image_f1_max(d["scores"], d["labels"]),
}


def test_parity_scalars(fixture):
    data, _ = fixture
    scalars = [k for k, v in data.items() if k.startswith(("ref.", "nonref.")) and v.ndim == 0]
    unknown = sorted(set(scalars) - set(_SCALAR_METRICS))
    assert not unknown, f"fixture has reference values this test does not check: {unknown}"
    for key in scalars:
        ours = _SCALAR_METRICS[key](data)
        assert isinstance(ours, float)
        assert abs(ours - float(data[key])) <= TOL, (key, ours, float(data[key]))


def test_parity_aupro_curve(fixture):
    data, _ = fixture
    x, y = reference_aupro_points(data["maps"], data["masks"])
    ref_x, ref_y = data["ref.aupro_curve_fpr_normalized"], data["ref.aupro_curve_pro"]
    assert x.shape == ref_x.shape and y.shape == ref_y.shape
    np.testing.assert_allclose(x, ref_x, rtol=0, atol=1e-9)
    np.testing.assert_allclose(y, ref_y, rtol=0, atol=1e-9)


def test_parity_exact_aupro(fixture):
    data, extra = fixture
    if extra is None or "numpy_exact.pixel_aupro" not in extra:
        pytest.skip("no _anomalib.json with numpy_exact.pixel_aupro next to this fixture")
    ours = pixel_aupro(data["maps"], data["masks"], mode="exact")
    assert abs(ours - extra["numpy_exact.pixel_aupro"]) <= TOL
    assert abs(ours - extra["anomalib.pixel_aupro"]) <= 1e-6


def test_parity_is_sensitive(fixture):
    """The 1e-6 tolerance catches small deviations: perturbed maps, the other AUPRO mode,
    float64 instead of float32 threshold steps, one flipped image label."""
    data, _ = fixture
    maps, masks = data["maps"], data["masks"]
    noisy = maps + np.random.default_rng(0).normal(0, 1e-2, maps.shape).astype(maps.dtype)
    assert abs(pixel_auroc(noisy, masks) - float(data["ref.pixel_auroc"])) > TOL
    assert abs(pixel_aupro(noisy, masks) - float(data["ref.pixel_aupro"])) > TOL
    assert abs(pixel_aupro(maps, masks, mode="exact") - float(data["ref.pixel_aupro"])) > TOL
    x, _ = reference_aupro_points(maps.astype(np.float64), masks)
    assert x.shape != data["ref.aupro_curve_fpr_normalized"].shape or (
        np.abs(x - data["ref.aupro_curve_fpr_normalized"]).max() > 1e-9
    )
    labels = data["labels"].copy()
    labels[0] = 1 - labels[0]
    assert abs(image_auroc(data["scores"], labels) - float(data["ref.image_auroc"])) > TOL


# ----------------------------------------------------------------------------------------------
# cross-checks against sklearn and plain implementations
# ----------------------------------------------------------------------------------------------


def _sklearn_f1_max(labels, scores):
    precision, recall, _ = precision_recall_curve(labels, scores)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(denom), where=denom > 0)
    return float(f1.max())


@pytest.mark.parametrize("seed", range(6))
def test_ranking_metrics_match_sklearn_with_ties(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(5, 400))
    scores = (rng.integers(0, [3, 10, 50, 1000, 10**6, 7][seed], n) / 7).astype(np.float32)
    labels = rng.random(n) < rng.uniform(0.1, 0.9)
    labels[:2] = [True, False]
    assert abs(image_auroc(scores, labels) - roc_auc_score(labels, scores)) < 1e-12
    assert abs(image_ap(scores, labels) - average_precision_score(labels, scores)) < 1e-12
    assert abs(image_f1_max(scores, labels) - _sklearn_f1_max(labels, scores)) < 1e-12


@pytest.mark.parametrize(
    "kind",
    ["normal", "quantized", "tiny_range", "float64", "mostly_positive", "huge_range", "near_max"],
)
def test_bucketed_rank_statistics_equal_sorted(kind):
    rng = np.random.default_rng(7)
    n = 50000
    scores = rng.normal(size=n)
    positive = rng.random(n) < (0.9 if kind == "mostly_positive" else 0.05)
    scores += positive
    if kind == "quantized":
        scores = np.round(scores * 20) / 20
    elif kind == "tiny_range":
        scores = 1.0 + scores * 1e-6
    elif kind == "huge_range":
        scores = np.sinh(scores * 15)
    elif kind == "near_max":  # x - min overflows to inf in float32
        scores = np.clip(scores, -3, 3) * 1e38
    scores = scores.astype(np.float64 if kind == "float64" else np.float32)
    fast = rank_statistics(scores, positive, bucketed=True)
    plain = rank_statistics(scores, positive, bucketed=False)
    for field in ("values", "pos_counts", "neg_below", "neg_equal"):
        np.testing.assert_array_equal(getattr(fast, field), getattr(plain, field))
    assert (fast.n_pos, fast.n_neg) == (plain.n_pos, plain.n_neg)
    assert abs(auroc(fast) - roc_auc_score(positive, scores.astype(np.float64))) < 1e-12


def test_large_pixel_input_takes_the_bucketed_path_with_the_same_result():
    rng = np.random.default_rng(8)
    masks = rng.random((4, 512, 512)) < 0.03
    maps = (rng.normal(size=masks.shape) + masks).astype(np.float32)
    assert maps.size >= ranking_module._BUCKETED_MIN_SIZE
    fast = pixel_rank_statistics(maps, masks)
    plain = rank_statistics(maps, masks, bucketed=False)
    np.testing.assert_array_equal(fast.neg_below, plain.neg_below)
    np.testing.assert_array_equal(fast.neg_equal, plain.neg_equal)
    assert pixel_auroc(maps, masks) == auroc(plain)


def test_pixel_ranking_metrics_match_sklearn():
    rng = np.random.default_rng(1)
    masks = (rng.random((3, 20, 30)) < 0.2).astype(np.uint8)
    maps = (np.round(rng.normal(size=masks.shape) * 4) + 3 * masks).astype(np.float32)
    y, s = masks.ravel(), maps.ravel()
    assert abs(pixel_auroc(maps, masks) - roc_auc_score(y, s)) < 1e-12
    assert abs(pixel_ap(maps, masks) - average_precision_score(y, s)) < 1e-12
    assert abs(pixel_f1_max(maps, masks) - _sklearn_f1_max(y, s)) < 1e-12


def _blob_data(seed, n=4, size=24, float64=False):
    rng = np.random.default_rng(seed)
    masks = np.zeros((n, size, size), np.float32)
    for i in range(1, n, 2):
        for _ in range(3):
            r, c = rng.integers(0, size - 4, 2)
            h, w = rng.integers(1, 6, 2)
            masks[i, r : r + h, c : c + w] = 1
        masks[i, -1, -1] = 1  # a single-pixel region in the corner
        masks[i, -2, -2] = 1  # touching it diagonally: one 8-connected region
    maps = masks * 0.8 + rng.normal(0, 0.5, masks.shape)
    return maps.astype(np.float64 if float64 else np.float32), masks


def _naive_regions(masks):
    return [
        (i, region.coords)
        for i, mask in enumerate(masks)
        for region in measure.regionprops(measure.label(mask))
    ]


def _naive_reference_aupro(maps, masks, max_fpr=0.3, steps=200):
    """Plain per-threshold version of the official `cal_pro_score`."""
    lo, hi = maps.min(), maps.max()
    regions = _naive_regions(masks)
    normal = masks == 0
    fprs, pros = [], []
    for th in np.arange(lo, hi, (hi - lo) / steps):
        pred = maps > th
        pros.append(np.mean([pred[i][c[:, 0], c[:, 1]].mean() for i, c in regions]))
        fprs.append((pred & normal).sum() / normal.sum())
    fprs, pros = np.array(fprs), np.array(pros)
    keep = fprs < max_fpr
    f = (fprs[keep] - fprs[keep].min()) / (fprs[keep].max() - fprs[keep].min())
    return -np.trapezoid(pros[keep], f), f, pros[keep]


def _naive_exact_aupro(maps, masks, max_fpr=0.3):
    """Plain per-threshold exact AUPRO: every distinct value, map >= t, cut + interpolation."""
    regions = _naive_regions(masks)
    normal = masks == 0
    fpr, pro = [0.0], [0.0]
    for t in np.unique(maps)[::-1]:
        pred = maps >= t
        fpr.append((pred & normal).sum() / normal.sum())
        pro.append(np.mean([pred[i][c[:, 0], c[:, 1]].mean() for i, c in regions]))
    fpr, pro = np.array(fpr), np.array(pro)
    end = np.searchsorted(fpr, max_fpr, side="right")
    x, y = list(fpr[:end]), list(pro[:end])
    if x[-1] < max_fpr:
        y.append(np.interp(max_fpr, fpr[end - 1 : end + 1], pro[end - 1 : end + 1]))
        x.append(max_fpr)
    return np.trapezoid(y, x) / max_fpr


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("float64", [False, True])
def test_reference_aupro_matches_naive(seed, float64):
    maps, masks = _blob_data(seed, float64=float64)
    value, x, y = _naive_reference_aupro(maps, masks)
    ours_x, ours_y = reference_aupro_points(maps, masks)
    np.testing.assert_allclose(ours_x, x, rtol=0, atol=1e-12)
    np.testing.assert_allclose(ours_y, y, rtol=0, atol=1e-12)
    assert abs(pixel_aupro(maps, masks) - value) < 1e-12


def test_reference_aupro_values_exactly_on_thresholds():
    """Map values equal to thresholds: prediction is strictly `map > t`."""
    rng = np.random.default_rng(3)
    grid = np.arange(0.0, 1.0, 1 / 200)  # = the reference thresholds for lo=0, hi=1
    _, masks = _blob_data(3, n=4, size=16)
    maps = grid[rng.integers(0, 200, masks.shape)] + 0.2 * masks
    maps = np.minimum(maps, grid[-1])
    maps.flat[0], maps.flat[1] = 0.0, 1.0
    value, x, y = _naive_reference_aupro(maps, masks)
    curve = reference_pro_curve(maps, masks)
    np.testing.assert_array_equal(curve.thresholds, grid)
    ours_x, ours_y = reference_aupro_points(maps, masks)
    np.testing.assert_allclose(ours_x, x, rtol=0, atol=1e-12)
    np.testing.assert_allclose(ours_y, y, rtol=0, atol=1e-12)
    assert abs(pixel_aupro(maps, masks) - value) < 1e-12


def test_reference_curve_image_by_image_equals_the_whole_stack(monkeypatch):
    """The reference mode labels and counts one anomalous image at a time, in small chunks: the
    curve is bit for bit the one of the whole stack labelled and binned at once (the region
    order too: the PRO is a float mean over regions)."""
    monkeypatch.setattr(aupro_module, "_CHUNK_PIXELS", 1000)  # several chunks
    maps, masks = _blob_data(4, n=7, size=40)
    maps = np.round(maps * 8) / 8  # ties, some on thresholds
    masks[5] = 0  # a normal image between anomalous ones
    curve = reference_pro_curve(maps, masks)
    k = curve.thresholds.size
    bins = np.searchsorted(curve.thresholds, maps.astype(np.float64), side="left")  # #t < v
    labels, n_regions = aupro_module.label_regions(masks.astype(bool))
    hist = np.stack([np.bincount(bins[labels == r], minlength=k + 1)
                     for r in range(n_regions + 1)])
    above = np.cumsum(hist[:, ::-1], axis=1)[:, ::-1][:, 1:]
    np.testing.assert_array_equal(curve.fpr, above[0] / hist[0].sum())
    np.testing.assert_array_equal(curve.pro, (above[1:] / hist[1:].sum(1)[:, None]).mean(0))


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("max_fpr", [0.3, 0.05, 1.0])
def test_exact_aupro_matches_naive(seed, max_fpr):
    maps, masks = _blob_data(seed)
    maps = np.round(maps * 8) / 8  # ties
    ours = pixel_aupro(maps, masks, max_fpr=max_fpr, mode="exact")
    assert abs(ours - _naive_exact_aupro(maps, masks, max_fpr)) < 1e-12
    fpr, pro = exact_pro_curve(maps, masks, max_fpr)
    assert fpr[0] == 0 and fpr[-1] == max_fpr and np.all(np.diff(fpr) >= 0)
    assert np.all(np.diff(pro) >= -1e-15)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_threshold_bins_equal_searchsorted(dtype):
    rng = np.random.default_rng(0)
    for lo, hi in [(-1.27, 1.85), (0.0, 1.0), (1000.0, 1000.5), (-3e-5, 2e-5)]:
        values = (lo + (hi - lo) * rng.random(20000)).astype(dtype)
        values[:2] = [lo, hi]
        thresholds = aupro_module._reference_thresholds(values, 200)
        limits = aupro_module._comparable_thresholds(thresholds, values.dtype)
        near = limits.astype(dtype)
        adversarial = np.concatenate(
            [near, np.nextafter(near, dtype(np.inf)), np.nextafter(near, dtype(-np.inf))]
        )
        values = np.clip(np.concatenate([values, adversarial]), values.min(), values.max())
        bins = aupro_module._threshold_bins(values, thresholds, limits)
        expected = np.searchsorted(thresholds, values.astype(np.float64), side="left")
        np.testing.assert_array_equal(bins, expected)


# ----------------------------------------------------------------------------------------------
# properties
# ----------------------------------------------------------------------------------------------


def test_invariant_to_monotone_transform():
    rng = np.random.default_rng(5)
    _, masks = _blob_data(5, n=4, size=20)
    maps = rng.integers(0, 40, masks.shape) / 16.0 + masks  # ties
    warped = np.exp(maps) * 3 + 1  # strictly increasing on this grid
    for fn in (pixel_auroc, pixel_ap, pixel_f1_max):
        assert abs(fn(maps, masks) - fn(warped, masks)) < 1e-12
    exact = [pixel_aupro(m, masks, mode="exact") for m in (maps, warped)]
    assert abs(exact[0] - exact[1]) < 1e-12
    scores, labels = maps.mean(axis=(1, 2)), masks.max(axis=(1, 2))
    for fn in (image_auroc, image_ap, image_f1_max):
        assert abs(fn(scores, labels) - fn(np.exp(scores), labels)) < 1e-12


def test_perfect_and_inverted_rankings():
    _, masks = _blob_data(2)
    maps = masks + 0.01 * np.random.default_rng(0).random(masks.shape)
    assert pixel_auroc(maps, masks) == 1.0
    assert pixel_ap(maps, masks) == 1.0
    assert pixel_f1_max(maps, masks) == 1.0
    assert abs(pixel_aupro(maps, masks, mode="exact") - 1.0) < 1e-12
    assert pixel_auroc(-maps, masks) == 0.0


def test_input_types_do_not_matter():
    maps, masks = _blob_data(4)
    ref = pixel_auroc(maps, masks)
    assert pixel_auroc(maps.tolist(), masks.astype(bool)) == ref
    assert pixel_auroc(maps, masks.astype(np.int64)) == ref
    assert image_auroc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == 0.75
    assert image_auroc(np.array([1, 2, 3]), np.array([False, True, True])) == 1.0


# ----------------------------------------------------------------------------------------------
# edge cases
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fn", [pixel_auroc, pixel_ap, pixel_f1_max, pixel_aupro,
           lambda m, k: pixel_aupro(m, k, mode="exact")],
)
def test_no_anomalous_pixel_is_nan_with_warning(fn):
    maps, masks = _blob_data(0)
    with pytest.warns(UndefinedMetricWarning, match=r"pixel_\w+ is undefined"):
        assert np.isnan(fn(maps, np.zeros_like(masks)))


def test_only_anomalous_samples():
    maps, _ = _blob_data(0)
    with pytest.warns(UndefinedMetricWarning, match="pixel_auroc is undefined"):
        assert np.isnan(pixel_auroc(maps, np.ones_like(maps)))
    with pytest.warns(UndefinedMetricWarning, match="pixel_aupro is undefined"):
        assert np.isnan(pixel_aupro(maps, np.ones_like(maps)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert pixel_ap(maps, np.ones_like(maps)) == 1.0
        assert image_f1_max([0.2, 0.3], [1, 1]) == 1.0
    with pytest.warns(UndefinedMetricWarning, match="image_auroc is undefined"):
        assert np.isnan(image_auroc([0.2, 0.3, 0.1], [0, 0, 0]))
    with pytest.warns(UndefinedMetricWarning, match="image_ap is undefined"):
        assert np.isnan(image_ap([0.2, 0.3, 0.1], [0, 0, 0]))


def test_constant_maps():
    _, masks = _blob_data(1)
    maps = np.full(masks.shape, 0.25, np.float32)
    p = masks.mean()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert pixel_auroc(maps, masks) == 0.5
        assert abs(pixel_ap(maps, masks) - p) < 1e-12
        assert abs(pixel_f1_max(maps, masks) - 2 * p / (1 + p)) < 1e-12
        assert abs(pixel_aupro(maps, masks, mode="exact") - 0.15) < 1e-12
        assert image_auroc(np.zeros(4), [0, 1, 0, 1]) == 0.5
    with pytest.warns(UserWarning, match="constant"):
        assert abs(pixel_aupro(maps, masks) - 0.15) < 1e-12


def test_reference_aupro_degenerate_curve_is_nan():
    """Binary maps: every reference threshold gives the same FPR, so the min-max rescaling is
    0/0 (the reference returns NaN too)."""
    _, masks = _blob_data(1)
    maps = masks.copy()
    maps[0, 0, :5] = 1  # a few false positives
    with pytest.warns(UndefinedMetricWarning, match="reference mode"):
        assert np.isnan(pixel_aupro(maps, masks))
    assert pixel_aupro(maps, masks, mode="exact") > 0.9


# ----------------------------------------------------------------------------------------------
# error paths
# ----------------------------------------------------------------------------------------------

_MAPS, _MASKS = _blob_data(0, n=2, size=8)
_NAN_MAPS = np.where(_MASKS > 0, np.nan, _MAPS)
_N_NAN = int(np.isnan(_NAN_MAPS).sum())


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: pixel_auroc(_MAPS[0], _MASKS[0]), r"maps: expected shape \(N, H, W\), got \(8,"),
        (lambda: pixel_auroc(_MAPS, _MASKS[:1]), r"masks: expected the shape of maps \(2, 8, 8\)"),
        (lambda: pixel_aupro(_MAPS, _MASKS * 0.5), r"masks: expected binary values.*0\.5"),
        (lambda: pixel_ap(_MAPS, _MASKS * 255), r"masks: expected binary.*255"),
        (lambda: pixel_auroc(_NAN_MAPS, _MASKS), rf"maps: expected finite.*got {_N_NAN} NaN"),
        (lambda: pixel_aupro(_MAPS + np.inf, _MASKS), r"maps: expected finite.*128 infinite"),
        (lambda: pixel_auroc(_MAPS.astype(complex), _MASKS), r"maps: expected a real numeric"),
        (lambda: pixel_auroc(np.zeros((0, 4, 4)), np.zeros((0, 4, 4))), r"maps: .*non-empty"),
        (lambda: pixel_aupro(_MAPS, _MASKS, mode="pro"), r"mode: expected one of"),
        (lambda: pixel_aupro(_MAPS, _MASKS, max_fpr=0.0), r"max_fpr: expected a value in"),
        (lambda: image_auroc(np.zeros((2, 2)), np.zeros((2, 2))), r"scores: expected shape \(N,\)"),
        (lambda: image_ap([0.1, 0.2], [0, 1, 1]), r"labels: expected the shape of scores \(2,\)"),
        (lambda: image_f1_max([0.1, 0.2], [0, 2]), r"labels: expected binary.*2"),
        (lambda: image_auroc([0.1, np.nan], [0, 1]), r"scores: expected finite values"),
        (lambda: exact_pro_curve(_MAPS, np.zeros_like(_MASKS)), r"masks: .*anomalous and normal"),
    ],
)
def test_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()
