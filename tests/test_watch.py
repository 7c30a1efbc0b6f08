"""``pcedge watch``: sources, the staged pipeline and its event log, on real fixture images, real OpenCV
videos and captures, and a real ONNX Runtime detector from the session's fixture bundle."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from pcedge.cli import main as pcedge_main
from pcedge.runtime.watch.sources import CaptureSource, FolderSource, ReconnectPolicy, SourceError, open_source
from pcedge.runtime.detector import Detector
from pcedge.runtime.watch.channel import END, Channel
from pcedge.runtime.watch.pipeline import AFTER_ERROR, WatchOptions, WatchPipeline
from pcedge.runtime.watch.summary import LatencyMs, LatencyReservoir, WatchSummary

BSD_TEST = Path(__file__).resolve().parents[1] / "fixtures" / "ball_screw_drive" / "test"
VIDEO_FPS = 5.0


# ------------------------------------------------------------------------------------------------ helpers


@pytest.fixture(scope="module")
def detector(fixture_bundle):
    with Detector.open(fixture_bundle, backend="ort-cpu", index="auto", threads=2) as opened:
        yield opened


@pytest.fixture(scope="module")
def labelled_images() -> list[tuple[Path, str]]:
    """Good and pitting test images, interleaved: good, pitting, good, pitting, ..."""
    good = sorted((BSD_TEST / "good").iterdir())
    pitting = sorted((BSD_TEST / "pitting").iterdir())
    return [pair for g, p in zip(good, pitting) for pair in ((g, "good"), (p, "pitting"))]


@pytest.fixture(scope="module")
def labelled_video(tmp_path_factory, labelled_images) -> tuple[Path, list[str]]:
    """A real MJPG/AVI file written with OpenCV from the fixture images; labels by frame number."""
    path = tmp_path_factory.mktemp("video") / "line.avi"
    first = cv2.imread(str(labelled_images[0][0]))
    size = (first.shape[1], first.shape[0])
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), VIDEO_FPS, size)
    assert writer.isOpened()
    for image_path, _ in labelled_images:
        writer.write(cv2.resize(cv2.imread(str(image_path)), size))
    writer.release()
    return path, [label for _, label in labelled_images]


def read_log(path: Path) -> dict[str, list[dict]]:
    by_event: dict[str, list[dict]] = {}
    with open(path) as handle:
        for line in handle:
            record = json.loads(line)
            by_event.setdefault(record["event"], []).append(record)
    return by_event


def check_accounting(log: dict[str, list[dict]], summary: WatchSummary) -> None:
    """Every frame number appears exactly once as processed, dropped or skipped; the figures agree."""
    outcomes = {name: log.get(name, []) for name in ("processed", "dropped", "skipped")}
    numbers = sorted(r["frame"] for records in outcomes.values() for r in records)
    assert numbers == list(range(summary.frames))
    assert (len(outcomes["processed"]), len(outcomes["dropped"]), len(outcomes["skipped"])) == (
        summary.processed, summary.dropped, summary.skipped)
    assert summary.accounted
    assert summary.anomalies == sum(r["verdict"] == "anomalous" for r in outcomes["processed"])
    assert len(log["summary"]) == 1
    assert {k: v for k, v in log["summary"][0].items() if k != "event"} == json.loads(json.dumps(summary.to_dict()))
    assert len(log["start"]) == 1
    if summary.processed:
        assert summary.fps == pytest.approx(summary.processed / summary.elapsed_s)
        assert 0 < summary.latency_p50.total <= summary.latency_p95.total
        assert summary.latency_p50.backbone > 0
        for record in outcomes["processed"]:
            latency = record["latency_ms"]
            parts = sum(latency[k] for k in ("wait", "preprocess", "backbone", "index", "scoring", "output"))
            assert parts == pytest.approx(latency["total"], abs=0.01)
            assert 0.0 <= record["normalised"] <= 1.0
            assert record["verdict"] == ("anomalous" if record["score"] > log["start"][0]["threshold"] else "good")


def mean_scores(processed: list[dict], label_of) -> dict[str, float]:
    scores: dict[str, list[float]] = {}
    for record in processed:
        scores.setdefault(label_of(record), []).append(record["score"])
    return {label: float(np.mean(values)) for label, values in scores.items()}


# ------------------------------------------------------------------------------------------------ pipeline


def test_video_file_every_frame_processed_with_all_outputs(detector, labelled_video, tmp_path):
    video, labels = labelled_video
    source = open_source(str(video), fps=None, loop=False)
    assert not source.is_live and source.nominal_fps == pytest.approx(VIDEO_FPS)
    options = WatchOptions(jsonl=tmp_path / "events.jsonl", save_dir=tmp_path / "saved", save_every_s=0.0,
                           video_out=tmp_path / "annotated.avi")
    summary = WatchPipeline(detector, source, options).run()

    assert (summary.frames, summary.processed, summary.dropped, summary.skipped) == (len(labels), len(labels), 0, 0)
    assert summary.stopped_by == "end of stream" and summary.error is None
    log = read_log(options.jsonl)
    check_accounting(log, summary)
    processed = log["processed"]
    # The source timestamps of a file are its positions: frame n at n / fps.
    assert [r["timestamp_ms"] for r in processed] == pytest.approx([n * 1e3 / VIDEO_FPS for n in range(len(labels))], abs=1.0)
    means = mean_scores(processed, lambda r: labels[r["frame"]])
    assert means["pitting"] > means["good"]
    # save_every_s=0: every anomalous frame saved, with its overlay, and named in its log line.
    saved = sorted(p.name for p in options.save_dir.iterdir())
    assert summary.saved == summary.anomalies > 0 and len(saved) == 2 * summary.anomalies
    for record in processed:
        if record["verdict"] == "anomalous":
            assert all(Path(p).is_file() for p in record["saved"])
            assert cv2.imread(record["saved"][0]).shape == cv2.imread(str(BSD_TEST / "good" / os.listdir(BSD_TEST / "good")[0])).shape
        else:
            assert record["saved"] is None
    # The annotated video: every processed frame, readable, original size; no temporary left behind.
    assert summary.video == str(options.video_out)
    check = cv2.VideoCapture(str(options.video_out))
    assert int(check.get(cv2.CAP_PROP_FRAME_COUNT)) == summary.processed
    ok, frame = check.read()
    check.release()
    assert ok and frame.shape[:2] == cv2.imread(str(BSD_TEST / "good" / os.listdir(BSD_TEST / "good")[0])).shape[:2]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["annotated.avi", "events.jsonl", "saved"]


def test_folder_source_skips_corrupt_files_and_loops(detector, labelled_images, tmp_path):
    folder = tmp_path / "frames"
    folder.mkdir()
    labels = {}
    for i, (path, label) in enumerate(labelled_images[:8]):
        name = f"{i:03d}_{label}{path.suffix}"
        (folder / name).write_bytes(path.read_bytes())
        labels[name] = label
    (folder / "003a_corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)  # a broken PNG
    (folder / "005a_empty.jpg").write_bytes(b"")
    files_per_pass = 10
    source = open_source(str(folder), fps=None, loop=True)
    assert isinstance(source, FolderSource) and len(source.files) == files_per_pass
    options = WatchOptions(jsonl=tmp_path / "events.jsonl", max_frames=files_per_pass + 4)
    summary = WatchPipeline(detector, source, options).run()

    assert summary.stopped_by == "max frames" and summary.frames == files_per_pass + 4
    assert (summary.processed, summary.skipped, summary.dropped) == (12, 2, 0)
    assert source.stats.passes == 2
    log = read_log(options.jsonl)
    check_accounting(log, summary)
    skipped = {Path(r["origin"]).name: r["reason"] for r in log["skipped"]}
    assert set(skipped) == {"003a_corrupt.png", "005a_empty.jpg"}
    assert "003a_corrupt.png" in skipped["003a_corrupt.png"] and "empty" in skipped["005a_empty.jpg"]
    assert [r["kind"] for r in log["source"]] == ["looped"]
    # Name order, then the second pass from the start.
    origins = [Path(r["origin"]).name for r in log["processed"]]
    assert origins[:8] == sorted(labels) and origins[8:] == sorted(labels)[:4]
    means = mean_scores(log["processed"], lambda r: labels[Path(r["origin"]).name])
    assert means["pitting"] > means["good"]


class FaultPlan:
    """A camera that fails mid-stream and comes back, built on real OpenCV captures of a real video.

    After ``fail_after`` frames the capture goes dead (every read fails, as a pulled cable does); the first
    ``failed_reopens`` reopen attempts find no device (a real, unopened ``cv2.VideoCapture``); the next one
    resumes the video where it broke off. Frame ``garble_at`` arrives truncated (half its rows). Once the
    video is used up, the device is gone for good. Reads are paced at ``fps``.
    """

    def __init__(self, video: Path, fail_after: int, failed_reopens: int, garble_at: int, fps: float):
        self.video, self.fps = video, fps
        self.fail_after, self.failed_reopens, self.garble_at = fail_after, failed_reopens, garble_at
        probe = cv2.VideoCapture(str(video))
        self.total = int(probe.get(cv2.CAP_PROP_FRAME_COUNT))
        probe.release()
        self.position = 0
        self.opens = 0

    def open(self):
        self.opens += 1
        if self.opens > 1 and (self.failed_reopens > 0 or self.position >= self.total):
            self.failed_reopens -= 1
            return cv2.VideoCapture()  # no device
        capture = cv2.VideoCapture(str(self.video))
        capture.set(cv2.CAP_PROP_POS_FRAMES, self.position)
        return FlakyCapture(capture, self)


class FlakyCapture:
    def __init__(self, capture: cv2.VideoCapture, plan: FaultPlan):
        self.capture, self.plan, self.dead = capture, plan, False

    def isOpened(self) -> bool:
        return self.capture.isOpened()

    def read(self):
        time.sleep(1.0 / self.plan.fps)  # a camera delivers at its frame rate
        if self.dead:
            return False, None
        ok, image = self.capture.read()
        if not ok:
            return False, None
        self.plan.position += 1
        if self.plan.position == self.plan.fail_after:
            self.dead = True
        if self.plan.position == self.plan.garble_at:
            return True, image[: image.shape[0] // 2]
        return True, image

    def get(self, prop: int) -> float:
        return self.capture.get(prop)

    def set(self, prop: int, value: float) -> bool:
        return self.capture.set(prop, value)

    def release(self) -> None:
        self.capture.release()


def test_live_source_reconnects_skips_garbled_frames_and_drops_stale_ones(detector, labelled_video, tmp_path):
    video, labels = labelled_video
    # 1000 frames/s: far faster than the model on any CPU (about 70-90 frames/s here), so stale frames must
    # be dropped (newest wins).
    plan = FaultPlan(video, fail_after=5, failed_reopens=1, garble_at=9, fps=1000.0)
    events = []
    source = CaptureSource("flaky-camera", plan.open, live=True, on_event=events.append,
                           reconnect=ReconnectPolicy(initial_s=0.01, max_s=0.02, max_attempts=2))
    options = WatchOptions(jsonl=tmp_path / "events.jsonl")
    summary = WatchPipeline(detector, source, options).run()

    # All video frames were delivered once (the break lost none: the camera resumed where it stopped).
    assert summary.frames == len(labels) and summary.skipped == 1
    assert summary.processed >= 2 and summary.dropped > 0 and summary.processed + summary.dropped == len(labels) - 1
    assert summary.reconnects == 1 and summary.stopped_by == "end of stream" and summary.error is None
    log = read_log(options.jsonl)
    check_accounting(log, summary)
    assert "differs from the stream's" in log["skipped"][0]["reason"] and log["skipped"][0]["frame"] == 8
    assert all(r["reason"].startswith("stale") for r in log.get("dropped", []))
    kinds = [r["kind"] for r in log["source"]]
    # The break: failed reads, one failed reopen, then back. The end: the device never returns.
    assert kinds[:5] == ["read_failed", "read_failed", "reconnecting", "reconnect_failed", "reconnecting"]
    assert kinds[5] == "reconnected" and kinds[-1] == "gave_up"
    assert [e.kind for e in events] == kinds  # the caller's own listener still heard everything
    assert source.on_event == events.append
    # Live frames carry wall-clock timestamps, in order.
    stamps = [r["timestamp_ms"] for r in sorted(log["processed"], key=lambda r: r["frame"])]
    assert stamps == sorted(stamps) and abs(stamps[0] / 1e3 - log["start"][0]["wall_time"]) < 60


class BreakingCapture(FlakyCapture):
    """A real capture whose backend raises (as ``cv2.error``) on read ``raise_at``."""

    def __init__(self, capture: cv2.VideoCapture, raise_at: int):
        super().__init__(capture, FaultPlan.__new__(FaultPlan))
        self.reads, self.raise_at = 0, raise_at

    def read(self):
        self.reads += 1
        if self.reads == self.raise_at:
            raise cv2.error("backend exploded")
        return self.capture.read()


def test_a_failing_stage_stops_the_run_with_the_error_and_every_frame_accounted(detector, labelled_video, tmp_path):
    video, _ = labelled_video
    source = CaptureSource("breaking-file", lambda: BreakingCapture(cv2.VideoCapture(str(video)), raise_at=4), live=False)
    options = WatchOptions(jsonl=tmp_path / "events.jsonl")
    summary = WatchPipeline(detector, source, options).run()
    assert summary.stopped_by == "error" and "capture" in summary.error and "backend exploded" in summary.error
    assert summary.frames == 3
    log = read_log(options.jsonl)
    check_accounting(log, summary)
    assert all(r["reason"] == AFTER_ERROR for r in log.get("dropped", []))


def test_sigterm_stops_gracefully_with_everything_written(detector, labelled_images, tmp_path):
    folder = tmp_path / "frames"
    folder.mkdir()
    for i, (path, _) in enumerate(labelled_images[:4]):
        (folder / f"{i:03d}{path.suffix}").write_bytes(path.read_bytes())
    source = open_source(str(folder), fps=8.0, loop=True)  # an endless, paced simulated camera
    options = WatchOptions(jsonl=tmp_path / "events.jsonl", video_out=tmp_path / "out.avi")
    timer = threading.Timer(1.5, os.kill, (os.getpid(), signal.SIGTERM))
    previous = signal.getsignal(signal.SIGTERM)
    timer.start()
    try:
        summary = WatchPipeline(detector, source, options).run()
    finally:
        timer.cancel()
    assert signal.getsignal(signal.SIGTERM) is previous  # the pipeline's handler is gone again
    assert summary.stopped_by == "SIGTERM" and summary.error is None
    assert summary.processed == summary.frames > 0 and summary.dropped == 0  # frames in flight finished
    log = read_log(options.jsonl)
    check_accounting(log, summary)
    stamps = [r["timestamp_ms"] for r in log["processed"]]
    assert stamps == pytest.approx([n * 1e3 / 8.0 for n in range(summary.frames)])  # the folder's own timeline
    check = cv2.VideoCapture(str(options.video_out))
    assert int(check.get(cv2.CAP_PROP_FRAME_COUNT)) == summary.processed
    check.release()


def test_duration_limit_and_cli(fixture_bundle, labelled_video, tmp_path, capsys):
    video, _ = labelled_video
    jsonl = tmp_path / "cli.jsonl"
    code = pcedge_main(["watch", str(fixture_bundle), str(video), "--backend", "ort-cpu", "--threads", "2",
                        "--loop", "--fps", "20", "--duration", "1.5", "--jsonl", str(jsonl)])
    out = capsys.readouterr().out
    assert code == 0
    assert f"wrote {jsonl}" in out and "stopped by duration" in out and "all accounted for" in out
    log = read_log(jsonl)
    summary = log["summary"][0]
    assert summary["stopped_by"] == "duration" and summary["accounted"]
    assert summary["processed"] == len(log["processed"]) > 0 and summary["elapsed_s"] >= 1.5


def test_bad_sources_are_reported_by_name(tmp_path):
    with pytest.raises(SourceError, match="no_such_clip.mp4: no such file"):
        open_source(str(tmp_path / "no_such_clip.mp4"))
    with pytest.raises(SourceError, match="GStreamer"):
        open_source("videotestsrc ! videoconvert ! appsink")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceError, match="no images"):
        open_source(str(tmp_path / "empty"))
    not_a_video = tmp_path / "notes.mp4"
    not_a_video.write_text("not a video")
    with pytest.raises(SourceError, match="notes.mp4: cannot open"):
        open_source(str(not_a_video))


# ------------------------------------------------------------------------------------------------ parts


def test_channel_newest_wins_and_blocking_put():
    channel = Channel(1)
    assert channel.put_newest("a") == []
    assert channel.put_newest("b") == ["a"]  # the stale frame comes back to be counted as dropped
    got = []
    consumer = threading.Thread(target=lambda: got.extend([channel.get(), channel.get()]))
    channel_full_put = threading.Thread(target=channel.put, args=("c",))
    channel_full_put.start()  # waits for room
    consumer.start()
    channel_full_put.join(5)
    consumer.join(5)
    assert got == ["b", "c"]
    channel.close()
    assert channel.get(timeout=0.1) is END and channel.drain() == []


def test_latency_reservoir_memory_is_fixed_and_quantiles_are_right():
    reservoir = LatencyReservoir(capacity=512, seed=1)
    for value in range(20_000):
        reservoir.add(LatencyMs(total=float(value), backbone=1.0))
    assert reservoir.rows.shape == (512, 7) and reservoir.seen == 20_000
    assert reservoir.quantile(50).total == pytest.approx(10_000, rel=0.1)
    assert reservoir.quantile(95).total == pytest.approx(19_000, rel=0.05)
    assert reservoir.quantile(50).backbone == 1.0
