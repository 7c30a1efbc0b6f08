"""Threshold calibration from good images only."""

import numpy as np
import pytest

from pcedge.export.calibration import calibrate_threshold
from pcedge.runtime.scoring import normalise


def test_empirical_quantile_allows_at_most_the_target_rate():
    scores = np.arange(1, 201, dtype=float)  # 200 held-out scores 1..200
    spec = calibrate_threshold(scores, 0.05, "test")
    assert spec.value == 190.0  # 10 of 200 (5 %) exceed it
    assert (scores > spec.value).mean() <= 0.05
    assert "empirical" in spec.method and spec.n_images == 200
    assert normalise(spec.value, spec.value, spec.scale) == pytest.approx(0.5)
    assert normalise(1.0, spec.value, spec.scale) == pytest.approx(0.0)


def test_few_images_fall_back_to_a_gaussian_tail_above_the_maximum():
    scores = np.array([1.0, 1.1, 0.9, 1.05])
    spec = calibrate_threshold(scores, 0.01, "test")
    assert spec.value >= scores.max()
    assert spec.value == pytest.approx(scores.mean() + 2.3263 * scores.std(ddof=1), rel=1e-3)
    assert "cannot resolve" in spec.method


def test_bad_inputs():
    with pytest.raises(ValueError, match="no held-out"):
        calibrate_threshold(np.array([]), 0.01, "x")
    with pytest.raises(ValueError, match="target FPR"):
        calibrate_threshold(np.array([1.0]), 1.5, "x")
