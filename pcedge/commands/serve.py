"""``pcedge serve``: serve bundles on a Triton Inference Server until Ctrl-C or SIGTERM."""

from __future__ import annotations

import argparse
import signal
import sys
import tempfile
import threading
from pathlib import Path

from pcedge.commands.common import add_repository_arguments, parse_bundles, repository_options

HELP = "serve bundles on NVIDIA Triton Inference Server (HTTP, gRPC, Prometheus metrics) until Ctrl-C"


def _port(text: str) -> int:
    value = int(text)
    if not 0 < value < 65536:
        raise argparse.ArgumentTypeError(f"a port is in 1..65535, got {text}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("bundles", nargs="+", metavar="[NAME=]BUNDLE", help="bundle directories to serve")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address the endpoints bind to (default 127.0.0.1; 0.0.0.0 for every interface)")
    parser.add_argument("--http-port", type=_port, default=8000, help="default 8000")
    parser.add_argument("--grpc-port", type=_port, default=8001, help="default 8001")
    parser.add_argument("--metrics-port", type=_port, default=8002, help="Prometheus metrics (default 8002)")
    parser.add_argument("--repository", type=Path, default=None, metavar="DIR",
                        help="write the model repository here and keep it (default: a temporary folder)")
    parser.add_argument("--tritonserver", default=None, metavar="PATH",
                        help="the tritonserver binary (default: one on PATH, else nvidia-pytriton's)")
    parser.add_argument("--log", type=Path, default=None, metavar="FILE",
                        help="keep the server log here (default: a temporary file, removed on exit)")
    parser.add_argument("--startup-timeout", type=float, default=180.0, metavar="S", help="default 180")
    add_repository_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from pcedge.runtime.serving.repository import RepositoryError, write_repository
    from pcedge.runtime.serving.server import ServerError, ServerOptions, TritonServer

    bundles = parse_bundles(args.bundles, "serve")
    if bundles is None:
        return 2
    ports = {"--http-port": args.http_port, "--grpc-port": args.grpc_port, "--metrics-port": args.metrics_port}
    if len(set(ports.values())) < 3:
        print(f"pcedge serve: {', '.join(f'{k} {v}' for k, v in ports.items())}: the three ports must differ",
              file=sys.stderr)
        return 2
    options = ServerOptions(host=args.host, http_port=args.http_port, grpc_port=args.grpc_port,
                            metrics_port=args.metrics_port, startup_timeout_s=args.startup_timeout,
                            tritonserver=args.tritonserver)
    with tempfile.TemporaryDirectory(prefix="pcedge-serve-") as scratch:
        options.log_file = args.log or Path(scratch) / "tritonserver.log"
        try:
            server = TritonServer(args.repository or Path(scratch) / "repository", options)
            # Triton from PyPI has the Python backend only: the embedder then runs ONNX Runtime in Python.
            cpu_only = not server.install.has_onnxruntime_backend
            report = write_repository(bundles, server.repository, repository_options(args, cpu_only))
        except (RepositoryError, ServerError, OSError) as exc:
            print(f"pcedge serve: {exc}", file=sys.stderr)
            return 2
        stop = threading.Event()
        received: list[str] = []

        def on_signal(signum, _frame) -> None:
            received.append(signal.Signals(signum).name)
            stop.set()

        previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            print(f"pcedge serve: starting {server.install.binary} on {report.root} ({report.form}) ...", file=sys.stderr)
            try:
                server.start()
            except ServerError as exc:
                print(f"pcedge serve: {exc}", file=sys.stderr)
                return 2
            print(f"serving {', '.join(b.name for b in report.bundles)} ({len(report.models)} Triton models)")
            print(f"  HTTP     {server.http_url}")
            print(f"  gRPC     {server.grpc_url}")
            print(f"  metrics  {server.metrics_url}")
            print(f"  log      {server.log_file}")
            first = report.bundles[0].name
            print(f"next: pcedge predict {first} IMAGES --server {server.http_url}   |   "
                  f"pcedge watch {first} SOURCE --server {server.grpc_url}   (Ctrl-C stops the server)", flush=True)
            while not stop.wait(0.5):
                if server.process is None or server.process.poll() is not None:
                    code = server.process.returncode if server.process else None
                    print(f"pcedge serve: tritonserver exited on its own (code {code}); log {server.log_file}:\n"
                          f"{server.log_tail()}", file=sys.stderr)
                    server.stop()
                    return 1
            print(f"pcedge serve: {received[0]}: stopping the server (in-flight requests finish first)", file=sys.stderr)
            code = server.stop()
            print(f"pcedge serve: stopped (tritonserver exit code {code})", file=sys.stderr)
            return 0
        finally:
            server.stop()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
