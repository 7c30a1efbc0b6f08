"""Where a watch run's results go: the JSONL event log, saved anomalous frames, an annotated video, a window."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from ..errors import WatchError
from ..files import STREAM, output_kind, to_jsonable
from ..overlay import write_image
from .sources import Frame

#: Video containers the writer knows, with the codec each gets (both ship with OpenCV's FFmpeg).
VIDEO_CODECS = {".mp4": "mp4v", ".m4v": "mp4v", ".avi": "MJPG", ".mkv": "mp4v"}
#: Frames per second written to a video when the source does not say.
DEFAULT_VIDEO_FPS = 10.0



class EventLog:
    """The JSONL log, written by several stages (a lock keeps lines whole).

    It is written in place, not to a temporary name: it is an append-only log that must be readable
    (``tail -f``) while a camera runs for days, and every line is a complete record on its own.
    """

    def __init__(self, path: Path | None):
        self.path = path
        self._lock = threading.Lock()
        self._handle = None
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._handle = open(path, "w", encoding="utf-8")

    def write(self, record: dict, flush: bool = False) -> None:
        if self._handle is None:
            return
        # NaN/inf -> null: a strict JSON reader must be able to read every line.
        line = json.dumps(to_jsonable(record), allow_nan=False, default=_json_default) + "\n"
        with self._lock:
            self._handle.write(line)
            if flush:
                self._handle.flush()

    def close(self) -> None:
        with self._lock:
            if self._handle is not None:
                self._handle.flush()
                os.fsync(self._handle.fileno())
                self._handle.close()
                self._handle = None


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


class AnomalySaver:
    """Anomalous frames and their overlays, at most one every ``every_s`` seconds (a line stopping on a
    defect must not fill the disk with copies of the same picture)."""

    def __init__(self, folder: Path, every_s: float):
        if every_s < 0:
            raise WatchError(f"--save-every-s must be >= 0, got {every_s}")
        self.folder = folder
        self.every_s = every_s
        self.saved = 0
        self._last: float | None = None
        folder.mkdir(parents=True, exist_ok=True)

    def due(self) -> bool:
        return self._last is None or time.monotonic() - self._last >= self.every_s

    def save(self, frame: Frame, overlay: np.ndarray) -> list[str]:
        self._last = time.monotonic()
        stem = self.folder / f"frame{frame.number:08d}"
        paths = [stem.with_name(stem.name + "_frame.png"), stem.with_name(stem.name + "_overlay.jpg")]
        write_image(paths[0], frame.image)  # the frame as captured, lossless
        write_image(paths[1], overlay)
        self.saved += 1
        return [str(p) for p in paths]


class VideoSink:
    """The annotated video; written under a temporary name and renamed when closed (a video without its
    trailer is unreadable, so a crash must not leave one under the real name)."""

    def __init__(self, path: Path, fps: float | None):
        codec = VIDEO_CODECS.get(path.suffix.lower())
        if codec is None:
            raise WatchError(f"{path}: unsupported video container {path.suffix!r}; use one of {', '.join(VIDEO_CODECS)}")
        target, kind = output_kind(path)  # OutputError for a folder, a disk, a socket, a symlink loop
        if kind == STREAM:
            # The container is finished by seeking back to its header: a pipe or device cannot take that, and
            # renaming the finished file over it would replace the device node.
            raise WatchError(f"{path}: a video needs a regular file, not a device or pipe")
        target.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.target = target  # a symlink's target: the link itself stays
        self.tmp = target.with_name(f".{target.stem}.partial{target.suffix}")
        self.fps = float(fps) if fps else DEFAULT_VIDEO_FPS
        self.fourcc = cv2.VideoWriter_fourcc(*codec)
        self.size: tuple[int, int] | None = None
        self.frames = 0
        self._writer: cv2.VideoWriter | None = None

    def write(self, image: np.ndarray) -> None:
        if self._writer is None:
            self.size = (image.shape[1], image.shape[0])
            self._writer = cv2.VideoWriter(str(self.tmp), self.fourcc, self.fps, self.size)
            if not self._writer.isOpened():
                self._writer = None
                raise WatchError(f"{self.path}: OpenCV cannot write this video (codec {self.fourcc:#x} at {self.size})")
        if (image.shape[1], image.shape[0]) != self.size:
            image = cv2.resize(image, self.size, interpolation=cv2.INTER_AREA)  # a video has one frame size
        self._writer.write(image)
        self.frames += 1

    def close(self) -> bool:
        """Finish the file; True if a video was written."""
        if self._writer is None:
            return False
        self._writer.release()
        self._writer = None
        os.replace(self.tmp, self.target)
        return True


class Window:
    """``--show``: the overlay with the frame rate; ``q`` or Esc (or closing the window) stops the run."""

    NAME = "pcedge watch"

    def __init__(self) -> None:
        try:
            cv2.namedWindow(self.NAME, cv2.WINDOW_NORMAL)
        except cv2.error as exc:
            raise WatchError(
                "--show needs OpenCV with GUI support; this build has none (opencv-python-headless?). "
                "Install opencv-python, or run headless with --jsonl / --video-out"
            ) from exc
        self._opened = True

    def show(self, overlay: np.ndarray, fps: float) -> None:
        text = f"{fps:5.1f} fps"
        scale = max(0.4, overlay.shape[1] / 900)
        (tw, th), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)
        x, y = overlay.shape[1] - tw - 8, th + 6
        cv2.rectangle(overlay, (x - 6, 0), (overlay.shape[1], th + base + 12), (0, 0, 0), -1)
        cv2.putText(overlay, text, (x, y), cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), 1, cv2.LINE_AA)
        cv2.imshow(self.NAME, overlay)

    def wants_stop(self) -> bool:
        """Pump window events; True after ``q``/Esc or once the window was closed."""
        key = cv2.waitKey(1) & 0xFF
        closed = cv2.getWindowProperty(self.NAME, cv2.WND_PROP_VISIBLE) < 1
        return key in (ord("q"), 27) or closed

    def close(self) -> None:
        if self._opened:
            cv2.destroyWindow(self.NAME)
            cv2.waitKey(1)
            self._opened = False

