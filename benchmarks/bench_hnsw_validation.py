"""What it costs to never trust index.hnsw: structural validation versus rebuilding the graph on the device.

For each bank size (default 1k, 10k, 100k rows, D = 152) this builds an hnswlib index with the bundle
defaults (M = 16, ef_construction = 200), saves it, then measures

- ``validate_ms``: :func:`pcedge.runtime.hnsw_format.validate_hnsw_file` on the saved file (what every
  device load now pays before hnswlib sees the file), median over ``--repeats``;
- ``hnswlib_load_ms``: hnswlib's own ``load_index`` of the same file, for comparison;
- ``rebuild_s``: :meth:`HnswIndex.build` from the bank with every core (what a device pays when the file
  does not validate), median over ``--build-repeats`` (one at the largest size unless asked);
- the file size.

Bank rows are seeded Gaussian float32: validation cost depends on N, D, M and the level structure only.
Build time depends on the data too; for real patch features see ``bench_index.py``'s HNSW build times
(``results/index_bsdata.json``, BSData EfficientNet-Lite0 features, 2 threads, measured under a load
average of 8-11): 1k 0.19 s, 8k 2.1 s, 16k 5.7 s, 64k 19.8 s. The JSON records the load average at start
and end (2 shared cores: other processes' load slows every figure). The first validation of each size is the
slowest (allocation and cache warm-up); the median over repeats is reported and every repeat is kept.

    python benchmarks/bench_hnsw_validation.py --out results/hnsw_validation.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import hnswlib
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import load_average, log, machine_info, write_json  # noqa: E402

from pcedge.runtime.hnsw_format import validate_hnsw_file  # noqa: E402
from pcedge.runtime.index import HnswIndex, _resolve_threads  # noqa: E402


@dataclass
class SizeResult:
    n: int
    dim: int
    file_mb: float
    validate_ms: float
    validate_ms_all: list[float]
    hnswlib_load_ms: float
    rebuild_s: float
    rebuild_s_all: list[float]
    build_threads: int


@dataclass
class Report:
    machine: object
    load_start: list[float]
    load_end: list[float] = field(default_factory=list)
    M: int = 16
    ef_construction: int = 200
    bank: str = "seeded standard-normal float32 rows"
    sizes: list[SizeResult] = field(default_factory=list)


def measure(n: int, dim: int, repeats: int, build_repeats: int, tmp: Path) -> SizeResult:
    bank = np.random.default_rng(n).standard_normal((n, dim), dtype=np.float32)
    threads = _resolve_threads(None)
    builds, index = [], None
    for _ in range(build_repeats):
        started = time.perf_counter()
        index = HnswIndex.build(bank, M=16, ef_construction=200, seed=100, threads=threads)
        builds.append(time.perf_counter() - started)
    path = index.save(tmp / f"bank{n}.hnsw")
    validations, loads = [], []
    for _ in range(repeats):
        started = time.perf_counter()
        validate_hnsw_file(path, bank)
        validations.append((time.perf_counter() - started) * 1e3)
        started = time.perf_counter()
        loaded = hnswlib.Index(space="l2", dim=dim)
        loaded.load_index(str(path), max_elements=0)
        loads.append((time.perf_counter() - started) * 1e3)
        del loaded
    result = SizeResult(
        n=n, dim=dim, file_mb=round(path.stat().st_size / 1e6, 2),
        validate_ms=round(statistics.median(validations), 2), validate_ms_all=[round(v, 2) for v in validations],
        hnswlib_load_ms=round(statistics.median(loads), 2),
        rebuild_s=round(statistics.median(builds), 2), rebuild_s_all=[round(b, 2) for b in builds],
        build_threads=threads,
    )
    log(f"n={n}: validate {result.validate_ms} ms, hnswlib load {result.hnswlib_load_ms} ms, "
        f"rebuild {result.rebuild_s} s ({threads} threads), {result.file_mb} MB; load {load_average()}")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000, 10_000, 100_000])
    parser.add_argument("--dim", type=int, default=152)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--build-repeats", type=int, default=3, help="rebuild timings per size below 100k rows")
    parser.add_argument("--out", type=Path, default=Path("results/hnsw_validation.json"))
    args = parser.parse_args(argv)
    report = Report(machine=machine_info(), load_start=load_average())
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.sizes:
            builds = args.build_repeats if n < 100_000 else 1
            report.sizes.append(measure(n, args.dim, args.repeats, builds, Path(tmp)))
    report.load_end = load_average()
    write_json(args.out, report)
    log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
