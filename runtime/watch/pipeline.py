"""The ``pcedge watch`` loop: a frame source through the detector, in stages that overlap.

    capture thread         backbone thread               scoring thread               main thread
    source.read() --q1--> InputBuffers.prepare   --q2--> score_embeddings   --q3--> JSONL, saved frames,
                          detector.embed                  (index on the CPU,          video, window
                                                           Eq. 7, anomaly map)

The queues are bounded, so the backbone of frame t+1 runs while frame t is being scored and memory stays
flat however long the run. Live sources: q1 holds one frame and a newer frame replaces a waiting one
(the replaced frame is *dropped* and logged) -- a slow model sees the newest picture, never a backlog.
Files and folders: every frame is processed (the capture waits for room).

Every frame the source delivers ends up in exactly one of three outcomes, each written to the JSONL log:
``processed`` (scored), ``dropped`` (stale live frame, or discarded after a fatal error) or ``skipped``
(corrupt at the source). So ``processed + dropped + skipped == frames``, checked at the end.

Stopping (end of stream, ``max_frames``, ``duration_s``, Ctrl-C, SIGTERM, ``q`` in the window) stops the
capture, lets the frames already in flight finish, flushes and closes every output, releases the source,
and returns a :class:`WatchSummary`. A second Ctrl-C abandons the frames in flight (logged as dropped).
"""

from __future__ import annotations

import dataclasses
import logging
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from ..detector import Detector, Result
from ..errors import WatchError
from ..overlay import render_overlay
from ..preprocess import ImageError, InputBuffers, Placement
from .channel import EMPTY, END, Channel
from .outputs import AnomalySaver, EventLog, VideoSink, Window
from .sources import Frame, FrameSource, SourceEvent
from .summary import LatencyMs, LatencyReservoir, WatchSummary

log = logging.getLogger("pcedge.watch")

#: Drop reasons in the event log (besides "stale: ..." for live frames and "error in STAGE: ..." for the frame
#: that failed).
ABANDONED = "abandoned: a second Ctrl-C stopped the run before this frame was done"
AFTER_ERROR = "not processed: the run stopped on an error"


@dataclass
class WatchOptions:
    jsonl: Path | None = None  # event log: one JSON object per line
    save_dir: Path | None = None  # anomalous frames and their overlays
    save_every_s: float = 5.0  # at most one anomalous frame saved per this many seconds
    video_out: Path | None = None  # annotated video of every processed frame
    show: bool = False  # a window with the overlay, score, verdict and FPS
    max_frames: int | None = None  # stop after this many frames from the source
    duration_s: float | None = None  # stop after this many seconds
    # Frames waiting between two stages (files and folders; live sources always use 1, newest wins).
    # One is enough for every stage to overlap with the next; more only adds latency and memory.
    queue_size: int = 1
    latency_reservoir: int = 4096  # latency samples kept for the quantiles (fixed memory)
    handle_signals: bool = True  # SIGINT/SIGTERM stop gracefully (only when run from the main thread)
    seed: int = 0  # the reservoir's sampling


@dataclass
class _InFlight:
    """One frame on its way through the stages (only the data the next stage needs is kept)."""

    frame: Frame
    read_at: float  # perf_counter when the source delivered it
    placement: Placement | None = None
    embeddings: np.ndarray | None = field(default=None, repr=False)  # [1, h*w, D]
    result: Result | None = None
    preprocess_ms: float = 0.0
    backbone_ms: float = 0.0
    counted: bool = False  # its outcome (processed or dropped) is in the tally


@dataclass
class _Tally:
    frames: int = 0
    processed: int = 0
    dropped: int = 0
    skipped: int = 0
    anomalies: int = 0


class WatchPipeline:
    """``WatchPipeline(detector, source, options).run() -> WatchSummary``.

    The detector and the source are borrowed: the pipeline releases the source when it finishes (from
    the capture thread, which owns it) but leaves the detector open for the caller.
    """

    def __init__(self, detector: Detector, source: FrameSource, options: WatchOptions | None = None):
        self.detector = detector
        self.source = source
        self.options = options or WatchOptions()
        if self.options.queue_size < 1:
            raise WatchError(f"queue_size must be at least 1, got {self.options.queue_size}")
        self._stop = threading.Event()
        self._abandon = threading.Event()  # second Ctrl-C: discard what is in flight
        self._stop_reason: str | None = None
        self._error: str | None = None
        self._lock = threading.Lock()
        self._tally = _Tally()
        # Network-input memory reused frame after frame; only the backbone thread (_embed) touches it.
        self._inputs = InputBuffers(detector.geometry)
        self._latency = LatencyReservoir(self.options.latency_reservoir, self.options.seed)
        live = source.is_live
        self._q_frames = Channel(1 if live else self.options.queue_size)
        self._q_embedded = Channel(1 if live else self.options.queue_size)
        self._q_scored = Channel(1 if live else self.options.queue_size)
        self._log: EventLog | None = None
        self._fps_ema = 0.0
        self._last_output: float | None = None

    # ---------------------------------------------------------------- control
    def request_stop(self, reason: str) -> None:
        """Stop capturing; frames in flight still finish. Safe from any thread and from signal handlers."""
        if self._stop_reason is None:
            self._stop_reason = reason
        self._stop.set()
        self.source.stop()

    def _abandon_in_flight(self) -> None:
        self._abandon.set()
        for channel in (self._q_frames, self._q_embedded, self._q_scored):
            channel.cancel()

    def _fail(self, stage: str, frame_number: int, exc: BaseException) -> None:
        log.error("watch: %s failed at frame %d: %s", stage, frame_number, exc, exc_info=exc)
        with self._lock:
            if self._error is None:
                self._error = f"{stage}, frame {frame_number}: {type(exc).__name__}: {exc}"
        self.request_stop("error")

    # ---------------------------------------------------------------- accounting
    def _count(self, **deltas: int) -> None:
        with self._lock:
            for name, delta in deltas.items():
                setattr(self._tally, name, getattr(self._tally, name) + delta)

    def _dropped(self, item: _InFlight, reason: str) -> None:
        self._count(dropped=1)
        item.counted = True
        self._log.write({"event": "dropped", "frame": item.frame.number, "timestamp_ms": item.frame.timestamp_ms,
                         "origin": item.frame.origin, "reason": reason})

    def _skipped(self, frame: Frame, reason: str) -> None:
        self._count(skipped=1)
        self._log.write({"event": "skipped", "frame": frame.number, "timestamp_ms": frame.timestamp_ms,
                         "origin": frame.origin, "reason": reason})

    def _listen(self, previous: Callable[[SourceEvent], None] | None) -> Callable[[SourceEvent], None]:
        """A source listener that logs the event, then tells whoever listened before."""

        def on_event(event: SourceEvent) -> None:
            self._log.write({"event": "source", "kind": event.kind, "message": event.message,
                             "attempt": event.attempt, "delay_s": event.delay_s, "wall_time": time.time()}, flush=True)
            if previous is not None:
                previous(event)

        return on_event

    # ---------------------------------------------------------------- stages (worker threads)
    def _capture(self) -> None:
        """Source -> q1. Owns the source: reads it and releases it."""
        max_frames = self.options.max_frames
        try:
            while not self._stop.is_set():
                if max_frames is not None and self._tally.frames >= max_frames:
                    self.request_stop("max frames")
                    break
                frame = self.source.read()
                if frame is None:
                    if not self._stop.is_set():
                        self.request_stop("end of stream")
                    break
                self._count(frames=1)
                if not frame.ok:
                    self._skipped(frame, frame.error or "corrupt")
                    continue
                item = _InFlight(frame, time.perf_counter())
                if self.source.is_live:
                    for stale in self._q_frames.put_newest(item):
                        self._dropped(stale, "stale: a newer frame arrived before the backbone was free")
                elif not self._q_frames.put(item):
                    self._dropped(item, ABANDONED)
        except Exception as exc:  # a source bug must not leave the other stages waiting
            self._fail("capture", self._tally.frames, exc)
        finally:
            self._q_frames.close()
            self.source.release()

    def _stage(self, name: str, inbox: Channel, outbox: Channel, work: Callable[[_InFlight], None]) -> None:
        """inbox -> work -> outbox until the inbox ends; a failing frame is dropped and stops the run."""
        try:
            while (item := inbox.get()) is not END:
                if self._abandon.is_set() or self._error is not None:
                    self._dropped(item, ABANDONED if self._error is None else AFTER_ERROR)
                    continue
                try:
                    work(item)
                except ImageError as exc:
                    # A frame that cannot be scored (NaN pixels, a bad shape from a custom source): skipped
                    # and counted like a corrupt frame at the source; the run goes on.
                    self._skipped(item.frame, str(exc))
                    item.counted = True
                    continue
                except Exception as exc:
                    self._fail(name, item.frame.number, exc)
                    self._dropped(item, f"error in {name}: {exc}")
                    continue
                if not outbox.put(item):
                    self._dropped(item, ABANDONED)
        finally:
            outbox.close()

    def _embed(self, item: _InFlight) -> None:
        """Preprocess + backbone: frame -> ``[1, 3, H, W]`` -> embeddings ``[1, h*w, D]``."""
        t0 = time.perf_counter()
        source = item.frame.origin or f"frame {item.frame.number}"
        # The tensor is overwritten by the next frame: embed() below consumes it before that.
        tensor, (item.placement,) = self._inputs.prepare([item.frame.image], [source])
        t1 = time.perf_counter()
        item.embeddings = self.detector.embed(tensor)
        t2 = time.perf_counter()
        item.preprocess_ms, item.backbone_ms = (t1 - t0) * 1e3, (t2 - t1) * 1e3

    def _score(self, item: _InFlight) -> None:
        """Index + scoring: embeddings -> :class:`Result` with the map in the frame's coordinates."""
        result = self.detector.score_embeddings(item.embeddings, [item.placement], [item.frame.origin])[0]
        result.timings.preprocess_ms = item.preprocess_ms
        result.timings.backbone_ms = item.backbone_ms
        item.result = result
        item.embeddings = None  # not needed downstream

    # ---------------------------------------------------------------- output (main thread)
    def _output(self, item: _InFlight, saver: AnomalySaver | None, video: VideoSink | None, window: Window | None) -> None:
        t0 = time.perf_counter()
        frame, result = item.frame, item.result
        now = time.monotonic()
        if self._last_output is not None:
            # Exponential moving average of the output rate, for the window's FPS read-out.
            rate = 1.0 / max(now - self._last_output, 1e-6)
            self._fps_ema = rate if self._fps_ema == 0.0 else 0.9 * self._fps_ema + 0.1 * rate
        self._last_output = now
        save = saver is not None and result.anomalous and saver.due()
        saved: list[str] = []
        if save or video is not None or window is not None:
            overlay = render_overlay(frame.image, result, self.detector.normalise_map(result.anomaly_map))
            if save:
                saved = saver.save(frame, overlay)
            if video is not None:
                video.write(overlay)
            if window is not None:
                window.show(overlay, self._fps_ema)
        t1 = time.perf_counter()
        timings = result.timings
        latency = LatencyMs(
            preprocess=timings.preprocess_ms, backbone=timings.backbone_ms, index=timings.index_ms,
            scoring=timings.scoring_ms, output=(t1 - t0) * 1e3, total=(t1 - item.read_at) * 1e3,
        )
        latency.wait = max(0.0, latency.total - sum(dataclasses.astuple(latency)[1:-1]))
        self._latency.add(latency)
        self._count(processed=1, anomalies=int(result.anomalous))
        item.counted = True
        self._log.write(
            {"event": "processed", "frame": frame.number, "timestamp_ms": frame.timestamp_ms, "origin": frame.origin,
             "score": result.score, "normalised": result.normalised, "verdict": result.verdict,
             "latency_ms": dataclasses.asdict(latency.rounded()), "saved": saved or None},
            flush=True,
        )

    # ---------------------------------------------------------------- run
    def run(self) -> WatchSummary:
        """Run until the stream ends or a stop is requested and return the summary.

        Raises :class:`WatchError` (before any frame is read) if an output cannot work.
        """
        options = self.options
        if self._log is not None:
            raise WatchError("a WatchPipeline runs once; make a new one (and open the source again)")
        window = None
        try:
            # The window first: without a GUI it fails before anything is written to disk.
            window = Window() if options.show else None
            video = VideoSink(options.video_out, self.source.nominal_fps) if options.video_out else None
            saver = AnomalySaver(options.save_dir, options.save_every_s) if options.save_dir else None
            self._log = EventLog(options.jsonl)
        except BaseException:
            if window is not None:
                window.close()
            self.source.release()  # run() always releases the source, even when it cannot start
            raise
        previous_listener = self.source.on_event
        self.source.on_event = self._listen(previous_listener)
        self._log.write({"event": "start", "source": self.source.spec, "live": self.source.is_live,
                         "detector": self.detector.description, "threshold": self.detector.threshold,
                         "wall_time": time.time()}, flush=True)
        restore = self._install_signal_handlers() if options.handle_signals else None
        threads = [
            threading.Thread(target=self._capture, name="watch-capture", daemon=True),
            threading.Thread(target=self._stage, name="watch-backbone", daemon=True,
                             args=("backbone", self._q_frames, self._q_embedded, self._embed)),
            threading.Thread(target=self._stage, name="watch-scoring", daemon=True,
                             args=("scoring", self._q_embedded, self._q_scored, self._score)),
        ]
        started = time.perf_counter()
        for thread in threads:
            thread.start()
        try:
            self._drain_outputs(started, saver, video, window)
        finally:
            self._join(threads)
            for channel in (self._q_frames, self._q_embedded, self._q_scored):
                for item in channel.drain():  # left behind only when the run was abandoned
                    self._dropped(item, ABANDONED)
            elapsed = time.perf_counter() - started
            if restore is not None:
                restore()
            self.source.on_event = previous_listener
            wrote_video = self._close_quietly(video, window)
            summary = self._summary(elapsed, saver, wrote_video)
            self._log.write({"event": "summary", **summary.to_dict()})
            self._log.close()
        if not summary.accounted:  # would be a bug in this module: say so loudly
            log.error("watch: frames not accounted for: %s", summary)
        return summary

    def _drain_outputs(self, started: float, saver, video, window) -> None:
        """Main-thread loop: consume q3 until the stages end, watching the clock and the window."""
        duration = self.options.duration_s
        while True:
            item = None
            try:
                item = self._q_scored.get(timeout=0.05)
                if item is END:
                    return
                if item is not EMPTY:
                    if self._abandon.is_set() or self._error is not None:
                        self._dropped(item, ABANDONED if self._error is None else AFTER_ERROR)
                    else:
                        try:
                            self._output(item, saver, video, window)
                        except Exception as exc:
                            self._fail("output", item.frame.number, exc)
                            if not item.counted:
                                self._dropped(item, f"error in output: {exc}")
                if duration is not None and time.perf_counter() - started >= duration:
                    self.request_stop("duration")
                if window is not None and window.wants_stop():
                    self.request_stop("window")
            except KeyboardInterrupt:
                # The second Ctrl-C (the first one only stops the capture): give up on frames in flight.
                if isinstance(item, _InFlight) and not item.counted:
                    self._dropped(item, ABANDONED)
                self.request_stop("SIGINT")
                self._abandon_in_flight()

    def _join(self, threads: list[threading.Thread]) -> None:
        """Wait for the worker threads; Ctrl-C while waiting abandons the frames still in flight."""
        for thread in threads:
            while thread.is_alive():
                try:
                    thread.join(timeout=0.1)
                except KeyboardInterrupt:
                    self.request_stop("SIGINT")
                    self._abandon_in_flight()

    def _close_quietly(self, video: VideoSink | None, window: Window | None) -> bool:
        wrote = False
        if video is not None:
            try:
                wrote = video.close()
            except Exception as exc:  # a failing close must not lose the summary
                log.error("watch: closing %s failed: %s", video.path, exc)
        if window is not None:
            window.close()
        return wrote

    def _install_signal_handlers(self) -> Callable[[], None] | None:
        """SIGTERM and the first SIGINT stop gracefully; a second SIGINT raises KeyboardInterrupt."""
        if threading.current_thread() is not threading.main_thread():
            return None
        previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}

        def on_signal(signum: int, _frame) -> None:
            name = signal.Signals(signum).name
            log.warning("watch: %s received, finishing the frames in flight", name)
            self.request_stop(name)
            if signum == signal.SIGINT:
                signal.signal(signal.SIGINT, signal.default_int_handler)

        for sig in previous:
            signal.signal(sig, on_signal)

        def restore() -> None:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

        return restore

    def _summary(self, elapsed: float, saver: AnomalySaver | None, wrote_video: bool) -> WatchSummary:
        tally, stats, options = self._tally, self.source.stats, self.options
        return WatchSummary(
            source=self.source.spec,
            live=self.source.is_live,
            frames=tally.frames,
            processed=tally.processed,
            dropped=tally.dropped,
            skipped=tally.skipped,
            anomalies=tally.anomalies,
            saved=saver.saved if saver else 0,
            reconnects=stats.reconnects,
            failed_reads=stats.failed_reads,
            elapsed_s=elapsed,
            fps=tally.processed / elapsed if elapsed > 0 else 0.0,
            latency_p50=self._latency.quantile(50),
            latency_p95=self._latency.quantile(95),
            stopped_by=self._stop_reason or "end of stream",
            error=self._error,
            jsonl=str(options.jsonl) if options.jsonl else None,
            video=str(options.video_out) if wrote_video else None,
            save_dir=str(options.save_dir) if options.save_dir else None,
        )


def watch(detector: Detector, source: FrameSource, options: WatchOptions | None = None) -> WatchSummary:
    """Run the staged pipeline over ``source`` (see :class:`WatchPipeline`)."""
    return WatchPipeline(detector, source, options).run()
