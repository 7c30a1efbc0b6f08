"""Accuracy of a detector on a labelled category (MVTec AD layout), as the paper measures it (`pcedge eval`).

Image level: AUROC, F1-max (the best threshold, in hindsight), precision / recall / F1 at the bundle's
calibrated threshold (the one the device will use), AUROC per defect type. Pixel level: AUROC and AUPRO
up to FPR 0.3 (:mod:`pcedge.runtime.evaluation.metrics`), computed on maps and masks brought to a stated resolution:
by default the original resolution scaled down so that the longer side is at most 256 px (masks by
nearest neighbour, maps by area averaging over the seen pixels). Pixels the model did not see (outside a
centre crop) are NaN in the map and count as the lowest score; masks that reach into that region are
counted and reported, since no model setting can find those defects.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

import cv2
import numpy as np

from ..preprocess import fit_geometry, read_image
from .dataset import Category, TestItem, read_mask
from .metrics import PrecisionRecallF1, aupro, auroc, f1_max, pixel_auroc, precision_recall_f1

#: The paper's (and MVTec AD's) PRO integration limit.
FPR_LIMIT = 0.3
#: Default longest side of the pixel-metric resolution.
DEFAULT_PIXEL_SIZE = 256




@dataclass
class ImageRecord:
    path: str
    label: str  # "good" or the defect type
    is_anomalous: bool
    score: float  # raw image score (Eq. 7)
    predicted_anomalous: bool | None  # at the calibrated threshold (None when there is none, e.g. the reference)


@dataclass
class DefectTypeMetrics:
    label: str
    n_images: int
    image_auroc: float  # this defect type's images against all good test images


@dataclass
class CoverageReport:
    """Defect masks against the region the model sees (Placement.seen_mask of the bundle's geometry)."""

    n_defect_masks: int = 0
    n_wholly_outside: int = 0  # no defect pixel seen: undetectable at pixel level
    n_partly_outside: int = 0  # some defect pixels unseen
    n_empty: int = 0  # defect images whose mask marks no pixel
    unseen_defect_pixel_fraction: float = 0.0  # over all defect pixels, at the original resolution
    files: list[str] = field(default_factory=list)  # the masks wholly or partly outside

    @property
    def n_affected(self) -> int:
        return self.n_wholly_outside + self.n_partly_outside


@dataclass
class AccuracyMetrics:
    n_good: int
    n_anomalous: int
    image_auroc: float
    image_f1_max: float
    image_f1_max_threshold: float
    pixel_auroc: float
    aupro: float
    aupro_fpr_limit: float
    pixel_resolution: str  # e.g. "256x104 (longer side <= 256; masks nearest, maps area)"
    per_defect: list[DefectTypeMetrics]
    at_threshold: PrecisionRecallF1 | None  # at the calibrated threshold (None without predictions)


@dataclass
class EvalReport:
    bundle: str
    data: str
    category: str
    backend: str
    threshold: float
    metrics: AccuracyMetrics
    coverage: CoverageReport
    mean_ms_per_image: float  # preprocess + backbone + index + scoring (decoding excluded)
    seconds: float  # wall time of the whole evaluation
    images: list[ImageRecord]


# --------------------------------------------------------------------------------------------------
# Pixel-metric resolution
# --------------------------------------------------------------------------------------------------


def eval_size(height: int, width: int, pixel_size: int) -> tuple[int, int]:
    """``(h, w)`` with the longer side at most ``pixel_size`` (aspect kept); ``pixel_size <= 0``: unchanged."""
    if pixel_size <= 0 or max(height, width) <= pixel_size:
        return height, width
    scale = pixel_size / max(height, width)
    return max(1, int(round(height * scale))), max(1, int(round(width * scale)))


def downscale_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """bool ``[H, W]`` -> bool ``[h, w]`` by nearest neighbour (labels are not averaged)."""
    if mask.shape == size:
        return mask
    return cv2.resize(mask.astype(np.uint8), (size[1], size[0]), interpolation=cv2.INTER_NEAREST) > 0


def downscale_map(anomaly_map: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """float32 ``[H, W]`` (NaN = unseen) -> ``[h, w]`` by area averaging over the seen pixels only.

    A low-resolution pixel that covers seen and unseen pixels gets the mean of its seen ones; one that
    covers only unseen pixels stays NaN. (A plain INTER_AREA would turn every border pixel NaN.)
    """
    if anomaly_map.shape == size:
        return anomaly_map.astype(np.float32, copy=False)
    seen = np.isfinite(anomaly_map)
    dsize = (size[1], size[0])
    if seen.all():
        return cv2.resize(anomaly_map.astype(np.float32), dsize, interpolation=cv2.INTER_AREA)
    total = cv2.resize(np.where(seen, anomaly_map, 0.0).astype(np.float32), dsize, interpolation=cv2.INTER_AREA)
    weight = cv2.resize(seen.astype(np.float32), dsize, interpolation=cv2.INTER_AREA)
    out = np.full(size, np.nan, dtype=np.float32)
    np.divide(total, weight, out=out, where=weight > 1e-6)
    return out


# --------------------------------------------------------------------------------------------------
# Accumulating results and computing the metrics
# --------------------------------------------------------------------------------------------------


class AccuracyAccumulator:
    """Collects one image at a time (score, full-resolution map, mask) and computes :class:`AccuracyMetrics`.

    Only the downscaled maps and masks are kept, so memory is about 5 bytes per low-resolution pixel.
    Used by ``pcedge eval`` and by the accuracy benchmark (for pcedge and the reference alike).
    """

    def __init__(self, pixel_size: int = DEFAULT_PIXEL_SIZE):
        self.pixel_size = pixel_size
        self.records: list[ImageRecord] = []
        self.maps: list[np.ndarray] = []  # [h, w] float32, NaN = unseen
        self.masks: list[np.ndarray] = []  # [h, w] bool
        self.sizes: dict[tuple[int, int], tuple[int, int]] = {}  # original -> evaluation size
        self.coverage = CoverageReport()
        self._defect_pixels = 0
        self._unseen_defect_pixels = 0

    def add(self, item: TestItem, score: float, anomaly_map: np.ndarray, predicted: bool | None = None,
            seen: np.ndarray | None = None) -> None:
        """One test image: its raw score, its map ``[H, W]`` in original coordinates (NaN = unseen), the
        verdict at the calibrated threshold, and the model's seen region ``[H, W]`` bool (for coverage)."""
        hw = anomaly_map.shape
        mask = read_mask(item.mask_path, hw)
        if item.is_anomalous:
            self._count_coverage(item, mask, seen)
        size = eval_size(hw[0], hw[1], self.pixel_size)
        self.sizes[hw] = size
        self.maps.append(downscale_map(anomaly_map, size))
        self.masks.append(downscale_mask(mask, size))
        self.records.append(ImageRecord(str(item.path), item.label, item.is_anomalous, float(score), predicted))

    def _count_coverage(self, item: TestItem, mask: np.ndarray, seen: np.ndarray | None) -> None:
        cov = self.coverage
        cov.n_defect_masks += 1
        n_defect = int(mask.sum())
        if n_defect == 0:
            cov.n_empty += 1
            return
        if seen is None:
            return
        n_unseen = int((mask & ~seen).sum())
        self._defect_pixels += n_defect
        self._unseen_defect_pixels += n_unseen
        if n_unseen == n_defect:
            cov.n_wholly_outside += 1
        elif n_unseen:
            cov.n_partly_outside += 1
        if n_unseen:
            cov.files.append(str(item.mask_path))
        cov.unseen_defect_pixel_fraction = self._unseen_defect_pixels / max(1, self._defect_pixels)

    def resolution_note(self) -> str:
        sizes = sorted(set(self.sizes.values()))
        shown = ", ".join(f"{w}x{h}" for h, w in sizes[:4]) + (", ..." if len(sizes) > 4 else "")
        if self.pixel_size <= 0:
            return f"{shown} (WxH, the masks' own resolution)"
        return f"{shown} (WxH, longer side <= {self.pixel_size}; masks nearest, maps area over seen pixels)"

    def metrics(self) -> AccuracyMetrics:
        labels = np.array([r.is_anomalous for r in self.records])
        scores = np.array([r.score for r in self.records], dtype=np.float64)
        f1, f1_threshold = f1_max(labels, scores)
        good = ~labels
        per_defect = []
        for label in sorted({r.label for r in self.records if r.is_anomalous}):
            mine = np.array([r.label == label for r in self.records])
            keep = good | mine
            per_defect.append(DefectTypeMetrics(label, int(mine.sum()), auroc(labels[keep], scores[keep])))
        predictions = [r.predicted_anomalous for r in self.records]
        at_threshold = None if any(p is None for p in predictions) else precision_recall_f1(labels, predictions)
        return AccuracyMetrics(
            n_good=int(good.sum()),
            n_anomalous=int(labels.sum()),
            image_auroc=auroc(labels, scores),
            image_f1_max=f1,
            image_f1_max_threshold=f1_threshold,
            pixel_auroc=pixel_auroc(self.masks, self.maps),
            aupro=aupro(self.masks, self.maps, FPR_LIMIT),
            aupro_fpr_limit=FPR_LIMIT,
            pixel_resolution=self.resolution_note(),
            per_defect=per_defect,
            at_threshold=at_threshold,
        )


# --------------------------------------------------------------------------------------------------
# Running a bundle over a category
# --------------------------------------------------------------------------------------------------


class SeenRegions:
    """The model's seen region per original image size (it depends on the size and the geometry only)."""

    def __init__(self, geometry):
        self.geometry = geometry
        self._cache: dict[tuple[int, int], np.ndarray] = {}

    def __call__(self, frame: np.ndarray, source: str) -> np.ndarray:
        hw = frame.shape[:2]
        if hw not in self._cache:
            _, placement = fit_geometry(frame, self.geometry, source)
            self._cache[hw] = placement.seen_mask()
        return self._cache[hw]


def evaluate(detector, category: Category, pixel_size: int = DEFAULT_PIXEL_SIZE, batch: int = 8,
             progress: bool = True, accumulator: AccuracyAccumulator | None = None,
             ) -> tuple[AccuracyMetrics, CoverageReport, float, list[ImageRecord]]:
    """Score every test image of ``category``: ``(metrics, coverage, mean ms per image, per-image records)``.

    Pass an empty ``accumulator`` to keep the downscaled maps and masks afterwards (the report's PRO curve).

    Raises :class:`~pcedge.runtime.preprocess.ImageError` / :class:`~pcedge.runtime.evaluation.dataset.DatasetError`
    naming the file for an unreadable image or a mask that does not fit its image.
    """
    acc = accumulator if accumulator is not None else AccuracyAccumulator(pixel_size)
    seen_regions = SeenRegions(detector.geometry)
    items = category.test
    total_ms = 0.0
    next_report = 0.0
    for start in range(0, len(items), batch):
        chunk = items[start : start + batch]
        frames = [read_image(item.path) for item in chunk]
        results = detector.run_frames(frames, [str(item.path) for item in chunk])
        for item, frame, result in zip(chunk, frames, results):
            seen = seen_regions(frame, str(item.path)) if item.is_anomalous else None
            acc.add(item, result.score, result.anomaly_map, result.anomalous, seen)
            total_ms += result.timings.total_ms
        done = start + len(chunk)
        if progress and (done / len(items) >= next_report or done == len(items)):
            print(f"  scored {done}/{len(items)} images", file=sys.stderr)
            next_report += 0.25
    return acc.metrics(), acc.coverage, total_ms / len(items), acc.records


# --------------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------------


def format_report(report: EvalReport) -> str:
    m = report.metrics
    lines = [
        f"{report.category}: {m.n_good} good, {m.n_anomalous} defective test images; {report.backend}",
        "",
        f"  {'metric':34s} value",
        f"  {'image AUROC':34s} {m.image_auroc:.4f}",
        f"  {'pixel AUROC':34s} {m.pixel_auroc:.4f}",
        f"  {f'AUPRO (FPR <= {m.aupro_fpr_limit:g})':34s} {m.aupro:.4f}",
        f"  {'image F1-max':34s} {m.image_f1_max:.4f}   (at score >= {m.image_f1_max_threshold:.4f})",
    ]
    if m.at_threshold is not None:
        t = m.at_threshold
        lines.append(
            f"  {f'at calibrated threshold {report.threshold:.4f}':34s} precision {t.precision:.4f}  "
            f"recall {t.recall:.4f}  F1 {t.f1:.4f}   (tp {t.tp}, fp {t.fp}, fn {t.fn}, tn {t.tn})"
        )
    lines.append(f"  pixel metrics at {m.pixel_resolution}")
    lines.append("")
    lines.append(f"  {'defect type':24s} {'images':>6s}  image AUROC (vs all good)")
    for d in m.per_defect:
        lines.append(f"  {d.label:24s} {d.n_images:6d}  {d.image_auroc:.4f}")
    lines.append("")
    lines.append(f"  mean {report.mean_ms_per_image:.1f} ms per image (decode excluded); {report.seconds:.1f} s in all")
    return "\n".join(lines)


def coverage_warning(coverage: CoverageReport) -> str | None:
    empty = (f"warning: {coverage.n_empty} defect images have an empty mask (no defect pixel); they count for "
             "the image metrics only") if coverage.n_empty else None
    if not coverage.n_affected:
        return empty
    shown = "\n    ".join(coverage.files[:10]) + ("\n    ..." if len(coverage.files) > 10 else "")
    return (
        f"warning: {coverage.n_affected} of {coverage.n_defect_masks} defect masks lie outside the region the model "
        f"sees ({coverage.n_wholly_outside} wholly, {coverage.n_partly_outside} partly; "
        f"{100 * coverage.unseen_defect_pixel_fraction:.1f}% of all defect pixels unseen). Those pixels count as "
        f"missed. A geometry that keeps the whole frame (pcedge export --mode stretch or letterbox) sees them:\n    {shown}"
    ) + (f"\n{empty}" if empty else "")


