"""INT8 against float32 on the shared categories: accuracy per graph recipe and calibration, parity, ORT CPU latency.

For BSData (all 150 training images) and DeepPCB (a seeded 200-image training subset, as
``bench_vs_peer.py``), export with the defaults (cached under ``results/bundles/``), then:

- write the INT8 (QDQ) graph of the bundle's float32 graph once per calibration method (MinMax, Entropy,
  Percentile), calibrated as the exporter does (the same seeded training images, the runtime's
  preprocessing), and run the full test split through the detector on the float32 graph and on each
  INT8 graph (ONNX Runtime CPU, exact index, same bank and threshold): image AUROC (with a paired-bootstrap
  95 % interval of the change), pixel AUROC, AUPRO, and the relative image-score change of the test set's
  good images (the gate's quantity on images no bank has seen). This measurement chooses the default method.
- record the export's own gate figures (the bundle's ``model.int8``);
- the same for the default method with every convolution quantised (the stem and depthwise ones too),
  the evidence for leaving those float in the symmetric (TensorRT) graph;
- the ONNX Runtime CPU graph (U8S8, every convolution, ReLU6 folded; ``model_int8_cpu.onnx``) per
  calibration method, and two ablations of it: ReLU6 kept as separate Clips (Conv and Add quantised only)
  and per-tensor weights;
- time the backbone graph alone on ONNX Runtime CPU, float32 against every INT8 graph of the default
  method, batch 1, ``--runs`` timed calls per graph after a warm-up, the graphs interleaved call by call
  (a load change hits all of them alike), with the runtime's session options, at 1 and 2 threads; the load
  average before and after is recorded (this machine is shared: re-run on a quiet one). ONNX Runtime's
  profiler says where each graph's time goes (op types after its graph optimisations).

Writes ``results/int8.json`` and ``results/int8.md``.

``--default`` measures what ONNX Runtime CPU now runs by default: the bundle's CPU INT8 graph at its own
threshold (calibrated on its own out-of-fold scores) against ``--precision fp32`` (model.onnx at the float32
threshold), both through the detector (exact index) over the whole test split: image AUROC, pixel AUROC,
AUPRO, and at each graph's threshold the false-alarm rate on test/good and the share of defective images
flagged; beside them the INT8 scores judged by the float32 threshold (what a shared threshold would have
done), and the export time the INT8 thresholds add (the bundle's ``int8_out_of_fold`` seconds). Writes
``results/int8_default.json`` and ``results/int8_default.md``.

    python benchmarks/bench_int8.py [--fresh] [--runs 300] [--methods minmax,entropy,percentile] [--only bsdata]
    python benchmarks/bench_int8.py --latency-only --only bsdata   # timing and profile only (~2 min)
    python benchmarks/bench_int8.py --default [--fresh]           # INT8 default vs float32, own thresholds
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (BSDATA, BUNDLES, DEEPPCB, RESULTS, cached_bundle, load_average, log, machine_info,  # noqa: E402
                    paired_auroc_delta, score_detector, subset_folder, write_json)

from pcedge.runtime.files import write_text_atomic  # noqa: E402


@dataclass
class AccuracyRow:
    dataset: str
    graph: str  # "fp32", "int8" (symmetric, TensorRT) or "int8_cpu" (U8S8, ONNX Runtime CPU) and ablations
    calibration: str | None  # None for fp32
    image_auroc: float
    pixel_auroc: float
    aupro: float
    image_auroc_delta: float | None = None  # int8 - fp32, same images
    image_auroc_delta_ci: list[float] | None = None  # paired bootstrap 95 %
    pixel_auroc_delta: float | None = None
    aupro_delta: float | None = None
    good_score_rel_median: float | None = None  # |int8 - fp32| / fp32 on the test split's good images
    good_score_rel_max: float | None = None
    quantise_seconds: float | None = None
    n_test: int = 0


@dataclass
class LatencyRow:
    graph: str
    threads: int
    batch: int
    runs: int
    median_ms: float
    p95_ms: float
    loadavg_before: list[float]
    loadavg_after: list[float]


@dataclass
class OpTimes:
    """ONNX Runtime's own profile of one graph (1 thread, batch 1): kernel time per op type, ms per run."""

    graph: str
    runs: int
    ms_per_op: dict[str, float]
    nodes_per_op: dict[str, int]  # after ONNX Runtime's graph optimisations (e.g. QDQ -> QLinearConv fusion)


@dataclass
class Report:
    machine: object
    methods: list[str]
    default_calibration: str
    tolerance: float
    accuracy: list[AccuracyRow] = field(default_factory=list)
    gate: dict[str, object] = field(default_factory=dict)  # dataset -> the bundle's Int8Report (TensorRT graph)
    gate_cpu: dict[str, object] = field(default_factory=dict)  # dataset -> the bundle's CPU graph Int8Report
    latency: list[LatencyRow] = field(default_factory=list)
    latency_bundle: str = ""
    op_times: list[OpTimes] = field(default_factory=list)
    loadavg_start: list[float] = field(default_factory=list)
    loadavg_end: list[float] = field(default_factory=list)
    seconds: float = 0.0


def calibration_images(bundle_manifest, data: Path, n_images: int, seed: int) -> np.ndarray:
    """The exporter's calibration set: a seeded ``n_images`` of the training images, ``[n, 3, H, W]``."""
    from pcedge.export.fit import find_good_images, load_images
    from pcedge.runtime.preprocess import to_tensor

    paths = find_good_images(data)
    rng = np.random.default_rng(seed)
    chosen = sorted(rng.choice(len(paths), size=min(n_images, len(paths)), replace=False).tolist())
    return to_tensor(load_images([paths[i] for i in chosen], bundle_manifest.input.geometry, [])[0])


def evaluate(bundle_path: Path, graph: Path, precision: str, category, threads: int):
    """The detector on ``graph`` (float32 or INT8) over ``category``'s test split -> ScoredCategory."""
    from pcedge.runtime.backends import OrtBackend
    from pcedge.runtime.bundle import open_bundle
    from pcedge.runtime.detector import Detector, DetectorOptions

    bundle = open_bundle(bundle_path)
    backend = OrtBackend(graph, "ort-cpu", threads, precision=precision)
    with Detector(bundle, backend, DetectorOptions(backend="ort-cpu", index="exact", threads=threads)) as detector:
        return score_detector(detector, category)


def time_graphs(graphs: list[Path], threads: int, runs: int, warmup: int = 20) -> list[LatencyRow]:
    """Median and p95 of ``runs`` batch-1 calls of each graph on ONNX Runtime CPU (the runtime's options),
    the graphs called in turn so that a change of load on this shared machine hits all of them alike."""
    from pcedge.runtime.backends import OrtBackend

    backends = [OrtBackend(graph, "ort-cpu", threads) for graph in graphs]
    x = np.random.default_rng(0).random((1, 3, 224, 224), dtype=np.float32)
    for backend in backends:
        for _ in range(warmup):
            backend(x)
    before = load_average()
    times: list[list[float]] = [[] for _ in graphs]
    for _ in range(runs):
        for backend, spent in zip(backends, times):
            start = time.perf_counter()
            backend(x)
            spent.append((time.perf_counter() - start) * 1e3)
    after = load_average()
    for backend in backends:
        backend.close()
    return [LatencyRow(graph.name, threads, 1, runs, float(np.median(t)), float(np.percentile(t, 95)), before, after)
            for graph, t in zip(graphs, times)]


def profile_ops(graph: Path, runs: int = 50) -> OpTimes:
    """Where the time goes inside ``graph``: ONNX Runtime's profiler, 1 thread, batch 1."""
    import json
    import os
    from collections import Counter

    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.enable_profiling = True
    options.profile_file_prefix = str(BUNDLES / "int8" / "profile")
    session = ort.InferenceSession(str(graph), options, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).random((1, 3, 224, 224), dtype=np.float32)
    for _ in range(runs):
        session.run(None, {session.get_inputs()[0].name: x})
    path = session.end_profiling()
    events = json.loads(Path(path).read_text())
    os.remove(path)
    micros, count = Counter(), Counter()
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            micros[event["args"]["op_name"]] += event["dur"]
            count[event["args"]["op_name"]] += 1
    return OpTimes(graph.name, runs, {op: us / runs / 1e3 for op, us in micros.most_common()},
                   {op: n // runs for op, n in count.items()})


def _ablation(**changes):
    from dataclasses import replace

    from pcedge.export.int8_graph import RECIPES

    return replace(RECIPES["cpu"], **changes)


def variants(methods: list[str], n_images: int) -> list[tuple[str, str, object]]:
    """``(label "<graph> <calibration...>", file name, Int8Settings)`` of every graph measured: the symmetric
    (TensorRT) graph per method and with every convolution quantised, the CPU graph per method, and the CPU
    graph's two ablations (the default method)."""
    from pcedge.export.int8_graph import DEFAULT_CALIBRATION, Int8Settings

    d = DEFAULT_CALIBRATION
    rows = [(f"int8 {m}", f"model_int8_{m}.onnx", Int8Settings(calibration=m, n_images=n_images)) for m in methods]
    rows.append((f"int8 {d}, all convs", f"model_int8_{d}_all_convs.onnx",
                 Int8Settings(calibration=d, n_images=n_images, keep_float_convs=False)))
    rows += [(f"int8_cpu {m}", f"model_int8_cpu_{m}.onnx", Int8Settings(calibration=m, n_images=n_images, target="cpu"))
             for m in methods if m != "entropy"]  # entropy: not measured for the CPU graph, to keep the run short
    rows.append((f"int8_cpu {d}, ReLU6 as Clip", f"model_int8_cpu_{d}_clip.onnx",
                 Int8Settings(calibration=d, n_images=n_images, target="cpu",
                              recipe_override=_ablation(ops=("Conv", "Add"), description="U8S8, Clip kept"))))
    rows.append((f"int8_cpu {d}, per-tensor weights", f"model_int8_cpu_{d}_per_tensor.onnx",
                 Int8Settings(calibration=d, n_images=n_images, target="cpu",
                              recipe_override=_ablation(per_channel=False, description="U8S8, per-tensor weights"))))
    return rows


def bench_dataset(report: Report, name: str, data: Path, category_root: Path, fresh: bool, threads: int,
                  accuracy: bool = True) -> Path:
    """Every variant's graph of ``name`` under results/bundles/int8/<name>/, and (``accuracy``) its test-split
    figures against float32 into ``report``."""
    from pcedge.export.fit import ExportConfig
    from pcedge.export.int8_graph import Int8Settings, write_int8_graph
    from pcedge.runtime.bundle import open_bundle
    from pcedge.runtime.evaluation.dataset import load_category

    cached = cached_bundle(name, data, fresh=fresh)
    bundle = open_bundle(cached.path)
    m = bundle.manifest
    report.gate[name] = m.model.int8
    report.gate_cpu[name] = m.model.int8_cpu
    defaults = ExportConfig(data=data, output=cached.path)
    if accuracy:
        category = load_category(category_root)
        log(f"{name}: float32 graph on {len(category.test)} test images")
        fp32 = evaluate(cached.path, bundle.model_path, "fp32", category, threads)
        labels = np.array([r.is_anomalous for r in fp32.records])
        s32 = np.array([r.score for r in fp32.records])
        report.accuracy.append(AccuracyRow(name, "fp32", None, fp32.metrics.image_auroc, fp32.metrics.pixel_auroc,
                                           fp32.metrics.aupro, n_test=len(labels)))
    images = calibration_images(m, data, defaults.int8_images, defaults.seed)
    folder = BUNDLES / "int8" / name
    folder.mkdir(parents=True, exist_ok=True)
    for label, file, settings in variants(report.methods, images.shape[0]):
        graph = folder / file
        start = time.perf_counter()
        write_int8_graph(bundle.model_path, graph, images, settings)
        seconds = time.perf_counter() - start
        log(f"{name}: {label} (quantised in {seconds:.0f}s)")
        if not accuracy:
            continue
        scored = evaluate(cached.path, graph, "int8", category, threads)
        s8 = np.array([r.score for r in scored.records])
        delta, ci = paired_auroc_delta(labels, s8, s32)
        rel = np.abs(s8 - s32) / np.maximum(np.abs(s32), 1e-30)
        graph_kind, calibration = label.split(" ", 1)
        report.accuracy.append(AccuracyRow(
            name, graph_kind, calibration, scored.metrics.image_auroc, scored.metrics.pixel_auroc, scored.metrics.aupro,
            image_auroc_delta=delta, image_auroc_delta_ci=ci,
            pixel_auroc_delta=scored.metrics.pixel_auroc - fp32.metrics.pixel_auroc,
            aupro_delta=scored.metrics.aupro - fp32.metrics.aupro,
            good_score_rel_median=float(np.median(rel[~labels])), good_score_rel_max=float(np.max(rel[~labels])),
            quantise_seconds=seconds, n_test=len(labels)))
    return folder


# ------------------------------------------------------------------------------ --default: INT8 as the CPU default
@dataclass
class DefaultRow:
    """One graph of one dataset through the detector, judged at the threshold the detector applies."""

    dataset: str
    graph: str  # the file that ran: model.onnx (--precision fp32) or model_int8_cpu.onnx (the default)
    threshold: float
    threshold_source: str  # whose threshold (ActiveThreshold.note)
    expected_fpr: float | None  # the manifest's estimate at that threshold (from the calibration scores)
    image_auroc: float
    pixel_auroc: float
    aupro: float
    false_alarm_rate: float  # test/good images above the threshold
    n_good: int
    detection_rate: float  # defective test images above the threshold
    n_defective: int
    # These scores judged by the *float32* threshold (INT8 row only): what sharing one threshold would do.
    false_alarm_rate_at_fp32_threshold: float | None = None
    detection_rate_at_fp32_threshold: float | None = None
    image_auroc_delta_ci: list[float] | None = None  # INT8 row: int8 - fp32, paired bootstrap 95 %
    ms_per_image: float = 0.0


@dataclass
class DefaultReport:
    machine: object
    rows: list[DefaultRow] = field(default_factory=list)
    export_seconds: dict[str, dict[str, float]] = field(default_factory=dict)  # dataset -> the export's stages
    export_loadavg: dict[str, list[float]] = field(default_factory=dict)  # dataset -> load average before export
    loadavg_start: list[float] = field(default_factory=list)
    loadavg_end: list[float] = field(default_factory=list)
    seconds: float = 0.0


def default_rows(name: str, bundle_path: Path, category_root: Path, threads: int) -> list[DefaultRow]:
    """The ort-cpu default (INT8 CPU graph, its threshold) and --precision fp32 over ``category_root``'s test split."""
    from pcedge.runtime.detector import Detector, DetectorOptions
    from pcedge.runtime.evaluation.dataset import load_category

    category = load_category(category_root)
    rows, scored = [], {}
    for precision in (None, "fp32"):
        options = DetectorOptions(backend="ort-cpu", index="exact", threads=threads, precision=precision)
        with Detector.open(bundle_path, options) as detector:
            graph = detector.backend.graph.name
            log(f"{name}: {graph} at threshold {detector.threshold:.4f} on {len(category.test)} test images")
            result = score_detector(detector, category)
            spec = detector.active_threshold.spec
            labels = np.array([r.is_anomalous for r in result.records])
            scores = np.array([r.score for r in result.records])
            flagged = scores > detector.threshold
            scored[precision] = scores
            rows.append(DefaultRow(
                name, graph, detector.threshold, detector.active_threshold.note, spec.expected_fpr,
                result.metrics.image_auroc, result.metrics.pixel_auroc, result.metrics.aupro,
                float(flagged[~labels].mean()), int((~labels).sum()), float(flagged[labels].mean()), int(labels.sum()),
                ms_per_image=result.ms_per_image))
    int8, fp32 = rows
    shared = scored[None] > fp32.threshold
    int8.false_alarm_rate_at_fp32_threshold = float(shared[~labels].mean())
    int8.detection_rate_at_fp32_threshold = float(shared[labels].mean())
    _, int8.image_auroc_delta_ci = paired_auroc_delta(labels, scored[None], scored["fp32"])
    return rows


def default_markdown(report: DefaultReport) -> str:
    lines = [
        "# ONNX Runtime CPU default: the INT8 CPU graph at its own threshold, against float32",
        "",
        "`python benchmarks/bench_int8.py --default` — each dataset exported with the defaults (out-of-fold "
        "threshold, FPR target 1 %), then the detector (ort-cpu, exact index, 2 threads) over the whole test split: "
        "the default (model_int8_cpu.onnx at its own threshold) and `--precision fp32` (model.onnx at the float32 "
        f"threshold). Load average {report.loadavg_start} at the start, {report.loadavg_end} at the end "
        f"({report.seconds / 60:.0f} min).",
        "",
        "| dataset | graph (threshold) | threshold | expected FPR (calibration) | image AUROC | pixel AUROC | AUPRO | "
        "false alarms on test/good | defective flagged | INT8 scores at the float32 threshold: false alarms / flagged |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report.rows:
        shared = (f"{r.false_alarm_rate_at_fp32_threshold:.1%} / {r.detection_rate_at_fp32_threshold:.1%}"
                  if r.false_alarm_rate_at_fp32_threshold is not None else "–")
        expected = f"{r.expected_fpr:.2%}" if r.expected_fpr is not None else "–"
        ci = (f" (Δ 95 % CI {r.image_auroc_delta_ci[0]:+.3f}, {r.image_auroc_delta_ci[1]:+.3f})"
              if r.image_auroc_delta_ci else "")
        lines.append(f"| {r.dataset} | {r.graph} ({r.threshold_source}) | {r.threshold:.4f} | {expected} | "
                     f"{r.image_auroc:.4f}{ci} | {r.pixel_auroc:.4f} | {r.aupro:.4f} | {r.false_alarm_rate:.1%} of {r.n_good} | "
                     f"{r.detection_rate:.1%} of {r.n_defective} | {shared} |")
    lines += ["", "## Export time the INT8 thresholds add", "",
              "Out-of-fold: every training image through both INT8 graphs (ONNX Runtime CPU) and scored against its "
              "fold bank (`int8_out_of_fold`), beside the whole export:", ""]
    for name, seconds in report.export_seconds.items():
        total = sum(seconds.values())
        added = seconds.get("int8_out_of_fold", seconds.get("int8_held_out", 0.0))
        lines.append(f"- **{name}**: {added:.1f} s of {total:.1f} s ({added / total:.1%}); stages: "
                     + ", ".join(f"{k} {v:.1f}" for k, v in seconds.items())
                     + f"; load average before the export {report.export_loadavg.get(name)}")
    return "\n".join(lines) + "\n"


def main_default(args) -> int:
    """``--default``: see the module docstring. Exports (or reuses) each dataset's default bundle."""
    import json

    from pcedge.runtime.bundle import open_bundle

    started = time.perf_counter()
    report = DefaultReport(machine=machine_info(), loadavg_start=load_average())
    datasets = [("bsdata", BSDATA, BSDATA), ("deeppcb", subset_folder(DEEPPCB, args.pcb_train), DEEPPCB)]
    for name, data, category_root in datasets:
        if args.only not in (None, name):
            continue
        cached = cached_bundle(name, data, fresh=args.fresh)
        if open_bundle(cached.path).manifest.model.int8_cpu.threshold is None:  # exported before INT8 thresholds
            cached = cached_bundle(name, data, fresh=True)
        record = json.loads((BUNDLES / f"{name}.json").read_text())
        report.export_seconds[name] = record["export_seconds"]
        report.export_loadavg[name] = record.get("loadavg_before")
        report.rows += default_rows(name, cached.path, category_root, args.threads)
        write_json(args.out, report)  # partial results survive an interrupted run
    report.loadavg_end = load_average()
    report.seconds = time.perf_counter() - started
    write_json(args.out, report)
    write_text_atomic(args.out.with_suffix(".md"), default_markdown(report))
    print(default_markdown(report))
    print(f"wrote {args.out} and {args.out.with_suffix('.md')}")
    return 0


def _f(value, fmt: str = ".4f") -> str:
    return "–" if value is None else format(value, fmt)


def markdown(report: Report) -> str:
    lines = [
        "# INT8 (QDQ) graph against float32",
        "",
        f"Default calibration: **{report.default_calibration}**; gate tolerance {report.tolerance:.0%} (median relative "
        "image-score change on good images). ONNX Runtime CPU, exact index, the same bank and threshold for every graph. "
        f"Load average {report.loadavg_start} at the start, {report.loadavg_end} at the end "
        f"({report.seconds / 60:.0f} min).",
        "",
        "## Accuracy on the test split",
        "",
        "| dataset | graph | calibration | image AUROC | Δ (95 % CI) | pixel AUROC | Δ | AUPRO | Δ | good-image score change median / max |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report.accuracy:
        ci = f" ({r.image_auroc_delta_ci[0]:+.3f}, {r.image_auroc_delta_ci[1]:+.3f})" if r.image_auroc_delta_ci else ""
        change = (f"{r.good_score_rel_median:.2%} / {r.good_score_rel_max:.2%}"
                  if r.good_score_rel_median is not None else "–")
        lines.append(f"| {r.dataset} ({r.n_test}) | {r.graph} | {r.calibration or '–'} | {r.image_auroc:.4f} | "
                     f"{_f(r.image_auroc_delta, '+.4f')}{ci} | {r.pixel_auroc:.4f} | {_f(r.pixel_auroc_delta, '+.4f')} | "
                     f"{r.aupro:.4f} | {_f(r.aupro_delta, '+.4f')} | {change} |")
    lines += ["", "## The export's gates (default settings)", ""]
    for title, gates in (("model_int8.onnx (TensorRT, ORT CUDA)", report.gate),
                         ("model_int8_cpu.onnx (ORT CPU)", report.gate_cpu)):
        for name, gate in gates.items():
            lines.append(f"- **{name}**, {title}: " + (gate.summary() if gate is not None else "no report in the bundle"))
    lines += ["", f"## Backbone graph latency, ONNX Runtime CPU, batch 1 ({report.latency_bundle})", "",
              "The graphs are called in turn (interleaved), so each row of one thread count saw the same load.", "",
              "| graph | threads | runs | median ms | p95 ms | load average before → after |", "|---|---|---|---|---|---|"]
    for r in report.latency:
        lines.append(f"| {r.graph} | {r.threads} | {r.runs} | {r.median_ms:.2f} | {r.p95_ms:.2f} | "
                     f"{r.loadavg_before} → {r.loadavg_after} |")
    lines += ["", "ONNX Runtime's profiler, 1 thread, kernel ms per run by op type (node count after its graph "
              "optimisations):", ""]
    for ops in report.op_times:
        top = ", ".join(f"{op} {ms:.2f} ({ops.nodes_per_op[op]})" for op, ms in list(ops.ms_per_op.items())[:7])
        lines.append(f"- {ops.graph}: total {sum(ops.ms_per_op.values()):.2f} ms: {top}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    from pcedge.export.int8_gate import DEFAULT_TOLERANCE
    from pcedge.export.int8_graph import CALIBRATIONS, DEFAULT_CALIBRATION

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fresh", action="store_true", help="export the bundles again (after changing the exporter)")
    parser.add_argument("--methods", default=",".join(CALIBRATIONS), help="comma list of calibration methods")
    parser.add_argument("--runs", type=int, default=300, help="timed batch-1 calls per graph and thread count")
    parser.add_argument("--threads", type=int, default=2, help="threads for the accuracy runs")
    parser.add_argument("--pcb-train", type=int, default=200, help="DeepPCB training subset size (seeded)")
    parser.add_argument("--only", choices=("bsdata", "deeppcb"), default=None, help="one dataset only")
    parser.add_argument("--latency-only", action="store_true",
                        help="write the graphs and time them, no accuracy runs (default --out results/int8_latency.json)")
    parser.add_argument("--default", action="store_true",
                        help="the ort-cpu default (INT8 CPU graph, own threshold) against --precision fp32 "
                             "(default --out results/int8_default.json)")
    parser.add_argument("--out", type=Path, default=None, help="default results/int8.json")
    args = parser.parse_args(argv)
    if args.default:
        args.out = args.out or RESULTS / "int8_default.json"
        return main_default(args)
    args.out = args.out or RESULTS / ("int8_latency.json" if args.latency_only else "int8.json")
    methods = [m for m in args.methods.split(",") if m]
    unknown = sorted(set(methods) - set(CALIBRATIONS))
    if unknown:
        parser.error(f"--methods: unknown {unknown}; choose from {', '.join(CALIBRATIONS)}")
    started = time.perf_counter()
    report = Report(machine=machine_info(), methods=methods, default_calibration=DEFAULT_CALIBRATION,
                    tolerance=DEFAULT_TOLERANCE, loadavg_start=load_average())
    datasets = [("bsdata", BSDATA, BSDATA), ("deeppcb", subset_folder(DEEPPCB, args.pcb_train), DEEPPCB)]
    folders = {}
    for name, data, category in datasets:
        if args.only in (None, name):
            folders[name] = bench_dataset(report, name, data, category, args.fresh, args.threads,
                                          accuracy=not args.latency_only)
            write_json(args.out, report)  # partial results survive an interrupted run
    name = "bsdata" if "bsdata" in folders else next(iter(folders))
    from pcedge.runtime.bundle import open_bundle

    bundle = open_bundle(BUNDLES / f"{name}.pcedge")
    default_graph = folders[name] / f"model_int8_{DEFAULT_CALIBRATION}.onnx"
    if not default_graph.is_file():  # the default method was not in --methods: the bundle's own graph
        default_graph = bundle.int8_model_path or default_graph
    fp32_copy = folders[name] / "model.onnx"
    shutil.copyfile(bundle.model_path, fp32_copy)
    report.latency_bundle = f"{name}, {bundle.manifest.model.backbone} {bundle.manifest.input.geometry.width}x" \
                            f"{bundle.manifest.input.geometry.height}"
    d = DEFAULT_CALIBRATION
    timed = [fp32_copy, default_graph] + [folders[name] / f for f in (
        f"model_int8_{d}_all_convs.onnx", f"model_int8_cpu_{d}.onnx", f"model_int8_cpu_{d}_clip.onnx",
        f"model_int8_cpu_{d}_per_tensor.onnx")]
    timed = [g for g in timed if g.is_file()]
    for threads in (1, 2):
        log(f"timing {len(timed)} graphs, interleaved, at {threads} thread(s)")
        report.latency += time_graphs(timed, threads, args.runs)
    report.op_times = [profile_ops(graph) for graph in timed]
    report.loadavg_end = load_average()
    report.seconds = time.perf_counter() - started
    write_json(args.out, report)
    write_text_atomic(args.out.with_suffix(".md"), markdown(report))
    print(markdown(report))
    print(f"wrote {args.out} and {args.out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
