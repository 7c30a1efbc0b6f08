"""pcedge against an independent peer implementation (anomalib 2.7's PatchCore) on the shared categories.

Same images, same EfficientNet-Lite0 ImageNet weights, everything else each side's own
(``peer_anomalib.py``). Two protocols:

- ``paper``: shorter side 256, centre crop 224 (the paper's MVTec protocol), with ``--paper-coreset``
  (default 1 %, not the paper's 10 %: anomalib's k-center-greedy loop runs at about 7 selections per second
  on this shared 2-core machine, so 10 % of BSData's 117,600 patches alone would take 28 minutes; the
  paper's Table 2 and ``results/coreset_ratio.md`` find 1 % within noise of 10 %);
- ``defaults``: pcedge's defaults, the whole frame stretched to 224 x 224, 1 % coreset (the peer resizes
  to 224 x 224 the same way).

Both sides' maps are placed on the original image (NaN where the crop saw nothing) and measured by the
same metric code on the same masks (pixel metrics at longer side <= 256, over the seen region). Reports
image/pixel AUROC, AUPRO, per-image score rank correlation (Spearman) and the images whose ranks differ
most. pcedge runs its ONNX graph with the exact index and Eq. 7.

DeepPCB uses a seeded subset of ``--pcb-train`` training images (default 200; anomalib's coreset loop at
10 % of 1000 images' patches would take hours on 2 cores); BSData uses all 150.

Writes ``results/vs_peer.json`` and ``results/vs_peer.md``.

    pip install -r benchmarks/requirements-peer.txt
    python benchmarks/bench_vs_peer.py
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (BSDATA, DEEPPCB, RESULTS, cached_bundle, load_average, machine_info, paired_auroc_delta,  # noqa: E402
                    score_category, subset_folder, write_json)

from pcedge.runtime.bundle import Geometry  # noqa: E402
from pcedge.runtime.evaluation.accuracy import AccuracyAccumulator  # noqa: E402
from pcedge.runtime.evaluation.dataset import load_category  # noqa: E402
from pcedge.runtime.files import write_text_atomic  # noqa: E402
from pcedge.runtime.preprocess import fit_geometry, list_images, read_image  # noqa: E402

PROTOCOLS = {"paper": ("crop", None), "defaults": ("stretch", 0.01)}


@dataclass
class SideMetrics:
    image_auroc: float
    pixel_auroc: float
    aupro: float
    image_f1_max: float
    bank: int
    seconds_fit: float
    ms_per_image: float


@dataclass
class Disagreement:
    image: str
    label: str
    pcedge_rank: float  # percentile of the image's score among all test images, 0-1
    peer_rank: float
    pcedge_score: float
    peer_score: float


@dataclass
class PeerRow:
    category: str
    protocol: str
    n_train: int
    n_test: int
    pcedge: SideMetrics
    peer: SideMetrics
    spearman: float
    image_auroc_delta: float  # pcedge minus peer, same test images
    image_auroc_delta_ci: list[float]  # its 95 % stratified paired bootstrap interval
    largest_differences: list[Disagreement]
    pcedge_scores: list[float]  # per test image, in load_category order
    peer_scores: list[float]
    loadavg_after: list[float]


@dataclass
class PeerBenchmark:
    peer: str
    backbone_check: object
    machine: object
    loadavg_start: list[float]
    rows: list[PeerRow] = field(default_factory=list)
    loadavg_end: list[float] | None = None


def _ranks(x: np.ndarray) -> np.ndarray:
    from scipy.stats import rankdata

    return (rankdata(x) - 1) / max(1, x.size - 1)


def run_one(name: str, data: Path, train_folder: Path, protocol: str, args, weights: Path) -> PeerRow:
    from peer_anomalib import PeerPatchCore
    from scipy.stats import spearmanr

    mode, coreset = PROTOCOLS[protocol]
    coreset = coreset if coreset is not None else args.paper_coreset
    category = load_category(data)
    train = list_images(train_folder / "train" / "good" if (train_folder / "train" / "good").is_dir() else train_folder)
    geometry = Geometry(mode=mode, height=224, width=224, resize=256)
    t = time.perf_counter()
    # The defaults protocol is exactly bench_border.py's "zero" bundle: share it rather than export it twice.
    bundle_name = (f"border_{name}_zero_224" if protocol == "defaults"
                   else f"peer_{name}_{protocol}_{len(train)}_{coreset:g}")
    bundle = cached_bundle(bundle_name, train_folder, geometry=geometry, coreset=coreset, threads=args.threads)
    fit_pcedge = time.perf_counter() - t if not bundle.reused else sum((bundle.export_seconds or {}).values())
    print(f"[{name} {protocol}] pcedge bundle {'reused' if bundle.reused else 'exported'}; scoring", flush=True)
    ours = score_category(bundle.path, category, threads=args.threads)
    bank_ours = int(__import__("json").loads((bundle.path / "manifest.json").read_text())["memory_bank"]["n"])

    print(f"[{name} {protocol}] peer: fitting anomalib PatchCore on {len(train)} images", flush=True)
    peer = PeerPatchCore(weights, mode, coreset=coreset)
    t = time.perf_counter()
    bank_peer = peer.fit(train)
    fit_peer = time.perf_counter() - t
    acc = AccuracyAccumulator(256)
    t = time.perf_counter()
    for start in range(0, len(category.test), 16):
        items = category.test[start : start + 16]
        for item, (score, amap) in zip(items, peer.predict([i.path for i in items])):
            seen = None
            if item.is_anomalous:
                seen = np.isfinite(amap)
            acc.add(item, score, amap, None, seen)
    ms_peer = (time.perf_counter() - t) * 1e3 / len(category.test)
    theirs = acc.metrics()

    s_ours = np.array([r.score for r in ours.records])
    s_peer = np.array([r.score for r in acc.records])
    r_ours, r_peer = _ranks(s_ours), _ranks(s_peer)
    worst = np.argsort(-np.abs(r_ours - r_peer))[:5]
    m = ours.metrics
    labels = np.array([r.is_anomalous for r in ours.records])
    delta, delta_ci = paired_auroc_delta(labels, s_ours, s_peer)
    return PeerRow(
        category=name, protocol=protocol, n_train=len(train), n_test=len(category.test),
        pcedge=SideMetrics(m.image_auroc, m.pixel_auroc, m.aupro, m.image_f1_max, bank_ours, fit_pcedge, ours.ms_per_image),
        peer=SideMetrics(theirs.image_auroc, theirs.pixel_auroc, theirs.aupro, theirs.image_f1_max, bank_peer, fit_peer,
                         ms_peer),
        spearman=float(spearmanr(s_ours, s_peer).statistic), image_auroc_delta=delta, image_auroc_delta_ci=delta_ci,
        pcedge_scores=s_ours.tolist(), peer_scores=s_peer.tolist(),
        largest_differences=[Disagreement(Path(ours.records[i].path).name, ours.records[i].label, float(r_ours[i]),
                                          float(r_peer[i]), float(s_ours[i]), float(s_peer[i])) for i in worst],
        loadavg_after=load_average())


def _delta(r: PeerRow) -> str:
    if r.image_auroc_delta is None:
        return "-"
    lo, hi = r.image_auroc_delta_ci
    return f"{100 * r.image_auroc_delta:+.1f} ({100 * lo:+.1f}, {100 * hi:+.1f})"


def markdown(bench: PeerBenchmark) -> str:
    c = bench.backbone_check
    lines = [
        "# pcedge against anomalib's PatchCore (independent peer)",
        "",
        f"{bench.peer}. Backbone check (same input tensor, both networks): max relative error per tap "
        f"{', '.join(f'{v:.1e}' for v in c.max_rel_error)}, min cosine {', '.join(f'{v:.6f}' for v in c.min_cosine)} "
        f"on {c.image}. Load average at start {bench.loadavg_start}, at end {bench.loadavg_end}. Values in percent. "
        "Pixel metrics over the whole original image: what a centre crop does not see counts as missed "
        "(the same for both sides). Δ: pcedge minus peer, 95 % stratified paired bootstrap interval.",
        "",
        "| category | protocol | train | system | bank | image AUROC | pixel AUROC | AUPRO@0.3 | F1-max | rank corr. | Δ image AUROC (95 % CI) |",
        "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in bench.rows:
        for label, s in (("pcedge", r.pcedge), ("anomalib 2.7", r.peer)):
            lines.append(f"| {r.category} | {r.protocol} | {r.n_train} | {label} | {s.bank} | {100 * s.image_auroc:.1f} | "
                         f"{100 * s.pixel_auroc:.1f} | {100 * s.aupro:.1f} | {100 * s.image_f1_max:.1f} | "
                         f"{r.spearman:.3f} | {_delta(r) if label == 'pcedge' else ''} |")
    lines += ["", "Largest per-image rank differences (score percentile among the test images):", ""]
    for r in bench.rows:
        lines.append(f"- {r.category} / {r.protocol}: " + "; ".join(
            f"{d.image} ({d.label}) pcedge {d.pcedge_rank:.2f} vs peer {d.peer_rank:.2f}" for d in r.largest_differences))
    lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--categories", nargs="+", choices=("bsdata", "deeppcb"), default=["bsdata", "deeppcb"])
    parser.add_argument("--protocols", nargs="+", choices=sorted(PROTOCOLS), default=["paper", "defaults"])
    parser.add_argument("--pcb-train", type=int, default=200)
    parser.add_argument("--paper-coreset", type=float, default=0.01, help="coreset ratio of the paper protocol, both sides")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--merge", action="store_true",
                        help="keep the rows of categories not run now from an existing vs_peer.json")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    import anomalib
    from peer_anomalib import build_peer, check_against_pcedge

    from pcedge.export.backbones import lite0_package_weights

    weights = lite0_package_weights()
    probe = next(iter(list_images(BSDATA / "test" / "good")))
    image, _ = fit_geometry(read_image(probe), Geometry(height=224, width=224))
    check = check_against_pcedge(build_peer(weights), image, probe.name)
    print(f"backbone check: {check}", flush=True)
    bench = PeerBenchmark(peer=f"anomalib {anomalib.__version__} PatchcoreModel (tf_efficientnet_lite0 via timm, "
                               f"layers {', '.join(('blocks.2', 'blocks.4'))}, num_neighbors 9)",
                          backbone_check=check, machine=machine_info(), loadavg_start=load_average())
    data = {"bsdata": (BSDATA, BSDATA), "deeppcb": (DEEPPCB, subset_folder(DEEPPCB, args.pcb_train))}
    if args.merge and (args.out / "vs_peer.json").is_file():
        import json

        kept = [r for r in json.loads((args.out / "vs_peer.json").read_text())["rows"]
                if r["category"] not in args.categories]
        bench.rows += [PeerRow(**{**r, "pcedge": SideMetrics(**r["pcedge"]), "peer": SideMetrics(**r["peer"]),
                                  "largest_differences": [Disagreement(**x) for x in r["largest_differences"]],
                                  **{k: r.get(k) for k in ("image_auroc_delta", "image_auroc_delta_ci",
                                                           "pcedge_scores", "peer_scores")}}) for r in kept]
    for name in args.categories:
        for protocol in args.protocols:
            bench.rows.append(run_one(name, data[name][0], data[name][1], protocol, args, weights))
            r = bench.rows[-1]
            print(f"    pcedge {r.pcedge.image_auroc:.4f}/{r.pcedge.pixel_auroc:.4f}  peer {r.peer.image_auroc:.4f}/"
                  f"{r.peer.pixel_auroc:.4f}  spearman {r.spearman:.3f}", flush=True)
            write_json(args.out / "vs_peer.json", bench)
    bench.loadavg_end = load_average()
    write_json(args.out / "vs_peer.json", bench)
    text = markdown(bench)
    write_text_atomic(args.out / "vs_peer.md", text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
