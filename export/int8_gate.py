"""The INT8 graph's parity gate: does quantisation move what the detector decides on?

Both graphs (ONNX Runtime CPU) embed the same good images; each image is scored against the bank that did
not see it (the last out-of-fold bank, or the final bank for ``--val`` and check images) with the runtime's
own :class:`Scorer`. Recorded: the embedding cosine, the image-score relative error, and the image AUROC
of both graphs on the ``--data`` category's test split when it has one. The gate is on the median relative
image-score error (the typical shift the calibrated threshold sees; the worst one is recorded beside it).
No torch here.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pcedge.runtime.backends import OrtBackend
from pcedge.runtime.bundle import Int8Report
from pcedge.runtime.scoring import Scorer

#: Default gate: the INT8 graph may move the median good-image score by at most 2 %.
DEFAULT_TOLERANCE = 0.02


@dataclass
class ScoredImages:
    """Network inputs ``images [n, 3, H, W]`` float32 and the scorer whose bank has not seen them."""

    images: np.ndarray
    scorer: Scorer


@dataclass
class GraphScores:
    """Image scores ``[n]`` of both graphs, and the per-patch cosines ``[n * h*w]`` between their embeddings."""

    fp32: np.ndarray
    int8: np.ndarray
    cosines: np.ndarray


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine per patch vector of ``a`` and ``b`` ``[..., D]`` -> ``[N]`` float64."""
    a = a.reshape(-1, a.shape[-1]).astype(np.float64)
    b = b.reshape(-1, b.shape[-1]).astype(np.float64)
    return (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-30)


def relative_errors(int8: np.ndarray, fp32: np.ndarray) -> np.ndarray:
    """``|int8 - fp32| / |fp32|`` per image score ``[n]``."""
    return np.abs(int8 - fp32) / np.maximum(np.abs(fp32), 1e-30)


class GraphPair:
    """The float32 and INT8 graphs as two ONNX Runtime CPU sessions, scoring the same images."""

    def __init__(self, fp32_path: str | os.PathLike[str], int8_path: str | os.PathLike[str],
                 threads: int | None = None, batch: int = 8):
        self.fp32 = OrtBackend(Path(fp32_path), "ort-cpu", threads)
        self.int8 = OrtBackend(Path(int8_path), "ort-cpu", threads, precision="int8")
        self.batch = batch

    def score(self, images: np.ndarray, scorer: Scorer) -> GraphScores:
        """Both graphs' image scores of ``images [n, 3, H, W]`` against ``scorer``'s bank."""
        fp32, int8, cos = [], [], []
        for start in range(0, images.shape[0], self.batch):
            chunk = images[start : start + self.batch]
            e32, e8 = self.fp32(chunk), self.int8(chunk)  # [b, h*w, D] each
            fp32.extend(_image_scores(scorer, e32))
            int8.extend(_image_scores(scorer, e8))
            cos.append(cosines(e32, e8))
        return GraphScores(np.array(fp32), np.array(int8), np.concatenate(cos) if cos else np.zeros(0))

    def close(self) -> None:
        self.fp32.close()
        self.int8.close()


def _image_scores(scorer: Scorer, embeddings: np.ndarray) -> list[float]:
    return [scorer.image_score(embeddings[b], p).score for b, p in enumerate(scorer.patch_scores(embeddings))]


def int8_report(pair: GraphPair, good: list[ScoredImages], description: str, tolerance: float,
                test: tuple[list[np.ndarray], np.ndarray, Scorer] | None = None) -> Int8Report:
    """Score ``good`` image sets with both graphs and apply the gate. ``test``: ``(image batches
    [b, 3, H, W] each, labels [n] bool, scorer)`` of a labelled test split, for the AUROC change."""
    from pcedge.runtime.evaluation.metrics import auroc

    scored = [pair.score(s.images, s.scorer) for s in good if s.images.shape[0]]
    if not scored:
        raise ValueError("the INT8 parity gate needs at least one good image")
    fp32 = np.concatenate([s.fp32 for s in scored])
    int8 = np.concatenate([s.int8 for s in scored])
    cos = np.concatenate([s.cosines for s in scored])
    rel = relative_errors(int8, fp32)
    report = Int8Report(n_images=int(fp32.size), images=description, min_cosine=float(cos.min()),
                        mean_cosine=float(cos.mean()), score_rel_error_max=float(rel.max()),
                        score_rel_error_median=float(np.median(rel)), tolerance=float(tolerance))
    if test is not None:
        batches, labels, scorer = test
        results = [pair.score(batch, scorer) for batch in batches]
        s32 = np.concatenate([r.fp32 for r in results])
        s8 = np.concatenate([r.int8 for r in results])
        report.n_test_images = int(s32.size)
        if labels.any() and (~labels).any():  # AUROC needs both classes
            report.auroc_fp32, report.auroc_int8 = float(auroc(labels, s32)), float(auroc(labels, s8))
            report.auroc_delta = report.auroc_int8 - report.auroc_fp32
    report.shipped = report.score_rel_error_median <= tolerance
    report.reason = (
        f"median image-score change {report.score_rel_error_median:.2%} <= tolerance {tolerance:.2%}"
        if report.shipped else
        f"the INT8 graph moves the median image score by {report.score_rel_error_median:.2%} (max "
        f"{report.score_rel_error_max:.2%}) on {report.n_images} good images, beyond the tolerance {tolerance:.2%} "
        "(--int8-tolerance): this INT8 graph is not shipped"
    )
    return report
