"""TensorRT engines in a bundle: naming, choosing one for this device, recording a new one.

A TensorRT plan only runs on the GPU architecture (compute capability) and the TensorRT major.minor it was
built with, so a bundle may hold several, named ``engines/<sm>-trt<major.minor>-<precision>.engine``
(e.g. ``engines/sm87-trt10.3-fp16.engine``) and listed in ``manifest.engines``.

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

#: Engine precisions pcedge builds. INT8 is left out on purpose: it needs a calibration set on the device.
PRECISIONS = ("fp32", "fp16")

_SM = re.compile(r"^sm\d{2,3}$")
_ENGINE_NAME = re.compile(r"^(?P<sm>sm\d{2,3})-trt(?P<trt>\d+\.\d+)-(?P<precision>[a-z0-9]+)\.engine$")


def trt_major_minor(version: str) -> str:
    """``"10.3.0.30"`` -> ``"10.3"``: plans are compatible within a TensorRT major.minor only."""
    parts = str(version).split(".")
    if len(parts) < 2 or not all(p.isdigit() for p in parts[:2]):
        raise ValueError(f"not a TensorRT version: {version!r} (expected e.g. '10.3.0')")
    return f"{int(parts[0])}.{int(parts[1])}"


def engine_filename(sm: str, trt_version: str, precision: str) -> str:
    """Bundle-relative path of a plan: ``engines/<sm>-trt<major.minor>-<precision>.engine``."""
    if not _SM.match(sm):
        raise ValueError(f"not a compute capability tag: {sm!r} (expected e.g. 'sm87')")
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose from {', '.join(PRECISIONS)}")
    return f"{ENGINES_DIR}/{sm}-trt{trt_major_minor(trt_version)}-{precision}.engine"


def precision_from_filename(path: str | os.PathLike[str]) -> str | None:
    """The precision encoded in an engine file name, or None if the name does not follow the convention."""
    match = _ENGINE_NAME.match(Path(path).name)
    return match.group("precision") if match else None


@dataclass
class DeviceInfo:
    """The GPU and TensorRT this process would build and run engines with."""

    sm: str  # compute capability tag, e.g. "sm87" (Jetson Orin)
    name: str  # e.g. "Orin"
    trt_version: str  # tensorrt.__version__, e.g. "10.3.0"
    fast_fp16: bool  # builder.platform_has_fast_fp16


def select_engine(manifest: Manifest, device: DeviceInfo, precision: str | None = None) -> EngineSpec | None:
    """The engine in ``manifest`` that runs on ``device``, or None.

    An engine matches when its compute capability equals the device's and its TensorRT major.minor equals
    the installed one. With ``precision`` given only that precision is returned (an explicit request is
    never silently swapped for another precision); without it fp16 is preferred over fp32.
    """
    if precision is not None and precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose from {', '.join(PRECISIONS)}")
    wanted_trt = trt_major_minor(device.trt_version)
    matches = []
    for spec in manifest.engines:
        try:
            same_trt = trt_major_minor(spec.trt_version) == wanted_trt
        except ValueError:
            continue  # an entry without a readable version cannot be shown to match
        if spec.sm == device.sm and same_trt:
            matches.append(spec)
    if precision is not None:
        return next((spec for spec in matches if spec.precision == precision), None)
    for preferred in ("fp16", "fp32"):
        for spec in matches:
            if spec.precision == preferred:
                return spec
    return None


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
