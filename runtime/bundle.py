"""The bundle: the contract between the exporter (workstation) and the runtime (device).

A bundle is a directory (``NAME.pcedge/``) holding

- ``manifest.json``   -- everything below as JSON (schema :data:`SCHEMA_VERSION`), with the sha256 and
                          size of every other file;
- ``model.onnx``      -- the patch embedder: images ``[B, 3, H, W]`` float32 RGB in [0, 1] ->
                          embeddings ``[B, h*w, D]`` float32;
- ``memory_bank.npy`` -- the coreset, float32 ``[N, D]``: the source of truth for every index;
- ``index.hnsw``      -- an hnswlib index over the memory bank (rebuildable from it);
- ``check/``          -- reference inputs, embeddings and scores for ``pcedge verify``;
- ``engines/``        -- TensorRT plans built on the device;
- ``manifest.sig``    -- optional Ed25519 signature over the manifest (:mod:`signing`, ``pcedge sign``).

Opening a bundle validates the whole manifest once against one schema (:mod:`manifest_schema`: field
types from the dataclasses below, range rules, every file the runtime reads listed and confined to the
bundle), then every listed file's size and sha256.

This module is the only place that knows the on-disk layout: the exporter writes through
:class:`BundleWriter`, the runtime reads through :func:`open_bundle`. It depends on the standard library
and numpy only.
"""

from __future__ import annotations

import ctypes
import dataclasses
import errno
import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import manifest_schema
from .files import remove_stale_temporaries, temporary_prefix, write_text_atomic
from .signing import SIGNATURE, SignatureError, verify_manifest_signature

FORMAT = "pcedge-bundle"
#: Readers accept manifests up to this version and refuse newer ones.
SCHEMA_VERSION = 1

MANIFEST = "manifest.json"
MODEL_FILE = "model.onnx"
MODEL_FP16_FILE = "model_fp16.onnx"  # float16 compute, float32 I/O (TensorRT 11 FP16, ORT CUDA fp16)
MODEL_INT8_FILE = "model_int8.onnx"  # explicitly quantised (QDQ, symmetric), float32 I/O (TensorRT INT8, ORT CUDA)
MODEL_INT8_CPU_FILE = "model_int8_cpu.onnx"  # QDQ, uint8 activations (U8S8), float32 I/O: ONNX Runtime CPU
MEMORY_BANK_FILE = "memory_bank.npy"
INDEX_FILE = "index.hnsw"
CHECK_DIR = "check"
ENGINES_DIR = "engines"


class BundleError(Exception):
    """A bundle that cannot be used: missing, tampered, too new, or malformed. The message names the file."""


# --------------------------------------------------------------------------------------------------
# Manifest sections. Every field has a default so that older manifests (fewer keys) still load.
# --------------------------------------------------------------------------------------------------


@dataclass
class Geometry:
    """How a decoded image becomes the network input (shared by exporter and runtime).

    mode:
      - ``stretch``   -- resize the whole frame to ``width x height`` (aspect ratio not kept);
      - ``letterbox`` -- resize keeping the aspect ratio, pad the rest with ``pad_value``;
      - ``crop``      -- the paper's MVTec protocol: resize the shorter side to ``resize``, centre-crop
                         ``width x height`` (parts of the frame are not seen).
    """

    mode: str = "stretch"
    height: int = 224
    width: int = 224
    resize: int = 256  # shorter side before the crop; used by mode "crop" only
    pad_value: float = 0.5  # letterbox padding, in [0, 1] RGB (mid-grey: no artificial edges)


@dataclass
class InputSpec:
    name: str = "images"
    shape: list[Any] = field(default_factory=lambda: ["batch", 3, 224, 224])
    dtype: str = "float32"
    colour_order: str = "RGB"
    value_range: list[float] = field(default_factory=lambda: [0.0, 1.0])
    geometry: Geometry = field(default_factory=Geometry)
    # The backbone's own normalisation happens inside the graph; this says which one.
    normalisation: str = "in graph"
    # The batch range device engines are built for by default (`pcedge build-engine`, the ONNX Runtime
    # TensorRT-EP profile); larger batches are split into chunks of max_batch.
    opt_batch: int = 1
    max_batch: int = 8


@dataclass
class OutputSpec:
    name: str = "embeddings"
    shape: list[Any] = field(default_factory=lambda: ["batch", 784, 152])
    grid_h: int = 28
    grid_w: int = 28
    dim: int = 152
    stride: int = 8


@dataclass
class ParityReport:
    """ONNX Runtime CPU versus torch on real images, measured at export time."""

    n_images: int = 0
    max_abs_diff: float = 0.0
    max_rel_error: float = 0.0  # max |onnx - torch| / max |torch|
    min_cosine: float = 1.0


@dataclass
class Int8Report:
    """The INT8 graph against the float32 graph, measured at export time (ONNX Runtime CPU, same memory bank).

    Both graphs score the same good images (held-out or out-of-fold ones, and the check images) against the
    same banks; ``score_rel_error_*`` is ``|int8 - fp32| / fp32`` per image score. The gate: the INT8 graph
    ships only when ``score_rel_error_median <= tolerance``; otherwise ``shipped`` is false, ``reason`` says
    why, and the bundle holds no such graph (``ModelSpec.int8_file`` / ``int8_cpu_file`` is None).
    """

    # Which graph: "tensorrt" (model_int8.onnx, symmetric) or "cpu" (model_int8_cpu.onnx, U8S8). Bundles
    # written before the CPU graph existed have the TensorRT one only.
    target: str = "tensorrt"
    calibration: str = ""  # activation-range method: minmax | entropy | percentile
    n_calibration_images: int = 0  # training images the ranges were read from
    quantised_ops: list[str] = field(default_factory=list)  # op types given INT8 inputs
    float_convs: int = 0  # convolutions left float (the stem and the depthwise ones)
    n_images: int = 0  # good images both graphs scored
    images: str = ""  # which images those were
    min_cosine: float = 1.0  # per patch embedding, INT8 vs float32
    mean_cosine: float = 1.0
    score_rel_error_max: float = 0.0
    score_rel_error_median: float = 0.0
    # Image AUROC of both graphs on the --data category's test split (None when it has none).
    n_test_images: int = 0
    auroc_fp32: float | None = None
    auroc_int8: float | None = None
    auroc_delta: float | None = None  # int8 - fp32
    tolerance: float = 0.02  # on score_rel_error_median
    shipped: bool = False
    reason: str = ""
    # This graph's own image-score threshold, calibrated exactly as ``Manifest.threshold`` is but on the
    # scores this graph gives the same good images (export/int8_threshold.py): INT8 moves image scores, so
    # the float32 threshold would shift the false-alarm rate. None in bundles written before it existed
    # and for a graph the gate refused; ONNX Runtime CPU runs its INT8 graph by default only with one.
    threshold: ThresholdSpec | None = None

    def summary(self) -> str:
        """One line for ``info`` and ``export``: the verdict and the figures it rests on."""
        auroc = (f"; image AUROC {self.auroc_fp32:.4f} -> {self.auroc_int8:.4f} ({self.auroc_delta:+.4f}) on "
                 f"{self.n_test_images} test images" if self.auroc_delta is not None else "")
        verdict = "shipped" if self.shipped else "NOT shipped"
        return (f"{verdict} ({self.reason}); {self.calibration} calibration on {self.n_calibration_images} images, "
                f"{self.float_convs} convolutions left float; vs float32 on {self.n_images} good images: cosine "
                f"min {self.min_cosine:.4f} mean {self.mean_cosine:.4f}, image-score change median "
                f"{self.score_rel_error_median:.2%} max {self.score_rel_error_max:.2%}{auroc}")


@dataclass
class ModelSpec:
    file: str = MODEL_FILE
    backbone: str = "efficientnet_lite0"
    weights: str = ""  # where the weights came from (package, file, download, or "random")
    layers: list[str] = field(default_factory=list)
    layer_channels: list[int] = field(default_factory=list)
    layer_strides: list[int] = field(default_factory=list)
    aggregation: str = "avg_pool 3x3, stride 1, same size"
    # How the 3x3 average fills a border patch's neighbourhood (pcedge.export.embedder.BORDERS). Bundles
    # written before this field averaged the real neighbours only: "mean".
    border: str = "mean"
    upsample: str = "bilinear to the stride-8 grid"
    projection_dim: int | None = None  # None: no projection (D = sum of layer channels)
    opset: int = 18
    parity: ParityReport = field(default_factory=ParityReport)
    # The same graph computing in float16 with float32 inputs and outputs (TensorRT 11's strongly typed
    # FP16 engines, ONNX Runtime CUDA fp16); None when the bundle has none. Its parity is against model.onnx.
    fp16_file: str | None = None
    fp16_parity: ParityReport = field(default_factory=ParityReport)
    # The explicitly quantised graph (QDQ, float32 inputs and outputs); None when the bundle has none
    # (exported before it existed, with --no-int8, or refused by the parity gate: ``int8.reason``).
    int8_file: str | None = None
    int8: Int8Report | None = None
    # The INT8 graph for ONNX Runtime CPU (U8S8, every convolution integer; TensorRT cannot build it), with
    # its own gate figures; None when the bundle has none (older exports run model_int8.onnx on the CPU).
    int8_cpu_file: str | None = None
    int8_cpu: Int8Report | None = None


@dataclass
class MemoryBankSpec:
    file: str = MEMORY_BANK_FILE
    n: int = 0
    dim: int = 0
    dtype: str = "float32"
    n_features_total: int = 0  # patch features of all training images, before the coreset
    n_train_images: int = 0
    coreset: str = "greedy"  # "greedy" (paper §3.2) or "none" (the full bank)
    coreset_ratio: float = 1.0  # n / n_features_total
    projection_dim: int = 128  # the random projection used only to *select* the coreset
    seed: int = 0
    coverage_radius: float = 0.0  # max over bank features of the distance to the nearest coreset feature
    selection_seconds: float = 0.0


@dataclass
class IndexSpec:
    kind: str = "hnsw"
    file: str | None = INDEX_FILE
    space: str = "l2"  # hnswlib's l2 is the *squared* distance; the runtime takes the root
    M: int = 16
    ef_construction: int = 200
    ef: int = 32  # default query-time ef (always raised to at least k)
    seed: int = 100


@dataclass
class ScoringSpec:
    k: int = 1  # nearest neighbours per patch (the patch score uses the first)
    reweight: bool = True  # the paper's Eq. 7 image-score re-weighting
    reweight_b: int = 9  # |N_b(m*)|: support neighbours of m* used by Eq. 7
    blur_sigma: float = 4.0  # Gaussian sigma of the anomaly map at blur_reference_size pixels
    blur_reference_size: int = 224


@dataclass
class ThresholdSpec:
    """The image-score threshold, calibrated on good images only (out-of-fold or held-out scores).

    The normalised score is ``clip(0.5 + 0.5 * (score - value) / scale, 0, 1)``: the threshold maps to 0.5
    and the lowest held-out nominal score (``value - scale``) to 0.
    """

    value: float = 0.0
    scale: float = 1.0
    method: str = ""
    target_fpr: float = 0.01
    n_images: int = 0
    source: str = ""  # "val dir ...", "out-of-fold scores of ..." or "held-out fraction ... of train"
    nominal_scores: list[float] = field(default_factory=list)  # the calibration scores, for reporting
    # The false-alarm rate a new good image meets at ``value``, estimated from the calibration scores
    # (exchangeable with a new one): n_above of n exceed the threshold -> Beta(n_above + 1, n - n_above).
    # None in bundles written before these fields existed.
    expected_fpr: float | None = None  # the Beta's mean, (n_above + 1) / (n + 1)
    fpr_interval: list[float] | None = None  # its central interval at ``confidence``, [low, high]
    confidence: float = 0.95
    n_above: int | None = None  # calibration scores above the threshold
    folds: int = 0  # k of the out-of-fold calibration; 0: held-out images

    def false_alarm_summary(self) -> str:
        """One line for ``info`` and ``export``: the estimated false-alarm rate and its interval."""
        if self.expected_fpr is None or self.fpr_interval is None:
            return "false-alarm rate not estimated (bundle written before pcedge recorded it)"
        low, high = self.fpr_interval
        # A threshold above every calibration score: Beta(1, n) bounds the rate from above.
        bound = "at most " if self.n_above == 0 else ""
        return (f"expected false-alarm rate {bound}{self.expected_fpr:.2%} on good parts "
                f"({self.confidence:.0%} interval {low:.2%} to {high:.2%}; {self.n_above} of "
                f"{self.n_images} calibration scores above the threshold)")


@dataclass
class CheckSpec:
    """Reference data for ``pcedge verify``: the exporter's own outputs on a few real images."""

    images: str | None = None  # [n, 3, H, W] float32 network inputs
    embeddings: str | None = None  # [n, h*w, D] float32, from torch at export time
    scores: str | None = None  # [n] float32 image scores with the exact index
    names: list[str] = field(default_factory=list)


@dataclass
class EngineSpec:
    """A TensorRT plan built on a device (``engines/<sm>-<device>-trt<version>-<precision>[-hc][-vc].engine``)."""

    file: str = ""
    sm: str = ""  # compute capability, e.g. "sm87"
    trt_version: str = ""  # the exact tensorrt.__version__ that built it
    precision: str = "fp32"
    min_batch: int = 1
    opt_batch: int = 1
    max_batch: int = 1
    built_at: str = ""
    device_name: str = ""
    workspace_mb: int = 0
    device_key: str = ""  # name slug and SM count, e.g. "orin-16sm" (runtime.tensorrt.engines.device_key)
    hardware_compat: str = "none"  # TensorRT HardwareCompatibilityLevel: none | ampere_plus | same_compute_capability
    version_compatible: bool = False  # BuilderFlag.VERSION_COMPATIBLE: runs on later TensorRT of the same major


@dataclass
class DetectabilitySpec:
    """Whether this input size can see small defects at all: synthetic defects pasted into good images the
    bank does not hold, scored like the device scores, per defect size (a fraction of the input's shorter
    side). Written by the exporter; None in bundles from before it existed or exported without it."""

    method: str = ""
    n_images: int = 0
    side_fractions: list[float] = field(default_factory=list)  # defect side / the input's shorter side
    pixels: list[float] = field(default_factory=list)  # the same, in network input pixels
    flagged: list[float] = field(default_factory=list)  # fraction of images above the threshold, per size
    flagged_without_defect: float = 0.0  # the same images unchanged (their false alarms)
    smallest_seen: float | None = None  # smallest side fraction flagged in at least half the images
    warning: str | None = None

    def summary(self) -> str:
        """One line for ``info`` and ``export``: the flag rate per defect size."""
        parts = [f"{100 * f:g} % ({p:.0f} px) {r:.0%}" for f, p, r in zip(self.side_fractions, self.pixels, self.flagged)]
        return (f"synthetic defects flagged by size (side, input px): {', '.join(parts)}; without a defect "
                f"{self.flagged_without_defect:.0%} ({self.n_images} images)")


@dataclass
class FileEntry:
    sha256: str
    size: int


@dataclass
class Manifest:
    format: str = FORMAT
    schema_version: int = SCHEMA_VERSION
    created: str = ""
    exporter: dict[str, str] = field(default_factory=dict)  # package -> version
    input: InputSpec = field(default_factory=InputSpec)
    output: OutputSpec = field(default_factory=OutputSpec)
    model: ModelSpec = field(default_factory=ModelSpec)
    memory_bank: MemoryBankSpec = field(default_factory=MemoryBankSpec)
    index: IndexSpec = field(default_factory=IndexSpec)
    scoring: ScoringSpec = field(default_factory=ScoringSpec)
    threshold: ThresholdSpec = field(default_factory=ThresholdSpec)
    check: CheckSpec = field(default_factory=CheckSpec)
    detectability: DetectabilitySpec | None = None
    engines: list[EngineSpec] = field(default_factory=list)
    files: dict[str, FileEntry] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=False) + "\n"

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = MANIFEST) -> "Manifest":
        """Build from parsed JSON, checking every field's type (:mod:`manifest_schema`); ranges are
        checked by :func:`read_manifest` (:func:`validate`)."""
        try:
            return manifest_schema.build(cls, data, source)
        except manifest_schema.SchemaError as exc:
            raise BundleError(str(exc)) from exc

    def validate(self, source: str = MANIFEST) -> "Manifest":
        """The range and cross-field rules (positive threshold, grid vs input, confined listed paths, ...)."""
        try:
            manifest_schema.check_ranges(self, source, SCHEMA_VERSION, FORMAT, MANIFEST)
        except manifest_schema.SchemaError as exc:
            raise BundleError(str(exc)) from exc
        return self


# --------------------------------------------------------------------------------------------------
# Checksums
# --------------------------------------------------------------------------------------------------


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def file_entry(root: Path, rel: str) -> FileEntry:
    path = root / rel
    return FileEntry(sha256=sha256_file(path), size=path.stat().st_size)


#: ONNX Runtime's TensorRT execution provider rewrites its engine cache here whenever it likes; checksumming
#: it would make the bundle fail verification after every run, so it is left out of the manifest.
ORT_TRT_CACHE_DIR = f"{ENGINES_DIR}/ort-trt"


def _listed_files(root: Path) -> list[str]:
    """Every regular file below ``root`` except the manifest and runtime caches, as sorted POSIX paths."""
    out = []
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if rel.startswith(ORT_TRT_CACHE_DIR + "/"):
            continue
        if path.is_file() and rel not in (MANIFEST, SIGNATURE) and not path.name.endswith(".tmp"):
            out.append(rel)
    return out


# --------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------


@dataclass
class Bundle:
    """An opened, verified bundle: its directory and manifest."""

    root: Path
    manifest: Manifest

    def path(self, rel: str) -> Path:
        return self.root / rel

    @property
    def model_path(self) -> Path:
        return self.root / self.manifest.model.file

    @property
    def fp16_model_path(self) -> Path | None:
        """The float16 graph (float32 inputs and outputs) beside model.onnx, or None if the bundle has none."""
        rel = self.manifest.model.fp16_file
        return self.root / rel if rel else None

    @property
    def int8_model_path(self) -> Path | None:
        """The INT8 (QDQ) graph beside model.onnx, or None if the bundle has none (or its gate refused it)."""
        rel = self.manifest.model.int8_file
        return self.root / rel if rel else None

    @property
    def int8_cpu_model_path(self) -> Path | None:
        """The INT8 graph for ONNX Runtime CPU (U8S8 QDQ), or None if the bundle has none."""
        rel = self.manifest.model.int8_cpu_file
        return self.root / rel if rel else None

    @property
    def memory_bank_path(self) -> Path:
        return self.root / self.manifest.memory_bank.file

    @property
    def index_path(self) -> Path | None:
        rel = self.manifest.index.file
        return self.root / rel if rel and (self.root / rel).exists() else None

    def load_memory_bank(self):
        """The coreset, float32 ``[N, D]`` (memory-mapped read-only, then copied contiguous)."""
        import numpy as np

        path = self.memory_bank_path
        try:
            bank = np.load(path, allow_pickle=False)
        except (ValueError, OSError, EOFError) as exc:  # pickled object arrays are refused here too
            raise BundleError(f"{path}: not a readable .npy array ({exc})") from exc
        spec = self.manifest.memory_bank
        if not isinstance(bank, np.ndarray):  # an .npz archive under the .npy name
            raise BundleError(f"{path}: not a .npy array (found {type(bank).__name__})")
        # dtype equality is exact: float64 and big-endian '>f4' are refused, not silently converted.
        if bank.dtype != np.float32 or bank.ndim != 2 or bank.shape != (spec.n, spec.dim):
            raise BundleError(
                f"{path}: expected float32 [{spec.n}, {spec.dim}] as the manifest says, "
                f"found {bank.dtype} {list(bank.shape)}"
            )
        return np.ascontiguousarray(bank)

    def load_check_arrays(self):
        """``(images [n,3,H,W], embeddings [n,h*w,D], scores [n])`` stored at export time, or None.

        Each array is checked: float32 in native byte order, shapes from the manifest, finite values;
        :class:`BundleError` names the file and what is wrong.
        """
        import numpy as np

        m = self.manifest
        spec = m.check
        if not (spec.images and spec.embeddings and spec.scores):
            return None
        arrays = []
        for rel in (spec.images, spec.embeddings, spec.scores):
            path = self.path(rel)
            try:
                array = np.load(path, allow_pickle=False)
            except (ValueError, OSError, EOFError) as exc:
                raise BundleError(f"{path}: not a readable .npy array ({exc})") from exc
            if not isinstance(array, np.ndarray) or array.dtype != np.float32:
                found = array.dtype if isinstance(array, np.ndarray) else type(array).__name__
                raise BundleError(f"{path}: expected a float32 array, found {found}")
            arrays.append(array)
        images, emb, scores = arrays
        n = scores.shape[0] if scores.ndim == 1 else -1
        g, out = m.input.geometry, m.output
        expected = (
            (spec.images, images, (n, 3, g.height, g.width)),
            (spec.embeddings, emb, (n, out.grid_h * out.grid_w, out.dim)),
            (spec.scores, scores, (n,)),
        )
        for rel, array, shape in expected:
            if n < 1 or array.shape != shape:
                raise BundleError(f"{self.path(rel)}: shape {list(array.shape)}, expected {list(shape)} from the manifest")
            if not np.isfinite(array).all():
                raise BundleError(f"{self.path(rel)}: contains NaN or infinite values")
        return images, emb, scores

    def update_manifest(self, manifest: Manifest) -> None:
        """Rewrite the manifest atomically (temp file + rename), recomputing every file's checksum."""
        manifest.files = {rel: file_entry(self.root, rel) for rel in _listed_files(self.root)}
        write_text_atomic(self.root / MANIFEST, manifest.to_json())
        self.manifest = manifest


def read_manifest(root: Path) -> Manifest:
    root = Path(root)
    path = root / MANIFEST
    if not root.exists():
        raise BundleError(f"{root}: no such bundle directory")
    if not root.is_dir():
        raise BundleError(f"{root}: a bundle is a directory (NAME.pcedge/); use `pcedge unpack` for archives")
    if not path.is_file():
        raise BundleError(f"{path}: missing; {root} is not a pcedge bundle")
    size = path.stat().st_size
    if size > manifest_schema.MAX_MANIFEST_BYTES:
        raise BundleError(f"{path}: {size} bytes; a manifest is at most {manifest_schema.MAX_MANIFEST_BYTES} bytes")
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BundleError(f"{path}: not valid JSON ({exc})") from exc
    except RecursionError as exc:
        raise BundleError(f"{path}: nested too deeply to be a pcedge manifest") from exc
    except OSError as exc:
        raise BundleError(f"{path}: cannot be read ({exc})") from exc
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise BundleError(f"{path}: not a pcedge manifest (format is {data.get('format') if isinstance(data, dict) else None!r})")
    version = data.get("schema_version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise BundleError(f"{path}: schema_version missing or not an integer")
    if version > SCHEMA_VERSION:
        raise BundleError(
            f"{path}: schema_version {version} is newer than this pcedge reads ({SCHEMA_VERSION}); "
            "upgrade pcedge on this device"
        )
    # One schema, checked once on open: types from the dataclass tree, then ranges and listed paths.
    return Manifest.from_dict(data, source=str(path)).validate(str(path))


def confined(root: Path, rel: str) -> Path:
    """``root / rel``, refusing a path that leaves the bundle directory (``..``, absolute, or a symlink out)."""
    if not manifest_schema.confined_relpath(rel):
        raise BundleError(f"{root / MANIFEST}: {rel!r} is not a path inside the bundle")
    path = root / rel
    if not path.resolve().is_relative_to(root.resolve()):
        raise BundleError(f"{path}: resolves outside the bundle ({path.resolve()}); refused")
    return path


def verify_files(root: Path, manifest: Manifest) -> None:
    """Check every listed file's size and sha256; raise :class:`BundleError` naming the first bad file."""
    for rel, entry in manifest.files.items():
        path = confined(root, rel)
        if not path.is_file():
            raise BundleError(f"{path}: listed in the manifest but missing")
        size = path.stat().st_size
        if size != entry.size:
            raise BundleError(f"{path}: size {size} bytes, manifest says {entry.size}: the file was changed")
        if sha256_file(path) != entry.sha256:
            raise BundleError(f"{path}: sha256 does not match the manifest: the file was changed or corrupted")


def open_bundle(root: str | os.PathLike[str], verify: bool = True, trust=None) -> Bundle:
    """Open a bundle directory; with ``verify`` every file's checksum is checked first.

    ``trust``: an Ed25519 public key (PEM file path or key object). The bundle must then carry a valid
    signature by that key (``manifest.sig``, see :mod:`signing`), checked before anything else is read,
    and every checksum is verified whatever ``verify`` says: unsigned or wrongly signed bundles are refused.
    """
    root = Path(root)
    if trust is not None:
        if not (root / MANIFEST).is_file():
            read_manifest(root)  # the usual message for a missing bundle or manifest
        try:
            verify_manifest_signature(root / MANIFEST, trust)
        except SignatureError as exc:
            raise BundleError(str(exc)) from exc
        verify = True
    manifest = read_manifest(root)
    for rel in manifest.files:
        confined(root, rel)  # even unverified, nothing outside the bundle is read (symlinks included)
    if verify:
        verify_files(root, manifest)
    return Bundle(root=root, manifest=manifest)


# --------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------


def is_bundle_dir(path: Path) -> bool:
    """True when ``path`` is a directory whose manifest says it is a pcedge bundle (the only thing
    ``--force`` may replace). Checksums are not needed for that: a damaged bundle may still be replaced."""
    manifest = Path(path) / MANIFEST
    if Path(path).is_symlink() or not Path(path).is_dir() or not manifest.is_file():
        return False
    try:
        if manifest.stat().st_size > manifest_schema.MAX_MANIFEST_BYTES:
            return False
        data = json.loads(manifest.read_bytes().decode("utf-8"))
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(data, dict) and data.get("format") == FORMAT


def check_replaceable(target: str | os.PathLike[str], force: bool) -> None:
    """Refuse to write a bundle at ``target`` unless nothing is there, or ``force`` and a bundle is there.

    ``--force`` never deletes what pcedge did not create: a folder of documents, a dataset, a file or a
    symlink at ``target`` is refused with a message, whatever the flag.
    """
    target = Path(target)
    if target.name in ("", ".", ".."):
        raise ValueError(f"{str(target) or repr('')}: name the bundle directory to create (e.g. part.pcedge)")
    if not (target.exists() or target.is_symlink()):
        return
    if not force:
        raise FileExistsError(f"{target}: already exists; pass --force to replace it")
    if not is_bundle_dir(target):
        raise FileExistsError(
            f"{target}: exists and is not a pcedge bundle (no {MANIFEST} with format {FORMAT!r}); "
            "--force only replaces bundles: refused"
        )


def check_outside_inputs(target: str | os.PathLike[str], inputs) -> None:
    """Refuse an output that is, contains or lies inside one of the ``inputs`` (data folders)."""
    resolved = Path(target).resolve()
    for source in inputs:
        if source is None:
            continue
        src = Path(source).resolve()
        if resolved == src or resolved.is_relative_to(src) or src.is_relative_to(resolved):
            raise ValueError(f"{target}: the output overlaps the input data {source}; write the bundle elsewhere")


_RENAME_NOREPLACE = 1
_AT_FDCWD = -100


def rename_no_replace(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
    """Rename ``src`` to ``dst``, failing with :class:`FileExistsError` if ``dst`` exists (even if it appeared
    a moment ago: Linux ``renameat2(RENAME_NOREPLACE)`` is atomic). Falls back to check-then-rename where
    the kernel or filesystem lacks the flag."""
    libc_rename = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if libc_rename is not None:
        if libc_rename(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), _RENAME_NOREPLACE) == 0:
            return
        err = ctypes.get_errno()
        if err == errno.EEXIST:
            raise FileExistsError(err, os.strerror(err), str(dst))
        if err not in (errno.ENOSYS, errno.EINVAL):
            raise OSError(err, os.strerror(err), str(dst))
    if os.path.lexists(dst):
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(dst))
    os.rename(src, dst)


def replace_dir(staging: Path, target: Path, force: bool) -> None:
    """Move the finished directory ``staging`` to ``target``.

    Without ``force`` the rename fails if ``target`` appeared meanwhile (another export or unpack won the
    race: it is kept). With ``force`` an existing bundle is moved aside, the new one renamed in, then the old
    one removed; if the rename fails the old bundle is put back.
    """
    old = None
    if force and (target.exists() or target.is_symlink()):
        check_replaceable(target, force=True)  # still a bundle (it may have been replaced meanwhile)
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, old)
    try:
        rename_no_replace(staging, target)
    except FileExistsError:
        if old is not None:
            if os.path.lexists(target):  # another run's bundle took the name: ours was to be replaced anyway
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(old, target)  # put the bundle we moved aside back
        raise FileExistsError(
            f"{target}: appeared while this bundle was being written (another pcedge run?); it was kept and "
            "nothing was written"
        ) from None
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


class BundleWriter:
    """Writes a bundle into a hidden temporary directory beside ``target``; :meth:`commit` renames it in.

    Use as a context manager: an exception (or Ctrl-C) inside the block removes the temporary directory,
    so a crash never leaves half a bundle at ``target``. ``force`` replaces an existing *bundle* only
    (:func:`check_replaceable`); ``inputs`` are data folders the target must not overlap; a target that
    appears while writing is kept and :meth:`commit` fails (:func:`replace_dir`)::

        with BundleWriter(out, force=False) as writer:
            np.save(writer.path(MEMORY_BANK_FILE), bank)
            ...
            writer.commit(manifest)
    """

    def __init__(self, target: str | os.PathLike[str], force: bool = False, inputs=()):
        self.target = Path(target)
        self.force = force
        check_replaceable(self.target, force)
        check_outside_inputs(self.target, inputs)
        self.target.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(self.target)  # .NAME.<pid>.*.partial of exports that were killed
        self.tmp = Path(tempfile.mkdtemp(prefix=temporary_prefix(self.target), suffix=".partial", dir=self.target.parent))
        self.committed = False

    def path(self, rel: str) -> Path:
        path = self.tmp / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def commit(self, manifest: Manifest) -> Path:
        manifest.files = {rel: file_entry(self.tmp, rel) for rel in _listed_files(self.tmp)}
        manifest.created = manifest.created or time.strftime("%Y-%m-%dT%H:%M:%S%z")
        write_text_atomic(self.tmp / MANIFEST, manifest.to_json())
        replace_dir(self.tmp, self.target, self.force)
        self.committed = True
        return self.target

    def abort(self) -> None:
        if not self.committed:
            shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self) -> "BundleWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.abort()
