"""Threshold-free ranking metrics (AUROC, AP, F1-max) from sorted positive/negative scores.

All three metrics only need, for every distinct score `v` of a positive sample, how many
positives score `v` and how many negatives score below / exactly at `v` (`RankStatistics`).
They come from sorting the positives and locating the negatives among them: by a plain sort
of the negatives, or, for many samples (pixels), by monotone value buckets where only the
negatives sharing a bucket with a positive are searched among the positives (no argsort in
either case; the bucketed path copies nothing of the input's size).

The values equal scikit-learn's on the same inputs, ties included:
* AUROC = `roc_auc_score`: the trapezoid over distinct thresholds equals the Mann-Whitney
  statistic with ties counted 1/2, computed here exactly in integers.
* AP = `average_precision_score`: sum over distinct thresholds of (R_k - R_{k-1}) P_k; recall only
  moves at thresholds equal to a positive score.
* F1-max = max over `precision_recall_curve` of 2PR/(P+R) = 2TP/(TP+FP+#pos); at a fixed TP the
  F1 is largest at the smallest FP, i.e. at a threshold equal to a positive score.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from genclip_jax.metrics.undefined import undefined_metric


@dataclass(frozen=True)
class RankStatistics:
    """Sufficient statistics of a binary ranking problem.

    Attributes:
      values: (U,) distinct scores of the positive samples, ascending.
      pos_counts: (U,) int64, number of positives scoring `values[i]`.
      neg_below: (U,) int64, number of negatives scoring strictly below `values[i]`.
      neg_equal: (U,) int64, number of negatives scoring exactly `values[i]`.
      n_pos, n_neg: numbers of positive and negative samples.
    """

    values: np.ndarray
    pos_counts: np.ndarray
    neg_below: np.ndarray
    neg_equal: np.ndarray
    n_pos: int
    n_neg: int

    @property
    def true_positives(self) -> np.ndarray:
        """(U,) int64: positives scoring >= values[i]."""
        return self.n_pos - np.cumsum(self.pos_counts) + self.pos_counts

    @property
    def false_positives(self) -> np.ndarray:
        """(U,) int64: negatives scoring >= values[i]."""
        return self.n_neg - self.neg_below


# From this many samples on, negatives are located by value buckets instead of a full sort.
_BUCKETED_MIN_SIZE = 1 << 20
_MAX_BUCKETS = 1 << 22
_CHUNK = 1 << 18


def _distinct(sorted_values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distinct values of a sorted 1-D array and their counts (int64)."""
    if sorted_values.size == 0:
        return sorted_values, np.zeros(0, np.int64)
    starts = np.flatnonzero(np.concatenate(([True], sorted_values[1:] != sorted_values[:-1])))
    counts = np.diff(np.append(starts, sorted_values.size)).astype(np.int64)
    return sorted_values[starts], counts


def _negatives_by_sort(
    flat: np.ndarray, positive: np.ndarray, values: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(#negatives < v, #negatives == v) for each v of `values`, by sorting the negatives."""
    negatives = flat[~positive]  # a copy: sorted in place
    negatives.sort()
    left = np.searchsorted(negatives, values, side="left")
    right = np.searchsorted(negatives, values, side="right")
    return left.astype(np.int64), (right - left).astype(np.int64)


def _negatives_by_buckets(
    flat: np.ndarray, positive: np.ndarray, values: np.ndarray, n_buckets: int
) -> tuple[np.ndarray, np.ndarray]:
    """Same result as `_negatives_by_sort`, without sorting most negatives.

    A monotone bucket index b(x) = floor((x - min) * scale) splits the value range into
    `n_buckets` buckets. A negative in a bucket without any positive compares to every positive
    v exactly as its bucket does (x < v <=> b(x) < b(v)), so counting it per segment between
    consecutive positive-holding buckets is enough; only the negatives sharing a bucket with some
    positive (typically a few percent) are located among the positives by binary search, chunk by
    chunk, and counted: nothing of the input's size is copied or held (cache-sized chunks with
    reused buffers), so the metrics of a class need little beyond its maps.
    """
    lo, hi = float(flat.min()), float(flat.max())
    scale = (n_buckets - 1) / (hi - lo) if hi > lo else float("inf")
    if not np.isfinite(scale) or not np.isfinite(flat.dtype.type(scale)):
        return _negatives_by_sort(flat, positive, values)
    offset, factor = flat.dtype.type(lo), flat.dtype.type(scale)

    def bucket_of(x: np.ndarray, work: np.ndarray, out: np.ndarray) -> np.ndarray:
        with np.errstate(over="ignore"):  # overflow to +inf stays monotone (clipped below)
            np.subtract(x, offset, out=work)  # >= 0; rounding keeps the map monotone
            work *= factor
        np.clip(work, 0, n_buckets - 1, out=work)
        np.copyto(out, work, casting="unsafe")  # truncation = floor for values >= 0
        return out

    value_buckets = bucket_of(values, np.empty_like(values), np.empty(values.size, np.intp))
    shared = np.zeros(n_buckets, dtype=bool)  # buckets holding at least one positive
    shared[value_buckets] = True
    # Segment of a bucket = number of positive-holding buckets at or below it. A negative in a
    # bucket without positives lies below v iff its segment < segment(bucket of v).
    segment = np.cumsum(shared, dtype=np.int32)
    n_segments = int(segment[-1]) + 1
    value_segments = segment[value_buckets]
    colliding_mark = n_segments  # marks the buckets holding positives
    segment[shared] = colliding_mark
    counts = np.zeros(n_segments + 1, np.int64)
    # Colliding negatives x, by the index of the first value above x (x < values[j] from there
    # on) and by the index of a value equal to x.
    first_above = np.zeros(values.size + 1, np.int64)
    equal = np.zeros(values.size, np.int64)
    chunk = min(_CHUNK, flat.size)
    work = np.empty(chunk, flat.dtype)
    buckets = np.empty(chunk, np.intp)
    segments = np.empty(chunk, np.int32)
    for start in range(0, flat.size, chunk):
        x = flat[start : start + chunk]
        m = x.size
        seg = np.take(segment, bucket_of(x, work[:m], buckets[:m]), out=segments[:m], mode="clip")
        counts += np.bincount(seg, minlength=n_segments + 1)
        colliding = seg == colliding_mark
        colliding &= ~positive[start : start + chunk]
        negatives = x[colliding]  # the few that need an exact comparison
        negatives.sort()  # sorted keys: a faster search
        at = np.searchsorted(values, negatives, side="left")  # first value >= x
        tie = values.take(at, mode="clip") == negatives
        equal += np.bincount(at[tie], minlength=values.size)
        at += tie  # first value > x
        first_above += np.bincount(at, minlength=values.size + 1)
    below_segment = np.cumsum(counts[:n_segments]) - counts[:n_segments]
    below = below_segment[value_segments] + np.cumsum(first_above[:-1])
    return below.astype(np.int64), equal


def rank_statistics(
    scores: np.ndarray, positive: np.ndarray, bucketed: bool | None = None
) -> RankStatistics:
    """Builds `RankStatistics` from scores and boolean labels of the same shape (any shape).

    Args:
      scores: real, finite scores (validated by the caller); float32 stays float32.
      positive: bool array, True for positive (anomalous) samples.
      bucketed: locate the negatives with value buckets (fast for many samples, see
        `_negatives_by_buckets`) or by a plain sort; None picks by size. Same result either way.
    """
    flat = scores.reshape(-1)
    positive = positive.reshape(-1)
    pos = flat[positive]  # boolean indexing copies: the in-place sort is safe
    pos.sort()
    values, pos_counts = _distinct(pos)
    if bucketed is None:
        bucketed = flat.size >= _BUCKETED_MIN_SIZE
    if values.size == 0:  # no positive: nothing to locate the negatives against
        neg_below = neg_equal = np.zeros(0, np.int64)
    elif bucketed:
        n_buckets = int(min(_MAX_BUCKETS, max(1024, 1 << int(flat.size // 4).bit_length())))
        neg_below, neg_equal = _negatives_by_buckets(flat, positive, values, n_buckets)
    else:
        neg_below, neg_equal = _negatives_by_sort(flat, positive, values)
    return RankStatistics(
        values=values,
        pos_counts=pos_counts,
        neg_below=neg_below,
        neg_equal=neg_equal,
        n_pos=int(pos.size),
        n_neg=int(flat.size - pos.size),
    )


def auroc(stats: RankStatistics, metric: str = "auroc") -> float:
    """Area under the ROC curve (= sklearn `roc_auc_score`); NaN + warning if one class is absent.

    `metric` names the metric in the warning.
    """
    if stats.n_pos == 0 or stats.n_neg == 0:
        missing = "positive (anomalous)" if stats.n_pos == 0 else "negative (normal)"
        return undefined_metric(metric, f"no {missing} sample")
    # 2U = sum_v count_v * (2 * #neg below v + #neg equal to v), exact in int64.
    twice_u = 2 * int(np.dot(stats.pos_counts, stats.neg_below)) + int(
        np.dot(stats.pos_counts, stats.neg_equal)
    )
    return twice_u / (2 * stats.n_pos * stats.n_neg)


def average_precision(stats: RankStatistics, metric: str = "ap") -> float:
    """Step-wise average precision (= sklearn `average_precision_score`); NaN if no positive."""
    if stats.n_pos == 0:
        return undefined_metric(metric, "no positive (anomalous) sample")
    tp = stats.true_positives
    precision = tp / (tp + stats.false_positives)
    return float(np.dot(stats.pos_counts, precision) / stats.n_pos)


def f1_max(stats: RankStatistics, metric: str = "f1_max") -> float:
    """Max over all distinct thresholds of 2PR/(P+R) (0 where P+R=0); NaN if no positive."""
    if stats.n_pos == 0:
        return undefined_metric(metric, "no positive (anomalous) sample")
    tp = stats.true_positives
    f1 = 2.0 * tp / (tp + stats.false_positives + stats.n_pos)
    return float(f1.max())
