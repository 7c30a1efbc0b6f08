"""Export the :class:`PatchEmbedder` to one ONNX file, and check it against torch on real images.

Exporter choice (torch 2.14): the dynamo exporter (``torch.export`` + onnxscript, then its optimiser).
With only the batch dimension dynamic it gives a clean static graph for EfficientNet-Lite0 at 224x224:
69 nodes, no Shape/Gather arithmetic (every spatial size is a constant), the static TF-"SAME" pads
folded into the Conv nodes, and the final Reshape takes a constant ``[-1, D, h*w]``. The TorchScript
exporter on the same module gives 187 nodes (Constant, Slice, ConstantOfShape, Cast and Reshape chains
around the explicit pads) and leaves ~100 unnamed symbolic dimensions after shape inference, including
two in the output shape; TensorRT copes with that, but it is harder to read and to verify.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

from pcedge.runtime.bundle import ParityReport

from .embedder import PatchEmbedder

INPUT_NAME = "images"
OUTPUT_NAME = "embeddings"
BATCH_DIM = "batch"
#: Largest batch the exported graph promises to accept (torch.export needs a bound; engines pick their own).
MAX_BATCH = 1024
#: max |onnx - torch| / max |torch| allowed by :func:`assert_parity` (float32 kernels differ by ~1e-6).
PARITY_REL_TOL = 1e-3


class ParityError(RuntimeError):
    """The exported graph does not reproduce the torch module; the message gives the figures."""


def export_onnx(embedder: PatchEmbedder, path: str | os.PathLike[str], height: int, width: int, opset: int = 18) -> None:
    """Write ``embedder`` as one self-contained ONNX file (no external data).

    Input ``images`` float32 ``[batch, 3, height, width]``, output ``embeddings`` float32
    ``[batch, h*w, D]``; only ``batch`` is dynamic. Written to ``<path>.tmp``, checked with
    ``onnx.checker``, then renamed into place.
    """
    path = Path(path)
    if embedder.training:
        raise ValueError("export_onnx: the embedder is in training mode; call .eval() (BatchNorm must use running stats)")
    grid_h, grid_w = embedder.grid(height, width)  # ValueError for sizes that are not multiples of 16
    # Batch 2 as the example keeps it clear of torch.export's special-casing of sizes 0 and 1.
    example = torch.full((2, 3, height, width), 0.5, dtype=torch.float32)
    batch = torch.export.Dim(BATCH_DIM, min=1, max=MAX_BATCH)
    tmp = path.with_name(path.name + ".tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with torch.no_grad():
            program = torch.onnx.export(
                embedder,
                (example,),
                dynamo=True,
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                opset_version=opset,
                dynamic_shapes={"images": {0: batch}},
                external_data=False,
                optimize=True,
                verbose=False,
            )
        program.save(tmp, external_data=False)
        model = onnx.load(str(tmp))
        onnx.checker.check_model(model, full_check=True)
        _check_interface(model, tmp, [BATCH_DIM, 3, height, width], [BATCH_DIM, grid_h * grid_w, embedder.dim])
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _check_interface(model: onnx.ModelProto, path: Path, input_shape: list, output_shape: list) -> None:
    """The graph has exactly the promised input and output: names, float32, and only ``batch`` symbolic."""
    for kind, values, name, shape in (
        ("input", model.graph.input, INPUT_NAME, input_shape),
        ("output", model.graph.output, OUTPUT_NAME, output_shape),
    ):
        found = [(v.name, v.type.tensor_type.elem_type, [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim])
                 for v in values]
        expected = [(name, onnx.TensorProto.FLOAT, shape)]
        if found != expected:
            raise RuntimeError(f"{path}: exported {kind} is {found}, expected {expected} (elem type 1 = float32)")


def check_parity(embedder: PatchEmbedder, onnx_path: str | os.PathLike[str], images: np.ndarray,
                 chunk: int = 8) -> ParityReport:
    """Run ``images`` ``[n, 3, H, W]`` through torch and through ONNX Runtime (CPU) and compare.

    ``max_rel_error = max |onnx - torch| / max |torch|`` over every output value; ``min_cosine`` is the
    smallest cosine similarity between the two versions of any single patch vector.
    """
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[1] != 3 or images.shape[0] == 0:
        raise ValueError(f"check_parity: expected images [n, 3, H, W] with n >= 1, got {list(images.shape)}")
    images = np.ascontiguousarray(images, dtype=np.float32)
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    reference, exported = [], []
    with torch.no_grad():
        for start in range(0, len(images), chunk):
            batch = images[start : start + chunk]
            reference.append(embedder(torch.from_numpy(batch)).numpy())
            exported.append(session.run([OUTPUT_NAME], {INPUT_NAME: batch})[0])
    torch_out, onnx_out = np.concatenate(reference), np.concatenate(exported)
    if torch_out.shape != onnx_out.shape:
        raise ParityError(f"{onnx_path}: ONNX output shape {list(onnx_out.shape)} != torch {list(torch_out.shape)}")
    diff = np.abs(onnx_out.astype(np.float64) - torch_out.astype(np.float64))
    scale = float(np.abs(torch_out).max())
    max_abs = float(diff.max())
    return ParityReport(
        n_images=int(len(images)),
        max_abs_diff=max_abs,
        max_rel_error=max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else float("inf")),
        min_cosine=_min_cosine(torch_out.reshape(-1, torch_out.shape[-1]), onnx_out.reshape(-1, onnx_out.shape[-1])),
    )


def _min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Smallest row-wise cosine similarity of ``a, b`` ``[M, D]`` (two zero rows count as identical)."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    dots = np.einsum("md,md->m", a, b)
    both_zero = (np.linalg.norm(a, axis=1) == 0) & (np.linalg.norm(b, axis=1) == 0)
    cosine = np.where(both_zero, 1.0, dots / np.maximum(norms, np.finfo(np.float64).tiny))
    return float(cosine.min())


def assert_parity(report: ParityReport, tolerance: float = PARITY_REL_TOL) -> None:
    """Raise :class:`ParityError` with the figures unless ``max_rel_error <= tolerance`` (NaN fails too)."""
    if not report.max_rel_error <= tolerance:
        raise ParityError(
            f"ONNX export differs from torch on {report.n_images} images: max relative error "
            f"{report.max_rel_error:.3g} > {tolerance:g} (max abs diff {report.max_abs_diff:.3g}, "
            f"min patch cosine {report.min_cosine:.6f})"
        )
