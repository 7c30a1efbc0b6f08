"""The device-side detector: a bundle opened with a backend and an index; images in, results out.

    with Detector.open("bottle.pcedge") as detector:
        result = detector("part.png")          # or an OpenCV frame (BGR / gray, uint8 / uint16)
        print(result.score, result.verdict)

Stages (timed separately): preprocess (geometry + float conversion; decoding a file is not counted),
backbone (the engine), index (nearest-neighbour search, including the exact re-scoring pass), scoring
(Eq. 7, anomaly map, placement back into the original image).
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from .backends import Backend, default_threads, open_backend
from .bundle import Bundle, Manifest, open_bundle
from .core_split import CoreSplit
from .index import PrunedExactIndex, make_index
from .preprocess import InputBuffers, Placement, read_image
from .scoring import Scorer, normalise
from .spin_governor import SpinChoice
from .thresholds import active_threshold

ImageInput = "str | os.PathLike[str] | np.ndarray"


def _limit_blas_threads(threads: int | None):
    """Limit numpy's BLAS pool (threadpoolctl) until the returned limiter is restored; None: no change."""
    if threads is None:
        return None
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=threads, user_api="blas")


def _open_split(options: "DetectorOptions") -> CoreSplit | None:
    """The single-stream path's helper threads (DetectorOptions.split_threads), or None for one thread."""
    threads = options.split_threads if options.split_threads is not None else (options.threads or default_threads())
    if threads < 1:
        raise ValueError(f"split_threads must be at least 1, got {threads}")
    return CoreSplit(threads) if threads > 1 else None


@dataclass
class StageTimings:
    """Milliseconds per stage for one image (batch stages are divided evenly over the batch)."""

    decode_ms: float = 0.0
    preprocess_ms: float = 0.0
    backbone_ms: float = 0.0
    index_ms: float = 0.0
    scoring_ms: float = 0.0

    @property
    def total_ms(self) -> float:
        """Everything but decoding (a camera delivers decoded frames)."""
        return self.preprocess_ms + self.backbone_ms + self.index_ms + self.scoring_ms


@dataclass
class Result:
    """One image's outcome."""

    score: float  # raw image score s (Eq. 7 if re-weighting is on)
    normalised: float  # threshold -> 0.5, clipped to [0, 1]
    anomalous: bool  # score > threshold
    threshold: float
    anomaly_map: np.ndarray = field(repr=False)  # [H, W] float32 in the original image; NaN = not seen
    patch_scores: np.ndarray = field(repr=False)  # [h, w] float32 nearest-neighbour distances
    s_star: float = 0.0  # the largest patch score (Eq. 6)
    n_rescored: int = 0  # patches re-scored exactly after the approximate search
    timings: StageTimings = field(default_factory=StageTimings)
    source: str | None = None

    @property
    def verdict(self) -> str:
        return "anomalous" if self.anomalous else "good"


@dataclass
class DetectorOptions:
    backend: str = "auto"  # see runtime.backends.BACKENDS
    index: str = "auto"  # auto | exact | hnsw
    ef: int | None = None  # HNSW query ef (None: the bundle's default)
    threshold: float | None = None  # overrides the calibrated threshold of the graph that runs
    threads: int | None = None  # CPU threads for the backend and the index (None: all available)
    rescore: bool = True  # exact re-scoring of the decisive patches after HNSW
    # TensorRT engine precision to prefer; "int8" runs the INT8 graph on any backend; "fp32" forces float32 on
    # ONNX Runtime CPU, whose default (None) is its INT8 graph when the bundle ships one with its own threshold.
    precision: str | None = None
    verify_checksums: bool = True
    # An Ed25519 public key (PEM file) the bundle must be signed with (`pcedge sign`); None: signatures
    # are not required. When set, unsigned or wrongly signed bundles are refused and checksums always checked.
    trusted_key: str | os.PathLike[str] | None = None
    # BLAS threads for the exact index's matrix products while the detector is open. One image's products
    # are small (784 x N x D): waking a second BLAS thread costs more than it saves whenever the backend or
    # another process holds the other cores (measured: 16 x 10584 x 152 took 0.9 ms on one thread, 7.6 ms
    # on two under load). None leaves numpy's setting alone.
    blas_threads: int | None = 1
    # Threads the single-stream path (batch, run_frames: the detector owns the machine) splits a frame's
    # INTER_AREA shrink and the exact index's search over, with its own helper threads (runtime/core_split.py;
    # BLAS stays on blas_threads). None: `threads` if set, else every usable CPU; 1: no split. The watch
    # pipeline and servers call embed/score_embeddings, which never split: their stages already overlap.
    split_threads: int | None = None
    # ONNX Runtime CPU's intra-op threads busy-wait during a run of the single-stream path (batch,
    # run_frames) and stop when it returns: faster when the detector owns the machine, slower on average
    # when another process holds a core (results/latency_spinning.md). "auto": a second session over the
    # same graph spins while a governor finds it faster (runtime/spin_governor.py); True: always; False:
    # never (one session, less memory). The watch pipeline and servers (embed) never spin: their stages overlap.
    ort_spinning: bool | str = "auto"


class Detector:
    def __init__(self, bundle: Bundle, backend: Backend, options: DetectorOptions):
        self._blas_limit = _limit_blas_threads(options.blas_threads)
        self.bundle = bundle
        self.manifest: Manifest = bundle.manifest
        self.options = options
        self.backend = backend
        self.bank = bundle.load_memory_bank()  # [N, D]
        self.exact = PrunedExactIndex(self.bank)  # exact; prunes the few-query calls (re-scoring, Eq. 7)
        self.index = make_index(
            options.index, self.bank, self.manifest.index, bundle.index_path, ef=options.ef, threads=options.threads
        )
        if getattr(self.index, "kind", "") == "exact":
            self.index = self.exact  # one exact index serves both roles
        self.scorer = Scorer(self.bank, self.index, self.exact, self.manifest.scoring, rescore=options.rescore)
        self.geometry = self.manifest.input.geometry
        self.grid = (self.manifest.output.grid_h, self.manifest.output.grid_w)
        # The threshold calibrated on the scores of the graph the backend runs (INT8 graphs have their own).
        self.active_threshold = active_threshold(bundle, backend)
        spec = self.active_threshold.spec
        self.threshold = float(options.threshold if options.threshold is not None else spec.value)
        self.scale = float(spec.scale) if spec.scale > 0 else 1.0
        # Network-input memory reused from frame to frame, one set per thread that calls run_frames (the
        # watch pipeline and a server may call from several); see InputBuffers.
        self._inputs = threading.local()
        # Spinning on the single-stream path as the backend offers it (OrtBackend.spinning; False for
        # backends without a spinning session): never, always, or governed frame by frame.
        self._spin = SpinChoice(getattr(backend, "spinning", False) if backend is not None else False)
        self._split = _open_split(options)  # last: nothing after it can fail and leave its threads behind

    @classmethod
    def open(cls, bundle_path: str | os.PathLike[str], options: DetectorOptions | None = None, **kwargs) -> "Detector":
        """Open a bundle (checksums verified) with the chosen backend and index.

        ``kwargs`` are :class:`DetectorOptions` fields, for convenience.
        """
        options = options or DetectorOptions(**kwargs)
        bundle = open_bundle(bundle_path, verify=options.verify_checksums, trust=options.trusted_key)
        backend = open_backend(options.backend, bundle, threads=options.threads, precision=options.precision,
                               spinning=options.ort_spinning)
        try:
            return cls(bundle, backend, options)
        except Exception:
            backend.close()
            raise

    @classmethod
    def open_scoring(cls, bundle_path: str | os.PathLike[str], options: DetectorOptions | None = None) -> "Detector":
        """Open a bundle for :meth:`score_embeddings` only: no backend, the embeddings come from elsewhere
        (a Triton embedder model, which serves the float32 graph: the float32 threshold applies). :meth:`embed`
        and the methods that call it are unavailable."""
        options = options or DetectorOptions()
        return cls(open_bundle(bundle_path, verify=options.verify_checksums), None, options)

    @property
    def spin_governor(self):
        """The :class:`~pcedge.runtime.spin_governor.SpinGovernor` of ``ort_spinning="auto"``, else None."""
        return self._spin.governor

    @property
    def description(self) -> str:
        backend = self.backend.description if self.backend is not None else "none (scoring only)"
        which = "--threshold" if self.options.threshold is not None else self.active_threshold.note
        return f"backend {backend}; threshold {self.threshold:.5g} ({which}); index {self.index.kind} ({self.index.note})"

    # ------------------------------------------------------------------ running
    def __call__(self, image: ImageInput) -> Result:
        return self.batch([image])[0]

    def batch(self, images: list) -> list[Result]:
        """Paths or OpenCV frames -> one :class:`Result` each (one backbone call for the whole batch)."""
        t0 = time.perf_counter()
        frames, sources = [], []
        for image in images:
            if isinstance(image, np.ndarray):
                frames.append(image)
                sources.append(None)
            else:
                frames.append(read_image(image))
                sources.append(str(image))
        decode_ms = (time.perf_counter() - t0) * 1e3 / max(1, len(images))
        return self.run_frames(frames, sources, decode_ms)

    def run_frames(self, frames: list[np.ndarray], sources: list[str | None] | None = None,
                   decode_ms: float = 0.0) -> list[Result]:
        """Decoded OpenCV frames -> results (preprocess, backbone, index, scoring)."""
        if not frames:
            return []
        sources = sources or [None] * len(frames)
        spin = self._spin.should_spin()
        t1 = time.perf_counter()
        tensor, placements = self.input_buffers().prepare(frames, sources)
        t2 = time.perf_counter()
        results = self.score_tensor(tensor, placements, sources, split=True, spin=spin)
        # The whole call, not the backbone alone: under contention spinning slows the stages after it too.
        self._spin.record(spin, (time.perf_counter() - t1) * 1e3 / len(frames))
        for r in results:
            r.timings.decode_ms = decode_ms
            r.timings.preprocess_ms = (t2 - t1) * 1e3 / len(frames)
        return results

    def input_buffers(self) -> InputBuffers:
        """This thread's reused network-input buffers (created on its first call)."""
        buffers = getattr(self._inputs, "buffers", None)
        if buffers is None:
            buffers = self._inputs.buffers = InputBuffers(self.geometry, self._split)
        return buffers

    def embed(self, tensor: np.ndarray, *, spin: bool = False) -> np.ndarray:
        """Network batch ``[B, 3, H, W]`` -> embeddings ``[B, h*w, D]`` from the backend.

        ``spin``: run the backend's spinning session (only the single-stream path asks, when its
        :class:`SpinChoice` says so); the watch pipeline and servers call without it and never spin."""
        if self.backend is None:
            raise RuntimeError("this detector was opened for scoring only (Detector.open_scoring): no backend")
        return self.backend.run_spinning(tensor) if spin else self.backend(tensor)

    def score_tensor(self, tensor: np.ndarray, placements: list[Placement], sources: list[str | None] | None = None,
                     *, split: bool = False, spin: bool = False) -> list[Result]:
        """Network batch ``[B, 3, H, W]`` (already preprocessed) -> results in original-image coordinates.

        ``split``: as :meth:`score_embeddings`; ``spin``: as :meth:`embed`."""
        t0 = time.perf_counter()
        embeddings = self.embed(tensor, spin=spin)
        t1 = time.perf_counter()
        results = self.score_embeddings(embeddings, placements, sources, split=split)
        backbone_ms = (t1 - t0) * 1e3 / len(results)
        for r in results:
            r.timings.backbone_ms = backbone_ms
        return results

    def score_embeddings(self, embeddings: np.ndarray, placements: list[Placement] | None,
                         sources: list[str | None] | None = None, *, split: bool = False) -> list[Result]:
        """Embeddings ``[B, h*w, D]`` -> results (index, Eq. 7, anomaly maps).

        With ``placements`` None the maps stay at network resolution ``[H, W]`` (a server's scorer: the
        client, which kept the placement, maps them back into its frame). ``split`` spreads an exact
        index's search over the detector's split threads (``DetectorOptions.split_threads``); only a
        caller that owns the machine should ask (run_frames does; the watch pipeline does not).
        """
        B = embeddings.shape[0]
        sources = sources or [None] * B
        h, w = self.grid
        H, W = self.geometry.height, self.geometry.width
        t0 = time.perf_counter()
        patches = self.scorer.patch_scores(embeddings, self._split if split else None)
        t1 = time.perf_counter()
        index_ms = (t1 - t0) * 1e3 / B
        results = []
        for b in range(B):
            ts = time.perf_counter()
            image = self.scorer.image_score(embeddings[b], patches[b])
            grid = patches[b].distances.reshape(h, w)
            net_map = self.scorer.anomaly_map(grid, H, W)
            full_map = placements[b].to_original(net_map) if placements is not None else net_map
            scoring_ms = (time.perf_counter() - ts) * 1e3
            results.append(
                Result(
                    score=image.score,
                    normalised=float(normalise(image.score, self.threshold, self.scale)),
                    anomalous=bool(image.score > self.threshold),
                    threshold=self.threshold,
                    anomaly_map=full_map,
                    patch_scores=grid,
                    s_star=image.s_star,
                    n_rescored=patches[b].n_rescored,
                    timings=StageTimings(index_ms=index_ms, scoring_ms=scoring_ms),
                    source=sources[b],
                )
            )
        return results

    def normalise_map(self, anomaly_map: np.ndarray) -> np.ndarray:
        """A map in raw distance units -> the normalised scale (threshold at 0.5)."""
        return normalise(anomaly_map, self.threshold, self.scale).astype(np.float32)

    def close(self) -> None:
        if self.backend is not None:
            self.backend.close()
            self.backend = None
        if self._blas_limit is not None:
            self._blas_limit.restore_original_limits()
            self._blas_limit = None
        if self._split is not None:
            self._split.close()
            self._split = None

    def __enter__(self) -> "Detector":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
