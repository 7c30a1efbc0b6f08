"""Arguments and helpers shared by the commands: the detector arguments of the device commands, argparse
``type=`` checks for every numeric flag, output-path checks, SIGTERM handling and ``next:`` hints."""

from __future__ import annotations

import argparse
import contextlib
import math
import shlex
import signal
import sys
import threading

from pcedge.runtime.backends import BACKENDS

# ----------------------------------------------------------------------------------------------- flag types
# Each returns an argparse ``type=`` function, so a bad value is refused before any work with
# "argument --FLAG: must be ..., got VALUE" and exit code 2. The bounds are the smallest values that can work.
# ``flag`` names the flag for a reader of the code; argparse puts it in the message itself.


def int_at_least(flag: str, low: int, why: str = "", high: int | None = None):
    """An integer ``low <= v (<= high)``; ``why`` says what the bound is for."""

    def parse(text: str) -> int:
        try:
            value = int(text, 10)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < low or (high is not None and value > high):
            bound = f"at least {low}" if high is None else f"between {low} and {high}"
            raise argparse.ArgumentTypeError(f"must be {bound}{why}, got {text}")
        return value

    return parse


def finite_float(flag: str, low: float | None = None, high: float | None = None, *, low_open: bool = False,
                 high_open: bool = False, why: str = ""):
    """A finite float within ``[low, high]`` (``low_open`` / ``high_open`` exclude the bound)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
        too_low = low is not None and (value <= low if low_open else value < low)
        too_high = high is not None and (value >= high if high_open else value > high)
        if too_low or too_high:
            lo = "" if low is None else f"{'>' if low_open else '>='} {low:g}"
            hi = "" if high is None else f"{'<' if high_open else '<='} {high:g}"
            raise argparse.ArgumentTypeError(f"must be {' and '.join(b for b in (lo, hi) if b)}{why}, got {text}")
        return value

    return parse


THREADS = int_at_least("--threads", 1)
EF = int_at_least("--ef", 1, " (HNSW query candidate list; the bundle's default is 32)")
THRESHOLD = finite_float("--threshold")


# ----------------------------------------------------------------------------------------------- detector
def add_detector_arguments(parser: argparse.ArgumentParser, index: bool = True) -> None:
    parser.add_argument("--backend", choices=BACKENDS, default="auto",
                        help="inference backend (default auto: TensorRT engine > ONNX Runtime CUDA > CPU)")
    if index:
        parser.add_argument("--index", choices=("auto", "exact", "hnsw"), default="auto",
                            help="nearest-neighbour search (default auto: exact for small banks, HNSW above)")
        parser.add_argument("--ef", type=EF, default=None, help="HNSW query ef (default: the bundle's)")
    parser.add_argument("--threads", type=THREADS, default=None, help="CPU threads (default: all available)")
    parser.add_argument("--precision", choices=("fp32", "fp16", "int8"), default=None,
                        help="TensorRT engine precision to prefer; with --backend ort-cuda, fp16 runs the bundle's "
                             "float16 graph (model_fp16.onnx); int8 runs its INT8 graph: model_int8_cpu.onnx on ort-cpu "
                             "(model_int8.onnx in older bundles), model_int8.onnx on ort-cuda, an INT8 engine on tensorrt. "
                             "Default on ort-cpu: model_int8_cpu.onnx when the bundle ships it with its own threshold, "
                             "else float32; fp32 forces float32 (model.onnx)")
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


def open_detector(args: argparse.Namespace, command: str, **overrides):
    """The command's :class:`~pcedge.runtime.detector.Detector`, or None after printing why it cannot open
    (missing or tampered bundle, unavailable backend, bad option) as ``pcedge COMMAND: reason``.
    ``overrides``: :class:`DetectorOptions` fields the command fixes (as :func:`detector_options`)."""
    from pcedge.runtime.bundle import BundleError
    from pcedge.runtime.detector import Detector
    from pcedge.runtime.errors import BackendUnavailable

    try:
        detector = Detector.open(args.bundle, detector_options(args, **overrides))
    except (BundleError, BackendUnavailable, ValueError) as exc:
        print(f"pcedge {command}: {exc}", file=sys.stderr)
        return None
    print_skipped(detector.backend, args, command)
    return detector


# ----------------------------------------------------------------------------------------------- outputs
def check_outputs(command: str, files: dict[str, object] | None = None, folders: dict[str, object] | None = None) -> bool:
    """Check output paths before any work (``{"--jsonl": path or None}``); print ``pcedge COMMAND: --FLAG
    PATH: why`` and return False for the first that cannot be written."""
    from pcedge.runtime.files import OutputError, check_output, check_output_dir

    checks = [(flag, path, check_output) for flag, path in (files or {}).items()]
    checks += [(flag, path, check_output_dir) for flag, path in (folders or {}).items()]
    for flag, path, check in checks:
        if path is None:
            continue
        try:
            check(path)
        except OutputError as exc:
            print(f"pcedge {command}: {flag} {exc}", file=sys.stderr)
            return False
    return True


# ----------------------------------------------------------------------------------------------- signals
@contextlib.contextmanager
def sigterm_as_interrupt():
    """SIGTERM raises :class:`KeyboardInterrupt` in the main thread while the block runs, so that ``kill PID``
    (a service manager stopping pcedge) is handled like Ctrl-C: what was done is flushed, and said."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_sigterm(signum, _frame):
        raise KeyboardInterrupt(signal.Signals(signum).name)

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def interrupt_exit_code(exc: KeyboardInterrupt) -> int:
    """143 (128 + SIGTERM) for a SIGTERM raised by :func:`sigterm_as_interrupt`, else 130 (128 + SIGINT)."""
    return 128 + signal.SIGTERM if exc.args and exc.args[0] == "SIGTERM" else 130


# ----------------------------------------------------------------------------------------------- hints
def q(value) -> str:
    """A path or argument quoted for the ``next:`` hints, so that a path with spaces can be pasted."""
    return shlex.quote(str(value))


def os_error_text(exc: OSError) -> str:
    """``PATH: reason`` for an OS error (not Python's ``[Errno 13] Permission denied: 'PATH'``)."""
    if exc.filename is not None:
        return f"{exc.filename}: {exc.strerror or exc}"
    return exc.strerror or str(exc)


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
