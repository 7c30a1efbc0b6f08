"""``pcedge watch`` on this machine: sustained frames per second of the staged pipeline versus a plain
sequential loop, and resident memory over a long run.

Source: a video written with OpenCV from real test images (good and pitting, interleaved), played in a
loop, so both loops see the same frames decoded the same way. Both loops use the same opened detector.

- sequential: ``frame = source.read(); detector(frame.image)`` -- decode, preprocess, backbone, index and
  scoring one after the other, nothing overlapped;
- pipeline: :class:`pcedge.runtime.watch.pipeline.WatchPipeline` (capture, backbone and scoring threads with
  bounded queues; every frame processed, headless, no outputs), for the same wall time.

The two are measured in alternating rounds (``--rounds``) after a warm-up, because other processes share
this machine; the JSON keeps every round (with the machine's load average and the process CPU time per
frame, which does not depend on the load) and the median. Memory: VmRSS from /proc/self/status, sampled
every second during a pipeline run of ``--minutes`` (JSONL log on, written to a temporary file), as
start (before the run), end, peak, and the growth over the second half of the run (flat memory: ~0).

    python benchmarks/bench_watch.py --bundle bsd.pcedge                      # the real figure (10 min)
    python benchmarks/bench_watch.py --minutes 0.5 --fps-seconds 10 --rounds 1   # smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from pcedge.runtime.watch.sources import open_source
from pcedge.runtime.detector import Detector
from pcedge.runtime.watch.pipeline import WatchOptions, WatchPipeline
from pcedge.runtime.watch.summary import WatchSummary
from pcedge.runtime.preprocess import list_images

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = Path("/work/shared/data/bsdata/ball_screw_drive")
WARMUP_FRAMES = 5


# ------------------------------------------------------------------------------------------------ results


@dataclass
class LoopRun:
    """One timed run of one loop."""

    frames: int
    seconds: float
    fps: float
    latency_p50_ms: float  # sequential: per-frame compute; pipeline: end to end (read -> output)
    latency_p95_ms: float
    cpu_ms_per_frame: float  # process CPU time (all threads) per frame: the work, whatever the load
    load_average_1min: float  # of the whole machine at the end of the run (other processes included)


@dataclass
class MemoryRun:
    minutes: float
    frames_processed: int
    fps: float
    rss_start_mb: float  # detector open and warmed up, before the run
    rss_end_mb: float
    rss_peak_mb: float
    rss_mid_mb: float  # halfway through the run
    growth_second_half_mb: float  # end - mid: a leak shows up here, warm-up allocations do not
    samples: list[tuple[float, float]] = field(default_factory=list)  # (seconds, MB), at most ~120 kept


@dataclass
class Report:
    machine: dict
    bundle: str
    backend: str
    index: str
    video: dict
    sequential: list[LoopRun]
    pipeline: list[LoopRun]
    sequential_fps_median: float
    pipeline_fps_median: float
    speedup: float
    memory: MemoryRun | None
    notes: list[str]


# ------------------------------------------------------------------------------------------------ helpers


def rss_mb() -> float:
    """Resident set size of this process (VmRSS), in MB."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    raise RuntimeError("/proc/self/status has no VmRSS line (not Linux?)")


def write_video(data: Path, path: Path, frames: int, fps: float) -> dict:
    """Interleave good and defective test images into an MJPG/AVI of ``frames`` frames."""
    good = list_images(data / "test" / "good")
    defects = [p for d in sorted((data / "test").iterdir()) if d.is_dir() and d.name != "good" for p in list_images(d)]
    if not good or not defects:
        raise SystemExit(f"{data}: expected test/good and at least one test/<defect> folder with images")
    order = [p for pair in zip(good, defects) for p in pair][:frames]
    first = cv2.imread(str(order[0]))
    size = (first.shape[1], first.shape[0])
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, size)
    if not writer.isOpened():
        raise SystemExit(f"{path}: OpenCV cannot write MJPG/AVI here")
    for p in order:
        writer.write(cv2.resize(cv2.imread(str(p)), size))
    writer.release()
    return {"path": str(path), "frames": len(order), "width": size[0], "height": size[1], "fps": fps, "from": str(data)}


def warm_up(detector: Detector, video: Path) -> None:
    source = open_source(str(video))
    try:
        for _ in range(WARMUP_FRAMES):
            frame = source.read()
            detector(frame.image)
    finally:
        source.release()


def run_sequential(detector: Detector, video: Path, seconds: float) -> LoopRun:
    """The plain loop: read, detect, repeat (the video loops), for ``seconds`` of wall time."""
    source = open_source(str(video), loop=True)
    latencies = []
    frames = 0
    cpu_start = time.process_time()
    start = time.perf_counter()
    try:
        while time.perf_counter() - start < seconds:
            frame = source.read()
            t = time.perf_counter()
            detector(frame.image)
            latencies.append((time.perf_counter() - t) * 1e3)
            frames += 1
    finally:
        source.release()
    elapsed = time.perf_counter() - start
    cpu_ms = (time.process_time() - cpu_start) * 1e3 / frames
    return LoopRun(frames, elapsed, frames / elapsed, float(np.percentile(latencies, 50)),
                   float(np.percentile(latencies, 95)), cpu_ms, os.getloadavg()[0])


def run_pipeline(detector: Detector, video: Path, seconds: float, jsonl: Path | None = None) -> WatchSummary:
    source = open_source(str(video), loop=True)
    options = WatchOptions(duration_s=seconds, jsonl=jsonl, handle_signals=False)
    return WatchPipeline(detector, source, options).run()


def timed_pipeline(detector: Detector, video: Path, seconds: float) -> LoopRun:
    cpu_start = time.process_time()
    summary = run_pipeline(detector, video, seconds)
    cpu_ms = (time.process_time() - cpu_start) * 1e3 / max(summary.processed, 1)
    return LoopRun(summary.processed, summary.elapsed_s, summary.fps, summary.latency_p50.total,
                   summary.latency_p95.total, cpu_ms, os.getloadavg()[0])


def memory_run(detector: Detector, video: Path, minutes: float, workdir: Path) -> MemoryRun:
    """A pipeline run of ``minutes`` with RSS sampled once a second by a side thread."""
    samples: list[tuple[float, float]] = []
    stop = threading.Event()
    start_rss = rss_mb()
    t0 = time.perf_counter()
    peak = [start_rss]

    def sample() -> None:
        while not stop.wait(1.0):
            value = rss_mb()
            peak[0] = max(peak[0], value)
            samples.append((time.perf_counter() - t0, value))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    summary = run_pipeline(detector, video, minutes * 60.0, jsonl=workdir / "memory_run.jsonl")
    stop.set()
    sampler.join()
    end = rss_mb()
    peak[0] = max(peak[0], end)
    half = summary.elapsed_s / 2
    mid = next((mb for t, mb in samples if t >= half), end)
    step = max(1, len(samples) // 120)  # keep the JSON small
    return MemoryRun(
        minutes=summary.elapsed_s / 60.0, frames_processed=summary.processed, fps=summary.fps,
        rss_start_mb=round(start_rss, 1), rss_end_mb=round(end, 1), rss_peak_mb=round(peak[0], 1),
        rss_mid_mb=round(mid, 1), growth_second_half_mb=round(end - mid, 1),
        samples=[(round(t, 1), round(mb, 1)) for t, mb in samples[::step]],
    )


def export_fixture_bundle(out: Path) -> Path:
    from pcedge.export.fit import ExportConfig, export_bundle

    return export_bundle(ExportConfig(data=ROOT / "fixtures" / "ball_screw_drive", output=out, progress=False)).bundle


# ------------------------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bundle", type=Path, default=None,
                        help="bundle to run (default: export one from fixtures/ball_screw_drive into a temp dir)")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="MVTec-style category for the video")
    parser.add_argument("--video-frames", type=int, default=80, help="frames in the looped video")
    parser.add_argument("--backend", default="ort-cpu")
    parser.add_argument("--index", default="auto")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--fps-seconds", type=float, default=30.0, help="wall time of each timed FPS run")
    parser.add_argument("--rounds", type=int, default=4, help="alternating sequential/pipeline rounds")
    parser.add_argument("--minutes", type=float, default=10.0, help="memory run length (0: skip)")
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "watch.json")
    args = parser.parse_args(argv)

    notes = []
    with tempfile.TemporaryDirectory(prefix="bench_watch_") as tmp:
        workdir = Path(tmp)
        bundle = args.bundle
        if bundle is None:
            bundle = export_fixture_bundle(workdir / "fixture.pcedge")
            notes.append("bundle exported from fixtures/ball_screw_drive for this run (default export settings)")
        video = workdir / "loop.avi"
        video_info = write_video(args.data, video, args.video_frames, fps=10.0)
        with Detector.open(bundle, backend=args.backend, index=args.index, threads=args.threads) as detector:
            print(f"bench_watch: {detector.description}; video {video_info['frames']} frames "
                  f"{video_info['width']}x{video_info['height']}", file=sys.stderr)
            warm_up(detector, video)
            sequential, pipeline = [], []
            for round_ in range(args.rounds):
                sequential.append(run_sequential(detector, video, args.fps_seconds))
                pipeline.append(timed_pipeline(detector, video, args.fps_seconds))
                print(f"round {round_ + 1}: sequential {sequential[-1].fps:.2f} fps, pipeline {pipeline[-1].fps:.2f} fps "
                      f"(load {os.getloadavg()[0]:.1f})", file=sys.stderr)
            memory = None
            if args.minutes > 0:
                memory = memory_run(detector, video, args.minutes, workdir)
                print(f"memory: start {memory.rss_start_mb} MB, end {memory.rss_end_mb} MB, peak {memory.rss_peak_mb} MB "
                      f"over {memory.minutes:.1f} min ({memory.frames_processed} frames)", file=sys.stderr)
            description, index_kind = detector.description, getattr(detector.index, "kind", args.index)
    seq_fps = float(np.median([r.fps for r in sequential]))
    pipe_fps = float(np.median([r.fps for r in pipeline]))
    report = Report(
        machine={"cpus": len(os.sched_getaffinity(0)), "processor": platform.processor() or platform.machine(),
                 "python": platform.python_version(), "opencv": cv2.__version__,
                 "load_average_at_end": os.getloadavg()},
        bundle=str(bundle) if args.bundle else "fixtures/ball_screw_drive (exported for this run)",
        backend=description, index=index_kind, video=video_info,
        sequential=sequential, pipeline=pipeline,
        sequential_fps_median=round(seq_fps, 3), pipeline_fps_median=round(pipe_fps, 3),
        speedup=round(pipe_fps / seq_fps, 3), memory=memory, notes=notes,
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = args.out.with_name(args.out.name + ".tmp")
    from pcedge.runtime.files import to_jsonable  # NaN -> null: strict JSON
    tmp_out.write_text(json.dumps(to_jsonable(report), indent=2, allow_nan=False) + "\n")
    os.replace(tmp_out, args.out)
    print(f"sequential {seq_fps:.2f} fps, pipeline {pipe_fps:.2f} fps (x{pipe_fps / seq_fps:.2f}); wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
