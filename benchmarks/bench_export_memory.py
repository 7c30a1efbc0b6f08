"""Export memory: the estimate ``pcedge export`` checks before fitting (export/memory.py), against the peak
resident memory a real export reaches.

For each input size, two fresh processes (so one run's allocator state cannot flatter the next):

- *baseline*: imports torch, builds the backbone and the patch embedder at that size, and reports its peak
  resident set (VmHWM) -- what exists before the first image is read;
- *export*: the full export (the same code as ``pcedge export``) on the same data, reporting its estimate
  and its own VmHWM.

The data-dependent peak is ``export VmHWM - baseline VmHWM``; it also contains what the estimate does not
try to model (the ONNX export, an ONNX Runtime session, the HNSW index), so the ratio estimate / measured
says how conservative the refusal is. Writes ``results/export_memory.json``.

    python benchmarks/bench_export_memory.py --sizes 224,448
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS, ROOT, load_average, log, machine_info, write_json  # noqa: E402

from pcedge.runtime.evaluation.machine import MachineInfo  # noqa: E402

FIXTURE = ROOT / "fixtures" / "ball_screw_drive"

_BASELINE = """
import json, sys, torch
from pcedge.export.backbones import build_backbone
from pcedge.export.embedder import PatchEmbedder
torch.set_num_threads(1)
size = int(sys.argv[1])
embedder = PatchEmbedder(build_backbone("efficientnet_lite0", input_hw=(size, size))).eval()
status = open("/proc/self/status").read().splitlines()
print(json.dumps({k: int(l.split()[1]) * 1024 for l in status for k in ("VmHWM", "VmRSS") if l.startswith(k + ":")}))
"""

_EXPORT = """
import json, sys, time
from pathlib import Path
from pcedge.export.fit import ExportConfig, export_bundle
from pcedge.export import fit
from pcedge.runtime.bundle import Geometry
estimates = []
original = fit.estimate_export_memory
def recording(*args, **kwargs):
    estimate = original(*args, **kwargs)
    estimates.append(estimate)
    return estimate
fit.estimate_export_memory = recording
size, batch, data, out = int(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4])
t = time.perf_counter()
report = export_bundle(ExportConfig(data=data, output=out, geometry=Geometry(height=size, width=size),
                                    batch_size=batch, threads=1, progress=False))
seconds = time.perf_counter() - t
status = open("/proc/self/status").read().splitlines()
hwm = next(int(l.split()[1]) * 1024 for l in status if l.startswith("VmHWM:"))
e = estimates[0]
print(json.dumps({"peak_rss_bytes": hwm, "seconds": seconds, "n_train_images": report.n_train_images,
                  "n_val_images": report.n_val_images, "estimate": {
                      "total_bytes": e.total_bytes, "bank_bytes": e.bank_bytes, "bank_peak_bytes": e.bank_peak_bytes,
                      "activation_bytes": e.activation_bytes, "input_bytes": e.input_bytes,
                      "threshold_bytes": e.threshold_bytes, "available_bytes": e.available_bytes,
                      "n_features": e.n_features, "dim": e.dim}}))
"""


@dataclass
class SizeResult:
    size: int
    batch: int
    baseline_peak_rss_bytes: int  # torch + backbone + embedder built, no image read
    export_peak_rss_bytes: int
    measured_data_peak_bytes: int  # export - baseline
    estimate: dict
    estimate_over_measured: float
    export_seconds: float
    n_train_images: int
    n_val_images: int
    loadavg: list[float]


@dataclass
class Report:
    data: str
    note: str
    machine: MachineInfo
    results: list[SizeResult] = field(default_factory=list)
    loadavg_end: list[float] = field(default_factory=list)


def _child(script: str, *args: str) -> dict:
    done = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=3600)
    if done.returncode != 0:
        raise RuntimeError(f"child failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=FIXTURE)
    parser.add_argument("--sizes", default="224,448")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--out", type=Path, default=RESULTS / "export_memory.json")
    args = parser.parse_args(argv)
    report = Report(
        data=str(args.data), machine=machine_info(),
        note="estimate = export/memory.py's MemoryEstimate.total_bytes; measured = VmHWM(export) - VmHWM(baseline "
             "with torch, backbone and embedder built); the measured figure also holds the ONNX export, the ONNX "
             "Runtime session and the HNSW index, which the estimate does not model",
    )
    for size in (int(s) for s in args.sizes.split(",")):
        log(f"size {size}: baseline")
        base = _child(_BASELINE, str(size))
        log(f"size {size}: export (batch {args.batch}, 1 thread)")
        loadavg = load_average()
        with tempfile.TemporaryDirectory() as tmp:
            run = _child(_EXPORT, str(size), str(args.batch), str(args.data), str(Path(tmp) / "m.pcedge"))
        measured = run["peak_rss_bytes"] - base["VmHWM"]
        result = SizeResult(
            size=size, batch=args.batch, baseline_peak_rss_bytes=base["VmHWM"],
            export_peak_rss_bytes=run["peak_rss_bytes"], measured_data_peak_bytes=measured,
            estimate=run["estimate"], estimate_over_measured=run["estimate"]["total_bytes"] / max(measured, 1),
            export_seconds=run["seconds"], n_train_images=run["n_train_images"], n_val_images=run["n_val_images"],
            loadavg=loadavg,
        )
        report.results.append(result)
        log(f"  estimate {result.estimate['total_bytes'] / 1e6:.0f} MB, measured {measured / 1e6:.0f} MB "
            f"(ratio {result.estimate_over_measured:.2f}), export {run['seconds']:.0f} s")
        time.sleep(1)
    report.loadavg_end = load_average()
    write_json(args.out, report)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
