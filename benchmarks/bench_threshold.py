"""The calibrated threshold before and after out-of-fold calibration, on both shared categories.

Before (pcedge 0.1): 10 % of the training images held out (seeded), the threshold from their scores (a
Gaussian tail when fewer than 1 / FPR), the memory bank built from the other 90 %. After (the default
now): the bank holds every training image and the threshold comes from the 5-fold out-of-fold scores of
all of them. Both at pcedge's other defaults (EfficientNet-Lite0, 224 px stretch, 1 % coreset, border
zero, target FPR 1 %); DeepPCB from the same 200-image training subset as ``bench_border.py``. Reports precision, recall, F1 and the false-alarm rate on the test images at
each bundle's threshold, beside the manifest's estimated false-alarm rate and its 95 % interval.

The 5-fold bundles are the ``zero`` bundles of ``bench_border.py`` (same settings, cached under
results/bundles/); run that first or they are exported here.

Writes ``results/threshold.json`` and ``results/threshold.md``.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_border import train_folder  # noqa: E402
from common import BSDATA, DEEPPCB, RESULTS, cached_bundle, load_average, machine_info, score_category, write_json  # noqa: E402

from pcedge.export.calibration import calibrate_threshold  # noqa: E402
from pcedge.runtime.bundle import Geometry  # noqa: E402
from pcedge.runtime.evaluation.metrics import precision_recall_f1  # noqa: E402
from pcedge.runtime.evaluation.dataset import load_category  # noqa: E402
from pcedge.runtime.files import write_text_atomic  # noqa: E402

CATEGORIES = {"bsdata": BSDATA, "deeppcb": DEEPPCB}


@dataclass
class ThresholdRow:
    category: str
    calibration: str  # "held-out 10 %" or "5-fold out-of-fold" (at --fpr target_fpr)
    target_fpr: float
    bank_images: int
    calibration_images: int
    method: str
    threshold: float
    expected_fpr: float | None
    fpr_interval: list[float] | None
    image_auroc: float
    precision: float
    recall: float
    f1: float
    test_false_alarm_rate: float  # good test images flagged
    n_good: int
    n_anomalous: int
    loadavg_after: list[float]


@dataclass
class ThresholdBenchmark:
    settings: str
    machine: object
    loadavg_start: list[float]
    rows: list[ThresholdRow] = field(default_factory=list)
    loadavg_end: list[float] | None = None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--categories", nargs="+", choices=sorted(CATEGORIES), default=["bsdata", "deeppcb"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--more-fpr", type=float, nargs="*", default=[0.02, 0.05],
                        help="further --fpr targets evaluated on the out-of-fold bundle's stored scores")
    parser.add_argument("--pcb-train", type=int, default=200, help="DeepPCB training images (seeded subset, as bench_border)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    bench = ThresholdBenchmark(settings="efficientnet_lite0, stretch 224, coreset 1 %, border zero, target FPR 1 %, "
                                        "exact index, ONNX Runtime CPU", machine=machine_info(), loadavg_start=load_average())
    geometry = Geometry(height=224, width=224)
    for name in args.categories:
        data = CATEGORIES[name]
        category = load_category(data, require_train=True)
        train = train_folder(name, args.pcb_train)
        variants = (("held-out 10 %", f"threshold_{name}_holdout_224", {"folds": 0}),
                    ("5-fold out-of-fold", f"border_{name}_zero_224", {}))
        for label, bundle_name, extra in variants:
            bundle = cached_bundle(bundle_name, train, border="zero", geometry=geometry, threads=args.threads, **extra)
            manifest = json.loads((bundle.path / "manifest.json").read_text())
            t = manifest["threshold"]
            print(f"[{name}] {label}: scoring {len(category.test)} test images", flush=True)
            scored = score_category(bundle.path, category, threads=args.threads)
            m = scored.metrics
            labels = np.array([r.is_anomalous for r in scored.records])
            flagged = np.array([bool(r.predicted_anomalous) for r in scored.records])
            bench.rows.append(ThresholdRow(
                category=name, calibration=label, target_fpr=t["target_fpr"],
                bank_images=manifest["memory_bank"]["n_train_images"],
                calibration_images=t["n_images"], method=t["method"], threshold=t["value"],
                expected_fpr=t.get("expected_fpr"), fpr_interval=t.get("fpr_interval"), image_auroc=m.image_auroc,
                precision=m.at_threshold.precision, recall=m.at_threshold.recall, f1=m.at_threshold.f1,
                test_false_alarm_rate=float(flagged[~labels].mean()), n_good=m.n_good, n_anomalous=m.n_anomalous,
                loadavg_after=load_average()))
            r = bench.rows[-1]
            print(f"    P/R/F1 {r.precision:.3f}/{r.recall:.3f}/{r.f1:.3f}, good flagged {r.test_false_alarm_rate:.3f}",
                  flush=True)
            if extra:
                continue
            # Other --fpr targets on the same out-of-fold scores (the manifest keeps them) and the same test
            # scores: what `pcedge export --fpr X` would have set, without exporting again.
            scores = np.array([rec.score for rec in scored.records])
            for fpr in args.more_fpr:
                spec = calibrate_threshold(np.array(t["nominal_scores"]), fpr, t["source"], folds=t["folds"])
                predicted = scores > spec.value
                prf = precision_recall_f1(labels, predicted)
                bench.rows.append(ThresholdRow(
                    category=name, calibration=label, target_fpr=fpr, bank_images=r.bank_images,
                    calibration_images=spec.n_images, method=spec.method, threshold=spec.value,
                    expected_fpr=spec.expected_fpr, fpr_interval=spec.fpr_interval, image_auroc=m.image_auroc,
                    precision=prf.precision, recall=prf.recall, f1=prf.f1,
                    test_false_alarm_rate=float(predicted[~labels].mean()), n_good=m.n_good,
                    n_anomalous=m.n_anomalous, loadavg_after=load_average()))
            write_json(args.out / "threshold.json", bench)
    bench.loadavg_end = load_average()
    write_json(args.out / "threshold.json", bench)
    lines = [
        "# Threshold calibration: held-out images against out-of-fold scores",
        "",
        f"{bench.settings}. Load average at start {bench.loadavg_start}, at end {bench.loadavg_end}.",
        "",
        "| category | calibration | --fpr | bank images | calibration scores | threshold | estimated FPR (95 % interval) | "
        "test: good flagged | precision | recall | F1 | image AUROC |",
        "|---|---|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in bench.rows:
        est = "-" if r.expected_fpr is None else (
            f"{100 * r.expected_fpr:.1f} % ({100 * r.fpr_interval[0]:.1f}-{100 * r.fpr_interval[1]:.1f})")
        lines.append(f"| {r.category} | {r.calibration} | {100 * r.target_fpr:g} % | {r.bank_images} | {r.calibration_images} | {r.threshold:.3f} | "
                     f"{est} | {100 * r.test_false_alarm_rate:.1f} % of {r.n_good} | {100 * r.precision:.1f} | "
                     f"{100 * r.recall:.1f} | {100 * r.f1:.1f} | {100 * r.image_auroc:.1f} |")
    lines += ["", *[f"- {r.category}, {r.calibration}, --fpr {r.target_fpr:g}: {r.method}" for r in bench.rows], ""]
    text = "\n".join(lines)
    write_text_atomic(args.out / "threshold.md", text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
