"""The bundle's float16 graph: ``model.onnx`` computing in float16, with float32 inputs and outputs.

TensorRT 11 builds strongly typed networks only (``BuilderFlag.FP16`` is gone), so an FP16 engine needs a
graph whose tensors are float16; ONNX Runtime's CUDA provider runs the same graph for ``--precision fp16``.
The conversion is ONNX Runtime's own (``onnxruntime.transformers.float16``) with ``keep_io_types``: the
interface stays float32 ``images [B, 3, H, W]`` -> ``embeddings [B, h*w, D]``, so the runtime feeds and
reads it exactly like the float32 graph. No torch here.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from pcedge.runtime.bundle import ParityReport
from pcedge.runtime.files import write_bytes_atomic


def write_fp16_graph(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
    """Convert float32 ONNX graph ``src`` to float16 compute with float32 I/O, written atomically to ``dst``."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    src, dst = Path(src), Path(dst)
    model = onnx.load(str(src))
    converted = convert_float_to_float16(model, keep_io_types=True)
    _sort_nodes(converted.graph)  # the converter appends the input Casts after their consumers
    # Some value_info entries keep a float32 type the converted nodes no longer produce; shape inference
    # (ONNX Runtime, TensorRT's parser) recomputes them, so they are dropped rather than left stale.
    del converted.graph.value_info[:]
    onnx.checker.check_model(converted, full_check=True)
    write_bytes_atomic(dst, converted.SerializeToString())  # a graph under 2 GB: one protobuf, no external data


def _sort_nodes(graph) -> None:
    """Reorder ``graph.node`` topologically (stable: the original order wherever it is already valid)."""
    available = {v.name for v in graph.input} | {i.name for i in graph.initializer} | {""}
    pending = list(graph.node)
    ordered = []
    while pending:
        ready = [n for n in pending if all(name in available for name in n.input)]
        if not ready:
            raise ValueError("the float16 graph has a cycle or an input no node produces")
        for node in ready:
            ordered.append(node)
            available.update(node.output)
        pending = [n for n in pending if all(n is not r for r in ready)]
    copies = [type(n)() for n in ordered]
    for copy, node in zip(copies, ordered):
        copy.CopyFrom(node)
    del graph.node[:]
    graph.node.extend(copies)


def _min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    a = a.reshape(-1, a.shape[-1]).astype(np.float64)
    b = b.reshape(-1, b.shape[-1]).astype(np.float64)
    norms = np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-30)
    return float(((a * b).sum(1) / norms).min())


def fp16_parity(fp32_path: str | os.PathLike[str], fp16_path: str | os.PathLike[str], images: np.ndarray,
                chunk: int = 8) -> ParityReport:
    """The float16 graph against the float32 one on ``images`` ``[n, 3, H, W]`` (ONNX Runtime CPU).

    ``max_rel_error = max |fp16 - fp32| / max |fp32|``; ``min_cosine`` over every patch vector.
    """
    import onnxruntime as ort

    if images.ndim != 4 or images.shape[0] < 1:
        raise ValueError(f"fp16_parity: expected images [n, 3, H, W] with n >= 1, got {list(images.shape)}")
    sessions = [ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]) for p in (fp32_path, fp16_path)]
    outs = []
    for session in sessions:
        name = session.get_inputs()[0].name
        outs.append(np.concatenate([session.run(None, {name: images[i:i + chunk].astype(np.float32)})[0]
                                    for i in range(0, images.shape[0], chunk)]))
    ref, half = outs
    diff = np.abs(half.astype(np.float64) - ref.astype(np.float64))
    return ParityReport(
        n_images=int(images.shape[0]),
        max_abs_diff=float(diff.max()),
        max_rel_error=float(diff.max() / max(float(np.abs(ref).max()), 1e-30)),
        min_cosine=_min_cosine(ref, half),
    )
