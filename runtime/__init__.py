"""pcedge's device library: a bundle in, anomaly scores and maps out. No torch, no argparse.

What an integrator may import from here (the rest of the package is free to change)::

    from pcedge.runtime import Detector

    with Detector.open("part.pcedge", backend="auto") as detector:
        result = detector(frame)                 # a path, or an OpenCV frame (BGR or gray, uint8 or uint16)
        print(result.verdict, result.score, result.anomaly_map.shape)

Layout (docs/architecture.md says where a new module goes):

    the detector path   bundle, preprocess, backends, index, scoring, detector (+ errors, files, inputs,
                        overlay, archive, versions) at this level
    tensorrt/           engine naming and selection, engine build, the TensorRT backend, graph check
    watch/              the camera loop: frame sources, staged pipeline, outputs
    evaluation/         accuracy and latency measurement: dataset layout, metrics, FLOP counts
    serving/            NVIDIA Triton Inference Server: model repository, server process, client

The names below are loaded on first use (PEP 562), so ``import pcedge.runtime`` stays cheap for a
process that needs one part only (a Triton Python model, ``pcedge --help``).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

#: Public name -> the module (relative to this package) that defines it.
_EXPORTS: dict[str, str] = {
    # opening and running a bundle
    "Detector": "detector",
    "DetectorOptions": "detector",
    "Result": "detector",
    "StageTimings": "detector",
    "open_bundle": "bundle",
    "Bundle": "bundle",
    "Manifest": "bundle",
    "BundleError": "bundle",
    "read_image": "preprocess",
    "ImageError": "preprocess",
    "render_overlay": "overlay",
    # the parts, for a custom loop
    "open_backend": "backends",
    "Backend": "backends",
    "BACKENDS": "backends",
    "make_index": "index",
    "Scorer": "scoring",
    "BackendUnavailable": "errors",
    "TensorRTUnavailable": "errors",
    # moving bundles to devices
    "pack": "archive",
    "unpack": "archive",
    "ArchiveError": "archive",
    # the camera loop
    "open_source": "watch.sources",
    "WatchPipeline": "watch.pipeline",
    "WatchOptions": "watch.pipeline",
    "WatchSummary": "watch.summary",
    "WatchError": "errors",
    # serving many cameras from a Triton server
    "write_repository": "serving.repository",
    "RepositoryOptions": "serving.repository",
    "TritonServer": "serving.server",
    "ServerOptions": "serving.server",
    "RemoteDetector": "serving.client",
    # measuring
    "load_category": "evaluation.dataset",
    "evaluate": "evaluation.accuracy",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # for type checkers and IDEs; at run time the names load lazily above
    from .archive import ArchiveError, pack, unpack  # noqa: F401
    from .backends import BACKENDS, Backend, open_backend  # noqa: F401
    from .bundle import Bundle, BundleError, Manifest, open_bundle  # noqa: F401
    from .detector import Detector, DetectorOptions, Result, StageTimings  # noqa: F401
    from .errors import BackendUnavailable, TensorRTUnavailable, WatchError  # noqa: F401
    from .evaluation.accuracy import evaluate  # noqa: F401
    from .evaluation.dataset import load_category  # noqa: F401
    from .index import make_index  # noqa: F401
    from .overlay import render_overlay  # noqa: F401
    from .preprocess import ImageError, read_image  # noqa: F401
    from .scoring import Scorer  # noqa: F401
    from .serving.client import RemoteDetector  # noqa: F401
    from .serving.repository import RepositoryOptions, write_repository  # noqa: F401
    from .serving.server import ServerOptions, TritonServer  # noqa: F401
    from .watch.pipeline import WatchOptions, WatchPipeline  # noqa: F401
    from .watch.sources import open_source  # noqa: F401
    from .watch.summary import WatchSummary  # noqa: F401
