"""What this device can run: the installed TensorRT and CUDA device 0 (compute capability, name, FP16).

``tensorrt`` is imported inside :func:`import_tensorrt` only, so that importing this module (and
``pcedge --help``) works on a machine without it. Nothing here creates a TensorRT ``Builder``: on a Jetson
that costs seconds and hundreds of MB of the memory the CPU shares, and only ``pcedge build-engine`` needs
one. FP16 speed is read from the compute capability instead.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from ..errors import TensorRTUnavailable
from .cuda import CudaError, cuda_call, error_name, import_cudart, version_text
from .engines import DeviceInfo

#: TensorRT majors pcedge builds and runs engines with (10.x: JetPack 6; 11.x: JetPack 7, current pip wheels).
SUPPORTED_MAJORS = (10, 11)

TENSORRT_INSTALL_HINT = (
    "on a Jetson it comes with JetPack 6.x/7 (sudo apt install python3-libnvinfer; a virtualenv needs "
    "--system-site-packages to see it); on an x86 host: pip install --extra-index-url https://pypi.nvidia.com "
    "'tensorrt-cu12>=10.3,<12'"
)


def trt_major(version: str) -> int:
    """``"10.3.0.30"`` -> 10; ``ValueError`` for anything that is not a version."""
    head = str(version).split(".")[0]
    if not head.isdigit():
        raise ValueError(f"not a TensorRT version: {version!r}")
    return int(head)


def check_supported(version: str) -> None:
    """:class:`TensorRTUnavailable` unless TensorRT ``version`` is one pcedge supports (10.x, 11.x).

    TensorRT 8.x (JetPack 5.x / 6.0) is refused with the alternative that works there: its networks are
    implicit-batch by default and its ONNX parser errors lack node names, so pcedge's build and run paths
    would fail in ways that hide the real message.
    """
    try:
        major = trt_major(version)
    except ValueError as exc:
        raise TensorRTUnavailable(f"tensorrt reports no usable version ({exc})") from exc
    if major < SUPPORTED_MAJORS[0]:
        raise TensorRTUnavailable(
            f"TensorRT {version} is too old: pcedge needs TensorRT 10.x or 11.x (JetPack 6.1+ or 7). On JetPack 5 "
            "use ONNX Runtime's CUDA backend instead: --backend ort-cuda"
        )
    if major > SUPPORTED_MAJORS[-1]:
        raise TensorRTUnavailable(
            f"TensorRT {version} is newer than pcedge supports (10.x, 11.x); install 'tensorrt-cu12>=10.3,<12' "
            "or use --backend ort-cuda"
        )


def import_tensorrt() -> ModuleType:
    """The ``tensorrt`` module of a supported version, or :class:`TensorRTUnavailable` saying how to get one."""
    try:
        trt = importlib.import_module("tensorrt")
    except (ImportError, OSError) as exc:  # OSError: the Python package is there but libnvinfer is not
        raise TensorRTUnavailable(f"tensorrt is not importable ({exc}): {TENSORRT_INSTALL_HINT}") from exc
    except Exception as exc:  # a broken install raises whatever its __init__ hits; never a traceback
        raise TensorRTUnavailable(f"tensorrt failed to import ({type(exc).__name__}: {exc}): "
                                  f"{TENSORRT_INSTALL_HINT}") from exc
    check_supported(getattr(trt, "__version__", ""))
    return trt


def fast_fp16(major: int, minor: int) -> bool:
    """Whether compute capability ``major.minor`` runs FP16 at least at twice the FP32 rate.

    From the CUDA C++ Programming Guide, "Arithmetic Instructions" throughput table: 16-bit floating-point
    add/multiply is fast on 5.3 (Jetson TX1), 6.0, 6.2 (TX2) and every capability from 7.0 on; it is slow
    (1/64 of FP32) on 6.1 and absent before 5.3.
    """
    return (major, minor) in ((5, 3), (6, 0), (6, 2)) or major >= 7


def _count_devices(cudart: ModuleType) -> int:
    """``cudaGetDeviceCount`` with a diagnosis per error, not "no GPU" for everything."""
    result = cudart.cudaGetDeviceCount()
    err = result[0]
    code = getattr(err, "value", err)
    if code == 0:
        return int(result[1])
    name = error_name(err)
    if name == "cudaErrorInsufficientDriver":
        # cuda-python's runtime is newer than the driver (or there is no driver at all).
        raise TensorRTUnavailable(
            f"CUDA cannot start: cudaErrorInsufficientDriver ({version_text(cudart)}): no NVIDIA driver, or one "
            "older than cuda-python; install the cuda-python of the driver's CUDA (JetPack 6: "
            "'cuda-python==12.6.*') or update the driver"
        )
    if name == "cudaErrorNoDevice":
        raise TensorRTUnavailable("no CUDA GPU (cudaGetDeviceCount: cudaErrorNoDevice)")
    raise TensorRTUnavailable(f"CUDA cannot start: cudaGetDeviceCount failed with {name} ({version_text(cudart)})")


def _describe_device_0(cudart: ModuleType) -> DeviceInfo:
    """Device 0's compute capability, name, SM count and integration; TensorRT's version is filled later."""
    count = _count_devices(cudart)
    if not count:
        raise TensorRTUnavailable("no CUDA GPU (cudaGetDeviceCount found 0 devices)")
    try:
        props = cuda_call(cudart, cudart.cudaGetDeviceProperties(0), "cudaGetDeviceProperties(0)")
    except CudaError as exc:
        raise TensorRTUnavailable(f"CUDA device 0 is not usable ({exc})") from exc
    raw = props.name
    name = raw.decode(errors="replace") if isinstance(raw, (bytes, bytearray)) else str(raw)
    major, minor = int(props.major), int(props.minor)
    return DeviceInfo(
        sm=f"sm{major}{minor}", name=name.split("\x00")[0].strip(), trt_version="",
        fast_fp16=fast_fp16(major, minor), integrated=bool(props.integrated),
        multiprocessors=int(props.multiProcessorCount),
    )


def probe_cuda_device() -> DeviceInfo:
    """CUDA device 0 without TensorRT (``trt_version`` empty): for ONNX Runtime's TensorRT EP cache key."""
    return _describe_device_0(import_cudart())


def probe_device() -> DeviceInfo:
    """Compute capability, name, SM count, TensorRT version and fast-FP16 support of CUDA device 0.

    Raises :class:`TensorRTUnavailable` listing every missing piece, plus what *was* found, so that one
    message is enough to fix a device's setup.
    """
    problems: list[str] = []
    found: list[str] = []
    trt = cudart = device = None
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
            device = _describe_device_0(cudart)
            found.append(f"CUDA device 0: {device.name} ({device.sm})")
        except TensorRTUnavailable as exc:
            problems.append(str(exc))
    if problems:
        also = f" [found: {', '.join(found)}]" if found else ""
        raise TensorRTUnavailable("TensorRT cannot run here: " + "; ".join(problems) + also)
    device.trt_version = str(trt.__version__)
    return device
