"""Installed versions of the packages a bundle or a benchmark result depends on (for provenance)."""

from __future__ import annotations

from importlib import metadata

#: Distributions the device side uses; the exporter adds its own.
RUNTIME_DISTRIBUTIONS = ("pcedge", "numpy", "onnxruntime", "onnxruntime-gpu", "hnswlib", "opencv-python-headless",
                         "opencv-python", "onnx", "tensorrt")


def package_versions(distributions: tuple[str, ...] = RUNTIME_DISTRIBUTIONS) -> dict[str, str]:
    """``{distribution: version}`` for those installed; missing ones are left out."""
    out = {}
    for dist in distributions:
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return out
