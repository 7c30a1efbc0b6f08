"""INT8 against float32 on the shared categories: accuracy per calibration method, parity, ORT CPU latency.

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
  the evidence for leaving those float;
- time the backbone graph alone on ONNX Runtime CPU, float32 against the default INT8 graph (and the
  all-convolutions one), batch 1,
  ``--runs`` timed calls after a warm-up, with the runtime's session options, at 1 thread and at all cores;
  the load average before and after is recorded (this machine is shared: re-run on a quiet one).

Writes ``results/int8.json`` and ``results/int8.md``.

    python benchmarks/bench_int8.py [--fresh] [--runs 300] [--methods minmax,entropy,percentile]
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
    graph: str  # "fp32" or "int8"
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
    gate: dict[str, object] = field(default_factory=dict)  # dataset -> the bundle's Int8Report
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


def time_graph(graph: Path, threads: int, runs: int, warmup: int = 20) -> LatencyRow:
    """Median and p95 of ``runs`` batch-1 calls of ``graph`` on ONNX Runtime CPU (the runtime's options)."""
    from pcedge.runtime.backends import OrtBackend

    backend = OrtBackend(graph, "ort-cpu", threads)
    x = np.random.default_rng(0).random((1, 3, 224, 224), dtype=np.float32)
    for _ in range(warmup):
        backend(x)
    before = load_average()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        backend(x)
        times.append((time.perf_counter() - start) * 1e3)
    backend.close()
    return LatencyRow(graph.name, threads, 1, runs, float(np.median(times)), float(np.percentile(times, 95)),
                      before, load_average())


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


def bench_dataset(report: Report, name: str, data: Path, category_root: Path, fresh: bool, threads: int) -> Path:
    from pcedge.export.fit import ExportConfig
    from pcedge.export.int8_graph import Int8Settings, write_int8_graph
    from pcedge.runtime.bundle import open_bundle
    from pcedge.runtime.evaluation.dataset import load_category

    cached = cached_bundle(name, data, fresh=fresh)
    bundle = open_bundle(cached.path)
    m = bundle.manifest
    report.gate[name] = m.model.int8
    defaults = ExportConfig(data=data, output=cached.path)
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
    from pcedge.export.int8_graph import DEFAULT_CALIBRATION

    # Every method with the default placement (stem and depthwise convolutions float), and the default
    # method with every convolution quantised: the placement decision's evidence.
    variants = [(method, True) for method in report.methods] + [(DEFAULT_CALIBRATION, False)]
    for method, keep_float in variants:
        label = method if keep_float else f"{method}, all convs"
        graph = folder / (f"model_int8_{method}.onnx" if keep_float else f"model_int8_{method}_all_convs.onnx")
        start = time.perf_counter()
        write_int8_graph(bundle.model_path, graph, images, Int8Settings(calibration=method, n_images=images.shape[0],
                                                                        keep_float_convs=keep_float))
        seconds = time.perf_counter() - start
        log(f"{name}: int8 {label} (quantised in {seconds:.0f}s)")
        scored = evaluate(cached.path, graph, "int8", category, threads)
        s8 = np.array([r.score for r in scored.records])
        delta, ci = paired_auroc_delta(labels, s8, s32)
        rel = np.abs(s8 - s32) / np.maximum(np.abs(s32), 1e-30)
        report.accuracy.append(AccuracyRow(
            name, "int8", label, scored.metrics.image_auroc, scored.metrics.pixel_auroc, scored.metrics.aupro,
            image_auroc_delta=delta, image_auroc_delta_ci=ci,
            pixel_auroc_delta=scored.metrics.pixel_auroc - fp32.metrics.pixel_auroc,
            aupro_delta=scored.metrics.aupro - fp32.metrics.aupro,
            good_score_rel_median=float(np.median(rel[~labels])), good_score_rel_max=float(np.max(rel[~labels])),
            quantise_seconds=seconds, n_test=len(labels)))
    return folder


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
    lines += ["", "## The export's gate (default settings)", ""]
    for name, gate in report.gate.items():
        lines.append(f"- **{name}**: " + (gate.summary() if gate is not None else "no INT8 report in the bundle"))
    lines += ["", f"## Backbone graph latency, ONNX Runtime CPU, batch 1 ({report.latency_bundle})", "",
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
    parser.add_argument("--out", type=Path, default=RESULTS / "int8.json")
    args = parser.parse_args(argv)
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
            folders[name] = bench_dataset(report, name, data, category, args.fresh, args.threads)
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
    all_convs = folders[name] / f"model_int8_{DEFAULT_CALIBRATION}_all_convs.onnx"
    if default_graph.is_file():
        for threads in (1, 2):
            for graph in (fp32_copy, default_graph, all_convs):
                log(f"timing {graph.name} at {threads} thread(s)")
                report.latency.append(time_graph(graph, threads, args.runs))
        report.op_times = [profile_ops(graph) for graph in (fp32_copy, default_graph, all_convs)]
    report.loadavg_end = load_average()
    report.seconds = time.perf_counter() - started
    write_json(args.out, report)
    write_text_atomic(args.out.with_suffix(".md"), markdown(report))
    print(markdown(report))
    print(f"wrote {args.out} and {args.out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
