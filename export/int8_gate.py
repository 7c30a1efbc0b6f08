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
class TestSplit:
    """A labelled test split for the AUROC change: network-input batches ``[b, 3, H, W]``, labels ``[n]``
    (True: anomalous) and the scorer (the final bank)."""

    batches: list[np.ndarray]
    labels: np.ndarray
    scorer: Scorer


@dataclass
class Float32Reference:
    """The float32 graph's side of the gate, computed once and shared by every INT8 graph gated against it:
    the good sets' embeddings (``[n, h*w, D]`` each, for the cosines) and image scores ``[n_good]``, and the
    test split's image scores ``[n_test]`` (None without a test split)."""

    good_embeddings: list[np.ndarray]
    good_scores: np.ndarray
    test_scores: np.ndarray | None


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine per patch vector of ``a`` and ``b`` ``[..., D]`` -> ``[N]`` float64."""
    a = a.reshape(-1, a.shape[-1]).astype(np.float64)
    b = b.reshape(-1, b.shape[-1]).astype(np.float64)
    return (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-30)


def relative_errors(int8: np.ndarray, fp32: np.ndarray) -> np.ndarray:
    """``|int8 - fp32| / |fp32|`` per image score ``[n]``."""
    return np.abs(int8 - fp32) / np.maximum(np.abs(fp32), 1e-30)


def _embed(backend: OrtBackend, images: np.ndarray, batch: int) -> np.ndarray:
    """``images [n, 3, H, W]`` -> embeddings ``[n, h*w, D]``, ``batch`` images per run."""
    return np.concatenate([backend(images[start : start + batch]) for start in range(0, images.shape[0], batch)])


def image_scores(scorer: Scorer, embeddings: np.ndarray) -> list[float]:
    """Image scores of ``embeddings [b, h*w, D]`` against ``scorer``'s bank (Eq. 6-7)."""
    return [scorer.image_score(embeddings[b], p).score for b, p in enumerate(scorer.patch_scores(embeddings))]


def _test_scores(backend: OrtBackend, test: TestSplit) -> np.ndarray:
    """Image scores ``[n_test]`` of the test split (its embeddings are not kept: a large split's would not fit)."""
    return np.array([s for batch in test.batches for s in image_scores(test.scorer, backend(batch))])


def float32_reference(fp32_path: str | os.PathLike[str], good: list[ScoredImages], test: TestSplit | None,
                      threads: int | None = None, batch: int = 8) -> Float32Reference:
    """Run the float32 graph once over the gate's images (``good`` sets, and ``test`` when given)."""
    good = [s for s in good if s.images.shape[0]]  # int8_report skips the same empty sets
    backend = OrtBackend(Path(fp32_path), "ort-cpu", threads)
    try:
        embeddings = [_embed(backend, s.images, batch) for s in good]
        scores = [np.array(image_scores(s.scorer, e)) for s, e in zip(good, embeddings)]
        return Float32Reference(embeddings, np.concatenate(scores) if scores else np.zeros(0),
                                _test_scores(backend, test) if test is not None else None)
    finally:
        backend.close()


def int8_report(int8_path: str | os.PathLike[str], reference: Float32Reference, good: list[ScoredImages],
                test: TestSplit | None, description: str, tolerance: float, threads: int | None = None,
                batch: int = 8) -> Int8Report:
    """Score ``good`` (and ``test``, for the AUROC change) with the INT8 graph at ``int8_path``, compare with
    the float32 ``reference`` computed on the same images, and apply the gate."""
    from pcedge.runtime.evaluation.metrics import auroc

    good = [s for s in good if s.images.shape[0]]  # as float32_reference did
    if not good:
        raise ValueError("the INT8 parity gate needs at least one good image")
    backend = OrtBackend(Path(int8_path), "ort-cpu", threads, precision="int8")
    try:
        embeddings = [_embed(backend, s.images, batch) for s in good]
        int8 = np.concatenate([np.array(image_scores(s.scorer, e)) for s, e in zip(good, embeddings)])
        cos = np.concatenate([cosines(e32, e8) for e32, e8 in zip(reference.good_embeddings, embeddings)])
        test_int8 = _test_scores(backend, test) if test is not None else None
    finally:
        backend.close()
    fp32 = reference.good_scores
    rel = relative_errors(int8, fp32)
    report = Int8Report(n_images=int(fp32.size), images=description, min_cosine=float(cos.min()),
                        mean_cosine=float(cos.mean()), score_rel_error_max=float(rel.max()),
                        score_rel_error_median=float(np.median(rel)), tolerance=float(tolerance))
    if test is not None and reference.test_scores is not None:
        s32, s8, labels = reference.test_scores, test_int8, test.labels
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
