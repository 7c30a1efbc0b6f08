"""TensorRT engines in a bundle: naming, choosing one for this device, recording a new one.

A TensorRT plan only runs on the GPU architecture (compute capability) and the TensorRT major.minor it was
built with, so a bundle may hold several, named ``engines/<sm>-trt<major.minor>-<precision>.engine``
(e.g. ``engines/sm87-trt10.3-fp16.engine``) and listed in ``manifest.engines``.

This module is pure Python: the TensorRT and CUDA calls live in :mod:`pcedge.runtime.trt`, imported only
inside :func:`probe_device`.
"""

from __future__ import annotations

import copy
import os
import re
from dataclasses import dataclass
from pathlib import Path

from .bundle import ENGINES_DIR, ORT_TRT_CACHE_DIR, Bundle, BundleError, EngineSpec, Manifest, read_manifest

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


def probe_device() -> DeviceInfo:
    """Describe CUDA device 0 and the installed TensorRT.

    Raises :class:`~pcedge.runtime.errors.TensorRTUnavailable` naming every missing piece (tensorrt not
    importable, cuda-python not importable, no CUDA GPU).
    """
    from . import trt as trt_backend  # lazy: trt.py itself imports tensorrt only inside its functions

    probe = trt_backend.probe()
    return DeviceInfo(sm=probe.sm, name=probe.device_name, trt_version=probe.trt_version, fast_fp16=probe.fast_fp16)


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


def ort_trt_provider_options(
    bundle_root: str | os.PathLike[str],
    fp16: bool,
    *,
    min_batch: int = 1,
    opt_batch: int = 1,
    max_batch: int = 8,
    workspace_mb: int = 1024,
    device_id: int = 0,
) -> dict[str, object]:
    """Options for ONNX Runtime's ``TensorrtExecutionProvider`` on this bundle's model.

    Option names are those of onnxruntime's TensorRT EP (``tensorrt_execution_provider_info.cc``,
    documented at onnxruntime.ai, "TensorRT Execution Provider"). Engines and the timing cache go to
    ``<bundle>/engines/ort-trt`` (the caller creates that directory) so that the minutes-long build happens
    once per device. When the manifest's input shape is static apart from the batch, an explicit
    optimisation profile ``min..max`` batch is given; otherwise the EP would rebuild its engine whenever a new
    batch size arrives.
    """
    if not 1 <= min_batch <= opt_batch <= max_batch:
        raise ValueError(f"need 1 <= min_batch <= opt_batch <= max_batch, got {min_batch}, {opt_batch}, {max_batch}")
    root = Path(bundle_root)
    cache = str(root / ORT_TRT_CACHE_DIR)
    options: dict[str, object] = {
        "device_id": device_id,
        "trt_fp16_enable": bool(fp16),
        "trt_max_workspace_size": int(workspace_mb) << 20,
        "trt_engine_cache_enable": True,
        "trt_engine_cache_path": cache,
        "trt_timing_cache_enable": True,
        "trt_timing_cache_path": cache,
    }
    manifest = read_manifest(root)
    chw = manifest.input.shape[1:]
    if len(chw) == 3 and all(isinstance(d, int) and d > 0 for d in chw):
        name = manifest.input.name
        dims = "x".join(str(d) for d in chw)
        # Format "name:BxCxHxW" (comma-separated for several inputs), as the EP documents.
        options["trt_profile_min_shapes"] = f"{name}:{min_batch}x{dims}"
        options["trt_profile_opt_shapes"] = f"{name}:{opt_batch}x{dims}"
        options["trt_profile_max_shapes"] = f"{name}:{max_batch}x{dims}"
    return options
