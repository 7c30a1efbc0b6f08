"""Options for ONNX Runtime's TensorRT execution provider (``--backend ort-trt``) on a bundle's model."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from ..bundle import ORT_TRT_CACHE_DIR, read_manifest


def ort_trt_cache_key(sm: str, device_key: str, trt_version: str) -> str:
    """The cache folder's name: ``sm87-orin-16sm-trt10.3.0.30``; engines there are valid for exactly that."""
    return f"{sm}-{device_key}-trt{trt_version or 'unknown'}"


def ort_trt_cache_dir(bundle_root: str | os.PathLike[str], key: str) -> Path:
    """A writable cache folder for ``key``: ``<bundle>/engines/ort-trt/<key>``, created here.

    A read-only bundle (a flashed image, a mounted archive) gets a per-user folder instead,
    ``$XDG_CACHE_HOME/pcedge/ort-trt/<bundle path hash>/<key>`` (``~/.cache`` by default), so that the EP's
    minutes-long build is still done once.
    """
    root = Path(bundle_root)
    preferred = root / ORT_TRT_CACHE_DIR / key
    try:
        preferred.mkdir(parents=True, exist_ok=True)
        if os.access(preferred, os.W_OK):
            return preferred
    except OSError:
        pass
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    tag = hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:16]
    fallback = base / "pcedge" / "ort-trt" / tag / key
    fallback.mkdir(parents=True, exist_ok=True)
    return fallback


def ort_trt_provider_options(
    bundle_root: str | os.PathLike[str],
    fp16: bool,
    *,
    cache_dir: str | os.PathLike[str],
    min_batch: int = 1,
    opt_batch: int | None = None,
    max_batch: int | None = None,
    workspace_mb: int = 1024,
    device_id: int = 0,
) -> dict[str, object]:
    """Options for ONNX Runtime's ``TensorrtExecutionProvider`` on this bundle's model.

    Option names are those of onnxruntime's TensorRT EP (``tensorrt_execution_provider_info.cc``,
    documented at onnxruntime.ai, "TensorRT Execution Provider"). Engines and the timing cache go to
    ``cache_dir`` (:func:`ort_trt_cache_dir`, keyed by device and TensorRT version) so that the
    minutes-long build happens once per device. When the manifest's input shape is static apart from the
    batch, an explicit optimisation profile is given, ``opt_batch``/``max_batch`` defaulting to the bundle's
    ``input.opt_batch``/``input.max_batch``; otherwise the EP would rebuild its engine whenever a new batch
    size arrives.
    """
    root = Path(bundle_root)
    manifest = read_manifest(root)
    opt_batch = manifest.input.opt_batch if opt_batch is None else opt_batch
    max_batch = manifest.input.max_batch if max_batch is None else max_batch
    if not 1 <= min_batch <= opt_batch <= max_batch:
        raise ValueError(f"need 1 <= min_batch <= opt_batch <= max_batch, got {min_batch}, {opt_batch}, {max_batch}")
    cache = str(cache_dir)
    options: dict[str, object] = {
        "device_id": device_id,
        "trt_fp16_enable": bool(fp16),
        "trt_max_workspace_size": int(workspace_mb) << 20,
        "trt_engine_cache_enable": True,
        "trt_engine_cache_path": cache,
        "trt_timing_cache_enable": True,
        "trt_timing_cache_path": cache,
    }
    chw = manifest.input.shape[1:]
    if len(chw) == 3 and all(isinstance(d, int) and d > 0 for d in chw):
        name = manifest.input.name
        dims = "x".join(str(d) for d in chw)
        # Format "name:BxCxHxW" (comma-separated for several inputs), as the EP documents.
        options["trt_profile_min_shapes"] = f"{name}:{min_batch}x{dims}"
        options["trt_profile_opt_shapes"] = f"{name}:{opt_batch}x{dims}"
        options["trt_profile_max_shapes"] = f"{name}:{max_batch}x{dims}"
    return options
