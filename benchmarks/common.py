"""Helpers shared by the benchmark scripts: JSON output, machine description, percentiles, cached bundles.

Benchmarks write JSON through :func:`write_json` (temporary name, then rename) and describe the machine
with :func:`machine_info` (CPU model, usable cores, library versions, load average: other work running
at the same time shows up there). Bundles exported from the shared datasets are cached under
``results/bundles/`` (keyed by the export settings and the data; ``--fresh`` in a script re-exports).

Runnable scripts import this as ``from common import ...`` (they put their own folder on ``sys.path``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pcedge.runtime.evaluation.latency import Percentiles
from pcedge.runtime.evaluation.machine import MachineInfo, machine_info
from pcedge.runtime.files import to_jsonable, write_json
from pcedge.runtime.preprocess import list_images

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "results"
BUNDLES = RESULTS / "bundles"
SUBSETS = RESULTS / "subsets"

BSDATA = Path("/work/shared/data/bsdata/ball_screw_drive")
DEEPPCB = Path("/work/shared/data/deeppcb/pcb")

#: The reference implementation (amazon-science/patchcore-inspection) on this machine with the same
#: EfficientNet-Lite0 backbone, as reported to us: context for the latency target, not measured here.
OFFICIAL_MS_PER_IMAGE_CONTEXT = 240.0

__all__ = [
    "BSDATA",
    "BUNDLES",
    "DEEPPCB",
    "MachineInfo",
    "OFFICIAL_MS_PER_IMAGE_CONTEXT",
    "Percentiles",
    "RESULTS",
    "CachedBundle",
    "cached_bundle",
    "load_average",
    "machine_info",
    "summarise",
    "subset_folder",
    "to_jsonable",
    "write_json",
]


def summarise(values_ms: list[float]) -> Percentiles:
    """p50 / p95 / p99 / mean / min of a list of milliseconds."""
    if not values_ms:
        raise ValueError("no measurements to summarise")
    return Percentiles.of(values_ms)


def load_average() -> list[float]:
    """``os.getloadavg()``: runnable processes averaged over 1, 5 and 15 minutes (2 cores here)."""
    return [round(x, 2) for x in os.getloadavg()]


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------------
# Training subsets
# --------------------------------------------------------------------------------------------------


def subset_folder(data: Path, n_images: int, seed: int = 0) -> Path:
    """A folder of symlinks to a seeded random ``n_images`` of ``data/train/good`` (sorted by name).

    The exporter takes a folder of good images; this gives it a subset without copying the data. The same
    ``(data, n_images, seed)`` always gives the same folder and the same images.
    """
    paths = list_images(data / "train" / "good")
    if n_images >= len(paths):
        return data
    chosen = sorted(np.random.default_rng(seed).choice(len(paths), size=n_images, replace=False).tolist())
    folder = SUBSETS / f"{data.name}_{n_images}_seed{seed}"
    wanted = {paths[i].name: paths[i] for i in chosen}
    if folder.is_dir() and {p.name for p in folder.iterdir()} == set(wanted):
        return folder
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name, target in wanted.items():
        (tmp / name).symlink_to(target)
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
    return folder


# --------------------------------------------------------------------------------------------------
# Cached bundles
# --------------------------------------------------------------------------------------------------


@dataclass
class CachedBundle:
    path: Path
    reused: bool  # True: taken from the cache, not exported now
    key: str  # hash of the export settings and the data listing
    settings: dict  # what the key was computed from
    export_seconds: dict[str, float] | None  # the exporter's phases when it was exported (now or then)


def _data_listing(folder: Path) -> list[str]:
    good = folder / "train" / "good"
    images = list_images(good if good.is_dir() else folder)
    return [f"{p.name}:{p.stat().st_size}" for p in images]


def cached_bundle(name: str, data: Path, fresh: bool = False, **overrides) -> CachedBundle:
    """Export ``data`` with ``ExportConfig`` defaults plus ``overrides`` into ``results/bundles/NAME.pcedge``.

    Reused when ``results/bundles/NAME.json`` records the same key (export settings, pcedge version and
    the training files' names and sizes) and the bundle still opens with valid checksums. Note: the key
    does not cover source changes between commits; pass ``fresh=True`` after changing the exporter.
    """
    from pcedge.export.fit import ExportConfig, export_bundle  # torch: imported only when exporting
    from pcedge.runtime.bundle import BundleError, open_bundle
    import pcedge

    defaults = ExportConfig(data=data, output=BUNDLES / f"{name}.pcedge")
    # Not in the key: where and how fast it runs, and the detectability check (it adds a manifest entry but
    # changes neither the memory bank nor the threshold that accuracy benchmarks measure).
    skip = ("output", "progress", "force", "threads", "defect_sizes", "n_detectability")
    settings = {k: v for k, v in dataclasses.asdict(defaults).items() if k not in skip}
    settings.update(overrides)
    settings = json.loads(json.dumps(to_jsonable(settings)))
    listing = _data_listing(data)
    key = hashlib.sha256(json.dumps({"settings": settings, "version": pcedge.__version__, "files": listing},
                                    sort_keys=True).encode()).hexdigest()[:16]
    path = BUNDLES / f"{name}.pcedge"
    record = BUNDLES / f"{name}.json"
    if not fresh and path.is_dir() and record.is_file():
        saved = json.loads(record.read_text())
        if saved.get("key") == key:
            try:
                open_bundle(path, verify=True)
                return CachedBundle(path, True, key, settings, saved.get("export_seconds"))
            except BundleError as exc:
                log(f"cached bundle {path} is unusable ({exc}); exporting again")
    log(f"exporting {data} -> {path} ({', '.join(f'{k}={v}' for k, v in overrides.items()) or 'defaults'})")
    config = dataclasses.replace(defaults, force=True, progress=False, **overrides)
    before = load_average()
    report = export_bundle(config)
    write_json(record, {"key": key, "settings": settings, "data": str(data), "n_train_images": report.n_train_images,
                        "export_seconds": report.seconds, "loadavg_before": before, "loadavg_after": load_average()})
    return CachedBundle(path, False, key, settings, report.seconds)


# --------------------------------------------------------------------------------------------------
# Scoring a bundle on a category, with where each image's highest patch lies
# --------------------------------------------------------------------------------------------------


@dataclass
class ScoredCategory:
    metrics: object  # pcedge.runtime.evaluation.accuracy.AccuracyMetrics
    records: list  # [ImageRecord], in category.test order
    peak_ring: list[int]  # per test image: the highest patch's distance (in patches) to the grid's edge
    ms_per_image: float


def score_category(bundle: Path, category, pixel_size: int = 256, threads: int = 2, index: str = "exact",
                   batch: int = 8) -> ScoredCategory:
    """Every test image of ``category`` through the bundle's detector (ONNX Runtime CPU): metrics at the
    calibrated threshold, per-image records, and the ring (0 = outer) of each image's highest patch.

    Float32 by name (``precision="fp32"``): these benchmarks measure the method beside the paper and its peers,
    which compute in float32; ort-cpu's default, the CPU INT8 graph at its own threshold, is measured by
    ``bench_int8.py --default`` (results/int8_default.md). The other method benchmarks ask for float32 too."""
    from pcedge.runtime.detector import Detector

    with Detector.open(bundle, backend="ort-cpu", index=index, threads=threads, precision="fp32") as detector:
        return score_detector(detector, category, pixel_size, batch)


def score_detector(detector, category, pixel_size: int = 256, batch: int = 8) -> ScoredCategory:
    """:func:`score_category` with a detector already open (e.g. on another graph of the same bundle)."""
    from pcedge.runtime.evaluation.accuracy import AccuracyAccumulator, SeenRegions
    from pcedge.runtime.preprocess import read_image

    acc = AccuracyAccumulator(pixel_size)
    rings: list[int] = []
    total_ms = 0.0
    seen_regions = SeenRegions(detector.geometry)
    items = category.test
    for start in range(0, len(items), batch):
        chunk = items[start : start + batch]
        frames = [read_image(item.path) for item in chunk]
        for item, frame, result in zip(chunk, frames, detector.run_frames(frames, [str(i.path) for i in chunk])):
            seen = seen_regions(frame, str(item.path)) if item.is_anomalous else None
            acc.add(item, result.score, result.anomaly_map, result.anomalous, seen)
            h, w = result.patch_scores.shape
            y, x = np.unravel_index(int(np.argmax(result.patch_scores)), (h, w))
            rings.append(int(min(y, x, h - 1 - y, w - 1 - x)))
            total_ms += result.timings.total_ms
    return ScoredCategory(acc.metrics(), acc.records, rings, total_ms / len(category.test))


def paired_auroc_delta(labels: np.ndarray, scores: np.ndarray, reference: np.ndarray, resamples: int = 2000,
                       seed: int = 0) -> tuple[float, list[float]]:
    """``auroc(scores) - auroc(reference)`` on the same images, and its 95 % stratified paired-bootstrap interval."""
    from pcedge.runtime.evaluation.metrics import auroc

    delta = auroc(labels, scores) - auroc(labels, reference)
    rng = np.random.default_rng(seed)
    good, bad = np.flatnonzero(~labels), np.flatnonzero(labels)
    deltas = np.empty(resamples)
    for i in range(resamples):
        pick = np.concatenate([rng.choice(good, good.size), rng.choice(bad, bad.size)])
        deltas[i] = auroc(labels[pick], scores[pick]) - auroc(labels[pick], reference[pick])
    low, high = np.percentile(deltas, [2.5, 97.5])
    return float(delta), [float(low), float(high)]
