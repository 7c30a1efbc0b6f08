"""A Triton Inference Server model repository from pcedge bundles.

Per bundle ``NAME`` three models, each ``<model>/config.pbtxt`` + a version folder ``1/``:

- ``NAME_embedder`` -- the bundle's ONNX graph, images ``[B, 3, H, W]`` -> embeddings ``[B, h*w, D]``:
  for the ``onnxruntime`` backend (default), as a TensorRT plan for ``tensorrt_plan`` (``plan=True``: an
  engine the bundle holds, built on the serving GPU with ``pcedge build-engine``), or (``cpu_only=True``)
  as a Python-backend model running ONNX Runtime on the CPU -- the form the Python-backend-only
  ``tritonserver`` of PyPI's ``nvidia-pytriton`` runs;
- ``NAME_scorer`` -- a Python-backend model: embeddings -> image score (Eq. 6-7), verdict, patch scores
  and the anomaly map at network resolution, using :mod:`pcedge.runtime` with the bundle's memory bank and
  index (a copy of the bundle sits in its version folder);
- ``NAME`` -- an ensemble of the two: ``IMAGES`` in, every output of the scorer out.

Decoding and geometry stay on the client (:mod:`.client`): it sends the network input ``[3, H, W]``
float32 and maps the returned network-resolution map back into its own frame with the placement it kept,
which is exactly what the local :class:`~pcedge.runtime.detector.Detector` does, so the numbers agree. The
ensemble's ``parameters["pcedge"]`` carries the geometry, threshold and grid the client needs (JSON).

The configs are built as Triton's own ``ModelConfig`` protobuf messages (``tritonclient.grpc.model_config_pb2``)
and written in protobuf text format, so a field name Triton's schema lacks fails here, not on the server.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from ..bundle import Bundle, BundleError, open_bundle

#: What `pcedge triton` writes at the repository's root so that it may later replace its own output
#: (and nothing else). Triton only looks at sub-directories of the repository.
MARKER = "pcedge-repository.json"
FORMAT = "pcedge-triton"
FORMAT_VERSION = 1

EMBEDDER_SUFFIX = "_embedder"
SCORER_SUFFIX = "_scorer"
VERSION = "1"
BUNDLE_DIR = "bundle"  # the bundle copy inside the scorer's version folder

INPUT = "IMAGES"
EMBEDDINGS = "EMBEDDINGS"
#: The scorer's (and the ensemble's) outputs per image: name -> Triton data type. Shapes in `_outputs`.
OUTPUTS = {
    "SCORE": "TYPE_FP64",  # s, Eq. 7
    "NORMALISED": "TYPE_FP64",  # threshold -> 0.5, clipped to [0, 1]
    "ANOMALOUS": "TYPE_BOOL",  # the verdict: SCORE > THRESHOLD
    "THRESHOLD": "TYPE_FP64",
    "S_STAR": "TYPE_FP64",  # s*, Eq. 6
    "RESCORED": "TYPE_INT32",  # patches re-scored exactly after HNSW
    "PATCH_SCORES": "TYPE_FP32",  # [h, w]
    "ANOMALY_MAP": "TYPE_FP32",  # [H, W] at network resolution, raw distance units
}

#: Triton model names: a letter first, then letters, digits, '_' or '-' (a directory name on every OS,
#: a URL path segment without escaping, a Prometheus label value as it is).
NAME_PATTERN = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,47}$")
KINDS = ("auto", "gpu", "cpu")


class RepositoryError(ValueError):
    """A repository that cannot be written; the message names the bundle, name or option at fault."""


@dataclass
class RepositoryOptions:
    cpu_only: bool = False  # embedder as a Python-backend ONNX Runtime model (no onnxruntime backend needed)
    plan: bool = False  # embedder as a TensorRT plan from the bundle's engines/ (built on the serving GPU)
    precision: str | None = None  # which engine to take with plan=True (None: the first fp16, else any)
    max_batch_size: int = 8
    dynamic_batching: bool = True
    max_queue_delay_us: int = 2000  # how long Triton holds a request to form a larger batch
    preferred_batch_sizes: list[int] = field(default_factory=list)  # empty: Triton forms the largest it can
    embedder_instances: int = 1
    scorer_instances: int = 1
    kind: str = "auto"  # embedder instances on the GPU or CPU; auto: CPU when cpu_only, else GPU
    threads: int = 0  # ONNX Runtime intra-op threads per CPU-only embedder instance (0: all the CPUs)
    index: str = "auto"  # the scorer's nearest-neighbour index (auto | exact | hnsw)

    def check(self) -> None:
        if self.cpu_only and self.plan:
            raise RepositoryError("--cpu-only and --plan exclude each other (a TensorRT plan needs a GPU)")
        if not 1 <= self.max_batch_size <= 1024:
            raise RepositoryError(f"--max-batch-size must be in [1, 1024], got {self.max_batch_size}")
        if self.max_queue_delay_us < 0:
            raise RepositoryError(f"--max-queue-delay-us must be >= 0, got {self.max_queue_delay_us}")
        for size in self.preferred_batch_sizes:
            if not 1 <= size <= self.max_batch_size:
                raise RepositoryError(f"preferred batch size {size} is outside [1, --max-batch-size {self.max_batch_size}]")
        for flag, value in (("--embedder-instances", self.embedder_instances), ("--scorer-instances", self.scorer_instances)):
            if value < 1:
                raise RepositoryError(f"{flag} must be at least 1, got {value}")
        if self.kind not in KINDS:
            raise RepositoryError(f"--kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if self.cpu_only and self.kind == "gpu":
            raise RepositoryError("--cpu-only runs the embedder on the CPU; --kind gpu contradicts it")
        if self.threads < 0:
            raise RepositoryError(f"--threads must be >= 0, got {self.threads}")
        if self.index not in ("auto", "exact", "hnsw"):
            raise RepositoryError(f"index must be auto, exact or hnsw, got {self.index!r}")

    @property
    def form(self) -> str:
        return "cpu-only" if self.cpu_only else "tensorrt_plan" if self.plan else "onnxruntime"


@dataclass
class ServedBundle:
    name: str  # the ensemble's model name
    bundle: Path  # where it was copied from
    models: list[str]  # embedder, scorer, ensemble


@dataclass
class RepositoryReport:
    root: Path
    form: str
    bundles: list[ServedBundle]

    @property
    def models(self) -> list[str]:
        return [m for b in self.bundles for m in b.models]


# --------------------------------------------------------------------------------------------------
# Names
# --------------------------------------------------------------------------------------------------


def check_name(name: str, source: str) -> str:
    if not NAME_PATTERN.match(name):
        raise RepositoryError(
            f"{source}: model name {name!r} is not valid: a letter first, then up to 47 letters, digits, '_' "
            "or '-' (give one as NAME=BUNDLE)"
        )
    return name


def parse_bundle_argument(text: str) -> tuple[str, Path]:
    """``NAME=BUNDLE`` or ``BUNDLE`` (name: the directory's name without ``.pcedge``) -> (name, path)."""
    if "=" in text and not Path(text).exists():
        name, _, path = text.partition("=")
        return check_name(name, text), Path(path)
    path = Path(text)
    stem = path.name[: -len(".pcedge")] if path.name.endswith(".pcedge") else path.name
    return check_name(stem.replace(".", "_"), text), path


# --------------------------------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------------------------------


def _model_config_pb2():
    try:
        from tritonclient.grpc import model_config_pb2
    except ImportError as exc:
        raise RepositoryError(
            f"writing Triton configs needs tritonclient[grpc] ({exc}); install pcedge's serving extra: "
            "pip install 'pcedge[serve]'"
        ) from exc
    return model_config_pb2


def _text(config) -> str:
    from google.protobuf import text_format

    return text_format.MessageToString(config)


def _common(pb, config, options: RepositoryOptions, kind: str, count: int) -> None:
    config.max_batch_size = options.max_batch_size
    if options.dynamic_batching:
        config.dynamic_batching.max_queue_delay_microseconds = options.max_queue_delay_us
        config.dynamic_batching.preferred_batch_size.extend(options.preferred_batch_sizes)
    group = config.instance_group.add()
    group.count = count
    group.kind = pb.ModelInstanceGroup.KIND_GPU if kind == "gpu" else pb.ModelInstanceGroup.KIND_CPU


def _outputs(pb, config, bundle: Bundle) -> None:
    grid = [bundle.manifest.output.grid_h, bundle.manifest.output.grid_w]
    geometry = bundle.manifest.input.geometry
    shapes = {"PATCH_SCORES": grid, "ANOMALY_MAP": [geometry.height, geometry.width]}
    for name, dtype in OUTPUTS.items():
        config.output.add(name=name, data_type=getattr(pb, dtype), dims=shapes.get(name, [1]))


def embedder_config(name: str, bundle: Bundle, options: RepositoryOptions) -> str:
    """``config.pbtxt`` of ``NAME_embedder`` (onnxruntime, tensorrt_plan or Python backend)."""
    pb = _model_config_pb2()
    manifest = bundle.manifest
    geometry = manifest.input.geometry
    config = pb.ModelConfig(name=name + EMBEDDER_SUFFIX)
    if options.cpu_only:
        config.backend = "python"
        config.parameters["model_file"].string_value = "model.onnx"
        config.parameters["threads"].string_value = str(options.threads)
    elif options.plan:
        config.platform = "tensorrt_plan"
        config.default_model_filename = "model.plan"
    else:
        config.backend = "onnxruntime"
        config.default_model_filename = "model.onnx"
    config.input.add(name=manifest.input.name, data_type=pb.TYPE_FP32, dims=[3, geometry.height, geometry.width])
    config.output.add(name=manifest.output.name, data_type=pb.TYPE_FP32,
                      dims=[manifest.output.grid_h * manifest.output.grid_w, manifest.output.dim])
    kind = options.kind if options.kind != "auto" else ("cpu" if options.cpu_only else "gpu")
    _common(pb, config, options, kind, options.embedder_instances)
    return _text(config)


def scorer_config(name: str, bundle: Bundle, options: RepositoryOptions) -> str:
    """``config.pbtxt`` of ``NAME_scorer`` (Python backend, CPU instances)."""
    pb = _model_config_pb2()
    manifest = bundle.manifest
    config = pb.ModelConfig(name=name + SCORER_SUFFIX, backend="python")
    config.input.add(name=EMBEDDINGS, data_type=pb.TYPE_FP32,
                     dims=[manifest.output.grid_h * manifest.output.grid_w, manifest.output.dim])
    _outputs(pb, config, bundle)
    _common(pb, config, options, "cpu", options.scorer_instances)
    config.parameters["bundle"].string_value = BUNDLE_DIR
    config.parameters["index"].string_value = options.index
    return _text(config)


def client_parameters(name: str, bundle: Bundle) -> dict:
    """What a client needs to prepare frames and read results: geometry, threshold, grid (JSON-able)."""
    manifest = bundle.manifest
    return {
        "format": FORMAT, "format_version": FORMAT_VERSION, "name": name,
        "input": INPUT, "geometry": dataclasses.asdict(manifest.input.geometry),
        "grid": [manifest.output.grid_h, manifest.output.grid_w],
        # The float32 graph's threshold: the repository serves float32 (or float16) embeddings, never INT8.
        "threshold": manifest.threshold.value, "scale": manifest.threshold.scale,
        "backbone": manifest.model.backbone, "memory_bank": manifest.memory_bank.n,
    }


def ensemble_config(name: str, bundle: Bundle, options: RepositoryOptions) -> str:
    """``config.pbtxt`` of the ensemble ``NAME``: IMAGES -> embedder -> scorer -> every scorer output."""
    pb = _model_config_pb2()
    manifest = bundle.manifest
    geometry = manifest.input.geometry
    config = pb.ModelConfig(name=name, platform="ensemble", max_batch_size=options.max_batch_size)
    config.input.add(name=INPUT, data_type=pb.TYPE_FP32, dims=[3, geometry.height, geometry.width])
    _outputs(pb, config, bundle)
    embed = config.ensemble_scheduling.step.add(model_name=name + EMBEDDER_SUFFIX, model_version=-1)
    embed.input_map[manifest.input.name] = INPUT
    embed.output_map[manifest.output.name] = EMBEDDINGS
    score = config.ensemble_scheduling.step.add(model_name=name + SCORER_SUFFIX, model_version=-1)
    score.input_map[EMBEDDINGS] = EMBEDDINGS
    for output in OUTPUTS:
        score.output_map[output] = output
    config.parameters["pcedge"].string_value = json.dumps(client_parameters(name, bundle), sort_keys=True)
    return _text(config)


def _model_py(role: str, cls: str, name: str) -> str:
    return (
        f'"""Triton Python-backend model written by `pcedge triton`: the {role} of bundle {name}.\n\n'
        "The code lives in pcedge.runtime.serving.python_models (numpy, ONNX Runtime, hnswlib; no torch).\n"
        '"""\n\n'
        f"from pcedge.runtime.serving.python_models import {cls} as TritonPythonModel  # noqa: F401\n"
    )


def _engine_file(bundle: Bundle, options: RepositoryOptions, max_batch: int) -> Path:
    """The TensorRT plan to serve: one the bundle holds, built on the serving GPU (``pcedge build-engine``)."""
    # INT8 plans are never served: the repository's scorer applies the float32 threshold (client_parameters).
    engines = [e for e in bundle.manifest.engines if e.precision != "int8"]
    if options.precision:
        engines = [e for e in engines if e.precision == options.precision]
    if not engines:
        which = f" with precision {options.precision}" if options.precision else ""
        raise RepositoryError(
            f"{bundle.root}: --plan needs a TensorRT engine{which} in the bundle; build it on the serving GPU "
            f"(pcedge build-engine {bundle.root} --max-batch {max_batch}) and run pcedge triton there"
        )
    engines.sort(key=lambda e: e.precision != "fp16")
    engine = engines[0]
    if engine.max_batch < max_batch:
        raise RepositoryError(
            f"{bundle.root / engine.file}: built for batches up to {engine.max_batch}, "
            f"below --max-batch-size {max_batch}; rebuild it with --max-batch {max_batch} or lower --max-batch-size"
        )
    return bundle.root / engine.file


# --------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def _add_bundle(root: Path, name: str, bundle: Bundle, options: RepositoryOptions) -> ServedBundle:
    embedder, scorer = name + EMBEDDER_SUFFIX, name + SCORER_SUFFIX
    _write(root / embedder / "config.pbtxt", embedder_config(name, bundle, options))
    version = root / embedder / VERSION
    version.mkdir(parents=True)
    if options.plan:
        shutil.copy2(_engine_file(bundle, options, options.max_batch_size), version / "model.plan")
    else:
        shutil.copy2(bundle.model_path, version / "model.onnx")
    if options.cpu_only:
        _write(version / "model.py", _model_py("ONNX Runtime embedder (CPU)", "EmbedderModel", name))
    _write(root / scorer / "config.pbtxt", scorer_config(name, bundle, options))
    shutil.copytree(bundle.root, root / scorer / VERSION / BUNDLE_DIR,
                    ignore=shutil.ignore_patterns("*.tmp", "engines"))
    _write(root / scorer / VERSION / "model.py", _model_py("scorer (index, Eq. 6-7, anomaly map)", "ScorerModel", name))
    _write(root / name / "config.pbtxt", ensemble_config(name, bundle, options))
    (root / name / VERSION).mkdir(parents=True)  # an ensemble has no files, but Triton wants its version folder
    return ServedBundle(name, bundle.root, [embedder, scorer, name])


def write_repository(bundles: list[tuple[str, str | os.PathLike[str]]], out: str | os.PathLike[str],
                     options: RepositoryOptions | None = None) -> RepositoryReport:
    """Write a model repository for ``[(name, bundle path)]`` at ``out``.

    Every bundle is opened with its checksums verified first. The repository is assembled in a temporary
    folder beside ``out`` and renamed into place; an existing ``out`` is replaced only if ``pcedge triton``
    wrote it (its marker file), and is otherwise left alone with an error.
    """
    options = options or RepositoryOptions()
    options.check()
    if not bundles:
        raise RepositoryError("no bundle given")
    taken: dict[str, str] = {}
    for name, path in bundles:
        check_name(name, str(path))
        for model in (name, name + EMBEDDER_SUFFIX, name + SCORER_SUFFIX):
            if model in taken:
                raise RepositoryError(f"{path}: model name {model!r} is already used by {taken[model]}; "
                                      "give a different one as NAME=BUNDLE")
            taken[model] = str(path)
    opened = []
    for name, path in bundles:
        try:
            opened.append((name, open_bundle(path, verify=True)))
        except BundleError as exc:
            raise RepositoryError(str(exc)) from exc
    out = Path(out)
    if out.exists() and not (out / MARKER).is_file():
        if not out.is_dir() or any(out.iterdir()):
            raise RepositoryError(f"{out}: exists and was not written by pcedge triton; choose another -o "
                                  "or remove it yourself")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        served = [_add_bundle(tmp, name, bundle, options) for name, bundle in opened]
        marker = {"format": FORMAT, "format_version": FORMAT_VERSION, "form": options.form,
                  "options": dataclasses.asdict(options),
                  "bundles": {b.name: str(b.bundle.resolve()) for b in served}}
        _write(tmp / MARKER, json.dumps(marker, indent=2) + "\n")
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return RepositoryReport(out, options.form, served)
