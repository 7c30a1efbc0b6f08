"""Nearest-neighbour search over the PatchCore memory bank (device side: numpy + hnswlib, no torch).

PatchCore scores a test patch feature ``m_test`` by its distance to the nearest memory-bank feature,
``s* = min_{m in M} ||m_test - m||_2`` (Roth et al. 2022, Eq. 6), and the image-score re-weighting
(Eq. 7) needs a few more neighbours. Both come from :meth:`Index.query`.

Two implementations share one interface:

- :class:`ExactIndex`  -- blocked matrix product in float32 numpy (exact; cost grows linearly with N);
- :class:`HnswIndex`   -- hnswlib's HNSW graph (approximate; cost grows roughly with log N).

:func:`make_index` picks one by name, or by bank size for ``"auto"`` (crossover measured by
``benchmarks/bench_index.py``).

Distances are always **Euclidean** (not squared) and ascending along each row; ids are bank rows, int64.
"""

from __future__ import annotations

import logging
import os
import struct
import time
from pathlib import Path
from typing import Protocol, runtime_checkable

import hnswlib
import numpy as np

from .bundle import IndexSpec
from .core_split import CoreSplit
from .hnsw_format import HnswFormatError, validate_hnsw_file

log = logging.getLogger(__name__)

#: The index kinds :func:`make_index` accepts.
INDEX_KINDS = ("exact", "hnsw", "auto")

#: ``"auto"`` uses the exact index for banks smaller than this and HNSW from this size up.
#: Measured by ``benchmarks/bench_index.py`` (results/index.json: DeepPCB, results/index_bsdata.json: BSData;
#: real EfficientNet-Lite0 features, one image's 784 queries, D = 152, k = 1, HNSW M=16, ef_construction=200,
#: default ef = 32, recall@1 >= 0.99 up to 64k rows) on this machine: 2 shared x86 cores (load average 8-11
#: during the runs), OpenBLAS, hnswlib 0.8.0. Median ms for one image, 1 thread, exact vs HNSW:
#:   DeepPCB  1k 7.3 vs 23.5 | 2k 11.4 vs 27.2 | 4k 24.9 vs 32.9 | 8k 37.8 vs 25.7 | 16k 105 vs 48 | 64k 530 vs 125
#:   BSData   1k 7.4 vs 21.2 | 2k 14.2 vs 21.4 | 4k 28.7 vs 27.9 | 8k 61.9 vs 33.2 | 16k 101 vs 31 | 64k 303 vs 44
#: Log-log interpolated crossover: DeepPCB 4.7k-6.4k, BSData 2.9k-3.9k (median and min times, 1 and 2
#: threads). Near the crossover both take the same time and exact loses no recall, so ties go to exact.
AUTO_CROSSOVER_N = 5000

#: The HNSW ``ef`` that ``"auto"`` uses (when no ef is given and the bundle's is larger). The detector
#: re-scores the decisive patches exactly (Scorer.patch_scores with PrunedExactIndex), so the image score is
#: the exact index's at any ef; ef only sets how close the anomaly map's other patches come to their exact
#: distances and how many patches the exact pass needs. Measured on BSData's 10 % bank (11,760 x 152, real
#: features, 20 test images, 1 thread, load average ~4.7 on 2 shared cores; results/exact_levers.json):
#: ef 32 / 16 / 8 / 4 / 2 / 1 -> index stage (hnswlib + exact re-scoring) 13.5 / 8.5 / 5.8 / 4.5 / 3.9 / 4.3 ms,
#: recall@1 1.000 / 0.998 / 0.989 / 0.959 / 0.887 / 0.756, map patch scores above exact by 0.00 / 0.01 /
#: 0.09 / 0.52 / 1.8 / 5.5 % on average, 4.0 / 4.0 / 4.0 / 4.4 / 8.0 / 23.2 patches re-scored, image score
#: equal to the exact index's on 20/20 images at every ef (2 threads were no faster on the shared cores).
#: Over all 80 test images the map's metrics barely move: pixel AUROC 98.25 / 98.25 / 98.23 %, AUPRO
#: 68.80 / 68.74 / 68.62 % (exact / ef 8 / ef 4), image AUROC identical. End to end (results/
#: vs_peer_latency.json, 80 images, median p50, load 3.2-4.2): ef 32 36.5 ms, ef 8 33.5 ms, ef 4 21.6 ms,
#: the blocked exact index 55.2 ms. ef 4 is the smallest ef whose map stays within ~0.5 % of exact on
#: average; ef 2 saved another 0.6 ms of index stage but tripled that (1.8 %), and at ef 1 the re-scoring
#: pass grows (23 patches) so it is slower again.
AUTO_HNSW_EF = 4


@runtime_checkable
class Index(Protocol):
    """k-nearest-neighbour search over a memory bank ``[n, dim]`` float32.

    ``note`` says where the index came from (built, loaded, rebuilt and why), for the CLI to print.
    """

    kind: str
    n: int
    dim: int
    note: str

    def query(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """``q [M, dim]`` float32 -> ``(distances [M, k] float32 Euclidean ascending, ids [M, k] int64)``."""
        ...


# --------------------------------------------------------------------------------------------------
# Input checks shared by both implementations
# --------------------------------------------------------------------------------------------------


def _check_bank(bank: np.ndarray) -> np.ndarray:
    """The bank as C-contiguous float32 ``[N, D]``; a clear ValueError otherwise."""
    bank = np.asarray(bank)
    if bank.ndim != 2 or bank.shape[0] == 0 or bank.shape[1] == 0:
        raise ValueError(f"memory bank must be a non-empty [N, D] array, got shape {list(bank.shape)}")
    if bank.dtype != np.float32:
        raise ValueError(f"memory bank must be float32, got {bank.dtype}")
    for start in range(0, bank.shape[0], 65536):  # in chunks: no bank-sized temporary on the device
        if not np.isfinite(bank[start : start + 65536]).all():
            raise ValueError(f"memory bank contains NaN or infinite values (in rows {start}..{start + 65535})")
    return np.ascontiguousarray(bank)


def _check_query(q: np.ndarray, k: int, n: int, dim: int) -> np.ndarray:
    """Queries as C-contiguous float32 ``[M, dim]``, with ``1 <= k <= n``."""
    q = np.asarray(q)
    if q.ndim != 2 or q.shape[1] != dim:
        raise ValueError(f"queries must be [M, {dim}], got shape {list(q.shape)}")
    if q.dtype != np.float32:
        raise ValueError(f"queries must be float32, got {q.dtype}")
    if not isinstance(k, (int, np.integer)) or not 1 <= k <= n:
        raise ValueError(f"k must be an integer in [1, {n}] (the bank size), got {k!r}")
    return np.ascontiguousarray(q)


def exact_distances(q: np.ndarray, bank: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Euclidean distances from each query to the given bank rows, by direct differences.

    ``q [M, D]``, ``bank [N, D]``, ``ids [M, k]`` -> ``[M, k]`` float32. Unlike the expanded form
    ``|q|^2 - 2 q.x + |x|^2`` this has no cancellation, so distances near zero stay accurate; it costs
    ``M * k * D`` and is meant for re-scoring a short candidate list. Memory: one ``[M, k, D]`` float32
    temporary (784 x 9 x 152 x 4 B = 4.3 MB for one image with k = 9).
    """
    diff = bank[ids] - q[:, None, :]  # [M, k, D]
    return np.sqrt(np.einsum("mkd,mkd->mk", diff, diff, dtype=np.float32))


def _sort_rows(distances: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sort each row by distance (stable, so equal distances keep their id order)."""
    order = np.argsort(distances, axis=1, kind="stable")
    return np.take_along_axis(distances, order, axis=1), np.take_along_axis(ids, order, axis=1)


# --------------------------------------------------------------------------------------------------
# Exact search
# --------------------------------------------------------------------------------------------------

#: Fewest query rows per thread for which :func:`split_rows` splits an exact search. A whole image (784
#: queries) splits; the re-scoring pass's calls (<= 64 queries, pruned) never reach it, and below ~128 rows
#: per thread the hand-off to the helper (tens of microseconds, more when another process holds the other
#: core) is most of what the half saves.
SPLIT_MIN_ROWS_PER_THREAD = 128


def split_rows(m: int, split: CoreSplit | None) -> list[tuple[int, int]]:
    """Row ranges ``[(start, stop), ...]`` of ``m`` queries, one per thread of ``split``; a single range (no
    split) without one or for few queries.

    Each thread multiplies its rows by the whole bank with numpy's BLAS on one thread (the detector's
    limit), so a row's product, and so its ranking, is computed the same way with or without the split.
    Measured on this machine (benchmarks/bench_core_split.py, results/core_split.json: one image's 784 real
    queries, 5 interleaved rounds, quiet, load average 1.4-1.5), median of rounds in ms, one call on 1 BLAS
    thread | one call on 2 BLAS threads | this split:
      1,176 rows (the default bundle) 2.12 | 1.51 | 1.62
      2,352 rows 4.12 | 2.64 | 2.56
      4,704 rows 8.59 | 5.36 | 4.98
     11,760 rows 21.5 | 13.1 | 11.5
    So two threads do not lose on big banks (no cap by bank size). BLAS's own pool is 0.1 ms faster at the
    default bank when the machine is quiet, but its limit is process-wide (the watch pipeline needs one BLAS
    thread) and its threads busy-wait: with another job on one core (an earlier run, load 2.3-2.6) it took
    3.61 ms there against the split's 2.52, and 2.4x the CPU time per frame in the watch pipeline
    (results/watch_threads.json). With the second core busy the split itself costs ~0.2 ms (the helper waits
    for a time slice) until CoreSplit stands down.
    """
    if split is None or m < SPLIT_MIN_ROWS_PER_THREAD * 2:
        return [(0, m)]
    parts = min(split.threads, m // SPLIT_MIN_ROWS_PER_THREAD)
    edges = [round(i * m / parts) for i in range(parts + 1)]
    return list(zip(edges[:-1], edges[1:]))


class ExactIndex:
    """Exact k-NN by a blocked float32 matrix product (BLAS).

    Ranking uses ``d^2 = |q|^2 - 2 q.x + |x|^2``; ``|q|^2`` is the same for every bank row of a query, so
    the tiles only hold ``|x|^2 - 2 q.x`` and ``|q|^2`` is added to the k winners. The winners are then
    re-scored by :func:`exact_distances` (direct differences, no cancellation) and re-sorted, so the
    returned distances match HNSW's (hnswlib also computes differences) to float32 rounding.

    Precision: the ranking inherits the float32 rounding of the expanded form, about
    ``D * eps * (|q|^2 + |x|^2)`` in ``d^2`` (worst case), so two bank rows whose squared distances
    differ by less than that may come back in swapped order (measured on fixture features: the 7th
    neighbour at 0.04523 instead of 0.04521). The distances returned are always those of the ids
    returned, computed accurately.

    Memory bound: one tile of ``query_block x block`` float32 entries plus, for ``k > 1``, the int64
    ``argpartition`` indices of the same shape: ``12 * query_block * block`` bytes (defaults
    1024 x 4096: 48 MiB for k > 1; k = 1 uses ``argmin`` and needs only the 16 MiB float32 tile; one image's
    784 queries use 77% of that), plus the bank's squared norms, ``4 N`` bytes. The bank itself is
    referenced, not copied (when it is already C-contiguous float32). Tile sizes from 1024 to 16384 bank
    rows measured within noise of each other here (64k bank, k = 1: 131-155 ms), so the default keeps
    tiles small for edge devices.

    Threads: the matrix product runs on numpy's BLAS thread pool, which is process-wide; set it from
    outside (``OPENBLAS_NUM_THREADS`` or ``threadpoolctl``), not per index.
    """

    kind = "exact"

    def __init__(self, bank: np.ndarray, block: int = 4096, query_block: int = 1024):
        if block < 1 or query_block < 1:
            raise ValueError(f"block sizes must be positive, got block={block}, query_block={query_block}")
        self.bank = _check_bank(bank)
        self.n, self.dim = self.bank.shape
        self.block = int(block)
        self.query_block = int(query_block)
        self._sq_norms = np.einsum("nd,nd->n", self.bank, self.bank)  # |x|^2, [N]
        self.note = f"exact index over {self.n} x {self.dim} bank (blocked matrix product)"

    def query(self, q: np.ndarray, k: int, split: CoreSplit | None = None) -> tuple[np.ndarray, np.ndarray]:
        """``q [M, D]`` float32 -> ``(distances [M, k] float32 ascending, ids [M, k] int64)``.

        ``split`` (optional): a whole image's queries are cut into one block of rows per thread, each
        searched on its own thread with numpy's BLAS on one thread (see :func:`split_rows`).
        """
        q = _check_query(q, k, self.n, self.dim)
        parts = split_rows(q.shape[0], split)
        if len(parts) > 1:
            answers = split.map(lambda rows: self._query_rows(q[rows[0] : rows[1]], k), parts)
            return (np.concatenate([a[0] for a in answers]), np.concatenate([a[1] for a in answers]))
        return self._query_rows(q, k)

    def _query_rows(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`query` on checked queries, on the calling thread."""
        ids = np.empty((q.shape[0], k), dtype=np.int64)
        for start in range(0, q.shape[0], self.query_block):
            stop = start + self.query_block
            ids[start:stop] = self._nearest_ids(q[start:stop], k)
        return _sort_rows(exact_distances(q, self.bank, ids), ids)

    def exact_distances(self, q: np.ndarray, ids: np.ndarray) -> np.ndarray:
        """``q [M, D]``, ``ids [M, k]`` bank rows -> accurate Euclidean distances ``[M, k]`` (see module function)."""
        return exact_distances(q, self.bank, ids)

    def _nearest_ids(self, q: np.ndarray, k: int) -> np.ndarray:
        """Ids of the k smallest ``|x|^2 - 2 q.x`` per row, over all bank tiles: ``[m, D] -> [m, k]``."""
        q_times_minus2 = q * np.float32(-2.0)  # scale the small side once instead of every tile
        best_val: np.ndarray | None = None  # [m, k] running k smallest partial distances
        best_ids: np.ndarray | None = None
        for start in range(0, self.n, self.block):
            stop = min(start + self.block, self.n)
            tile = q_times_minus2 @ self.bank[start:stop].T  # [m, b]
            tile += self._sq_norms[start:stop]
            if k == 1:
                # argmin is one pass; argpartition would allocate an int64 [m, b] array for one winner.
                local = np.argmin(tile, axis=1)[:, None]
            elif k < tile.shape[1]:
                local = np.argpartition(tile, k - 1, axis=1)[:, :k]
            else:
                local = np.broadcast_to(np.arange(tile.shape[1]), (tile.shape[0], tile.shape[1]))
            val = np.take_along_axis(tile, local, axis=1)
            idx = local + start
            if best_val is None:
                best_val, best_ids = val, idx
                continue
            val = np.concatenate([best_val, val], axis=1)
            idx = np.concatenate([best_ids, idx], axis=1)
            if val.shape[1] > k:
                keep = np.argpartition(val, k - 1, axis=1)[:, :k]
                val, idx = np.take_along_axis(val, keep, axis=1), np.take_along_axis(idx, keep, axis=1)
            best_val, best_ids = val, idx
        assert best_ids is not None and best_ids.shape[1] == k  # k <= n was checked
        return best_ids


# --------------------------------------------------------------------------------------------------
# Exact search for a few queries: a projection lower bound prunes the bank
# --------------------------------------------------------------------------------------------------

#: Principal directions kept by :class:`PrunedExactIndex`. Measured on BSData's 10 % bank (11,760 x 152,
#: real EfficientNet-Lite0 features; benchmarks/bench_exact_levers.py, results/exact_levers.json, load
#: average ~4.9 on 2 shared cores): rows still compared exactly per query 402 / 102 / 33 (16 top patches,
#: k = 1) and 228 / 83 / 43 (Eq. 7's support, k = 9) with 16 / 32 / 48 directions; time 1.82 / 0.94 /
#: 0.81 ms and 0.21 / 0.17 / 0.20 ms against the blocked product's 1.36 and 0.38 ms. 32 and 48 are within
#: noise of each other; 32 keeps the stored bound (33 float32 per row) small.
PRUNE_DIMS = 32

#: Calls with more queries than this use the blocked product: the bound's ``[M, N]`` matrix, the boolean
#: mask and the candidate lists cost as much as the product itself once M approaches a whole image (784).
PRUNE_MAX_QUERIES = 64

# Slack of the bound (why these numbers). The lifted vectors a = [z, rho] (|a| = |q'| exactly) are computed
# in float64 and stored in float32 (relative error u = 2^-24 per coordinate), then the bound's expanded form
# |a|^2 + |b|^2 - 2 a.b is evaluated in float32 over n = r + 3 <= 67 terms. Rounding the vectors moves the
# squared distance by at most 4u (|a|^2 + |b|^2); the float32 evaluation by at most 2 gamma_n (|a|^2 + |b|^2)
# with gamma_n = n u / (1 - n u) (Higham, any summation order, FMA or not): 8.2e-6 for r = 32, 1.6e-5 for
# n = 67; the float64 lift itself (the residual's cancellation) adds under 2e-7. 4e-5 (|q'|^2 + |x'|^2) covers
# the total for every r <= 64 with a margin. The candidates' distances come from exact_distances in
# float32: a sum of D <= 2048 squares is within D u <= 1.3e-4 of the true squared distance (relative, any
# order); 2e-4 covers it.
_BOUND_SLACK = 4e-5
_FLOAT32_DISTANCE_SLACK = 2e-4
_MAX_PRUNE_DIMS = 64

#: Largest ``[M, N]`` bound matrix a call builds (16 MiB of float32, as the blocked product's k = 1 tile);
#: bigger calls (many queries on a very large bank) use the blocked product.
_PRUNE_MAX_BOUND_ENTRIES = 1 << 22


class PrunedExactIndex(ExactIndex):
    """Exact k-NN that, for a few queries at a time, skips the bank rows a proven lower bound rules out.

    For an orthonormal basis ``B [D, r]`` of the bank's first ``r`` principal directions and the bank mean
    ``mu``, write ``q' = q - mu``, ``z(q) = B^T q'`` and the residual norm ``rho(q) = |q' - B z(q)|``. Then
    (Pythagoras, then the reverse triangle inequality on the residuals)::

        |q - x|^2 = |z(q) - z(x)|^2 + |(I - B B^T)(q' - x')|^2 >= |z(q) - z(x)|^2 + (rho(q) - rho(x))^2

    i.e. the squared distance between the ``r + 1``-dimensional vectors ``[z, rho]`` is a lower bound of the
    true squared distance. A query first takes the ``k`` rows of smallest bound, computes their exact
    distances (an upper bound ``u`` of its k-th neighbour's distance, as they are real rows), and then
    computes exact distances only for rows whose bound is below ``u`` (with the rounding slack above). No
    row closer than the k-th neighbour can be skipped, so the result is the exact k-NN; distances come from
    :func:`exact_distances`, as :class:`ExactIndex`'s do.

    Calls with more than ``max_pruned_queries`` queries (a whole image), or whose ``[M, N]`` bound matrix
    would exceed 16 MiB, use :class:`ExactIndex`'s blocked product. Memory: ``[r + 1, N]`` float32 (1.6 MB
    for 11,760 rows, r = 32) and, per call, ``[M, N]`` float32 plus a boolean mask (M <= 64: 3.8 MB for
    11,760 rows). Building costs one ``[D, D]`` scatter matrix (``N D^2`` flops), in chunks of 16k rows.
    """

    def __init__(self, bank: np.ndarray, dims: int = PRUNE_DIMS, max_pruned_queries: int = PRUNE_MAX_QUERIES,
                 block: int = 4096, query_block: int = 1024):
        super().__init__(bank, block=block, query_block=query_block)
        if not 1 <= dims <= _MAX_PRUNE_DIMS or max_pruned_queries < 0:
            raise ValueError(f"dims must be in [1, {_MAX_PRUNE_DIMS}] (the slack is proven up to there) and "
                             f"max_pruned_queries >= 0, got {dims}, {max_pruned_queries}")
        self.dims = min(int(dims), self.dim)
        self.max_pruned_queries = int(max_pruned_queries)
        self._mean = self.bank.sum(axis=0, dtype=np.float64) / self.n  # [D]
        scatter = np.zeros((self.dim, self.dim))
        for centred in self._centred_chunks():
            scatter += centred.T @ centred
        # Principal directions: eigenvectors of the scatter matrix, largest eigenvalue first. eigh returns
        # orthonormal columns to float64 rounding, which the bound needs (any orthonormal B gives a valid
        # bound; the principal ones make it tight).
        _, vectors = np.linalg.eigh(scatter)
        self._basis = np.ascontiguousarray(vectors[:, ::-1][:, : self.dims])  # [D, r]
        # -2 a_x in float32 (the product's right side) and |a_x|^2 minus the slack: one [M, N] product and two
        # broadcast adds give the bound. Scaling by -2 is exact in binary floating point.
        self._bank_lifted_minus2 = np.empty((self.dims + 1, self.n), dtype=np.float32)  # [r + 1, N]
        self._bank_term = np.empty(self.n, dtype=np.float32)  # [N]
        start = 0
        for centred in self._centred_chunks():
            stop = start + centred.shape[0]
            self._bank_lifted_minus2[:, start:stop] = (-2.0 * self._lift(centred)).T
            self._bank_term[start:stop] = (1.0 - _BOUND_SLACK) * np.einsum("nd,nd->n", centred, centred)
            start = stop
        self.note = (f"exact index over {self.n} x {self.dim} bank (blocked matrix product; calls of up to "
                     f"{self.max_pruned_queries} queries pruned by a {self.dims}-direction projection bound)")

    def _centred_chunks(self, rows: int = 16384):
        """The bank minus its mean in float64, ``[<= rows, D]`` at a time (no bank-sized float64 copy)."""
        for start in range(0, self.n, rows):
            yield self.bank[start : start + rows].astype(np.float64) - self._mean

    def _lift(self, centred: np.ndarray) -> np.ndarray:
        """``[M, D]`` float64 centred vectors -> ``[M, r + 1]``: principal coordinates, residual norm."""
        z = centred @ self._basis
        residual_sq = np.einsum("md,md->m", centred, centred) - np.einsum("mr,mr->m", z, z)
        return np.hstack([z, np.sqrt(np.maximum(residual_sq, 0.0))[:, None]])

    def lower_bounds_sq(self, q: np.ndarray) -> np.ndarray:
        """``q [M, D]`` -> ``[M, N]`` float32 lower bounds of the squared distances, rounding slack deducted."""
        centred = q.astype(np.float64) - self._mean
        lifted = self._lift(centred).astype(np.float32)  # [M, r + 1]
        bound = lifted @ self._bank_lifted_minus2  # [M, N]
        # |a_q|^2 = |q'|^2 (the lift keeps the norm), taken from q' directly, slack deducted.
        bound += ((1.0 - _BOUND_SLACK) * np.einsum("md,md->m", centred, centred)).astype(np.float32)[:, None]
        bound += self._bank_term
        return bound

    def query(self, q: np.ndarray, k: int, split: CoreSplit | None = None) -> tuple[np.ndarray, np.ndarray]:
        """``q [M, D]`` float32 -> ``(distances [M, k] float32 ascending, ids [M, k] int64)``, exact.

        ``split`` only applies to the calls that use the blocked product (see :meth:`ExactIndex.query`).
        """
        q = _check_query(q, k, self.n, self.dim)
        if q.shape[0] > self.max_pruned_queries or q.shape[0] * self.n > _PRUNE_MAX_BOUND_ENTRIES or k == self.n:
            return super().query(q, k, split)
        m = q.shape[0]
        bound = self.lower_bounds_sq(q)  # [M, N]
        if k == 1:  # argmin is one pass; argpartition would allocate an int64 [M, N]
            first = np.argmin(bound, axis=1)[:, None]
        else:
            first = np.argpartition(bound, k - 1, axis=1)[:, :k]  # [M, k] starting candidates
        upper = exact_distances(q, self.bank, first).max(axis=1).astype(np.float64)  # >= the k-th NN distance
        keep = bound <= (upper * upper * (1.0 + _FLOAT32_DISTANCE_SLACK)).astype(np.float32)[:, None]
        keep[np.arange(m)[:, None], first] = True  # the starters always stay (k candidates at least)
        rows, cols = np.nonzero(keep)
        diff = self.bank[cols] - q[rows]  # [C, D] float32, C = surviving (query, row) pairs
        dist = np.sqrt(np.einsum("cd,cd->c", diff, diff, dtype=np.float32))
        order = np.lexsort((cols, dist, rows))  # by query, then distance, then row (ties: lower row first)
        rows, cols, dist = rows[order], cols[order], dist[order]
        take = np.searchsorted(rows, np.arange(m))[:, None] + np.arange(k)  # [M, k]
        return dist[take], cols[take].astype(np.int64, copy=False)


# --------------------------------------------------------------------------------------------------
# HNSW (hnswlib)
# --------------------------------------------------------------------------------------------------


class IndexFileError(ValueError):
    """An index file that cannot be used with this memory bank; the message names the file."""


# hnswlib's HierarchicalNSW::saveIndex header (hnswalg.h): offsetLevel0_, max_elements_, cur_element_count,
# size_data_per_element_, label_offset_, offsetData_ (size_t); maxlevel_ (int); enterpoint_node_ (uint32);
# maxM_, maxM0_, M_ (size_t); mult_ (double); ef_construction_ (size_t). Little-endian on every target
# we ship to (x86-64, aarch64 Jetson).
_HNSW_HEADER = struct.Struct("<QQQQQQiIQQQdQ")


def read_hnsw_header(path: Path) -> tuple[int, int, int]:
    """``(element count, dim, M)`` from an hnswlib float32 index file, without loading it.

    hnswlib's ``load_index`` trusts the dimension given to ``Index(space, dim)`` and does not compare it
    with the file, so a mismatched file would be read with the wrong stride; we check the header first.
    """
    try:
        with open(path, "rb") as handle:
            raw = handle.read(_HNSW_HEADER.size)
    except OSError as exc:
        raise IndexFileError(f"{path}: cannot read the index file ({exc})") from exc
    if len(raw) < _HNSW_HEADER.size:
        raise IndexFileError(f"{path}: {len(raw)} bytes, too short to be an hnswlib index")
    (_, _, count, per_element, label_offset, data_offset, _, _, _, _, m, _, _) = _HNSW_HEADER.unpack(raw)
    data_bytes = label_offset - data_offset
    if label_offset <= data_offset or data_bytes % 4 or per_element != label_offset + 8:
        raise IndexFileError(f"{path}: header is not that of an hnswlib float32 index")
    minimum_size = _HNSW_HEADER.size + count * per_element
    size = path.stat().st_size
    if size < minimum_size:
        raise IndexFileError(f"{path}: {size} bytes, but its header needs at least {minimum_size}: truncated")
    return int(count), int(data_bytes // 4), int(m)


class HnswIndex:
    """Approximate k-NN with hnswlib's HNSW graph, over bank rows labelled ``0 .. N-1``.

    Build with :meth:`build`, or :meth:`load` a file written by :meth:`save`. ``ef`` (the search's
    candidate-list size) trades recall for speed; a query with ``k > ef`` raises ef to ``k`` for that
    query (the ``ef`` property keeps its value), since HNSW cannot return more neighbours than candidates.
    ``threads`` is hnswlib's ``num_threads`` for queries (query rows are split across threads).
    """

    kind = "hnsw"

    def __init__(self, index, bank: np.ndarray, ef: int, threads: int, note: str):
        self._index = index
        self.bank = bank
        self.n, self.dim = bank.shape
        self.note = note
        self.ef = ef
        self.threads = threads

    # ---- construction -------------------------------------------------------------------------

    @classmethod
    def build(
        cls,
        bank: np.ndarray,
        M: int = 16,
        ef_construction: int = 200,
        seed: int = 100,
        threads: int | None = None,
        ef: int = IndexSpec.ef,
    ) -> "HnswIndex":
        """Build over ``bank [N, D]`` float32; row ``i`` gets label ``i``.

        ``threads`` (default: all cores) builds in parallel; a multi-threaded build inserts in a
        scheduling-dependent order, so the graph (not its recall) can differ between runs. Use
        ``threads=1`` for a bit-reproducible index.
        """
        bank = _check_bank(bank)
        threads = _resolve_threads(threads)
        started = time.perf_counter()
        # space "l2": squared Euclidean, the PatchCore metric before the root (hnswlib's "ip"/"cosine"
        # would change the ranking). dim: the bank's feature size D.
        index = hnswlib.Index(space="l2", dim=bank.shape[1])
        index.init_index(
            max_elements=bank.shape[0],  # exactly the bank: the index is never grown on the device
            M=M,  # graph out-degree (2M on level 0): recall vs memory (4 * 2M bytes per element)
            ef_construction=ef_construction,  # build-time candidate list: graph quality vs build time
            random_seed=seed,  # fixes the random level assignment of each element
            allow_replace_deleted=False,  # nothing is ever deleted from a memory bank
        )
        index.add_items(
            bank,
            ids=np.arange(bank.shape[0], dtype=np.int64),  # label = bank row, so ids index the bank
            num_threads=threads,  # parallel insertion (see the docstring on reproducibility)
            replace_deleted=False,  # no deleted slots exist to reuse
        )
        seconds = time.perf_counter() - started
        note = (
            f"hnsw index built over {bank.shape[0]} x {bank.shape[1]} bank in {seconds:.1f} s "
            f"(M={M}, ef_construction={ef_construction}, seed={seed}, threads={threads})"
        )
        return cls(index, bank, ef=ef, threads=threads, note=note)

    @classmethod
    def load(
        cls, path: str | os.PathLike[str], bank: np.ndarray, ef: int = IndexSpec.ef, threads: int | None = None
    ) -> "HnswIndex":
        """Load an index file written by :meth:`save` for ``bank [N, D]``.

        The file must hold exactly ``N`` elements of dimension ``D``, pass
        :func:`~pcedge.runtime.hnsw_format.validate_hnsw_file` (every id, count and size consistent, every
        stored vector equal to the bank row with its label) before hnswlib reads it; otherwise
        :class:`IndexFileError` names the file and the fault.
        """
        path = Path(path)
        bank = _check_bank(bank)
        n, dim = bank.shape
        if not path.is_file():
            raise IndexFileError(f"{path}: no such index file")
        count, file_dim, _ = read_hnsw_header(path)
        if (count, file_dim) != (n, dim):
            raise IndexFileError(
                f"{path}: index holds {count} elements of dimension {file_dim}, but the memory bank is "
                f"{n} x {dim}; rebuild the index from the bank"
            )
        try:
            # Native code must never see an unvalidated file: a crafted id or count segfaults hnswlib.
            validate_hnsw_file(path, bank)
        except HnswFormatError as exc:
            raise IndexFileError(str(exc)) from exc
        index = hnswlib.Index(space="l2", dim=dim)  # must match how it was built (see build)
        try:
            # max_elements=0 keeps the file's capacity (== N, see build); no deletions to replace.
            index.load_index(str(path), max_elements=0, allow_replace_deleted=False)
        except RuntimeError as exc:
            raise IndexFileError(f"{path}: hnswlib could not load it ({exc})") from exc
        threads = _resolve_threads(threads)
        return cls(index, bank, ef=ef, threads=threads, note=f"hnsw index loaded from {path}")

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the index to ``path`` (via a temporary name, then rename: never a half-written file)."""
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        try:
            self._index.save_index(str(tmp))
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        return path

    # ---- query --------------------------------------------------------------------------------

    @property
    def ef(self) -> int:
        """Query-time candidate-list size (recall vs speed); raised to ``k`` when a query asks for more."""
        return self._ef

    @ef.setter
    def ef(self, value: int) -> None:
        if int(value) < 1:
            raise ValueError(f"ef must be >= 1, got {value}")
        self._ef = int(value)

    @property
    def threads(self) -> int:
        """hnswlib ``num_threads`` for :meth:`query` (query rows are split across threads)."""
        return self._threads

    @threads.setter
    def threads(self, value: int) -> None:
        if int(value) < 1:
            raise ValueError(f"threads must be >= 1, got {value}")
        self._threads = int(value)

    def query(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """``q [M, D]`` float32 -> ``(distances [M, k] float32 Euclidean ascending, ids [M, k] int64)``."""
        q = _check_query(q, k, self.n, self.dim)
        # HNSW keeps ef candidates; fewer than k cannot yield k neighbours. (hnswlib 0.8 also takes
        # max(ef, k) inside searchKnn; doing it here keeps the contract independent of its version.)
        self._index.set_ef(max(self._ef, k))
        # num_threads: query rows are split across threads; filter=None: every bank row is eligible.
        labels, squared = self._index.knn_query(q, k=k, num_threads=self._threads, filter=None)
        # hnswlib's "l2" is the squared distance (computed by differences, so it is >= 0 up to rounding).
        distances = np.sqrt(np.maximum(squared, 0.0, dtype=np.float32))
        return distances, labels.astype(np.int64, copy=False)


    def exact_distances(self, q: np.ndarray, ids: np.ndarray) -> np.ndarray:
        """``q [M, D]``, ``ids [M, k]`` bank rows -> accurate Euclidean distances ``[M, k]`` (see module function)."""
        return exact_distances(q, self.bank, ids)


def _resolve_threads(threads: int | None) -> int:
    """``None`` -> every core this process may use."""
    if threads is None:
        try:
            return max(1, len(os.sched_getaffinity(0)))
        except AttributeError:  # not Linux
            return max(1, os.cpu_count() or 1)
    if int(threads) < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    return int(threads)


# --------------------------------------------------------------------------------------------------
# Choosing an index
# --------------------------------------------------------------------------------------------------


def make_index(
    kind: str,
    bank: np.ndarray,
    spec: IndexSpec,
    index_path: Path | None,
    ef: int | None = None,
    threads: int | None = None,
) -> Index:
    """The index of ``kind`` over ``bank [N, D]`` float32.

    - ``"exact"``: :class:`ExactIndex`.
    - ``"hnsw"``: :class:`HnswIndex` loaded from ``index_path`` if that file exists and validates, else
      built from the bank with ``spec``'s parameters (a warning, also in the index's ``note``; the bundle
      is not modified). ``ef`` defaults to ``spec.ef``; ``threads`` defaults to all cores.
    - ``"auto"``: exact below :data:`AUTO_CROSSOVER_N` bank rows (faster there), hnsw from it up, with
      ``ef`` (when not given) ``min(spec.ef, AUTO_HNSW_EF)``: the detector's exact re-scoring keeps the
      image score exact at that ef.

    ``threads`` applies to hnsw only (the exact index uses numpy's process-wide BLAS pool).
    """
    if kind not in INDEX_KINDS:
        raise ValueError(f"unknown index kind {kind!r}; choose one of {', '.join(INDEX_KINDS)}")
    if kind == "auto":
        kind = "exact" if np.shape(bank)[0] < AUTO_CROSSOVER_N else "hnsw"
        n = np.shape(bank)[0]
        if kind == "hnsw" and ef is None:
            ef = min(spec.ef, AUTO_HNSW_EF)
        log.info("index auto: bank of %d rows -> %s (crossover %d)", n, kind, AUTO_CROSSOVER_N)
        chosen = make_index(kind, bank, spec, index_path, ef=ef, threads=threads)
        chosen.note = f"auto ({n} rows, crossover {AUTO_CROSSOVER_N}{f', ef {ef}' if kind == 'hnsw' else ''}): {chosen.note}"
        return chosen
    if kind == "exact":
        return ExactIndex(bank)
    ef = spec.ef if ef is None else ef
    reason = "no index file given" if index_path is None else f"{index_path} does not exist"
    if index_path is not None and Path(index_path).is_file():
        try:
            return HnswIndex.load(index_path, bank, ef=ef, threads=threads)
        except IndexFileError as exc:
            # The bank is the source of truth: an index file that does not validate is rebuilt from it
            # (never handed to hnswlib), with a warning naming the fault.
            reason = f"WARNING: {exc}; not loaded"
    index = HnswIndex.build(
        bank, M=spec.M, ef_construction=spec.ef_construction, seed=spec.seed, threads=threads, ef=ef
    )
    index.note = f"{reason}; rebuilt: {index.note}"
    log.warning("%s", index.note)
    return index


__all__ = [
    "AUTO_CROSSOVER_N",
    "AUTO_HNSW_EF",
    "INDEX_KINDS",
    "ExactIndex",
    "HnswIndex",
    "Index",
    "IndexFileError",
    "PrunedExactIndex",
    "exact_distances",
    "make_index",
    "read_hnsw_header",
]
