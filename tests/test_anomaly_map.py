"""The anomaly map's buffers: Scorer.anomaly_map (blur in place) and Placement.to_original (resize straight
into the frame-sized map) give bit-identical maps to the allocating code they replaced (fe4377b)."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from pcedge.runtime.bundle import Geometry, ScoringSpec
from pcedge.runtime.preprocess import fit_geometry, read_image
from pcedge.runtime.scoring import Scorer

from conftest import BSD

IMAGE = sorted((BSD / "test" / "pitting").iterdir())[0]  # a real 1130x460 photo with a defect


def _real_grid(h: int = 28, w: int = 28) -> np.ndarray:
    """A patch-score-like grid ``[h, w]`` float32 with real structure: the photo's gradient magnitude."""
    gray = cv2.cvtColor(read_image(IMAGE), cv2.COLOR_BGR2GRAY).astype(np.float32)
    edges = np.hypot(cv2.Sobel(gray, cv2.CV_32F, 1, 0), cv2.Sobel(gray, cv2.CV_32F, 0, 1))
    return cv2.resize(edges, (w, h), interpolation=cv2.INTER_AREA)


def _previous_anomaly_map(grid: np.ndarray, height: int, width: int, sigma: float) -> np.ndarray:
    up = cv2.resize(grid.astype(np.float32), (width, height), interpolation=cv2.INTER_LINEAR)
    ksize = 2 * int(round(4 * sigma)) + 1
    return cv2.GaussianBlur(up, (ksize, ksize), sigmaX=sigma, sigmaY=sigma, borderType=cv2.BORDER_REFLECT_101)


def _previous_to_original(p, net_map: np.ndarray) -> np.ndarray:
    inner = net_map[p.top : p.top + p.inner_h, p.left : p.left + p.inner_w]
    out = np.full((p.orig_h, p.orig_w), np.nan, dtype=np.float32)
    ix0, iy0 = max(int(round(p.x0)), 0), max(int(round(p.y0)), 0)
    ix1, iy1 = min(int(round(p.x1)), p.orig_w), min(int(round(p.y1)), p.orig_h)
    out[iy0:iy1, ix0:ix1] = cv2.resize(np.ascontiguousarray(inner, dtype=np.float32), (ix1 - ix0, iy1 - iy0),
                                       interpolation=cv2.INTER_LINEAR)
    return out


@pytest.mark.parametrize("height,width", [(224, 224), (320, 448)])
def test_anomaly_map_is_bit_identical_to_the_allocating_version(height, width):
    scorer = Scorer(np.zeros((1, 4), np.float32), None, None, ScoringSpec())
    grid = _real_grid(height // 8, width // 8)
    got = scorer.anomaly_map(grid, height, width)
    want = _previous_anomaly_map(grid, height, width, scorer.blur_sigma(height, width))
    assert got.shape == (height, width) and got.dtype == np.float32
    assert np.array_equal(got, want)
    assert got.max() < 0.9 * cv2.resize(grid, (width, height)).max()  # the blur really ran: the peak is spread


@pytest.mark.parametrize("mode", ["stretch", "letterbox", "crop"])
def test_map_placed_into_the_frame_is_bit_identical(mode):
    frame = read_image(IMAGE)
    g = Geometry(mode=mode, height=224, width=224, resize=256)
    _, placement = fit_geometry(frame, g)
    scorer = Scorer(np.zeros((1, 4), np.float32), None, None, ScoringSpec())
    net_map = scorer.anomaly_map(_real_grid(), 224, 224)
    got = placement.to_original(net_map)
    want = _previous_to_original(placement, net_map)
    assert got.shape == frame.shape[:2]
    assert np.array_equal(np.isnan(got), np.isnan(want)) and np.array_equal(np.isnan(got), ~placement.seen_mask())
    assert np.array_equal(got[~np.isnan(got)], want[~np.isnan(want)])
    assert not np.shares_memory(got, placement.to_original(net_map))  # each result owns its map
