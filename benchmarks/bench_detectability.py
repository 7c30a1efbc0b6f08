"""What each input size can see: the exporter's synthetic-defect check on the shared categories.

``pcedge export`` pastes random-noise squares of 1, 2 and 4 % of the input's shorter side into good images
its memory bank has not seen and records how many are flagged at the calibrated threshold
(``export/detectability.py``). This collects that record for BSData and DeepPCB at 224 px (the
``bench_border.py`` "zero" bundles, i.e. pcedge's defaults) and DeepPCB at 640 px (its native resolution;
a seeded subset of ``--pcb-train-640`` training images, default 100, because one 640 px export costs about
8x a 224 px one).

Writes ``results/detectability.json`` and ``results/detectability.md``.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_border import train_folder  # noqa: E402
from common import DEEPPCB, RESULTS, cached_bundle, load_average, machine_info, subset_folder, write_json  # noqa: E402

from pcedge.runtime.bundle import Geometry  # noqa: E402
from pcedge.runtime.files import write_text_atomic  # noqa: E402


@dataclass
class DetectabilityRow:
    category: str
    size: int
    n_train: int
    side_fractions: list[float]
    pixels: list[float]
    flagged: list[float]
    flagged_without_defect: float
    n_images: int
    warning: str | None
    threshold_method: str


@dataclass
class DetectabilityBenchmark:
    machine: object
    loadavg_start: list[float]
    rows: list[DetectabilityRow] = field(default_factory=list)
    loadavg_end: list[float] | None = None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pcb-train", type=int, default=200, help="DeepPCB training images at 224 px (as bench_border)")
    parser.add_argument("--pcb-train-640", type=int, default=100)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    bench = DetectabilityBenchmark(machine=machine_info(), loadavg_start=load_average())
    runs = [("bsdata", 224, train_folder("bsdata", args.pcb_train), "border_bsdata_zero_224"),
            ("deeppcb", 224, train_folder("deeppcb", args.pcb_train), "border_deeppcb_zero_224"),
            ("deeppcb", 640, subset_folder(DEEPPCB, args.pcb_train_640), f"detect_deeppcb_640_{args.pcb_train_640}")]
    for name, size, train, bundle_name in runs:
        print(f"[{name} {size}px] bundle {bundle_name}", flush=True)
        bundle = cached_bundle(bundle_name, train, border="zero", geometry=Geometry(height=size, width=size),
                               threads=args.threads)
        manifest = json.loads((bundle.path / "manifest.json").read_text())
        d = manifest.get("detectability")
        if d is None:  # a cached bundle from before the check existed: export it again
            bundle = cached_bundle(bundle_name, train, fresh=True, border="zero",
                                   geometry=Geometry(height=size, width=size), threads=args.threads)
            manifest = json.loads((bundle.path / "manifest.json").read_text())
            d = manifest["detectability"]
        bench.rows.append(DetectabilityRow(
            category=name, size=size, n_train=manifest["memory_bank"]["n_train_images"],
            side_fractions=d["side_fractions"], pixels=d["pixels"], flagged=d["flagged"],
            flagged_without_defect=d["flagged_without_defect"], n_images=d["n_images"], warning=d["warning"],
            threshold_method=manifest["threshold"]["method"]))
        print(f"    flagged {d['flagged']} at {d['pixels']} px; warning: {d['warning']}", flush=True)
        write_json(args.out / "detectability.json", bench)
    bench.loadavg_end = load_average()
    write_json(args.out / "detectability.json", bench)
    lines = ["# Detectability: synthetic defects flagged at the calibrated threshold", "",
             f"Load average at start {bench.loadavg_start}, at end {bench.loadavg_end}.", "",
             "| category | input | train images | 1 % of side | 2 % | 4 % | no defect | export says |",
             "|---|---|---:|---:|---:|---:|---:|---|"]
    for r in bench.rows:
        cells = " | ".join(f"{100 * f:.0f} % ({p:.0f} px)" for f, p in zip(r.flagged, r.pixels))
        says = f"WARNING: {r.warning}" if r.warning else "no warning: the smallest size is seen"
        lines.append(f"| {r.category} | {r.size} px | {r.n_train} | {cells} | {100 * r.flagged_without_defect:.0f} % | {says} |")
    lines.append("")
    text = "\n".join(lines)
    write_text_atomic(args.out / "detectability.md", text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
