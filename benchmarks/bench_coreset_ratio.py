"""Choosing the default coreset ratio: accuracy against index latency, measured on real categories.

For each dataset and each coreset ratio, a bundle is exported (cached under ``results/bundles/``) with
default settings except the ratio, and its test set is scored with the **exact** index (so the numbers
show the coreset's effect alone, not the approximate search's). The backbone is the same for every
ratio (same weights, seed and geometry; the model files' checksums are compared), so each test batch is
embedded once and scored against every ratio's memory bank.

Per ratio: image AUROC, pixel AUROC and AUPRO (``pcedge eval``'s accumulator and metrics), the index
stage's time per image (one image's 784 queries; exact, and HNSW with its exact re-scoring pass), bank
size, coverage radius (the largest distance from a training feature to its nearest coreset feature) and
the exporter's coreset time.

The recommendation (:func:`recommend`) is the smallest ratio whose image AUROC is not shown worse than
the largest bank's (a paired bootstrap interval, so test-set noise does not decide), with its pixel
AUROC cost stated. The paper's Table 2 (MVTec AD) is the prior: 1 % loses almost nothing against 10 %.

    python benchmarks/bench_coreset_ratio.py                       # bsdata and a deeppcb subset
    python benchmarks/bench_coreset_ratio.py --datasets bsdata --ratios 0.01 0.1
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    paired_auroc_delta,
    BSDATA,
    DEEPPCB,
    RESULTS,
    MachineInfo,
    Percentiles,
    cached_bundle,
    load_average,
    log,
    machine_info,
    subset_folder,
    summarise,
    write_json,
)

from pcedge.runtime.files import write_text_atomic  # noqa: E402

RATIOS = (0.01, 0.02, 0.05, 0.1, 0.25)


@dataclass
class DatasetSpec:
    name: str
    data: Path
    train_images: int | None  # None: all of train/good
    test_per_class: int | None  # good and defective test images kept (seeded); None: all


DATASETS = {
    "bsdata": DatasetSpec("bsdata", BSDATA, None, None),
    "deeppcb": DatasetSpec("deeppcb", DEEPPCB, 300, 250),
}


@dataclass
class RatioResult:
    ratio: float  # requested
    bank_rows: int
    n_features_total: int
    actual_ratio: float
    image_auroc: float
    pixel_auroc: float
    aupro: float
    image_f1_max: float
    # image AUROC minus the largest ratio's, on the same test images, with a 95% paired bootstrap interval
    # (test images resampled within each class): how much of a difference the test set can resolve
    image_auroc_delta_vs_largest: float
    image_auroc_delta_ci95: list[float]
    exact_index_ms: Percentiles  # one image's patch queries (index stage of the detector), exact
    hnsw_index_ms: Percentiles  # the same with HNSW + exact re-scoring
    hnsw_rescored_patches_mean: float
    coverage_radius: float
    coreset_seconds: float  # the exporter's coreset phase (selection, coverage radius, gather)
    threshold: float
    bundle: str
    bundle_reused_from_cache: bool


@dataclass
class DatasetResult:
    name: str
    data: str
    train_images: int  # used for the bank (after holding out the threshold's images)
    test_good: int
    test_defective: int
    pixel_resolution: str
    backbone_ms: Percentiles  # ONNX Runtime CPU, batch 1: the same for every ratio
    same_model_for_all_ratios: bool
    ratios: list[RatioResult] = field(default_factory=list)
    seconds: float = 0.0


@dataclass
class Recommendation:
    ratio: float  # latency first (see recommend)
    accuracy_first: float | None  # the smallest ratio that also keeps pixel AUROC within the tolerance
    rule: str
    evidence: list[str]


@dataclass
class CoresetReport:
    machine: MachineInfo
    settings: dict
    datasets: list[DatasetResult]
    recommendation: Recommendation | None
    loadavg_end: list[float] = field(default_factory=list)


# --------------------------------------------------------------------------------------------------
# Measuring
# --------------------------------------------------------------------------------------------------


def select_test_items(category, per_class: int | None, seed: int = 0):
    """All test items, or ``per_class`` good and ``per_class`` defective ones (seeded, in name order)."""
    if per_class is None:
        return list(category.test)
    rng = np.random.default_rng(seed)
    good = [i for i in category.test if not i.is_anomalous]
    bad = [i for i in category.test if i.is_anomalous]
    keep = []
    for group in (good, bad):
        chosen = sorted(rng.choice(len(group), size=min(per_class, len(group)), replace=False).tolist())
        keep += [group[i] for i in chosen]
    return keep


def time_index(detector, embeddings: list[np.ndarray], repeats: int) -> tuple[Percentiles, float]:
    """Index stage per image (``Scorer.patch_scores`` on one image's ``[1, P, D]``), after one warm-up pass."""
    for emb in embeddings[:3]:
        detector.scorer.patch_scores(emb)
    times, rescored = [], []
    for _ in range(repeats):
        for emb in embeddings:
            started = time.perf_counter()
            patches = detector.scorer.patch_scores(emb)
            times.append((time.perf_counter() - started) * 1e3)
            rescored.append(patches[0].n_rescored)
    return summarise(times), float(np.mean(rescored))


def run_dataset(spec: DatasetSpec, ratios: tuple[float, ...], args) -> DatasetResult:
    from pcedge.runtime.backends import open_backend
    from pcedge.runtime.bundle import open_bundle
    from pcedge.runtime.evaluation.accuracy import AccuracyAccumulator, SeenRegions
    from pcedge.runtime.evaluation.dataset import load_category
    from pcedge.runtime.detector import Detector, DetectorOptions
    from pcedge.runtime.preprocess import fit_geometry, read_image, to_tensor

    started = time.perf_counter()
    train_data = subset_folder(spec.data, spec.train_images) if spec.train_images else spec.data
    cached = {r: cached_bundle(f"{spec.name}_{'all' if not spec.train_images else spec.train_images}_coreset{r:g}",
                               train_data, fresh=args.fresh, coreset=r) for r in ratios}
    bundles = {r: open_bundle(c.path, verify=True) for r, c in cached.items()}
    models = {b.manifest.files[b.manifest.model.file].sha256 for b in bundles.values()}
    same_model = len(models) == 1
    if not same_model:
        log(f"{spec.name}: the exported graphs differ between ratios; embedding once per ratio")

    category = load_category(spec.data)
    items = select_test_items(category, spec.test_per_class)
    first = bundles[ratios[0]]
    backends = {r: open_backend("ort-cpu", bundles[r if not same_model else ratios[0]], threads=args.threads)
                for r in (ratios if not same_model else ratios[:1])}
    exact = {r: Detector(bundles[r], backends[r if not same_model else ratios[0]],
                         DetectorOptions(backend="ort-cpu", index="exact", threads=args.threads, verify_checksums=False, precision="fp32"))
             for r in ratios}
    accumulators = {r: AccuracyAccumulator() for r in ratios}
    seen_regions = SeenRegions(first.manifest.input.geometry)
    timing_embeddings: list[np.ndarray] = []  # [1, P, D] of the first few test images, for index timing
    backbone_ms: list[float] = []
    log(f"{spec.name}: scoring {len(items)} test images against {len(ratios)} memory banks (exact index)")
    for start in range(0, len(items), args.batch):
        chunk = items[start : start + args.batch]
        frames = [read_image(item.path) for item in chunk]
        fitted = [fit_geometry(f, first.manifest.input.geometry, str(i.path)) for f, i in zip(frames, chunk)]
        tensor, placements = to_tensor([f[0] for f in fitted]), [f[1] for f in fitted]
        embeddings = {}
        for r, backend in backends.items():
            t = time.perf_counter()
            embeddings[r] = backend(tensor)
            backbone_ms.append((time.perf_counter() - t) * 1e3 / len(chunk))
        for r in ratios:
            emb = embeddings[r if not same_model else ratios[0]]
            results = exact[r].score_embeddings(emb, placements, [str(i.path) for i in chunk])
            for item, frame, result in zip(chunk, frames, results):
                seen = seen_regions(frame, str(item.path)) if item.is_anomalous else None
                accumulators[r].add(item, result.score, result.anomaly_map, result.anomalous, seen)
        if len(timing_embeddings) < args.timing_images:
            emb = embeddings[ratios[0]]
            timing_embeddings += [emb[b : b + 1] for b in range(emb.shape[0])][: args.timing_images - len(timing_embeddings)]
        if (start // args.batch) % 10 == 0:
            log(f"  {min(start + args.batch, len(items))}/{len(items)} (load {load_average()[0]})")

    result = DatasetResult(
        name=spec.name, data=str(train_data), train_images=first.manifest.memory_bank.n_train_images,
        test_good=sum(not i.is_anomalous for i in items), test_defective=sum(i.is_anomalous for i in items),
        pixel_resolution="", backbone_ms=summarise(backbone_ms), same_model_for_all_ratios=same_model,
    )
    labels = np.array([rec.is_anomalous for rec in accumulators[ratios[-1]].records])
    reference = np.array([rec.score for rec in accumulators[ratios[-1]].records])
    for r in ratios:
        metrics = accumulators[r].metrics()
        delta, ci = paired_auroc_delta(labels, np.array([rec.score for rec in accumulators[r].records]), reference)
        result.pixel_resolution = metrics.pixel_resolution
        hnsw = Detector(bundles[r], backends[r if not same_model else ratios[0]],
                        DetectorOptions(backend="ort-cpu", index="hnsw", threads=args.threads, verify_checksums=False, precision="fp32"))
        exact_ms, _ = time_index(exact[r], timing_embeddings, args.timing_repeats)
        hnsw_ms, rescored = time_index(hnsw, timing_embeddings, args.timing_repeats)
        bank = bundles[r].manifest.memory_bank
        seconds = cached[r].export_seconds or {}
        result.ratios.append(RatioResult(
            ratio=r, bank_rows=bank.n, n_features_total=bank.n_features_total, actual_ratio=bank.coreset_ratio,
            image_auroc=metrics.image_auroc, pixel_auroc=metrics.pixel_auroc, aupro=metrics.aupro,
            image_f1_max=metrics.image_f1_max, image_auroc_delta_vs_largest=delta, image_auroc_delta_ci95=ci,
            exact_index_ms=exact_ms, hnsw_index_ms=hnsw_ms,
            hnsw_rescored_patches_mean=rescored, coverage_radius=bank.coverage_radius,
            coreset_seconds=float(seconds.get("coreset", bank.selection_seconds)),
            threshold=bundles[r].manifest.threshold.value, bundle=str(cached[r].path),
            bundle_reused_from_cache=cached[r].reused,
        ))
        log(f"  {spec.name} coreset {r:g}: bank {bank.n}, image AUROC {metrics.image_auroc:.4f}, pixel AUROC "
            f"{metrics.pixel_auroc:.4f}, AUPRO {metrics.aupro:.4f}, exact {exact_ms.p50:.2f} ms, hnsw {hnsw_ms.p50:.2f} ms")
    for backend in backends.values():
        backend.close()
    result.seconds = time.perf_counter() - started
    return result


# --------------------------------------------------------------------------------------------------
# Choosing, and writing
# --------------------------------------------------------------------------------------------------


def recommend(datasets: list[DatasetResult], pixel_tolerance: float) -> Recommendation | None:
    """Latency first: the smallest ratio whose image AUROC is not shown worse than the largest bank's.

    "Not shown worse" on a dataset: the 95% paired-bootstrap interval of (its image AUROC minus the largest
    ratio's) reaches 0 or above. A smaller bank is always faster to search, so among ratios the test sets
    cannot tell apart, the smallest wins. Its pixel AUROC loss is reported beside it, with the smallest
    ratio that also keeps pixel AUROC within ``pixel_tolerance`` (``accuracy_first``), for deployments
    where localisation matters more than latency.
    """
    if not datasets:
        return None
    ratios = sorted({r.ratio for d in datasets for r in d.ratios})
    evidence, not_worse, pixel_ok = [], [], []
    for ratio in ratios:
        image_ok, pixel_within = True, True
        for d in datasets:
            row = next(r for r in d.ratios if r.ratio == ratio)
            largest = max(d.ratios, key=lambda r: r.ratio)
            low, high = row.image_auroc_delta_ci95
            pixel_delta = row.pixel_auroc - largest.pixel_auroc
            image_ok &= high >= 0.0
            pixel_within &= pixel_delta >= -pixel_tolerance
            evidence.append(
                f"{d.name} {ratio:g} ({row.bank_rows} rows): image AUROC {row.image_auroc:.4f}, "
                f"{row.image_auroc_delta_vs_largest:+.4f} vs {largest.ratio:g} (95% CI {low:+.3f} to {high:+.3f}"
                f"{'' if high >= 0 else ': worse'}); pixel AUROC {row.pixel_auroc:.4f} ({pixel_delta:+.4f}); "
                f"AUPRO {row.aupro:.4f}; index exact {row.exact_index_ms.p50:.2f} ms, hnsw {row.hnsw_index_ms.p50:.2f} ms")
        if image_ok:
            not_worse.append(ratio)
            if pixel_within:
                pixel_ok.append(ratio)
    if not not_worse:
        return Recommendation(ratios[-1], None, "every smaller ratio was shown worse; the largest measured", evidence)
    return Recommendation(
        not_worse[0], pixel_ok[0] if pixel_ok else None,
        "smallest ratio whose image AUROC is not shown worse than the largest bank's on any dataset (95% paired "
        f"bootstrap); accuracy_first: the smallest that also keeps pixel AUROC within {pixel_tolerance:g}",
        evidence)


def markdown(report: CoresetReport) -> str:
    lines = ["# Coreset ratio: accuracy against index latency", "",
             f"{report.machine.cpu_model}, {report.machine.usable_cpus} CPUs; load average at start "
             f"{report.machine.loadavg_start[0]:.2f}, at end {report.loadavg_end[0]:.2f}. Accuracy with the exact "
             "index; index times for one image's 784 patch queries (p50).", ""]
    for d in report.datasets:
        lines += [f"## {d.name}: {d.train_images} training images, {d.test_good} good + {d.test_defective} defective "
                  f"test images; backbone {d.backbone_ms.p50:.1f} ms/image (ort-cpu); pixels at {d.pixel_resolution}", "",
                  f"| ratio | bank rows | image AUROC | Δ vs {d.ratios[-1].ratio:g} (95% CI) | pixel AUROC | AUPRO | exact ms | "
                  "hnsw ms | re-scored patches | coverage radius | coreset s |",
                  "|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
        for r in d.ratios:
            ci = r.image_auroc_delta_ci95
            lines.append(f"| {r.ratio:g} | {r.bank_rows} | {r.image_auroc:.4f} | {r.image_auroc_delta_vs_largest:+.4f} "
                         f"({ci[0]:+.3f}, {ci[1]:+.3f}) | {r.pixel_auroc:.4f} | {r.aupro:.4f} | "
                         f"{r.exact_index_ms.p50:.2f} | {r.hnsw_index_ms.p50:.2f} | {r.hnsw_rescored_patches_mean:.1f} | "
                         f"{r.coverage_radius:.3f} | {r.coreset_seconds:.1f} |")
        lines.append("")
    if report.recommendation:
        rec = report.recommendation
        alternative = f"; accuracy first: {rec.accuracy_first:g}" if rec.accuracy_first is not None else ""
        lines += [f"**Recommended default: {rec.ratio:g}**{alternative} ({rec.rule}).", ""]
        lines += [f"- {e}" for e in rec.evidence] + [""]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", choices=sorted(DATASETS), default=["bsdata", "deeppcb"])
    parser.add_argument("--ratios", nargs="+", type=float, default=list(RATIOS))
    parser.add_argument("--deeppcb-train", type=int, default=DATASETS["deeppcb"].train_images,
                        help="deeppcb training images used (seeded subset; default 300)")
    parser.add_argument("--deeppcb-test", type=int, default=DATASETS["deeppcb"].test_per_class,
                        help="deeppcb good and defective test images each (seeded subset; default 250; 0 = all)")
    parser.add_argument("--batch", type=int, default=8, help="test images per backbone call")
    parser.add_argument("--timing-images", type=int, default=20, help="test images whose index time is measured")
    parser.add_argument("--timing-repeats", type=int, default=3, help="passes over those images")
    parser.add_argument("--pixel-tolerance", type=float, default=0.005,
                        help="pixel AUROC loss accepted against the largest ratio (default 0.005)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--fresh", action="store_true", help="re-export bundles even if cached ones match")
    parser.add_argument("--out", type=Path, default=RESULTS / "coreset_ratio.json")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    ratios = tuple(sorted(args.ratios))
    specs = []
    for name in args.datasets:
        spec = DATASETS[name]
        if name == "deeppcb":
            spec = DatasetSpec(name, spec.data, args.deeppcb_train or None, args.deeppcb_test or None)
        specs.append(spec)
    report = CoresetReport(machine=machine_info(), datasets=[], recommendation=None,
                           settings={"ratios": list(ratios), "pixel_tolerance": args.pixel_tolerance, "index_for_accuracy": "exact",
                                     "timing_images": args.timing_images, "timing_repeats": args.timing_repeats,
                                     "datasets": [vars(s) for s in specs]})
    for spec in specs:
        report.datasets.append(run_dataset(spec, ratios, args))
        report.recommendation = recommend(report.datasets, args.pixel_tolerance)
        report.loadavg_end = load_average()
        write_json(args.out, report)  # partial results survive an interrupted run
    write_text_atomic(args.out.with_suffix(".md"), markdown(report))
    print(markdown(report))
    print(f"wrote {args.out} and {args.out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
