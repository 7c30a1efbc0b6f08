"""``pcedge predict``: score images from files, folders or globs; overlays, JSONL, a summary."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from pcedge.commands.common import (
    THRESHOLD, add_detector_arguments, add_server_arguments, check_outputs, int_at_least, interrupt_exit_code,
    open_detector, open_remote, percentile, q, remote_errors, sigterm_as_interrupt,
)
from pcedge.runtime.files import OutputError, json_line, open_output
from pcedge.runtime.inputs import expand_inputs, unique_names
from pcedge.runtime.preprocess import ImageError, read_image

HELP = "score images (files, folders, globs): verdicts, anomaly-map overlays, a JSONL log"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("bundle", help="bundle directory (NAME.pcedge)")
    parser.add_argument("inputs", nargs="+", help="image files, folders (recursive) or glob patterns")
    add_detector_arguments(parser)
    parser.add_argument("--batch", type=int_at_least("--batch", 1), default=1,
                        help="images per backbone call (default 1)")
    parser.add_argument("--threshold", type=THRESHOLD, default=None, help="override the bundle's calibrated threshold")
    parser.add_argument("--save-maps", type=Path, default=None, metavar="DIR", help="write overlay PNGs here")
    parser.add_argument("--jsonl", type=Path, default=None, metavar="FILE", help="one JSON line per image")
    parser.add_argument("--quiet", action="store_true", help="no line per image")
    add_server_arguments(parser)


def result_record(path: str, result) -> dict:
    t = result.timings
    return {
        "path": path, "score": round(result.score, 6), "normalised": round(result.normalised, 6),
        "verdict": result.verdict, "threshold": result.threshold, "s_star": round(result.s_star, 6),
        "rescored_patches": result.n_rescored,
        "timings_ms": {"decode": round(t.decode_ms, 3), "preprocess": round(t.preprocess_ms, 3),
                       "backbone": round(t.backbone_ms, 3), "index": round(t.index_ms, 3),
                       "scoring": round(t.scoring_ms, 3), "total": round(t.total_ms, 3)},
    }


def _score_all(args, detector, paths, names, jsonl, latencies: list[float], failed: list[str],
               anomalous: list[bool]) -> None:
    """Score ``paths``, appending to the three lists as it goes (so an interrupt leaves them true)."""
    from pcedge.runtime.overlay import render_overlay, write_image

    for start in range(0, len(paths), args.batch):
        chunk = list(zip(paths[start : start + args.batch], names[start : start + args.batch]))
        frames, ok, decode_ms = [], [], []
        for path, name in chunk:
            t = time.perf_counter()
            try:
                frames.append(read_image(path))
            except ImageError as exc:
                failed.append(str(exc))
                if jsonl:
                    jsonl.write(json_line({"path": str(path), "error": str(exc)}))
                print(f"error  {exc}", file=sys.stderr)
                continue
            decode_ms.append((time.perf_counter() - t) * 1e3)
            ok.append((path, name))
        if not frames:
            continue
        try:
            results = detector.run_frames(frames, [str(p) for p, _ in ok], sum(decode_ms) / len(decode_ms))
        except remote_errors(args) as exc:  # --server: the server rejected or could not take these frames
            for path, _ in ok:
                failed.append(f"{path}: {exc}")
                if jsonl:
                    jsonl.write(json_line({"path": str(path), "error": str(exc)}))
                print(f"error  {path}: {exc}", file=sys.stderr)
            continue
        for (path, name), frame, result in zip(ok, frames, results):
            latencies.append(result.timings.total_ms)
            anomalous.append(result.anomalous)
            if jsonl:
                jsonl.write(json_line(result_record(str(path), result)))
            if args.save_maps:
                overlay = render_overlay(frame, result, detector.normalise_map(result.anomaly_map))
                write_image(args.save_maps / f"{name}_overlay.png", overlay)
            if not args.quiet:
                print(f"{result.verdict:9s} {result.score:9.4f}  norm {result.normalised:.3f}  "
                      f"{result.timings.total_ms:7.1f} ms  {path}")


def run(args: argparse.Namespace) -> int:
    try:
        paths = expand_inputs(args.inputs)
    except FileNotFoundError as exc:
        print(f"pcedge predict: {exc}", file=sys.stderr)
        return 2
    if not check_outputs("predict", files={"--jsonl": args.jsonl}, folders={"--save-maps": args.save_maps}):
        return 2
    detector = open_remote(args, "predict") if args.server else open_detector(args, "predict")
    if detector is None:
        return 2
    names = unique_names(paths)
    print(f"pcedge predict: {len(paths)} image(s) with {detector.description}", file=sys.stderr)
    latencies: list[float] = []
    failed: list[str] = []
    anomalous: list[bool] = []
    interrupted: KeyboardInterrupt | None = None
    try:
        with sigterm_as_interrupt(), detector:
            if args.jsonl:
                # keep_partial: after Ctrl-C, SIGTERM or a closed stdout, the lines of the images already
                # scored replace the old file (the summary says how many); a crash of our own leaves the old
                # file untouched.
                with open_output(args.jsonl, "w", keep_partial=(KeyboardInterrupt, BrokenPipeError)) as jsonl:
                    _score_all(args, detector, paths, names, jsonl, latencies, failed, anomalous)
            else:
                _score_all(args, detector, paths, names, None, latencies, failed, anomalous)
    except KeyboardInterrupt as exc:
        interrupted = exc
    except OutputError as exc:
        print(f"pcedge predict: --jsonl {exc}", file=sys.stderr)
        return 2
    n = len(latencies)
    done = f"{n + len(failed)} of {len(paths)}"
    if interrupted is not None:
        why = interrupted.args[0] if interrupted.args else "SIGINT"
        print(f"pcedge predict: interrupted by {why} after {done} image(s); results so far:", file=sys.stderr)
    print(f"summary: {n} scored, {sum(anomalous)} anomalous, {len(failed)} failed; latency (decode excluded) "
          f"p50 {percentile(latencies, 50):.1f} ms, p95 {percentile(latencies, 95):.1f} ms")
    if args.save_maps:
        print(f"wrote overlays to {args.save_maps}/")
    if args.jsonl:
        print(f"wrote {args.jsonl}" + (f" ({done} image(s), the run was interrupted)" if interrupted else ""))
    if interrupted is not None:
        return interrupt_exit_code(interrupted)
    print(f"next: pcedge eval {q(args.bundle)} --data CATEGORY_DIR   |   pcedge watch {q(args.bundle)} SOURCE")
    return 1 if failed else 0
