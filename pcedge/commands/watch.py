"""``pcedge watch``: live inference on a camera, stream, video file or folder (headless by default)."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from pcedge.commands.common import (
    THRESHOLD, add_detector_arguments, add_server_arguments, check_outputs, finite_float, int_at_least, open_detector,
    open_remote, q,
)

HELP = "live inference on a camera, RTSP/HTTP stream, GStreamer pipeline, video file or image folder"

SOURCE_HELP = (
    "camera index (0), video file, rtsp:// or http:// URL, GStreamer pipeline ending in appsink "
    "(detected by '!'), or a folder of images played in name order"
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("bundle", help="bundle directory (NAME.pcedge)")
    parser.add_argument("source", help=SOURCE_HELP)
    add_detector_arguments(parser)
    parser.add_argument("--threshold", type=THRESHOLD, default=None, help="override the bundle's calibrated threshold")
    parser.add_argument("--fps", type=finite_float("--fps", 0, low_open=True), default=None,
                        help="folders and files: play at this rate (default: as fast as processed); cameras: requested rate")
    parser.add_argument("--loop", action="store_true", help="replay a file or folder from the start when it ends")
    parser.add_argument("--jsonl", type=Path, default=None, metavar="FILE",
                        help="event log: one JSON line per frame (processed, dropped or skipped) and per source fault")
    parser.add_argument("--save-dir", type=Path, default=None, metavar="DIR",
                        help="save anomalous frames and their overlays here")
    parser.add_argument("--save-every-s", type=finite_float("--save-every-s", 0), default=5.0, metavar="S",
                        help="save at most one anomalous frame per S seconds (default 5)")
    parser.add_argument("--video-out", type=Path, default=None, metavar="FILE",
                        help="annotated video of the processed frames (.mp4, .avi, .mkv)")
    parser.add_argument("--show", action="store_true", help="show a window (needs OpenCV with GUI support)")
    parser.add_argument("--max-frames", type=int_at_least("--max-frames", 1), default=None, metavar="N",
                        help="stop after N frames from the source")
    parser.add_argument("--duration", type=finite_float("--duration", 0, low_open=True), default=None, metavar="S", help="stop after S seconds")
    add_server_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from pcedge.runtime.watch.sources import SourceError, check_source_spec, open_source
    from pcedge.runtime.errors import WatchError
    from pcedge.runtime.watch.pipeline import WatchOptions, WatchPipeline

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    try:
        check_source_spec(args.source)
    except SourceError as exc:
        print(f"pcedge watch: {exc}", file=sys.stderr)
        return 2
    if not check_outputs("watch", files={"--jsonl": args.jsonl, "--video-out": args.video_out},
                         folders={"--save-dir": args.save_dir}):
        return 2
    options = WatchOptions(
        jsonl=args.jsonl, save_dir=args.save_dir, save_every_s=args.save_every_s, video_out=args.video_out,
        show=args.show, max_frames=args.max_frames, duration_s=args.duration,
    )
    # Threads: the runtime's defaults -- ONNX Runtime intra-op on every core (--threads unset), numpy's BLAS
    # on one (DetectorOptions.blas_threads) -- are the best split measured for this pipeline on 2 cores
    # (benchmarks/bench_watch_threads.py, results/watch_threads.json, 5 rounds at load ~9: 76.1 FPS and
    # 32.2 ms p50 latency; one ONNX Runtime thread 77.4 FPS, 35.5 ms, the same within noise; two BLAS
    # threads 20-29 FPS at 2.4x the CPU time per frame, their threads busy-waiting on the backbone's core).
    # ort_spinning False: the pipeline's backbone never spins (its stages overlap on the cores; Detector.embed
    # uses the non-spinning session anyway), so the second, spinning session would only cost memory.
    detector = open_remote(args, "watch") if args.server else open_detector(args, "watch", ort_spinning=False)
    if detector is None:
        return 2
    with detector:
        try:
            source = open_source(args.source, fps=args.fps, loop=args.loop)
        except (SourceError, ValueError) as exc:
            print(f"pcedge watch: {exc}", file=sys.stderr)
            return 2
        kind = "live" if source.is_live else "every frame processed"
        print(f"pcedge watch: {source.spec} ({kind}) with {detector.description}; Ctrl-C to stop", file=sys.stderr)
        try:
            summary = WatchPipeline(detector, source, options).run()
        except WatchError as exc:
            print(f"pcedge watch: {exc}", file=sys.stderr)
            return 2
    print(summary.describe())
    if summary.jsonl:
        print(f"wrote {summary.jsonl}")
    if summary.video:
        print(f"wrote {summary.video}")
    if summary.save_dir:
        print(f"wrote {summary.saved} anomalous frame(s) with overlays to {summary.save_dir}/")
    if summary.error:
        print(f"pcedge watch: stopped by an error: {summary.error}", file=sys.stderr)
        return 1
    saved = q(summary.save_dir) if summary.save_dir else "IMAGES"
    print(f"next: pcedge predict {q(args.bundle)} {saved} --save-maps maps/   "
          f"|   pcedge eval {q(args.bundle)} --data CATEGORY_DIR")
    return 0
