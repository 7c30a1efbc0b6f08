"""The image-score threshold, from good images only.

PatchCore is trained without defects, so the threshold cannot be tuned on them. We score good images the
model has not seen (by default the out-of-fold scores of every training image, ``out_of_fold.py``; else
held-out images) with the runtime's scorer and pick the threshold for a target false-alarm rate (FPR):

- with enough images (``n * fpr >= 1``): the empirical ``1 - fpr`` quantile of the held-out scores
  (the smallest score that at most ``fpr`` of them exceed);
- with fewer (an FPR below ``1 / n`` cannot be read off ``n`` samples): a Gaussian fitted to the scores,
  ``mean + z(1 - fpr) * std``, never below the largest held-out score. This extrapolates; the manifest
  says so (``method``) and ``pcedge info`` prints it, so a user knows to hold out more images.

Whatever the rule, the false-alarm rate a new good image meets is estimated from the same scores: if a new
score and the ``n`` calibration scores are exchangeable and ``m`` of them exceed the threshold, the
probability that the new one does is Beta(m + 1, n - m) distributed (the coverage of an order statistic),
with mean ``(m + 1) / (n + 1)``; the manifest records that and its central 95 % interval. With few images the
interval is wide, which is the honest answer.

The normalised score maps the threshold to 0.5 and the lowest calibration score to 0 (``ThresholdSpec``).
"""

from __future__ import annotations

import math
from statistics import NormalDist

import numpy as np
from scipy.stats import beta

from pcedge.runtime.bundle import ThresholdSpec


def false_alarm_estimate(n: int, n_above: int, confidence: float = 0.95) -> tuple[float, float, float]:
    """``(mean, low, high)`` of the false-alarm rate at a threshold that ``n_above`` of ``n`` good scores exceed.

    The probability mass above the ``(n - n_above)``-th of ``n`` exchangeable scores is Beta(n_above + 1,
    n - n_above); ``low``/``high`` bound its central ``confidence`` interval.
    """
    if not 0 <= n_above < n:
        raise ValueError(f"{n_above} of {n} scores above the threshold: expected 0 <= n_above < n")
    dist = beta(n_above + 1, n - n_above)
    tail = (1.0 - confidence) / 2.0
    return float(dist.mean()), float(dist.ppf(tail)), float(dist.ppf(1.0 - tail))


def calibrate_threshold(nominal_scores: np.ndarray, target_fpr: float, source: str, folds: int = 0,
                        confidence: float = 0.95) -> ThresholdSpec:
    """Good-image scores ``[n]`` the model has not seen -> :class:`ThresholdSpec` for ``target_fpr``.

    ``folds`` (k of an out-of-fold calibration, 0 for held-out images) and ``source`` are recorded.
    """
    scores = np.sort(np.asarray(nominal_scores, dtype=np.float64))
    n = scores.size
    if n == 0:
        raise ValueError("no held-out good images to calibrate the threshold on")
    if not 0.0 < target_fpr < 1.0:
        raise ValueError(f"target FPR {target_fpr} must lie in (0, 1)")
    if n * target_fpr >= 1.0:
        # At most floor(n * fpr) scores may exceed the threshold: take the (n - floor(n*fpr))-th smallest.
        allowed = int(math.floor(n * target_fpr))
        value = float(scores[n - allowed - 1])
        method = f"empirical {1 - target_fpr:.4g} quantile of {n} {_kind(folds)} good-image scores"
    else:
        mean = float(scores.mean())
        std = float(scores.std(ddof=1)) if n > 1 else 0.0
        z = NormalDist().inv_cdf(1.0 - target_fpr)
        value = max(float(scores[-1]), mean + z * std)
        method = (
            f"Gaussian tail (mean + {z:.2f} std) of {n} {_kind(folds)} good-image scores, at least their maximum: "
            f"{n} images cannot resolve FPR {target_fpr:g} (needs >= {math.ceil(1 / target_fpr)})"
        )
    if value <= 0:
        value = float(np.finfo(np.float32).eps)
    # Lowest nominal score -> normalised 0; keep a positive scale even if all scores are equal.
    scale = max(value - float(scores[0]), 1e-6 * value, 1e-12)
    n_above = int(np.count_nonzero(scores > value))
    expected, low, high = false_alarm_estimate(n, n_above, confidence) if n > n_above else (1.0, 0.0, 1.0)
    return ThresholdSpec(
        value=value,
        scale=scale,
        method=method,
        target_fpr=target_fpr,
        n_images=n,
        source=source,
        nominal_scores=[float(s) for s in np.asarray(nominal_scores, dtype=np.float64)],
        expected_fpr=expected,
        fpr_interval=[low, high],
        confidence=confidence,
        n_above=n_above,
        folds=folds,
    )


def _kind(folds: int) -> str:
    return f"{folds}-fold out-of-fold" if folds else "held-out"

