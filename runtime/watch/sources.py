"""Frame sources for ``pcedge watch``: cameras, video files, network streams, GStreamer pipelines, folders.

    source = open_source("0", fps=None, loop=False)            # V4L2 camera 0
    source = open_source("line3.mp4", fps=None, loop=True)      # a recording, replayed forever
    source = open_source("rtsp://cam/stream", fps=None, loop=False)
    source = open_source("nvarguscamerasrc ! ... ! appsink", fps=None, loop=False)   # Jetson CSI
    source = open_source("frames/", fps=10, loop=False)         # images in name order, 10 per second
    while (frame := source.read()) is not None:
        if frame.ok: ...                                        # else frame.error says why it was skipped
    source.release()

Every frame a source delivers gets the next sequence number, whether it is usable or not: a corrupt frame
(empty, wrong shape, undecodable file) comes back with ``image=None`` and ``error`` set, so a consumer can
account for every frame; ``read()`` returns None only at the end of the stream (or once stopped).

Faults. Live sources (cameras, URLs, GStreamer) reconnect on their own: after ``failures_before_reconnect``
failed reads in a row the capture is released and reopened with exponential backoff (``initial_s`` doubling
up to ``max_s``), logged at WARNING, and the number of attempts is unlimited by default -- a camera on a
production line that loses its cable or a stream that stalls must come back without a person restarting
the process (bound it with :class:`ReconnectPolicy` ``max_attempts`` if a supervisor should restart it
instead). The *first* open is not retried: a device or URL that never worked is a configuration error and
is reported at once. Files and folders are not reconnected: a failed read of a file is its end (or, with
``loop``, the start of the next pass). Stalls are detected by the capture's read timeout where the
backend has one (FFmpeg for URLs: :data:`STREAM_READ_TIMEOUT_MS`; V4L2 has its own select() timeout).
"""

from __future__ import annotations

import logging
import math
import os
import re
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol

import cv2
import numpy as np

from ..preprocess import IMAGE_SUFFIXES, ImageError, check_frame, list_images, read_image

log = logging.getLogger("pcedge.watch")

#: FFmpeg open / read timeouts for network streams: a stalled stream makes read() fail after this long,
#: which starts a reconnect, instead of blocking the capture thread forever.
STREAM_OPEN_TIMEOUT_MS = 10_000
STREAM_READ_TIMEOUT_MS = 5_000

_URL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")


class SourceError(RuntimeError):
    """A source that cannot be opened; the message names it and says what is wrong."""


@dataclass(frozen=True)
class Frame:
    """One frame as delivered by a source.

    ``image`` is an OpenCV-convention array (BGR ``[H, W, 3]``, gray ``[H, W]``, ...), or None when the
    frame was corrupt -- then ``error`` says why and the frame is to be skipped (and counted).
    """

    number: int  # sequence number since the source was opened, every delivered frame counted, from 0
    timestamp_ms: float  # files: position in the file (CAP_PROP_POS_MSEC); live: wall clock (Unix epoch ms)
    image: np.ndarray | None = field(repr=False)
    origin: str | None = None  # the file a folder frame came from
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass
class SourceStats:
    """What happened at the source; read by the pipeline's summary."""

    delivered: int = 0  # frames handed out, usable or not
    corrupt: int = 0  # of those, frames with ``error`` set
    failed_reads: int = 0  # live reads that returned nothing (no frame number used)
    reconnects: int = 0  # successful reopenings after a failure
    reconnect_attempts: int = 0  # every reopening tried
    passes: int = 1  # times a file or folder was started (``loop``)


@dataclass(frozen=True)
class SourceEvent:
    """A fault or recovery at the source, for the event log."""

    kind: str  # "read_failed" | "reconnecting" | "reconnected" | "reconnect_failed" | "gave_up" | "looped"
    message: str
    attempt: int = 0
    delay_s: float = 0.0


@dataclass(frozen=True)
class ReconnectPolicy:
    """Exponential backoff for live sources: ``initial_s, 2*initial_s, ...`` capped at ``max_s``."""

    initial_s: float = 0.5
    max_s: float = 30.0
    max_attempts: int | None = None  # since the last good frame; None: keep trying while the process runs
    failures_before_reconnect: int = 2  # one failed read can be a hiccup; two in a row is a lost stream

    def delay(self, attempt: int) -> float:
        """Seconds to wait before reconnect ``attempt`` (1-based)."""
        return min(self.max_s, self.initial_s * (2.0 ** (attempt - 1)))


EventListener = Callable[[SourceEvent], None]


class FrameSource(Protocol):
    spec: str
    is_live: bool
    nominal_fps: float | None  # frames per second the source claims (for a video writer), if known
    stats: SourceStats
    on_event: EventListener | None  # told about faults and recoveries (called from the reading thread)

    def read(self) -> Frame | None:
        """The next frame, or None at the end of the stream (or after :meth:`stop`)."""

    def stop(self) -> None:
        """Ask a blocked :meth:`read` (backoff, pacing) to return None soon; safe from any thread."""

    def release(self) -> None:
        """Free the device or file; call from the thread that reads."""


class _Pacer:
    """Holds a file or folder to ``fps`` frames per second (a simulated camera); no-op without fps."""

    def __init__(self, fps: float | None, stop: threading.Event):
        if fps is not None and not (math.isfinite(fps) and fps > 0):
            raise ValueError(f"fps must be a positive finite number, got {fps}")
        self.period = 1.0 / fps if fps else 0.0
        self.stop = stop
        self.next_t: float | None = None

    def wait(self) -> None:
        if not self.period:
            return
        now = time.monotonic()
        if self.next_t is None:
            self.next_t = now
        elif self.next_t > now:
            self.stop.wait(self.next_t - now)
        # Schedule from the ideal time, not from now, so the rate does not drift; but never try to
        # catch up after a long stall with a burst.
        self.next_t = max(self.next_t + self.period, time.monotonic() - self.period)


def _frame_problem(image: np.ndarray | None, expected_shape: tuple[int, ...] | None) -> str | None:
    """Why a captured frame cannot be used, or None if it can."""
    if image is None:
        return "empty frame (None)"
    try:
        check_frame(image, "frame")
    except ImageError as exc:
        return str(exc)
    if expected_shape is not None and image.shape != expected_shape:
        return f"frame shape {list(image.shape)} differs from the stream's {list(expected_shape)} (garbled frame)"
    return None


class CaptureSource:
    """A ``cv2.VideoCapture``: camera, video file, URL or GStreamer pipeline.

    ``opener`` makes a fresh capture (it is called again to reconnect). ``live`` sources get wall-clock
    timestamps, reconnection and no pacing; files get CAP_PROP_POS_MSEC timestamps, ``fps`` pacing and
    ``loop``.
    """

    def __init__(
        self,
        spec: str,
        opener: Callable[[], cv2.VideoCapture],
        live: bool,
        fps: float | None = None,
        loop: bool = False,
        reconnect: ReconnectPolicy | None = None,
        on_event: EventListener | None = None,
    ):
        self.spec = spec
        self.is_live = live
        self.loop = loop
        self.reconnect_policy = reconnect or ReconnectPolicy()
        self.on_event = on_event
        self.stats = SourceStats()
        self._opener = opener
        self._stopped = threading.Event()
        self._pacer = _Pacer(None if live else fps, self._stopped)
        self._expected_shape: tuple[int, ...] | None = None
        self._number = 0
        self._delivered_at_pass_start = 0
        self._attempts_since_frame = 0
        self._cap = opener()
        if self._cap is None or not self._cap.isOpened():
            self._release_capture()
            raise SourceError(f"{spec}: cannot open ({_open_hint(spec)})")
        reported = float(self._cap.get(cv2.CAP_PROP_FPS) or 0.0)
        self.nominal_fps = fps if fps else (reported if 0.0 < reported < 1000.0 else None)

    # ---------------------------------------------------------------- reading
    def read(self) -> Frame | None:
        failures = 0
        while not self._stopped.is_set():
            if self._cap is None:
                return None
            self._pacer.wait()
            ok, image = self._cap.read()
            if ok:
                return self._deliver(image)
            if not self.is_live:  # the end of a file, not a fault
                if self.loop and self._restart_file():
                    continue
                return None
            self.stats.failed_reads += 1
            failures += 1
            self._emit("read_failed", f"{self.spec}: read failed ({failures} in a row)")
            if failures >= self.reconnect_policy.failures_before_reconnect:
                if not self._reconnect():
                    return None
                failures = 0
        return None

    def _deliver(self, image: np.ndarray | None) -> Frame:
        number = self._number
        self._number += 1
        self.stats.delivered += 1
        timestamp = time.time() * 1e3 if self.is_live else float(self._cap.get(cv2.CAP_PROP_POS_MSEC))
        problem = _frame_problem(image, self._expected_shape)
        if problem is not None:
            self.stats.corrupt += 1
            return Frame(number, timestamp, None, error=problem)
        self._attempts_since_frame = 0  # the source works again: the next fault starts the backoff afresh
        if self._expected_shape is None:
            self._expected_shape = image.shape
        return Frame(number, timestamp, image)

    def _restart_file(self) -> bool:
        """Next pass of a looped file: rewind, or reopen if the container cannot seek."""
        if self.stats.delivered == self._delivered_at_pass_start:
            return False  # a pass that yielded nothing would loop forever
        self._delivered_at_pass_start = self.stats.delivered
        self.stats.passes += 1
        self._emit("looped", f"{self.spec}: end of file, pass {self.stats.passes}")
        if self._cap.set(cv2.CAP_PROP_POS_FRAMES, 0):
            return True
        self._release_capture()
        self._cap = self._opener()
        return self._cap is not None and self._cap.isOpened()

    def _reconnect(self) -> bool:
        """Release and reopen with exponential backoff; False if stopped or out of attempts.

        Attempts are counted since the last good frame, not since the last successful open: a device that
        opens but delivers nothing (a stream that ended, a camera that hangs) keeps backing off.
        """
        policy = self.reconnect_policy
        self._release_capture()
        while not self._stopped.is_set():
            self._attempts_since_frame += 1
            attempt = self._attempts_since_frame
            if policy.max_attempts is not None and attempt > policy.max_attempts:
                self._emit("gave_up", f"{self.spec}: giving up after {policy.max_attempts} reconnect attempts "
                           "without a frame", attempt - 1)
                return False
            delay = policy.delay(attempt)
            self._emit("reconnecting", f"{self.spec}: reconnecting in {delay:.1f} s (attempt {attempt})", attempt, delay)
            if self._stopped.wait(delay):
                return False
            self.stats.reconnect_attempts += 1
            cap = self._opener()
            if cap is not None and cap.isOpened():
                self._cap = cap
                # The device may come back in another mode; the next good frame sets the shape.
                self._expected_shape = None
                self.stats.reconnects += 1
                self._emit("reconnected", f"{self.spec}: reopened (attempt {attempt} since the last frame)", attempt)
                return True
            if cap is not None:
                cap.release()
            self._emit("reconnect_failed", f"{self.spec}: reconnect attempt {attempt} failed", attempt)
        return False

    def _emit(self, kind: str, message: str, attempt: int = 0, delay: float = 0.0) -> None:
        level = logging.INFO if kind in ("looped", "reconnected") else logging.WARNING
        log.log(level, "%s", message)
        if self.on_event is not None:
            self.on_event(SourceEvent(kind, message, attempt, delay))

    # ---------------------------------------------------------------- lifetime
    def stop(self) -> None:
        self._stopped.set()

    def _release_capture(self) -> None:
        if self._cap is not None:
            self._cap.release()
            self._cap = None

    def release(self) -> None:
        self._stopped.set()
        self._release_capture()


class FolderSource:
    """The images of a folder in name order, as a camera would deliver them (``fps`` paces them).

    The folder is listed once when opened. A file that cannot be decoded is delivered as a corrupt
    frame (``error`` names the file) so that it is skipped and counted, not fatal.
    """

    is_live = False

    def __init__(self, folder: str | os.PathLike[str], fps: float | None = None, loop: bool = False,
                 on_event: EventListener | None = None):
        self.spec = str(folder)
        self.files = list_images(folder)
        if not self.files:
            raise SourceError(f"{folder}: no images (looked for {', '.join(IMAGE_SUFFIXES)})")
        self.loop = loop
        self.nominal_fps = fps
        self.on_event = on_event
        self.stats = SourceStats()
        self._stopped = threading.Event()
        self._pacer = _Pacer(fps, self._stopped)
        self._position = 0
        self._number = 0
        self._t0 = time.time() * 1e3

    def read(self) -> Frame | None:
        if self._stopped.is_set():
            return None
        if self._position == len(self.files):
            if not self.loop:
                return None
            self._position = 0
            self.stats.passes += 1
            message = f"{self.spec}: end of folder, pass {self.stats.passes}"
            log.info("%s", message)
            if self.on_event is not None:
                self.on_event(SourceEvent("looped", message))
        self._pacer.wait()
        if self._stopped.is_set():
            return None
        path = self.files[self._position]
        self._position += 1
        number = self._number
        self._number += 1
        self.stats.delivered += 1
        # With fps the folder has a timeline of its own (frame n at n/fps); without, the wall clock.
        timestamp = number * 1e3 * self._pacer.period if self._pacer.period else time.time() * 1e3
        try:
            image = read_image(path)
        except ImageError as exc:
            self.stats.corrupt += 1
            return Frame(number, timestamp, None, origin=str(path), error=str(exc))
        return Frame(number, timestamp, image, origin=str(path))

    def stop(self) -> None:
        self._stopped.set()

    def release(self) -> None:
        self._stopped.set()


# -------------------------------------------------------------------- opening a spec


def gstreamer_available() -> bool:
    """Whether this OpenCV build can run GStreamer pipelines (pip wheels cannot; JetPack's OpenCV can)."""
    for line in cv2.getBuildInformation().splitlines():
        if line.strip().startswith("GStreamer:"):
            return "YES" in line
    return False


def _open_hint(spec: str) -> str:
    if spec.isdigit():
        return f"no camera at index {spec}, or it is busy; check `ls /dev/video*` and permissions"
    if "!" in spec:
        return "the GStreamer pipeline did not start; test it with gst-launch-1.0 and end it with appsink"
    if _URL.match(spec):
        return "the stream did not answer; check the URL, credentials and network"
    return "not a video OpenCV can decode"


def _camera_opener(index: int, fps: float | None) -> Callable[[], cv2.VideoCapture]:
    api = cv2.CAP_V4L2 if sys.platform.startswith("linux") else cv2.CAP_ANY

    def open_camera() -> cv2.VideoCapture:
        cap = cv2.VideoCapture(index, api)
        if fps and cap.isOpened():
            cap.set(cv2.CAP_PROP_FPS, float(fps))  # a request: the driver picks the nearest mode it has
        # One buffered frame: the camera's own queue would otherwise hand out stale frames.
        cap.set(cv2.CAP_PROP_BUFFERSIZE, 1)
        return cap

    return open_camera


def _stream_opener(url: str) -> Callable[[], cv2.VideoCapture]:
    params = [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, STREAM_OPEN_TIMEOUT_MS, cv2.CAP_PROP_READ_TIMEOUT_MSEC, STREAM_READ_TIMEOUT_MS]
    return lambda: cv2.VideoCapture(url, cv2.CAP_FFMPEG, params)


def _file_opener(path: str) -> Callable[[], cv2.VideoCapture]:
    return lambda: cv2.VideoCapture(path)


#: Largest camera index accepted: Linux numbers V4L2 devices /dev/video0../dev/video255 (VIDEO_NUM_DEVICES).
MAX_CAMERA_INDEX = 255


def check_source_spec(spec: str) -> None:
    """Refuse a source that cannot name anything before any work (empty, camera index out of range)."""
    spec = str(spec).strip()
    if not spec:
        raise SourceError("empty source: give a camera index, video file, folder, URL or GStreamer pipeline")
    if spec.isdigit() and int(spec) > MAX_CAMERA_INDEX:
        raise SourceError(f"camera index {spec} is out of range: cameras are numbered 0 to {MAX_CAMERA_INDEX} "
                          "(/dev/video0 ... /dev/video255)")


def open_source(
    spec: str,
    fps: float | None = None,
    loop: bool = False,
    *,
    reconnect: ReconnectPolicy | None = None,
    on_event: EventListener | None = None,
) -> FrameSource:
    """Open ``spec`` as the right kind of source.

    - digits (``"0"``): a V4L2 camera index; ``fps`` is requested from the driver;
    - contains ``!``: a GStreamer pipeline ending in ``appsink`` (Jetson CSI: ``nvarguscamerasrc ! ...``);
    - ``scheme://...``: a network stream (RTSP, HTTP, ...) through FFmpeg with open/read timeouts;
    - a directory: its images in name order (:class:`FolderSource`), paced at ``fps`` if given;
    - a file: a video, paced at ``fps`` if given (else as fast as the pipeline takes it).

    ``loop`` replays files and folders. Raises :class:`SourceError` naming the spec if it cannot be opened.
    """
    spec = str(spec).strip()
    check_source_spec(spec)
    if spec.isdigit():
        return CaptureSource(spec, _camera_opener(int(spec), fps), live=True, fps=fps, reconnect=reconnect, on_event=on_event)
    if "!" in spec:
        if not gstreamer_available():
            raise SourceError(
                f"{spec!r}: looks like a GStreamer pipeline, but this OpenCV build has no GStreamer support "
                "(pip's opencv-python wheels do not; on Jetson use JetPack's OpenCV)"
            )
        return CaptureSource(spec, lambda: cv2.VideoCapture(spec, cv2.CAP_GSTREAMER), live=True, fps=fps,
                             reconnect=reconnect, on_event=on_event)
    if _URL.match(spec):
        return CaptureSource(spec, _stream_opener(spec), live=True, fps=fps, reconnect=reconnect, on_event=on_event)
    path = Path(spec)
    if path.is_dir():
        return FolderSource(path, fps=fps, loop=loop, on_event=on_event)
    if path.is_file():
        if path.suffix.lower() in IMAGE_SUFFIXES:
            raise SourceError(f"{spec}: a single image, not a video; give its folder, or use `pcedge predict`")
        return CaptureSource(spec, _file_opener(spec), live=False, fps=fps, loop=loop, on_event=on_event)
    raise SourceError(f"{spec}: no such file or folder, and not a camera index, URL or GStreamer pipeline")
