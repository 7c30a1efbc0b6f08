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
                        help="TensorRT engine precision to prefer")


def detector_options(args: argparse.Namespace, **overrides):
    from pcedge.runtime.detector import DetectorOptions

    values = dict(
        backend=args.backend, index=getattr(args, "index", "auto"), ef=getattr(args, "ef", None),
        threshold=getattr(args, "threshold", None), threads=args.threads, precision=args.precision,
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
        return Detector.open(args.bundle, detector_options(args))
    except (BundleError, BackendUnavailable, ValueError) as exc:
        print(f"pcedge {command}: {exc}", file=sys.stderr)
        return None


def add_repository_arguments(parser: argparse.ArgumentParser) -> None:
    """How `pcedge triton` and `pcedge serve` shape the Triton models (runtime.serving.repository)."""
    group = parser.add_argument_group("Triton models")
    group.add_argument("--max-batch-size", type=int, default=8, metavar="N",
                       help="largest batch a model takes (default 8)")
    group.add_argument("--no-dynamic-batching", action="store_true",
                       help="run each request as it comes (default: Triton merges concurrent requests)")
    group.add_argument("--max-queue-delay-us", type=int, default=2000, metavar="US",
                       help="how long Triton may hold a request to form a batch (default 2000)")
    group.add_argument("--preferred-batch-size", type=int, nargs="+", default=[], metavar="N",
                       help="batch sizes the dynamic batcher aims for (default: the largest it can form)")
    group.add_argument("--embedder-instances", type=int, default=1, metavar="N", help="embedder instances (default 1)")
    group.add_argument("--scorer-instances", type=int, default=1, metavar="N", help="scorer instances (default 1)")
    group.add_argument("--kind", choices=("auto", "gpu", "cpu"), default="auto",
                       help="embedder instances on the GPU or CPU (default: GPU, CPU with --cpu-only)")
    group.add_argument("--model-threads", type=int, default=0, metavar="N",
                       help="ONNX Runtime threads per CPU-only embedder instance (default 0: all the CPUs)")
    group.add_argument("--index", choices=("auto", "exact", "hnsw"), default="auto",
                       help="the scorer's nearest-neighbour search (default auto)")


def repository_options(args: argparse.Namespace, cpu_only: bool, plan: bool = False):
    from pcedge.runtime.serving.repository import RepositoryOptions

    return RepositoryOptions(
        cpu_only=cpu_only, plan=plan, precision=getattr(args, "precision", None),
        max_batch_size=args.max_batch_size, dynamic_batching=not args.no_dynamic_batching,
        max_queue_delay_us=args.max_queue_delay_us, preferred_batch_sizes=list(args.preferred_batch_size),
        embedder_instances=args.embedder_instances, scorer_instances=args.scorer_instances, kind=args.kind,
        threads=args.model_threads, index=args.index,
    )


def parse_bundles(texts: list[str], command: str):
    """``[NAME=]BUNDLE`` arguments -> [(name, path)], or None after printing which one is wrong."""
    import sys

    from pcedge.runtime.serving.repository import RepositoryError, parse_bundle_argument

    try:
        return [parse_bundle_argument(text) for text in texts]
    except RepositoryError as exc:
        print(f"pcedge {command}: {exc}", file=sys.stderr)
        return None


def add_server_arguments(parser: argparse.ArgumentParser) -> None:
    """`--server`: send frames to a Triton server (pcedge serve / pcedge triton) instead of a local detector."""
    parser.add_argument("--server", default=None, metavar="URL",
                        help="score on a Triton server (http://HOST:PORT or grpc://HOST:PORT) instead of locally; "
                             "the bundle argument then names the model (a bundle path gives its name)")
    parser.add_argument("--retry", type=float, default=30.0, metavar="S",
                        help="with --server: keep retrying an unreachable server this long, with backoff (default 30)")


def open_remote(args: argparse.Namespace, command: str):
    """A :class:`~pcedge.runtime.serving.client.RemoteDetector` for ``--server``, or None after printing why."""
    import sys

    from pcedge.runtime.serving.client import ClientOptions, RemoteDetector, RemoteError, ServerUnavailable
    from pcedge.runtime.serving.repository import RepositoryError, parse_bundle_argument

    if args.retry < 0:
        print(f"pcedge {command}: --retry must be >= 0, got {args.retry}", file=sys.stderr)
        return None
    try:
        name = parse_bundle_argument(args.bundle)[0]
        return RemoteDetector(args.server, name, ClientOptions(threshold=getattr(args, "threshold", None),
                                                                retry_s=args.retry))
    except (RemoteError, ServerUnavailable, RepositoryError, ValueError) as exc:
        print(f"pcedge {command}: {exc}", file=sys.stderr)
        return None


def remote_errors(args: argparse.Namespace) -> tuple:
    """The per-frame failures of a server run (empty for a local detector: nothing extra is caught)."""
    if not getattr(args, "server", None):
        return ()
    from pcedge.runtime.serving.client import RemoteError, ServerUnavailable

    return (RemoteError, ServerUnavailable)
