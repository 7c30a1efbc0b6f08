"""Greedy coreset speed and exactness: pcedge's lazy GEMM-batched selection against the plain loop.

For each bank size N and coreset ratio, this measures:
- the wall time of :func:`pcedge.export.coreset.greedy_coreset`, after a warm-up;
- its distance evaluations as a fraction of the plain loop's N * k;
- the plain loop's time, extrapolated from a few of its iterations timed at the same N (each iteration
  costs the same: one pass over the bank).
On the smaller sizes (``--verify-sizes``) the plain loop runs in full, and the two selections must be
identical, index for index. It also records the coverage radius in the full space (exact, see
:func:`pcedge.export.coreset.coverage_radius`): greedy, and a seeded random subset of the same size.

Features: real EfficientNet-Lite0 patch features [N, 152].
- ``--features`` takes files given explicitly.
- Otherwise it uses ``/work/notes/features/*_train.npy`` when present. The first file is the primary
  bank: N rows are a seeded subsample of it. When N exceeds it, the subsample is drawn from all files
  concatenated; the JSON names the files in each run's ``source``.
- With no feature files (or ``--image-features``), it builds real-image features from the shared
  datasets: 7x7 RGB patches (147) plus 5 gradient/texture channels = 152 dims, every 4th pixel of
  224x224 images.

    python benchmarks/bench_coreset.py                                  # default grid, results/coreset.json
    python benchmarks/bench_coreset.py --sizes 25000 200000 --ratios 0.1 --blas-threads 1
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NOTES_FEATURES = "/work/notes/features/*_train.npy"
IMAGE_DATASETS = ("/work/shared/data/deeppcb/pcb", "/work/shared/data/bsdata/ball_screw_drive")
DIM = 152


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--features", nargs="+", default=None,
                        help=f"float32 [N, {DIM}] .npy feature files (default: {NOTES_FEATURES}, else image features)")
    parser.add_argument("--image-features", action="store_true",
                        help="ignore feature files: use 7x7 RGB + gradient patch features of the shared dataset images")
    parser.add_argument("--sizes", type=int, nargs="+", default=[25_000, 50_000, 100_000, 200_000, 400_000])
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.01, 0.1, 0.25])
    parser.add_argument("--max-selected", type=int, default=50_000,
                        help="skip (N, ratio) pairs that select more than this many features (affordability)")
    parser.add_argument("--verify-sizes", type=int, nargs="*", default=[10_000, 20_000],
                        help="sizes on which the plain loop runs in full and the selections are compared")
    parser.add_argument("--verify-ratios", type=float, nargs="*", default=[0.01, 0.1, 0.25])
    parser.add_argument("--reference-iterations", type=int, default=50,
                        help="at least this many plain-loop iterations are timed per size, to extrapolate its full time")
    parser.add_argument("--coverage-max-n", type=int, default=1_000_000,
                        help="record coverage radii (greedy vs random subset) up to this N")
    parser.add_argument("--projection-dim", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--blas-threads", type=int, default=None,
                        help="set OPENBLAS/OMP/MKL thread counts before numpy loads (default: leave the environment)")
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "coreset.json")
    return parser.parse_args(argv)


@dataclass
class Machine:
    cpu_model: str
    usable_cpus: int
    platform: str
    python: str
    numpy: str
    blas: str
    blas_threads_env: dict[str, str]
    loadavg_start: list[float]
    loadavg_end: list[float] = field(default_factory=list)


@dataclass
class FeatureSource:
    kind: str  # "files" or "images"
    files: list[str]
    rows: list[int]  # rows per file
    dim: int
    note: str


@dataclass
class Run:
    n: int
    ratio: float
    k: int
    source: str  # where the N rows came from
    seconds: float  # wall time
    cpu_seconds: float  # process CPU time: with one BLAS thread, what an otherwise idle core would take
    distance_evaluations: int
    evaluation_fraction: float  # distance evaluations / (N * k)
    exact_evaluations: int
    exact_per_centre: float
    reference_seconds_extrapolated: float  # plain loop: measured seconds per iteration at this N, times k
    speedup_vs_reference: float
    radius_projected: float  # the greedy's final covering radius in the projected space
    coverage_radius: float | None = None  # full space, greedy
    coverage_radius_random: float | None = None  # full space, seeded random subset of the same size
    coverage_seconds: float | None = None


@dataclass
class Verification:
    n: int
    ratio: float
    k: int
    identical: bool  # same indices in the same order
    identical_radii: bool  # every covering radius bit for bit
    pcedge_seconds: float
    reference_seconds: float
    first_mismatch: int | None


@dataclass
class Report:
    machine: Machine
    features: FeatureSource
    projection_dim: int
    seed: int
    warmup: str
    runs: list[Run]
    verifications: list[Verification]
    all_identical: bool


def describe_machine() -> Machine:
    import numpy as np

    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as handle:
            cpu = next(line.split(":", 1)[1].strip() for line in handle if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        blas_info = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
        blas = f"{blas_info.get('name', '?')} {blas_info.get('version', '')}".strip()
    except Exception:  # numpy without mode="dicts"
        blas = "unknown"
    threads = {k: os.environ[k] for k in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS") if k in os.environ}
    return Machine(cpu_model=cpu, usable_cpus=len(os.sched_getaffinity(0)), platform=platform.platform(),
                   python=platform.python_version(), numpy=np.__version__, blas=blas, blas_threads_env=threads,
                   loadavg_start=[round(x, 2) for x in os.getloadavg()])


# --------------------------------------------------------------------------------------------------
# Features
# --------------------------------------------------------------------------------------------------


def image_features(path: str, side: int = 224, stride: int = 4, patch: int = 7):
    """Real-image patch features ``[(side/stride)^2, 152]``: 7x7 RGB patch (147) + gx, gy, |g|, Laplacian, local std."""
    import cv2
    import numpy as np

    from pcedge.runtime.preprocess import read_image, to_rgb_float

    rgb = cv2.resize(to_rgb_float(read_image(path), path), (side, side), interpolation=cv2.INTER_AREA)
    gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    gx = cv2.Sobel(gray, cv2.CV_32F, 1, 0, ksize=3)
    gy = cv2.Sobel(gray, cv2.CV_32F, 0, 1, ksize=3)
    mean = cv2.blur(gray, (patch, patch))
    std = np.sqrt(np.maximum(cv2.blur(gray * gray, (patch, patch)) - mean * mean, 0.0))
    extra = np.stack([gx, gy, np.hypot(gx, gy), cv2.Laplacian(gray, cv2.CV_32F, ksize=3), std], -1)
    half = patch // 2
    padded = cv2.copyMakeBorder(rgb, half, half, half, half, cv2.BORDER_REFLECT)
    windows = np.lib.stride_tricks.sliding_window_view(padded, (patch, patch), axis=(0, 1))[::stride, ::stride]
    grid = windows.shape[0] * windows.shape[1]
    return np.concatenate([windows.reshape(grid, -1), extra[::stride, ::stride].reshape(grid, -1)], 1).astype(np.float32)


class FeaturePool:
    """Where bank rows come from: feature files (primary first), or features of real images."""

    def __init__(self, files: list[str] | None, seed: int):
        import numpy as np

        self.seed = seed
        self.arrays: list = []
        if files is None:
            files = sorted(glob.glob(NOTES_FEATURES), key=lambda f: -os.path.getsize(f))
        if files:
            for name in files:
                array = np.load(name, mmap_mode="r")
                if array.ndim != 2 or array.shape[1] != DIM or array.dtype != np.float32:
                    raise SystemExit(f"{name}: expected float32 [N, {DIM}] features, got {array.dtype} {list(array.shape)}")
                self.arrays.append(array)
            self.source = FeatureSource(
                kind="files", files=list(files), rows=[a.shape[0] for a in self.arrays], dim=DIM,
                note="EfficientNet-Lite0 patch features. N rows = a seeded subsample of the first file; "
                     "N above its size draws from all files concatenated (see each run's source)")
        else:
            self.source = FeatureSource(kind="images", files=[], rows=[], dim=DIM,
                                        note="no feature files: 7x7 RGB patches + 5 gradient channels of shared "
                                             "dataset images (224x224, stride 4), built on demand")
        self._image_cache = None
        self._last: tuple[int, object, str] | None = None

    def bank(self, n: int):
        """``[n, 152]`` float32 rows and a description of where they came from (the same rows for the same n)."""
        if self._last is None or self._last[0] != n:
            rows, source = self._draw(n)
            self._last = (n, rows, source)
        return self._last[1], self._last[2]

    def _draw(self, n: int):
        import numpy as np

        rng = np.random.default_rng(self.seed)
        if self.source.kind == "images":
            pool = self._images(n)
            return np.ascontiguousarray(pool[np.sort(rng.choice(len(pool), n, replace=False))]), "shared images"
        primary = self.arrays[0]
        if n <= primary.shape[0]:
            rows = np.sort(rng.choice(primary.shape[0], n, replace=False))
            return np.ascontiguousarray(primary[rows]), f"subsample of {Path(self.source.files[0]).name}"
        total = sum(a.shape[0] for a in self.arrays)
        if n > total:
            raise SystemExit(f"N={n} exceeds the {total} available feature rows; pass more --features files")
        rows = np.sort(rng.choice(total, n, replace=False))
        offsets = np.cumsum([0] + [a.shape[0] for a in self.arrays])
        parts = [np.asarray(a[rows[(rows >= lo) & (rows < hi)] - lo])
                 for a, lo, hi in zip(self.arrays, offsets[:-1], offsets[1:])]
        names = "+".join(Path(f).name for f in self.source.files)
        return np.ascontiguousarray(np.concatenate(parts)), f"subsample of {names} concatenated"

    def _images(self, n: int):
        import numpy as np

        from pcedge.runtime.preprocess import list_images

        if self._image_cache is None or len(self._image_cache) < n:
            paths = [str(p) for d in IMAGE_DATASETS for p in list_images(Path(d) / "train" / "good")]
            np.random.default_rng(self.seed).shuffle(paths)
            per_image = (224 // 4) ** 2
            needed = -(-n // per_image) + 1
            if needed > len(paths):
                raise SystemExit(f"N={n} needs {needed} images, only {len(paths)} available")
            self._image_cache = np.concatenate([image_features(p) for p in paths[:needed]])
            self.source.files = paths[:needed]
        return self._image_cache


# --------------------------------------------------------------------------------------------------
# Measurements
# --------------------------------------------------------------------------------------------------


def reference_seconds_per_iteration(bank, min_iterations: int, projection_dim: int, seed: int) -> float:
    """Seconds per plain-loop iteration at this N (each iteration is one pass over the bank).

    The difference between a run of 1 + m iterations and a run of 1 removes the projection, which the
    full reference pays once. m is chosen to be at least ~2e7 distance evaluations (about a second), and
    each run is the best of three.
    """
    from pcedge.export.coreset import reference_greedy_coreset

    n = len(bank)
    m = max(min_iterations, min(2_000, 20_000_000 // n))
    m = min(m, n - 1)
    short = min(reference_greedy_coreset(bank, 1, projection_dim, seed).seconds for _ in range(3))
    longer = min(reference_greedy_coreset(bank, 1 + m, projection_dim, seed).seconds for _ in range(3))
    return max(longer - short, 1e-9) / m


def measure(pool: FeaturePool, n: int, ratio: float, args, per_iteration: float) -> Run:
    import numpy as np

    from pcedge.export.coreset import coverage_radius, greedy_coreset, resolve_count

    bank, source = pool.bank(n)
    k = resolve_count(ratio, n)
    cpu_began = time.process_time()
    result = greedy_coreset(bank, k, projection_dim=args.projection_dim, seed=args.seed)
    cpu = time.process_time() - cpu_began
    reference = per_iteration * k
    run = Run(n=n, ratio=ratio, k=k, source=source, seconds=round(result.seconds, 3), cpu_seconds=round(cpu, 3),
              distance_evaluations=result.distance_evaluations,
              evaluation_fraction=round(result.distance_evaluations / (n * k), 4),
              exact_evaluations=result.exact_evaluations, exact_per_centre=round(result.exact_evaluations / k, 1),
              reference_seconds_extrapolated=round(reference, 1),
              speedup_vs_reference=round(reference / result.seconds, 1),
              radius_projected=float(result.radii[-1]))
    if n <= args.coverage_max_n:
        began = time.perf_counter()
        run.coverage_radius = coverage_radius(bank, result.indices)
        random_subset = np.random.default_rng(args.seed).choice(n, k, replace=False)
        run.coverage_radius_random = coverage_radius(bank, random_subset)
        run.coverage_seconds = round(time.perf_counter() - began, 2)
    return run


def verify(pool: FeaturePool, n: int, ratio: float, args) -> Verification:
    import numpy as np

    from pcedge.export.coreset import greedy_coreset, reference_greedy_coreset, resolve_count

    bank, _ = pool.bank(n)
    k = resolve_count(ratio, n)
    fast = greedy_coreset(bank, k, projection_dim=args.projection_dim, seed=args.seed)
    plain = reference_greedy_coreset(bank, k, projection_dim=args.projection_dim, seed=args.seed)
    mismatch = np.flatnonzero(fast.indices != plain.indices)
    return Verification(n=n, ratio=ratio, k=k, identical=mismatch.size == 0,
                        identical_radii=bool(np.array_equal(fast.radii, plain.radii)),
                        pcedge_seconds=round(fast.seconds, 3), reference_seconds=round(plain.seconds, 3),
                        first_mismatch=int(mismatch[0]) if mismatch.size else None)


def print_table(report: Report) -> None:
    print(f"\nfeatures: {report.features.kind} {', '.join(Path(f).name for f in report.features.files[:3])}"
          f"  (P = {report.projection_dim}, BLAS threads env {report.machine.blas_threads_env or 'default'}, "
          f"load {report.machine.loadavg_start} -> {report.machine.loadavg_end})")
    print(f"{'N':>8} {'ratio':>6} {'k':>7} {'pcedge s':>9} {'cpu s':>7} {'plain s*':>9} {'speedup':>8} {'evals/Nk':>9} "
          f"{'exact/k':>8} {'cov greedy':>11} {'cov random':>11}")
    for r in report.runs:
        cov = f"{r.coverage_radius:11.3f} {r.coverage_radius_random:11.3f}" if r.coverage_radius is not None else f"{'-':>11} {'-':>11}"
        print(f"{r.n:>8} {r.ratio:>6.2f} {r.k:>7} {r.seconds:>9.2f} {r.cpu_seconds:>7.2f} {r.reference_seconds_extrapolated:>9.1f} "
              f"{r.speedup_vs_reference:>7.1f}x {r.evaluation_fraction:>9.3f} {r.exact_per_centre:>8.1f} {cov}")
    print("  * plain loop: seconds per iteration measured at that N, times k")
    for v in report.verifications:
        print(f"verify N={v.n} ratio={v.ratio} k={v.k}: {'IDENTICAL' if v.identical and v.identical_radii else 'DIFFERENT'}"
              f" (pcedge {v.pcedge_seconds:.2f} s, plain loop {v.reference_seconds:.2f} s)")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.blas_threads is not None:
        # Must happen before numpy (and its BLAS) loads: hence the imports inside the functions above.
        for name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ[name] = str(args.blas_threads)
    from pcedge.export.coreset import greedy_coreset

    machine = describe_machine()
    pool = FeaturePool([] if args.image_features else args.features, args.seed)
    print(f"features: {pool.source.kind} {pool.source.files[:3]} rows {pool.source.rows}", file=sys.stderr)

    warm_bank, _ = pool.bank(min(20_000, max(args.sizes)))
    greedy_coreset(warm_bank, len(warm_bank) // 10, args.projection_dim, args.seed)  # warm-up: BLAS, caches, page-in
    warmup = f"one greedy_coreset run on {len(warm_bank)} rows at ratio 0.1 before timing"

    verifications = []
    for n in args.verify_sizes:
        for ratio in args.verify_ratios:
            verifications.append(verify(pool, n, ratio, args))
            v = verifications[-1]
            print(f"verify N={n} ratio={ratio}: identical={v.identical} ({v.pcedge_seconds} s vs {v.reference_seconds} s)",
                  file=sys.stderr)

    runs = []
    for n in args.sizes:
        per_iteration = None
        for ratio in args.ratios:
            if n * ratio > args.max_selected:
                print(f"skip N={n} ratio={ratio}: {int(n * ratio)} > --max-selected {args.max_selected}", file=sys.stderr)
                continue
            if per_iteration is None:
                per_iteration = reference_seconds_per_iteration(pool.bank(n)[0], args.reference_iterations,
                                                                args.projection_dim, args.seed)
            runs.append(measure(pool, n, ratio, args, per_iteration))
            r = runs[-1]
            print(f"N={n} ratio={ratio} k={r.k}: {r.seconds} s, evals {r.evaluation_fraction} of N*k, "
                  f"plain loop ~{r.reference_seconds_extrapolated} s", file=sys.stderr)

    machine.loadavg_end = [round(x, 2) for x in os.getloadavg()]
    report = Report(machine=machine, features=pool.source, projection_dim=args.projection_dim, seed=args.seed,
                    warmup=warmup, runs=runs, verifications=verifications,
                    all_identical=all(v.identical and v.identical_radii for v in verifications))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(args.out.name + ".tmp")
    from pcedge.runtime.files import to_jsonable  # NaN -> null: strict JSON
    tmp.write_text(json.dumps(to_jsonable(report), indent=2, allow_nan=False) + "\n")
    tmp.replace(args.out)
    print_table(report)
    print(f"wrote {args.out}")
    return 0 if report.all_identical else 1


if __name__ == "__main__":
    sys.exit(main())
