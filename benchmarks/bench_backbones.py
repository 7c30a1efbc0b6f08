"""Which backbone for which budget: accuracy and cost of the offline EfficientNet-Lites (and the ResNets
when their weights are given) on both shared categories.

Each backbone is exported at pcedge's defaults (224 px stretch, 1 % coreset, border zero, 5-fold threshold)
from BSData's 150 training images and the seeded 200-image DeepPCB subset of ``bench_border.py``, and
every test image is scored (ONNX Runtime CPU, exact index). Cost: the backbone graph's FLOPs per image
(counted from the ONNX graph: independent of machine load) and its median ONNX Runtime time at batch 1
over ``--repeats`` runs (2 threads, on this shared machine: read it with the recorded load average).

``resnet18`` and ``wide_resnet50_2`` need torchvision's ImageNet weights, which cannot be downloaded on a
machine without network: pass ``--weights-dir DIR`` holding ``resnet18.pth`` / ``wide_resnet50_2.pth``
(torchvision state dicts) to include them; without the files they are listed as not measured.

Writes ``results/backbones.json`` and ``results/backbones.md``.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_border import CATEGORIES, train_folder  # noqa: E402
from common import RESULTS, cached_bundle, load_average, machine_info, score_category, write_json  # noqa: E402

from pcedge.runtime.bundle import Geometry  # noqa: E402
from pcedge.runtime.evaluation.dataset import load_category  # noqa: E402
from pcedge.runtime.evaluation.flops import count_graph  # noqa: E402
from pcedge.runtime.files import write_text_atomic  # noqa: E402

BACKBONES = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2", "resnet18", "wide_resnet50_2")


@dataclass
class BackboneRow:
    backbone: str
    category: str
    dim: int
    image_auroc: float
    pixel_auroc: float
    aupro: float
    recall_at_threshold: float
    test_false_alarm_rate: float
    mflops_per_image: float
    backbone_ms_p50: float
    total_ms_per_image: float  # preprocess + backbone + index + scoring, from the evaluation run
    loadavg_after: list[float]


@dataclass
class BackboneBenchmark:
    settings: str
    machine: object
    loadavg_start: list[float]
    rows: list[BackboneRow] = field(default_factory=list)
    not_measured: list[str] = field(default_factory=list)
    loadavg_end: list[float] | None = None


def backbone_ms(model: Path, repeats: int, threads: int) -> float:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).random((1, 3, 224, 224), dtype=np.float32)
    session.run(None, {"images": x})
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        session.run(None, {"images": x})
        times.append((time.perf_counter() - t) * 1e3)
    return float(np.median(times))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbones", nargs="+", choices=BACKBONES, default=list(BACKBONES))
    parser.add_argument("--categories", nargs="+", choices=sorted(CATEGORIES), default=["bsdata", "deeppcb"])
    parser.add_argument("--weights-dir", type=Path, default=None, help="resnet18.pth / wide_resnet50_2.pth")
    parser.add_argument("--pcb-train", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    bench = BackboneBenchmark(settings="224 px stretch, coreset 1 %, border zero, 5-fold threshold, exact index, "
                                       f"ONNX Runtime CPU {args.threads} threads", machine=machine_info(),
                              loadavg_start=load_average())
    for backbone in args.backbones:
        weights = None
        if backbone in ("resnet18", "wide_resnet50_2"):
            weights = args.weights_dir / f"{backbone}.pth" if args.weights_dir else None
            if weights is None or not weights.is_file():
                bench.not_measured.append(f"{backbone}: no ImageNet weights file (torchvision cannot download them "
                                          f"offline; pass --weights-dir)")
                continue
        for name in args.categories:
            category = load_category(CATEGORIES[name], require_train=True)
            bundle_name = f"border_{name}_zero_224" if backbone == "efficientnet_lite0" else f"backbone_{name}_{backbone}"
            extra = {"backbone": backbone} if backbone != "efficientnet_lite0" else {}
            if weights is not None:
                extra["weights"] = str(weights)
            print(f"[{name}] {backbone}", flush=True)
            bundle = cached_bundle(bundle_name, train_folder(name, args.pcb_train), border="zero",
                                   geometry=Geometry(height=224, width=224), threads=args.threads, **extra)
            scored = score_category(bundle.path, category, threads=args.threads)
            m = scored.metrics
            labels = np.array([r.is_anomalous for r in scored.records])
            flagged = np.array([bool(r.predicted_anomalous) for r in scored.records])
            cost = count_graph(bundle.path / "model.onnx", batch=1)
            import json

            dim = json.loads((bundle.path / "manifest.json").read_text())["output"]["dim"]
            bench.rows.append(BackboneRow(
                backbone=backbone, category=name, dim=dim, image_auroc=m.image_auroc, pixel_auroc=m.pixel_auroc,
                aupro=m.aupro, recall_at_threshold=m.at_threshold.recall,
                test_false_alarm_rate=float(flagged[~labels].mean()), mflops_per_image=cost.flops / 1e6,
                backbone_ms_p50=backbone_ms(bundle.path / "model.onnx", args.repeats, args.threads),
                total_ms_per_image=scored.ms_per_image, loadavg_after=load_average()))
            r = bench.rows[-1]
            print(f"    image {r.image_auroc:.4f} pixel {r.pixel_auroc:.4f} aupro {r.aupro:.4f} "
                  f"{r.mflops_per_image:.0f} MFLOP {r.backbone_ms_p50:.1f} ms", flush=True)
            write_json(args.out / "backbones.json", bench)
    bench.loadavg_end = load_average()
    write_json(args.out / "backbones.json", bench)
    lines = ["# Backbones: accuracy against cost", "",
             f"{bench.settings}. Load average at start {bench.loadavg_start}, at end {bench.loadavg_end}. "
             "Values in percent; backbone ms is the median ONNX Runtime time at batch 1 on this shared machine.", "",
             "| backbone | D | MFLOP/img | backbone ms | category | image AUROC | pixel AUROC | AUPRO@0.3 | recall at thr. | good flagged |",
             "|---|---:|---:|---:|---|---:|---:|---:|---:|---:|"]
    for r in bench.rows:
        lines.append(f"| {r.backbone} | {r.dim} | {r.mflops_per_image:.0f} | {r.backbone_ms_p50:.1f} | {r.category} | "
                     f"{100 * r.image_auroc:.1f} | {100 * r.pixel_auroc:.1f} | {100 * r.aupro:.1f} | "
                     f"{100 * r.recall_at_threshold:.1f} | {100 * r.test_false_alarm_rate:.1f} |")
    lines += ["", *[f"- not measured: {n}" for n in bench.not_measured], ""]
    text = "\n".join(lines)
    write_text_atomic(args.out / "backbones.md", text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
