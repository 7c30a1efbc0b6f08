"""Run a TensorRT plan: images ``[B, 3, H, W]`` float32 -> embeddings ``[B, h*w, D]`` float32.

Written against the TensorRT 10 Python API (named tensors: ``set_input_shape``, ``set_tensor_address``,
``execute_async_v3``) and the CUDA runtime bindings of cuda-python, following NVIDIA's
``samples/python/common_runtime.py``. Both are imported when a backend is created, not on import.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from types import ModuleType

import numpy as np

from ..errors import TensorRTUnavailable
from .cuda import CudaError, cuda_call, import_cudart, pinned_float32
from .device import import_tensorrt
from .engines import precision_from_filename


class TensorRTBackend:
    """A deserialized TensorRT plan: images ``[B, 3, H, W]`` float32 -> embeddings ``[B, h*w, D]`` float32.

    Device buffers, page-locked host buffers and one CUDA stream are allocated once, for the profile's
    largest batch; each call copies in, enqueues (``execute_async_v3``), copies out and synchronises. Not
    thread-safe: one backend per thread.
    """

    name = "tensorrt"

    def __init__(self, plan_path: str | os.PathLike[str], input_name: str = "images",
                 output_name: str = "embeddings", precision: str | None = None):

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
        self._host_in_ptr, self._host_in = pinned_float32(cudart, in_count)
        self._host_out_ptr, self._host_out = pinned_float32(cudart, out_count)
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
