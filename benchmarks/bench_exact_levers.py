"""The levers behind pcedge's exact image score on a 10 % bank, each timed on real BSData features.

Embeddings of BSData test images come from the ``--coreset 0.1`` bundle's ONNX graph (computed once);
then, on one thread unless said otherwise, interleaved over ``--rounds`` rounds (median of per-round
medians, milliseconds per image):

1. ``blas``: the exact index's blocked product for one image (784 queries) on 1 vs 2 BLAS threads, at
   bank sizes from the 1 % to the 10 % bank (the 10 % bank's first rows): when do both cores win?
2. ``pruned``: exact k-NN for the re-scoring pass's 16 top patches (k = 1) and for Eq. 7's support
   ``N_b(m*)`` (one query, k = b), blocked product vs :class:`PrunedExactIndex` with 16/32/48 principal
   directions: time, rows that survive the bound, equality with the blocked product.
3. ``hnsw``: hnswlib's query of one image at ef 1..32 on 1 and 2 threads, then the whole index stage
   (HNSW + exact re-scoring with the pruned index): time, patches re-scored, image scores equal to the
   exact index's, and how far the anomaly map's patch scores are above the exact ones (HNSW returns
   true distances to real rows, so only ever above).
4. ``scoring``: Eq. 7 (``Scorer.image_score``) with the blocked vs the pruned exact index.
5. ``map_accuracy``: what a lower ef costs the anomaly map: image / pixel AUROC and AUPRO over every BSData
   test image through the detector with the exact index and with HNSW at ef 8 and 4 (+ exact re-scoring).

Writes ``results/exact_levers.json`` and ``.md``.

    python benchmarks/bench_exact_levers.py     # ~5 min on 2 busy cores once the bundle is cached
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import BSDATA, RESULTS, cached_bundle, load_average, machine_info, write_json  # noqa: E402

from pcedge.runtime.files import write_text_atomic  # noqa: E402

#: Threads of the bundle exports: cached_bundle keys its cache on them, so they stay fixed whatever
#: --threads times with (a different value would re-export, and rebuild the HNSW graph in another order).
EXPORT_THREADS = 2


@dataclass
class BlasRow:
    bank_rows: int
    ms_1_thread: float
    ms_2_threads: float


@dataclass
class PrunedRow:
    case: str  # "rescore-16 k=1" or "eq7 k=b"
    method: str  # "blocked" or "pruned-r{dims}"
    ms: float
    mean_survivors: float | None  # bank rows compared exactly per query (pruned only)
    equal_to_blocked: bool  # same distances (bit for bit) and ids as the blocked product


@dataclass
class HnswRow:
    ef: int
    threads: int
    query_ms: float  # hnswlib alone, one image
    index_stage_ms: float  # HNSW + exact re-scoring (pruned), as the detector's index stage
    mean_rescored: float
    image_scores_equal: int  # images whose s* equals the exact index's
    n_images: int
    map_mean_excess: float  # mean over patches of (HNSW patch score - exact) / exact
    map_max_excess: float
    recall_at_1: float  # patches whose HNSW neighbour is the exact one


@dataclass
class ScoringRow:
    method: str
    eq7_ms: float


@dataclass
class MapAccuracyRow:
    index: str  # "exact" or "hnsw ef N"
    image_auroc: float
    pixel_auroc: float
    aupro: float


@dataclass
class LeverBenchmark:
    bank: list[int]
    n_images: int
    rounds: int
    machine: object
    loadavg: list[list[float]] = field(default_factory=list)
    blas: list[BlasRow] = field(default_factory=list)
    pruned: list[PrunedRow] = field(default_factory=list)
    hnsw: list[HnswRow] = field(default_factory=list)
    scoring: list[ScoringRow] = field(default_factory=list)
    map_accuracy: list[MapAccuracyRow] = field(default_factory=list)


def timed(fn, items, rounds: int) -> float:
    """Median over rounds of the per-round median time of ``fn(item)``, ms."""
    per_round = []
    for _ in range(rounds):
        times = []
        for item in items:
            t = time.perf_counter()
            fn(item)
            times.append((time.perf_counter() - t) * 1e3)
        per_round.append(float(np.median(times)))
    return float(np.median(per_round))


def embeddings_of(bundle: Path, n_images: int, threads: int) -> tuple[np.ndarray, list]:
    from pcedge.runtime.detector import Detector, DetectorOptions
    from pcedge.runtime.preprocess import fit_geometry, list_images, read_image, to_tensor

    paths = sorted(list_images(BSDATA / "test" / "good")) + sorted(list_images(BSDATA / "test" / "pitting"))
    paths = paths[:: max(1, len(paths) // n_images)][:n_images]
    with Detector.open(bundle, DetectorOptions(backend="ort-cpu", index="exact", threads=threads, precision="fp32")) as detector:
        embeddings = [detector.embed(to_tensor([fit_geometry(read_image(p), detector.geometry)[0]]))[0] for p in paths]
        return np.stack(embeddings), detector.bank


def run(args) -> LeverBenchmark:
    from threadpoolctl import threadpool_limits

    from pcedge.runtime.bundle import open_bundle
    from pcedge.runtime.index import ExactIndex, HnswIndex, PrunedExactIndex
    from pcedge.runtime.scoring import Scorer

    bundle = cached_bundle("bsdata_coreset0.1", BSDATA, coreset=0.1, threads=EXPORT_THREADS).path
    emb, bank = embeddings_of(bundle, args.images, args.threads)  # [I, P, D], [N, D]
    manifest = open_bundle(bundle, verify=False).manifest
    bench = LeverBenchmark(bank=list(bank.shape), n_images=len(emb), rounds=args.rounds, machine=machine_info())
    bench.loadavg.append(load_average())
    images = list(emb)

    # 1. BLAS threads for the blocked product, by bank size
    for n in (1176, 2940, 5880, bank.shape[0]):
        index = ExactIndex(np.ascontiguousarray(bank[:n]))
        ms = {}
        for threads in (1, 2):
            with threadpool_limits(threads, user_api="blas"):
                ms[threads] = timed(lambda e: index.query(e, 1), images, args.rounds)
        bench.blas.append(BlasRow(n, ms[1], ms[2]))
        print(f"blas {n}: {ms[1]:.2f} vs {ms[2]:.2f} ms", flush=True)
    bench.loadavg.append(load_average())

    with threadpool_limits(1, user_api="blas"):
        exact = ExactIndex(bank)
        reference = [exact.query(e, 1) for e in images]  # [P, 1] distances, ids per image
        # 2. the pruned exact index on the re-scoring pass and on Eq. 7's support lookup
        top16 = [np.ascontiguousarray(e[np.argsort(-d[:, 0], kind="stable")[:16]]) for e, (d, _) in zip(images, reference)]
        m_star = [np.ascontiguousarray(bank[i[np.argmax(d[:, 0]), 0]][None]) for d, i in reference]
        b = manifest.scoring.reweight_b
        cases = (("rescore-16 k=1", top16, 1), (f"eq7 k={b}", m_star, b))
        for case, queries, k in cases:
            blocked = [exact.query(q, k) for q in queries]
            bench.pruned.append(PrunedRow(case, "blocked", timed(lambda q: exact.query(q, k), queries, args.rounds),
                                          None, True))
            for dims in (16, 32, 48):
                pruned = PrunedExactIndex(bank, dims=dims)
                got = [pruned.query(q, k) for q in queries]
                equal = all(np.array_equal(g[0], r[0]) and np.array_equal(g[1], r[1]) for g, r in zip(got, blocked))
                survivors = []
                for q, (d, _) in zip(queries, blocked):
                    bound = pruned.lower_bounds_sq(q)
                    survivors.append(float(np.mean(np.sum(bound <= (d[:, -1:].astype(np.float64) ** 2) * (1 + 2e-4), axis=1))))
                ms = timed(lambda q: pruned.query(q, k), queries, args.rounds)
                bench.pruned.append(PrunedRow(case, f"pruned-r{dims}", ms, float(np.mean(survivors)), equal))
                print(f"{case} r={dims}: {ms:.3f} ms, survivors {np.mean(survivors):.0f}, equal {equal}", flush=True)
        bench.loadavg.append(load_average())

        # 3. HNSW ef and threads, and the whole index stage with exact re-scoring
        pruned = PrunedExactIndex(bank)
        hnsw = HnswIndex.load(bundle / "index.hnsw", bank) if (bundle / "index.hnsw").is_file() else HnswIndex.build(bank)
        s_exact = np.array([d[:, 0].max() for d, _ in reference])
        for ef in (1, 2, 4, 8, 16, 32):
            for threads in (1, 2):
                hnsw.ef, hnsw.threads = ef, threads
                query_ms = timed(lambda e: hnsw.query(e, 1), images, args.rounds)
                scorer = Scorer(bank, hnsw, pruned, manifest.scoring)
                stage_ms = timed(lambda e: scorer.patch_scores(e[None]), images, args.rounds)
                patches = [scorer.patch_scores(e[None])[0] for e in images]
                approx = [hnsw.query(e, 1) for e in images]
                excess = np.concatenate([(a[0][:, 0] - r[0][:, 0]) / np.maximum(r[0][:, 0], 1e-12)
                                         for a, r in zip(approx, reference)])
                recall = float(np.mean(np.concatenate([a[1][:, 0] == r[1][:, 0] for a, r in zip(approx, reference)])))
                equal = int(np.sum(np.array([p.distances.max() for p in patches]) == s_exact))
                bench.hnsw.append(HnswRow(ef, threads, query_ms, stage_ms, float(np.mean([p.n_rescored for p in patches])),
                                          equal, len(images), float(excess.mean()), float(excess.max()), recall))
                print(f"hnsw ef={ef} threads={threads}: query {query_ms:.2f} ms, stage {stage_ms:.2f} ms, "
                      f"rescored {bench.hnsw[-1].mean_rescored:.1f}, equal {equal}/{len(images)}", flush=True)
        bench.loadavg.append(load_average())

        # 4. Eq. 7 with the blocked vs the pruned exact index
        for name, index in (("blocked", exact), ("pruned-r32", pruned)):
            scorer = Scorer(bank, index, index, manifest.scoring)
            pairs = [(e, scorer.patch_scores(e[None])[0]) for e in images]
            bench.scoring.append(ScoringRow(name, timed(lambda pair: scorer.image_score(*pair), pairs, args.rounds)))
    bench.loadavg.append(load_average())
    if not args.skip_map_accuracy:
        bench.map_accuracy = map_accuracy(bundle, args.threads)
        bench.loadavg.append(load_average())
    return bench


def map_accuracy(bundle: Path, threads: int) -> list[MapAccuracyRow]:
    """Image / pixel AUROC and AUPRO of every BSData test image with the exact index and HNSW at ef 8 and 4."""
    from pcedge.runtime.detector import Detector, DetectorOptions
    from pcedge.runtime.evaluation.accuracy import AccuracyAccumulator, SeenRegions
    from pcedge.runtime.evaluation.dataset import load_category
    from pcedge.runtime.preprocess import read_image

    category = load_category(BSDATA)
    rows = []
    for name, index, ef in (("exact", "exact", None), ("hnsw ef 8", "hnsw", 8), ("hnsw ef 4", "hnsw", 4)):
        acc = AccuracyAccumulator(256)  # pixel metrics at longer side <= 256, as bench_vs_peer.py
        with Detector.open(bundle, DetectorOptions(backend="ort-cpu", index=index, ef=ef, threads=threads, precision="fp32")) as detector:
            seen = SeenRegions(detector.geometry)
            for item in category.test:
                frame = read_image(item.path)
                result = detector.run_frames([frame], [str(item.path)])[0]
                acc.add(item, result.score, result.anomaly_map, result.anomalous,
                        seen(frame, str(item.path)) if item.is_anomalous else None)
        m = acc.metrics()
        rows.append(MapAccuracyRow(name, m.image_auroc, m.pixel_auroc, m.aupro))
        print(f"map accuracy {name}: image {m.image_auroc:.4f} pixel {m.pixel_auroc:.4f} aupro {m.aupro:.4f}", flush=True)
    return rows


def markdown(bench: LeverBenchmark) -> str:
    lines = ["# Levers of the exact image score on a 10 % bank (BSData)", "",
             f"Bank {bench.bank}, {bench.n_images} test images, {bench.rounds} rounds (median of per-round medians, "
             f"ms per image), one BLAS thread unless said. Load average during the sections: {bench.loadavg}.", "",
             "## 1. Blocked exact product, one image (784 queries): 1 vs 2 BLAS threads", "",
             "| bank rows | 1 thread | 2 threads |", "|---:|---:|---:|"]
    lines += [f"| {r.bank_rows} | {r.ms_1_thread:.2f} | {r.ms_2_threads:.2f} |" for r in bench.blas]
    lines += ["", "## 2. Exact k-NN for a few queries: blocked product vs projection-bound pruning", "",
              "| case | method | ms | rows compared exactly per query | equal to blocked |", "|---|---|---:|---:|---|"]
    lines += [f"| {r.case} | {r.method} | {r.ms:.3f} | {'' if r.mean_survivors is None else f'{r.mean_survivors:.0f}'} | "
              f"{r.equal_to_blocked} |" for r in bench.pruned]
    lines += ["", "## 3. HNSW + exact re-scoring (pruned), one image", "",
              "| ef | threads | hnswlib query | index stage | patches re-scored | s* equal to exact | recall@1 | "
              "map excess mean / max |", "|---:|---:|---:|---:|---:|---|---:|---|"]
    lines += [f"| {r.ef} | {r.threads} | {r.query_ms:.2f} | {r.index_stage_ms:.2f} | {r.mean_rescored:.1f} | "
              f"{r.image_scores_equal}/{r.n_images} | {r.recall_at_1:.3f} | {100 * r.map_mean_excess:.2f} % / "
              f"{100 * r.map_max_excess:.1f} % |" for r in bench.hnsw]
    lines += ["", "## 4. Eq. 7 (support lookup N_b(m*) and the weight)", "", "| exact index | ms |", "|---|---:|"]
    lines += [f"| {r.method} | {r.eq7_ms:.3f} |" for r in bench.scoring]
    if bench.map_accuracy:
        lines += ["", "## 5. Map accuracy per index (all test images, percent)", "",
                  "| index | image AUROC | pixel AUROC | AUPRO@0.3 |", "|---|---:|---:|---:|"]
        lines += [f"| {r.index} | {100 * r.image_auroc:.2f} | {100 * r.pixel_auroc:.2f} | {100 * r.aupro:.2f} |"
                  for r in bench.map_accuracy]
    lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=20, help="test images (spread over good and pitting)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="ONNX Runtime threads for the embeddings")
    parser.add_argument("--skip-map-accuracy", action="store_true", help="skip section 5 (about 2 min)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.images < 1 or args.rounds < 1:
        parser.error("--images and --rounds must be >= 1")
    bench = run(args)
    write_json(args.out / "exact_levers.json", bench)
    text = markdown(bench)
    write_text_atomic(args.out / "exact_levers.md", text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
