"""The Python-backend models of a pcedge Triton repository (see :mod:`.repository`).

Triton's Python backend runs each model instance in its own stub process and calls
``initialize(args)``, ``execute(requests) -> responses`` and ``finalize()`` on the class its ``model.py``
names ``TritonPythonModel``; the generated ``model.py`` files import these classes under that name.
``triton_python_backend_utils`` exists only inside that stub, so it is imported in ``initialize``.

With dynamic batching Triton hands ``execute`` several requests at once: they are concatenated into one
backbone call (embedder) or one batched index query (scorer) and split again, which is where batching
saves time. A request that fails (bad content) gets its own error response; the others still succeed.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from ..backends import OrtBackend
from ..detector import Detector, DetectorOptions

EMBEDDINGS = "EMBEDDINGS"  # the scorer's input (repository.EMBEDDINGS; not imported: keep protobuf out)


def _parameters(args: dict) -> dict[str, str]:
    config = json.loads(args["model_config"])
    return {key: value.get("string_value", "") for key, value in config.get("parameters", {}).items()}


def _version_dir(args: dict) -> Path:
    """The model's version folder (``args["model_repository"]`` is the model's own folder)."""
    return Path(args["model_repository"]) / str(args["model_version"])


# Tensors cross the stub boundary by DLPack, not by ``Tensor(name, ndarray)`` / ``as_numpy()``: the
# nvidia-pytriton 0.7.0 stub (Python backend 24.10) was compiled against numpy 1.x's array struct and, with
# numpy 2 in the environment, reads every numpy array as 0 bytes (checked: each output arrived empty).
# DLPack is a stable ABI that both numpy versions speak.


def _tensor(pb_utils, name: str, array: np.ndarray):
    capsule = np.ascontiguousarray(array).__dlpack__()
    tensor = pb_utils.Tensor.from_dlpack(name, capsule)
    # Taking ownership, the stub renames the capsule "used_dlpack"; numpy's capsule destructor only knows
    # "used_dltensor" and reports a ValueError as unraisable when the capsule goes. Only noise (the stub
    # frees the tensor itself), but one traceback per output per request in the server log: hushed here.
    previous = sys.unraisablehook
    sys.unraisablehook = _ignore_capsule_rename(previous)
    try:
        del capsule
    finally:
        sys.unraisablehook = previous
    return tensor


def _ignore_capsule_rename(previous):
    def hook(unraisable) -> None:
        if not (isinstance(unraisable.exc_value, ValueError) and "PyCapsule" in str(unraisable.exc_value)):
            previous(unraisable)

    return hook


def _array(tensor) -> np.ndarray:
    return np.from_dlpack(tensor)


def _split(requests, name: str, pb_utils) -> tuple[list[np.ndarray], list[int]]:
    arrays = [_array(pb_utils.get_input_tensor_by_name(request, name)) for request in requests]
    return arrays, [a.shape[0] for a in arrays]


class EmbedderModel:
    """CPU-only embedder: ONNX Runtime on the bundle's graph, images ``[B, 3, H, W]`` -> ``[B, h*w, D]``."""

    def initialize(self, args: dict) -> None:
        import triton_python_backend_utils as pb_utils

        self.pb = pb_utils
        params = _parameters(args)
        config = json.loads(args["model_config"])
        self.input_name = config["input"][0]["name"]
        self.output_name = config["output"][0]["name"]
        threads = int(params.get("threads") or 0) or None
        self.backend = OrtBackend(_version_dir(args) / params.get("model_file", "model.onnx"), "ort-cpu", threads)

    def execute(self, requests):
        try:
            arrays, sizes = _split(requests, self.input_name, self.pb)
            embeddings = self.backend(np.concatenate(arrays))  # one backbone call for every request
        except Exception as exc:  # onnxruntime's own error types; the server must keep serving
            error = self.pb.TritonError(f"embedder: {exc}")
            return [self.pb.InferenceResponse(error=error) for _ in requests]
        responses, start = [], 0
        for size in sizes:
            part = embeddings[start : start + size]
            responses.append(self.pb.InferenceResponse(output_tensors=[_tensor(self.pb, self.output_name, part)]))
            start += size
        return responses

    def finalize(self) -> None:
        self.backend.close()


class ScorerModel:
    """Embeddings ``[B, h*w, D]`` -> image score (Eq. 6-7), verdict, patch scores ``[h, w]`` and the
    anomaly map ``[H, W]`` at network resolution, via :meth:`Detector.score_embeddings`."""

    def initialize(self, args: dict) -> None:
        import triton_python_backend_utils as pb_utils

        self.pb = pb_utils
        params = _parameters(args)
        bundle = _version_dir(args) / params.get("bundle", "bundle")
        # One BLAS thread (the detector's default) and one index thread: Triton scales by instances.
        options = DetectorOptions(index=params.get("index", "auto"), threads=1)
        self.detector = Detector.open_scoring(bundle, options)

    def _outputs(self, results) -> list:
        """One request's results -> its output tensors, each ``[size, ...]`` (the request's own batch)."""
        def Tensor(name, array):
            return _tensor(self.pb, name, array)

        def column(value, dtype):
            return np.array([[value(r)] for r in results], dtype=dtype)  # [size, 1]

        return [
            Tensor("SCORE", column(lambda r: r.score, np.float64)),
            Tensor("NORMALISED", column(lambda r: r.normalised, np.float64)),
            Tensor("ANOMALOUS", column(lambda r: r.anomalous, np.bool_)),
            Tensor("THRESHOLD", column(lambda r: r.threshold, np.float64)),
            Tensor("S_STAR", column(lambda r: r.s_star, np.float64)),
            Tensor("RESCORED", column(lambda r: r.n_rescored, np.int32)),
            Tensor("PATCH_SCORES", np.stack([r.patch_scores for r in results]).astype(np.float32)),  # [size, h, w]
            Tensor("ANOMALY_MAP", np.stack([r.anomaly_map for r in results]).astype(np.float32)),  # [size, H, W]
        ]

    def execute(self, requests):
        pb = self.pb
        try:
            arrays, sizes = _split(requests, EMBEDDINGS, pb)
            results = self.detector.score_embeddings(np.concatenate(arrays), None)  # one batched index query
        except Exception as exc:  # a bad embedding (NaN, wrong size) must not take the server down
            return [pb.InferenceResponse(error=pb.TritonError(f"scorer: {exc}")) for _ in requests]
        responses, start = [], 0
        for size in sizes:
            responses.append(pb.InferenceResponse(output_tensors=self._outputs(results[start : start + size])))
            start += size
        return responses

    def finalize(self) -> None:
        self.detector.close()
