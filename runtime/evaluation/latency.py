"""Latency per stage and throughput on this machine, beside each stage's floor (`pcedge bench`).

For every available backend and index kind, and each batch size: warm up, then time ``repeats`` calls of
:meth:`Detector.run_frames` on frames decoded once up front (decoding is never timed). Each call reports
per-image stage times (``Result.timings``: preprocess, backbone, index, scoring); the report gives their
p50/p95/p99, the end-to-end time per call, and images per second.

Beside each stage, its floor: the work it must do per image and the fraction of this machine's measured
peak that the measured time achieves -- backbone FLOPs and bytes from the ONNX graph
(:mod:`pcedge.runtime.evaluation.flops`, needs the ``onnx`` package), distance computations of the exact index,
bytes in and out of preprocessing. Peak rates are measured here, at the backend's thread count, by a large
float32 numpy matrix product and a large numpy copy (:func:`~pcedge.runtime.evaluation.flops.measure_peak`).

Images: ``--images`` (files, folders, globs; decoded once). Without it, the bundle's own check images
(``check/images.npy``, already network-sized) are turned back into uint8 BGR frames of the input size:
preprocessing then does no real resize, and the report says so.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from ..backends import BACKENDS
from ..bundle import BundleError
from ..errors import BackendUnavailable
from .machine import MachineInfo, machine_info

STAGES = ("preprocess", "backbone", "index", "scoring")
#: Every concrete backend, best first (what ``--backend all`` tries).
ALL_BACKENDS = tuple(b for b in BACKENDS if b != "auto")
ALL_INDEXES = ("exact", "hnsw")


# --------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------


@dataclass
class Percentiles:
    """Milliseconds over the timed calls."""

    p50: float
    p95: float
    p99: float
    mean: float
    min: float
    n: int

    @classmethod
    def of(cls, values: list[float]) -> "Percentiles":
        v = np.asarray(values, dtype=np.float64)
        p50, p95, p99 = np.percentile(v, [50, 95, 99])
        return cls(float(p50), float(p95), float(p99), float(v.mean()), float(v.min()), int(v.size))


@dataclass
class StageFloor:
    """The work a stage must do per image, and how close the measured median comes to the machine's peak.

    ``None`` where a quantity is not known (never guessed); ``note`` says what was counted.
    """

    flops: float | None = None
    bytes: float | None = None
    distance_computations: float | None = None  # memory features compared with a query, summed over patches
    achieved_flops_per_s: float | None = None
    fraction_of_peak_flops: float | None = None
    achieved_bytes_per_s: float | None = None
    fraction_of_peak_bandwidth: float | None = None
    note: str = ""


@dataclass
class StageResult:
    name: str
    ms: Percentiles  # per image (batch stages divided evenly over the batch, as Result.timings does)
    floor: StageFloor


@dataclass
class RunResult:
    """One backend x index x batch size."""

    backend: str
    backend_description: str
    index: str  # as requested: exact | hnsw | auto
    index_kind: str  # what ran
    index_note: str
    batch: int
    calls: int
    images: int
    stages: list[StageResult]
    stage_sum_ms: Percentiles  # preprocess + backbone + index + scoring, per image
    call_ms: Percentiles  # wall time of one run_frames call (the whole batch; decode excluded)
    per_image_ms: Percentiles  # call wall time / batch
    throughput_images_per_s: float  # images / total wall time of the timed calls
    rescored_patches_mean: float  # patches re-scored exactly after HNSW, per image
    hnsw_ms_per_patch: float | None = None  # median index time per image / patches (hnsw only)


@dataclass
class Skipped:
    backend: str
    reason: str



@dataclass
class BackboneWork:
    """The ONNX graph's work per image at batch 1 (see :mod:`pcedge.runtime.evaluation.flops`)."""

    macs: float
    flops: float
    params: int
    weight_bytes: float
    bytes_unfused: float  # op-by-op traffic at batch 1
    min_bytes: float  # weights + input + output once, at batch 1
    by_op_type: dict[str, dict[str, float]]
    uncounted: list[str]
    unknown_shapes: list[str]


@dataclass
class ImagesInfo:
    source: str
    n: int
    frame_shapes: list[list[int]]  # distinct decoded frame shapes
    note: str


@dataclass
class BenchReport:
    bundle: str
    created: str
    machine: MachineInfo
    settings: dict[str, object]
    images: ImagesInfo
    input_hw: list[int]
    patches: int  # h * w per image
    bank_rows: int
    dim: int
    peak: object | None  # flops.MachinePeak
    backbone_work: BackboneWork | None
    backbone_work_note: str
    runs: list[RunResult] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    jetson_estimate: object | None = None  # jetson_estimate.JetsonEstimate when `pcedge bench --target` asked for one


@dataclass
class BenchConfig:
    bundle: Path
    images: list[str] | None = None  # files, folders, globs; None: the bundle's check images
    backends: tuple[str, ...] = ALL_BACKENDS
    indexes: tuple[str, ...] = ALL_INDEXES
    batches: tuple[int, ...] = (1, 4, 8)
    repeats: int = 30  # timed calls per backend x index x batch
    warmup: int = 5  # untimed calls first (thread pools, allocator, caches)
    threads: int | None = None  # None: every CPU this process may use
    ef: int | None = None  # HNSW query ef (None: the bundle's)
    precision: str | None = None
    measure_peak: bool = True
    max_images: int = 64  # frames kept decoded in memory (cycled through)


# --------------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------------


def frames_from_files(items: list[str], limit: int) -> tuple[list[np.ndarray], ImagesInfo]:
    """Decode up to ``limit`` images once (files, folders, globs); decoding is not part of any timing."""
    from ..inputs import expand_inputs
    from ..preprocess import read_image

    paths = expand_inputs(items)[:limit]
    frames = [read_image(p) for p in paths]
    shapes = sorted({tuple(f.shape) for f in frames})
    info = ImagesInfo(source=", ".join(items), n=len(frames), frame_shapes=[list(s) for s in shapes],
                      note="decoded once before timing; preprocessing includes the resize to the network input")
    return frames, info


def frames_from_check(bundle) -> tuple[list[np.ndarray], ImagesInfo]:
    """The bundle's check images ``[n, 3, H, W]`` RGB [0, 1] -> uint8 BGR frames ``[H, W, 3]``."""
    arrays = bundle.load_check_arrays()
    if arrays is None:
        raise BundleError(f"{bundle.root}: no check images in the manifest; pass --images")
    images = arrays[0]
    frames = [np.ascontiguousarray((np.clip(im.transpose(1, 2, 0), 0, 1) * 255 + 0.5).astype(np.uint8)[:, :, ::-1])
              for im in images]
    info = ImagesInfo(
        source=f"{bundle.root}/{bundle.manifest.check.images}", n=len(frames), frame_shapes=[list(frames[0].shape)],
        note="the bundle's check images are already network-sized; they were turned back into uint8 BGR frames "
             "of the input size, so preprocessing measures colour and float conversion only, not a resize "
             "(pass --images for camera-sized frames)",
    )
    return frames, info


# --------------------------------------------------------------------------------------------------
# Floors
# --------------------------------------------------------------------------------------------------


def backbone_work(model_path: Path) -> tuple[BackboneWork | None, str]:
    from .flops import FlopsError, FlopsUnavailable, count_graph

    try:
        cost = count_graph(model_path, batch=1)
    except FlopsUnavailable:
        return None, "FLOPs: install onnx (pip install onnx) to count the backbone's FLOPs and bytes"
    except FlopsError as exc:
        return None, f"FLOPs not counted: {exc}"
    by_op = {op: {"count": c.count, "macs": c.macs, "flops": c.flops, "bytes": c.bytes} for op, c in cost.by_op_type.items()}
    work = BackboneWork(
        macs=cost.macs, flops=cost.flops, params=cost.params, weight_bytes=cost.params_bytes,
        bytes_unfused=cost.bytes, min_bytes=cost.min_bytes, by_op_type=by_op, uncounted=cost.uncounted,
        unknown_shapes=cost.unknown_shapes,
    )
    return work, "counted from the ONNX graph at batch 1 (runtime/flops.py)"


def _rates(floor: StageFloor, median_ms: float, peak, threads: int | None = None) -> StageFloor:
    """Achieved rates at ``median_ms``, as fractions of the peak measured at ``threads`` (None: the bench's)."""
    seconds = median_ms / 1e3
    if seconds <= 0:
        return floor
    if floor.flops is not None:
        floor.achieved_flops_per_s = floor.flops / seconds
        if peak is not None:
            floor.fraction_of_peak_flops = floor.achieved_flops_per_s / peak.sgemm_at(threads)
    if floor.bytes is not None:
        floor.achieved_bytes_per_s = floor.bytes / seconds
        if peak is not None:
            floor.fraction_of_peak_bandwidth = floor.achieved_bytes_per_s / peak.copy_bytes_per_s
    return floor


def stage_floors(report: BenchReport, index_kind: str, batch: int, frames: list[np.ndarray],
                 rescored_mean: float, scorer) -> dict[str, StageFloor]:
    """Work per image of each stage (medians are filled in by the caller)."""
    H, W = report.input_hw
    P, N, D = report.patches, report.bank_rows, report.dim
    frame_bytes = float(np.mean([f.nbytes for f in frames]))
    floors = {
        "preprocess": StageFloor(
            bytes=frame_bytes + 3 * H * W * 4,
            note="bytes: the decoded frame read once and the float32 network input written once"),
    }
    work = report.backbone_work
    if work is not None:
        floors["backbone"] = StageFloor(
            flops=work.flops, bytes=work.bytes_unfused - work.weight_bytes + work.weight_bytes / batch,
            note=f"ONNX graph: {work.macs / 1e6:.1f} M MACs; bytes = op-by-op traffic with weights shared over "
                 f"batch {batch} (lower bound {(work.min_bytes - work.weight_bytes + work.weight_bytes / batch) / 1e6:.2f} MB)")
    else:
        floors["backbone"] = StageFloor(note=report.backbone_work_note)
    if index_kind == "exact":
        floors["index"] = StageFloor(
            distance_computations=float(P * N), flops=2.0 * P * N * D,
            bytes=float(N * D * 4 * -(-P // 1024) + P * D * 4),
            note=f"exact: every one of the {P} patches against all {N} memory features; FLOPs of the "
                 f"[{P}, {D}] x [{D}, {N}] matrix product, against the sgemm peak at the detector's BLAS threads; "
                 f"bytes: the bank read once per 1024-query block")
    else:
        floors["index"] = StageFloor(
            distance_computations=None,
            note=f"hnsw: hnswlib does not expose its distance-computation count (none estimated); see "
                 f"hnsw_ms_per_patch. The exact re-scoring pass compared {rescored_mean:.1f} patches per image "
                 f"with all {N} memory features ({rescored_mean * N:.0f} distances, measured)")
    sigma = scorer.blur_sigma(H, W)
    ksize = 2 * int(round(4 * sigma)) + 1 if sigma > 0 else 0
    b = scorer.spec.reweight_b if scorer.spec.reweight else 0
    eq7 = float(N + b) if b else 0.0
    # Bilinear upsampling of the patch grid (4 multiplies + 3 adds per pixel), a separable Gaussian
    # (ksize multiply-adds per pixel per pass), Eq. 7's exact query of m* (2 N D) and its b distances.
    map_flops = H * W * (7 + 2 * 2 * ksize)
    floors["scoring"] = StageFloor(
        flops=map_flops + 2.0 * eq7 * D, distance_computations=eq7,
        note=f"anomaly map at {W}x{H} (bilinear upsampling + {ksize}x{ksize} separable Gaussian)"
             + (f" and Eq. 7 (N_b(m*) by an exact query over {N} features, b = {b})" if b else "")
             + "; placing the map back into the original frame is not counted")
    return floors


# --------------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------------


def _batches(frames: list[np.ndarray], batch: int, count: int):
    """``count`` batches cycling through ``frames``."""
    n = len(frames)
    for call in range(count):
        yield [frames[(call * batch + j) % n] for j in range(batch)]


def time_detector(detector, frames: list[np.ndarray], batch: int, repeats: int, warmup: int) -> dict[str, list[float]]:
    """Per-call measurements: stage ms per image (mean over the batch), call wall ms, re-scored patches."""
    for chunk in _batches(frames, batch, warmup):
        detector.run_frames(chunk)
    out: dict[str, list[float]] = {name: [] for name in (*STAGES, "call", "rescored")}
    for chunk in _batches(frames, batch, repeats):
        started = time.perf_counter()
        results = detector.run_frames(chunk)
        out["call"].append((time.perf_counter() - started) * 1e3)
        for name in STAGES:
            out[name].append(float(np.mean([getattr(r.timings, f"{name}_ms") for r in results])))
        out["rescored"].append(float(np.mean([r.n_rescored for r in results])))
    return out


def run_one(report: BenchReport, detector, requested_index: str, frames: list[np.ndarray], batch: int,
            config: BenchConfig) -> RunResult:
    timings = time_detector(detector, frames, batch, config.repeats, config.warmup)
    kind = getattr(detector.index, "kind", "?")
    rescored = float(np.mean(timings["rescored"]))
    floors = stage_floors(report, kind, batch, frames, rescored, detector.scorer)
    # The exact index's products run on the detector's BLAS threads; the other stages on the bench's threads.
    blas = getattr(detector.options, "blas_threads", None)
    stages = []
    for name in STAGES:
        ms = Percentiles.of(timings[name])
        stages.append(StageResult(name, ms, _rates(floors[name], ms.p50, report.peak, blas if name == "index" else None)))
    stage_sum = [sum(timings[name][i] for name in STAGES) for i in range(config.repeats)]
    calls = timings["call"]
    index_p50 = stages[STAGES.index("index")].ms.p50
    return RunResult(
        backend=detector.backend.name, backend_description=detector.backend.description, index=requested_index,
        index_kind=kind, index_note=getattr(detector.index, "note", ""), batch=batch, calls=len(calls),
        images=len(calls) * batch, stages=stages, stage_sum_ms=Percentiles.of(stage_sum),
        call_ms=Percentiles.of(calls), per_image_ms=Percentiles.of([c / batch for c in calls]),
        throughput_images_per_s=len(calls) * batch / (sum(calls) / 1e3), rescored_patches_mean=rescored,
        hnsw_ms_per_patch=index_p50 / report.patches if kind == "hnsw" else None,
    )


def run_bench(config: BenchConfig, log=print) -> BenchReport:
    """Measure every backend x index x batch of ``config``; ``log`` gets one line per step."""
    from ..backends import default_threads, open_backend
    from ..bundle import open_bundle
    from ..detector import Detector, DetectorOptions
    from .flops import measure_peak

    if not config.batches or min(config.batches) < 1:
        raise ValueError(f"batch sizes must be positive, got {list(config.batches)}")
    if config.repeats < 1 or config.warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got {config.repeats} and {config.warmup}")
    machine = machine_info()
    bundle = open_bundle(config.bundle, verify=True)
    m = bundle.manifest
    if config.images:
        frames, images = frames_from_files(config.images, config.max_images)
    else:
        frames, images = frames_from_check(bundle)
    threads = config.threads or default_threads()
    work, work_note = backbone_work(bundle.model_path)
    if work is None:
        log(work_note)
    peak = None
    if config.measure_peak:
        peak = measure_peak(threads)
        log(f"peak here ({threads} threads): sgemm {peak.sgemm_flops_per_s / 1e9:.1f} GFLOP/s, "
            f"copy {peak.copy_bytes_per_s / 1e9:.1f} GB/s")
    report = BenchReport(
        bundle=str(config.bundle), created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        machine=machine, images=images, input_hw=[m.input.geometry.height, m.input.geometry.width],
        patches=m.output.grid_h * m.output.grid_w, bank_rows=m.memory_bank.n, dim=m.memory_bank.dim,
        peak=peak, backbone_work=work, backbone_work_note=work_note,
        settings={"backends": list(config.backends), "indexes": list(config.indexes), "batches": list(config.batches),
                  "repeats": config.repeats, "warmup": config.warmup, "threads": threads, "ef": config.ef,
                  "decode": "excluded (frames decoded once before timing)"},
    )
    for kind in config.backends:
        for index in config.indexes:
            try:
                backend = open_backend(kind, bundle, threads=threads, precision=config.precision)
            except BackendUnavailable as exc:
                report.skipped.append(Skipped(kind, str(exc)))
                log(f"skip {kind}: {exc}")
                break
            options = DetectorOptions(backend=kind, index=index, ef=config.ef, threads=threads,
                                      precision=config.precision, verify_checksums=False)
            # One detector per index, closed before the next: it owns the backend, and while open it holds
            # the process-wide BLAS thread limit (DetectorOptions.blas_threads).
            with Detector(bundle, backend, options) as detector:
                for batch in config.batches:
                    run = run_one(report, detector, index, frames, batch, config)
                    report.runs.append(run)
                    log(f"{kind:8s} {index:5s} ({run.index_kind}) batch {batch}: "
                        f"{run.per_image_ms.p50:7.2f} ms/image p50, {run.per_image_ms.p95:7.2f} p95, "
                        f"{run.throughput_images_per_s:6.1f} images/s")
    report.machine.loadavg_end = list(os.getloadavg())
    return report


# --------------------------------------------------------------------------------------------------
# Markdown
# --------------------------------------------------------------------------------------------------



def _fmt(x: float | None, scale: float = 1.0, digits: int = 1, unit: str = "") -> str:
    return "–" if x is None else f"{x / scale:.{digits}f}{unit}"


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.0f}%"


def markdown(report: BenchReport) -> str:
    """The latency table and the floors table, in Markdown."""
    m = report.machine
    lines = [
        f"# pcedge bench: {report.bundle}",
        "",
        f"{m.cpu_model}, {m.usable_cpus} usable CPUs, {report.settings['threads']} threads; load average "
        f"{m.loadavg_start[0]:.2f} at the start, {m.loadavg_end[0] if m.loadavg_end else float('nan'):.2f} at the end. "
        f"Input {report.input_hw[1]}x{report.input_hw[0]}, {report.patches} patches, memory bank "
        f"{report.bank_rows} x {report.dim}. Images: {report.images.source} ({report.images.n}); {report.images.note}.",
        "",
    ]
    if report.peak is not None:
        p = report.peak
        by_threads = ", ".join(f"{v / 1e9:.1f} GFLOP/s on {t} thread{'s' if int(t) > 1 else ''}"
                               for t, v in sorted(p.sgemm_by_threads.items(), key=lambda kv: int(kv[0])))
        lines += [f"Peak measured here: sgemm {by_threads} (n = {p.sgemm_n}, BLAS threads set by {p.blas_threads}), "
                  f"copy {p.copy_bytes_per_s / 1e9:.1f} GB/s ({p.copy_threads} thread(s)).", ""]
    if report.backbone_work is not None:
        w = report.backbone_work
        lines += [f"Backbone graph per image: {w.macs / 1e6:.1f} M MACs = {w.flops / 1e6:.1f} MFLOPs, "
                  f"{w.params / 1e6:.2f} M parameters, {w.bytes_unfused / 1e6:.1f} MB op-by-op traffic "
                  f"(lower bound {w.min_bytes / 1e6:.2f} MB).", ""]
    else:
        lines += [report.backbone_work_note, ""]
    lines += [
        "Milliseconds per image, p50 / p95 / p99 (decode excluded; batch stages divided over the batch).",
        "",
        "| backend | index | batch | preprocess | backbone | index search | scoring | end to end | images/s |",
        "|---|---|---:|---|---|---|---|---|---:|",
    ]
    for run in report.runs:
        cells = [f"{s.ms.p50:.2f} / {s.ms.p95:.2f} / {s.ms.p99:.2f}" for s in run.stages]
        e = run.per_image_ms
        lines.append(f"| {run.backend} | {run.index} ({run.index_kind}) | {run.batch} | " + " | ".join(cells)
                     + f" | **{e.p50:.2f}** / {e.p95:.2f} / {e.p99:.2f} | {run.throughput_images_per_s:.1f} |")
    lines += [
        "",
        "Floors (work per image) and the fraction of the measured peak achieved at the median.",
        "",
        "| backend | index | batch | stage | p50 ms | GFLOP | MB | distances | GFLOP/s | of peak FLOP/s | GB/s | of peak GB/s |",
        "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for run in report.runs:
        for s in run.stages:
            f = s.floor
            lines.append(
                f"| {run.backend} | {run.index_kind} | {run.batch} | {s.name} | {s.ms.p50:.2f} | {_fmt(f.flops, 1e9, 3)} | "
                f"{_fmt(f.bytes, 1e6, 2)} | {_fmt(f.distance_computations, 1, 0)} | {_fmt(f.achieved_flops_per_s, 1e9, 1)} | "
                f"{_pct(f.fraction_of_peak_flops)} | {_fmt(f.achieved_bytes_per_s, 1e9, 2)} | {_pct(f.fraction_of_peak_bandwidth)} |")
    notes: list[str] = []  # each distinct note once, in table order
    for run in report.runs:
        for s in run.stages:
            line = f"- {s.name}, batch {run.batch}: {s.floor.note}" if s.name == "backbone" else f"- {s.name}: {s.floor.note}"
            if s.floor.note and line not in notes:
                notes.append(line)
    if notes:
        lines += ["", "Notes:", ""] + notes
    hnsw = [r for r in report.runs if r.hnsw_ms_per_patch is not None]
    for r in hnsw:
        lines.append(f"- hnsw, {r.backend}, batch {r.batch}: {1e3 * r.hnsw_ms_per_patch:.2f} µs per patch query (median), "
                     f"{r.rescored_patches_mean:.1f} patches re-scored exactly per image")
    if report.skipped:
        lines += ["", "Skipped backends:", ""] + [f"- {s.backend}: {s.reason}" for s in report.skipped]
    if report.jetson_estimate is not None:
        from .jetson_estimate import markdown as estimate_markdown

        lines += estimate_markdown(report.jetson_estimate)
    return "\n".join(lines) + "\n"


