"""PatchCore scoring (Roth et al. 2022, §3.3): patch scores, the image score (Eq. 6-7) and the anomaly map.

Symbols follow the paper: ``M`` the memory bank (here the coreset), ``m_test`` a test patch feature,
``s*`` the largest nearest-neighbour distance over an image's patches, ``m_test,*`` that patch, ``m*`` its
nearest neighbour in ``M``, ``N_b(m*)`` the ``b`` nearest neighbours of ``m*`` in ``M``.

Exact image scores at HNSW speed
--------------------------------
An anomalous patch is far from every memory feature, which is where HNSW's greedy search is least
reliable; recall over all patches hides that the *maximum* -- the one number that decides the verdict --
can be wrong. But every distance HNSW returns is a true distance to a real memory feature, so it is an
upper bound on the patch's nearest-neighbour distance. :meth:`Scorer.patch_scores` therefore re-scores
patches exactly in descending order of their approximate distance and stops as soon as the next
approximate distance is below the largest exact one found: no remaining patch can exceed it. The image
score is then exactly the exact index's, and so are the map's peaks; typically a handful of the 784
patches are re-scored.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from .bundle import ScoringSpec
from .core_split import CoreSplit
from .index import ExactIndex

#: Patches re-scored by the exact pass's first step; each further step takes twice as many (4, 8, 16, ...),
#: so a pass needs O(log P) exact-index calls at most. Measured on BSData's 10 % bank with HNSW at ef 8
#: (20 test images, load average ~8 on 2 cores): the maximum was proven after 1-2 patches in every image;
#: PrunedExactIndex answered 4 / 8 / 16 near-bank queries in 0.26 / 0.36 / 0.60 ms (25th percentile of 40
#: calls; the blocked product 1.03 / 1.11 / 1.33 ms), so a small first step saves most of the pass
#: (results/exact_levers.json has the index stage per ef with this schedule).
RESCORE_FIRST_CHUNK = 4


@dataclass
class PatchScores:
    """Nearest-neighbour search results for one image's patches."""

    distances: np.ndarray  # [P] float32 distance of each patch to its nearest memory feature
    ids: np.ndarray  # [P] int64 index of that memory feature in M
    n_rescored: int  # patches whose distance was recomputed exactly after the approximate search


@dataclass
class ImageScore:
    score: float  # s, Eq. 7 (or s* when re-weighting is off)
    s_star: float  # s*, Eq. 6: the largest patch score
    patch: int  # position of m_test,* in the flattened grid
    weight: float  # the Eq. 7 factor (1.0 when re-weighting is off)


def normalise(score: np.ndarray | float, threshold: float, scale: float) -> np.ndarray | float:
    """Map a raw score so that the threshold lands on 0.5 (see :class:`~pcedge.runtime.bundle.ThresholdSpec`)."""
    return np.clip(0.5 + 0.5 * (np.asarray(score, dtype=np.float64) - threshold) / scale, 0.0, 1.0)


def eq7_weight(distances_to_support: np.ndarray) -> float:
    """Eq. 7 factor ``1 - exp(||m_test,* - m*||) / sum_{m in N_b(m*)} exp(||m_test,* - m||)``.

    ``distances_to_support`` ``[b]``: distances from m_test,* to N_b(m*), the first being m* itself.
    Computed as a softmax (shifted by the maximum) so large distances do not overflow.
    """
    d = np.asarray(distances_to_support, dtype=np.float64)
    e = np.exp(d - d.max())
    return float(1.0 - e[0] / e.sum())


class Scorer:
    """Scores patch embeddings against the memory bank.

    ``index`` answers the bulk nearest-neighbour queries (HNSW or exact); ``exact`` (an exact index over
    the same bank) re-scores the decisive patches and finds N_b(m*). When ``index`` is itself exact, no
    re-scoring happens.
    """

    def __init__(self, bank: np.ndarray, index, exact, spec: ScoringSpec, rescore: bool = True):
        self.bank = bank  # [N, D] float32
        self.index = index
        self.exact = exact
        self.spec = spec
        self.rescore = rescore and index is not exact and getattr(index, "kind", "") != "exact"

    # ---------------------------------------------------------------- patch scores
    def patch_scores(self, embeddings: np.ndarray, split: CoreSplit | None = None) -> list[PatchScores]:
        """``[B, P, D]`` embeddings -> one :class:`PatchScores` per image (one batched index query).

        ``split`` (optional) spreads an exact index's search over its threads (``ExactIndex.query``);
        HNSW already splits its query rows over hnswlib's own threads.
        """
        B, P, D = embeddings.shape
        flat = np.ascontiguousarray(embeddings.reshape(B * P, D), dtype=np.float32)
        if split is not None and isinstance(self.index, ExactIndex):
            dist, ids = self.index.query(flat, 1, split)
        else:
            dist, ids = self.index.query(flat, 1)
        dist = dist[:, 0].reshape(B, P).astype(np.float32, copy=True)
        ids = ids[:, 0].reshape(B, P).astype(np.int64, copy=True)
        out = []
        for b in range(B):
            n = self._rescore_top(embeddings[b], dist[b], ids[b]) if self.rescore else 0
            out.append(PatchScores(dist[b], ids[b], n))
        return out

    def _rescore_top(self, emb: np.ndarray, dist: np.ndarray, ids: np.ndarray) -> int:
        """Exact pass over the patches that can still hold the maximum (see the module docstring).

        Updates ``dist`` and ``ids`` in place; returns how many patches were re-scored.
        """
        order = np.argsort(-dist, kind="stable")
        best = -np.inf
        done = 0
        step = RESCORE_FIRST_CHUNK
        while done < order.size:
            # Every approximate distance is an upper bound: once the next one is below the best exact
            # distance found, no remaining patch can be the maximum.
            if dist[order[done]] < best:
                break
            chunk = order[done : done + step]
            step *= 2
            d, i = self.exact.query(np.ascontiguousarray(emb[chunk], dtype=np.float32), 1)
            dist[chunk] = d[:, 0]
            ids[chunk] = i[:, 0]
            best = max(best, float(d[:, 0].max()))
            done += chunk.size
        return done

    # ---------------------------------------------------------------- image score
    def image_score(self, embeddings: np.ndarray, patches: PatchScores) -> ImageScore:
        """Eq. 6 (``s* = max over patches``) and, if enabled, the Eq. 7 re-weighting.

        ``embeddings`` ``[P, D]`` of one image.
        """
        p = int(np.argmax(patches.distances))
        s_star = float(patches.distances[p])
        if not self.spec.reweight:
            return ImageScore(s_star, s_star, p, 1.0)
        b = min(self.spec.reweight_b, self.bank.shape[0])
        m_star = self.bank[patches.ids[p]][None, :]  # m*
        _, support = self.exact.query(np.ascontiguousarray(m_star, dtype=np.float32), b)  # N_b(m*) in M
        support = support[0]
        # m* is its own nearest neighbour; put it first whatever the tie order, as Eq. 7's numerator needs.
        support = np.concatenate(([patches.ids[p]], support[support != patches.ids[p]]))[:b]
        m_test = embeddings[p].astype(np.float64)
        d = np.linalg.norm(self.bank[support].astype(np.float64) - m_test, axis=1)
        d[0] = s_star  # the same number as the patch score, not a re-rounded one
        weight = eq7_weight(d)
        return ImageScore(weight * s_star, s_star, p, weight)

    # ---------------------------------------------------------------- anomaly map
    def blur_sigma(self, height: int, width: int) -> float:
        """The paper's sigma = 4 at 224 px, scaled with the input size."""
        return self.spec.blur_sigma * (0.5 * (height + width)) / self.spec.blur_reference_size

    def anomaly_map(self, grid: np.ndarray, height: int, width: int) -> np.ndarray:
        """Patch-score grid ``[h, w]`` -> ``[height, width]`` float32: bilinear upsampling, Gaussian blur.

        As the paper's code (patchcore-inspection ``RescaleSegmentor``): upsample to the network input,
        then blur there (blurring the small grid first would be cheaper but is a different map). Both steps
        together take ~0.15 ms at 224 px on the 2-core CPU; the result is a new array the caller keeps.
        """
        up = cv2.resize(np.asarray(grid, dtype=np.float32), (width, height), interpolation=cv2.INTER_LINEAR)
        sigma = self.blur_sigma(height, width)
        if sigma <= 0:
            return up
        # Kernel 2*round(4 sigma)+1 (OpenCV's choice for float images, as in the reference implementation);
        # reflect-101 borders match torch's "reflect" padding. In place: the upsampled map is ours.
        ksize = 2 * int(round(4 * sigma)) + 1
        return cv2.GaussianBlur(up, (ksize, ksize), sigmaX=sigma, sigmaY=sigma, dst=up,
                                borderType=cv2.BORDER_REFLECT_101)
