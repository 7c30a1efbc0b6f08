"""Can this input size see the user's defects at all? Synthetic defects, scored at export time.

PatchCore sees the frame through a stride-8 patch grid at the network's input size: a defect a few input
pixels wide barely moves one patch feature. Before a user deploys, we paste synthetic defects of a few
sizes (a fraction of the input's shorter side: 1, 2 and 4 % by default, i.e. the same fraction of the
frame's side in stretch mode) into good images the memory bank does not hold, score them exactly as the
device does (Eq. 6-7 against the bank, the calibrated threshold), and record per size the fraction of
images flagged. When the smallest size is flagged in fewer than half of the images, the exporter warns
and suggests a larger ``--size``.

A synthetic defect is a square of per-pixel random colour noise (nothing in a good part looks like it)
with its centre at a seeded random position away from the frame's edge. It is an optimistic stand-in for a
real defect of that size: a low-contrast scratch is harder. A size it does not flag is a size real
defects will not be flagged at either.
"""

from __future__ import annotations

import numpy as np
import torch

from pcedge.runtime.bundle import DetectabilitySpec
from pcedge.runtime.scoring import Scorer

#: Defect sides as fractions of the input's shorter side.
DEFAULT_SIZES = (0.01, 0.02, 0.04)
#: A size counts as seen when at least this fraction of images is flagged with it.
SEEN_FRACTION = 0.5


def paste_noise_square(images: np.ndarray, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """A copy of ``images [n, 3, H, W]`` float32 in [0, 1], each with one random-noise square of side
    ``max(1, round(fraction * min(H, W)))`` pixels, centred at least a quarter of the side from the edge."""
    out = images.copy()
    _, _, H, W = images.shape
    side = max(1, int(round(fraction * min(H, W))))
    for image in out:
        y = int(rng.integers(H // 4, H - H // 4 - side + 1))
        x = int(rng.integers(W // 4, W - W // 4 - side + 1))
        image[:, y : y + side, x : x + side] = rng.random((3, side, side), dtype=np.float32)
    return out


@torch.inference_mode()
def _scores(embedder, scorer: Scorer, images: np.ndarray, batch: int) -> np.ndarray:
    scores = []
    for start in range(0, images.shape[0], batch):
        emb = embedder(torch.from_numpy(images[start : start + batch])).numpy().astype(np.float32)
        scores += [scorer.image_score(emb[b], p).score for b, p in enumerate(scorer.patch_scores(emb))]
    return np.array(scores)


def measure_detectability(embedder, scorer: Scorer, images: np.ndarray, threshold: float, source: str,
                          sizes=DEFAULT_SIZES, seed: int = 0, batch: int = 8) -> DetectabilitySpec:
    """Flag rates of synthetic defects of each size in ``images [n, 3, H, W]`` (good, not in ``scorer``'s bank)."""
    if images.shape[0] == 0:
        raise ValueError("detectability needs at least one good image outside the memory bank")
    _, _, H, W = images.shape
    rng = np.random.default_rng(seed)
    clean = _scores(embedder, scorer, images, batch)
    flagged, pixels = [], []
    for fraction in sizes:
        pasted = paste_noise_square(images, fraction, rng)
        flagged.append(float(np.mean(_scores(embedder, scorer, pasted, batch) > threshold)))
        pixels.append(float(max(1, round(fraction * min(H, W)))))
    seen = [f for f, rate in zip(sizes, flagged) if rate >= SEEN_FRACTION]
    smallest = min(seen) if seen else None
    warning = None
    if smallest is None or smallest > min(sizes):
        # Seen at fraction s means about s * side input pixels suffice: scale the input by s / min(sizes). When
        # no size is seen, even max(sizes) is too small, so that scale is a lower bound.
        factor = (smallest if smallest is not None else max(sizes)) / min(sizes)
        target = int(np.ceil(round(min(H, W) * factor) / 16.0) * 16)
        hint = f"e.g. --size {target}" if smallest is not None else f"at least --size {target}"
        warning = (f"defects of {100 * min(sizes):g} % of the image side ({pixels[0]:.0f} px at {W}x{H}) were flagged in "
                   f"{flagged[0]:.0%} of {images.shape[0]} images: this input size cannot see defects that small; "
                   f"export with a larger --size ({hint}) if your defects are that small")
    return DetectabilitySpec(
        method=f"random-noise squares pasted into {images.shape[0]} good images outside the memory bank ({source}), "
               f"scored against a bank without them at the calibrated threshold; seen = flagged in >= "
               f"{SEEN_FRACTION:.0%}",
        n_images=int(images.shape[0]), side_fractions=[float(f) for f in sizes], pixels=pixels, flagged=flagged,
        flagged_without_defect=float(np.mean(clean > threshold)), smallest_seen=smallest, warning=warning)

