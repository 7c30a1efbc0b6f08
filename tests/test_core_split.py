"""Both cores for the single-stream path: helper threads, bit-exact INTER_AREA bands, the exact index's split,
and which callers split (the single-stream detector) and which never do (watch's stages, servers)."""

from __future__ import annotations

import threading

import cv2
import numpy as np
import pytest

from pcedge.runtime import preprocess
from pcedge.runtime.area_bands import area_table, plan_area_bands
from pcedge.runtime.bundle import Geometry
from pcedge.runtime.core_split import CoreSplit
from pcedge.runtime.detector import Detector, DetectorOptions
from pcedge.runtime.index import ExactIndex, PrunedExactIndex, split_rows
from pcedge.runtime.preprocess import InputBuffers, _resize, _ResizeBuffer, fit_geometry_into, read_image

from conftest import BSD, PCB

PHOTO = sorted((BSD / "test" / "pitting").iterdir())[0]  # a real 1130x460 RGB photo


@pytest.fixture
def split():
    pool = CoreSplit(2)
    yield pool
    pool.close()


@pytest.fixture
def every_size_splits(monkeypatch):
    """Small frames split too, so the identity is checked on many sizes quickly."""
    monkeypatch.setattr(preprocess, "MIN_SPLIT_SOURCE_PIXELS", 0)


# ------------------------------------------------------------------ CoreSplit


def test_core_split_runs_parts_concurrently_and_keeps_their_order(split):
    seen = set()
    both_started = threading.Barrier(2, timeout=10)  # only passes if the two parts run at the same time

    def work(part):
        seen.add(threading.current_thread().name)
        both_started.wait()
        return part * 10

    assert split.map(work, [1, 2]) == [10, 20]
    assert threading.current_thread().name in seen and any(n.startswith("pcedge-split") for n in seen)
    assert split.map(lambda p: p + 1, [5]) == [6] and split.map(lambda p: p, []) == []
    assert split.map(lambda p: p * p, list(range(7))) == [p * p for p in range(7)]  # more parts than threads


def test_core_split_raises_after_every_part_finished(split):
    finished = []

    def work(part):
        if part == 0:
            raise ValueError("part 0 failed")
        threading.Event().wait(0.05)
        finished.append(part)

    with pytest.raises(ValueError, match="part 0 failed"):
        split.map(work, [0, 1])
    assert finished == [1]  # the helper's part was not left running into reused memory
    split.close()
    split.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        split.map(work, [1, 2])
    with pytest.raises(ValueError, match="at least 2"):
        CoreSplit(1)


# ------------------------------------------------------------------ INTER_AREA bands


def test_area_table_is_opencvs_weights():
    """The replica of computeResizeAreaTab resizes a signal exactly as OpenCV does (one channel, one axis)."""
    rng = np.random.default_rng(0)
    for ssize, dsize in ((460, 224), (1130, 224), (17, 5), (9, 9), (100, 3), (224, 224), (1000, 999)):
        signal = rng.random(ssize).astype(np.float32)
        mine = np.zeros(dsize, dtype=np.float32)
        for d, s, w in area_table(ssize, dsize):
            mine[d] += np.float32(w) * signal[s]
        theirs = cv2.resize(signal[:, None], (1, dsize), interpolation=cv2.INTER_AREA)[:, 0]
        np.testing.assert_allclose(mine, theirs, rtol=2e-6, atol=1e-7)


def test_band_plans():
    bands = plan_area_bands(460, 1130, 224, 224, 2)  # the camera's frame: 460 / 224 = 115 / 56
    assert [(b.axis, b.src_start, b.src_stop, b.dst_start, b.dst_stop) for b in bands] == \
        [(0, 0, 230, 0, 112), (0, 230, 460, 112, 224)]
    columns = plan_area_bands(345, 848, 224, 224, 2)  # 345 and 224 share no factor: split the columns
    assert [b.axis for b in columns] == [1, 1] and columns[0].dst_stop == 112 and columns[0].src_stop == 424
    assert plan_area_bands(161, 397, 224, 224, 2) == ()  # enlarging: bilinear, never split
    assert plan_area_bands(223, 397, 100, 100, 2) == ()  # no whole-row boundary on either axis
    assert plan_area_bands(460, 1130, 224, 224, 1) == ()


DTYPES = {"uint8": (np.uint8, 255), "uint16": (np.uint16, 65535), "float32": (np.float32, 1.0)}


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_banded_resize_is_bit_identical_over_many_sizes(dtype, split, every_size_splits):
    kind, top = DTYPES[dtype]
    rng = np.random.default_rng(1)
    splits = 0
    for src_h in (21, 56, 99, 230, 460, 481):
        for src_w in (33, 224, 250, 333, 1130):
            for dst_h, dst_w in ((1, 1), (7, 9), (28, 28), (56, 100), (112, 224), (224, 224), (115, 97)):
                if dst_h > src_h or dst_w > src_w:
                    continue
                for channels in (1, 3, 4):
                    shape = (src_h, src_w) if channels == 1 else (src_h, src_w, channels)
                    image = (rng.random(shape) * top).astype(kind)
                    whole = cv2.resize(image, (dst_w, dst_h), interpolation=cv2.INTER_AREA)
                    buffer = _ResizeBuffer()
                    banded = _resize(image, dst_w, dst_h, buffer, split)
                    splits += bool(buffer.bands(src_h, src_w, dst_h, dst_w, 2))
                    assert banded.dtype == whole.dtype and np.array_equal(banded, whole), \
                        (src_h, src_w, dst_h, dst_w, channels, buffer.bands(src_h, src_w, dst_h, dst_w, 2))
    assert splits > 200  # most of these sizes have an exact boundary: the identity was really exercised


@pytest.mark.parametrize("geometry", [Geometry("stretch", 224, 224), Geometry("letterbox", 224, 224),
                                      Geometry("crop", 224, 224, 256), Geometry("stretch", 112, 208),
                                      Geometry("letterbox", 160, 96), Geometry("crop", 96, 160, 176)],
                         ids=lambda g: f"{g.mode}-{g.height}x{g.width}")
def test_network_input_with_a_split_is_the_one_threads(geometry, split, every_size_splits):
    """Whole frames through every geometry, real photos (RGB JPEG, gray PNG) and odd sizes, all dtypes."""
    photo = read_image(PHOTO)
    gray = read_image(sorted((PCB / "test" / "defect").iterdir())[0])
    frames = [photo, gray, photo[:457, :1127], photo[1:, 3:], (photo.astype(np.uint16) * 257)[:, :1000],
              photo.astype(np.float32) / 255.0, cv2.cvtColor(photo, cv2.COLOR_BGR2BGRA)[:333, :777]]
    for frame in frames:
        alone = np.empty((3, geometry.height, geometry.width), np.float32)
        banded = np.empty_like(alone)
        p1 = fit_geometry_into(frame, geometry, alone)
        p2 = fit_geometry_into(frame, geometry, banded, resize_buffer=_ResizeBuffer(), split=split)
        assert p1 == p2 and np.array_equal(alone, banded), (frame.shape, frame.dtype)


def test_small_frames_are_not_split(split):
    buffers = InputBuffers(Geometry("stretch", 224, 224), split)
    small = np.zeros((460, 1130, 3), np.uint8)  # the camera's frame: split
    tiny = np.zeros((224, 280, 3), np.uint8)  # an exact boundary exists, but below MIN_SPLIT_SOURCE_PIXELS
    assert 224 * 280 < preprocess.MIN_SPLIT_SOURCE_PIXELS <= 460 * 1130 and plan_area_bands(224, 280, 224, 224, 2)
    calls = []
    original = split.map
    split.map = lambda work, parts: calls.append(len(parts)) or original(work, parts)
    buffers.prepare([tiny])
    assert calls == []
    buffers.prepare([small])
    assert calls == [2]


# ------------------------------------------------------------------ the exact index's split


def test_split_rows_rule(split):
    assert split_rows(784, None) == [(0, 784)]
    assert split_rows(784, split) == [(0, 392), (392, 784)]  # one image
    assert split_rows(8 * 784, split) == [(0, 3136), (3136, 6272)]  # a batch
    assert split_rows(64, split) == [(0, 64)]  # the re-scoring pass's largest call: never split
    assert split_rows(255, split) == [(0, 255)]  # too few rows per thread to pay the hand-off
    assert split_rows(256, split) == [(0, 128), (128, 256)]
    with CoreSplit(3) as three:
        assert split_rows(300, three) == [(0, 150), (150, 300)]  # not below 128 rows per thread
        assert split_rows(784, three) == [(0, 261), (261, 523), (523, 784)]


@pytest.mark.parametrize("k", [1, 9])
def test_split_search_gives_the_same_neighbours(k, split):
    rng = np.random.default_rng(3)
    bank = rng.standard_normal((3000, 64)).astype(np.float32)
    queries = (bank[rng.integers(0, 3000, 784)] + 0.3 * rng.standard_normal((784, 64))).astype(np.float32)
    for index in (ExactIndex(bank, block=1024), PrunedExactIndex(bank)):
        d1, i1 = index.query(queries, k)
        d2, i2 = index.query(queries, k, split)
        assert np.array_equal(i1, i2) and np.array_equal(d1, d2)
    few = queries[:16]  # the pruned path's calls (re-scoring): never split, same answer
    assert all(np.array_equal(a, b) for a, b in zip(PrunedExactIndex(bank).query(few, k),
                                                    PrunedExactIndex(bank).query(few, k, split)))


# ------------------------------------------------------------------ who splits


def test_detector_splits_only_the_single_stream_path(fixture_bundle, monkeypatch):
    paths = sorted((BSD / "test" / "pitting").iterdir())[:3]
    with Detector.open(fixture_bundle, backend="ort-cpu", index="exact", threads=2, split_threads=1) as alone:
        assert alone._split is None
        reference = alone.batch(paths)
    with Detector.open(fixture_bundle, backend="ort-cpu", index="exact", threads=2, split_threads=2) as detector:
        assert detector._split is not None and detector._split.threads == 2
        assert detector.input_buffers().split is detector._split
        asked = []
        patch_scores = detector.scorer.patch_scores
        monkeypatch.setattr(detector.scorer, "patch_scores",
                            lambda emb, split=None: asked.append(split) or patch_scores(emb, split))
        results = detector.batch(paths)
        assert asked == [detector._split]  # run_frames owns the machine: the index search splits
        for a, b in zip(reference, results):
            assert a.score == b.score and np.array_equal(a.patch_scores, b.patch_scores)
            assert np.array_equal(a.anomaly_map, b.anomaly_map)
        tensor, placements = detector.input_buffers().prepare([read_image(paths[0])])
        detector.score_embeddings(detector.embed(tensor), placements)  # the watch pipeline's / a server's call
        assert asked[-1] is None
        split_pool = detector._split
    assert detector._split is None
    with pytest.raises(RuntimeError, match="closed"):
        split_pool.map(lambda p: p, [1, 2])


def test_split_threads_follow_the_options(fixture_bundle):
    from pcedge.runtime.backends import default_threads
    from pcedge.runtime.detector import _open_split

    assert _open_split(DetectorOptions(threads=1)) is None  # a server's one-thread detector does not split
    assert _open_split(DetectorOptions(split_threads=1)) is None
    default = _open_split(DetectorOptions())
    try:
        assert (default.threads if default else 1) == default_threads()
    finally:
        if default:
            default.close()
    with pytest.raises(ValueError, match="split_threads"):
        _open_split(DetectorOptions(split_threads=0))


def test_watch_backbone_thread_does_not_split(fixture_bundle):
    from pcedge.runtime.watch.pipeline import WatchPipeline
    from pcedge.runtime.watch.sources import open_source

    with Detector.open(fixture_bundle, backend="ort-cpu", index="exact", split_threads=2) as detector:
        source = open_source(str(BSD / "test" / "pitting"))
        pipeline = WatchPipeline(detector, source)
        assert pipeline._inputs.split is None
        source.release()


def test_core_split_stands_down_while_the_helpers_are_late(monkeypatch):
    from pcedge.runtime import core_split

    monkeypatch.setattr(core_split, "STAND_DOWN_CALLS", 2)
    threads_used = []

    def work(part):
        threads_used.append(threading.current_thread().name)
        return part

    with CoreSplit(2) as pool:
        for _ in range(core_split.LATE_CALLS_TO_STAND_DOWN):
            busy = threading.Event()
            pool._helpers.submit(busy.wait)  # another job holds the helper for 50 ms: its part starts late
            threading.Timer(0.05, busy.set).start()
            assert pool.map(work, [1, 2]) == [1, 2]
        assert pool.stood_down == 1
        threads_used.clear()
        for _ in range(2):  # stood down: every part on the caller's thread, same results
            assert pool.map(work, [3, 4]) == [3, 4]
        assert threads_used == [threading.current_thread().name] * 4
        threads_used.clear()
        assert pool.map(work, [5, 6]) == [5, 6]  # then the helpers again
        assert any(name.startswith("pcedge-split") for name in threads_used) and pool.stood_down == 1


def test_ort_spinning_off_and_on_and_the_spinning_session_stops_after_each_run(fixture_bundle):
    """DetectorOptions.ort_spinning False: one session that never spins; True: the single-stream path runs
    a second session that spins during runs and stops when they return (tests/test_spinning.py: "auto")."""
    with Detector.open(fixture_bundle, backend="ort-cpu", index="exact", ort_spinning=False) as off:
        options = off.backend.session.get_session_options()
        assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
        assert off.backend.spinning_session is None and "spinning" not in off.description
        reference = off(PHOTO)
    with Detector.open(fixture_bundle, backend="ort-cpu", index="exact", ort_spinning=True) as spinning:
        options = spinning.backend.spinning_session.get_session_options()
        assert options.get_session_config_entry("session.intra_op.allow_spinning") == "1"
        assert options.get_session_config_entry("session.force_spinning_stop") == "1"
        assert "spinning during runs" in spinning.description
        result = spinning(PHOTO)
        assert spinning.backend.runs.spinning == 1
    assert result.score == reference.score
