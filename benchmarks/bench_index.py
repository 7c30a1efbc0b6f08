"""Exact versus HNSW nearest-neighbour search on real patch features: query time, recall, build, memory.

The typical query is one image's patches (784 = 28 x 28 rows of D = 152) against a memory bank of
1k .. 1M rows. For each bank size this measures

- the exact index (:class:`pcedge.runtime.index.ExactIndex`) and HNSW at several ``ef``: query time for one
  image (median and p95 over repeats, after warm-up) with 2 and 1 threads;
- HNSW recall@1 against exact on every query row given (several images if the query file has them);
- HNSW build time and memory (index file size, bank bytes);

and reports the crossover bank size from which HNSW at the default ef (with recall@1 >= 0.99) is faster
than exact. ``runtime/index.py``'s ``AUTO_CROSSOVER_N`` cites the result.

Timing: the exact index and every ef are called round-robin (one call each per round), so load from
other processes on a shared machine hits them alike and their ratios stay meaningful; the JSON records
the load average at start and end. The exact index's BLAS threads are set with threadpoolctl.

Features: ``--features BANK.npy`` (float32 [N, D], patch features of training images) and
``--queries QUERIES.npy`` (float32 [M, D], patch features of test images, M a multiple of 784). Without
them, real features are computed from ``--images`` / ``--query-images`` with the project's own
EfficientNet-Lite0 PatchEmbedder (needs the ``export`` extra: torch); ``--save-features DIR`` keeps them.

Bank rows are de-duplicated before sampling: PatchCore's greedy coreset never selects the same feature
twice, and exact duplicates make "the" nearest neighbour ambiguous. A bank of size n is a seeded random
sample of the unique rows (a coreset is more spread out than a random sample; recall on a real coreset
may differ somewhat).

    python benchmarks/bench_index.py --features bank.npy --queries test.npy --out results/index.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass, field
from importlib.util import find_spec
from pathlib import Path
from typing import Callable

import numpy as np

from pcedge.runtime.bundle import Geometry, IndexSpec
from pcedge.runtime.index import ExactIndex, HnswIndex
from pcedge.runtime.preprocess import list_images, load_batch

PATCHES_PER_IMAGE = 784  # the 28 x 28 grid of a 224 x 224 input at stride 8
RECALL_TARGET = 0.99
DEFAULT_SIZES = (1_000, 4_000, 16_000, 64_000, 256_000, 1_000_000)
DEFAULT_EFS = (8, 16, 32, 64, 128)
DEFAULT_IMAGES = ("/work/shared/data/deeppcb/pcb/train/good",)
DEFAULT_QUERY_IMAGES = ("/work/shared/data/deeppcb/pcb/test/defect", "/work/shared/data/deeppcb/pcb/test/good")


# --------------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------------


@dataclass
class Timing:
    """Wall-clock milliseconds of one call (one image's 784 queries, k = 1), over repeats after warm-up."""

    median_ms: float
    p95_ms: float
    min_ms: float
    repeats: int


@dataclass
class HnswPoint:
    ef: int
    recall_at_1: float  # nearest returned at the exact nearest distance (ties count as hits)
    recall_at_1_ids: float  # nearest returned id equals the exact id (stricter under ties)
    max_rel_distance_error: float  # max over queries of (d_hnsw - d_exact) / d_exact for the first neighbour
    timing: dict[str, Timing] = field(default_factory=dict)  # "threads=2" -> Timing


@dataclass
class SizeResult:
    n: int
    bank_bytes: int
    exact: dict[str, Timing] = field(default_factory=dict)  # "threads=2" -> Timing
    hnsw_build_seconds: float = 0.0
    hnsw_build_threads: int = 0
    hnsw_file_bytes: int = 0
    hnsw: list[HnswPoint] = field(default_factory=list)
    min_ef_for_recall: int | None = None  # smallest measured ef with recall@1 >= RECALL_TARGET


@dataclass
class Crossover:
    threads: int
    ef: int
    statistic: str  # "median_ms" (as asked) or "min_ms" (least disturbed by other load on a shared machine)
    smallest_faster_size: int | None  # smallest measured size from which HNSW is faster at every larger size
    interpolated_n: int | None  # where exact/hnsw time ratio crosses 1, log-log interpolated between sizes
    speedup_by_size: dict[str, float] = field(default_factory=dict)  # exact time / hnsw time
    note: str = ""


@dataclass
class Report:
    machine: dict[str, str]
    features: dict[str, object]
    settings: dict[str, object]
    sizes: list[SizeResult] = field(default_factory=list)
    skipped: list[dict[str, object]] = field(default_factory=list)
    crossover: list[Crossover] = field(default_factory=list)


# --------------------------------------------------------------------------------------------------
# Features
# --------------------------------------------------------------------------------------------------


def embed_images(paths: list[Path], batch: int = 16) -> np.ndarray:
    """Real PatchCore features of image files: ``[len(paths) * 784, 152]`` float32.

    EfficientNet-Lite0 through :class:`pcedge.export.embedder.PatchEmbedder` (torch, workstation side;
    imported here only), after the runtime's own preprocessing to the 224 x 224 network input.
    """
    import torch

    from pcedge.export.backbones import build_backbone
    from pcedge.export.embedder import PatchEmbedder

    embedder = PatchEmbedder(build_backbone("efficientnet_lite0"))
    out = []
    with torch.inference_mode():
        for start in range(0, len(paths), batch):
            images, _ = load_batch(paths[start : start + batch], Geometry())
            patches = embedder(torch.from_numpy(images)).numpy()
            out.append(patches.reshape(-1, patches.shape[-1]))
            done = min(start + batch, len(paths))
            if done == len(paths) or done % (10 * batch) == 0:
                print(f"  embedded {done}/{len(paths)} images", flush=True)
    return np.ascontiguousarray(np.concatenate(out), dtype=np.float32)


def load_features(path: Path) -> np.ndarray:
    array = np.load(path, allow_pickle=False, mmap_mode="r")
    if array.ndim != 2 or array.dtype != np.float32:
        raise SystemExit(f"{path}: expected float32 [N, D], found {array.dtype} {list(array.shape)}")
    return np.ascontiguousarray(array)


def unique_rows(features: np.ndarray) -> np.ndarray:
    """Distinct rows, in a seeded random order (so a prefix is a random sample of the distinct rows)."""
    distinct = np.unique(features, axis=0)
    return distinct[np.random.default_rng(0).permutation(len(distinct))]


# --------------------------------------------------------------------------------------------------
# Measurement
# --------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def blas_threads(n: int):
    """Limit numpy's BLAS pool (the exact index's matrix product) to ``n`` threads, if threadpoolctl is here."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        yield False
        return
    with threadpool_limits(limits=n, user_api="blas"):
        yield True


def time_interleaved(calls: dict[str, Callable[[], object]], warmup: int, repeats: int, budget_s: float,
                     min_repeats: int = 5) -> dict[str, Timing]:
    """Time each ``calls[name]()`` round-robin: one call of every variant per round.

    The machine is shared, so its load drifts; interleaving exposes every variant to the same drift,
    which keeps their *ratios* (the crossover) meaningful even when absolute times wobble. Stops after
    ``repeats`` rounds, or earlier once ``budget_s`` is spent and ``min_repeats`` rounds are done.
    """
    for _ in range(warmup):
        for fn in calls.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in calls}
    spent_from = time.perf_counter()
    for round_ in range(repeats):
        for name, fn in calls.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
        if round_ + 1 >= min_repeats and time.perf_counter() - spent_from > budget_s:
            break
    out = {}
    for name, values in times.items():
        ms = np.array(values) * 1e3
        out[name] = Timing(float(np.median(ms)), float(np.percentile(ms, 95)), float(ms.min()), len(values))
    return out


def recall_at_1(exact_d: np.ndarray, exact_ids: np.ndarray, d: np.ndarray, ids: np.ndarray) -> tuple[float, float, float]:
    """(distance-based recall@1, id-based recall@1, max relative distance error of the first neighbour)."""
    tolerance = 1e-5 * exact_d[:, 0] + 1e-6  # float32 rounding of two differently ordered sums
    hits = d[:, 0] <= exact_d[:, 0] + tolerance
    rel = (d[:, 0] - exact_d[:, 0]) / np.maximum(exact_d[:, 0], 1e-12)
    return float(hits.mean()), float((ids[:, 0] == exact_ids[:, 0]).mean()), float(max(rel.max(), 0.0))


def measure_size(
    bank: np.ndarray, queries: np.ndarray, args: argparse.Namespace, spec: IndexSpec, work_dir: Path
) -> SizeResult:
    one_image = queries[:PATCHES_PER_IMAGE]
    result = SizeResult(n=len(bank), bank_bytes=int(bank.nbytes))
    exact = ExactIndex(bank)
    with blas_threads(max(args.threads)):
        exact_d, exact_ids = exact.query(queries, 1)

    started = time.perf_counter()
    built = HnswIndex.build(
        bank, M=spec.M, ef_construction=spec.ef_construction, seed=spec.seed, threads=args.build_threads
    )
    result.hnsw_build_seconds = time.perf_counter() - started
    result.hnsw_build_threads = built.threads
    path = built.save(work_dir / f"index-{len(bank)}.hnsw")
    result.hnsw_file_bytes = path.stat().st_size
    del built
    index = HnswIndex.load(path, bank)  # time the index as the device uses it: loaded from its file
    path.unlink()
    for ef in args.efs:
        index.ef = ef
        d, ids = index.query(queries, 1)
        recall, recall_ids, rel = recall_at_1(exact_d, exact_ids, d, ids)
        result.hnsw.append(HnswPoint(ef=ef, recall_at_1=recall, recall_at_1_ids=recall_ids, max_rel_distance_error=rel))

    def query_at(ef: int) -> None:
        index.ef = ef  # a plain attribute; every query sets hnswlib's ef anyway
        index.query(one_image, 1)

    for threads in args.threads:
        index.threads = threads
        calls = {"exact": lambda: exact.query(one_image, 1)}
        calls.update({f"ef={ef}": (lambda ef=ef: query_at(ef)) for ef in args.efs})
        with blas_threads(threads):
            timings = time_interleaved(calls, args.warmup, args.repeats, args.budget)
        result.exact[f"threads={threads}"] = timings["exact"]
        for point in result.hnsw:
            point.timing[f"threads={threads}"] = timings[f"ef={point.ef}"]
    good = [p.ef for p in result.hnsw if p.recall_at_1 >= RECALL_TARGET]
    result.min_ef_for_recall = min(good) if good else None
    return result


def find_crossover(sizes: list[SizeResult], threads: int, ef: int, statistic: str = "median_ms") -> Crossover:
    """Smallest bank size from which HNSW (at ``ef``) beats exact, and a log-log interpolation.

    Only sizes where HNSW meets the recall target at ``ef`` take part; the others are named in the note
    (a bigger bank needs a bigger ef, see ``min_ef_for_recall``).
    """
    key = f"threads={threads}"
    crossover = Crossover(threads=threads, ef=ef, statistic=statistic, smallest_faster_size=None, interpolated_n=None)
    ratios = []  # (n, exact time / hnsw time) where recall meets the target
    missed = []
    for size in sizes:
        point = next(p for p in size.hnsw if p.ef == ef)
        speedup = getattr(size.exact[key], statistic) / getattr(point.timing[key], statistic)
        crossover.speedup_by_size[str(size.n)] = round(speedup, 3)
        if point.recall_at_1 >= RECALL_TARGET:
            ratios.append((size.n, speedup))
        else:
            missed.append(f"{size.n} (recall@1 {point.recall_at_1:.4f})")
    notes = [f"excluded, recall below {RECALL_TARGET} at ef={ef}: {', '.join(missed)}"] if missed else []
    for i in range(len(ratios)):
        if all(r > 1.0 for _, r in ratios[i:]):
            crossover.smallest_faster_size = ratios[i][0]
            if i > 0:
                (n0, r0), (n1, r1) = ratios[i - 1], ratios[i]
                # log(speedup) is close to linear in log(n): exact grows ~n, HNSW ~log n.
                t = -np.log(r0) / (np.log(r1) - np.log(r0))
                crossover.interpolated_n = int(round(np.exp(np.log(n0) + t * (np.log(n1) - np.log(n0)))))
            else:
                notes.append("HNSW is faster already at the smallest size measured")
            break
    else:
        notes.append("HNSW at this ef never stayed faster than exact at the sizes measured")
    crossover.note = "; ".join(notes)
    return crossover


# --------------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------------


def print_table(report: Report, ef_default: int) -> None:
    threads = report.settings["threads"]
    head = f"{'n':>8} {'build s':>8} {'file MB':>8} {'bank MB':>8} " + " ".join(
        f"{'exact t' + str(t):>10}" for t in threads
    )
    print(head + "   hnsw ef: ms(t" + "/t".join(str(t) for t in threads) + ") recall@1")
    for size in report.sizes:
        row = f"{size.n:>8} {size.hnsw_build_seconds:>8.1f} {size.hnsw_file_bytes / 2**20:>8.1f} "
        row += f"{size.bank_bytes / 2**20:>8.1f} "
        row += " ".join(f"{size.exact[f'threads={t}'].median_ms:>10.2f}" for t in threads)
        cells = []
        for p in size.hnsw:
            ms = "/".join(f"{p.timing[f'threads={t}'].median_ms:.2f}" for t in threads)
            mark = "*" if p.ef == ef_default else ""
            cells.append(f"{p.ef}{mark}: {ms} {p.recall_at_1:.4f}")
        print(row + "   " + "  ".join(cells))
    for skipped in report.skipped:
        print(f"skipped n={skipped['n']}: {skipped['reason']}")
    for c in report.crossover:
        print(
            f"crossover ({c.statistic}) threads={c.threads} ef={c.ef}: HNSW faster from n={c.smallest_faster_size} "
            f"(interpolated {c.interpolated_n}) {c.note}"
        )


def write_json(report: Report, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    from pcedge.runtime.files import to_jsonable  # NaN -> null: strict JSON
    tmp.write_text(json.dumps(to_jsonable(report), indent=2, allow_nan=False) + "\n")
    os.replace(tmp, out)


# --------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--features", type=Path, help="bank features, float32 [N, D] .npy (training images)")
    parser.add_argument("--queries", type=Path, help="query features, float32 [M, D] .npy (test images, M %% 784 == 0)")
    parser.add_argument("--images", nargs="+", default=list(DEFAULT_IMAGES),
                        help="without --features: folders of training images to embed for the bank")
    parser.add_argument("--query-images", nargs="+", default=list(DEFAULT_QUERY_IMAGES),
                        help="without --queries: folders of test images to embed for the queries")
    parser.add_argument("--save-features", type=Path, help="write the embedded bank.npy and queries.npy here")
    parser.add_argument("--query-count", type=int, default=8, help="images' worth of query rows used for recall")
    parser.add_argument("--sizes", type=int, nargs="+", default=list(DEFAULT_SIZES))
    parser.add_argument("--efs", type=int, nargs="+", default=list(DEFAULT_EFS))
    parser.add_argument("--threads", type=int, nargs="+", default=[2, 1], help="query thread counts to time")
    parser.add_argument("--build-threads", type=int, default=None, help="HNSW build threads (default: all cores)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--budget", type=float, default=30.0,
                        help="seconds per size and thread count before the timing rounds stop early")
    parser.add_argument("--max-exact-ms", type=float, default=20_000.0,
                        help="skip sizes whose predicted exact query (one image, most threads) exceeds this")
    parser.add_argument("--out", type=Path, default=Path("results/index.json"))
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    spec = IndexSpec()
    if args.features is not None:
        features = load_features(args.features)
        source = {"source": "file", "bank_file": str(args.features)}
    else:
        paths = [p for folder in args.images for p in list_images(folder)]
        print(f"embedding {len(paths)} bank images ...")
        features = embed_images(paths)
        source = {"source": "efficientnet_lite0 PatchEmbedder, 224x224 stretch, 28x28 grid",
                  "bank_images": args.images, "n_bank_images": len(paths)}
    if args.queries is not None:
        queries = load_features(args.queries)
        source["query_file"] = str(args.queries)
    else:
        paths = [p for folder in args.query_images for p in list_images(folder)]
        paths = paths[:: max(1, len(paths) // args.query_count)][: args.query_count]
        print(f"embedding {len(paths)} query images ...")
        queries = embed_images(paths)
        source["query_images"] = [str(p) for p in paths]
    if args.save_features is not None:
        args.save_features.mkdir(parents=True, exist_ok=True)
        np.save(args.save_features / "bank.npy", features)
        np.save(args.save_features / "queries.npy", queries)
    if queries.shape[1] != features.shape[1] or len(queries) < PATCHES_PER_IMAGE:
        raise SystemExit(f"queries {list(queries.shape)} do not fit bank features {list(features.shape)}")
    queries = queries[: args.query_count * PATCHES_PER_IMAGE]
    distinct = unique_rows(features)
    source.update(n_rows=int(len(features)), n_distinct_rows=int(len(distinct)), dim=int(features.shape[1]),
                  n_query_rows=int(len(queries)))
    del features

    report = Report(
        machine={"load_average_at_start": " ".join(f"{v:.2f}" for v in os.getloadavg()),
                 "platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                 "cpus_available": str(len(os.sched_getaffinity(0))), "python": sys.version.split()[0],
                 "numpy": np.__version__, "hnswlib": _version("hnswlib")},
        features=source,
        settings={"threads": args.threads, "efs": args.efs, "k": 1, "M": spec.M,
                  "ef_construction": spec.ef_construction, "seed": spec.seed, "default_ef": spec.ef,
                  "warmup": args.warmup, "repeats": args.repeats, "budget_s": args.budget,
                  "recall_target": RECALL_TARGET, "query": f"{PATCHES_PER_IMAGE} rows (one image), k=1",
                  "exact_blas_threads_set": find_spec("threadpoolctl") is not None},
    )
    last: SizeResult | None = None
    with tempfile.TemporaryDirectory(prefix="bench_index.") as work:
        for n in sorted(args.sizes):
            if n > len(distinct):
                report.skipped.append({"n": n, "reason": f"only {len(distinct)} distinct feature rows available"})
                continue
            if last is not None:
                predicted = last.exact[f"threads={max(args.threads)}"].median_ms * n / last.n
                if predicted > args.max_exact_ms:
                    report.skipped.append({"n": n, "reason": f"exact query predicted {predicted:.0f} ms "
                                                             f"> --max-exact-ms {args.max_exact_ms:.0f}"})
                    continue
            print(f"n={n} ...", flush=True)
            last = measure_size(np.ascontiguousarray(distinct[:n]), queries, args, spec, Path(work))
            report.sizes.append(last)
            write_json(report, args.out)  # keep partial results if a long run is interrupted
    if len(report.sizes) >= 2 and spec.ef in args.efs:
        report.crossover = [
            find_crossover(report.sizes, t, spec.ef, statistic) for statistic in ("median_ms", "min_ms") for t in args.threads
        ]
    report.machine["load_average_at_end"] = " ".join(f"{v:.2f}" for v in os.getloadavg())
    write_json(report, args.out)
    print_table(report, spec.ef)
    print(f"wrote {args.out}")
    return 0


def _version(module: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(module)
    except PackageNotFoundError:
        return "unknown"


if __name__ == "__main__":
    sys.exit(main())
