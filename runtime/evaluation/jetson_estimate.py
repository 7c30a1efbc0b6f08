"""An estimate on paper of the per-stage latency on a Jetson, beside the stage times measured here.

Nothing in this module runs on a Jetson: it combines the work counted on this machine (the backbone graph's
FLOPs and bytes, the exact index's products) with the published figures of
:mod:`pcedge.runtime.evaluation.targets`. The figures it prints are an **estimate, to be confirmed** with
``benchmarks/gpu_acceptance.py`` run on the device (:data:`CONFIRM_WITH`).

Per stage (batch 1, one image, stages run one after another as the detector runs them):

- **backbone** (GPU, TensorRT FP16 or INT8): a roofline bound plus a per-launch overhead,
  ``max(FLOPs / (dense tensor rate x e_gpu), bytes / bandwidth) + kernels x t_launch`` (:func:`roofline`).
  FLOPs from the ONNX graph (:func:`graph_work`); bytes are the graph's op-by-op traffic after TensorRT's
  pointwise fusion (an elementwise op folded into its producer saves its output write and one read of its
  input), at 2 bytes per element for FP16 and 1 for INT8, with no reuse in the L2 cache (an upper bound on
  DRAM traffic); kernels = the layers left after that fusion. INT8 counts come from ``model_int8.onnx`` when
  the bundle has one, else from ``model.onnx`` (the same convolutions) and the report says so.
- **index** (CPU): exact: ``2 x 784 x N x D`` FLOPs on one Cortex-A78AE core (the detector runs the index's
  BLAS on one thread, ``DetectorOptions.blas_threads``) at the fraction of its peak that the same product
  reached here, or the bank's bytes over the bandwidth if that is longer; HNSW: the time measured here
  scaled like preprocessing (its work is not countable: hnswlib does not report distance computations).
- **preprocess, scoring** (CPU, OpenCV/numpy): the time measured here (the fastest timed call: the least
  disturbed by other work, like the peak, which is the best of its repeats) x the ratio of one core's float32
  peak here (measured sgemm, one thread) to one target core's NEON peak. Assumption: these stages are
  vectorised code that scales with one core's vector throughput, with the same thread split on both
  machines (OpenCV may split a large resize over threads: a Jetson's 6 or 12 cores then make this
  pessimistic); preprocessing is also bounded below by its bytes over the target's bandwidth. On a host
  with wider vectors than NEON (AVX-512: 4x the FLOPs per cycle) this overstates the slowdown of code that
  is not a matrix product, so the total is also given with these stages scaled by the clock ratio alone
  (equal work per cycle, optimistic): the truth should lie between the two.

Efficiency factors (:class:`Assumption`, printed with every estimate):

- ``e_gpu``: the fraction of the dense tensor peak a small batch-1 convnet reaches under TensorRT on a
  Jetson, from a published measurement (:data:`GPU_REFERENCE`: YOLOv8n INT8 on an Orin Nano Super). It is
  an *effective* rate: the reference's time includes its memory stalls and launches, which the memory and
  launch terms here count again (pessimistic), while our graph's depthwise convolutions suit tensor cores
  less than YOLOv8n's dense ones (optimistic). The same fraction is assumed for FP16 and on AGX Orin
  (16 SMs are harder to fill at batch 1 than 8: optimistic there). For comparison the report also shows
  the fraction ONNX Runtime reached of this CPU's sgemm peak on the same graph (a CPU is far easier to fill).
- bandwidth efficiency 1.0: no sustained-bandwidth figure is published for these modules and none is
  invented; the byte counts are already an upper bound (no cache reuse).
- ``t_launch``: :data:`LAUNCH_OVERHEAD_S` per kernel.
- ``e_index``: measured here (the exact index's FLOP/s in its fastest call over this machine's one-thread
  sgemm peak, at most 1), assumed to carry over to the target's BLAS on one A78AE core.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .flops import ELEMENTWISE_FLOPS, METADATA, VIEWS, count_graph
from .targets import TARGETS, Figure, TargetDevice

STATEMENT = ("ESTIMATE ON PAPER, not a measurement: published peak rates x the efficiency factors below, applied "
             "to the work counted here. Confirm on the device with benchmarks/gpu_acceptance.py.")
CONFIRM_WITH = ("on the Jetson, from a checkout of this repository: pcedge build-engine BUNDLE && python "
                "benchmarks/gpu_acceptance.py BUNDLE --images DIR  (builds FP32/FP16 engines on a copy of the "
                "bundle, times every stage at batch 1/4/8 per backend, writes results/gpu_acceptance.json; set "
                "the power mode first: sudo nvpmodel -m <mode> && sudo jetson_clocks)")

#: Per-kernel launch overhead. NVIDIA's "Getting Started with CUDA Graphs" (https://developer.nvidia.com/blog/
#: cuda-graphs/) measured about 3.8 us per short kernel launched back to back from an x86 host; a Jetson's
#: Cortex-A78AE host launches more slowly (NVIDIA forum, "Question about inference using TensorRT API",
#: https://forums.developer.nvidia.com/t/question-about-inference-using-tensorrt-api/266121), so this is optimistic.
LAUNCH_OVERHEAD_S = 3.8e-6
PRECISION_BYTES = {"fp16": 2, "int8": 1}  # element sizes in a TensorRT engine of that precision


@dataclass(frozen=True)
class GpuReference:
    """A published batch-1 TensorRT measurement on a Jetson, from which ``e_gpu`` is derived."""

    model: str
    flops: float  # per image (2 x MACs)
    flops_source: str
    seconds: float  # GPU compute time per image
    measurement_source: str
    target: str  # a TARGETS key: the device and power mode it ran on
    precision: str  # "int8" | "fp16"

    def efficiency(self) -> float:
        """Achieved FLOP/s over the device's dense tensor peak at that precision."""
        device = TARGETS[self.target]
        peak = device.gpu_int8_dense.value if self.precision == "int8" else device.gpu_fp16_dense.value
        return self.flops / self.seconds / peak


GPU_REFERENCE = GpuReference(
    model="YOLOv8n, 640x640, batch 1, TensorRT 10.3 INT8 engine (trtexec GPU compute time)",
    flops=8.9e9,
    flops_source="ultralytics/cfg/models/v8/yolov8.yaml (github.com/ultralytics/ultralytics): 'YOLOv8n summary: "
                 "225 layers, 3157200 parameters, 3157184 gradients, 8.9 GFLOPs' (Ultralytics counts 2 x MACs)",
    seconds=3.49e-3,
    measurement_source="H. Choi, 'YOLOv8 on Jetson Orin Nano: From PyTorch to TensorRT INT8' (April 2026), "
                       "https://hokwangchoi.com/blog/vision-benchmarks/ : 'TensorRT INT8 achieves 3.49ms / 286 FPS' "
                       "on an Orin Nano 8GB in MAXN_SUPER, JetPack 6.2 (a third-party measurement)",
    target="orin-nano-super",
    precision="int8",
)


# --------------------------------------------------------------------------------------------------
# Arithmetic
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Roofline:
    """Seconds of a stage on a device: the longer of its compute and memory times, plus fixed overhead."""

    compute_s: float
    memory_s: float
    overhead_s: float

    @property
    def total_s(self) -> float:
        return max(self.compute_s, self.memory_s) + self.overhead_s

    @property
    def bound(self) -> str:
        return "compute" if self.compute_s >= self.memory_s else "memory"


def roofline(flops: float, nbytes: float, rate: float, bandwidth: float, compute_efficiency: float,
             memory_efficiency: float = 1.0, launches: int = 0, launch_s: float = 0.0) -> Roofline:
    """``max(flops / (rate x e_c), nbytes / (bandwidth x e_m)) + launches x launch_s`` (rates per second)."""
    if min(rate, bandwidth, compute_efficiency, memory_efficiency) <= 0:
        raise ValueError("rates and efficiencies must be positive")
    return Roofline(flops / (rate * compute_efficiency), nbytes / (bandwidth * memory_efficiency), launches * launch_s)


@dataclass
class GraphWork:
    """An ONNX graph's work per image at batch 1, at its own (float32) element sizes."""

    model: str
    macs: float
    flops: float
    bytes_unfused: float  # op-by-op traffic (flops.GraphCost.bytes)
    bytes_fused: float  # after folding every elementwise op into its neighbour (TensorRT pointwise fusion)
    kernels: int  # layers left after that fusion (one launch each)
    uncounted: list[str] = field(default_factory=list)


def graph_work(model_path: Path) -> GraphWork:
    """Count ``model_path`` at batch 1 (needs ``onnx``; raises flops.FlopsUnavailable / FlopsError).

    TensorRT fuses an activation, a residual sum or a scale into the convolution before it ("Layer Fusion
    Catalog", https://docs.nvidia.com/deeplearning/tensorrt/latest/performance/fusion-catalog.html): the
    elementwise op's output is no longer written and its producer's output no longer read back, so each
    elementwise op takes 2 x its output bytes off the traffic and launches no kernel of its own.
    """
    cost = count_graph(model_path, batch=1)
    elementwise = [op for op in cost.ops if op.op_type in ELEMENTWISE_FLOPS]
    saved = sum(2 * op.write_bytes for op in elementwise)
    kernels = sum(1 for op in cost.ops if op.op_type not in ELEMENTWISE_FLOPS and op.op_type not in VIEWS
                  and op.op_type not in METADATA)
    return GraphWork(model=str(model_path), macs=float(cost.macs), flops=float(cost.flops), bytes_unfused=float(cost.bytes),
                     bytes_fused=float(cost.bytes - saved), kernels=kernels, uncounted=list(cost.uncounted))


# --------------------------------------------------------------------------------------------------
# The estimate
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Assumption:
    name: str
    value: float
    unit: str
    justification: str


@dataclass
class StageEstimate:
    name: str
    measured_ms: float  # here, median at batch 1
    measured_min_ms: float  # here, the fastest call: what the CPU stages' estimates scale
    fp16_ms: float  # the target with an FP16 engine
    int8_ms: float  # the target with an INT8 engine
    bound: str  # what limits the estimate: compute | memory | CPU core (scaled) ...
    how: str  # the arithmetic, in words and numbers


@dataclass
class TargetEstimate:
    target: str
    device: str
    mode: str
    backend_here: str  # the backend whose measured figures stand beside the estimate
    index_kind: str
    stages: list[StageEstimate]
    measured_total_ms: float
    fp16_total_ms: float
    int8_total_ms: float
    fp16_fps: float
    int8_fps: float
    cpu_scale: float  # one core here / one target core (float32 peak): how CPU stage times were scaled
    # The optimistic alternative: CPU stages scaled by clock alone (equal work per cycle); None when this
    # machine's clock is unknown. The exact index is a matrix product and keeps its peak-based estimate.
    clock_scale: float | None = None
    fp16_total_ms_clock: float | None = None
    int8_total_ms_clock: float | None = None
    notes: list[str] = field(default_factory=list)


@dataclass
class JetsonEstimate:
    """Every requested target, for one bench report."""

    statement: str
    confirm_with: str
    backbone: GraphWork
    int8_graph: str  # where the INT8 counts came from
    assumptions: list[Assumption]
    estimates: list[TargetEstimate]
    figures: dict[str, dict[str, Figure]]  # per target: the published figures with their sources
    gpu_reference: GpuReference


class EstimateUnavailable(ValueError):
    """The bench report lacks what the estimate needs (a batch-1 run, the measured peak); says which."""


def cpu_clock_hz() -> float | None:
    """This machine's CPU clock as /proc/cpuinfo reports it (first ``cpu MHz``), None where unknown."""
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.lower().startswith("cpu mhz"):
                    return float(line.split(":", 1)[1]) * 1e6
    except (OSError, ValueError):
        pass
    return None


def _batch1_runs(report) -> list:
    runs = [r for r in report.runs if r.batch == 1]
    if not runs:
        raise EstimateUnavailable("the estimate scales batch-1 stage times: add 1 to --batch")
    backend = runs[0].backend  # the first backend measured (best first): its runs stand beside the estimate
    return [r for r in runs if r.backend == backend]


def _int8_work(bundle, fp32: GraphWork) -> tuple[GraphWork, str]:
    """The INT8 graph's counts when the bundle has one (manifest ``model.int8_file``), else the FP32 graph's."""
    name = getattr(bundle.manifest.model, "int8_file", None) or "model_int8.onnx"
    path = Path(bundle.root) / name
    if path.is_file():
        work = graph_work(path)
        return work, f"{name} (its MACs; bytes at 1 byte per element)"
    return fp32, f"estimated from model.onnx's counts at 1 byte per element ({name} is not in this bundle)"


def _backbone(work: GraphWork, device: TargetDevice, precision: str, e_gpu: float) -> Roofline:
    rate = device.gpu_fp16_dense.value if precision == "fp16" else device.gpu_int8_dense.value
    nbytes = work.bytes_fused * PRECISION_BYTES[precision] / 4  # counted at float32 element sizes
    return roofline(work.flops, nbytes, rate, device.memory_bandwidth.value, e_gpu, 1.0, work.kernels, LAUNCH_OVERHEAD_S)


def _stages(run, report, device: TargetDevice, fp16_work: GraphWork, int8_work: GraphWork, e_gpu: float,
            cpu_scale: float, scale_label: str = "one core's float32 peak here / there") -> list[StageEstimate]:
    """Per-stage estimates. CPU stages scale the *fastest* timed call here (the least disturbed by other work,
    as the peak is the best of its repeats), so that load on this machine does not inflate the estimate."""
    measured = {s.name: s for s in run.stages}
    bandwidth = device.memory_bandwidth.value
    out = []

    def stage(name: str, fp16_ms: float, int8_ms: float, bound: str, how: str) -> StageEstimate:
        ms = measured[name].ms
        return StageEstimate(name, ms.p50, ms.min, fp16_ms, int8_ms, bound, how)

    pre = measured["preprocess"]
    scaled = pre.ms.min * cpu_scale
    floor_ms = (pre.floor.bytes or 0.0) / bandwidth * 1e3
    pre_ms = max(scaled, floor_ms)
    out.append(stage("preprocess", pre_ms, pre_ms, "CPU, 1 core" if scaled >= floor_ms else "memory",
                     f"{pre.ms.min:.2f} ms here x {cpu_scale:.2f} ({scale_label}); bytes floor {floor_ms:.3f} ms"))

    fp16, int8 = _backbone(fp16_work, device, "fp16", e_gpu), _backbone(int8_work, device, "int8", e_gpu)
    out.append(stage(
        "backbone", fp16.total_s * 1e3, int8.total_s * 1e3, f"{fp16.bound} / {int8.bound}",
        f"FP16: max({fp16.compute_s * 1e3:.3f} compute, {fp16.memory_s * 1e3:.3f} memory) + {fp16.overhead_s * 1e3:.3f} "
        f"launches; INT8: max({int8.compute_s * 1e3:.3f}, {int8.memory_s * 1e3:.3f}) + {int8.overhead_s * 1e3:.3f} ms"))

    index = measured["index"]
    if run.index_kind == "exact":
        P, N, D = report.patches, report.bank_rows, report.dim
        flops = 2.0 * P * N * D
        # The fraction of one core's sgemm peak the product reached here; above 1 only when the peak itself
        # was measured under load (the product cannot beat it): capped.
        measured_fraction = flops / (index.ms.min / 1e3) / report.peak.sgemm_at(1)
        e_index = min(measured_fraction, 1.0)
        r = roofline(flops, 4.0 * (N * D + P * D), device.cpu_core_flops, bandwidth, e_index)
        ms = r.total_s * 1e3
        out.append(stage("index", ms, ms, "CPU, 1 BLAS thread" if r.bound == "compute" else "memory",
                         f"2 x {P} x {N} x {D} FLOPs / ({device.cpu_core_flops / 1e9:.1f} GFLOP/s x {e_index:.2f}, "
                         f"the fraction of one core's peak reached here"
                         + (f", capped from {measured_fraction:.2f}" if measured_fraction > 1 else "") + ")"))
    else:
        ms = index.ms.min * cpu_scale
        out.append(stage("index", ms, ms, "CPU, 1 core",
                         f"{index.ms.min:.2f} ms here x {cpu_scale:.2f} (hnswlib: work not countable)"))

    scoring = measured["scoring"]
    ms = scoring.ms.min * cpu_scale
    out.append(stage("scoring", ms, ms, "CPU, 1 core", f"{scoring.ms.min:.2f} ms here x {cpu_scale:.2f}"))
    return out


def estimate(report, bundle, devices: tuple[TargetDevice, ...]) -> JetsonEstimate:
    """The estimate for each of ``devices`` beside ``report``'s batch-1 runs of its first backend.

    ``report`` is a :class:`~pcedge.runtime.evaluation.latency.BenchReport` with the peak measured;
    ``bundle`` the opened bundle it measured. Raises :class:`EstimateUnavailable` when either lacks what is
    needed, and flops.FlopsUnavailable without the ``onnx`` package.
    """
    if report.peak is None:
        raise EstimateUnavailable("the estimate scales CPU stages by this machine's measured peak: drop --no-peak")
    runs = _batch1_runs(report)
    fp32_work = graph_work(bundle.model_path)
    int8_work, int8_graph = _int8_work(bundle, fp32_work)
    e_gpu = GPU_REFERENCE.efficiency()
    here_core = report.peak.sgemm_at(1)
    here_clock = cpu_clock_hz()
    backbone_here = next(s for s in runs[0].stages if s.name == "backbone").floor.fraction_of_peak_flops
    assumptions = [
        Assumption("e_gpu", e_gpu, "of dense tensor peak",
                   f"{GPU_REFERENCE.model}: {GPU_REFERENCE.flops / 1e9:.1f} GFLOP in {GPU_REFERENCE.seconds * 1e3:.2f} ms "
                   f"on {TARGETS[GPU_REFERENCE.target].name} = {GPU_REFERENCE.flops / GPU_REFERENCE.seconds / 1e12:.2f} "
                   f"TFLOP/s of its {TARGETS[GPU_REFERENCE.target].gpu_int8_dense.value / 1e12:.1f} dense INT8 TOPS. "
                   f"Sources: {GPU_REFERENCE.measurement_source}; {GPU_REFERENCE.flops_source}. For comparison, "
                   f"{runs[0].backend} reached {backbone_here or 0:.2f} of this CPU's sgemm peak on the same graph"),
        Assumption("bandwidth efficiency", 1.0, "of theoretical LPDDR5 bandwidth",
                   "no sustained figure is published and none is invented; the byte counts are an upper bound "
                   "(every fused layer reads and writes DRAM, nothing kept in the L2 cache)"),
        Assumption("t_launch", LAUNCH_OVERHEAD_S, "s per kernel",
                   f"{fp32_work.kernels} kernels after pointwise fusion; NVIDIA's CUDA Graphs blog measured about "
                   "3.8 us per back-to-back short kernel on an x86 host (a Jetson host is slower: optimistic)"),
        Assumption("CPU core here", here_core, "FLOP/s",
                   "measured: float32 sgemm on one thread (pcedge bench's peak); CPU stage times are scaled by this "
                   "over one target core's NEON peak (clock x 16 FLOP/cycle). Pessimistic for OpenCV code on a host "
                   "with wider vectors (AVX-512 does 4x NEON's FLOPs per cycle, a resize does not gain 4x from it)"),
        Assumption("CPU clock here", here_clock or 0.0, "Hz",
                   "/proc/cpuinfo 'cpu MHz' (a VM reports its nominal clock); the optimistic alternative scales the "
                   "CPU stages by clock alone (equal work per cycle), shown as 'total if CPU scales with clock'"),
    ]
    estimates = []
    for device in devices:
        cpu_scale = here_core / device.cpu_core_flops
        clock_scale = here_clock / device.cpu_clock.value if here_clock else None
        for run in runs:
            stages = _stages(run, report, device, fp32_work, int8_work, e_gpu, cpu_scale)
            fp16_total = sum(s.fp16_ms for s in stages)
            int8_total = sum(s.int8_ms for s in stages)
            by_clock = (_stages(run, report, device, fp32_work, int8_work, e_gpu, clock_scale, "clock here / there")
                        if clock_scale else None)
            notes = []
            if run.index_kind == "exact":
                index = next(s for s in stages if s.name == "index")
                cores = int(device.cpu_cores.value)
                notes.append(f"the exact index on all {cores} cores (DetectorOptions.blas_threads = {cores}, "
                             f"linear scaling assumed): {index.fp16_ms / cores:.2f} ms instead of {index.fp16_ms:.2f}")
            estimates.append(TargetEstimate(
                target=device.key, device=device.name, mode=device.mode, backend_here=run.backend,
                index_kind=run.index_kind, stages=stages, measured_total_ms=sum(s.measured_ms for s in stages),
                fp16_total_ms=fp16_total, int8_total_ms=int8_total, fp16_fps=1e3 / fp16_total, int8_fps=1e3 / int8_total,
                cpu_scale=cpu_scale, clock_scale=clock_scale,
                fp16_total_ms_clock=sum(s.fp16_ms for s in by_clock) if by_clock else None,
                int8_total_ms_clock=sum(s.int8_ms for s in by_clock) if by_clock else None, notes=notes))
    return JetsonEstimate(
        statement=STATEMENT, confirm_with=CONFIRM_WITH, backbone=fp32_work, int8_graph=int8_graph,
        assumptions=assumptions, estimates=estimates, figures={d.key: d.figures() for d in devices},
        gpu_reference=GPU_REFERENCE)


# --------------------------------------------------------------------------------------------------
# Markdown
# --------------------------------------------------------------------------------------------------


def markdown(result: JetsonEstimate) -> list[str]:
    """The estimate section of ``pcedge bench``'s Markdown (lines)."""
    w = result.backbone
    lines = ["", "## Jetson estimate (on paper, not measured)", "", f"**{result.statement}**", "",
             f"Confirm: {result.confirm_with}.", "",
             f"Backbone per image: {w.flops / 1e6:.1f} MFLOPs, {w.bytes_fused / 1e6:.1f} MB at float32 after "
             f"TensorRT's pointwise fusion ({w.bytes_unfused / 1e6:.1f} MB op by op), {w.kernels} kernels; "
             f"FP16 at 2 and INT8 at 1 byte per element. INT8 counts: {result.int8_graph}.", ""]
    for e in result.estimates:
        lines += [f"### {e.device} (`{e.target}`), index {e.index_kind}", "", f"Power mode: {e.mode}.", "",
                  f"| stage | measured here ({e.backend_here}): p50 (fastest) ms | estimate FP16 (ms) | estimate INT8 (ms) "
                  "| bound |",
                  "|---|---:|---:|---:|---|"]
        for s in e.stages:
            lines.append(f"| {s.name} | {s.measured_ms:.2f} ({s.measured_min_ms:.2f}) | {s.fp16_ms:.2f} | {s.int8_ms:.2f} "
                         f"| {s.bound} |")
        lines += [f"| **total** | **{e.measured_total_ms:.2f}** | **{e.fp16_total_ms:.2f}** | **{e.int8_total_ms:.2f}** | |",
                  f"| images/s (stages in series) | {1e3 / e.measured_total_ms:.1f} | {e.fp16_fps:.1f} | {e.int8_fps:.1f} | |"]
        if e.clock_scale:
            lines.append(f"| total if CPU scales with clock (x{e.clock_scale:.2f}, optimistic) | | {e.fp16_total_ms_clock:.2f} | "
                         f"{e.int8_total_ms_clock:.2f} | |")
        lines.append("")
        lines += [f"- {s.name}: {s.how}" for s in e.stages] + [f"- {n}" for n in e.notes] + [""]
    lines += ["Efficiency factors and assumptions:", ""]
    for a in result.assumptions:
        value = f"{a.value:.3g}" if a.value < 1e3 else f"{a.value / 1e9:.1f} G"
        lines.append(f"- **{a.name}** = {value} {a.unit}: {a.justification}")
    lines += _figures_table(result.figures)
    return lines


def _format(f: Figure) -> str:
    scale = {"op/s": (1e12, "TOPS"), "FLOP/s": (1e12, "TFLOP/s"), "B/s": (1e9, "GB/s"), "Hz": (1e9, "GHz")}.get(f.unit)
    if scale:
        return f"{f.value / scale[0]:.4g} {scale[1]}"
    return f"{f.value:g} {f.unit}"


def _figures_table(figures: dict[str, dict[str, Figure]]) -> list[str]:
    """Published figures: one row per quantity, one column per target; sources numbered once below."""
    sources: dict[str, int] = {}
    derived: list[str] = []
    keys = list(figures)
    names = list(next(iter(figures.values())))
    lines = ["", "Published figures (* derived from printed figures, see below; [n] = source):", "",
             "| figure | " + " | ".join(f"`{k}`" for k in keys) + " |", "|---|" + "---:|" * len(keys)]
    for name in names:
        cells = []
        for key in keys:
            f = figures[key][name]
            n = sources.setdefault(f.source, len(sources) + 1)
            cells.append(f"{_format(f)}{'*' if f.derivation else ''} [{n}]")
            line = f"- {name}: {f.derivation} (printed: \"{f.quote}\")"
            if f.derivation and line not in derived:  # the CPU's derivation is the same for every target
                derived.append(line)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", *[f"{n}. {source}" for source, n in sources.items()], "", "Derivations (per target in the same order as the table when they differ):", "", *derived]
    return lines


__all__ = ["Assumption", "CONFIRM_WITH", "cpu_clock_hz", "EstimateUnavailable", "GPU_REFERENCE", "GpuReference", "GraphWork", "JetsonEstimate",
           "LAUNCH_OVERHEAD_S", "Roofline", "STATEMENT", "StageEstimate", "TargetEstimate", "estimate", "graph_work",
           "markdown", "roofline"]
