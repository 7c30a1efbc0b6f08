"""Each shipped INT8 graph's own threshold, calibrated exactly as the float32 one, on that graph's scores.

INT8 moves image scores (about 2 % median on BSData, within the export's gate), and the threshold sits in
the tail of the good images' scores: the float32 threshold applied to INT8 scores would shift the
false-alarm rate it was calibrated for. So every INT8 graph gets the same calibration
(:func:`~pcedge.export.calibration.calibrate_threshold`, same target FPR) on the scores *it* gives the same
good images:

- out-of-fold (the default): every training image through the INT8 graph (ONNX Runtime CPU, the runtime's
  preprocessing), scored against the same fold bank as its float32 score. :class:`FoldGraphScores` is the
  ``on_fold`` callback of :func:`~pcedge.export.out_of_fold.out_of_fold_scores`: the fold coresets are not
  selected again, and only one batch of one fold's images and embeddings is held at a time;
- held-out images (``--val DIR`` or a held-out fraction): those images through the INT8 graph, against the
  final bank (:func:`held_out_graph_scores`).

The graphs run on ONNX Runtime CPU whatever they target: the TensorRT graph's engine rounds a little
differently on the device, which ``pcedge verify`` bounds against the export's figures.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pcedge.runtime.backends import OrtBackend
from pcedge.runtime.bundle import Geometry, ThresholdSpec
from pcedge.runtime.preprocess import ImageError, fit_geometry, read_image, to_tensor
from pcedge.runtime.scoring import Scorer

from .calibration import calibrate_threshold
from .int8_gate import image_scores


@dataclass
class GraphScores:
    """One INT8 graph's image scores ``[n_images]`` of the calibration images (NaN until scored)."""

    target: str  # "tensorrt" | "cpu" (export/int8_graph.py TARGETS)
    path: Path
    scores: np.ndarray


def network_inputs(paths: list[Path], geometry: Geometry) -> np.ndarray:
    """``paths`` decoded and fitted as the runtime does -> ``[n, 3, H, W]`` float32. Every one must still be
    readable: they were when the memory bank was built."""
    images = []
    for path in paths:
        try:
            images.append(fit_geometry(read_image(path), geometry, str(path))[0])
        except ImageError as exc:
            raise ValueError(f"{path}: readable when the memory bank was built, not any more ({exc}); "
                             "the bundle is not written") from exc
    return to_tensor(images)


class FoldGraphScores:
    """``on_fold`` callback: the INT8 graphs' scores of each fold's images against that fold's bank.

    ``graphs`` maps a target to its INT8 graph file; ``image_paths`` are the training images in the order of
    the feature rows (the out-of-fold image indices refer to them). One ONNX Runtime session per graph, open
    until :meth:`close`; ``seconds`` is the time spent here (the export reports it).
    """

    def __init__(self, graphs: dict[str, Path], image_paths: list[Path], geometry: Geometry,
                 threads: int | None = None, batch: int = 8):
        self.image_paths, self.geometry, self.batch = image_paths, geometry, batch
        self.graphs = [GraphScores(target, Path(path), np.full(len(image_paths), np.nan)) for target, path in graphs.items()]
        self.backends: list[OrtBackend] = []
        try:
            for graph in self.graphs:
                self.backends.append(OrtBackend(graph.path, "ort-cpu", threads, precision="int8"))
        except BaseException:
            self.close()
            raise
        self.seconds = 0.0

    def __call__(self, image_ids: np.ndarray, scorer: Scorer) -> None:
        """Score the images ``image_ids [m]`` with every graph against ``scorer`` (the bank without them)."""
        start = time.perf_counter()
        for first in range(0, image_ids.size, self.batch):
            ids = image_ids[first : first + self.batch]
            images = network_inputs([self.image_paths[i] for i in ids], self.geometry)  # [b, 3, H, W]
            for graph, backend in zip(self.graphs, self.backends):
                graph.scores[ids] = image_scores(scorer, backend(images))
        self.seconds += time.perf_counter() - start

    def close(self) -> None:
        for backend in self.backends:
            backend.close()
        self.backends = []

    def __enter__(self) -> "FoldGraphScores":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def held_out_graph_scores(graphs: dict[str, Path], images: np.ndarray, scorer: Scorer, threads: int | None = None,
                          batch: int = 8) -> list[GraphScores]:
    """Each INT8 graph's scores of held-out ``images [n, 3, H, W]`` against the final bank's ``scorer``."""
    out = []
    for target, path in graphs.items():
        backend = OrtBackend(Path(path), "ort-cpu", threads, precision="int8")
        try:
            scores = [s for first in range(0, images.shape[0], batch)
                      for s in image_scores(scorer, backend(images[first : first + batch]))]
        finally:
            backend.close()
        out.append(GraphScores(target, Path(path), np.asarray(scores, dtype=np.float64)))
    return out


def graph_threshold(graph: GraphScores, target_fpr: float, source: str, folds: int = 0) -> ThresholdSpec | str:
    """``graph``'s own :class:`ThresholdSpec` (as the float32 one: same rule, FPR and fold count), or a sentence
    saying why its scores cannot give one (non-finite, or all 0)."""
    scores = graph.scores
    if scores.size == 0 or not np.all(np.isfinite(scores)):
        return f"{graph.path.name} gave non-finite calibration scores"
    if float(np.max(scores)) <= 0.0:
        return f"all {scores.size} calibration scores of {graph.path.name} are 0"
    threshold = calibrate_threshold(scores, target_fpr, f"{source}, through {graph.path.name} on ONNX Runtime CPU",
                                    folds=folds)
    if not (np.isfinite(threshold.value) and threshold.value > 0):
        return f"{graph.path.name}'s threshold {threshold.value!r} is not a positive finite number"
    return threshold
