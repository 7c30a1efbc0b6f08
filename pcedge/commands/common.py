"""Arguments and helpers shared by the device commands (predict, verify, eval, bench, watch)."""

from __future__ import annotations

import argparse

from pcedge.runtime.backends import BACKENDS


def add_detector_arguments(parser: argparse.ArgumentParser, index: bool = True) -> None:
    parser.add_argument("--backend", choices=BACKENDS, default="auto",
                        help="inference backend (default auto: TensorRT engine > ONNX Runtime CUDA > CPU)")
    if index:
        parser.add_argument("--index", choices=("auto", "exact", "hnsw"), default="auto",
                            help="nearest-neighbour search (default auto: exact for small banks, HNSW above)")
        parser.add_argument("--ef", type=int, default=None, help="HNSW query ef (default: the bundle's)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: all available)")
    parser.add_argument("--precision", choices=("fp32", "fp16"), default=None,
                        help="TensorRT engine precision to prefer; with --backend ort-cuda, fp16 runs the bundle's "
                             "float16 graph (model_fp16.onnx)")
    parser.add_argument("--trust", metavar="PUBKEY", default=None,
                        help="refuse the bundle unless it is signed by this Ed25519 public key (see `pcedge sign`)")
    parser.add_argument("--verbose", action="store_true",
                        help="say why each better backend was skipped under --backend auto")


def print_skipped(backend, args: argparse.Namespace, command: str) -> None:
    """Under ``--verbose``, one line per backend ``auto`` skipped and per TensorRT engine that does not fit."""
    import sys

    if not getattr(args, "verbose", False):
        return
    for choice in getattr(backend, "auto_skipped", []):
        print(f"pcedge {command}: skipped {choice.kind}: {choice.reason}", file=sys.stderr)
    for line in getattr(backend, "skipped_engines", []):
        print(f"pcedge {command}: engine not used: {line}", file=sys.stderr)


def detector_options(args: argparse.Namespace, **overrides):
    from pcedge.runtime.detector import DetectorOptions

    values = dict(
        backend=args.backend, index=getattr(args, "index", "auto"), ef=getattr(args, "ef", None),
        threshold=getattr(args, "threshold", None), threads=args.threads, precision=args.precision,
        trusted_key=getattr(args, "trust", None),
    )
    values.update(overrides)
    return DetectorOptions(**values)


def percentile(values: list[float], q: float) -> float:
    import numpy as np

    return float(np.percentile(np.asarray(values, dtype=np.float64), q)) if values else float("nan")


def open_detector(args: argparse.Namespace, command: str):
    """The command's :class:`~pcedge.runtime.detector.Detector`, or None after printing why it cannot open
    (missing or tampered bundle, unavailable backend, bad option) as ``pcedge COMMAND: reason``."""
    import sys

    from pcedge.runtime.bundle import BundleError
    from pcedge.runtime.detector import Detector
    from pcedge.runtime.errors import BackendUnavailable

    try:
        detector = Detector.open(args.bundle, detector_options(args))
    except (BundleError, BackendUnavailable, ValueError) as exc:
        print(f"pcedge {command}: {exc}", file=sys.stderr)
        return None
    print_skipped(detector.backend, args, command)
    return detector
