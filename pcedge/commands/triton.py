"""``pcedge triton``: write a Triton Inference Server model repository for one or more bundles."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pcedge.commands.common import add_repository_arguments, parse_bundles, repository_options

HELP = "write a Triton Inference Server model repository (embedder + scorer + ensemble per bundle)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("bundles", nargs="+", metavar="[NAME=]BUNDLE",
                        help="bundle directories; the model is named after the folder (NAME.pcedge) unless NAME= is given")
    parser.add_argument("-o", "--output", type=Path, required=True, metavar="REPO", help="repository folder to write")
    form = parser.add_mutually_exclusive_group()
    form.add_argument("--cpu-only", action="store_true",
                      help="embedder as a Python-backend ONNX Runtime model: runs on a Triton with the Python "
                           "backend only (PyPI's nvidia-pytriton)")
    form.add_argument("--plan", action="store_true",
                      help="embedder as a TensorRT plan (tensorrt_plan) from the bundle's engines/, built on this "
                           "server's GPU with pcedge build-engine")
    parser.add_argument("--precision", choices=("fp32", "fp16"), default=None, help="with --plan: which engine")
    add_repository_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from pcedge.runtime.serving.repository import RepositoryError, write_repository

    bundles = parse_bundles(args.bundles, "triton")
    if bundles is None:
        return 2
    try:
        report = write_repository(bundles, args.output, repository_options(args, args.cpu_only, args.plan))
    except (RepositoryError, OSError) as exc:
        print(f"pcedge triton: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {report.root}/ ({report.form}):")
    for served in report.bundles:
        print(f"  {served.name:20s} ensemble, IMAGES in -> SCORE, ANOMALOUS, ANOMALY_MAP out  ({served.bundle})")
        print(f"  {'':20s} {served.models[0]} + {served.models[1]}")
    names = " ".join(args.bundles)
    print(f"next: tritonserver --model-repository {report.root}   (Python backend needs pcedge installed: "
          f"README, Serving many cameras)   |   pcedge serve {names}")
    return 0
