"""Build a TensorRT plan from the bundle's ONNX graph (TensorRT 10.x and 11.x Python API, on the device).

``tensorrt`` is imported inside :func:`build_engine` only. The plan is a plain serialized engine
(``trtexec --loadEngine`` reads it), written under a temporary name and renamed.

FP16 differs by major version. TensorRT 10 builds the float32 graph with ``BuilderFlag.FP16`` (weakly typed:
TensorRT picks per layer). TensorRT 11 networks are always strongly typed and ``BuilderFlag.FP16`` is gone
(NVIDIA's "Removed Python APIs" for 10.x -> 11.x), so an FP16 plan comes from the bundle's float16 graph
(``model.fp16_file``, float32 inputs and outputs), whose own parity figures the manifest records.

INT8 is explicit quantisation on both: the plan is built from the bundle's QDQ graph (``model.int8_file``),
whose QuantizeLinear/DequantizeLinear scales were calibrated at export; there is no calibrator. TensorRT 10
networks are weakly typed, so the build sets ``BuilderFlag.INT8`` (the Q/DQ layers' INT8 kernels are allowed
only with it) and, on a GPU with fast FP16, ``BuilderFlag.FP16`` for the layers the graph leaves float.
TensorRT 11 networks are strongly typed: the Q/DQ layers fix the INT8 parts, the rest runs in the graph's
float32, and no precision flag exists (NVIDIA, "Explicit Quantization": use it with strong typing,
precision-control build flags are not required).
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

from ..errors import TensorRTUnavailable
from ..files import write_bytes_atomic
from .device import import_tensorrt, trt_major
from .engines import HARDWARE_COMPAT, PRECISIONS


class TensorRTBuildError(RuntimeError):
    """TensorRT could not parse or build the graph; the message says where and why."""


@dataclass
class BuildReport:
    plan_path: Path
    plan_bytes: int
    precision: str
    trt_version: str
    min_batch: int
    opt_batch: int
    max_batch: int
    workspace_mb: int
    seconds: float
    timing_cache: Path | None
    timing_cache_reused: bool  # False for a new cache, or one recorded on another GPU/TensorRT
    graph: Path | None = None  # the ONNX file parsed (model.onnx, or the float16 graph on TensorRT 11)
    hardware_compat: str = "none"
    version_compatible: bool = False
    notes: list[str] = field(default_factory=list)


def format_parser_error(error) -> str:
    """One line per ONNX parser error: node name, op and TensorRT's description (``ParserError``).

    ``node_name()`` and ``node_operator()`` exist from TensorRT 10.0 on; ``node()`` and ``desc()`` in every
    version, so an older parser's error still reaches the user instead of an ``AttributeError``.
    """
    name_of = getattr(error, "node_name", None)
    op_of = getattr(error, "node_operator", None)
    node_name = (name_of() if name_of else "") or f"#{error.node()}"
    op = (op_of() if op_of else "") or "?"
    return f"node '{node_name}' ({op}): {error.desc()}"


def _make_logger(trt: ModuleType):
    """A TensorRT logger that prints warnings to stderr and keeps errors for the exception message."""

    class RecordingLogger(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)  # required by the ILogger docs for Python subclasses
            self.errors: list[str] = []

        def log(self, severity, msg):
            if severity in (trt.ILogger.INTERNAL_ERROR, trt.ILogger.ERROR):
                self.errors.append(msg)
                print(f"[TensorRT] ERROR: {msg}", file=sys.stderr)
            elif severity == trt.ILogger.WARNING:
                print(f"[TensorRT] WARNING: {msg}", file=sys.stderr)

    return RecordingLogger()


def build_engine(
    onnx_path: Path,
    plan_path: Path,
    precision: str,
    min_batch: int,
    opt_batch: int,
    max_batch: int,
    workspace_mb: int,
    timing_cache: Path | None,
    input_name: str,
    input_chw: tuple[int, int, int],
    *,
    fp16_onnx_path: Path | None = None,
    int8_onnx_path: Path | None = None,
    fast_fp16: bool = True,
    hardware_compat: str = "none",
    version_compatible: bool = False,
) -> BuildReport:
    """Parse the ONNX graph with TensorRT's ONNX parser and write a serialized plan to ``plan_path``.

    One optimisation profile covers batches ``min_batch..max_batch`` (kernels tuned for ``opt_batch``) of
    input ``input_name`` ``[B, *input_chw]``. ``precision`` "fp16" is an error on a GPU without fast FP16
    (``fast_fp16``, from the compute capability; never a silent fp32 build); on TensorRT 11 it needs the
    float16 graph ``fp16_onnx_path``. ``precision`` "int8" builds the QDQ graph ``int8_onnx_path``. ``hardware_compat`` ("ampere_plus", "same_compute_capability") and
    ``version_compatible`` set TensorRT's hardware- and version-compatibility options. The timing cache,
    when given, is loaded first and saved after. The plan is written to a temporary name and renamed.
    """
    onnx_path, plan_path = Path(onnx_path), Path(plan_path)
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose from {', '.join(PRECISIONS)}")
    if not 1 <= min_batch <= opt_batch <= max_batch:
        raise ValueError(f"need 1 <= min_batch <= opt_batch <= max_batch, got {min_batch}, {opt_batch}, {max_batch}")
    if workspace_mb <= 0:
        raise ValueError(f"workspace must be positive (MB), got {workspace_mb}")
    if hardware_compat not in HARDWARE_COMPAT:
        raise ValueError(f"unknown hardware compatibility {hardware_compat!r}; choose from {', '.join(HARDWARE_COMPAT)}")
    if precision == "fp16" and not fast_fp16:
        raise TensorRTBuildError("fp16 requested, but this GPU has no fast FP16 (compute capability); "
                                 "build with --precision fp32")
    trt = import_tensorrt()
    major = trt_major(trt.__version__)
    graph = onnx_path
    if precision == "fp16" and major >= 11:
        if fp16_onnx_path is None or not Path(fp16_onnx_path).is_file():
            raise TensorRTBuildError(
                f"TensorRT {trt.__version__} builds FP16 only from a float16 graph (strongly typed networks), and "
                f"this bundle has none{f' ({fp16_onnx_path} is missing)' if fp16_onnx_path else ''}: re-export the "
                "bundle with this pcedge, or build with --precision fp32"
            )
        graph = Path(fp16_onnx_path)
    if precision == "int8":
        if int8_onnx_path is None or not Path(int8_onnx_path).is_file():
            raise TensorRTBuildError(
                "INT8 engines are built from the bundle's INT8 (QDQ) graph, and this bundle has none"
                f"{f' ({int8_onnx_path} is missing)' if int8_onnx_path else ''} (exported before pcedge wrote one, "
                "with --no-int8, or refused by the export's parity gate: see `pcedge info`); build with "
                "--precision fp16 or fp32"
            )
        graph = Path(int8_onnx_path)
    started = time.perf_counter()
    logger = _make_logger(trt)
    try:
        builder = trt.Builder(logger)
    except TypeError as exc:  # pybind11: "factory function returned nullptr" when CUDA cannot start
        raise TensorRTUnavailable(f"TensorRT could not create a Builder (CUDA did not start?): {exc}") from exc
    # Flags 0: TensorRT 10 networks are always explicit-batch (EXPLICIT_BATCH is deprecated and ignored);
    # TensorRT 11 networks are always strongly typed (the flag is gone or ignored).
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    # `path` lets the parser find externally stored weights next to the model (OnnxParser.parse docs).
    if not parser.parse(graph.read_bytes(), path=str(graph)):
        errors = [format_parser_error(parser.get_error(i)) for i in range(parser.num_errors)]
        raise TensorRTBuildError(f"{graph}: TensorRT's ONNX parser rejected the graph:\n  " + "\n  ".join(errors))

    inputs = {network.get_input(i).name: tuple(network.get_input(i).shape) for i in range(network.num_inputs)}
    if input_name not in inputs:
        raise TensorRTBuildError(f"{graph}: no input named {input_name!r}; the graph's inputs are {sorted(inputs)}")
    graph_chw = inputs[input_name][1:]
    if len(graph_chw) != 3 or any(d not in (-1, want) for d, want in zip(graph_chw, input_chw)):
        raise TensorRTBuildError(
            f"{graph}: input {input_name!r} has shape {list(inputs[input_name])}, "
            f"the manifest says [B, {', '.join(map(str, input_chw))}]"
        )

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_mb) << 20)
    if precision == "fp16" and major == 10:
        config.set_flag(trt.BuilderFlag.FP16)  # deprecated from 10.12, removed in 11: 10.x only
    if precision == "int8" and major == 10:
        # Weakly typed: the Q/DQ layers run in INT8 only with the INT8 flag; the layers the graph leaves float
        # (stem, depthwise convolutions, aggregation tail) run in FP16 where the GPU is fast at it.
        config.set_flag(trt.BuilderFlag.INT8)  # both flags deprecated from 10.12, removed in 11
        if fast_fp16:
            config.set_flag(trt.BuilderFlag.FP16)
    if hardware_compat != "none":
        level = getattr(trt.HardwareCompatibilityLevel, hardware_compat.upper(), None)
        if level is None:
            raise TensorRTBuildError(f"TensorRT {trt.__version__} has no hardware compatibility level "
                                     f"{hardware_compat!r} (SAME_COMPUTE_CAPABILITY needs TensorRT 10.16+)")
        config.hardware_compatibility_level = level
    if version_compatible:
        # The plan carries its lean runtime; a later TensorRT of the same major runs it with
        # Runtime.engine_host_code_allowed (set by TensorRTBackend for such plans).
        config.set_flag(trt.BuilderFlag.VERSION_COMPATIBLE)

    profile = builder.create_optimization_profile()
    profile.set_shape(input_name, (min_batch, *input_chw), (opt_batch, *input_chw), (max_batch, *input_chw))
    if config.add_optimization_profile(profile) < 0:
        raise TensorRTBuildError(f"TensorRT refused the optimisation profile batch {min_batch}..{max_batch} for {input_name!r}")

    notes: list[str] = []
    blob = timing_cache.read_bytes() if timing_cache is not None and timing_cache.is_file() else b""
    cache = config.create_timing_cache(blob)
    reused = bool(blob)
    # set_timing_cache verifies the cache's header against this GPU and TensorRT; a foreign cache is
    # replaced by a fresh one rather than used with another device's timings.
    if cache is None or not config.set_timing_cache(cache, ignore_mismatch=False):
        notes.append(f"timing cache {timing_cache} was recorded on another GPU or TensorRT; started a new one")
        # The rejection was logged as an error; it is handled, so it must not head a later build failure.
        logger.errors.clear()
        cache = config.create_timing_cache(b"")
        reused = False
        if cache is None or not config.set_timing_cache(cache, ignore_mismatch=False):
            raise TensorRTBuildError("TensorRT could not create an empty timing cache")

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        detail = "; ".join(logger.errors[-5:]) or "no error message from TensorRT"
        raise TensorRTBuildError(f"{graph}: TensorRT could not build the engine: {detail}")
    plan_path.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(plan_path, serialized)
    if timing_cache is not None:
        timing_cache.parent.mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(timing_cache, cache.serialize())
    return BuildReport(
        plan_path=plan_path,
        plan_bytes=plan_path.stat().st_size,
        precision=precision,
        trt_version=trt.__version__,
        min_batch=min_batch,
        opt_batch=opt_batch,
        max_batch=max_batch,
        workspace_mb=int(workspace_mb),
        seconds=time.perf_counter() - started,
        timing_cache=timing_cache,
        timing_cache_reused=reused,
        graph=graph,
        hardware_compat=hardware_compat,
        version_compatible=version_compatible,
        notes=notes,
    )
