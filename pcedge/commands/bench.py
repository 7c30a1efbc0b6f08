"""``pcedge bench``: latency per stage and throughput on this machine, beside each stage's floor; the work is
done by :mod:`pcedge.runtime.evaluation.latency`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pcedge.commands.common import EF, THREADS, check_outputs, int_at_least, q
from pcedge.runtime.backends import BACKENDS
from pcedge.runtime.bundle import BundleError
from pcedge.runtime.evaluation.flops import FlopsError, FlopsUnavailable
from pcedge.runtime.evaluation.latency import ALL_BACKENDS, ALL_INDEXES, BenchConfig, markdown, run_bench
from pcedge.runtime.evaluation.targets import TARGETS, UnknownTarget, parse_targets
from pcedge.runtime.files import write_json, write_text_atomic

HELP = "latency per stage (p50/p95/p99) and throughput per backend, index and batch size, beside each stage's floor"


def _choices(text: str, allowed: tuple[str, ...], everything: tuple[str, ...], what: str) -> tuple[str, ...]:
    items = tuple(t.strip() for t in text.split(",") if t.strip())
    if items == ("all",):
        return everything
    bad = [t for t in items if t not in allowed]
    if bad or not items:
        raise argparse.ArgumentTypeError(f"{what} {text!r}: choose all or a comma list of {', '.join(allowed)}")
    return items


def parse_backends(text: str) -> tuple[str, ...]:
    return _choices(text, BACKENDS, ALL_BACKENDS, "--backend")


def parse_indexes(text: str) -> tuple[str, ...]:
    return _choices(text, ("exact", "hnsw", "auto"), ALL_INDEXES, "--index")


def parse_batches(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"--batch {text!r}: expected a comma list of integers, e.g. 1,4,8") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"--batch {text!r}: batch sizes must be at least 1")
    return values


def parse_target(text: str):
    try:
        return parse_targets(text)
    except UnknownTarget as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("bundle", help="bundle directory (NAME.pcedge)")
    parser.add_argument("--images", nargs="+", default=None, metavar="DIR|FILE",
                        help="images to time (files, folders, globs; decoded once, decode not timed). "
                             "Default: the bundle's check images (network-sized)")
    parser.add_argument("--backend", type=parse_backends, default=ALL_BACKENDS,
                        help=f"all (default) or a comma list of {', '.join(BACKENDS)}; unavailable ones are skipped "
                             "with the reason")
    parser.add_argument("--index", type=parse_indexes, default=ALL_INDEXES,
                        help="all (exact,hnsw; default) or a comma list of exact, hnsw, auto")
    parser.add_argument("--batch", type=parse_batches, default=(1, 4, 8), help="batch sizes (default 1,4,8)")
    parser.add_argument("--repeats", type=int_at_least("--repeats", 1), default=30, help="timed calls per backend x index x batch (default 30)")
    parser.add_argument("--warmup", type=int_at_least("--warmup", 0), default=5, help="untimed calls before timing (default 5)")
    parser.add_argument("--threads", type=THREADS, default=None, help="CPU threads (default: all available)")
    parser.add_argument("--ef", type=EF, default=None, help="HNSW query ef (default: the bundle's)")
    parser.add_argument("--precision", choices=("fp32", "fp16", "int8"), default=None,
                        help="TensorRT engine precision; int8 also runs the INT8 graph on the ONNX Runtime backends; "
                             "fp32 forces float32 on ort-cpu (whose default is the bundle's CPU INT8 graph when it "
                             "has its own threshold)")
    parser.add_argument("--no-peak", action="store_true", help="skip measuring this machine's peak FLOP/s and bandwidth")
    parser.add_argument("--target", type=parse_target, action="append", default=None, metavar="DEVICE",
                        help=f"also print an estimate ON PAPER of the per-stage latency on a Jetson ({', '.join(TARGETS)}; "
                             "comma list or repeated), from published peak rates; confirm it on the device with "
                             "benchmarks/gpu_acceptance.py")
    parser.add_argument("--json", type=Path, default=None, metavar="FILE", help="write the report as JSON")
    parser.add_argument("--md", type=Path, default=None, metavar="FILE", help="write the tables as Markdown")


def run(args: argparse.Namespace) -> int:
    devices = tuple(dict.fromkeys(d for group in args.target or () for d in group))
    if devices and args.no_peak:
        print("pcedge bench: --target scales CPU stage times by this machine's measured peak: drop --no-peak",
              file=sys.stderr)
        return 2
    if devices and 1 not in args.batch:
        print("pcedge bench: --target estimates batch 1: include 1 in --batch", file=sys.stderr)
        return 2
    if not check_outputs("bench", files={"--json": args.json, "--md": args.md}):
        return 2
    config = BenchConfig(
        bundle=Path(args.bundle), images=args.images, backends=tuple(args.backend), indexes=tuple(args.index),
        batches=tuple(args.batch), repeats=args.repeats, warmup=args.warmup, threads=args.threads, ef=args.ef,
        precision=args.precision, measure_peak=not args.no_peak,
    )
    try:
        report = run_bench(config)
    except (BundleError, FileNotFoundError, ValueError) as exc:
        print(f"pcedge bench: {exc}", file=sys.stderr)
        return 2
    if not report.runs:
        print("pcedge bench: no backend could run: " + "; ".join(f"{s.backend}: {s.reason}" for s in report.skipped),
              file=sys.stderr)
        return 2
    if devices:
        failure = _attach_estimate(report, Path(args.bundle), devices)
        if failure:
            print(f"pcedge bench: --target: {failure}", file=sys.stderr)
            return 2
    text = markdown(report)
    print()
    print(text)
    for flag, path, write in (("--json", args.json, lambda p: write_json(p, report)),
                              ("--md", args.md, lambda p: write_text_atomic(p, text))):
        if path is None:
            continue
        try:
            write(path)
        except OSError as exc:  # checked up front; the disk can still fill up
            print(f"pcedge bench: {flag} {path}: not written ({exc.strerror or exc})", file=sys.stderr)
            return 2
        print(f"wrote {path}")
    if devices:
        print("the Jetson figures above are an ESTIMATE ON PAPER; confirm them on the device: "
              f"python benchmarks/gpu_acceptance.py {q(args.bundle)} --images DIR")
    bundle = q(args.bundle)
    if any(s.backend == "tensorrt" for s in report.skipped):
        print(f"next: on a device with TensorRT, pcedge build-engine {bundle} && pcedge bench {bundle} "
              f"--backend tensorrt   |   pcedge watch {bundle} SOURCE")
    else:
        print(f"next: pcedge watch {bundle} SOURCE")
    return 0


def _attach_estimate(report, bundle_path: Path, devices) -> str:
    """Put the Jetson estimate on ``report``; returns why it could not be made ("" when it was)."""
    from pcedge.runtime.bundle import open_bundle
    from pcedge.runtime.evaluation.jetson_estimate import EstimateUnavailable, estimate

    try:
        bundle = open_bundle(bundle_path, verify=False)  # run_bench has just verified every checksum
        report.jetson_estimate = estimate(report, bundle, devices)
    except FlopsUnavailable:
        return "counting the backbone's work needs the onnx package: pip install onnx"
    except (EstimateUnavailable, FlopsError, BundleError) as exc:
        return str(exc)
    return ""
