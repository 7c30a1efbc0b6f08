"""Evaluation metrics for anomaly detection, in numpy only (the device has no scikit-learn).

Image level: :func:`auroc`, :func:`roc_curve`, :func:`f1_max`, :func:`precision_recall_f1`.
Pixel level: :func:`pixel_auroc` and :func:`aupro` (the per-region overlap of Bergmann et al., MVTec AD,
integrated up to a false-positive rate of 0.3 and divided by 0.3, as PatchCore's paper reports it).

All of them are **exact**: no binning. The pixel metrics sort the scores once and count with
``np.searchsorted``, so their memory is a few bytes per pixel (float32 scores, sorted in place) and no
per-pixel index arrays are built; millions of pixels are fine.

Unseen pixels
-------------
An anomaly map in original-image coordinates is NaN where the network never saw the image (see
:meth:`pcedge.runtime.preprocess.Placement.to_original`, e.g. outside the centre crop). Every pixel
metric here treats NaN as the **lowest possible score** (``-inf``): the model cannot flag what it did not
see, so a defect outside the seen region counts as missed at every threshold, and a nominal pixel there
counts as a false positive only once every seen pixel is flagged too. Unseen pixels tie with each other.
Scores of ``+-inf`` are allowed; image-level scores must not be NaN.

Conventions match scikit-learn: AUROC counts a tie between a positive and a negative as one half
(``roc_auc_score``); ROC and PR curves put a threshold at every distinct score, predicting "anomalous"
for ``score >= threshold``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import cv2
import numpy as np

#: Positive scores compared per ``np.searchsorted`` call in :func:`_auroc_counts` (bounds temporary memory).
_SEARCH_CHUNK = 1 << 20


class MetricError(ValueError):
    """Inputs a metric cannot be computed from (one class missing, mismatched shapes, NaN image scores)."""


# --------------------------------------------------------------------------------------------------
# Input checks
# --------------------------------------------------------------------------------------------------


def _labels_scores(labels: Sequence, scores: Sequence) -> tuple[np.ndarray, np.ndarray]:
    """``labels [N]`` (bool or 0/1) and ``scores [N]`` -> bool and float64 arrays; both classes required."""
    y = np.asarray(labels)
    s = np.asarray(scores, dtype=np.float64)
    if y.ndim != 1 or s.ndim != 1 or y.shape != s.shape:
        raise MetricError(f"labels and scores must be 1-D and the same length, got {list(y.shape)} and {list(s.shape)}")
    if y.dtype != bool:
        if not np.isin(y, (0, 1)).all():
            raise MetricError("labels must be bool or 0/1")
        y = y.astype(bool)
    if np.isnan(s).any():
        raise MetricError(f"{int(np.isnan(s).sum())} image scores are NaN")
    if y.all() or not y.any():
        raise MetricError(f"need both classes, got {int(y.sum())} anomalous and {int((~y).sum())} good")
    return y, s


def _lowest_for_nan(scores: np.ndarray) -> np.ndarray:
    """Flat copy of ``scores`` with NaN (not seen) replaced by ``-inf`` (see the module docstring).

    float32 stays float32 (the detector's maps; half the memory); anything else becomes float64, so no
    two distinct input scores are merged by rounding.
    """
    scores = np.asarray(scores)
    dtype = np.float32 if scores.dtype == np.float32 else np.float64
    out = np.array(scores, dtype=dtype, copy=True).ravel()
    out[np.isnan(out)] = -np.inf
    return out


# --------------------------------------------------------------------------------------------------
# Rank statistics shared by image and pixel AUROC
# --------------------------------------------------------------------------------------------------


def _auroc_counts(negatives_sorted: np.ndarray, positives: np.ndarray) -> float:
    """AUROC as the Mann-Whitney statistic: ``P(s_pos > s_neg) + 0.5 P(s_pos = s_neg)``.

    ``negatives_sorted [N]`` ascending, ``positives [P]`` any order. Counts are integers summed in int64
    (twice the statistic, so the half from a tie stays an integer): the result is exact up to the one
    final division, and equals ``sklearn.metrics.roc_auc_score`` (trapezoids over the ROC curve with
    tied scores collapsed into one point give the same number).
    """
    n_neg, n_pos = negatives_sorted.size, positives.size
    twice_u = 0
    for start in range(0, n_pos, _SEARCH_CHUNK):
        chunk = positives[start : start + _SEARCH_CHUNK]
        below = np.searchsorted(negatives_sorted, chunk, side="left")  # negatives strictly lower
        not_above = np.searchsorted(negatives_sorted, chunk, side="right")  # lower or equal
        twice_u += int(below.sum(dtype=np.int64)) + int(not_above.sum(dtype=np.int64))
    return twice_u / (2.0 * n_pos * n_neg)


def auroc(labels: Sequence, scores: Sequence) -> float:
    """Area under the ROC curve of ``scores [N]`` for ``labels [N]`` (True / 1 = anomalous).

    Rank-based, ties counted as one half, identical to ``sklearn.metrics.roc_auc_score``.
    """
    y, s = _labels_scores(labels, scores)
    return _auroc_counts(np.sort(s[~y]), s[y])


def roc_curve(labels: Sequence, scores: Sequence) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(fpr, tpr, thresholds)``, one point per distinct score (descending), preceded by ``(0, 0, inf)``.

    Same as ``sklearn.metrics.roc_curve(..., drop_intermediate=False)``; ``np.trapezoid(tpr, fpr)`` is
    :func:`auroc`.
    """
    y, s = _labels_scores(labels, scores)
    thresholds, tps, fps = _cumulative_counts(y, s)
    fpr = np.concatenate(([0.0], fps / fps[-1]))
    tpr = np.concatenate(([0.0], tps / tps[-1]))
    return fpr, tpr, np.concatenate(([np.inf], thresholds))


def _cumulative_counts(y: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Distinct scores descending, with the true and false positives at ``score >= threshold`` for each."""
    order = np.argsort(-s, kind="stable")
    s_sorted, y_sorted = s[order], y[order]
    # The last position of each run of equal scores: all tied samples cross the threshold together.
    last = np.r_[np.flatnonzero(np.diff(s_sorted)), s_sorted.size - 1]
    tps = np.cumsum(y_sorted)[last].astype(np.float64)
    fps = (last + 1) - tps
    return s_sorted[last], tps, fps


# --------------------------------------------------------------------------------------------------
# F1
# --------------------------------------------------------------------------------------------------


@dataclass
class PrecisionRecallF1:
    """Counts and rates of one set of hard predictions (``anomalous`` is the positive class)."""

    precision: float  # tp / (tp + fp); 0 when nothing is predicted anomalous (sklearn's zero_division=0)
    recall: float  # tp / (tp + fn)
    f1: float  # harmonic mean of the two; 0 when both are 0
    tp: int
    fp: int
    fn: int
    tn: int


def precision_recall_f1(labels: Sequence, predictions: Sequence) -> PrecisionRecallF1:
    """``labels [N]`` and hard ``predictions [N]`` (bool or 0/1) -> precision, recall, F1 and the counts."""
    y = np.asarray(labels).astype(bool)
    p = np.asarray(predictions).astype(bool)
    if y.shape != p.shape or y.ndim != 1:
        raise MetricError(f"labels and predictions must be 1-D and the same length, got {list(y.shape)} and {list(p.shape)}")
    tp, fp = int((y & p).sum()), int((~y & p).sum())
    fn, tn = int((y & ~p).sum()), int((~y & ~p).sum())
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return PrecisionRecallF1(precision, recall, f1, tp, fp, fn, tn)


def f1_max(labels: Sequence, scores: Sequence) -> tuple[float, float]:
    """The best F1 over all thresholds and that threshold: ``(f1, threshold)``, anomalous iff ``score >= threshold``.

    As PatchCore's evaluation computes it from ``sklearn.metrics.precision_recall_curve``: when several
    thresholds reach the same F1, the lowest one is returned (that code's ``argmax`` over ascending thresholds).
    """
    y, s = _labels_scores(labels, scores)
    thresholds, tps, fps = _cumulative_counts(y, s)
    precision = tps / (tps + fps)
    recall = tps / tps[-1]
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(denom), where=denom > 0)
    best = np.flatnonzero(f1 == f1.max())[-1]  # thresholds are descending here: the last is the lowest
    return float(f1[best]), float(thresholds[best])


# --------------------------------------------------------------------------------------------------
# Pixel level
# --------------------------------------------------------------------------------------------------


def _pairs(masks: Iterable[np.ndarray], maps: Iterable[np.ndarray]):
    """Yield ``(index, mask bool [H, W], map float32 [H, W])``, checking shapes pair by pair."""
    masks, maps = list(masks), list(maps)
    if len(masks) != len(maps):
        raise MetricError(f"{len(masks)} masks but {len(maps)} maps")
    if not masks:
        raise MetricError("no masks and maps given")
    for i, (mask, amap) in enumerate(zip(masks, maps)):
        mask, amap = np.asarray(mask), np.asarray(amap)
        if mask.shape != amap.shape or mask.ndim != 2:
            raise MetricError(f"pair {i}: mask {list(mask.shape)} and map {list(amap.shape)} must be the same 2-D shape")
        yield i, mask.astype(bool, copy=False), amap


def pixel_auroc(masks: Iterable[np.ndarray], maps: Iterable[np.ndarray]) -> float:
    """AUROC over every pixel of every image: ``masks`` bool ``[H, W]`` each, ``maps`` float ``[H, W]`` each.

    Exact (equal to ``roc_auc_score`` on the flattened pixels within float rounding); NaN = lowest score.
    Memory: the float32 scores once (negatives sorted in place), no index arrays.
    """
    negatives, positives = [], []
    for _, mask, amap in _pairs(masks, maps):
        scores = _lowest_for_nan(amap)
        flat = mask.ravel()
        negatives.append(scores[~flat])
        positives.append(scores[flat])
    neg = np.concatenate(negatives)
    pos = np.concatenate(positives)
    del negatives, positives
    if neg.size == 0 or pos.size == 0:
        raise MetricError(f"pixel AUROC needs both classes, got {pos.size} defect and {neg.size} good pixels")
    neg.sort()
    return _auroc_counts(neg, pos)


@dataclass
class ProCurve:
    """The per-region-overlap curve up to the FPR limit (points where the FPR changes).

    ``fpr[i]``, ``pro_before[i]`` -> ``fpr[i+1]``, ``pro_at[i+1]`` are the ends of the i-th sloped segment
    (see :func:`pro_curve`); ``thresholds[i]`` is the nominal-pixel score reached at ``fpr[i]``.
    """

    fpr: np.ndarray  # [K] ascending, starts at 0
    pro_before: np.ndarray  # [K] PRO just before the next threshold is crossed (vertical steps included)
    pro_at: np.ndarray  # [K] PRO at this point's threshold
    thresholds: np.ndarray  # [K] the score of each point (+inf for the origin)
    n_regions: int
    n_nominal_pixels: int


def connected_regions(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """``mask bool [H, W]`` -> ``(labels int32 [H, W], n)``: 8-connected ground-truth regions, 0 = background.

    8-connectivity as MVTec AD's evaluation code (``scipy.ndimage.label`` with a 3x3 structure of ones).
    """
    n, labels = cv2.connectedComponents(mask.astype(np.uint8), connectivity=8, ltype=cv2.CV_32S)
    return labels, n - 1


def pro_curve(masks: Iterable[np.ndarray], maps: Iterable[np.ndarray], fpr_limit: float = 0.3) -> ProCurve:
    """Per-region overlap versus false-positive rate (Bergmann et al., MVTec AD), up to ``fpr_limit``.

    At a threshold t every pixel with score >= t is flagged. FPR(t) = flagged nominal pixels / all nominal
    pixels (over all images); PRO(t) = the mean, over every connected ground-truth region of every image,
    of the fraction of that region flagged. MVTec's reference code sorts all pixels once and takes the
    cumulative sums at every distinct score. Only thresholds that are nominal-pixel scores move the FPR;
    between two of them, defect pixels only add vertical steps, which add no area. So the curve is
    evaluated at the distinct nominal scores v (descending) alone, with the PRO just above v
    (``pro_before``, from defect pixels > v) and at v (``pro_at``, >= v); the segment between consecutive
    points is exactly MVTec's sloped segment. Memory: float32 scores plus a float64 weight per defect pixel.
    """
    negatives, positives, weights = [], [], []
    n_regions = 0
    for _, mask, amap in _pairs(masks, maps):
        scores = _lowest_for_nan(amap)
        labels, n = connected_regions(mask)
        flat = labels.ravel()
        negatives.append(scores[flat == 0])
        if n:
            sizes = np.bincount(flat, minlength=n + 1).astype(np.float64)
            inside = flat > 0
            positives.append(scores[inside])
            weights.append(1.0 / sizes[flat[inside]])  # each region sums to 1
            n_regions += n
    if n_regions == 0:
        raise MetricError("PRO needs at least one defect region; every mask is empty")
    neg = np.concatenate(negatives)
    del negatives
    if neg.size == 0:
        raise MetricError("PRO needs nominal pixels; every pixel is a defect")
    pos = np.concatenate(positives)
    order = np.argsort(pos)
    pos = pos[order]
    # cum[j] = weight of the j lowest defect pixels, so the weight at or above a value is cum[-1] - cum[idx].
    cum = np.concatenate(([0.0], np.cumsum(np.concatenate(weights)[order])))
    del positives, weights, order

    # Nominal scores needed: the top ceil(limit * N) + 1 of them reach past the FPR limit.
    n_neg = neg.size
    n_needed = min(n_neg, int(np.ceil(fpr_limit * n_neg)) + 1)
    top = np.sort(np.partition(neg, n_neg - n_needed)[n_neg - n_needed :])[::-1]  # descending
    # Distinct values, descending; flagged nominal pixels at each = position of its last occurrence + 1.
    last = np.r_[np.flatnonzero(np.diff(top)), top.size - 1]
    values = top[last]
    fp = (last + 1).astype(np.float64)
    # Every nominal score above the smallest kept value is kept, but that value itself may have ties
    # left outside the partition: count it over all nominal pixels.
    fp[-1] = float(np.count_nonzero(neg >= values[-1]))
    del neg
    total = cum[-1]
    above = total - cum[np.searchsorted(pos, values, side="right")]  # defect weight with score > v
    at_or_above = total - cum[np.searchsorted(pos, values, side="left")]  # ... with score >= v
    return ProCurve(
        fpr=np.concatenate(([0.0], fp / n_neg)),
        pro_before=np.concatenate((above / n_regions, [np.nan])),
        pro_at=np.concatenate(([0.0], at_or_above / n_regions)),
        thresholds=np.concatenate(([np.inf], values.astype(np.float64))),
        n_regions=n_regions,
        n_nominal_pixels=n_neg,
    )


def aupro(masks: Iterable[np.ndarray], maps: Iterable[np.ndarray], fpr_limit: float = 0.3) -> float:
    """Area under the PRO curve for FPR in [0, ``fpr_limit``], divided by ``fpr_limit`` (so 1.0 is perfect).

    ``masks`` bool ``[H, W]`` and ``maps`` float ``[H, W]`` per image (good images: all-False masks; they
    contribute nominal pixels and no regions). Regions: 8-connected components of each mask. NaN in a
    map = lowest score. The segment that crosses ``fpr_limit`` is interpolated linearly, as MVTec AD's
    ``trapezoid(..., x_max=0.3)`` does. Exact (no binning): equal to MVTec's evaluation code.
    """
    if not 0.0 < fpr_limit <= 1.0:
        raise MetricError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
    curve = pro_curve(masks, maps, fpr_limit)
    x0, x1 = curve.fpr[:-1], curve.fpr[1:]
    y0, y1 = curve.pro_before[:-1], curve.pro_at[1:]
    keep = x0 < fpr_limit
    x0, x1, y0, y1 = x0[keep], x1[keep], y0[keep], y1[keep]
    # Clip the crossing segment at the limit, interpolating its PRO linearly.
    crossing = x1 > fpr_limit
    t = np.where(crossing, (fpr_limit - x0) / np.where(x1 > x0, x1 - x0, 1.0), 1.0)
    y1 = np.where(crossing, y0 + t * (y1 - y0), y1)
    x1 = np.minimum(x1, fpr_limit)
    area = float(np.sum(0.5 * (y0 + y1) * (x1 - x0)))
    return area / fpr_limit
