"""TensorRT engines in a bundle: naming, choosing one for this device, recording a new one.

By default a TensorRT plan runs only with the exact TensorRT version that built it (major, minor, patch
and build) and is tuned for one GPU model: the AGX Orin (16 SMs) and the Orin Nano (4-8 SMs) are both
sm87 but get different kernels. So a plan is keyed by the exact TensorRT version, the device (name and SM
count) and the compute capability:

    engines/<sm>-<device>-trt<version>-<precision>[-hc][-vc].engine
    e.g. engines/sm87-orin-16sm-trt10.3.0.30-fp16.engine

``-hc`` marks a hardware-compatible plan (``build-engine --hardware-compat``: any GPU of the level, the
device is not part of the match) and ``-vc`` a version-compatible one (``--version-compatible``: any later
TensorRT of the same major). Plans are listed in ``manifest.engines``.

This module is pure Python (no TensorRT, no CUDA): :func:`~pcedge.runtime.tensorrt.device.probe_device`
describes the device; the builder and the backend use the names chosen here.
"""

from __future__ import annotations

import copy
import os
import re
from dataclasses import dataclass
from pathlib import Path

from ..bundle import ENGINES_DIR, Bundle, BundleError, EngineSpec, Manifest

#: Engine precisions pcedge builds. INT8 plans come from the bundle's QDQ graph (explicit quantisation, the
#: scales calibrated at export), so no calibration set is needed on the device.
PRECISIONS = ("fp32", "fp16", "int8")
#: Chosen without an explicit precision, best first. INT8 is never among them: it changes the scores
#: (within the export's gate), so it runs only when asked for (``--precision int8``).
DEFAULT_ORDER = ("fp16", "fp32")
#: ``--hardware-compat`` levels (TensorRT's ``HardwareCompatibilityLevel``): "ampere_plus" runs on any
#: sm80+ GPU; "same_compute_capability" (TensorRT 10.16+) on any GPU of the building GPU's sm.
HARDWARE_COMPAT = ("none", "ampere_plus", "same_compute_capability")

_SM = re.compile(r"^sm\d{2,3}$")
_ENGINE_NAME = re.compile(r"^(?P<sm>sm\d{2,3})-.*-(?P<precision>fp32|fp16|int8)(-hc)?(-vc)?\.engine$")


@dataclass
class DeviceInfo:
    """The GPU and TensorRT this process would build and run engines with."""

    sm: str  # compute capability tag, e.g. "sm87" (Jetson Orin)
    name: str  # cudaDeviceProp.name, e.g. "Orin"
    trt_version: str  # tensorrt.__version__, e.g. "10.3.0.30"
    fast_fp16: bool  # from the compute capability (device.fast_fp16)
    integrated: bool = False  # cudaDeviceProp.integrated: memory shared with the CPU (Jetson)
    multiprocessors: int = 0  # cudaDeviceProp.multiProcessorCount: tells an AGX Orin from an Orin Nano

    @property
    def key(self) -> str:
        """The device part of an engine name: ``"orin-16sm"`` (name slug and SM count)."""
        return device_key(self.name, self.multiprocessors)

    @property
    def cc(self) -> int:
        """Compute capability as an integer, ``87`` for sm87."""
        return int(self.sm[2:])


def device_key(name: str, multiprocessors: int) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "gpu"
    return f"{slug}-{int(multiprocessors)}sm"


def trt_major_minor(version: str) -> str:
    """``"10.3.0.30"`` -> ``"10.3"``."""
    parts = str(version).split(".")
    if len(parts) < 2 or not all(p.isdigit() for p in parts[:2]):
        raise ValueError(f"not a TensorRT version: {version!r} (expected e.g. '10.3.0')")
    return f"{int(parts[0])}.{int(parts[1])}"


def _version_tuple(version: str) -> tuple[int, ...]:
    parts = str(version).split(".")
    if not parts or not all(p.isdigit() for p in parts):
        raise ValueError(f"not a TensorRT version: {version!r} (expected e.g. '10.3.0.30')")
    return tuple(int(p) for p in parts)


def engine_filename(device: DeviceInfo, precision: str, hardware_compat: str = "none",
                    version_compatible: bool = False) -> str:
    """Bundle-relative path of a plan built on ``device`` (see the module docstring)."""
    if not _SM.match(device.sm):
        raise ValueError(f"not a compute capability tag: {device.sm!r} (expected e.g. 'sm87')")
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose from {', '.join(PRECISIONS)}")
    if hardware_compat not in HARDWARE_COMPAT:
        raise ValueError(f"unknown hardware compatibility {hardware_compat!r}; choose from {', '.join(HARDWARE_COMPAT)}")
    version = ".".join(str(p) for p in _version_tuple(device.trt_version))
    flags = ("-hc" if hardware_compat != "none" else "") + ("-vc" if version_compatible else "")
    return f"{ENGINES_DIR}/{device.sm}-{device.key}-trt{version}-{precision}{flags}.engine"


def precision_from_filename(path: str | os.PathLike[str]) -> str | None:
    """The precision encoded in an engine file name, or None if the name does not follow the convention."""
    match = _ENGINE_NAME.match(Path(path).name)
    return match.group("precision") if match else None


def engine_mismatch(spec: EngineSpec, device: DeviceInfo) -> str | None:
    """Why plan ``spec`` cannot run on ``device`` with its TensorRT, or None when it can.

    TensorRT: the exact version, unless the plan is version-compatible (then any version of the same major
    at least as new as the builder's). Hardware: the same compute capability and device, unless the plan is
    hardware-compatible ("ampere_plus": any sm80+; "same_compute_capability": any GPU of that sm).
    """
    try:
        built, here = _version_tuple(spec.trt_version), _version_tuple(device.trt_version)
    except ValueError as exc:
        return str(exc)
    if spec.version_compatible:
        if built[0] != here[0] or here < built:
            return f"version-compatible plan from TensorRT {spec.trt_version} needs {built[0]}.x >= it, this is {device.trt_version}"
    elif built != here:
        return f"built with TensorRT {spec.trt_version}, this device has {device.trt_version}"
    compat = spec.hardware_compat or "none"
    if compat == "ampere_plus":
        if device.cc < 80:
            return f"hardware-compatible (Ampere+) plan, this GPU is {device.sm}"
    elif spec.sm != device.sm:
        return f"built for {spec.sm}, this GPU is {device.sm}"
    elif compat == "none" and spec.device_key != device.key:
        return (f"built on device {spec.device_key or '? (not recorded)'}, this is {device.key}; "
                "kernels are tuned per GPU model")
    return None


def choose_engine(manifest: Manifest, device: DeviceInfo,
                  precision: str | None = None) -> tuple[EngineSpec | None, list[str]]:
    """The plan in ``manifest`` that runs on ``device`` and why each other one was skipped.

    With ``precision`` given only that precision is returned (an explicit request is never silently
    swapped for another precision); without it fp16 is preferred over fp32, and an int8 plan is never chosen.
    A plan built for exactly this device is preferred over a compatible one.
    """
    if precision is not None and precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose from {', '.join(PRECISIONS)}")
    skipped: list[str] = []
    matches: list[EngineSpec] = []
    for spec in manifest.engines:
        why = engine_mismatch(spec, device)
        if why is None and precision is not None and spec.precision != precision:
            why = f"{spec.precision}, {precision} requested"
        if why is None and precision is None and spec.precision not in DEFAULT_ORDER:
            why = f"{spec.precision} runs only when asked for (--precision {spec.precision})"
        if why is None:
            matches.append(spec)
        else:
            skipped.append(f"{spec.file}: {why}")
    order = DEFAULT_ORDER if precision is None else (precision,)
    matches.sort(key=lambda s: (order.index(s.precision) if s.precision in order else len(order),
                                s.hardware_compat not in ("", "none"), s.version_compatible))
    return (matches[0] if matches else None), skipped


def select_engine(manifest: Manifest, device: DeviceInfo, precision: str | None = None) -> EngineSpec | None:
    """:func:`choose_engine` without the reasons."""
    return choose_engine(manifest, device, precision)[0]


def record_engine(bundle: Bundle, spec: EngineSpec) -> None:
    """Add ``spec`` to the bundle's manifest (replacing an entry for the same file) and rewrite it atomically.

    The manifest's checksums are recomputed, so the new plan file is covered by ``open_bundle``'s check.
    """
    plan = bundle.root / spec.file
    if not plan.is_file():
        raise BundleError(f"{plan}: engine file missing; build it before recording it in the manifest")
    manifest = copy.deepcopy(bundle.manifest)
    manifest.engines = [entry for entry in manifest.engines if entry.file != spec.file] + [spec]
    bundle.update_manifest(manifest)
