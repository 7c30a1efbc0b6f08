"""Options for ONNX Runtime's TensorRT execution provider (``--backend ort-trt``) on a bundle's model."""

from __future__ import annotations

import os
from pathlib import Path

from ..bundle import ORT_TRT_CACHE_DIR, read_manifest


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
