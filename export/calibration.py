"""The image-score threshold, from good images only.

PatchCore is trained without defects, so the threshold cannot be tuned on them. We hold out good images,
score them with the runtime's scorer, and pick the threshold for a target nominal false-alarm rate (FPR):

- with enough images (``n * fpr >= 1``): the empirical ``1 - fpr`` quantile of the held-out scores
  (the smallest score that at most ``fpr`` of them exceed);
- with fewer (an FPR below ``1 / n`` cannot be read off ``n`` samples): a Gaussian fitted to the scores,
  ``mean + z(1 - fpr) * std``, never below the largest held-out score. This extrapolates; the manifest
  says so (``method``) and ``pcedge info`` prints it, so a user knows to hold out more images.

The normalised score maps the threshold to 0.5 and the lowest held-out score to 0 (``ThresholdSpec``).
"""

from __future__ import annotations

import math
from statistics import NormalDist

import numpy as np

from pcedge.runtime.bundle import ThresholdSpec


def calibrate_threshold(nominal_scores: np.ndarray, target_fpr: float, source: str) -> ThresholdSpec:
    """Held-out good-image scores ``[n]`` -> :class:`ThresholdSpec` for ``target_fpr``."""
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
        method = f"empirical {1 - target_fpr:.4g} quantile of {n} held-out good images"
    else:
        mean = float(scores.mean())
        std = float(scores.std(ddof=1)) if n > 1 else 0.0
        z = NormalDist().inv_cdf(1.0 - target_fpr)
        value = max(float(scores[-1]), mean + z * std)
        method = (
            f"Gaussian tail (mean + {z:.2f} std) of {n} held-out good images, at least their maximum: "
            f"{n} images cannot resolve FPR {target_fpr:g} (needs >= {math.ceil(1 / target_fpr)})"
        )
    if value <= 0:
        value = float(np.finfo(np.float32).eps)
    # Lowest nominal score -> normalised 0; keep a positive scale even if all scores are equal.
    scale = max(value - float(scores[0]), 1e-6 * value, 1e-12)
    return ThresholdSpec(
        value=value,
        scale=scale,
        method=method,
        target_fpr=target_fpr,
        n_images=n,
        source=source,
        nominal_scores=[float(s) for s in np.asarray(nominal_scores, dtype=np.float64)],
    )
