"""cuda-python's CUDA runtime, imported lazily, with every call's ``(error, *values)`` result checked.

cuda-python returns a tuple ``(error, *values)`` from every call; :func:`cuda_call` checks each one and
raises :class:`CudaError` naming the call. Importing this module does not import cuda-python.
"""

from __future__ import annotations

import ctypes
import importlib
from types import ModuleType

import numpy as np

from ..errors import TensorRTUnavailable

_CUDA_PYTHON_HINT = "`pip install cuda-python` with the major.minor of the device's CUDA (JetPack 6.1/6.2: 12.6)"


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


def pinned_float32(cudart: ModuleType, count: int) -> tuple[int, np.ndarray]:
    """Page-locked host memory for ``count`` float32 values: ``(pointer, numpy view)``."""
    pointer = cuda_call(cudart, cudart.cudaMallocHost(count * 4), f"cudaMallocHost({count * 4} bytes)")
    view = np.ctypeslib.as_array(ctypes.cast(pointer, ctypes.POINTER(ctypes.c_float)), shape=(count,))
    return pointer, view


