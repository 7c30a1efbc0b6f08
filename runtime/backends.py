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

from .bundle import Bundle, Int8Report
from .errors import BackendUnavailable
from .spin_governor import check_spinning_mode

BACKENDS = ("auto", "tensorrt", "ort-trt", "ort-cuda", "ort-cpu")
#: What the network computes in: float32 (model.onnx), float16 (TensorRT FP16, model_fp16.onnx on ORT CUDA)
#: or INT8 (the explicitly quantised model_int8.onnx; TensorRT INT8 engines are built from it).
PRECISIONS = ("fp32", "fp16", "int8")

_ORT_PROVIDER = {
    "ort-cpu": "CPUExecutionProvider",
    "ort-cuda": "CUDAExecutionProvider",
    "ort-trt": "TensorrtExecutionProvider",
}


class Backend(Protocol):
    name: str
    description: str
    graph: Path  # the file it runs: an ONNX graph of the bundle (or elsewhere), or a TensorRT plan
    precision: str  # what that graph computes in: "fp32", "fp16" or "int8"

    def __call__(self, images: np.ndarray) -> np.ndarray:
        """``[B, 3, H, W]`` float32 -> ``[B, h*w, D]`` float32."""

    def close(self) -> None: ...


def default_threads() -> int:
    """Intra-op threads: the CPUs this process may use (a container's quota, not the host's count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


ORT_MISSING = ("neither onnxruntime nor onnxruntime-gpu is installed: pip install 'pcedge[cpu]' "
               "(or 'pcedge[gpu]' on a GPU device; see README, GPU)")


def import_onnxruntime():
    """The ``onnxruntime`` module (from either wheel), or :class:`BackendUnavailable` saying how to get it."""
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise BackendUnavailable(f"{ORT_MISSING} ({exc})") from exc
    return ort


class OrtBackend:
    """ONNX Runtime session on one execution provider (CPU, CUDA or TensorRT-EP).

    ``max_batch`` (when given) splits larger batches into chunks, for the TensorRT EP's fixed profile.
    ``precision`` says what the graph computes in ("fp16" for the bundle's float16 graph or the TensorRT
    EP's FP16 mode, "int8" for its QDQ graph), for the acceptance checks' tolerances.

    Two ways to run: :meth:`__call__` never spins (the watch pipeline, servers, verification: their stages
    overlap with the backbone, which must leave the cores alone); :meth:`run_spinning` runs a second session
    over the same graph whose intra-op threads busy-wait during each run, for a caller that owns the machine
    (the single-stream ``Detector.run_frames``, which decides per frame: ``DetectorOptions.ort_spinning``,
    runtime/spin_governor.py). ``spinning`` False opens no second session (``run_spinning`` then runs the
    plain one); True or "auto" open it (recorded in ``spinning`` for the detector; only ort-cpu with more
    than one intra-op thread has something to spin). The two sessions differ only in that setting (same
    graph, options and thread count), so their outputs are bit-identical (tested).
    """

    def __init__(self, model_path: Path, kind: str = "ort-cpu", threads: int | None = None,
                 provider_options: dict | None = None, *, max_batch: int | None = None, precision: str = "fp32",
                 spinning: bool | str = False):
        ort = import_onnxruntime()
        spinning = check_spinning_mode(spinning)
        self.session = None
        self.spinning_session = None
        self.max_batch = max_batch
        self.precision = precision
        self.runs = RunCounts()
        self.graph = Path(model_path)  # which graph runs decides which threshold applies (runtime/thresholds.py)
        provider = _ORT_PROVIDER[kind]
        if provider not in ort.get_available_providers():
            hint = "install onnxruntime-gpu: pip install 'pcedge[gpu]' (see README, GPU)" if kind != "ort-cpu" else ""
            raise BackendUnavailable(
                f"{kind}: this onnxruntime build has no {provider} "
                f"(available: {', '.join(ort.get_available_providers())}); {hint}".rstrip("; ")
            )
        self.threads = threads or default_threads()
        providers: list = [(provider, provider_options or {})]
        if provider != "CPUExecutionProvider":
            providers.append("CPUExecutionProvider")  # for the odd op a GPU provider does not take
        self.session = self._open_session(ort, model_path, kind, providers, spin=False)
        used = self.session.get_providers()
        if used[0] != provider:
            # onnxruntime-gpu registers CUDA even without a GPU and then quietly runs on the CPU.
            self.close()
            raise BackendUnavailable(f"{kind}: {provider} did not initialise (no usable GPU?); session used {used}")
        if spinning is not False and self.threads > 1:
            self.spinning_session = self._open_session(ort, model_path, kind, providers, spin=True)
        self.spinning = spinning if self.spinning_session is not None else False
        self.name = kind
        self.input_name = self.session.get_inputs()[0].name
        self.output_name = self.session.get_outputs()[0].name
        graph = "" if precision == "fp32" else f", {precision}"
        spin = {True: ", spinning during runs", "auto": ", spinning during runs while no other process holds a core",
                False: ""}[self.spinning]
        self.description = f"{kind} (onnxruntime {ort.__version__}, {provider}{graph}, {self.threads} threads{spin})"

    def _open_session(self, ort, model_path: Path, kind: str, providers: list, spin: bool):
        options = ort.SessionOptions()
        # All graph optimisations (constant folding, Conv+Activation fusion, layout): the graph is fixed.
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # One graph, executed op by op: parallelism comes from inside each op (intra-op threads).
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        # Shapes are static except the batch: memory-pattern planning reuses buffers between calls.
        options.enable_mem_pattern = True
        # The plain session never busy-waits: its threads would otherwise spin for a while after a run on
        # the cores that preprocessing, the index and the scorer need next. Measured on BSData, 2 cores,
        # batch 1 (benchmarks/bench_latency.py): 26.4 -> 13.6 ms median end to end.
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
        if spin:
            # The spinning session (run_spinning, for a caller that owns the machine): the intra-op threads
            # busy-wait between the ops of a run and stop as soon as it returns, so the stages after it get
            # the cores. Measured (benchmarks/bench_spinning.py, results/latency_spinning.md, 2 cores):
            # quiet, end to end FP32 7.11 -> 6.35 ms (backbone 3.56 -> 2.85), INT8 6.13 -> 5.57 (2.63 ->
            # 2.06); with a busy process on one core the runs turn bimodal (FP32 median 8.47 against 9.62
            # ms, p95 15.6 against 10.8; one INT8 round 3.8 ms slower outright), and with both cores loaded
            # by other work (an earlier row-by-row run, load 3.5-4) 5-10 ms slower: hence the governor
            # ("auto", runtime/spin_governor.py).
            options.add_session_config_entry("session.force_spinning_stop", "1")
        # Quiet: warnings about unused initialisers etc. are not the user's concern.
        options.log_severity_level = 3
        try:
            return ort.InferenceSession(str(model_path), sess_options=options, providers=providers)
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph types
            raise BackendUnavailable(f"{kind}: onnxruntime could not load {model_path}: {exc}") from exc

    def __call__(self, images: np.ndarray) -> np.ndarray:
        """``[B, 3, H, W]`` float32 -> ``[B, h*w, D]`` float32 on the session that never spins; batches
        above ``max_batch`` are split."""
        self.runs.plain += 1
        return self._run(self.session, images)

    def run_spinning(self, images: np.ndarray) -> np.ndarray:
        """As :meth:`__call__` on the spinning session, for a caller that owns the machine (the plain
        session when this backend has no spinning one)."""
        if self.spinning_session is None:
            return self(images)
        self.runs.spinning += 1
        return self._run(self.spinning_session, images)

    def _run(self, session, images: np.ndarray) -> np.ndarray:
        if session is None:
            raise RuntimeError(f"{self.name}: backend is closed")
        images = np.ascontiguousarray(images, dtype=np.float32)
        step = self.max_batch or max(1, images.shape[0])
        if images.shape[0] <= step:
            return session.run([self.output_name], {self.input_name: images})[0]
        return np.concatenate([session.run([self.output_name], {self.input_name: images[i:i + step]})[0]
                               for i in range(0, images.shape[0], step)])

    def close(self) -> None:
        self.session = None
        self.spinning_session = None


@dataclass
class RunCounts:
    """Backbone runs per session of an :class:`OrtBackend` (the watch pipeline and servers must show no
    spinning runs; benchmarks report how often ``auto`` spun)."""

    plain: int = 0
    spinning: int = 0


@dataclass
class BackendChoice:
    """A backend ``auto`` passed over and why (one short line)."""

    kind: str
    reason: str


#: Longest reason ``auto`` keeps per skipped backend; the full text goes to the exception chain.
REASON_CHARS = 240


def _short_reason(kind: str, exc: BaseException) -> str:
    """One line: the message without a leading ``"<kind>: "`` (no "ort-cuda: ort-cuda:"), cut to a length."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    for prefix in (f"{kind}: ", "TensorRT cannot run here: "):  # "skipped tensorrt:" already says so
        if text.startswith(prefix):
            text = text[len(prefix):]
    if not isinstance(exc, BackendUnavailable):
        text = f"{type(exc).__name__}: {text}"
    return text if len(text) <= REASON_CHARS else text[: REASON_CHARS - 3] + "..."


def _open_tensorrt(bundle: Bundle, precision: str | None) -> "Backend":
    from .errors import TensorRTUnavailable
    from .tensorrt.device import probe_device  # lazy: imports nothing heavy until called
    from .tensorrt.engines import choose_engine

    device = probe_device()
    spec, skipped = choose_engine(bundle.manifest, device, precision)
    if spec is None:
        why = f"; skipped {'; '.join(skipped)}" if skipped else ""
        raise TensorRTUnavailable(
            f"no TensorRT engine in {bundle.root} for this device ({device.key}, {device.sm}, "
            f"TensorRT {device.trt_version}){why}; run `pcedge build-engine {bundle.root}` on this device"
        )
    from .tensorrt.backend import TensorRTBackend

    backend = TensorRTBackend(
        bundle.root / spec.file,
        input_name=bundle.manifest.input.name,
        output_name=bundle.manifest.output.name,
        precision=spec.precision,
        zero_copy=device.integrated,
        allow_host_code=spec.version_compatible,
    )
    backend.skipped_engines = skipped
    return backend


def _ort_trt_cache_key() -> str:
    """Device and TensorRT version for the ONNX Runtime TensorRT-EP cache folder (best effort)."""
    from .tensorrt.device import import_tensorrt, probe_cuda_device
    from .tensorrt.ort_provider import ort_trt_cache_key

    try:
        device = probe_cuda_device()
        sm, key = device.sm, device.key
    except BackendUnavailable:
        sm, key = "sm00", "unknown-device"
    try:
        version = import_tensorrt().__version__
    except BackendUnavailable:
        version = "unknown"
    return ort_trt_cache_key(sm, key, version)


def int8_graph(bundle: Bundle, kind: str) -> tuple[Path | None, Int8Report | None]:
    """The INT8 graph backend ``kind`` runs and the export's gate figures for it.

    ONNX Runtime CPU takes the CPU graph (``model_int8_cpu.onnx``, U8S8) when the bundle has one: the
    symmetric TensorRT graph is slower than float32 there (results/int8.md). Every other backend, and CPU
    with older bundles, takes ``model_int8.onnx``.
    """
    cpu = bundle.int8_cpu_model_path
    if kind == "ort-cpu" and cpu is not None and cpu.is_file():
        return cpu, bundle.manifest.model.int8_cpu
    return bundle.int8_model_path, bundle.manifest.model.int8


@dataclass
class CpuDefault:
    """What ONNX Runtime CPU runs without ``--precision``: ``graph`` (the CPU INT8 graph, or None for
    float32) and ``reason`` (one clause, for ``info`` and the detector's description)."""

    graph: Path | None
    reason: str


def cpu_default(bundle: Bundle) -> CpuDefault:
    """The CPU INT8 graph when the bundle ships it (its gate passed) with a threshold of its own, else float32.

    INT8 is the faster CPU graph and measured no less accurate (results/int8.md, int8_default.md); its own
    threshold keeps the false-alarm rate the float32 one was calibrated for. ``--precision fp32`` (or
    ``DetectorOptions(precision="fp32")``) runs float32 whatever the bundle holds.
    """
    report, path = bundle.manifest.model.int8_cpu, bundle.int8_cpu_model_path
    if report is None:
        return CpuDefault(None, "float32: the bundle has no ONNX Runtime CPU INT8 graph (exported before pcedge "
                                "wrote one, or with --no-int8)")
    if path is None or not path.is_file():
        return CpuDefault(None, f"float32: the export's gate refused the CPU INT8 graph ({report.reason})")
    if report.threshold is None:
        return CpuDefault(None, f"float32: {path.name} has no threshold of its own (exported before pcedge "
                                "calibrated one; re-export, or --precision int8 runs it at the float32 threshold)")
    return CpuDefault(path, "INT8, the ort-cpu default: its gate passed and it has its own threshold "
                            "(--precision fp32 runs model.onnx)")


def int8_graph_problem(bundle: Bundle, kind: str | None = None) -> str | None:
    """Why backend ``kind`` has no INT8 graph to run in ``bundle`` (one sentence naming the bundle), or None.

    ``ort-cpu`` runs either graph (:func:`int8_graph`); every other backend needs the symmetric
    ``model_int8.onnx``. ``kind`` None or ``auto`` (some backend will be chosen): a problem only when the
    bundle has neither graph, so a bundle whose gate refused only one of them is not turned away.
    """
    m = bundle.manifest.model
    graphs = [(bundle.int8_model_path, m.int8)]
    if kind in (None, "auto", "ort-cpu"):
        graphs.append((bundle.int8_cpu_model_path, m.int8_cpu))
    if any(path is not None and path.is_file() for path, _ in graphs):
        return None
    refused = [report.reason for _, report in graphs if report is not None and not report.shipped]
    if refused:
        return (f"{bundle.root} has no INT8 graph: the export's parity gate refused it ({'; '.join(refused)}); "
                "use --precision fp32 or fp16")
    return (f"{bundle.root} has no INT8 graph (exported before pcedge wrote one, or with --no-int8): "
            "re-export it with this pcedge, or use --precision fp32 or fp16")


def _open_one(kind: str, bundle: Bundle, threads: int | None, precision: str | None,
              spinning: bool | str = False) -> Backend:
    manifest = bundle.manifest
    if kind != "ort-cpu":
        # Spinning is about the CPU provider's intra-op pool, which does the work only on ort-cpu; a second
        # session on a GPU provider would hold a second copy of the graph (and its engines) in GPU memory.
        spinning = False
    if kind == "tensorrt":
        return _open_tensorrt(bundle, precision)
    if precision == "int8":
        if kind == "ort-trt":  # its INT8 mode wants a calibration table; the QDQ engine comes from build-engine
            raise BackendUnavailable("ort-trt: int8 is not offered; build a TensorRT INT8 engine from the bundle's "
                                     "QDQ graph (pcedge build-engine --precision int8) and use --backend tensorrt, "
                                     "or run the graph on ort-cuda / ort-cpu")
        graph, _ = int8_graph(bundle, kind)
        problem = None if graph is not None and graph.is_file() else int8_graph_problem(bundle, kind)
        if problem is not None:
            raise BackendUnavailable(f"{kind}: int8 requested, but {problem}")
        backend = OrtBackend(graph, kind, threads, precision="int8", spinning=spinning)
        backend.description += f"; {graph.name}: INT8 (--precision int8)"
        return backend
    if kind == "ort-trt":
        from .tensorrt.ort_provider import ort_trt_cache_dir, ort_trt_provider_options

        fp16 = precision != "fp32"
        options = ort_trt_provider_options(bundle.root, fp16=fp16,
                                           cache_dir=ort_trt_cache_dir(bundle.root, _ort_trt_cache_key()))
        return OrtBackend(bundle.model_path, kind, threads, options, max_batch=manifest.input.max_batch,
                          precision="fp16" if fp16 else "fp32", spinning=spinning)
    if kind == "ort-cuda" and precision == "fp16":
        fp16_graph = bundle.fp16_model_path
        if fp16_graph is None or not fp16_graph.is_file():
            raise BackendUnavailable(f"ort-cuda: fp16 requested, but {bundle.root} has no float16 graph "
                                     "(re-export the bundle with this pcedge, or use --precision fp32)")
        return OrtBackend(fp16_graph, kind, threads, precision="fp16", spinning=spinning)
    if kind == "ort-cpu":
        asked = {"fp32": "float32 (--precision fp32)",
                 "fp16": "float32 (ONNX Runtime CPU runs no float16 graph; --precision fp16 is for GPUs)"}
        default = cpu_default(bundle) if precision is None else CpuDefault(None, asked[precision])
        if default.graph is not None:
            backend = OrtBackend(default.graph, kind, threads, precision="int8", spinning=spinning)
        else:
            backend = OrtBackend(bundle.model_path, kind, threads, spinning=spinning)
        backend.description += f"; {backend.graph.name}: {default.reason}"
        return backend
    return OrtBackend(bundle.model_path, kind, threads, spinning=spinning)


def _warm_up(backend: Backend, bundle: Bundle) -> None:
    """One inference on the bundle's first check image (zeros if it stores none); checks the output shape."""
    m = bundle.manifest
    arrays = bundle.load_check_arrays()
    if arrays is not None:
        images = np.ascontiguousarray(arrays[0][:1], dtype=np.float32)
    else:
        images = np.zeros((1, *m.input.shape[1:]), dtype=np.float32)
    out = np.asarray(backend(images))
    want = (1, m.output.grid_h * m.output.grid_w, m.output.dim)
    if out.shape != want:
        raise ValueError(f"first inference returned shape {list(out.shape)}, expected {list(want)}")
    if not np.isfinite(out).all():
        raise ValueError("first inference returned NaN or infinite values")


def open_backend(kind: str, bundle: Bundle, threads: int | None = None, precision: str | None = None,
                 spinning: bool | str = False) -> Backend:
    """Open backend ``kind`` (one of :data:`BACKENDS`) for ``bundle``; ``auto`` tries them best-first.

    An explicit ``kind`` that cannot run raises :class:`BackendUnavailable` (whatever failed inside: a
    CUDA error, TensorRT's ``TypeError`` for a CUDA that did not start, an engine with unexpected tensors).
    ``auto`` opens each candidate and runs one warm-up inference on the bundle's check image; any failure
    moves on to the next one. The returned backend's ``description`` is one line naming it (and under
    ``auto`` which better ones were skipped); ``auto_skipped`` lists a :class:`BackendChoice` per skipped
    backend with the one-line reason (``--verbose`` prints them). ``spinning`` (False, True or "auto";
    ONNX Runtime CPU only) opens :meth:`OrtBackend.run_spinning`'s session; ``__call__`` never spins.
    """
    if kind not in BACKENDS:
        raise ValueError(f"unknown backend {kind!r}; choose from {', '.join(BACKENDS)}")
    if precision is not None and precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose from {', '.join(PRECISIONS)}")
    check_spinning_mode(spinning)
    if kind != "auto":
        try:
            backend = _open_one(kind, bundle, threads, precision, spinning)
        except BackendUnavailable:
            raise
        except Exception as exc:  # a broken accelerator: a clear error, never a traceback
            raise BackendUnavailable(f"{kind}: {_short_reason(kind, exc)}") from exc
        backend.auto_skipped = []
        return backend
    skipped: list[BackendChoice] = []
    for candidate in ("tensorrt", "ort-cuda", "ort-cpu"):
        # ort-trt is not tried under auto: it compiles an engine on first use (minutes on a Jetson);
        # the native TensorRT engine, built once with `pcedge build-engine`, is the fast path.
        backend = None
        try:
            # int8 is asked of every candidate (never a silent float32 fallback); fp16 of TensorRT only;
            # ort-cpu sees every choice (without one it runs its INT8 default, with fp32/fp16 float32).
            wanted = precision if candidate in ("tensorrt", "ort-cpu") or precision == "int8" else None
            backend = _open_one(candidate, bundle, threads, wanted, spinning)
            _warm_up(backend, bundle)
        except Exception as exc:  # anything a broken accelerator raises: move on, say why in one line
            skipped.append(BackendChoice(candidate, _short_reason(candidate, exc)))
            if backend is not None:
                try:
                    backend.close()
                except Exception:  # the reason above is what matters; a failed cleanup adds nothing
                    pass
            continue
        backend.auto_skipped = skipped
        backend.description += f" [auto; skipped {', '.join(c.kind for c in skipped)}]" if skipped else " [auto]"
        return backend
    grouped: dict[str, list[str]] = {}  # one reason shared by several backends is said once
    for choice in skipped:
        grouped.setdefault(choice.reason, []).append(choice.kind)
    raise BackendUnavailable("no backend could run: " + "; ".join(f"{', '.join(kinds)}: {reason}"
                                                                  for reason, kinds in grouped.items()))
