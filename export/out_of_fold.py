"""Out-of-fold image scores of the training images: the threshold's evidence without losing any image.

A held-out split costs memory-bank images and leaves few scores to read a tail from (24 of 245 at 10 %).
Instead the training images are split into ``k`` seeded folds; each fold's images are scored (Eq. 6-7,
exact nearest neighbours, the runtime's own :class:`Scorer`) against a memory bank built from the other
``k - 1`` folds with the same coreset ratio and seed rules as the final bank. Every training image then
has one score from a model that never saw it, and the final bank keeps all of them.

The fold models hold ``(k - 1) / k`` of the images, so an out-of-fold score is, if anything, a little
higher than a new good image would score against the full bank: a threshold read off them errs towards
fewer false alarms than estimated.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from pcedge.runtime.bundle import ScoringSpec
from pcedge.runtime.index import ExactIndex
from pcedge.runtime.scoring import Scorer

from .coreset import greedy_coreset, resolve_count

#: Default number of folds: 5 keeps 80 % of the images in every fold's bank at 5 coreset selections.
DEFAULT_FOLDS = 5


@dataclass
class OutOfFold:
    scores: np.ndarray  # [n_images] float64 image scores, each from a bank without that image
    folds: np.ndarray  # [n_images] int fold of each image
    k: int
    last_scorer: Scorer  # the last fold's bank (exact index): a model that has not seen that fold's images
    last_fold: np.ndarray  # [m] image indices of the last fold


def fold_assignment(n_images: int, k: int, seed: int = 0) -> np.ndarray:
    """``[n_images]`` fold index in ``0..k-1``: a seeded permutation dealt round-robin (sizes differ by <= 1)."""
    if k < 2:
        raise ValueError(f"out-of-fold calibration needs at least 2 folds, got {k}")
    if n_images < k:
        raise ValueError(f"{n_images} training images are too few for {k} folds (each fold needs an image); "
                         f"pass fewer folds or --val DIR")
    folds = np.empty(n_images, dtype=np.int64)
    folds[np.random.default_rng(seed).permutation(n_images)] = np.arange(n_images) % k
    return folds


#: ``on_fold(image_ids [m], scorer)``: called once per fold with that fold's image indices and the scorer of
#: the bank built without them, so another graph's embeddings of the same images can be scored against the
#: same fold bank (export/int8_threshold.py) without selecting the fold coresets again.
FoldCallback = Callable[[np.ndarray, Scorer], None]


def out_of_fold_scores(features: np.ndarray, n_images: int, k: int, coreset: float | int, scoring: ScoringSpec,
                       projection_dim: int = 128, seed: int = 0, batch: int = 8,
                       on_fold: FoldCallback | None = None) -> OutOfFold:
    """Score every image of ``features [n_images * h*w, D]`` (image-major rows) against the other folds.

    ``coreset`` is the final bank's ratio or count; a count is scaled to the fold bank's size, so that each
    fold keeps the same fraction of its features as the final bank keeps of all. ``on_fold`` (optional) is
    called after each fold's images are scored (:data:`FoldCallback`).
    """
    if features.ndim != 2 or features.shape[0] % n_images:
        raise ValueError(f"features {list(features.shape)} are not {n_images} images of equal patch count")
    per_image = features.shape[0] // n_images
    by_image = features.reshape(n_images, per_image, features.shape[1])  # [n_images, h*w, D], a view
    folds = fold_assignment(n_images, k, seed)
    scores = np.empty(n_images, dtype=np.float64)
    n_total = features.shape[0]
    for fold in range(k):
        inside = np.flatnonzero(folds == fold)
        others = by_image[folds != fold].reshape(-1, features.shape[1])  # [n_other * h*w, D]
        if isinstance(coreset, (int, np.integer)) and not isinstance(coreset, bool):
            n_select = max(1, min(others.shape[0], round(int(coreset) * others.shape[0] / n_total)))
        else:
            n_select = resolve_count(coreset, others.shape[0])
        if n_select < others.shape[0]:
            chosen = np.sort(greedy_coreset(others, n_select, projection_dim=projection_dim, seed=seed).indices)
            bank = np.ascontiguousarray(others[chosen], dtype=np.float32)
        else:
            bank = np.ascontiguousarray(others, dtype=np.float32)
        del others
        exact = ExactIndex(bank)
        scorer = Scorer(bank, exact, exact, scoring)
        for start in range(0, inside.size, batch):
            ids = inside[start : start + batch]
            emb = np.ascontiguousarray(by_image[ids], dtype=np.float32)  # [b, h*w, D]
            for i, patches in zip(ids, scorer.patch_scores(emb)):
                scores[i] = scorer.image_score(by_image[i], patches).score
        if on_fold is not None:
            on_fold(inside, scorer)
    return OutOfFold(scores=scores, folds=folds, k=k, last_scorer=scorer, last_fold=inside)
