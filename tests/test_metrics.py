"""pcedge.runtime.evaluation.metrics against hand-computed cases, scikit-learn, and MVTec AD's PRO code (ported below)."""

from __future__ import annotations

from bisect import bisect

import numpy as np
import pytest
from scipy.ndimage import label as scipy_label
from sklearn.metrics import precision_recall_curve, roc_auc_score
from sklearn.metrics import roc_curve as sk_roc_curve

from pcedge.runtime.evaluation.metrics import (
    MetricError,
    aupro,
    auroc,
    connected_regions,
    f1_max,
    pixel_auroc,
    precision_recall_f1,
    pro_curve,
    roc_curve,
)

# --------------------------------------------------------------------------------------------------
# Image AUROC and ROC curve
# --------------------------------------------------------------------------------------------------


def test_auroc_hand_computed():
    # Negatives 0.1, 0.4; positives 0.35, 0.8. Pairs (pos > neg): 0.35>0.1, 0.8>0.1, 0.8>0.4 = 3 of 4.
    assert auroc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.75)
    assert auroc([0, 0, 1, 1], [0.1, 0.2, 0.3, 0.4]) == 1.0
    assert auroc([1, 1, 0, 0], [0.1, 0.2, 0.3, 0.4]) == 0.0


def test_auroc_ties_count_half():
    # One positive tied with one of two negatives: 1 win + 0.5 tie out of 2 pairs.
    assert auroc([0, 0, 1], [0.2, 0.5, 0.5]) == pytest.approx(0.75)
    # Everything tied: a coin flip.
    assert auroc([0, 1, 0, 1], [1.0, 1.0, 1.0, 1.0]) == pytest.approx(0.5)


@pytest.mark.parametrize("seed", range(5))
def test_auroc_matches_sklearn_with_ties(seed):
    rng = np.random.default_rng(seed)
    n = 500
    labels = rng.random(n) < 0.3
    scores = np.round(rng.normal(size=n) + labels * 0.8, 1)  # rounding makes many ties
    assert auroc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)


def test_roc_curve_matches_sklearn():
    rng = np.random.default_rng(7)
    labels = rng.random(300) < 0.4
    scores = np.round(rng.random(300) + labels * 0.3, 2)
    fpr, tpr, thr = roc_curve(labels, scores)
    sk_fpr, sk_tpr, sk_thr = sk_roc_curve(labels, scores, drop_intermediate=False)
    np.testing.assert_allclose(fpr, sk_fpr)
    np.testing.assert_allclose(tpr, sk_tpr)
    np.testing.assert_array_equal(thr[1:], sk_thr[1:])  # sklearn's first threshold is max+1 or inf by version
    assert np.trapezoid(tpr, fpr) == pytest.approx(auroc(labels, scores), abs=1e-12)


def test_image_metrics_refuse_bad_input():
    with pytest.raises(MetricError, match="both classes"):
        auroc([0, 0, 0], [0.1, 0.2, 0.3])
    with pytest.raises(MetricError, match="NaN"):
        auroc([0, 1], [0.1, np.nan])
    with pytest.raises(MetricError, match="same length"):
        auroc([0, 1, 1], [0.1, 0.2])


# --------------------------------------------------------------------------------------------------
# F1
# --------------------------------------------------------------------------------------------------


def test_precision_recall_f1_hand_computed():
    r = precision_recall_f1([1, 1, 1, 0, 0], [1, 1, 0, 1, 0])
    assert (r.tp, r.fp, r.fn, r.tn) == (2, 1, 1, 1)
    assert r.precision == pytest.approx(2 / 3)
    assert r.recall == pytest.approx(2 / 3)
    assert r.f1 == pytest.approx(2 / 3)
    nothing = precision_recall_f1([1, 0], [0, 0])
    assert (nothing.precision, nothing.recall, nothing.f1) == (0.0, 0.0, 0.0)


def test_f1_max_hand_computed():
    # Threshold 0.6 flags {0.6, 0.9}: tp 2, fp 0, fn 1 -> F1 0.8; threshold 0.3 flags all 4 incl. the
    # negative 0.5 and positive 0.3: tp 3, fp 1 -> precision 0.75, recall 1 -> F1 6/7 (the best).
    f1, threshold = f1_max([0, 1, 1, 0, 1], [0.1, 0.3, 0.6, 0.5, 0.9])
    assert f1 == pytest.approx(6 / 7)
    assert threshold == 0.3


@pytest.mark.parametrize("seed", range(5))
def test_f1_max_matches_sklearn(seed):
    rng = np.random.default_rng(100 + seed)
    labels = rng.random(400) < 0.35
    scores = np.round(rng.normal(size=400) + labels, 1)
    precision, recall, thresholds = precision_recall_curve(labels, scores)
    # PatchCore's evaluation: F1 from the PR curve, argmax over the thresholds.
    f1s = np.divide(2 * precision * recall, precision + recall, out=np.zeros_like(precision),
                    where=(precision + recall) > 0)[:-1]
    f1, threshold = f1_max(labels, scores)
    assert f1 == pytest.approx(f1s.max(), abs=1e-12)
    assert threshold == thresholds[np.argmax(f1s)]
    # The returned threshold really gives that F1 with "score >= threshold".
    assert precision_recall_f1(labels, scores >= threshold).f1 == pytest.approx(f1)


# --------------------------------------------------------------------------------------------------
# Pixel AUROC
# --------------------------------------------------------------------------------------------------


def test_pixel_auroc_hand_computed():
    mask = np.array([[0, 0], [0, 1]], dtype=bool)
    amap = np.array([[0.1, 0.2], [0.3, 0.25]], dtype=np.float32)
    # The positive 0.25 beats 0.1 and 0.2, loses to 0.3: 2 of 3.
    assert pixel_auroc([mask], [amap]) == pytest.approx(2 / 3)


@pytest.mark.parametrize("seed", range(3))
def test_pixel_auroc_matches_sklearn(seed):
    rng = np.random.default_rng(seed)
    masks, maps = [], []
    for _ in range(6):
        mask = np.zeros((40, 50), dtype=bool)
        if rng.random() < 0.7:
            y, x = rng.integers(0, 30), rng.integers(0, 40)
            mask[y : y + 8, x : x + 9] = True
        amap = (rng.random((40, 50)) + mask * 0.4).astype(np.float32)
        amap = np.round(amap * 50) / 50  # ties, as in upsampled maps
        masks.append(mask)
        maps.append(amap.astype(np.float32))
    expected = roc_auc_score(np.concatenate([m.ravel() for m in masks]), np.concatenate([a.ravel() for a in maps]))
    assert pixel_auroc(masks, maps) == pytest.approx(expected, abs=1e-9)


def test_pixel_auroc_nan_is_the_lowest_score():
    rng = np.random.default_rng(3)
    mask = np.zeros((30, 30), dtype=bool)
    mask[5:12, 20:28] = True
    amap = rng.random((30, 30)).astype(np.float32) + mask
    amap[:, 24:] = np.nan  # the right edge was not seen: half the defect and some good pixels
    lowest = np.where(np.isnan(amap), amap[np.isfinite(amap)].min() - 1.0, amap)
    assert pixel_auroc([mask], [amap]) == pytest.approx(roc_auc_score(mask.ravel(), lowest.ravel()), abs=1e-12)


def test_pixel_auroc_many_pixels_exact():
    # Millions of pixels with heavy ties: still the exact (sklearn) value.
    rng = np.random.default_rng(11)
    n_images, hw = 40, (256, 256)
    masks = [rng.random(hw) < 0.02 for _ in range(n_images)]
    maps = [(np.floor(rng.random(hw) * 1000) / 1000 + m * 0.05).astype(np.float32) for m in masks]
    expected = roc_auc_score(np.concatenate([m.ravel() for m in masks]), np.concatenate([a.ravel() for a in maps]))
    assert pixel_auroc(masks, maps) == pytest.approx(expected, abs=1e-9)


def test_pixel_metrics_refuse_mismatched_shapes():
    with pytest.raises(MetricError, match="pair 0"):
        pixel_auroc([np.zeros((4, 4), bool)], [np.zeros((4, 5), np.float32)])
    with pytest.raises(MetricError, match="2 masks but 1 maps"):
        aupro([np.zeros((4, 4), bool)] * 2, [np.zeros((4, 4), np.float32)])
    with pytest.raises(MetricError, match="at least one defect region"):
        aupro([np.zeros((4, 4), bool)], [np.zeros((4, 4), np.float32)])


# --------------------------------------------------------------------------------------------------
# AUPRO: analytic cases
# --------------------------------------------------------------------------------------------------


def _square_case(size: int = 20) -> np.ndarray:
    mask = np.zeros((size, size), dtype=bool)
    mask[5:11, 4:12] = True  # 48 pixels, one region
    return mask


def test_aupro_perfect_map_is_one():
    mask = _square_case()
    assert aupro([mask, np.zeros_like(mask)], [mask.astype(np.float32), np.zeros(mask.shape, np.float32)]) == pytest.approx(1.0, abs=1e-12)


def test_aupro_constant_map():
    # One threshold flags everything: the curve is the straight line (0,0)-(1,1); area to 0.3 is 0.045.
    mask = _square_case()
    assert aupro([mask], [np.full(mask.shape, 0.7, np.float32)]) == pytest.approx(0.15)


def test_aupro_half_covered_region():
    # Half the region scores 1, the rest and every good pixel 0: PRO jumps to 0.5 at FPR 0, then rises
    # linearly to 1 at FPR 1: area to 0.3 = 0.3 * 0.5 + 0.5 * 0.3**2 / 2 = 0.1725 -> / 0.3 = 0.575.
    mask = _square_case()
    amap = np.zeros(mask.shape, np.float32)
    amap[5:8, 4:12] = 1.0  # rows 5-7 of the 5-10 region: 24 of 48 pixels
    assert aupro([mask], [amap]) == pytest.approx(0.575)


def test_aupro_region_found_at_known_fpr():
    # Good pixels score 0..N-1 (all distinct); the region scores just below the top 10 % of them, so
    # it is found exactly at FPR 0.1: PRO = 0 before, 1 after -> area (0.3 - 0.1) -> / 0.3 = 2/3.
    mask = np.zeros((50, 50), dtype=bool)
    mask[10:20, 10:20] = True
    n_good = int((~mask).sum())  # 2400
    amap = np.zeros(mask.shape, np.float32)
    amap[~mask] = np.arange(n_good, dtype=np.float32)
    amap[mask] = n_good - 0.1 * n_good - 0.5  # 240 good pixels lie above it
    assert aupro([mask], [amap]) == pytest.approx(2 / 3)


def test_aupro_averages_regions_not_pixels():
    # A big region found perfectly and a small one never found: PRO is 0.5 (regions), not ~0.94 (pixels).
    mask = np.zeros((40, 40), dtype=bool)
    mask[2:18, 2:18] = True  # 256 pixels
    mask[30:34, 30:34] = True  # 16 pixels, not touching the first
    amap = np.zeros(mask.shape, np.float32)
    amap[2:18, 2:18] = 2.0
    amap[30:34, 30:34] = -1.0  # below every good pixel: found only at FPR 1
    # PRO is 0.5 for FPR in (0, 1), reaching 1 only at FPR 1: area 0.3 * 0.5 -> / 0.3 = 0.5.
    assert aupro([mask], [amap]) == pytest.approx(0.5)


def test_regions_are_8_connected():
    # Two blocks touching only at a corner are ONE region with 8-connectivity (MVTec's choice).
    mask = np.zeros((12, 12), dtype=bool)
    mask[1:5, 1:5] = True  # 16 px
    mask[5:7, 5:7] = True  # 4 px, diagonal neighbour of (4, 4)
    _, n = connected_regions(mask)
    assert n == 1
    amap = np.zeros(mask.shape, np.float32)
    amap[1:5, 1:5] = 1.0
    # One region, 16 of 20 pixels found at FPR 0, the rest rises linearly: 0.8 + 0.2 * x;
    # area to 0.3 = 0.24 + 0.1 * 0.09 = 0.249 -> / 0.3 = 0.83 (4-connectivity would give 0.5 + 0.5 x -> 0.575).
    assert aupro([mask], [amap]) == pytest.approx(0.83)


def test_aupro_nan_is_the_lowest_score():
    mask = _square_case()
    amap = mask.astype(np.float32)
    amap[:, 8:] = np.nan  # the right half of the region (and of the image) was not seen
    # Seen half of the region found at FPR 0 (0.5); the unseen rest only together with the unseen good
    # pixels, i.e. at FPR 1 after every seen good pixel (FPR = seen good share). Region: cols 4-11,
    # seen cols 4-7 = 24 of 48 px. Seen good pixels: 20*8 - 24 = 136 of 352 good -> FPR 136/352 at
    # threshold 0, which is past 0.3, PRO still 0.5: area 0.3 * 0.5 -> 0.5.
    assert aupro([mask], [amap]) == pytest.approx(0.5)


# --------------------------------------------------------------------------------------------------
# AUPRO against MVTec AD's evaluation code (generic_util.trapezoid + pro_curve_util.compute_pro),
# ported literally so that the comparison needs no download.
# --------------------------------------------------------------------------------------------------


def _mvtec_trapezoid(x, y, x_max=None):
    x, y = np.array(x), np.array(y)
    correction = 0.0
    if x_max is not None:
        if x_max not in x:
            ins = bisect(x, x_max)
            assert 0 < ins < len(x)
            y_interp = y[ins - 1] + ((y[ins] - y[ins - 1]) * (x_max - x[ins - 1]) / (x[ins] - x[ins - 1]))
            correction = 0.5 * (y_interp + y[ins - 1]) * (x_max - x[ins - 1])
        mask = x <= x_max
        x, y = x[mask], y[mask]
    return np.sum(0.5 * (y[1:] + y[:-1]) * (x[1:] - x[:-1])) + correction


def _mvtec_compute_pro(anomaly_maps, ground_truth_maps):
    structure = np.ones((3, 3), dtype=int)
    num_ok_pixels, num_gt_regions = 0, 0
    shape = (len(anomaly_maps), anomaly_maps[0].shape[0], anomaly_maps[0].shape[1])
    fp_changes = np.zeros(shape, dtype=np.uint32)
    pro_changes = np.zeros(shape, dtype=np.float64)
    for gt_ind, gt_map in enumerate(ground_truth_maps):
        labeled, n_components = scipy_label(gt_map, structure)
        num_gt_regions += n_components
        ok_mask = labeled == 0
        num_ok_pixels += np.sum(ok_mask)
        fp_change = np.zeros_like(gt_map, dtype=fp_changes.dtype)
        fp_change[ok_mask] = 1
        pro_change = np.zeros_like(gt_map, dtype=np.float64)
        for k in range(n_components):
            region_mask = labeled == (k + 1)
            pro_change[region_mask] = 1.0 / np.sum(region_mask)
        fp_changes[gt_ind], pro_changes[gt_ind] = fp_change, pro_change
    scores = np.array(anomaly_maps).ravel()
    order = np.argsort(scores).astype(np.uint32)[::-1]
    scores = scores[order]
    fprs = np.cumsum(fp_changes.ravel()[order]).astype(np.float64) / num_ok_pixels
    pros = np.cumsum(pro_changes.ravel()[order]) / num_gt_regions
    keep = np.append(np.diff(scores) != 0, np.True_)
    fprs, pros = np.concatenate([[0], fprs[keep]]), np.concatenate([[0], pros[keep]])
    return fprs, pros


def _mvtec_aupro(masks, maps, limit=0.3):
    fprs, pros = _mvtec_compute_pro(maps, masks)
    return _mvtec_trapezoid(fprs, pros, x_max=limit) / limit


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("limit", [0.3, 0.05, 1.0])
def test_aupro_matches_mvtec_code(seed, limit):
    rng = np.random.default_rng(seed)
    masks, maps = [], []
    for i in range(5):
        mask = np.zeros((32, 40), dtype=bool)
        if i % 2 == 0:
            for _ in range(rng.integers(1, 4)):  # a few blobs, sometimes merging
                y, x = rng.integers(0, 26), rng.integers(0, 34)
                mask[y : y + rng.integers(1, 7), x : x + rng.integers(1, 7)] = True
        smooth = rng.random((32, 40)) + mask * rng.uniform(0.0, 0.8)
        maps.append((np.round(smooth * 40) / 40).astype(np.float32))  # ties between good and defect pixels
        masks.append(mask)
    assert aupro(masks, maps, fpr_limit=limit) == pytest.approx(_mvtec_aupro(masks, maps, limit), abs=1e-9)


def test_pro_curve_reaches_the_limit_with_ties_at_the_cut():
    # The nominal score at the 30 % cut is shared by many pixels: the curve's last point must count all.
    mask = np.zeros((20, 20), dtype=bool)
    mask[0:4, 0:4] = True
    amap = np.zeros(mask.shape, np.float32)
    amap[~mask] = np.repeat(np.arange(8, dtype=np.float32), 48)[: (~mask).sum()]
    amap[mask] = 3.5
    curve = pro_curve([mask], [amap], 0.3)
    assert curve.fpr[-1] >= 0.3
    assert curve.fpr[-1] == pytest.approx(np.count_nonzero(amap[~mask] >= curve.thresholds[-1]) / (~mask).sum())
    assert aupro([mask], [amap]) == pytest.approx(_mvtec_aupro([mask], [amap]), abs=1e-12)
