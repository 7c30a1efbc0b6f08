"""Nearest-neighbour indexes (runtime/index.py) on real patch embeddings of the fixture images.

Features are EfficientNet-Lite0 PatchCore embeddings (pcedge.export's PatchEmbedder, D = 152) of the
fixture images after the runtime's preprocessing; the bank comes from train/good images, the queries
from held-out test images, as in PatchCore.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from pcedge.runtime.bundle import Geometry, IndexSpec
from pcedge.runtime.index import (
    AUTO_CROSSOVER_N,
    AUTO_HNSW_EF,
    ExactIndex,
    HnswIndex,
    Index,
    IndexFileError,
    PrunedExactIndex,
    exact_distances,
    make_index,
)
from pcedge.runtime.preprocess import list_images, load_batch

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
DIM = 152  # EfficientNet-Lite0: 40 (stride 8) + 112 (stride 16) channels


@pytest.fixture(scope="module")
def embed():
    """``paths -> [len(paths) * 784, 152]`` float32 real patch embeddings (224 x 224 input, 28 x 28 grid)."""
    import torch

    from pcedge.export.backbones import build_backbone
    from pcedge.export.embedder import PatchEmbedder

    embedder = PatchEmbedder(build_backbone("efficientnet_lite0"))

    def run(paths: list[Path]) -> np.ndarray:
        images, _ = load_batch(paths, Geometry())
        with torch.inference_mode():
            patches = embedder(torch.from_numpy(images)).numpy()
        return np.ascontiguousarray(patches.reshape(-1, patches.shape[-1]), dtype=np.float32)

    return run


@pytest.fixture(scope="module")
def screw(embed) -> tuple[np.ndarray, np.ndarray]:
    """Ball-screw photos: bank from 12 train images (9408 rows), queries from 2 held-out test images."""
    root = FIXTURES / "ball_screw_drive"
    bank = embed(list_images(root / "train/good")[:12])
    queries = embed([list_images(root / "test/good")[0], list_images(root / "test/pitting")[0]])
    return bank, queries


@pytest.fixture(scope="module")
def pcb(embed) -> tuple[np.ndarray, np.ndarray]:
    """Binarised PCB crops: bank from 4 train images, queries from a defective test image."""
    root = FIXTURES / "pcb"
    return embed(list_images(root / "train/good")[:4]), embed(list_images(root / "test/defect")[:1])


@pytest.fixture(scope="module")
def screw_hnsw(screw) -> HnswIndex:
    bank, _ = screw
    spec = IndexSpec()
    return HnswIndex.build(bank, M=spec.M, ef_construction=spec.ef_construction, seed=spec.seed, threads=2)


def brute_force(bank: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """Reference ``[M, N]`` Euclidean distances by ``np.linalg.norm`` of differences (float64)."""
    bank64 = bank.astype(np.float64)
    return np.stack([np.linalg.norm(bank64 - q, axis=1) for q in queries.astype(np.float64)])


# --------------------------------------------------------------------------------------------------
# Exact index
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("block, query_block", [(4096, 1024), (1000, 97), (1, 1000)])
@pytest.mark.parametrize("dataset", ["screw", "pcb"])
def test_exact_matches_brute_force(dataset, block, query_block, request):
    bank, queries = request.getfixturevalue(dataset)
    queries = queries[::5]  # every 5th patch of the held-out images keeps the float64 reference quick
    k = 7
    index = ExactIndex(bank, block=block, query_block=query_block)
    distances, ids = index.query(queries, k)
    reference = brute_force(bank, queries)
    expected = np.sort(reference, axis=1)[:, :k]

    assert distances.dtype == np.float32 and ids.dtype == np.int64
    assert distances.shape == ids.shape == (len(queries), k)
    # The returned distances are the Euclidean (not squared) distances of the returned ids ...
    np.testing.assert_allclose(distances, np.take_along_axis(reference, ids, axis=1), rtol=1e-5, atol=1e-6)
    # ... and those are the k smallest, up to the float32 rounding of the ranking's expanded form
    # (ExactIndex docstring): |d^2 - d_ref^2| <= D * eps * (|q|^2 + max |x|^2). Near-ties within that
    # bound may swap, so distances are compared, not ids.
    scale = np.einsum("md,md->m", queries, queries)[:, None] + np.einsum("nd,nd->n", bank, bank).max()
    bound = DIM * np.finfo(np.float32).eps * scale
    assert (np.abs(distances.astype(np.float64) ** 2 - expected**2) <= bound).all()
    assert np.isclose(distances, expected, rtol=1e-5, atol=1e-6).mean() > 0.99  # almost all are exact
    assert (np.diff(distances, axis=1) >= 0).all()
    assert all(len(set(row)) == k for row in ids.tolist())


def test_exact_duplicate_rows_are_distinct_neighbours(pcb):
    """A bank holding every row twice: the two copies are the two nearest neighbours, at equal distance."""
    bank, queries = pcb
    doubled = np.concatenate([bank, bank])
    distances, ids = ExactIndex(doubled, block=1000).query(queries, 2)
    np.testing.assert_array_equal(distances[:, 0], distances[:, 1])
    np.testing.assert_array_equal(ids.min(axis=1) + len(bank), ids.max(axis=1))


def test_exact_distances_are_accurate_near_zero(screw):
    """A query equal to a bank row is at distance exactly 0, where the expanded form would cancel badly."""
    bank, _ = screw
    rows = np.arange(0, len(bank), 97)
    distances, ids = ExactIndex(bank).query(bank[rows], 1)
    assert (distances[:, 0] == 0).all()
    np.testing.assert_array_equal(ids[:, 0], rows)
    np.testing.assert_array_equal(exact_distances(bank[rows], bank, ids), distances)


def test_exact_checks_its_input(screw):
    bank, queries = screw
    index = ExactIndex(bank)
    with pytest.raises(ValueError, match="float32"):
        index.query(queries.astype(np.float64), 1)
    with pytest.raises(ValueError, match=r"\[M, 152\]"):
        index.query(queries[:, :100], 1)
    with pytest.raises(ValueError, match="k must be"):
        index.query(queries, len(bank) + 1)
    with pytest.raises(ValueError, match="float32"):
        ExactIndex(bank.astype(np.float64))


# --------------------------------------------------------------------------------------------------
# HNSW
# --------------------------------------------------------------------------------------------------


def test_hnsw_recall_at_default_ef(screw, screw_hnsw):
    bank, queries = screw
    exact_d, _ = ExactIndex(bank).query(queries, 1)
    screw_hnsw.ef = IndexSpec().ef
    distances, ids = screw_hnsw.query(queries, 1)

    # A hit returns a neighbour at the exact nearest distance (ties count), up to float32 rounding.
    hits = distances[:, 0] <= exact_d[:, 0] * (1 + 1e-5) + 1e-6
    assert hits.mean() >= 0.99, f"recall@1 {hits.mean():.4f} at ef={screw_hnsw.ef}"
    # hnswlib's l2 is squared; the index returns the Euclidean distance of the ids it returns.
    np.testing.assert_allclose(distances, exact_distances(queries, bank, ids), rtol=1e-5, atol=1e-5)


def test_hnsw_k_neighbours_ascending(screw, screw_hnsw):
    _, queries = screw
    screw_hnsw.ef = 64
    distances, ids = screw_hnsw.query(queries, 9)
    assert distances.dtype == np.float32 and ids.dtype == np.int64 and ids.shape == (len(queries), 9)
    assert (np.diff(distances, axis=1) >= 0).all()
    assert all(len(set(row)) == 9 for row in ids.tolist())


def test_ef_below_k_is_raised_to_k(screw, screw_hnsw):
    bank, queries = screw
    screw_hnsw.ef = 2
    k = 20
    distances, ids = screw_hnsw.query(queries, k)
    assert screw_hnsw.ef == 2  # raised for the query only
    assert ids.shape == (len(queries), k)
    assert ((ids >= 0) & (ids < len(bank))).all()
    assert all(len(set(row)) == k for row in ids.tolist())
    assert np.isfinite(distances).all() and (np.diff(distances, axis=1) >= 0).all()
    with pytest.raises(ValueError, match="ef must be"):
        screw_hnsw.ef = 0


def test_save_load_round_trip(screw, screw_hnsw, tmp_path):
    bank, queries = screw
    path = screw_hnsw.save(tmp_path / "index.hnsw")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index.hnsw"]  # no temp file left behind
    loaded = HnswIndex.load(path, bank, ef=32, threads=1)
    screw_hnsw.ef, screw_hnsw.threads = 32, 1
    for k in (1, 5):
        expected_d, expected_ids = screw_hnsw.query(queries, k)
        got_d, got_ids = loaded.query(queries, k)
        np.testing.assert_array_equal(got_ids, expected_ids)
        np.testing.assert_array_equal(got_d, expected_d)
    assert str(path) in loaded.note


def test_load_refuses_an_index_of_another_bank(screw, screw_hnsw, tmp_path):
    bank, _ = screw
    path = screw_hnsw.save(tmp_path / "index.hnsw")
    with pytest.raises(IndexFileError, match=f"{path}.*{len(bank)} elements of dimension 152.*{len(bank) - 1} x 152"):
        HnswIndex.load(path, bank[:-1])
    with pytest.raises(IndexFileError, match=f"{path}.*dimension 152.*x 128"):
        HnswIndex.load(path, np.ascontiguousarray(bank[:, :128]))
    shuffled = bank[np.random.default_rng(1).permutation(len(bank))]
    with pytest.raises(IndexFileError, match=f"{path}.*another bank"):
        HnswIndex.load(path, shuffled)


def test_load_refuses_damaged_files(screw, screw_hnsw, tmp_path):
    bank, _ = screw
    truncated = tmp_path / "truncated.hnsw"
    truncated.write_bytes(screw_hnsw.save(tmp_path / "whole.hnsw").read_bytes()[:100_000])
    with pytest.raises(IndexFileError, match=f"{truncated}.*truncated"):
        HnswIndex.load(truncated, bank)
    not_an_index = tmp_path / "memory_bank.npy"
    np.save(not_an_index, bank)
    with pytest.raises(IndexFileError, match=str(not_an_index)):
        HnswIndex.load(not_an_index, bank)
    with pytest.raises(IndexFileError, match="no such index file"):
        HnswIndex.load(tmp_path / "missing.hnsw", bank)


# --------------------------------------------------------------------------------------------------
# make_index
# --------------------------------------------------------------------------------------------------


def test_make_index_exact_and_hnsw(screw, screw_hnsw, tmp_path, caplog):
    bank, queries = screw
    spec = IndexSpec()
    exact = make_index("exact", bank, spec, None)
    assert isinstance(exact, ExactIndex) and isinstance(exact, Index)

    path = screw_hnsw.save(tmp_path / "index.hnsw")
    loaded = make_index("hnsw", bank, spec, path, ef=48, threads=1)
    assert isinstance(loaded, HnswIndex) and isinstance(loaded, Index)
    assert loaded.ef == 48 and loaded.threads == 1 and "loaded from" in loaded.note

    with caplog.at_level(logging.WARNING, logger="pcedge.runtime.index"):
        rebuilt = make_index("hnsw", bank, spec, tmp_path / "missing.hnsw")
    assert isinstance(rebuilt, HnswIndex) and rebuilt.ef == spec.ef
    assert "missing.hnsw does not exist; rebuilt" in rebuilt.note
    assert any("rebuilt" in record.getMessage() for record in caplog.records)
    assert not (tmp_path / "missing.hnsw").exists()  # the bundle is not modified

    exact_d, _ = exact.query(queries, 1)
    rebuilt_d, _ = rebuilt.query(queries, 1)
    assert (rebuilt_d[:, 0] <= exact_d[:, 0] * (1 + 1e-5) + 1e-6).mean() >= 0.99


def test_make_index_auto_switches_at_the_crossover(screw):
    bank, _ = screw
    assert len(bank) > AUTO_CROSSOVER_N  # the fixture bank spans the crossover
    small = make_index("auto", np.ascontiguousarray(bank[: AUTO_CROSSOVER_N - 1]), IndexSpec(), None)
    large = make_index("auto", np.ascontiguousarray(bank[:AUTO_CROSSOVER_N]), IndexSpec(), None)
    assert small.kind == "exact" and "auto" in small.note
    assert large.kind == "hnsw" and "auto" in large.note
    # auto lowers ef to AUTO_HNSW_EF (the detector re-scores exactly); an explicit ef or a smaller bundle ef wins
    assert large.ef == min(IndexSpec().ef, AUTO_HNSW_EF) and f"ef {large.ef}" in large.note
    assert make_index("auto", bank, IndexSpec(), None, ef=40).ef == 40
    assert make_index("auto", bank, IndexSpec(ef=3), None).ef == 3


def test_make_index_unknown_kind(screw):
    bank, _ = screw
    with pytest.raises(ValueError, match="unknown index kind 'faiss'.*exact, hnsw, auto"):
        make_index("faiss", bank, IndexSpec(), None)


# --------------------------------------------------------------------------------------------------
# Pruned exact index (projection lower bound)
# --------------------------------------------------------------------------------------------------


def assert_exact_knn(bank: np.ndarray, queries: np.ndarray, distances: np.ndarray, ids: np.ndarray, k: int) -> None:
    """The returned ids are k distinct rows whose distances are the k smallest, up to float32 rounding of
    the difference form (relative 1e-5), and the distances are those of the ids."""
    reference = brute_force(bank, queries)
    expected = np.sort(reference, axis=1)[:, :k]
    assert distances.shape == ids.shape == (len(queries), k)
    assert distances.dtype == np.float32 and ids.dtype == np.int64
    np.testing.assert_allclose(distances, np.take_along_axis(reference, ids, axis=1), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(distances, expected, rtol=1e-5, atol=1e-6)
    assert (np.diff(distances, axis=1) >= 0).all()
    assert all(len(set(row)) == k for row in ids.tolist())


@pytest.mark.parametrize("k", [1, 9])
@pytest.mark.parametrize("dataset", ["screw", "pcb"])
def test_pruned_matches_brute_force_and_the_blocked_product(dataset, k, request):
    bank, queries = request.getfixturevalue(dataset)
    pruned, blocked = PrunedExactIndex(bank), ExactIndex(bank)
    # The re-scoring pass's shape: 16 patches, the farthest ones (where a bad bound would show), and Eq. 7's
    # single query from a bank row (its own nearest neighbour at distance 0).
    far = np.argsort(-blocked.query(queries, 1)[0][:, 0])[:16]
    for q in (np.ascontiguousarray(queries[far]), np.ascontiguousarray(queries[::97][:64]), bank[5:6].copy()):
        assert len(q) <= pruned.max_pruned_queries  # the pruned path, not the delegation
        distances, ids = pruned.query(q, k)
        assert_exact_knn(bank, q, distances, ids, k)
        blocked_d, _ = blocked.query(q, k)
        np.testing.assert_allclose(distances, blocked_d, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dataset", ["screw", "pcb"])
def test_projection_bound_is_below_every_true_distance(dataset, request):
    bank, queries = request.getfixturevalue(dataset)
    for dims in (1, 8, 32, 64):
        index = PrunedExactIndex(bank, dims=dims)
        q = np.ascontiguousarray(queries[::53][:64])
        assert (index.lower_bounds_sq(q) <= brute_force(bank, q) ** 2).all()


def _adversarial_banks(rng: np.random.Generator):
    """(name, bank [N, D], queries [M, D]) float32 cases built to stress the bound."""
    d = 152
    iso = rng.normal(size=(3000, d)).astype(np.float32)  # no dominant directions: the bound is loose
    yield "isotropic", iso, rng.normal(size=(40, d)).astype(np.float32)
    # Variance in a few directions, queries differing only in the dropped ones (the residual term decides).
    flat = np.zeros((2000, d), np.float32)
    flat[:, :4] = rng.normal(scale=100.0, size=(2000, 4))
    flat[:, 4:] = rng.normal(scale=1e-3, size=(2000, d - 4))
    q = flat[rng.choice(2000, 30)] + np.concatenate([np.zeros((30, 4)), rng.normal(scale=0.5, size=(30, d - 4))], 1)
    yield "low-rank", flat, q.astype(np.float32)
    # Far from the origin: |q'| is large against the distances, where cancellation would bite.
    offset = (rng.normal(size=(2000, d)) * 0.01 + 1000.0).astype(np.float32)
    yield "offset", offset, (offset[rng.choice(2000, 30)] + rng.normal(scale=0.01, size=(30, d))).astype(np.float32)
    # Duplicates and exact hits: ties and zero distances.
    base = rng.normal(size=(500, d)).astype(np.float32)
    dup = np.concatenate([base, base, base[:100]])
    yield "duplicates", dup, np.concatenate([base[:20], base[:20] + np.float32(1e-4)])
    # Non-negative sparse features (post-ReLU-like), many exact zeros.
    sparse = np.maximum(rng.normal(size=(2500, d)), 0).astype(np.float32) * (rng.random((2500, d)) < 0.1)
    yield "sparse", sparse.astype(np.float32), sparse[rng.choice(2500, 30)] + np.float32(0.05)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pruned_is_exact_on_adversarial_data(seed):
    rng = np.random.default_rng(seed)
    for name, bank, queries in _adversarial_banks(rng):
        for dims in (1, 16, 64):
            index = PrunedExactIndex(np.ascontiguousarray(bank), dims=dims)
            assert (index.lower_bounds_sq(queries) <= brute_force(bank, queries) ** 2).all(), (name, dims)
            for k in (1, 5):
                distances, ids = index.query(np.ascontiguousarray(queries), k)
                assert_exact_knn(bank, queries, distances, ids, k)


def test_pruned_delegates_many_queries_to_the_blocked_product(screw):
    bank, queries = screw
    pruned, blocked = PrunedExactIndex(bank, max_pruned_queries=8), ExactIndex(bank)
    for got, want in zip(pruned.query(queries[:300], 3), blocked.query(queries[:300], 3)):
        np.testing.assert_array_equal(got, want)  # the same code path, bit for bit
    # a bound matrix above 16 MiB (here 500 x 9408 float32) also goes to the blocked product
    roomy = PrunedExactIndex(bank, max_pruned_queries=1000)
    for got, want in zip(roomy.query(queries[:500], 1), blocked.query(queries[:500], 1)):
        np.testing.assert_array_equal(got, want)
    with pytest.raises(ValueError, match="dims must be in"):
        PrunedExactIndex(bank, dims=0)
    with pytest.raises(ValueError, match="queries must be"):
        pruned.query(queries[:4, :10], 1)


def test_hnsw_at_ef_1_with_pruned_rescoring_gives_the_exact_image_scores(screw, screw_hnsw):
    """The detector's fast path: HNSW at the smallest ef, exact re-scoring and Eq. 7 through the pruned
    index; image scores (s* and Eq. 7) must equal those of the blocked exact index bit for bit."""
    from pcedge.runtime.bundle import ScoringSpec
    from pcedge.runtime.scoring import Scorer

    bank, queries = screw
    embeddings = queries.reshape(2, 784, DIM)
    blocked, pruned = ExactIndex(bank), PrunedExactIndex(bank)
    reference = Scorer(bank, blocked, blocked, ScoringSpec())
    saved = screw_hnsw.ef
    try:
        screw_hnsw.ef = 1
        fast = Scorer(bank, screw_hnsw, pruned, ScoringSpec())
        for b, (mine, theirs) in enumerate(zip(fast.patch_scores(embeddings), reference.patch_scores(embeddings))):
            assert mine.n_rescored >= 1
            want, got = reference.image_score(embeddings[b], theirs), fast.image_score(embeddings[b], mine)
            assert (got.s_star, got.score, got.patch) == (want.s_star, want.score, want.patch)
    finally:
        screw_hnsw.ef = saved
