"""What this device can run: the installed TensorRT and CUDA device 0 (compute capability, name, FP16).

``tensorrt`` is imported inside :func:`import_tensorrt` only, so that importing this module (and
``pcedge --help``) works on a machine without it.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from ..errors import TensorRTUnavailable
from .cuda import CudaError, cuda_call, import_cudart
from .engines import DeviceInfo

_TENSORRT_HINT = (
    "on a Jetson it comes with JetPack (apt install python3-libnvinfer; a virtualenv needs "
    "--system-site-packages to see it); elsewhere `pip install tensorrt`"
)


def import_tensorrt() -> ModuleType:
    """The ``tensorrt`` module, or :class:`TensorRTUnavailable` saying how to get it."""
    try:
        return importlib.import_module("tensorrt")
    except (ImportError, OSError) as exc:  # OSError: the Python package is there but libnvinfer is not
        raise TensorRTUnavailable(f"tensorrt is not importable ({exc}): {_TENSORRT_HINT}") from exc



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



def probe_device() -> DeviceInfo:
    """Compute capability, name, TensorRT version and fast-FP16 support of CUDA device 0.

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
    return DeviceInfo(sm=sm, name=name, trt_version=trt.__version__, fast_fp16=bool(builder.platform_has_fast_fp16))

