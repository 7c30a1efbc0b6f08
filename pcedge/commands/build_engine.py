"""``pcedge build-engine``: compile the bundle's ONNX graph to a TensorRT plan on this device."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from pcedge.commands.common import int_at_least, q
from pcedge.runtime.backends import int8_graph_problem
from pcedge.runtime.bundle import BundleError, EngineSpec, open_bundle
from pcedge.runtime.errors import TensorRTUnavailable

HELP = "build a TensorRT engine for this GPU from the bundle's ONNX graph and record it in the manifest"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("bundle", help="bundle directory (NAME.pcedge)")
    parser.add_argument("--precision", choices=("auto", "fp32", "fp16", "int8"), default="auto",
                        help="engine precision (default auto: fp16 when the GPU has fast FP16, else fp32; int8 "
                             "only when asked: it is built from the bundle's INT8 (QDQ) graph)")
    parser.add_argument("--min-batch", type=int_at_least("--min-batch", 1), default=1,
                        help="smallest batch the engine accepts (default 1)")
    parser.add_argument("--opt-batch", type=int_at_least("--opt-batch", 1), default=None,
                        help="batch the kernels are tuned for (default: the bundle's input.opt_batch, 1)")
    parser.add_argument("--max-batch", type=int_at_least("--max-batch", 1), default=None,
                        help="largest batch the engine accepts (default: the bundle's input.max_batch, 8); "
                             "larger batches are split")
    parser.add_argument("--workspace", type=int_at_least("--workspace", 1), default=1024, metavar="MB",
                        help="TensorRT workspace limit in MB (default 1024; Jetson memory is shared with the CPU)")
    parser.add_argument("--timing-cache", type=Path, default=None, metavar="FILE",
                        help="TensorRT timing cache to load and update; speeds up rebuilds on the same device. "
                             "Keep it outside the bundle (e.g. ~/.cache/pcedge/timing.cache)")
    parser.add_argument("--hardware-compat", choices=("none", "ampere_plus", "same_compute_capability"),
                        default="none",
                        help="TensorRT hardware compatibility: ampere_plus runs on any sm80+ GPU, "
                             "same_compute_capability (TensorRT 10.16+) on any GPU of this sm; slower (see README)")
    parser.add_argument("--version-compatible", action="store_true",
                        help="TensorRT version compatibility: the plan also runs on later TensorRT of the same "
                             "major (it embeds the lean runtime; larger, may be slower; see README)")


def _input_chw(shape: list, where: str) -> tuple[int, int, int]:
    chw = shape[1:]
    if len(chw) != 3 or not all(isinstance(d, int) and d > 0 for d in chw):
        raise BundleError(f"{where}: input shape {shape} is not [batch, C, H, W] with static C, H, W")
    return tuple(chw)  # type: ignore[return-value]


def run(args: argparse.Namespace) -> int:
    from pcedge.runtime.tensorrt.build import TensorRTBuildError, build_engine
    from pcedge.runtime.tensorrt.device import probe_device, trt_major
    from pcedge.runtime.tensorrt.engines import engine_filename, record_engine

    try:
        bundle = open_bundle(args.bundle)
        input_chw = _input_chw(bundle.manifest.input.shape, str(bundle.root / "manifest.json"))
    except BundleError as exc:
        print(f"pcedge build-engine: {exc}", file=sys.stderr)
        return 2
    if args.timing_cache is not None and args.timing_cache.resolve().is_relative_to(bundle.root.resolve()):
        # Files in the bundle are checksummed; a cache rewritten by every build would break that.
        print(f"pcedge build-engine: {args.timing_cache}: keep the timing cache outside the bundle", file=sys.stderr)
        return 2
    if args.precision == "int8" and (problem := int8_graph_problem(bundle, "tensorrt")) is not None:
        print(f"pcedge build-engine: --precision int8: {problem}", file=sys.stderr)
        return 2
    try:
        device = probe_device()
    except TensorRTUnavailable as exc:
        print(f"pcedge build-engine: {exc}", file=sys.stderr)
        return 2
    precision = args.precision
    if precision == "auto":
        precision = "fp16" if device.fast_fp16 else "fp32"
        why = f"{device.name} {device.sm} {'has' if device.fast_fp16 else 'has no'} fast FP16"
        fp16_graph = bundle.fp16_model_path
        if precision == "fp16" and trt_major(device.trt_version) >= 11 and not (fp16_graph and fp16_graph.is_file()):
            # TensorRT 11 builds FP16 only from the float16 graph, which bundles from older exports lack.
            precision = "fp32"
            why += f", but TensorRT {device.trt_version} needs the bundle's float16 graph and it has none (re-export)"
        print(f"precision   {precision} (auto: {why})")
    opt_batch = args.opt_batch if args.opt_batch is not None else bundle.manifest.input.opt_batch
    max_batch = args.max_batch if args.max_batch is not None else bundle.manifest.input.max_batch
    opt_batch = min(max(opt_batch, args.min_batch), max_batch) if args.opt_batch is None else opt_batch
    rel = engine_filename(device, precision, args.hardware_compat, args.version_compatible)
    print(f"building    {rel} on {device.name} ({device.key}, {device.sm}), TensorRT {device.trt_version}, "
          f"batch {args.min_batch}/{opt_batch}/{max_batch}; this takes minutes on a Jetson")
    try:
        report = build_engine(
            bundle.model_path, bundle.root / rel, precision,
            args.min_batch, opt_batch, max_batch, args.workspace, args.timing_cache,
            input_name=bundle.manifest.input.name, input_chw=input_chw,
            fp16_onnx_path=bundle.fp16_model_path, int8_onnx_path=bundle.int8_model_path, fast_fp16=device.fast_fp16,
            hardware_compat=args.hardware_compat, version_compatible=args.version_compatible,
        )
    except (ValueError, TensorRTBuildError) as exc:
        print(f"pcedge build-engine: {exc}", file=sys.stderr)
        return 1
    except TensorRTUnavailable as exc:
        print(f"pcedge build-engine: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # CUDA out of memory, a TensorRT internal error: a clear line, never a traceback
        print(f"pcedge build-engine: TensorRT failed while building: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    spec = EngineSpec(
        file=rel, sm=device.sm, trt_version=device.trt_version, precision=precision,
        min_batch=args.min_batch, opt_batch=opt_batch, max_batch=max_batch,
        built_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"), device_name=device.name, workspace_mb=args.workspace,
        device_key=device.key, hardware_compat=args.hardware_compat, version_compatible=args.version_compatible,
    )
    record_engine(bundle, spec)
    print(f"graph       {report.graph.name if report.graph else bundle.model_path.name}")
    for note in report.notes:
        print(f"note        {note}")
    print(f"wrote       {report.plan_path} ({report.plan_bytes / 1e6:.1f} MB) in {report.seconds:.0f}s; "
          f"recorded in {bundle.root / 'manifest.json'}")
    if report.timing_cache is not None:
        state = "reused and updated" if report.timing_cache_reused else "created"
        print(f"wrote       timing cache {report.timing_cache} ({state})")
    hint = " --precision int8" if precision == "int8" else ""
    print(f"next: pcedge verify {q(bundle.root)} --backend tensorrt{hint}")
    return 0
