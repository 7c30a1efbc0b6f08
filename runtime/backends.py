"""Inference backends: images ``[B, 3, H, W]`` float32 -> patch embeddings ``[B, h*w, D]`` float32.

Implementations, best first: native TensorRT (an engine built on this device, ``runtime/tensorrt/``), ONNX
Runtime with the TensorRT execution provider, ONNX Runtime CUDA, ONNX Runtime CPU. ``auto`` picks the best
one that can really run here and says which and why; an explicitly requested backend that cannot run is a
:class:`BackendUnavailable` error that says why, never a silent fallback.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from .bundle import Bundle
from .errors import BackendUnavailable

BACKENDS = ("auto", "tensorrt", "ort-trt", "ort-cuda", "ort-cpu")

_ORT_PROVIDER = {
    "ort-cpu": "CPUExecutionProvider",
    "ort-cuda": "CUDAExecutionProvider",
    "ort-trt": "TensorrtExecutionProvider",
}


class Backend(Protocol):
    name: str
    description: str

    def __call__(self, images: np.ndarray) -> np.ndarray:
        """``[B, 3, H, W]`` float32 -> ``[B, h*w, D]`` float32."""

    def close(self) -> None: ...


def default_threads() -> int:
    """Intra-op threads: the CPUs this process may use (a container's quota, not the host's count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


class OrtBackend:
    """ONNX Runtime session on one execution provider (CPU, CUDA or TensorRT-EP)."""

    def __init__(self, model_path: Path, kind: str = "ort-cpu", threads: int | None = None,
                 provider_options: dict | None = None):
        try:
            import onnxruntime as ort
        except ImportError as exc:  # pragma: no cover - a base dependency
            raise BackendUnavailable(f"{kind}: onnxruntime is not installed ({exc})") from exc
        provider = _ORT_PROVIDER[kind]
        if provider not in ort.get_available_providers():
            hint = "install onnxruntime-gpu (see README, GPU)" if kind != "ort-cpu" else ""
            raise BackendUnavailable(
                f"{kind}: this onnxruntime build has no {provider} "
                f"(available: {', '.join(ort.get_available_providers())}); {hint}".rstrip("; ")
            )
        options = ort.SessionOptions()
        # All graph optimisations (constant folding, Conv+Activation fusion, layout): the graph is fixed.
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # One graph, executed op by op: parallelism comes from inside each op (intra-op threads).
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.intra_op_num_threads = threads or default_threads()
        options.inter_op_num_threads = 1
        # Shapes are static except the batch: memory-pattern planning reuses buffers between calls.
        options.enable_mem_pattern = True
        # No busy-waiting after a run: the intra-op threads would otherwise spin for a while on the cores
        # that preprocessing, the index and the scorer need next. Measured on BSData, 2 cores, batch 1
        # (benchmarks/bench_latency.py): 26.4 -> 13.6 ms median end to end.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        # Quiet: warnings about unused initialisers etc. are not the user's concern.
        options.log_severity_level = 3
        providers: list = [(provider, provider_options or {})]
        if provider != "CPUExecutionProvider":
            providers.append("CPUExecutionProvider")  # for the odd op a GPU provider does not take
        try:
            self.session = ort.InferenceSession(str(model_path), sess_options=options, providers=providers)
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph types
            raise BackendUnavailable(f"{kind}: onnxruntime could not load {model_path}: {exc}") from exc
        used = self.session.get_providers()
        if used[0] != provider:
            # onnxruntime-gpu registers CUDA even without a GPU and then quietly runs on the CPU.
            self.close()
            raise BackendUnavailable(f"{provider} did not initialise (no usable GPU?); session used {used}")
        self.name = kind
        self.input_name = self.session.get_inputs()[0].name
        self.output_name = self.session.get_outputs()[0].name
        self.threads = options.intra_op_num_threads
        self.description = f"{kind} (onnxruntime {ort.__version__}, {provider}, {self.threads} threads)"

    def __call__(self, images: np.ndarray) -> np.ndarray:
        images = np.ascontiguousarray(images, dtype=np.float32)
        return self.session.run([self.output_name], {self.input_name: images})[0]

    def close(self) -> None:
        self.session = None


@dataclass
class BackendChoice:
    """What ``auto`` tried, for the message that says which backend runs and why."""

    kind: str
    reason: str


def _open_tensorrt(bundle: Bundle, precision: str | None) -> "Backend":
    from .tensorrt.device import probe_device  # lazy: imports nothing heavy until called
    from .tensorrt.engines import select_engine
    from .errors import TensorRTUnavailable

    device = probe_device()
    spec = select_engine(bundle.manifest, device, precision)
    if spec is None:
        raise TensorRTUnavailable(
            f"no TensorRT engine in {bundle.root} for this device ({device.name}, {device.sm}, "
            f"TensorRT {device.trt_version}); run `pcedge build-engine {bundle.root}` on this device"
        )
    from .tensorrt.backend import TensorRTBackend

    return TensorRTBackend(
        bundle.root / spec.file,
        input_name=bundle.manifest.input.name,
        output_name=bundle.manifest.output.name,
    )


def open_backend(kind: str, bundle: Bundle, threads: int | None = None, precision: str | None = None) -> Backend:
    """Open backend ``kind`` (one of :data:`BACKENDS`) for ``bundle``; ``auto`` tries them best-first.

    The returned backend's ``description`` says which one runs and, under ``auto``, why the better ones
    were passed over.
    """
    if kind not in BACKENDS:
        raise ValueError(f"unknown backend {kind!r}; choose from {', '.join(BACKENDS)}")
    model = bundle.model_path
    if kind == "tensorrt":
        return _open_tensorrt(bundle, precision)
    if kind == "ort-trt":
        from .bundle import ORT_TRT_CACHE_DIR
        from .tensorrt.ort_provider import ort_trt_provider_options

        (bundle.root / ORT_TRT_CACHE_DIR).mkdir(parents=True, exist_ok=True)
        return OrtBackend(model, kind, threads, ort_trt_provider_options(bundle.root, fp16=precision != "fp32"))
    if kind in ("ort-cuda", "ort-cpu"):
        return OrtBackend(model, kind, threads)
    skipped: list[BackendChoice] = []
    for candidate in ("tensorrt", "ort-cuda", "ort-cpu"):
        # ort-trt is not tried under auto: it compiles an engine on first use (minutes on a Jetson);
        # the native TensorRT engine, built once with `pcedge build-engine`, is the fast path.
        try:
            backend = open_backend(candidate, bundle, threads, precision)
        except BackendUnavailable as exc:
            skipped.append(BackendChoice(candidate, str(exc)))
            continue
        if skipped:
            backend.description += " [auto; skipped " + "; ".join(f"{c.kind}: {c.reason}" for c in skipped) + "]"
        else:
            backend.description += " [auto]"
        return backend
    raise BackendUnavailable("no backend could run: " + "; ".join(f"{c.kind}: {c.reason}" for c in skipped))
