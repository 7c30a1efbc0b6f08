"""Run a TensorRT plan: images ``[B, 3, H, W]`` float32 -> embeddings ``[B, h*w, D]`` float32.

Written against the TensorRT 10.x / 11.x Python API (named tensors: ``set_input_shape``,
``set_tensor_address``, ``execute_async_v3``; checked name by name against NVIDIA's binding sources by
``tests/test_trt_standin.py``) and the CUDA runtime bindings of cuda-python, following NVIDIA's
``samples/python/common_runtime.py``. Both are imported when a backend is created, not on import.
"""

from __future__ import annotations

import math
import os
import threading
from pathlib import Path
from types import ModuleType

import numpy as np

from ..errors import TensorRTUnavailable
from .cuda import CudaError, cuda_call, import_cudart, mapped_float32, native_handle, pinned_float32
from .device import import_tensorrt
from .engines import precision_from_filename


class TensorRTBackend:
    """A deserialized TensorRT plan: images ``[B, 3, H, W]`` float32 -> embeddings ``[B, h*w, D]`` float32.

    Buffers and one CUDA stream are allocated once, for the profile's largest batch. On a discrete GPU each
    call stages through page-locked host buffers (copy in, ``execute_async_v3``, copy out, synchronise). On
    an integrated GPU (``zero_copy``, a Jetson) the buffers are mapped page-locked host memory that the GPU
    reads and writes in place: no host<->device copies. A batch larger than the profile's maximum is split;
    one smaller than its minimum is padded. Calls from several threads are serialised by a lock.
    """

    name = "tensorrt"

    def __init__(self, plan_path: str | os.PathLike[str], input_name: str = "images",
                 output_name: str = "embeddings", precision: str | None = None, *,
                 zero_copy: bool = False, allow_host_code: bool = False):
        self.plan_path = Path(plan_path)
        self.graph = self.plan_path  # the Backend protocol's name for the file that runs
        self.input_name, self.output_name = input_name, output_name
        self.precision = precision or precision_from_filename(self.plan_path) or "unknown"
        self.zero_copy = bool(zero_copy)
        self._lock = threading.Lock()
        self._stream = None
        self._device_in = self._device_out = None
        self._host_in_ptr = self._host_out_ptr = None
        self._host_in = self._host_out = None
        self._context = self._engine = self._runtime = None
        trt = import_tensorrt()
        self._cudart = cudart = import_cudart()
        self._trt = trt
        if not self.plan_path.is_file():
            raise TensorRTUnavailable(f"{self.plan_path}: no such engine file; run `pcedge build-engine` on this device")
        self._logger = trt.Logger(trt.Logger.WARNING)
        try:
            self._runtime = trt.Runtime(self._logger)
        except TypeError as exc:  # pybind11: "factory function returned nullptr" when CUDA cannot start
            raise TensorRTUnavailable(f"TensorRT could not create a Runtime (CUDA did not start?): {exc}") from exc
        if allow_host_code:
            # A version-compatible plan embeds its lean runtime (host code); only our own plans get here.
            self._runtime.engine_host_code_allowed = True
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
        if self.zero_copy:
            self._host_in_ptr, self._device_in, self._host_in = mapped_float32(cudart, in_count)
            self._host_out_ptr, self._device_out, self._host_out = mapped_float32(cudart, out_count)
        else:
            self._device_in = cuda_call(cudart, cudart.cudaMalloc(in_count * 4), "cudaMalloc(input)")
            self._device_out = cuda_call(cudart, cudart.cudaMalloc(out_count * 4), "cudaMalloc(output)")
            self._host_in_ptr, self._host_in = pinned_float32(cudart, in_count)
            self._host_out_ptr, self._host_out = pinned_float32(cudart, out_count)
        # A non-default stream: execute_async_v3 on the default stream costs extra device synchronisations.
        self._stream = cuda_call(cudart, cudart.cudaStreamCreate(), "cudaStreamCreate")
        self._stream_handle = native_handle(self._stream)
        # The buffers never move, so their addresses are bound once.
        for tensor, pointer in ((self.input_name, self._device_in), (self.output_name, self._device_out)):
            if not self._context.set_tensor_address(tensor, int(pointer)):
                raise ValueError(f"{self.plan_path}: TensorRT refused the buffer address for {tensor!r}")
        memory = "zero-copy" if self.zero_copy else "pinned staging"
        self.description = (
            f"tensorrt (TensorRT {trt.__version__}, {self.precision}, batch {self.min_batch}..{self.max_batch}, "
            f"{memory}, {self.plan_path.name})"
        )

    def __call__(self, images: np.ndarray) -> np.ndarray:
        """``[B, 3, H, W]`` float32 -> ``[B, h*w, D]`` float32 (a fresh array, not a view of the buffers)."""
        images = np.asarray(images)
        if images.ndim != 4 or tuple(images.shape[1:]) != tuple(self.input_chw):
            raise ValueError(f"expected images [B, {', '.join(map(str, self.input_chw))}], got {list(images.shape)}")
        batch = images.shape[0]
        if batch == 0:
            raise ValueError("expected at least one image, got an empty batch")
        with self._lock:
            if self._stream is None:
                raise RuntimeError(f"{self.plan_path}: backend is closed")
            out = np.empty((batch, *self.output_hw_d), dtype=np.float32)
            for start in range(0, batch, self.max_batch):
                self._run_chunk(images[start:start + self.max_batch], out[start:start + self.max_batch])
        return out

    def _run_chunk(self, images: np.ndarray, out: np.ndarray) -> None:
        """One engine call on ``images`` ``[b, 3, H, W]`` (b <= max_batch) into ``out`` ``[b, h*w, D]``."""
        cudart, ctx = self._cudart, self._context
        real = images.shape[0]
        run = max(real, self.min_batch)  # pad up to the profile's minimum with zeros
        in_count = run * math.prod(self.input_chw)
        staged = self._host_in[:in_count].reshape(run, *self.input_chw)
        staged[:real] = images  # the one host copy in (also converts to float32)
        if run > real:
            staged[real:] = 0.0
        if not ctx.set_input_shape(self.input_name, (run, *self.input_chw)):
            raise ValueError(f"TensorRT refused input shape {[run, *self.input_chw]}")
        out_shape = tuple(int(d) for d in ctx.get_tensor_shape(self.output_name))
        out_count = math.prod(out_shape)
        stream = self._stream
        if not self.zero_copy:
            cuda_call(cudart, cudart.cudaMemcpyAsync(self._device_in, self._host_in_ptr, in_count * 4,
                                                     cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, stream),
                      "cudaMemcpyAsync(host->device)")
        if not ctx.execute_async_v3(self._stream_handle):
            raise CudaError(f"{self.plan_path.name}: execute_async_v3 failed (see the TensorRT log)")
        if not self.zero_copy:
            cuda_call(cudart, cudart.cudaMemcpyAsync(self._host_out_ptr, self._device_out, out_count * 4,
                                                     cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost, stream),
                      "cudaMemcpyAsync(device->host)")
        cuda_call(cudart, cudart.cudaStreamSynchronize(stream), "cudaStreamSynchronize")
        out[...] = self._host_out[:out_count].reshape(out_shape)[:real]  # the one host copy out

    def close(self) -> None:
        """Free the stream and every buffer (idempotent); the first CUDA error is raised after all are freed."""
        lock = getattr(self, "_lock", None)
        if lock is None:
            return
        with lock:
            self._release()

    def _release(self) -> None:
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
        self._host_in = self._host_out = None  # views of the pinned memory: drop before freeing it
        if getattr(self, "zero_copy", False):
            # Mapped memory: the device pointers alias the host allocations, freed once through them.
            self._device_in = self._device_out = None
        else:
            release("_device_in", "cudaFree")
            release("_device_out", "cudaFree")
        release("_host_in_ptr", "cudaFreeHost")
        release("_host_out_ptr", "cudaFreeHost")
        # Context before engine before runtime: each depends on the next.
        self._context = self._engine = self._runtime = None
        if failures:
            raise CudaError("; ".join(failures))

    def __del__(self) -> None:
        # A backend dropped without close() must not keep GPU and pinned memory for the process's life.
        try:
            self.close()
        except Exception:  # nowhere to report from a finaliser; close() reports when called explicitly
            pass

    def __enter__(self) -> "TensorRTBackend":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
