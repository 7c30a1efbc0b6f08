"""The thread split for the pipelined ``pcedge watch`` on this machine: ONNX Runtime intra-op threads
versus BLAS threads (the exact index and Eq. 7's products), which decides ``pcedge watch``'s default.

The pipeline runs the backbone (ONNX Runtime) in one thread and the index + scoring in another, at the
same time. On 2 cores, two intra-op threads for the backbone compete with the scoring thread for the
second core; one intra-op thread leaves it to the scorer. Which wins depends on the stage times, so it is
measured: for every split, :class:`~pcedge.runtime.watch.pipeline.WatchPipeline` runs headless on a looped
video of real test frames (good and defective, interleaved) for ``--seconds`` of wall time, every frame
processed; the splits are interleaved over ``--rounds`` so a burst of other work on the machine lands on
all of them. Headline per split: the median FPS over rounds; the JSON keeps every run with the load
average and the process CPU time per frame.

The index's own threads (hnswlib ``num_threads``) follow ``DetectorOptions.threads``, as in ``pcedge
watch``; with the default bundle ``auto`` resolves to the exact index (the bank is small), whose work runs
on the BLAS threads measured here.

    python benchmarks/bench_watch_threads.py               # -> results/watch_threads.json (~3 min)
    python benchmarks/bench_watch_threads.py --rounds 5 --seconds 20
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_watch import LoopRun, timed_pipeline, warm_up, write_video  # noqa: E402
from common import BSDATA, RESULTS, MachineInfo, cached_bundle, load_average, log, machine_info, write_json  # noqa: E402

from pcedge.runtime.detector import Detector, DetectorOptions  # noqa: E402

#: (ONNX Runtime intra-op threads = DetectorOptions.threads, BLAS threads = DetectorOptions.blas_threads)
SPLITS = ((1, 1), (2, 1), (1, 2), (2, 2))


@dataclass
class SplitRun:
    ort_threads: int
    blas_threads: int
    round: int
    run: LoopRun


@dataclass
class SplitSummary:
    ort_threads: int
    blas_threads: int
    fps_median: float
    fps_by_round: list[float]
    latency_p50_ms_median: float  # read -> output, median over rounds of each run's median
    cpu_ms_per_frame_median: float


@dataclass
class WatchThreadsReport:
    machine: MachineInfo
    bundle: str
    backend: str
    index: str
    video: dict
    seconds_per_run: float
    rounds: int
    summary: list[SplitSummary]  # best (highest median FPS) first
    best: SplitSummary
    runs: list[SplitRun] = field(default_factory=list)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=BSDATA, help="MVTec-layout category (train/good, test/*)")
    parser.add_argument("--seconds", type=float, default=15.0, help="wall time of each pipeline run (default 15)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds over all splits (default 3)")
    parser.add_argument("--video-frames", type=int, default=80)
    parser.add_argument("--out", type=Path, default=RESULTS / "watch_threads.json")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cached = cached_bundle("bsdata_default", args.data)
    machine = machine_info()
    runs: list[SplitRun] = []
    backend = index = ""
    with tempfile.TemporaryDirectory(prefix="bench_watch_threads_") as tmp:
        video = Path(tmp) / "loop.avi"
        video_info = write_video(args.data, video, args.video_frames, fps=10.0)
        for number in range(1, args.rounds + 1):
            for ort_threads, blas_threads in SPLITS:
                options = DetectorOptions(backend="ort-cpu", index="auto", threads=ort_threads,
                                          blas_threads=blas_threads, verify_checksums=False)
                started = time.perf_counter()
                with Detector.open(cached.path, options) as detector:
                    warm_up(detector, video)
                    run = timed_pipeline(detector, video, args.seconds)
                    backend, index = detector.backend.description, getattr(detector.index, "kind", "?")
                runs.append(SplitRun(ort_threads, blas_threads, number, run))
                log(f"round {number} ort {ort_threads} blas {blas_threads}: {run.fps:.2f} fps, latency p50 "
                    f"{run.latency_p50_ms:.1f} ms, cpu {run.cpu_ms_per_frame:.1f} ms/frame "
                    f"({time.perf_counter() - started:.0f} s; load {load_average()[0]})")
    summary = []
    for ort_threads, blas_threads in SPLITS:
        mine = [r.run for r in runs if (r.ort_threads, r.blas_threads) == (ort_threads, blas_threads)]
        summary.append(SplitSummary(
            ort_threads, blas_threads, fps_median=float(np.median([r.fps for r in mine])),
            fps_by_round=[round(r.fps, 2) for r in mine],
            latency_p50_ms_median=float(np.median([r.latency_p50_ms for r in mine])),
            cpu_ms_per_frame_median=float(np.median([r.cpu_ms_per_frame for r in mine]))))
    summary.sort(key=lambda s: -s.fps_median)
    machine.loadavg_end = load_average()
    report = WatchThreadsReport(machine=machine, bundle=str(cached.path), backend=backend, index=index,
                                video=video_info, seconds_per_run=args.seconds, rounds=args.rounds,
                                summary=summary, best=summary[0], runs=runs)
    write_json(args.out, report)
    print(f"{'ort':>4s} {'blas':>4s} {'fps':>6s} {'p50 ms':>7s} {'cpu ms/frame':>12s}   fps by round")
    for s in summary:
        print(f"{s.ort_threads:4d} {s.blas_threads:4d} {s.fps_median:6.2f} {s.latency_p50_ms_median:7.1f} "
              f"{s.cpu_ms_per_frame_median:12.1f}   {s.fps_by_round}")
    print(f"load average {machine.loadavg_start[0]:.2f} at the start, {machine.loadavg_end[0]:.2f} at the end; "
          f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
