"""The on-device acceptance test after flashing (``pcedge verify``): checks that each PASS or FAIL with figures.

Checks: every file's checksum; the chosen backend's embeddings and image scores against the reference the
exporter stored (torch on the workstation) for a few real images; HNSW recall@1 against exact search; and
the worst relative image-score error of HNSW (with the exact re-scoring pass) against exact search.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np

from .backends import Backend, int8_graph, open_backend
from .bundle import MODEL_FILE, BundleError, open_bundle
from .errors import BackendUnavailable
from .hnsw_format import HnswFormatError, validate_hnsw_file
from .index import ExactIndex, make_index
from .scoring import Scorer
from .thresholds import active_threshold


#: FP32 engines must reproduce the workstation's embeddings to this relative error (max |diff| / max |ref|).
FP32_REL_TOL = 1e-3
#: FP16: cosine per patch vector and relative image-score error.
FP16_MIN_COSINE = 0.999
FP16_SCORE_REL_TOL = 0.01
#: INT8: the mean patch cosine may fall this far below the export's figure (TensorRT's INT8 kernels round
#: differently from ONNX Runtime CPU's); the median image-score change must stay within the manifest's
#: tolerance (``model.int8.tolerance``, the export's gate).
INT8_COSINE_SLACK = 0.01
#: HNSW recall@1 against exact search on the reference images' patches.
MIN_RECALL = 0.99
#: Image scores with HNSW + exact re-scoring against exact search.
HNSW_SCORE_REL_TOL = 0.005


@dataclass
class Check:
    name: str
    passed: bool
    detail: str


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a.reshape(-1, a.shape[-1]).astype(np.float64)
    b = b.reshape(-1, b.shape[-1]).astype(np.float64)
    return (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-30)


def _threshold_check(value, name: str = "threshold", whose: str = "") -> Check:
    """The threshold must be a positive finite number: at 0 every image but a perfect copy is anomalous, and
    NaN makes every verdict "good" (``score > NaN`` is False)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0
    detail = f"{value:.6g} (a positive finite number{whose})" if ok else f"{value!r} is not a positive finite number"
    return Check(name, ok, detail)


def _spread_check(scores: np.ndarray, bank_rows: int, scoring) -> Check:
    """A detector whose reference images all score 0 cannot tell anything apart (a one-row memory bank, or
    Eq. 7 with b = 1: the weight is then 0 for every image)."""
    if scores.size and float(np.max(scores)) > 0.0:
        return Check("score spread", True, f"reference scores {float(np.min(scores)):.4g} to {float(np.max(scores)):.4g}")
    return Check("score spread", False,
                 f"all {scores.size} reference images score 0: the detector cannot tell anything apart "
                 f"(memory bank of {bank_rows} row(s), Eq. 7 b={scoring.reweight_b}); export it again")


def _int8_checks(report, emb: np.ndarray, ref_emb: np.ndarray, scores: np.ndarray, ref_scores: np.ndarray) -> list[Check]:
    """The INT8 graph on this device against the float32 reference: what the export's gate measured.

    ``emb``/``ref_emb`` ``[n, h*w, D]``, ``scores``/``ref_scores`` ``[n]``; ``report``: the manifest's
    :class:`~pcedge.runtime.bundle.Int8Report` (present whenever an INT8 graph ran).
    """
    cos = _cosines(emb, ref_emb)
    rel = np.abs(scores - ref_scores) / np.maximum(np.abs(ref_scores), 1e-30)
    floor = report.mean_cosine - INT8_COSINE_SLACK
    median = float(np.median(rel))
    return [
        Check("embeddings (int8)", float(cos.mean()) >= floor,
              f"mean cosine {cos.mean():.5f} (need >= {floor:.5f}: export measured {report.mean_cosine:.5f}); "
              f"min {cos.min():.5f}"),
        Check("image scores (int8)", median <= report.tolerance,
              f"median rel change {median:.2%} (need <= {report.tolerance:.2%}, the export's gate); max "
              f"{float(rel.max()):.2%} on {len(scores)} images"),
    ]


def run_checks(bundle_path: str, backend_kind: str, threads: int | None, precision: str | None,
               ef: int | None, trust=None, on_open: Callable[[Backend], None] | None = None) -> tuple[list[Check], str]:
    """Every check as a :class:`Check` (PASS/FAIL with figures): ``(checks, backend description)``. A check that
    cannot run is a FAIL naming the file, and the checks after it that depend on it are not run. Never raises
    for a bad bundle. ``on_open`` is called with the backend once it is open (the command prints what ``auto``
    skipped)."""
    checks: list[Check] = []
    try:
        bundle = open_bundle(bundle_path, verify=True, trust=trust)
        signed = f"; signature by the trusted key {trust}" if trust is not None else ""
        checks.append(Check("checksums", True, f"{len(bundle.manifest.files)} files match the manifest{signed}"))
    except BundleError as exc:
        checks.append(Check("checksums", False, str(exc)))
        return checks, ""
    m = bundle.manifest
    try:
        bank = bundle.load_memory_bank()
        exact = ExactIndex(bank)
    except BundleError as exc:
        checks.append(Check("memory bank", False, str(exc)))
        return checks, ""
    except ValueError as exc:  # NaN or infinite rows
        checks.append(Check("memory bank", False, f"{bundle.memory_bank_path}: {exc}"))
        return checks, ""
    try:
        arrays = bundle.load_check_arrays()
    except BundleError as exc:
        checks.append(Check("reference data", False, str(exc)))
        return checks, ""
    if arrays is None:
        checks.append(Check("reference data", False, f"{bundle.root}: the bundle stores no check/ reference data"))
        return checks, ""
    images, ref_emb, ref_scores = arrays
    checks.append(_threshold_check(m.threshold.value))
    exact_scorer = Scorer(bank, exact, exact, m.scoring)

    def image_scores(scorer, emb):
        return np.array([scorer.image_score(emb[b], p).score for b, p in enumerate(scorer.patch_scores(emb))])

    try:
        backend = open_backend(backend_kind, bundle, threads=threads, precision=precision)
    except BackendUnavailable as exc:
        checks.append(Check(f"backend {backend_kind}", False, str(exc)))
        return checks, ""
    except Exception as exc:  # ONNX Runtime's own exception types (InvalidGraph, Fail, ...) derive from Exception
        checks.append(Check(f"backend {backend_kind}", False, f"{bundle.model_path}: cannot be loaded ({type(exc).__name__}: {exc})"))
        return checks, ""
    description = backend.description
    active = active_threshold(bundle, backend)
    if active.graph != MODEL_FILE:  # the graph that runs has its own threshold: it is the one applied
        checks.append(_threshold_check(active.spec.value, "threshold (int8)", f"; {active.note}"))
    if on_open is not None:
        on_open(backend)
    try:
        emb = np.concatenate([backend(images[i : i + 1]) for i in range(images.shape[0])])
    except Exception as exc:  # a graph that loads but cannot run the stored images: FAIL with the reason
        checks.append(Check(f"backend {backend_kind}", False, f"{description}: inference failed on the reference "
                            f"images of {bundle.model_path} ({type(exc).__name__}: {exc})"))
        return checks, description
    finally:
        try:
            backend.close()
        except Exception:  # a failed cleanup must not hide the checks' outcome
            pass
    if emb.shape != ref_emb.shape:
        checks.append(Check("embeddings", False, f"{bundle.model_path}: output {list(emb.shape)}, reference {list(ref_emb.shape)}"))
        return checks, description
    prec = getattr(backend, "precision", "fp32")
    rel = float(np.abs(emb - ref_emb).max() / max(np.abs(ref_emb).max(), 1e-30))
    cos = float(_cosines(emb, ref_emb).min())
    scores = image_scores(exact_scorer, emb)
    score_rel = float(np.max(np.abs(scores - ref_scores) / np.maximum(np.abs(ref_scores), 1e-30)))
    if prec == "int8":
        # The figures of the graph this backend ran (auto names the backend it chose).
        _, report = int8_graph(bundle, getattr(backend, "name", backend_kind))
        checks.extend(_int8_checks(report, emb, ref_emb, scores, ref_scores))
    elif prec == "fp16":
        checks.append(Check("embeddings (fp16)", cos >= FP16_MIN_COSINE,
                            f"min cosine {cos:.5f} (need >= {FP16_MIN_COSINE}); max rel error {rel:.2e}"))
        checks.append(Check("image scores (fp16)", score_rel <= FP16_SCORE_REL_TOL,
                            f"max rel error {score_rel:.2e} (need <= {FP16_SCORE_REL_TOL:g})"))
    else:
        checks.append(Check("embeddings", rel <= FP32_REL_TOL,
                            f"max rel error {rel:.2e} (need <= {FP32_REL_TOL:g}); min cosine {cos:.6f}"))
        checks.append(Check("image scores", score_rel <= FP32_REL_TOL,
                            f"max rel error {score_rel:.2e} (need <= {FP32_REL_TOL:g}) on {len(scores)} images"))
    checks.append(_spread_check(scores, bank.shape[0], m.scoring))

    if ef is not None and ef < 1:
        checks.append(Check("hnsw recall@1", False, f"--ef {ef}: must be >= 1"))
        return checks, description
    index_path = bundle.index_path
    if index_path is not None:
        # The index file is validated structurally before hnswlib sees it; a file that fails is rebuilt
        # from the bank by make_index (so the recall checks below still run), and this check says so.
        try:
            validate_hnsw_file(index_path, bank)
            checks.append(Check("index file", True, f"{index_path.name}: structure valid for the {bank.shape[0]}-row bank"))
        except HnswFormatError as exc:
            checks.append(Check("index file", False, f"{exc}; the runtime rebuilds the graph from {m.memory_bank.file}"))
    hnsw = make_index("hnsw", bank, m.index, index_path, ef=ef, threads=threads)
    flat = emb.reshape(-1, emb.shape[-1]).astype(np.float32)
    _, approx_ids = hnsw.query(flat, 1)
    exact_d, exact_ids = exact.query(flat, 1)
    approx_d = np.linalg.norm(bank[approx_ids[:, 0]] - flat, axis=1)
    # A tie (another memory feature at the same distance) is a correct answer too.
    hits = (approx_ids[:, 0] == exact_ids[:, 0]) | (approx_d <= exact_d[:, 0] * (1 + 1e-5) + 1e-6)
    recall = float(hits.mean())
    checks.append(Check("hnsw recall@1", recall >= MIN_RECALL,
                        f"{recall:.4f} over {flat.shape[0]} patches at ef {hnsw.ef} (need >= {MIN_RECALL})"))
    hnsw_scores = image_scores(Scorer(bank, hnsw, exact, m.scoring, rescore=True), emb)
    worst = float(np.max(np.abs(hnsw_scores - scores) / np.maximum(np.abs(scores), 1e-30)))
    checks.append(Check("hnsw image scores", worst <= HNSW_SCORE_REL_TOL,
                        f"worst rel error vs exact {worst:.2e} (need <= {HNSW_SCORE_REL_TOL:g}) with exact re-scoring"))
    return checks, description
