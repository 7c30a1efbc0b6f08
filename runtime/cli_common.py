"""Arguments and helpers shared by the device commands (predict, verify, eval, bench, watch)."""

from __future__ import annotations

import argparse
import glob
import os
from pathlib import Path

from .backends import BACKENDS
from .preprocess import IMAGE_SUFFIXES


def add_detector_arguments(parser: argparse.ArgumentParser, index: bool = True) -> None:
    parser.add_argument("--backend", choices=BACKENDS, default="auto",
                        help="inference backend (default auto: TensorRT engine > ONNX Runtime CUDA > CPU)")
    if index:
        parser.add_argument("--index", choices=("auto", "exact", "hnsw"), default="auto",
                            help="nearest-neighbour search (default auto: exact for small banks, HNSW above)")
        parser.add_argument("--ef", type=int, default=None, help="HNSW query ef (default: the bundle's)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: all available)")
    parser.add_argument("--precision", choices=("fp32", "fp16"), default=None,
                        help="TensorRT engine precision to prefer")


def detector_options(args: argparse.Namespace, **overrides):
    from .detector import DetectorOptions

    values = dict(
        backend=args.backend, index=getattr(args, "index", "auto"), ef=getattr(args, "ef", None),
        threshold=getattr(args, "threshold", None), threads=args.threads, precision=args.precision,
    )
    values.update(overrides)
    return DetectorOptions(**values)


def expand_inputs(items: list[str]) -> list[Path]:
    """Files, folders (searched recursively for images) and glob patterns -> sorted unique paths.

    A plain file is kept whatever its suffix (so that a non-image is reported, not silently dropped).
    Raises ``FileNotFoundError`` for an item that names nothing.
    """
    out: list[Path] = []
    for item in items:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise FileNotFoundError(f"{path}: folder contains no images")
            out.extend(found)
        elif path.exists():
            out.append(path)
        elif any(ch in item for ch in "*?["):
            matches = sorted(Path(m) for m in glob.glob(item, recursive=True) if os.path.isfile(m))
            if not matches:
                raise FileNotFoundError(f"{item}: pattern matches no files")
            out.extend(matches)
        else:
            raise FileNotFoundError(f"{item}: no such file or folder")
    seen, unique = set(), []
    for p in out:
        key = p.resolve()
        if key not in seen:
            seen.add(key)
            unique.append(p)
    if not unique:
        raise FileNotFoundError("no input images given")
    return unique


def unique_names(paths: list[Path]) -> list[str]:
    """Output file stems that stay distinct when inputs share names in different folders
    (MVTec's test/good/000.png and test/crack/000.png): the path relative to the inputs' common folder."""
    resolved = [p.resolve() for p in paths]
    common = Path(os.path.commonpath([str(p.parent) for p in resolved])) if len(resolved) > 1 else resolved[0].parent
    names = []
    for p in resolved:
        rel = p.relative_to(common).with_suffix("")
        names.append("__".join(rel.parts))
    return names


def percentile(values: list[float], q: float) -> float:
    import numpy as np

    return float(np.percentile(np.asarray(values, dtype=np.float64), q)) if values else float("nan")


def open_detector(args: argparse.Namespace, command: str):
    """The command's :class:`~pcedge.runtime.detector.Detector`, or None after printing why it cannot open
    (missing or tampered bundle, unavailable backend, bad option) as ``pcedge COMMAND: reason``."""
    import sys

    from .bundle import BundleError
    from .detector import Detector
    from .errors import BackendUnavailable

    try:
        return Detector.open(args.bundle, detector_options(args))
    except (BundleError, BackendUnavailable, ValueError) as exc:
        print(f"pcedge {command}: {exc}", file=sys.stderr)
        return None
