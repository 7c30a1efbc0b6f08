"""The on-device acceptance test after flashing (``pcedge verify``): checks that each PASS or FAIL with figures.

Checks: every file's checksum; the chosen backend's embeddings and image scores against the reference the
exporter stored (torch on the workstation) for a few real images; HNSW recall@1 against exact search; and
the worst relative image-score error of HNSW (with the exact re-scoring pass) against exact search.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .backends import open_backend
from .bundle import BundleError, open_bundle
from .errors import BackendUnavailable
from .index import ExactIndex, make_index
from .scoring import Scorer


#: FP32 engines must reproduce the workstation's embeddings to this relative error (max |diff| / max |ref|).
FP32_REL_TOL = 1e-3
#: FP16: cosine per patch vector and relative image-score error.
FP16_MIN_COSINE = 0.999
FP16_SCORE_REL_TOL = 0.01
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


def _threshold_check(value) -> Check:
    """The threshold must be a positive finite number: at 0 every image but a perfect copy is anomalous, and
    NaN makes every verdict "good" (``score > NaN`` is False)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0
    detail = f"{value:.6g} (a positive finite number)" if ok else f"{value!r} is not a positive finite number"
    return Check("threshold", ok, detail)


def _spread_check(scores: np.ndarray, bank_rows: int, scoring) -> Check:
    """A detector whose reference images all score 0 cannot tell anything apart (a one-row memory bank, or
    Eq. 7 with b = 1: the weight is then 0 for every image)."""
    if scores.size and float(np.max(scores)) > 0.0:
        return Check("score spread", True, f"reference scores {float(np.min(scores)):.4g} to {float(np.max(scores)):.4g}")
    return Check("score spread", False,
                 f"all {scores.size} reference images score 0: the detector cannot tell anything apart "
                 f"(memory bank of {bank_rows} row(s), Eq. 7 b={scoring.reweight_b}); export it again")


def run_checks(bundle_path: str, backend_kind: str, threads: int | None, precision: str | None,
               ef: int | None) -> tuple[list[Check], str]:

    checks: list[Check] = []
    try:
        bundle = open_bundle(bundle_path, verify=True)
        checks.append(Check("checksums", True, f"{len(bundle.manifest.files)} files match the manifest"))
    except BundleError as exc:
        checks.append(Check("checksums", False, str(exc)))
        return checks, ""
    m = bundle.manifest
    arrays = bundle.load_check_arrays()
    if arrays is None:
        checks.append(Check("reference data", False, f"{bundle.root}: the bundle stores no check/ reference data"))
        return checks, ""
    images, ref_emb, ref_scores = arrays
    checks.append(_threshold_check(m.threshold.value))
    bank = bundle.load_memory_bank()
    exact = ExactIndex(bank)
    exact_scorer = Scorer(bank, exact, exact, m.scoring)

    def image_scores(scorer, emb):
        return np.array([scorer.image_score(emb[b], p).score for b, p in enumerate(scorer.patch_scores(emb))])

    try:
        backend = open_backend(backend_kind, bundle, threads=threads, precision=precision)
    except BackendUnavailable as exc:
        checks.append(Check(f"backend {backend_kind}", False, str(exc)))
        return checks, ""
    description = backend.description
    try:
        emb = np.concatenate([backend(images[i : i + 1]) for i in range(images.shape[0])])
    finally:
        backend.close()
    prec = getattr(backend, "precision", "fp16" if backend_kind == "ort-trt" and precision != "fp32" else "fp32")
    rel = float(np.abs(emb - ref_emb).max() / max(np.abs(ref_emb).max(), 1e-30))
    cos = float(_cosines(emb, ref_emb).min())
    scores = image_scores(exact_scorer, emb)
    score_rel = float(np.max(np.abs(scores - ref_scores) / np.maximum(np.abs(ref_scores), 1e-30)))
    if prec == "fp16":
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

    hnsw = make_index("hnsw", bank, m.index, bundle.index_path, ef=ef, threads=threads)
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
