"""Which calibrated threshold applies: the one calibrated on the scores of the graph the backend runs.

The float32 threshold (``manifest.threshold``) was read off float32 image scores. An INT8 graph moves the
scores (about 2 % median on BSData), so the exporter calibrates every shipped INT8 graph's own threshold
the same way on its own scores (``Int8Report.threshold``; export/int8_threshold.py). A detector, and every
command that prints or applies a threshold, asks :func:`active_threshold` with its backend:

- the CPU INT8 graph (``model_int8_cpu.onnx``) -> ``model.int8_cpu.threshold``;
- the symmetric INT8 graph (``model_int8.onnx``, on ONNX Runtime) or a TensorRT INT8 engine (built from
  it) -> ``model.int8.threshold``;
- anything else -- float32, float16 (its scores stay within 1 % of float32's, checked by ``verify``), no
  backend (a Triton scorer fed by the float32 embedder), an INT8 graph from outside the bundle -> the
  float32 threshold. So is an INT8 graph of a bundle written before INT8 thresholds existed (run only
  when asked for with ``--precision int8``); the note says so.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .bundle import ENGINES_DIR, MODEL_FILE, MODEL_INT8_CPU_FILE, MODEL_INT8_FILE, Bundle, ThresholdSpec


@dataclass
class ActiveThreshold:
    """The calibrated threshold a backend's scores are judged by (``DetectorOptions.threshold`` overrides
    its value, never its scale)."""

    spec: ThresholdSpec
    graph: str  # the bundle file whose scores it was calibrated on ("model.onnx" for the float32 one)
    note: str  # one clause: whose threshold it is, and why that one


def _same_file(a: Path | None, b: Path | None) -> bool:
    return a is not None and b is not None and Path(a).resolve() == Path(b).resolve()


def int8_target(bundle: Bundle, backend) -> str | None:
    """``"cpu"`` or ``"tensorrt"``: which of the bundle's INT8 graphs ``backend`` runs; None for any other graph."""
    if backend is None or getattr(backend, "precision", "fp32") != "int8":
        return None
    graph = getattr(backend, "graph", None)
    if graph is None:
        return None
    if _same_file(graph, bundle.int8_cpu_model_path):
        return "cpu"
    if _same_file(graph, bundle.int8_model_path):
        return "tensorrt"
    if _same_file(Path(graph).parent, bundle.root / ENGINES_DIR):  # TensorRT INT8 plans come from model_int8.onnx
        return "tensorrt"
    return None


def active_threshold(bundle: Bundle, backend) -> ActiveThreshold:
    """The :class:`ActiveThreshold` for ``backend``'s scores (``backend`` None: float32 embeddings from elsewhere)."""
    m = bundle.manifest
    target = int8_target(bundle, backend)
    if target is None:
        return ActiveThreshold(m.threshold, MODEL_FILE, "the float32 graph's")
    report = m.model.int8_cpu if target == "cpu" else m.model.int8
    graph = MODEL_INT8_CPU_FILE if target == "cpu" else MODEL_INT8_FILE
    if report is not None and report.threshold is not None:
        return ActiveThreshold(report.threshold, graph, f"{graph}'s own, calibrated on its scores")
    return ActiveThreshold(m.threshold, MODEL_FILE,
                           f"the float32 graph's: {graph} has none of its own (bundle exported before pcedge "
                           "calibrated INT8 thresholds; re-export it), so the false-alarm rate may differ")
