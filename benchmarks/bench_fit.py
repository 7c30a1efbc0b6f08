"""Fit time and memory of ``pcedge export`` (default settings) on the shared datasets.

Per dataset: the exporter's phases (memory bank = backbone over the training images, coreset, ONNX
export with its parity check, HNSW index, threshold) in seconds and per training image, the total wall
time, and peak memory: the process's peak resident set (``ru_maxrss``: everything, torch included) and
the peak of memory traced by ``tracemalloc`` (numpy arrays and Python objects; torch tensors and ONNX
Runtime buffers are not traced).

Each dataset is exported twice, each time in a fresh Python process (so each peak belongs to one export
alone, and one-time costs such as the ONNX exporter's first trace are counted as a user meets them):
once timed, with ``ru_maxrss``, and once under ``tracemalloc`` for the traced peak only. tracemalloc
slows Python-heavy phases several-fold (the ONNX export traces the model in Python), so the two are never
mixed; the traced run's wall time is kept in the JSON for transparency.

    python benchmarks/bench_fit.py                               # bsdata (150) and deeppcb (1000)
    python benchmarks/bench_fit.py --datasets bsdata --out results/fit_bsdata.json
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import tracemalloc
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import BSDATA, DEEPPCB, RESULTS, MachineInfo, load_average, log, machine_info, subset_folder, write_json  # noqa: E402

DATASETS = {"bsdata": BSDATA, "deeppcb": DEEPPCB}


@dataclass
class FitResult:
    dataset: str
    data: str
    images_given: int  # good images in the folder (training + held out)
    train_images: int  # used for the memory bank
    val_images: int  # held out for the threshold
    features: int  # patch features before the coreset
    bank_rows: int  # after the coreset
    dim: int
    coreset: float
    threads: int | None
    seconds: dict[str, float]  # the exporter's phases
    total_seconds: float  # wall time of export_bundle
    per_train_image_ms: dict[str, float]  # seconds / train_images, per phase and "total"
    peak_rss_mib: float  # ru_maxrss of the timed exporting process
    tracemalloc_peak_mib: float | None  # numpy arrays + Python objects (not torch tensors), from the traced run
    traced_run_seconds: float | None  # wall time of the traced run (slowed by tracemalloc; not a fit time)
    bank_mib_before_coreset: float  # features x dim x 4 bytes: the largest single array
    loadavg_before: list[float]
    loadavg_after: list[float]


@dataclass
class FitReport:
    machine: MachineInfo
    results: list[FitResult] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def child(dataset: str, data: Path, subset: int | None, threads: int | None, out: Path, trace: bool) -> int:
    """Export once in this process and write one :class:`FitResult` as JSON to ``out`` (``trace``: under tracemalloc)."""
    if trace:
        tracemalloc.start()
    from pcedge.export.fit import DEFAULT_CORESET, ExportConfig, export_bundle
    from pcedge.runtime.preprocess import list_images

    folder = subset_folder(data, subset) if subset else data
    n_given = len(list_images(folder / "train" / "good" if (folder / "train" / "good").is_dir() else folder))
    if trace:
        tracemalloc.reset_peak()  # the imports' Python objects are not the fit's memory
    before = load_average()
    tmp = Path(tempfile.mkdtemp(prefix="bench_fit_"))
    try:
        started = time.perf_counter()
        report = export_bundle(ExportConfig(data=folder, output=tmp / f"{dataset}.pcedge", threads=threads,
                                            progress=False))
        total = time.perf_counter() - started
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    traced_peak = tracemalloc.get_traced_memory()[1] / 2**20 if trace else None
    bank = report.manifest.memory_bank
    n = report.n_train_images
    per_image = {k: 1e3 * v / n for k, v in report.seconds.items()}
    per_image["total"] = 1e3 * total / n
    result = FitResult(
        dataset=dataset, data=str(folder), images_given=n_given, train_images=n, val_images=report.n_val_images,
        features=bank.n_features_total, bank_rows=bank.n, dim=bank.dim, coreset=DEFAULT_CORESET, threads=threads,
        seconds=report.seconds, total_seconds=total, per_train_image_ms=per_image,
        peak_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # Linux reports KiB
        tracemalloc_peak_mib=traced_peak, traced_run_seconds=total if trace else None, bank_mib_before_coreset=bank.n_features_total * bank.dim * 4 / 2**20,
        loadavg_before=before, loadavg_after=load_average(),
    )
    write_json(out, result)
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", choices=sorted(DATASETS), default=["bsdata", "deeppcb"])
    parser.add_argument("--deeppcb-images", type=int, default=None,
                        help="use a seeded subset of deeppcb's 1000 good training images (default: all)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: all)")
    parser.add_argument("--out", type=Path, default=RESULTS / "fit.json")
    parser.add_argument("--child", nargs=5, metavar=("DATASET", "DATA", "SUBSET", "OUT", "TRACE"), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def run_child(dataset: str, subset: int, threads: int | None, trace: bool) -> FitResult | None:
    """One export of ``dataset`` in a fresh process; None if it failed."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "fit.json"
        command = [sys.executable, __file__, "--child", dataset, str(DATASETS[dataset]), str(subset), str(out),
                   "trace" if trace else "time"]
        if threads:
            command += ["--threads", str(threads)]
        log(f"fitting {dataset}{f' ({subset} images)' if subset else ''} in a fresh process"
            f"{' under tracemalloc' if trace else ''}")
        if subprocess.run(command).returncode != 0:
            return None
        return FitResult(**json.loads(out.read_text()))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        dataset, data, subset, out, trace = args.child
        return child(dataset, Path(data), int(subset) or None, args.threads, Path(out), trace == "trace")
    report = FitReport(machine=machine_info())
    for dataset in args.datasets:
        subset = args.deeppcb_images if dataset == "deeppcb" and args.deeppcb_images else 0
        timed = run_child(dataset, subset, args.threads, trace=False)
        traced = run_child(dataset, subset, args.threads, trace=True) if timed is not None else None
        if timed is None or traced is None:
            report.notes.append(f"{dataset}: the export failed; see stderr")
            continue
        timed.tracemalloc_peak_mib = traced.tracemalloc_peak_mib
        timed.traced_run_seconds = traced.traced_run_seconds
        report.results.append(timed)
        log(f"{dataset}: {timed.train_images} training images, total {timed.total_seconds:.1f} s "
            f"({timed.per_train_image_ms['total']:.0f} ms/image), peak RSS {timed.peak_rss_mib:.0f} MiB, "
            f"traced peak {timed.tracemalloc_peak_mib:.0f} MiB")
        write_json(args.out, report)
    report.machine.loadavg_end = load_average()
    write_json(args.out, report)
    print(f"{'dataset':8s} {'train':>5s} {'bank':>7s} " + " ".join(f"{k:>12s}" for k in ("memory_bank", "coreset", "onnx", "total"))
          + "  (ms per training image)   peak RSS   traced")
    for r in report.results:
        p = r.per_train_image_ms
        print(f"{r.dataset:8s} {r.train_images:5d} {r.bank_rows:7d} "
              + " ".join(f"{p.get(k, float('nan')):12.1f}" for k in ("memory_bank", "coreset", "onnx", "total"))
              + f"   {r.peak_rss_mib:8.0f} MiB {r.tracemalloc_peak_mib:6.0f} MiB")
    for note in report.notes:
        print(note)
    print(f"wrote {args.out}")
    return 0 if report.results else 1


if __name__ == "__main__":
    sys.exit(main())
