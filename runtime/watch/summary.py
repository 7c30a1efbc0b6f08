"""What a watch run measured: per-frame stage latencies, a fixed-size sample of them, the run's summary."""

from __future__ import annotations

import dataclasses
import math
import random
from dataclasses import dataclass

import numpy as np



@dataclass
class LatencyMs:
    """Milliseconds per stage of one frame (or one quantile over frames).

    ``wait`` is time spent in queues (``total`` minus the working stages); ``total`` runs from the moment
    the source delivered the frame to the moment its outputs were written.
    """

    wait: float = 0.0
    preprocess: float = 0.0
    backbone: float = 0.0
    index: float = 0.0
    scoring: float = 0.0
    output: float = 0.0
    total: float = 0.0

    def rounded(self, digits: int = 3) -> "LatencyMs":
        return LatencyMs(*(round(v, digits) for v in dataclasses.astuple(self)))


_STAGES = [f.name for f in dataclasses.fields(LatencyMs)]


class LatencyReservoir:
    """A uniform sample of at most ``capacity`` frames' latencies (Vitter's Algorithm R).

    Memory is one fixed ``[capacity, stages]`` array however long the run; quantiles come from the sample.
    """

    def __init__(self, capacity: int = 4096, seed: int = 0):
        self.rows = np.zeros((capacity, len(_STAGES)), dtype=np.float64)
        self.seen = 0
        self._rng = random.Random(seed)  # its own generator: no shared global state

    def add(self, latency: LatencyMs) -> None:
        capacity = self.rows.shape[0]
        if self.seen < capacity:
            slot = self.seen
        else:
            slot = self._rng.randrange(self.seen + 1)  # keep with probability capacity / (seen + 1)
        if slot < capacity:
            self.rows[slot] = dataclasses.astuple(latency)
        self.seen += 1

    def quantile(self, q: float) -> LatencyMs:
        n = min(self.seen, self.rows.shape[0])
        if n == 0:
            return LatencyMs(*([float("nan")] * len(_STAGES)))
        return LatencyMs(*(float(v) for v in np.percentile(self.rows[:n], q, axis=0)))




@dataclass
class WatchSummary:
    """What a watch run did; ``processed + dropped + skipped == frames`` always."""

    source: str
    live: bool
    frames: int  # delivered by the source (usable or not)
    processed: int
    dropped: int
    skipped: int
    anomalies: int
    saved: int  # anomalous frames written to the save folder
    reconnects: int
    failed_reads: int
    elapsed_s: float
    fps: float  # processed frames per second of wall time
    latency_p50: LatencyMs
    latency_p95: LatencyMs
    stopped_by: str  # "end of stream", "max frames", "duration", "SIGINT", "SIGTERM", "window", "error"
    error: str | None = None
    jsonl: str | None = None
    video: str | None = None
    save_dir: str | None = None

    @property
    def accounted(self) -> bool:
        return self.processed + self.dropped + self.skipped == self.frames

    def to_dict(self) -> dict:
        """JSON-ready (no frames processed: latencies are None, not NaN, which JSON lacks)."""
        out = dataclasses.asdict(self)
        for key in ("latency_p50", "latency_p95"):
            out[key] = {k: (None if math.isnan(v) else v) for k, v in dataclasses.asdict(getattr(self, key).rounded()).items()}
        out["elapsed_s"], out["fps"] = round(self.elapsed_s, 3), round(self.fps, 3)
        out["accounted"] = self.accounted
        return out

    def describe(self) -> str:
        lines = [
            f"frames {self.frames}: processed {self.processed}, dropped {self.dropped}, skipped {self.skipped}"
            f" ({'all accounted for' if self.accounted else 'NOT ACCOUNTED FOR'})",
            f"anomalies {self.anomalies} (saved {self.saved}); reconnects {self.reconnects}, failed reads {self.failed_reads}",
            f"{self.fps:.2f} frames/s over {self.elapsed_s:.1f} s; latency p50 {self.latency_p50.total:.1f} ms,"
            f" p95 {self.latency_p95.total:.1f} ms (backbone p50 {self.latency_p50.backbone:.1f} ms)",
            f"stopped by {self.stopped_by}" + (f": {self.error}" if self.error else ""),
        ]
        return "\n".join(lines)

