"""One row of ``bench_latency.py``, in its own process, importing pcedge from a given source tree.

``bench_latency.py`` runs this script once per row and round: with ``--tree`` the current checkout for
today's code, or a temporary ``git worktree`` of the baseline ref for the code before. The editable install
maps ``pcedge``, ``pcedge.export`` and ``pcedge.runtime`` onto *this* checkout's ``pcedge/``, ``export/``
and ``runtime/`` with a finder on ``sys.meta_path``; a ``PYTHONPATH`` entry cannot override that mapping
(``pcedge.runtime`` is not a sub-folder of ``pcedge/``), so :func:`import_pcedge_from` puts a finder with
the same mapping onto ``--tree`` in front of it, and the result records which files were really imported.

Decoding is excluded (frames are decoded once up front); every call is ``Detector.run_frames([frame])``,
batch 1, on the runtime's defaults for ONNX Runtime CPU (``DetectorOptions(backend="ort-cpu")``, plus
``precision`` for the INT8 row). A row that cannot open (a precision the code or the bundle lacks) is
reported as skipped with the reason, never as a crash. Output: one JSON object (``--out``).

Only the standard library and numpy are imported before the tree's pcedge, so nothing of the current
checkout leaks into a baseline row.
"""

from __future__ import annotations

import argparse
import importlib.abc
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

#: The import names the editable install maps (pyproject.toml, [tool.setuptools.package-dir]).
PACKAGE_DIRS = {"pcedge": "pcedge", "pcedge.export": "export", "pcedge.runtime": "runtime"}
STAGES = ("preprocess", "backbone", "index", "scoring")


class _TreeFinder(importlib.abc.MetaPathFinder):
    """``pcedge``, ``pcedge.export`` and ``pcedge.runtime`` from one source tree (as the editable install maps them)."""

    def __init__(self, tree: Path):
        self.tree = tree

    def find_spec(self, fullname, path=None, target=None):
        folder = PACKAGE_DIRS.get(fullname)
        if folder is None:
            return None
        root = self.tree / folder
        return importlib.util.spec_from_file_location(fullname, root / "__init__.py",
                                                      submodule_search_locations=[str(root)])


def import_pcedge_from(tree: Path) -> dict:
    """Import pcedge from ``tree`` (before anything else imports it); return where it came from."""
    if any(name == "pcedge" or name.startswith("pcedge.") for name in sys.modules):
        raise RuntimeError("pcedge was imported before the tree's finder was installed")
    sys.meta_path.insert(0, _TreeFinder(tree))
    import pcedge.runtime.detector  # noqa: F401  (the import being checked)

    files = {name: sys.modules[name].__file__ for name in ("pcedge", "pcedge.runtime", "pcedge.runtime.detector")}
    for name, file in files.items():
        if not Path(file).resolve().is_relative_to(tree.resolve()):
            raise RuntimeError(f"{name} was imported from {file}, not from {tree}")
    return files


def git_head(tree: Path) -> dict:
    """The commit the tree is at and whether its tracked files differ from it."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(tree), *args], capture_output=True, text=True, check=True).stdout.strip()

    return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}


def percentiles(values: list[float]) -> dict:
    import numpy as np

    v = np.asarray(values, dtype=np.float64)
    p50, p95, p99 = np.percentile(v, [50, 95, 99])
    return {"p50": float(p50), "p95": float(p95), "p99": float(p99), "mean": float(v.mean()), "min": float(v.min()),
            "n": int(v.size)}


def open_detector(args: argparse.Namespace, bundle: Path):
    """The detector for this row, or (None, reason) when this code or this bundle cannot run it."""
    from pcedge.runtime.bundle import BundleError
    from pcedge.runtime.detector import Detector, DetectorOptions
    from pcedge.runtime.errors import BackendUnavailable

    from pcedge.runtime import backends

    # The fp32 row asks for float32 by name where ort-cpu's default is the INT8 graph (code with
    # backends.cpu_default); older code (the baseline tree) runs float32 by default and may not know "fp32".
    # "default" asks for nothing: what DetectorOptions() runs on ort-cpu (the CPU INT8 graph when the bundle
    # ships it with its own threshold, else float32).
    precision = args.precision if args.precision != "fp32" or hasattr(backends, "cpu_default") else None
    precision = None if precision == "default" else precision
    options = DetectorOptions(backend="ort-cpu", index=args.index, threads=args.threads, precision=precision)
    if args.blas_threads != "default":
        options.blas_threads = None if args.blas_threads == "none" else int(args.blas_threads)
    if args.split_threads is not None:
        options.split_threads = args.split_threads
    if args.spin is not None:
        options.ort_spinning = {"off": False, "on": True, "auto": "auto"}[args.spin]
    elif args.ort_spinning is not None:
        options.ort_spinning = False  # one session, re-created below with the variant's settings
    try:
        detector = Detector.open(bundle, options)
    except (BundleError, BackendUnavailable, ValueError) as exc:
        graphs = sorted(p.name for p in bundle.glob("*.onnx"))
        return None, f"{type(exc).__name__}: {exc} (graphs in the bundle: {', '.join(graphs) or 'none'})"
    if args.ort_spinning is not None:
        _respin(detector, bundle, args.ort_spinning, args.ort_spinning_stop)
    return detector, ""


def _respin(detector, bundle: Path, spinning: bool, stop_after_run: bool = False) -> None:
    """Re-create the ONNX Runtime session with the same options but intra-op spinning set (a thread variant);
    ``stop_after_run``: the pool's threads stop spinning as soon as a run returns (force_spinning_stop)."""
    import onnxruntime as ort

    backend = detector.backend
    options = backend.session.get_session_options()
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    if stop_after_run:
        options.add_session_config_entry("session.force_spinning_stop", "1")
    model = backend.session._model_path  # the graph the backend chose (FP32 or INT8)
    backend.session = ort.InferenceSession(model, sess_options=options, providers=backend.session.get_providers())
    backend.description += f" [allow_spinning={int(spinning)}{', force_spinning_stop' if stop_after_run else ''}]"


def spin_record(detector) -> dict:
    """How the backbone ran: runs per ONNX Runtime session and the spin governor's counters (empty for code
    or backends without them)."""
    record = {}
    runs = getattr(detector.backend, "runs", None)
    if runs is not None:
        record["runs"] = {"plain": runs.plain, "spinning": runs.spinning}
    governor = getattr(detector, "spin_governor", None)
    if governor is not None:
        record["governor"] = {**vars(governor.stats), "state": governor.state}
    return record


def usable_bundle(args: argparse.Namespace) -> tuple[Path, str]:
    """``--bundle`` if this code opens it; otherwise one exported by this code into ``--export-to`` (cached)."""
    from pcedge.runtime.bundle import BundleError, open_bundle

    try:
        open_bundle(args.bundle, verify=True)
        return args.bundle, "the shared bundle"
    except BundleError as exc:
        why = str(exc)
    if args.export_to is None:
        raise SystemExit(f"{args.bundle}: this code cannot open it ({why}) and no --export-to was given")
    try:
        open_bundle(args.export_to, verify=True)
        return args.export_to, f"exported earlier by this code (the shared bundle: {why})"
    except BundleError:
        pass
    from pcedge.export.fit import ExportConfig, export_bundle

    export_bundle(ExportConfig(data=args.data, output=args.export_to, force=True, progress=False))
    return args.export_to, f"exported now by this code with default settings (the shared bundle: {why})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tree", type=Path, required=True, help="source tree to import pcedge from")
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("--export-to", type=Path, default=None,
                        help="where this code exports its own bundle if it cannot open --bundle")
    parser.add_argument("--data", type=Path, required=True, help="MVTec-layout category: test/ frames, train/ export")
    parser.add_argument("--frames", type=int, default=80, help="test frames decoded once and cycled through")
    parser.add_argument("--precision", choices=("default", "fp32", "int8"), default="fp32",
                        help="default: no precision asked (DetectorOptions' default)")
    parser.add_argument("--index", default="auto")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--blas-threads", default="default", help="'default' (the runtime's), 'none' or N")
    parser.add_argument("--ort-spinning", type=lambda s: s == "1", default=None, help="0/1: re-create the session so")
    parser.add_argument("--ort-spinning-stop", action="store_true", help="with --ort-spinning 1: force_spinning_stop")
    parser.add_argument("--split-threads", type=int, default=None, help="DetectorOptions.split_threads")
    parser.add_argument("--spin", choices=("off", "on", "auto"), default=None,
                        help="DetectorOptions.ort_spinning False / True / 'auto' (default: the runtime's)")
    parser.add_argument("--repeats", type=int, default=300)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)

    imported = import_pcedge_from(args.tree)
    record = {"tree": str(args.tree), "git": git_head(args.tree), "imported": imported, "precision": args.precision,
              "index": args.index, "loadavg_before": list(os.getloadavg())}
    from pcedge.runtime.preprocess import list_images, read_image

    test = args.data / "test"
    paths = sorted(p for d in sorted(test.iterdir()) if d.is_dir() for p in list_images(d))
    frames = [read_image(p) for p in paths[: args.frames]]
    bundle, note = usable_bundle(args)
    record.update(bundle=str(bundle), bundle_note=note)
    detector, reason = open_detector(args, bundle)
    if detector is None:
        record.update(status="skipped", reason=reason, loadavg_after=list(os.getloadavg()))
        args.out.write_text(json.dumps(record, indent=1))
        return 0
    with detector:
        for i in range(args.warmup):
            detector.run_frames([frames[i % len(frames)]])
        stages: dict[str, list[float]] = {name: [] for name in STAGES}
        calls: list[float] = []
        for i in range(args.repeats):
            started = time.perf_counter()
            result = detector.run_frames([frames[i % len(frames)]])[0]
            calls.append((time.perf_counter() - started) * 1e3)
            for name in STAGES:
                stages[name].append(getattr(result.timings, f"{name}_ms"))
        record.update(
            status="ran", description=detector.description, index_kind=getattr(detector.index, "kind", "?"),
            bank=list(detector.bank.shape), frames=len(frames), frame_shapes=sorted({str(f.shape) for f in frames}),
            per_image_ms=percentiles(calls), stages_ms={name: percentiles(v) for name, v in stages.items()},
            loadavg_after=list(os.getloadavg()), spin=spin_record(detector),
        )
    args.out.write_text(json.dumps(record, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
