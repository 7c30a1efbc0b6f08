"""PatchCore's greedy coreset (Roth et al. 2022, §3.2, Algorithm 1): exact, fast, numpy only.

Algorithm 1 picks the memory-bank subset M_C by iterative minimax facility location. It starts from one
random centre and keeps adding the feature farthest from its nearest selected centre,

    m_i = argmax_{m in M - M_C}  min_{n in M_C} ||psi(m) - psi(n)||_2,

where psi is a random linear projection to 128 dims (Johnson–Lindenstrauss) that makes distances
cheaper. The official implementation streams the whole projected bank through each of the k iterations:
N * k distances, evaluated as matrix-vector products (memory-bound, ~370 s for 10 % of 164k features).

:func:`greedy_coreset` selects exactly the indices of the plain loop :func:`reference_greedy_coreset`,
in the same order. It evaluates about a tenth of the distances (measured on EfficientNet-Lite0 bank
features), nearly all of them as matrix-matrix products:

- Lazy min-distances. Each point i keeps ``upper[i]``, its exact min-distance over the centres it has
  been checked against. More centres can only lower it, so it is an upper bound on the true
  min-distance. A point only has to be exact while it might be the farthest one.
- Blocks. Let tau be the M-th largest bound. Every point with a bound >= tau is checked against the
  centres it has missed, and stops as soon as its bound falls below tau. Those still >= tau ("hot", at
  most M) are then exact, and every other point's true distance is < tau. So while the hot maximum is
  >= tau, it is the global maximum. The block runs the greedy loop on the hot points only (one [M, P]
  matrix-vector product per new centre) until the hot maximum drops below tau.
- Where to look first. Most checked points only need to find one centre closer than tau. The bank is
  cut into a few coarse regions (k-means). A region's points try the centres nearest its centroid
  first, in doubling GEMM tiles, and usually settle within a few dozen. Only the rest, mostly points
  about to become hot, sweep every missed centre, newest first, in large tiles.
- Exactness. The GEMM estimate ||q_i||^2 + ||q_c||^2 - 2 q_i.q_c has a rigorous error bound
  (:func:`_error_coefficient`). Only pairs whose lower bound can reach the point's current minimum are
  recomputed, with :func:`squared_distances`, the reference's own arithmetic. So every minimum, every
  argmax and every tie (smallest index wins) is bit-for-bit the reference's. The regions and the sweep
  order only change how much work is done, never the result.

Memory: the projected bank [N, P] float32, O(N) per-point state, O(k * P) for the centres, O(G * k) for
the region-to-centre distances (G <= 16 regions), and GEMM tiles of at most ``_TILE_ELEMENTS`` floats.
Never an N x N or N x k matrix.

Speed note: the GEMMs go through numpy's BLAS. On a machine whose cores are busy with other work, a
multi-threaded OpenBLAS spin-waits and can be many times slower than one thread (measured here: 66 s
instead of 12 s for 10 % of 200k). There, set ``OPENBLAS_NUM_THREADS=1``.
"""

from __future__ import annotations

import math
import numbers
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

# The projection and the start come from independent streams of one seed. Changing the projection
# dimension therefore does not change which point the selection starts from.
_START_STREAM = 1

# A selected point gets this min-distance, so it is never selected again, even when every remaining
# distance is 0 (more centres requested than there are distinct features).
_SELECTED = np.float32(-1.0)

# Refresh tiles. Phase 1 tries the _SORTED_HEAD centres nearest a region's centroid in tiles of 64, 128,
# ... columns. The first tile is small because most points settle in it. Phase 2 takes the remaining
# points through contiguous blocks of centres. One GEMM has at most _ROW_TILE rows and _TILE_ELEMENTS
# products (16 MB of float32), which bounds the temporary memory.
_COL_TILE_FIRST = 64
_SORTED_HEAD = 1024
_ROW_TILE = 4096
_TILE_ELEMENTS = 1 << 22

# Regions that order the sweeps: about _REGION_SIZE points each, at most _REGIONS_MAX. Measured on
# EfficientNet-Lite0 features (10 % of 200k): 16 regions does ~30 % more distance evaluations than 64
# but runs faster, because its tiles are larger; 8 regions is slower again.
_REGION_SIZE = 2000
_REGIONS_MAX = 16
_REGION_STREAM = 2
_LLOYD_ITERATIONS = 4

# M, the hot-set size. It trades the per-centre [M, P] product against the number of blocks (each block
# costs a partition of N and a refresh). Measured on EfficientNet-Lite0 features, 10 % of 200k: CPU time
# 5.7 / 4.5 / 4.1 s for M = 4096 / 8192 / 16384. Small banks are flat between N/40 and N/10.
_HOT_FRACTION = 16
_HOT_MIN = 1024
_HOT_MAX = 16384


def resolve_count(spec: float | int, n: int) -> int:
    """How many of ``n`` features to keep: a float in (0, 1] is a ratio, an int >= 1 is a count.

    A ratio is rounded to the nearest count, so 0.29 * 100 gives 29 (``int()`` would give 28 through
    floating-point error). The result is clamped to [1, n]: a tiny ratio still keeps one feature, and a
    count larger than the bank keeps the whole bank.
    """
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
        raise ValueError(f"coreset: the memory bank must hold at least one feature, got n={n!r}")
    if isinstance(spec, bool):
        raise ValueError(f"coreset size: expected a ratio in (0, 1] or a count >= 1, got the boolean {spec!r}")
    if isinstance(spec, numbers.Integral):
        if spec < 1:
            raise ValueError(f"coreset size: a count must be >= 1, got {spec}")
        return int(min(int(spec), n))
    if isinstance(spec, numbers.Real):
        ratio = float(spec)
        if not (0.0 < ratio <= 1.0):  # also rejects NaN
            raise ValueError(
                f"coreset size: a float is a ratio and must be in (0, 1], got {spec!r} "
                "(pass an int for an absolute count)"
            )
        return int(min(max(round(ratio * n), 1), n))
    raise ValueError(f"coreset size: expected a ratio in (0, 1] or a count >= 1, got {type(spec).__name__} {spec!r}")


def _as_feature_matrix(features: np.ndarray) -> np.ndarray:
    """Validate ``[N, D]`` finite real features and return them as C-contiguous float32."""
    array = np.asarray(features)
    if array.ndim != 2 or array.shape[0] < 1 or array.shape[1] < 1:
        raise ValueError(f"coreset: features must be a non-empty [N, D] matrix, got shape {list(array.shape)}")
    if not (np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)):
        raise ValueError(f"coreset: features must be real numbers, got dtype {array.dtype}")
    array = np.ascontiguousarray(array, dtype=np.float32)
    finite = np.isfinite(array).all(axis=1)
    if not finite.all():
        raise ValueError(f"coreset: features contain NaN or inf (first bad row: {int(np.flatnonzero(~finite)[0])})")
    return array


def random_projection(features: np.ndarray, dim: int = 128, seed: int = 0) -> np.ndarray:
    """Seeded Gaussian Johnson–Lindenstrauss projection psi: ``[N, D]`` -> ``[N, dim]`` float32.

    psi(x) = x W with W_jl ~ N(0, 1/dim) i.i.d. Then E ||psi(x) - psi(y)||^2 = ||x - y||^2: distances are
    preserved in expectation, and within (1 +- eps) for all pairs when dim ~ log N / eps^2.

    When ``dim >= D`` the features come back unchanged (as float32). Projecting up cannot make distances
    cheaper, and the identity keeps the exact geometry instead of a JL distortion of it. (The official
    implementation projects even then; we skip an approximation whose target we can compute directly.)
    """
    features = _as_feature_matrix(features)
    if isinstance(dim, bool) or not isinstance(dim, numbers.Integral) or dim < 1:
        raise ValueError(f"coreset: projection dim must be an integer >= 1, got {dim!r}")
    n_dims = features.shape[1]
    if dim >= n_dims:
        return features
    rng = np.random.default_rng(seed)
    weights = rng.standard_normal((n_dims, int(dim)), dtype=np.float32)
    weights *= np.float32(1.0 / math.sqrt(dim))
    return np.ascontiguousarray(features @ weights)


def _selection_space(features: np.ndarray, dim: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The rows both selections measure distances on, psi(x) minus the bank mean ``[N, P]`` float32, and
    their squared norms ``[N]`` float32.

    A translation changes no distance. It does shrink the norms, and the GEMM error bound scales with
    the norms. Features whose squared distances could overflow float32 are refused.
    """
    return _centred(random_projection(features, dim, seed))


def _centred(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``rows [N, P]`` minus their mean (float32), and the squared norms ``[N]`` of the result."""
    centred = rows - rows.mean(axis=0, dtype=np.float64).astype(np.float32)
    norms = np.einsum("ij,ij->i", centred, centred, dtype=np.float64)
    # ||q_i - q_c||^2 <= 2 (||q_i||^2 + ||q_c||^2), so this margin keeps every distance finite.
    if not (norms < np.finfo(np.float32).max / 8).all():
        raise ValueError("coreset: features too large: squared distances would overflow float32 (rescale them)")
    return centred, norms.astype(np.float32)


def squared_distances(points: np.ndarray, centres: np.ndarray) -> np.ndarray:
    """``||points_i - centres_i||^2`` for ``points [M, P]`` float32 and ``centres [P]`` or ``[M, P]``: ``[M]`` float32.

    The one definition of a point-to-centre distance that both selections use. Each row's value depends
    only on that row: float32 differences, then numpy's per-row sum of squares. It does not depend on
    which other rows share the batch (the tests check this). That is why the fast selection can match
    the plain one bit for bit.
    """
    diff = points - centres
    return np.einsum("ij,ij->i", diff, diff)


def _start_index(n: int, seed: int) -> int:
    """The first centre: a seeded random start, as in the official implementation."""
    return int(np.random.default_rng([int(seed), _START_STREAM]).integers(n))


@dataclass
class CoresetResult:
    """A selected coreset and how it was obtained."""

    indices: np.ndarray  # int64 [n_select], rows of the bank, in selection order
    n_total: int  # N, the size of the bank it was selected from
    projection_dim: int  # P, the dimension distances were measured in (= D when no projection was applied)
    seed: int  # seeds both the projection and the random start
    seconds: float  # wall time of the selection, projection included
    # Point-to-centre distances evaluated in the P-dim space, by matrix product or directly. The plain
    # loop evaluates N * n_select.
    distance_evaluations: int
    # How many of those were computed by `squared_distances` (the exact arithmetic that decides).
    exact_evaluations: int
    # radii[t]: covering radius of the first t + 1 centres in the P-dim space (the distance from the
    # point chosen next to its nearest centre). radii[-1] is the radius of the whole coreset.
    radii: np.ndarray

    @property
    def n_select(self) -> int:
        return int(self.indices.shape[0])

    @property
    def ratio(self) -> float:
        return self.n_select / self.n_total


def _check_count(n_select: int, n: int) -> int:
    if isinstance(n_select, bool) or not isinstance(n_select, numbers.Integral):
        raise ValueError(f"coreset: n_select must be an int (use resolve_count for ratios), got {n_select!r}")
    if not (1 <= n_select <= n):
        raise ValueError(f"coreset: n_select must be in [1, {n}] for a bank of {n} features, got {n_select}")
    return int(n_select)


def reference_greedy_coreset(
    features: np.ndarray, n_select: int, projection_dim: int = 128, seed: int = 0
) -> CoresetResult:
    """Algorithm 1 as written: each iteration updates every point's min-distance. O(N * k * P) time.

    ``features [N, D]``. Uses the projection, start and distance function of :func:`greedy_coreset`.
    Ties in the argmax go to the smallest index (``np.argmax``).
    """
    began = time.perf_counter()
    rows, _ = _selection_space(features, projection_dim, seed)
    n = rows.shape[0]
    n_select = _check_count(n_select, n)
    min_distance = np.full(n, np.inf, dtype=np.float32)  # squared distance to the nearest selected point
    indices = np.empty(n_select, dtype=np.int64)
    radii = np.empty(n_select, dtype=np.float32)
    chosen = _start_index(n, seed)
    for t in range(n_select):
        indices[t] = chosen
        np.minimum(min_distance, squared_distances(rows, rows[chosen]), out=min_distance)
        min_distance[chosen] = _SELECTED
        chosen = int(np.argmax(min_distance))
        radii[t] = min_distance[chosen]
    return CoresetResult(
        indices=indices,
        n_total=n,
        projection_dim=rows.shape[1],
        seed=seed,
        seconds=time.perf_counter() - began,
        distance_evaluations=n * n_select,
        exact_evaluations=n * n_select,
        radii=np.sqrt(np.maximum(radii, 0.0)),
    )


def greedy_coreset(
    features: np.ndarray,
    n_select: int,
    projection_dim: int = 128,
    seed: int = 0,
    progress: Callable[[int, int], None] | None = None,
    hot_size: int | None = None,
) -> CoresetResult:
    """Algorithm 1 with lazy, GEMM-batched min-distance updates (see the module docstring).

    ``features [N, D]`` float32, ``n_select`` in [1, N] (see :func:`resolve_count`). Selects exactly the
    indices :func:`reference_greedy_coreset` selects, in the same order. ``progress(done, total)`` is
    called about a hundred times. ``hot_size`` is M (None: N/16 clamped to [1024, 16384]). It only
    changes the speed, never the result.
    """
    began = time.perf_counter()
    rows, norms = _selection_space(features, projection_dim, seed)
    n, dims = rows.shape
    n_select = _check_count(n_select, n)
    if hot_size is None:
        hot_size = _default_hot_size(n)
    if isinstance(hot_size, bool) or not isinstance(hot_size, numbers.Integral) or hot_size < 1:
        raise ValueError(f"coreset: hot_size must be an integer >= 1, got {hot_size!r}")
    hot_size = min(int(hot_size), n)
    bank = _LazyBank(rows, norms, n_select, _start_index(n, seed))
    report_every = max(1, n_select // 100)

    finished = False
    while not finished:
        # Block start: tau = the M-th largest bound. Every point at or above tau becomes exact (or drops below).
        tau = np.partition(bank.upper, n - hot_size)[n - hot_size]
        bank.refresh(np.flatnonzero((bank.upper >= tau) & (bank.exact_upto < bank.n_centres)), tau)
        hot = _HotSet(bank, np.flatnonzero(bank.upper >= tau))
        while (slot := hot.farthest(tau)) is not None:
            # The farthest point's min-distance is the covering radius of the centres so far.
            bank.radii[bank.n_centres - 1] = hot.distance[slot]
            if bank.n_centres == n_select:  # this farthest point only measured the final radius
                finished = True
                break
            bank.add_centre(int(hot.points[slot]))
            hot.update(bank, slot)
            if progress is not None and bank.n_centres % report_every == 0:
                progress(bank.n_centres, n_select)
        hot.write_back(bank)

    if progress is not None:
        progress(n_select, n_select)
    return CoresetResult(
        indices=bank.indices,
        n_total=n,
        projection_dim=dims,
        seed=seed,
        seconds=time.perf_counter() - began,
        distance_evaluations=bank.evaluations,
        exact_evaluations=bank.exact_evaluations,
        radii=np.sqrt(np.maximum(bank.radii, 0.0)),
    )


def _default_hot_size(n: int) -> int:
    return min(max(n // _HOT_FRACTION, _HOT_MIN), _HOT_MAX, n)


def _error_coefficient(dims: int) -> np.float32:
    """kappa with |GEMM estimate - exact float32 distance| <= kappa * (||q_i||^2 + ||q_c||^2), all pairs.

    Error sources (u = 2^-24, P = dims):
    - the float32 dot product in any summation order (any BLAS kernel, FMA or not): gamma_P ~= P u
      times sum_j |q_ij q_cj|, which is at most half the norm sum;
    - the float32 norms and the additions around the GEMM: a few u times the norm sum;
    - the exact arithmetic :func:`squared_distances`: relative error <= (P + 3) u of a true distance,
      which is itself <= 2 (||q_i||^2 + ||q_c||^2).
    Together that is under (3P + 20) u. kappa = (8P + 128) u covers it more than twice over, and is still
    tiny: 7e-5 for P = 128.
    """
    return np.float32((8 * dims + 128) * 2.0**-24)


class _LazyBank:
    """Per-point state of the lazy selection, and the centres chosen so far.

    ``upper[i]`` is the exact min-distance of point i over the first ``exact_upto[i]`` centres, and maybe
    over some later ones. It is an upper bound on the true min-distance, and exact when
    ``exact_upto[i] == n_centres``. Estimates and bounds use the GEMM. Every value that ends up in
    ``upper`` comes from :func:`squared_distances`.
    """

    def __init__(self, rows: np.ndarray, norms: np.ndarray, n_select: int, start: int):
        n, dims = rows.shape
        self.rows = rows  # [N, P] float32, centred projected features
        self.norms = norms  # [N] float32, their squared norms
        self.kappa = _error_coefficient(dims)
        self.indices = np.empty(n_select, dtype=np.int64)
        self.radii = np.empty(n_select, dtype=np.float32)  # squared covering radius after t + 1 centres
        self.centre_rows = np.empty((n_select, dims), dtype=np.float32)  # -2 q_c (times 2 is exact)
        self.centre_low = np.empty(n_select, dtype=np.float32)  # (1 - kappa) ||q_c||^2
        self.centre_norms = np.empty(n_select, dtype=np.float32)  # ||q_c||^2
        self.n_centres = 0
        self.regions = _Regions(rows, n_select, seed=start)  # the start is already a function of the seed
        # First centre: every point's exact distance to it, as in the reference's first iteration.
        self.upper = squared_distances(rows, rows[start])
        self.upper[start] = _SELECTED
        self.exact_upto = np.ones(n, dtype=np.int64)
        self.evaluations = n
        self.exact_evaluations = n
        self.add_centre(start)

    def add_centre(self, point: int) -> None:
        slot = self.n_centres
        self.indices[slot] = point
        self.centre_rows[slot] = np.float32(-2.0) * self.rows[point]
        self.centre_norms[slot] = self.norms[point]
        self.centre_low[slot] = (np.float32(1.0) - self.kappa) * self.norms[point]
        self.regions.add_centre(slot, self.rows[point], self.norms[point])
        self.n_centres = slot + 1

    def add_centres(self, points: np.ndarray) -> None:
        """:meth:`add_centre` for many points at once (a given centre set, as in :func:`coverage_radius`)."""
        slots = slice(self.n_centres, self.n_centres + points.size)
        self.indices[slots] = points
        self.centre_rows[slots] = np.float32(-2.0) * self.rows[points]
        self.centre_norms[slots] = self.norms[points]
        self.centre_low[slots] = (np.float32(1.0) - self.kappa) * self.norms[points]
        self.regions.add_centres(slots, self.rows[points], self.norms[points])
        self.n_centres += points.size

    def farthest(self, hot_size: int) -> int:
        """The point farthest from the current centres (exact), without selecting it."""
        n = self.upper.size
        while True:
            tau = np.partition(self.upper, n - hot_size)[n - hot_size]
            self.refresh(np.flatnonzero((self.upper >= tau) & (self.exact_upto < self.n_centres)), tau)
            top = np.flatnonzero(self.upper >= tau)  # all exact now
            if top.size:
                return int(top[np.argmax(self.upper[top])])

    def refresh(self, points: np.ndarray, tau: np.float32) -> None:
        """Settle each stale point in ``points`` against ``tau`` by checking the centres it missed.

        Afterwards each point either is exact with ``upper >= tau``, or has ``upper < tau`` (then it
        cannot be the farthest in this block, and checking stopped there). Two phases:

        1. Region by region, the centres nearest the region's centroid, in doubling tiles: that is where a
           centre closer than tau most likely is. Most points settle here after a few dozen centres.
        2. The rest, all regions together: every missed centre, newest first, in contiguous blocks sized
           by the element budget. These are mostly the points that end up exact.

        Re-checking a centre a point has already seen is harmless: taking a minimum again changes nothing.
        """
        if points.size == 0:
            return
        label = self.regions.label[points]
        order = np.argsort(label, kind="stable")
        points, label = points[order], label[order]
        left: list[np.ndarray] = []
        for chunk in np.split(points, np.flatnonzero(np.diff(label)) + 1):
            for r0 in range(0, chunk.size, _ROW_TILE):
                rows = chunk[r0 : r0 + _ROW_TILE]
                left.append(self._sweep_nearest(rows, tau, int(self.regions.label[rows[0]])))
        left_over = np.concatenate(left)
        for r0 in range(0, left_over.size, _ROW_TILE):
            self._sweep_all(left_over[r0 : r0 + _ROW_TILE], tau)

    def _nearest_centres(self, region: int, begin: int) -> np.ndarray:
        """Up to _SORTED_HEAD centres of ``[begin, n_centres)``, the nearest to the region's centroid
        first."""
        distance = self.regions.to_centres[region, begin : self.n_centres]
        if distance.size > _SORTED_HEAD:
            head = np.argpartition(distance, _SORTED_HEAD - 1)[:_SORTED_HEAD]
            return begin + head[np.argsort(distance[head], kind="stable")]
        return begin + np.argsort(distance, kind="stable")

    def _sweep_nearest(self, points: np.ndarray, tau: np.float32, region: int) -> np.ndarray:
        """Phase 1 for ``points`` of one region. Returns the points still neither exact nor below tau."""
        state = _RowState(self, points)
        first = int(state.begin.min())
        head = self._nearest_centres(region, first)
        complete_after = None
        if head.size == self.n_centres - first:
            # The head is the whole range. A row is exact once the head position of its last missing
            # centre has been passed.
            position = np.empty(head.size, dtype=np.int64)
            position[head - first] = np.arange(head.size)
            complete_after = np.maximum.accumulate(position[::-1])[::-1][state.begin - first] + 1
        swept, width = 0, _COL_TILE_FIRST
        while swept < head.size:
            columns = head[swept : swept + width]
            swept, width = swept + columns.size, 2 * width
            self._lower(state, columns)
            complete = complete_after <= swept if complete_after is not None else None
            keep = state.settle(tau, complete)
            if keep is None:
                return points[:0]
            if complete_after is not None:
                complete_after = complete_after[keep]
        self.upper[state.points] = state.current  # still an upper bound; tightens phase 2's thresholds
        return state.points

    def _sweep_all(self, points: np.ndarray, tau: np.float32) -> None:
        """Phase 2: every missed centre, newest first, in contiguous blocks (no gather of centre rows)."""
        state = _RowState(self, points)
        c1 = self.n_centres
        while True:
            c0 = max(c1 - max(_TILE_ELEMENTS // state.points.size, _COL_TILE_FIRST), int(state.begin.min()))
            self._lower(state, slice(c0, c1))
            if state.settle(tau, state.begin >= c0) is None:
                return
            c1 = c0

    def _lower(self, state: _RowState, columns: np.ndarray | slice) -> None:
        """``state.current[i] = min(current[i], exact distance to every centre in columns)``.

        The GEMM gives every pair an estimate with a rigorous error bound. Only pairs whose lower bound
        can reach the row's current minimum (or the tile's smallest upper bound) are recomputed exactly,
        so the result is bit-for-bit the plain minimum.
        """
        kappa = self.kappa
        partial = state.q @ self.centre_rows[columns].T  # [r, c] = -2 q_i.q_c
        partial += self.centre_low[columns]  # = lower_ic - row_low_i
        self.evaluations += partial.size
        # lower_ic = row_low_i + centre_low_c - 2 q_i.q_c <= exact_ic <= lower_ic + 2 kappa (n_i + n_c), so
        # the smallest exact value of row i in the tile is at most
        # min_c partial_ic + row_high_i + 2 kappa max_c n_c.
        best = partial.min(axis=1)
        ceiling = best + state.row_high + np.float32(2.0) * kappa * self.centre_norms[columns].max()
        threshold = np.minimum(state.current, ceiling) - state.row_low
        touched = np.flatnonzero(best <= threshold)  # rows with at least one pair to check exactly
        if touched.size:
            hit_row, hit_col = np.nonzero(partial[touched] <= threshold[touched, None])
            hit_row = touched[hit_row]
            centres = self.indices[columns][hit_col]
            exact = squared_distances(self.rows[state.points[hit_row]], self.rows[centres])
            np.minimum.at(state.current, hit_row, exact)
            self.exact_evaluations += hit_row.size


class _RowState:
    """The rows of one refresh: their GEMM operands and running minima, shrinking as rows settle."""

    def __init__(self, bank: _LazyBank, points: np.ndarray):
        self.bank = bank
        self.points = points
        self.q = bank.rows[points]  # [r, P]
        norm = bank.norms[points]
        self.row_low = (np.float32(1.0) - bank.kappa) * norm
        self.row_high = (np.float32(1.0) + bank.kappa) * norm
        self.current = bank.upper[points]  # [r] (a copy)
        self.begin = bank.exact_upto[points]

    def settle(self, tau: np.float32, complete: np.ndarray | None) -> np.ndarray | None:
        """Write back the rows that are exact (``complete``) or below tau, and drop them.

        Returns the mask of rows kept, or None once no row is left.
        """
        done = self.current < tau
        if complete is not None:
            done |= complete
        keep = ~done
        if not done.any():
            return keep
        self.bank.upper[self.points[done]] = self.current[done]
        if complete is not None:
            self.bank.exact_upto[self.points[complete]] = self.bank.n_centres
        if done.all():
            return None
        self.points, self.q, self.current, self.begin = self.points[keep], self.q[keep], self.current[keep], self.begin[keep]
        self.row_low, self.row_high = self.row_low[keep], self.row_high[keep]
        return keep


class _Regions:
    """A coarse partition of the bank (a few Lloyd iterations of k-means) that orders refresh sweeps.

    Only a heuristic for *where to look first*: it changes the amount of work, never the selection.
    ``to_centres[g, c]`` is the squared distance from region g's centroid to centre c.
    """

    def __init__(self, rows: np.ndarray, n_select: int, seed: int):
        n = rows.shape[0]
        n_regions = int(min(max(n // _REGION_SIZE, 1), _REGIONS_MAX))
        rng = np.random.default_rng([int(seed), _REGION_STREAM])
        sample = rows[rng.choice(n, min(n, 50 * n_regions), replace=False)]
        centroids = sample[rng.choice(len(sample), n_regions, replace=False)]
        for _ in range(_LLOYD_ITERATIONS):
            nearest = self._nearest(sample, centroids)
            sums = np.zeros_like(centroids, dtype=np.float64)
            np.add.at(sums, nearest, sample)
            counts = np.bincount(nearest, minlength=n_regions)
            filled = counts > 0
            centroids[filled] = (sums[filled] / counts[filled, None]).astype(np.float32)
        self.centroids = centroids  # [G, P]
        self.centroid_norms = np.einsum("ij,ij->i", centroids, centroids)
        self.label = np.concatenate([self._nearest(rows[r0 : r0 + 65536], centroids) for r0 in range(0, n, 65536)])
        self.to_centres = np.empty((n_regions, n_select), dtype=np.float32)

    @staticmethod
    def _nearest(points: np.ndarray, centroids: np.ndarray) -> np.ndarray:
        scores = points @ centroids.T  # argmin ||p - c||^2 = argmin (||c||^2 - 2 p.c)
        scores *= np.float32(-2.0)
        scores += np.einsum("ij,ij->i", centroids, centroids)
        return np.argmin(scores, axis=1)

    def add_centre(self, slot: int, row: np.ndarray, row_norm: np.float32) -> None:
        self.to_centres[:, slot] = self.centroid_norms + row_norm - np.float32(2.0) * (self.centroids @ row)

    def add_centres(self, slots: slice, rows: np.ndarray, row_norms: np.ndarray) -> None:
        for c0 in range(0, rows.shape[0], 65536):  # bounded temporary [G, 65536]
            block = slice(slots.start + c0, min(slots.start + c0 + 65536, slots.stop))
            part = rows[c0 : c0 + 65536]
            self.to_centres[:, block] = (
                self.centroid_norms[:, None] + row_norms[c0 : c0 + 65536][None] - np.float32(2.0) * (self.centroids @ part.T)
            )


class _HotSet:
    """The points that may be the farthest during one block, kept exact after every new centre.

    ``points [H]`` are in ascending order, so ``np.argmax`` breaks ties toward the smallest index, as the
    reference does. ``distance [H]`` holds their exact min-distances. Their rows are copied once per
    block, so each new centre costs one [H, P] matrix-vector product.
    """

    def __init__(self, bank: _LazyBank, points: np.ndarray):
        self.points = points
        self.rows = np.float32(-2.0) * bank.rows[points]  # [H, P]
        self.distance = bank.upper[points]
        self.row_low = (np.float32(1.0) - bank.kappa) * bank.norms[points]
        # A pair needs an exact check when lower_ic - row_low_i <= slack_i (lower_ic <= distance_i).
        self.slack = self.distance - self.row_low

    def farthest(self, tau: np.float32) -> int | None:
        """Slot of the farthest hot point, or None once it is below ``tau`` (the block is over)."""
        if self.points.size == 0:
            return None
        slot = int(np.argmax(self.distance))
        return slot if self.distance[slot] >= tau else None

    def update(self, bank: _LazyBank, slot: int) -> None:
        """Take into account the centre just added (hot point ``slot``)."""
        centre = int(self.points[slot])
        partial = self.rows @ bank.rows[centre]  # [H] = -2 q_i.q_c
        partial += bank.centre_low[bank.n_centres - 1]
        hits = np.flatnonzero(partial <= self.slack)
        bank.evaluations += self.points.size
        if hits.size:
            exact = squared_distances(bank.rows[self.points[hits]], bank.rows[centre])
            lowered = np.minimum(self.distance[hits], exact)
            self.distance[hits] = lowered
            self.slack[hits] = lowered - self.row_low[hits]
            bank.exact_evaluations += hits.size
        self.distance[slot] = _SELECTED
        self.slack[slot] = _SELECTED - self.row_low[slot]

    def write_back(self, bank: _LazyBank) -> None:
        bank.upper[self.points] = self.distance
        bank.exact_upto[self.points] = bank.n_centres


def coverage_radius(features: np.ndarray, indices: np.ndarray) -> float:
    """max over bank rows of the distance to the nearest selected row, in the full (unprojected) space.

    ``features [N, D]``, ``indices [k]``. Exact, without an approximate index, in bounded memory. It is
    the same question as the greedy's next step (which point is farthest from the centres?), so it uses
    the same lazy machinery on the full-dimensional rows. That finds the farthest point under float32
    distances, at a fraction of the N * k * D brute-force cost. Every point whose float32 distance
    comes within twice float32's error bound of that maximum is then measured against every selected row
    from float64 differences, and the largest of those is returned. So the result is the float64 value
    for the true farthest point.
    """
    bank = _as_feature_matrix(features)
    index = np.asarray(indices)
    if index.ndim != 1 or index.size == 0 or not np.issubdtype(index.dtype, np.integer):
        raise ValueError(f"coverage_radius: indices must be a non-empty 1-D integer array, got shape {list(index.shape)}")
    if index.min() < 0 or index.max() >= bank.shape[0]:
        raise ValueError(f"coverage_radius: indices out of range for a bank of {bank.shape[0]} rows")
    index = np.unique(index)  # a set of centres; duplicates add nothing
    rows, norms = _centred(bank)
    lazy = _LazyBank(rows, norms, index.size, int(index[0]))
    lazy.add_centres(index[1:])
    lazy.upper[index] = _SELECTED  # distance 0 to themselves
    farthest = lazy.farthest(_default_hot_size(bank.shape[0]))
    radius2 = float(lazy.upper[farthest])
    if radius2 <= 0.0:
        return 0.0
    # float32 distances are within (P + 3) u relative of the true ones: any point that could be the true
    # farthest has a float32 distance >= radius2 (1 - 2 eps). Make those exact, then measure them in float64.
    eps = 2.0 * (bank.shape[1] + 3) * 2.0**-24
    floor = np.float32(radius2 * (1.0 - 2.0 * eps))
    lazy.refresh(np.flatnonzero((lazy.upper >= floor) & (lazy.exact_upto < lazy.n_centres)), floor)
    candidates = np.flatnonzero(lazy.upper >= floor)
    selected = bank[index].astype(np.float64)
    best = 0.0
    for point in candidates:
        diff = selected - bank[point].astype(np.float64)
        best = max(best, float(np.einsum("ij,ij->i", diff, diff).min()))
    return math.sqrt(best)
