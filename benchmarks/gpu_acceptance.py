"""GPU acceptance run: one JSON report to attach to a bug report about the TensorRT / GPU path.

    python benchmarks/gpu_acceptance.py BUNDLE [--images DIR_OR_FILE ...] [--out results/gpu_acceptance.json]

On a Jetson or an x86 host with TensorRT it prints the versions and the device, builds an fp32 and (where
the GPU has fast FP16) an fp16 engine for a *copy* of the bundle (the original is never modified), compares
each engine with ONNX Runtime CPU on the bundle's check images and a few test images (per-patch cosine,
image-score error with the exact index), runs ``pcedge verify``'s checks on each engine, and times the
stages (preprocess, backbone, index, scoring) at batch 1, 4 and 8 for every backend that opens here. Each
step that cannot run is recorded with its reason and the run goes on, so on a host without TensorRT the
report says exactly what is missing (and still has the ONNX Runtime CPU figures). Budget: well under 10
minutes on a data-centre GPU (two engine builds dominate; ``--runs`` sets the timed repetitions).
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pcedge import __version__
from pcedge.runtime.backends import BACKENDS, open_backend
from pcedge.runtime.bundle import open_bundle
from pcedge.runtime.detector import Detector, DetectorOptions
from pcedge.runtime.files import write_json
from pcedge.runtime.index import ExactIndex
from pcedge.runtime.preprocess import fit_geometry, list_images, read_image, to_tensor
from pcedge.runtime.scoring import Scorer
from pcedge.runtime.verification import run_checks

BATCHES = (1, 4, 8)


@dataclass
class Step:
    """One step of the run: what it did, whether it worked, its figures or the reason it could not run."""

    name: str
    ok: bool
    seconds: float = 0.0
    detail: str = ""
    figures: dict = field(default_factory=dict)


@dataclass
class Report:
    bundle: str
    started: str
    host: dict = field(default_factory=dict)
    versions: dict = field(default_factory=dict)
    device: dict = field(default_factory=dict)
    steps: list[Step] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # what stopped a part of the run, one line each
    loadavg_start: list[float] = field(default_factory=list)
    loadavg_end: list[float] = field(default_factory=list)
    seconds: float = 0.0


def _step(report: Report, name: str, work) -> Step:
    """Run ``work() -> (detail, figures)``; any exception becomes a failed step with its reason."""
    started = time.perf_counter()
    try:
        detail, figures = work()
        step = Step(name, True, detail=detail, figures=figures)
    except Exception as exc:  # the report must always be written: record and go on
        step = Step(name, False, detail=f"{type(exc).__name__}: {exc}",
                    figures={"traceback": traceback.format_exc(limit=6)})
    step.seconds = time.perf_counter() - started
    report.steps.append(step)
    print(f"{'ok  ' if step.ok else 'FAIL'} {name:32s} {step.seconds:7.1f}s  {step.detail[:160]}", flush=True)
    return step


def _versions() -> dict:
    out = {"python": platform.python_version(), "pcedge": __version__, "numpy": np.__version__}
    try:
        import onnxruntime as ort

        out["onnxruntime"] = ort.__version__
        out["onnxruntime_providers"] = ort.get_available_providers()
    except ImportError as exc:
        out["onnxruntime"] = f"missing ({exc})"
    try:
        from pcedge.runtime.tensorrt.device import import_tensorrt

        out["tensorrt"] = import_tensorrt().__version__
    except Exception as exc:
        out["tensorrt"] = f"unavailable ({exc})"
    try:
        from pcedge.runtime.tensorrt.cuda import import_cudart, version_text

        cudart = import_cudart()
        out["cuda"] = version_text(cudart)
        from importlib.metadata import version

        out["cuda-bindings"] = version("cuda-bindings")
    except Exception as exc:
        out["cuda"] = f"unavailable ({exc})"
    jetpack = Path("/etc/nv_tegra_release")
    if jetpack.is_file():
        out["l4t"] = jetpack.read_text().splitlines()[0].strip()
    return out


def _test_tensor(bundle, images: list[Path], limit: int) -> np.ndarray:
    """Network inputs ``[n, 3, H, W]``: the bundle's check images plus up to ``limit`` test images."""
    arrays = bundle.load_check_arrays()
    tensors = [arrays[0]] if arrays is not None else []
    frames = [read_image(p) for p in images[:limit]]
    if frames:
        geometry = bundle.manifest.input.geometry
        tensors.append(to_tensor([fit_geometry(f, geometry)[0] for f in frames]))
    if not tensors:
        raise ValueError("the bundle stores no check images and no --images were given")
    return np.concatenate(tensors).astype(np.float32)


def _compare(bundle, backend_kind: str, precision: str | None, inputs: np.ndarray) -> tuple[str, dict]:
    """The backend against ONNX Runtime CPU: per-patch cosine and image-score error (exact index)."""
    bank = bundle.load_memory_bank()
    exact = ExactIndex(bank)
    scorer = Scorer(bank, exact, exact, bundle.manifest.scoring)

    def embed(kind, prec):
        backend = open_backend(kind, bundle, precision=prec)
        try:
            return np.concatenate([backend(inputs[i:i + 1]) for i in range(inputs.shape[0])]), backend.description
        finally:
            backend.close()

    ref, _ = embed("ort-cpu", None)
    emb, description = embed(backend_kind, precision)
    a, b = ref.reshape(-1, ref.shape[-1]).astype(np.float64), emb.reshape(-1, emb.shape[-1]).astype(np.float64)
    cos = (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-30)

    def scores(e):
        return np.array([scorer.image_score(e[i], p).score for i, p in enumerate(scorer.patch_scores(e))])

    s_ref, s = scores(ref), scores(emb)
    rel = np.abs(s - s_ref) / np.maximum(np.abs(s_ref), 1e-30)
    figures = {"backend": description, "n_images": int(inputs.shape[0]), "min_cosine": float(cos.min()),
               "mean_cosine": float(cos.mean()), "max_image_score_rel_error": float(rel.max()),
               "max_abs_diff": float(np.abs(a - b).max())}
    return f"min cosine {cos.min():.5f}, max image-score error {rel.max():.2e}", figures


def _latency(bundle_root: Path, kind: str, precision: str | None, frames: list[np.ndarray], runs: int) -> tuple[str, dict]:
    """Per-stage milliseconds per image at each batch size (median over ``runs`` calls after a warm-up)."""
    options = DetectorOptions(backend=kind, precision=precision, index="auto")
    figures: dict = {}
    with Detector.open(bundle_root, options) as detector:
        figures["backend"] = detector.description
        for batch in BATCHES:
            chunk = (frames * ((batch // max(len(frames), 1)) + 1))[:batch]
            detector.run_frames(chunk)  # warm-up (and TensorRT-EP / cuDNN autotuning)
            stages = {"preprocess": [], "backbone": [], "index": [], "scoring": [], "total": []}
            for _ in range(runs):
                for r in detector.run_frames(chunk)[:1]:
                    t = r.timings
                    for key, value in (("preprocess", t.preprocess_ms), ("backbone", t.backbone_ms),
                                       ("index", t.index_ms), ("scoring", t.scoring_ms), ("total", t.total_ms)):
                        stages[key].append(value)
            figures[f"batch{batch}"] = {k: float(np.median(v)) for k, v in stages.items()}
    return "total ms/image at batch 1/4/8: " + " / ".join(
        f"{figures[f'batch{b}']['total']:.2f}" for b in BATCHES), figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--images", nargs="*", type=Path, default=[], help="test images (files or folders)")
    parser.add_argument("--n-images", type=int, default=4, help="test images used for the comparison (default 4)")
    parser.add_argument("--runs", type=int, default=20, help="timed repetitions per batch size (default 20)")
    parser.add_argument("--ort-trt", action="store_true", help="also time ONNX Runtime's TensorRT EP (builds an engine)")
    parser.add_argument("--out", type=Path, default=Path("results/gpu_acceptance.json"))
    args = parser.parse_args(argv)

    started = time.perf_counter()
    report = Report(bundle=str(args.bundle), started=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                    host={"platform": platform.platform(), "machine": platform.machine()},
                    loadavg_start=list(os.getloadavg()))
    report.versions = _versions()
    print(f"pcedge GPU acceptance: {args.bundle}\n  " + "\n  ".join(f"{k}: {v}" for k, v in report.versions.items()))

    try:
        source = open_bundle(args.bundle)
    except Exception as exc:
        print(f"gpu_acceptance: {exc}", file=sys.stderr)
        return 2
    images: list[Path] = []
    for item in args.images:
        images += list_images(item) if item.is_dir() else [item]

    work = Path(tempfile.mkdtemp(prefix="pcedge-acceptance-"))
    try:
        root = work / args.bundle.name
        shutil.copytree(source.root, root, ignore=shutil.ignore_patterns("ort-trt"))
        bundle = open_bundle(root)
        inputs = _test_tensor(bundle, images, args.n_images)
        frames = [read_image(p) for p in images[:8]]
        if not frames:  # the check images, back to 8-bit RGB frames
            arrays = bundle.load_check_arrays()
            frames = [np.ascontiguousarray((a.transpose(1, 2, 0)[..., ::-1] * 255).round().astype(np.uint8))
                      for a in arrays[0]]

        device = None
        try:
            from pcedge.runtime.tensorrt.device import probe_device

            device = probe_device()
            report.device = {"name": device.name, "sm": device.sm, "key": device.key, "integrated": device.integrated,
                             "fast_fp16": device.fast_fp16, "tensorrt": device.trt_version}
            print(f"  device: {device.name} ({device.key}, {device.sm}), TensorRT {device.trt_version}")
        except Exception as exc:
            report.missing.append(f"tensorrt: {exc}")
            print(f"  TensorRT path unavailable: {exc}")

        precisions: list[str] = []
        if device is not None:
            from pcedge.runtime.bundle import EngineSpec
            from pcedge.runtime.tensorrt.build import build_engine
            from pcedge.runtime.tensorrt.engines import engine_filename, record_engine

            chw = tuple(bundle.manifest.input.shape[1:])
            for precision in ("fp32", "fp16") if device.fast_fp16 else ("fp32",):
                rel = engine_filename(device, precision)

                def build(precision=precision, rel=rel):
                    r = build_engine(bundle.model_path, root / rel, precision, 1, 1, max(BATCHES), 1024, None,
                                     input_name=bundle.manifest.input.name, input_chw=chw,
                                     fp16_onnx_path=bundle.fp16_model_path, fast_fp16=device.fast_fp16)
                    record_engine(open_bundle(root), EngineSpec(
                        file=rel, sm=device.sm, trt_version=device.trt_version, precision=precision, min_batch=1,
                        opt_batch=1, max_batch=max(BATCHES), device_name=device.name, device_key=device.key,
                        built_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"), workspace_mb=1024))
                    return f"{rel}, {r.plan_bytes / 1e6:.1f} MB from {r.graph.name}", {"plan_bytes": r.plan_bytes,
                                                                                       "graph": str(r.graph.name)}

                if _step(report, f"build {precision}", build).ok:
                    precisions.append(precision)
            bundle = open_bundle(root)
            for precision in precisions:
                _step(report, f"compare tensorrt {precision}", lambda p=precision: _compare(bundle, "tensorrt", p, inputs))

                def verify(p=precision):
                    checks, description = run_checks(str(root), "tensorrt", None, p, None)
                    failed = [c.name for c in checks if not c.passed]
                    figures = {"backend": description, "checks": [{"name": c.name, "passed": c.passed,
                                                                   "detail": c.detail} for c in checks]}
                    if failed:
                        raise AssertionError(f"verify failed: {', '.join(failed)}; {figures['checks']}")
                    return f"{len(checks)} checks PASS", figures

                _step(report, f"verify tensorrt {precision}", verify)

        candidates = [("tensorrt", p) for p in precisions] + [("ort-cuda", None), ("ort-cuda", "fp16")]
        if args.ort_trt:
            candidates.append(("ort-trt", None))
        candidates.append(("ort-cpu", None))
        for kind, precision in candidates:
            assert kind in BACKENDS
            label = f"latency {kind}{'' if precision is None else ' ' + precision}"
            if kind.startswith("ort-") and kind != "ort-cpu":
                step = _step(report, f"compare {kind}{'' if precision is None else ' ' + precision}",
                             lambda k=kind, p=precision: _compare(bundle, k, p, inputs))
                if not step.ok:
                    report.missing.append(f"{kind}: {step.detail}")
                    continue
            _step(report, label, lambda k=kind, p=precision: _latency(root, k, p, frames, args.runs))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report.loadavg_end = list(os.getloadavg())
    report.seconds = time.perf_counter() - started
    write_json(args.out, report)
    failed = [s.name for s in report.steps if not s.ok]
    print(f"wrote {args.out} ({report.seconds:.0f}s); failed steps: {', '.join(failed) or 'none'}; "
          f"missing: {len(report.missing)}")
    return 1 if any(s.name.startswith(("build", "verify", "compare tensorrt")) for s in report.steps if not s.ok) else 0


if __name__ == "__main__":
    sys.exit(main())
