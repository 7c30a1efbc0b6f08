"""cuda-python's CUDA runtime, imported lazily, with every call's ``(error, *values)`` result checked.

cuda-python returns a tuple ``(error, *values)`` from every call; :func:`cuda_call` checks each one and
raises :class:`CudaError` naming the call. Importing this module does not import cuda-python. Every call
pcedge makes is checked against the real ``cuda.bindings.runtime`` package in ``tests/test_cuda_calls.py``.
"""

from __future__ import annotations

import ctypes
import importlib
from types import ModuleType

import numpy as np

from ..errors import TensorRTUnavailable

CUDA_PYTHON_HINT = ("`pip install cuda-python` with the major.minor of the device's CUDA "
                    "(JetPack 6.1/6.2: 'cuda-python==12.6.*'; JetPack 7: 13.0)")


class CudaError(RuntimeError):
    """A CUDA runtime call returned an error; the message names the call and the error."""


def import_cudart() -> ModuleType:
    """cuda-python's CUDA runtime bindings (``cuda.bindings.runtime``; ``cuda.cudart`` before 12.6)."""
    errors = []
    for name in ("cuda.bindings.runtime", "cuda.cudart"):
        try:
            return importlib.import_module(name)
        except (ImportError, OSError) as exc:
            errors.append(f"{name}: {exc}")
    raise TensorRTUnavailable(f"cuda-python is not importable ({'; '.join(errors)}): {CUDA_PYTHON_HINT}")


def error_name(err) -> str:
    """``"cudaErrorNoDevice"`` for a ``cudaError_t`` (or its integer)."""
    return getattr(err, "name", str(err))


def _error_text(cudart: ModuleType, err) -> str:
    """``cudaErrorNoDevice (no CUDA-capable device is detected)`` for a ``cudaError_t``."""
    name = error_name(err)
    try:
        status, text = cudart.cudaGetErrorString(err)
        if getattr(status, "value", status) == 0:
            return f"{name} ({text.decode() if isinstance(text, bytes) else text})"
    except Exception:  # the description is a courtesy; the name alone still identifies the error
        pass
    return name


def _cuda_version(code: int) -> str:
    """CUDA's ``1000 * major + 10 * minor`` encoding -> ``"12.6"``; 0 (no driver) -> ``"none"``."""
    return f"{code // 1000}.{(code % 1000) // 10}" if code else "none"


def version_text(cudart: ModuleType) -> str:
    """``"driver supports CUDA 12.2, cuda-python runtime is CUDA 13.5"`` (each part when it can be read)."""
    parts = []
    for call, label in (("cudaDriverGetVersion", "driver supports CUDA"), ("cudaRuntimeGetVersion",
                                                                          "cuda-python runtime is CUDA")):
        try:
            err, code = getattr(cudart, call)()
            if getattr(err, "value", err) == 0:
                parts.append(f"{label} {_cuda_version(int(code))}")
        except Exception:  # a version is a hint; its absence must not hide the error being reported
            continue
    return ", ".join(parts) or "versions unknown"


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


def native_handle(obj) -> int:
    """The address behind a cuda-python handle (``cudaStream_t``...) as an int.

    ``int(stream)`` is deprecated from cuda-bindings 12.9 on; ``cuda.bindings.utils.get_cuda_native_handle``
    is the replacement where it exists.
    """
    try:
        from cuda.bindings.utils import get_cuda_native_handle
    except ImportError:  # cuda-python before 12.9 (JetPack 6's 12.6): int() is the documented way there
        return int(obj)
    return int(get_cuda_native_handle(obj))


def float32_view(pointer: int, count: int) -> np.ndarray:
    """A numpy ``[count]`` float32 view of host memory at ``pointer`` (no copy)."""
    return np.ctypeslib.as_array(ctypes.cast(int(pointer), ctypes.POINTER(ctypes.c_float)), shape=(count,))


def pinned_float32(cudart: ModuleType, count: int) -> tuple[int, np.ndarray]:
    """Page-locked host memory for ``count`` float32 values: ``(pointer, numpy view)``."""
    pointer = cuda_call(cudart, cudart.cudaMallocHost(count * 4), f"cudaMallocHost({count * 4} bytes)")
    return pointer, float32_view(pointer, count)


def mapped_float32(cudart: ModuleType, count: int) -> tuple[int, int, np.ndarray]:
    """Mapped page-locked host memory for ``count`` float32: ``(host pointer, device pointer, numpy view)``.

    On an integrated GPU (Jetson) the device reads and writes this memory in place: no copy to or from
    device memory (CUDA for Tegra application note, "Memory Selection": pinned memory is cached on
    Xavier/Orin-class devices with I/O coherency, and mapped pinned memory avoids the copies).
    """
    host = cuda_call(cudart, cudart.cudaHostAlloc(count * 4, cudart.cudaHostAllocMapped),
                     f"cudaHostAlloc({count * 4} bytes, mapped)")
    try:
        device = cuda_call(cudart, cudart.cudaHostGetDevicePointer(host, 0), "cudaHostGetDevicePointer")
    except CudaError:
        cudart.cudaFreeHost(host)
        raise
    return host, device, float32_view(host, count)
