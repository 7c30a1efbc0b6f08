"""TensorRT 10 on the device: build a plan from the bundle's ONNX graph, and run it.

The only module that touches ``tensorrt`` and ``cuda-python``; both are imported inside functions, so that
importing this module (and ``pcedge --help``) works on a machine without them. Written against the
TensorRT 10 Python API (named tensors: ``set_input_shape``, ``set_tensor_address``, ``execute_async_v3``)
and the CUDA runtime bindings of cuda-python, following NVIDIA's ``samples/python/common_runtime.py``.

cuda-python returns a tuple ``(error, *values)`` from every call; :func:`cuda_call` checks each one.
"""

from __future__ import annotations

import ctypes
import importlib
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

import numpy as np

from .errors import TensorRTUnavailable

_TENSORRT_HINT = (
    "on a Jetson it comes with JetPack (apt install python3-libnvinfer; a virtualenv needs "
    "--system-site-packages to see it); elsewhere `pip install tensorrt`"
)
_CUDA_PYTHON_HINT = "`pip install cuda-python` with the major.minor of the device's CUDA (JetPack 6.1/6.2: 12.6)"


class CudaError(RuntimeError):
    """A CUDA runtime call returned an error; the message names the call and the error."""


class TensorRTBuildError(RuntimeError):
    """TensorRT could not parse or build the graph; the message says where and why."""


# --------------------------------------------------------------------------------------------------
# Lazy imports and CUDA error checking
# --------------------------------------------------------------------------------------------------


def import_tensorrt() -> ModuleType:
    """The ``tensorrt`` module, or :class:`TensorRTUnavailable` saying how to get it."""
    try:
        return importlib.import_module("tensorrt")
    except (ImportError, OSError) as exc:  # OSError: the Python package is there but libnvinfer is not
        raise TensorRTUnavailable(f"tensorrt is not importable ({exc}): {_TENSORRT_HINT}") from exc


def import_cudart() -> ModuleType:
    """cuda-python's CUDA runtime bindings (``cuda.bindings.runtime``; ``cuda.cudart`` before 12.6)."""
    errors = []
    for name in ("cuda.bindings.runtime", "cuda.cudart"):
        try:
            return importlib.import_module(name)
        except (ImportError, OSError) as exc:
            errors.append(f"{name}: {exc}")
    raise TensorRTUnavailable(f"cuda-python is not importable ({'; '.join(errors)}): {_CUDA_PYTHON_HINT}")


def _error_text(cudart: ModuleType, err) -> str:
    """``cudaErrorNoDevice (no CUDA-capable device is detected)`` for a ``cudaError_t``."""
    name = getattr(err, "name", str(err))
    try:
        status, text = cudart.cudaGetErrorString(err)
        if getattr(status, "value", status) == 0:
            return f"{name} ({text.decode() if isinstance(text, bytes) else text})"
    except Exception:  # the description is a courtesy; the name alone still identifies the error
        pass
    return name


def cuda_call(cudart: ModuleType, result, what: str):
    """Check a cuda-python result ``(error, *values)``; return the values (a single value unwrapped)."""
    if not isinstance(result, tuple):
        result = (result,)
    err, values = result[0], result[1:]
    if getattr(err, "value", err) != 0:  # cudaSuccess is 0
        raise CudaError(f"{what} failed: {_error_text(cudart, err)}")
    if not values:
        return None
    return values[0] if len(values) == 1 else values


# --------------------------------------------------------------------------------------------------
# Device probe
# --------------------------------------------------------------------------------------------------


@dataclass
class DeviceProbe:
    trt_version: str
    sm: str  # e.g. "sm87"
    device_name: str
    fast_fp16: bool


def _describe_device_0(cudart: ModuleType) -> tuple[str, str]:
    """``(sm, name)`` of CUDA device 0, or :class:`TensorRTUnavailable` when there is none."""
    try:
        count = cuda_call(cudart, cudart.cudaGetDeviceCount(), "cudaGetDeviceCount")
    except CudaError as exc:
        raise TensorRTUnavailable(f"no CUDA GPU ({exc})") from exc
    if not count:
        raise TensorRTUnavailable("no CUDA GPU (cudaGetDeviceCount found 0 devices)")
    try:
        props = cuda_call(cudart, cudart.cudaGetDeviceProperties(0), "cudaGetDeviceProperties(0)")
    except CudaError as exc:
        raise TensorRTUnavailable(f"CUDA device 0 is not usable ({exc})") from exc
    name = props.name.decode(errors="replace") if isinstance(props.name, bytes) else str(props.name)
    return f"sm{props.major}{props.minor}", name.rstrip("\x00").strip()


def probe() -> DeviceProbe:
    """TensorRT version, compute capability, name and fast-FP16 support of device 0.

    Raises :class:`TensorRTUnavailable` listing every missing piece, plus what *was* found, so that one
    message is enough to fix a device's setup.
    """
    problems: list[str] = []
    found: list[str] = []
    trt = cudart = None
    sm = name = ""
    try:
        trt = import_tensorrt()
        found.append(f"TensorRT {trt.__version__}")
    except TensorRTUnavailable as exc:
        problems.append(str(exc))
    try:
        cudart = import_cudart()
    except TensorRTUnavailable as exc:
        problems.append(str(exc))
    if cudart is not None:
        try:
            sm, name = _describe_device_0(cudart)
            found.append(f"CUDA device 0: {name} ({sm})")
        except TensorRTUnavailable as exc:
            problems.append(str(exc))
    if problems:
        also = f" [found: {', '.join(found)}]" if found else ""
        raise TensorRTUnavailable("TensorRT cannot run here: " + "; ".join(problems) + also)
    # IBuilder.platform_has_fast_fp16 (TensorRT Python API, Builder): the authority on FP16 speed.
    builder = trt.Builder(trt.Logger(trt.Logger.ERROR))
    return DeviceProbe(trt_version=trt.__version__, sm=sm, device_name=name, fast_fp16=bool(builder.platform_has_fast_fp16))


# --------------------------------------------------------------------------------------------------
# Building a plan
# --------------------------------------------------------------------------------------------------


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
    notes: list[str] = field(default_factory=list)


def format_parser_error(error) -> str:
    """One line per ONNX parser error: node name, op and TensorRT's description (``IParserError``)."""
    node_name = error.node_name() or f"#{error.node()}"
    op = error.node_operator() or "?"
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


def _atomic_write_bytes(path: Path, data) -> None:
    tmp = path.with_name(path.name + ".tmp")  # bundle checksums skip *.tmp
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


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
) -> BuildReport:
    """Parse ``onnx_path`` with TensorRT's ONNX parser and write a serialized plan to ``plan_path``.

    One optimisation profile covers batches ``min_batch..max_batch`` (kernels tuned for ``opt_batch``) of
    input ``input_name`` ``[B, *input_chw]``. ``precision`` "fp16" enables FP16 kernels and is an error on
    a GPU without fast FP16 (never a silent fp32 build). The timing cache, when given, is loaded first and
    saved after. The plan is a plain serialized engine (``trtexec --loadEngine`` reads it), written to a
    temporary name and renamed.
    """
    onnx_path, plan_path = Path(onnx_path), Path(plan_path)
    if precision not in ("fp32", "fp16"):
        raise ValueError(f"unknown precision {precision!r}; choose fp32 or fp16")
    if not 1 <= min_batch <= opt_batch <= max_batch:
        raise ValueError(f"need 1 <= min_batch <= opt_batch <= max_batch, got {min_batch}, {opt_batch}, {max_batch}")
    if workspace_mb <= 0:
        raise ValueError(f"workspace must be positive (MB), got {workspace_mb}")
    trt = import_tensorrt()
    started = time.perf_counter()
    logger = _make_logger(trt)
    builder = trt.Builder(logger)
    # TensorRT 10 networks are always explicit-batch; the EXPLICIT_BATCH flag is deprecated and ignored.
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    # `path` lets the parser find externally stored weights next to the model (OnnxParser.parse docs).
    if not parser.parse(onnx_path.read_bytes(), path=str(onnx_path)):
        errors = [format_parser_error(parser.get_error(i)) for i in range(parser.num_errors)]
        raise TensorRTBuildError(f"{onnx_path}: TensorRT's ONNX parser rejected the graph:\n  " + "\n  ".join(errors))

    inputs = {network.get_input(i).name: tuple(network.get_input(i).shape) for i in range(network.num_inputs)}
    if input_name not in inputs:
        raise TensorRTBuildError(f"{onnx_path}: no input named {input_name!r}; the graph's inputs are {sorted(inputs)}")
    graph_chw = inputs[input_name][1:]
    if len(graph_chw) != 3 or any(d not in (-1, want) for d, want in zip(graph_chw, input_chw)):
        raise TensorRTBuildError(
            f"{onnx_path}: input {input_name!r} has shape {list(inputs[input_name])}, "
            f"the manifest says [B, {', '.join(map(str, input_chw))}]"
        )

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_mb) << 20)
    if precision == "fp16":
        if not builder.platform_has_fast_fp16:
            raise TensorRTBuildError(
                "fp16 requested, but this GPU has no fast FP16 (builder.platform_has_fast_fp16 is False); "
                "build with --precision fp32"
            )
        config.set_flag(trt.BuilderFlag.FP16)

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
        cache = config.create_timing_cache(b"")
        reused = False
        if cache is None or not config.set_timing_cache(cache, ignore_mismatch=False):
            raise TensorRTBuildError("TensorRT could not create an empty timing cache")

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        detail = "; ".join(logger.errors[-5:]) or "no error message from TensorRT"
        raise TensorRTBuildError(f"{onnx_path}: TensorRT could not build the engine: {detail}")
    plan_path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write_bytes(plan_path, serialized)
    if timing_cache is not None:
        timing_cache.parent.mkdir(parents=True, exist_ok=True)
        _atomic_write_bytes(timing_cache, cache.serialize())
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
        notes=notes,
    )


# --------------------------------------------------------------------------------------------------
# Running a plan
# --------------------------------------------------------------------------------------------------


def _pinned_float32(cudart: ModuleType, count: int) -> tuple[int, np.ndarray]:
    """Page-locked host memory for ``count`` float32 values: ``(pointer, numpy view)``."""
    pointer = cuda_call(cudart, cudart.cudaMallocHost(count * 4), f"cudaMallocHost({count * 4} bytes)")
    view = np.ctypeslib.as_array(ctypes.cast(pointer, ctypes.POINTER(ctypes.c_float)), shape=(count,))
    return pointer, view


class TensorRTBackend:
    """A deserialized TensorRT plan: images ``[B, 3, H, W]`` float32 -> embeddings ``[B, h*w, D]`` float32.

    Device buffers, page-locked host buffers and one CUDA stream are allocated once, for the profile's
    largest batch; each call copies in, enqueues (``execute_async_v3``), copies out and synchronises. Not
    thread-safe: one backend per thread.
    """

    name = "tensorrt"

    def __init__(self, plan_path: str | os.PathLike[str], input_name: str = "images",
                 output_name: str = "embeddings", precision: str | None = None):
        from .engines import precision_from_filename  # pure Python; imported here to keep module import light

        self.plan_path = Path(plan_path)
        self.input_name, self.output_name = input_name, output_name
        self.precision = precision or precision_from_filename(self.plan_path) or "unknown"
        trt = import_tensorrt()
        self._cudart = cudart = import_cudart()
        self._trt = trt
        self._stream = None
        self._device_in = self._device_out = None
        self._host_in_ptr = self._host_out_ptr = None
        if not self.plan_path.is_file():
            raise TensorRTUnavailable(f"{self.plan_path}: no such engine file; run `pcedge build-engine` on this device")
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self._engine = self._runtime.deserialize_cuda_engine(self.plan_path.read_bytes())
        if self._engine is None:
            raise TensorRTUnavailable(
                f"{self.plan_path}: TensorRT {trt.__version__} could not deserialize this plan (built with another "
                "TensorRT version or GPU?); rebuild it with `pcedge build-engine`"
            )
        try:
            self._setup(trt, cudart)
        except BaseException:
            self.close()
            raise

    def _setup(self, trt: ModuleType, cudart: ModuleType) -> None:
        engine = self._engine
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        if sorted(names) != sorted([self.input_name, self.output_name]):
            raise ValueError(
                f"{self.plan_path}: expected tensors {self.input_name!r} (input) and {self.output_name!r} (output), "
                f"the engine has {names}"
            )
        if engine.get_tensor_mode(self.input_name) != trt.TensorIOMode.INPUT:
            raise ValueError(f"{self.plan_path}: {self.input_name!r} is not an input of the engine")
        for tensor in (self.input_name, self.output_name):
            if engine.get_tensor_dtype(tensor) != trt.DataType.FLOAT:
                raise ValueError(f"{self.plan_path}: tensor {tensor!r} is {engine.get_tensor_dtype(tensor)}, expected float32")

        low, _, high = (tuple(int(d) for d in dims) for dims in engine.get_tensor_profile_shape(self.input_name, 0))
        self.min_batch, self.max_batch = low[0], high[0]
        self.input_chw = high[1:]
        self._context = engine.create_execution_context()
        if self._context is None:
            raise CudaError(f"{self.plan_path}: could not create an execution context (out of GPU memory?)")
        # Size the output for the largest batch: set that input shape and let TensorRT infer the output's.
        if not self._context.set_input_shape(self.input_name, high):
            raise ValueError(f"{self.plan_path}: TensorRT refused input shape {list(high)}")
        max_out = tuple(int(d) for d in self._context.get_tensor_shape(self.output_name))
        if len(max_out) != 3 or min(max_out) <= 0:
            raise ValueError(f"{self.plan_path}: output {self.output_name!r} has shape {list(max_out)}, expected [B, h*w, D]")
        self.output_hw_d = max_out[1:]

        in_count, out_count = math.prod(high), math.prod(max_out)
        self._device_in = cuda_call(cudart, cudart.cudaMalloc(in_count * 4), "cudaMalloc(input)")
        self._device_out = cuda_call(cudart, cudart.cudaMalloc(out_count * 4), "cudaMalloc(output)")
        self._host_in_ptr, self._host_in = _pinned_float32(cudart, in_count)
        self._host_out_ptr, self._host_out = _pinned_float32(cudart, out_count)
        # A non-default stream: execute_async_v3 on the default stream costs extra device synchronisations.
        self._stream = cuda_call(cudart, cudart.cudaStreamCreate(), "cudaStreamCreate")
        # The buffers never move, so their addresses are bound once.
        for tensor, pointer in ((self.input_name, self._device_in), (self.output_name, self._device_out)):
            if not self._context.set_tensor_address(tensor, int(pointer)):
                raise ValueError(f"{self.plan_path}: TensorRT refused the buffer address for {tensor!r}")
        self.description = (
            f"tensorrt (TensorRT {trt.__version__}, {self.precision}, batch {self.min_batch}..{self.max_batch}, "
            f"{self.plan_path.name})"
        )

    def __call__(self, images: np.ndarray) -> np.ndarray:
        """``[B, 3, H, W]`` float32 -> ``[B, h*w, D]`` float32 (a fresh array, not a view of the buffers)."""
        if self._stream is None:
            raise RuntimeError(f"{self.plan_path}: backend is closed")
        images = np.ascontiguousarray(images, dtype=np.float32)
        if images.ndim != 4 or images.shape[1:] != self.input_chw:
            raise ValueError(f"expected images [B, {', '.join(map(str, self.input_chw))}], got {list(images.shape)}")
        batch = images.shape[0]
        if not self.min_batch <= batch <= self.max_batch:
            raise ValueError(
                f"batch {batch} is outside the engine's optimisation profile [{self.min_batch}, {self.max_batch}] "
                f"({self.plan_path.name}); rebuild with `pcedge build-engine --max-batch {batch}` or send smaller batches"
            )
        cudart, ctx = self._cudart, self._context
        if not ctx.set_input_shape(self.input_name, images.shape):
            raise ValueError(f"TensorRT refused input shape {list(images.shape)}")
        out_shape = tuple(int(d) for d in ctx.get_tensor_shape(self.output_name))
        in_count, out_count = images.size, math.prod(out_shape)
        self._host_in[:in_count] = images.reshape(-1)
        to_device, to_host = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        cuda_call(cudart, cudart.cudaMemcpyAsync(self._device_in, self._host_in_ptr, in_count * 4, to_device, self._stream),
                  "cudaMemcpyAsync(host->device)")
        if not ctx.execute_async_v3(stream_handle=int(self._stream)):
            raise CudaError(f"{self.plan_path.name}: execute_async_v3 failed (see the TensorRT log)")
        cuda_call(cudart, cudart.cudaMemcpyAsync(self._host_out_ptr, self._device_out, out_count * 4, to_host, self._stream),
                  "cudaMemcpyAsync(device->host)")
        cuda_call(cudart, cudart.cudaStreamSynchronize(self._stream), "cudaStreamSynchronize")
        return self._host_out[:out_count].reshape(out_shape).copy()

    def close(self) -> None:
        """Free the stream and every buffer (idempotent); the first CUDA error is raised after all are freed."""
        cudart = getattr(self, "_cudart", None)
        failures: list[str] = []

        def release(attribute: str, call_name: str) -> None:
            handle = getattr(self, attribute, None)
            if handle is None or cudart is None:
                return
            setattr(self, attribute, None)
            try:
                cuda_call(cudart, getattr(cudart, call_name)(handle), call_name)
            except CudaError as exc:
                failures.append(str(exc))

        release("_stream", "cudaStreamDestroy")
        release("_device_in", "cudaFree")
        release("_device_out", "cudaFree")
        self._host_in = self._host_out = None  # views of the pinned memory: drop before freeing it
        release("_host_in_ptr", "cudaFreeHost")
        release("_host_out_ptr", "cudaFreeHost")
        # Context before engine before runtime: each depends on the next.
        for attribute in ("_context", "_engine", "_runtime"):
            if hasattr(self, attribute):
                setattr(self, attribute, None)
        if failures:
            raise CudaError("; ".join(failures))

    def __enter__(self) -> "TensorRTBackend":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
