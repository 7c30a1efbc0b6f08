"""The greedy coreset (Roth et al. 2022, Algorithm 1) on patch features cut from real fixture images.

The fast selection must pick exactly the plain loop's indices, in the same order, on real data: flat PCB
regions give many identical patches (ties), and the ball-screw-drive photos give natural texture.
"""

from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np
import pytest

from pcedge.export.coreset import (
    CoresetResult,
    coverage_radius,
    greedy_coreset,
    random_projection,
    reference_greedy_coreset,
    resolve_count,
    squared_distances,
)
from pcedge.runtime.preprocess import list_images, read_image, to_rgb_float

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


def patch_features(category: str, n_images: int, side: int = 40, patch: int = 5, stride: int = 2) -> np.ndarray:
    """Raw-pixel patches ``[N, patch * patch * 3]`` float32 from the first ``n_images`` training images.

    Each image is shrunk to ``side x side`` (INTER_AREA), and every ``patch x patch`` RGB window on a
    ``stride`` grid becomes one feature.
    """
    paths = list_images(FIXTURES / category / "train" / "good")[:n_images]
    assert len(paths) == n_images, f"fixtures/{category}/train/good has fewer than {n_images} images"
    rows = []
    for path in paths:
        rgb = cv2.resize(to_rgb_float(read_image(path), str(path)), (side, side), interpolation=cv2.INTER_AREA)
        windows = np.lib.stride_tricks.sliding_window_view(rgb, (patch, patch), axis=(0, 1))[::stride, ::stride]
        rows.append(windows.reshape(-1, patch * patch * 3))
    return np.ascontiguousarray(np.concatenate(rows), dtype=np.float32)


@pytest.fixture(scope="module")
def pcb() -> np.ndarray:
    return patch_features("pcb", 6)  # 6 x 18 x 18 = 1944 patches of binarised PCB: many exact duplicates


@pytest.fixture(scope="module")
def bsd() -> np.ndarray:
    return patch_features("ball_screw_drive", 8)  # 2592 patches of natural texture


@pytest.fixture(scope="module")
def bsd_all() -> np.ndarray:
    return patch_features("ball_screw_drive", 30)  # 9720 patches: enough for several coarse regions


@pytest.fixture(scope="module")
def bsd_wide() -> np.ndarray:
    """152-dim features (PatchCore's EfficientNet-Lite0 width): 7x7 RGB patches plus 5 gradient channels."""
    paths = list_images(FIXTURES / "ball_screw_drive" / "train" / "good")[8:12]
    rows = []
    for path in paths:
        rgb = cv2.resize(to_rgb_float(read_image(path), str(path)), (44, 44), interpolation=cv2.INTER_AREA)
        gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
        gx, gy = cv2.Sobel(gray, cv2.CV_32F, 1, 0), cv2.Sobel(gray, cv2.CV_32F, 0, 1)
        extra = np.stack([gx, gy, np.hypot(gx, gy), cv2.Laplacian(gray, cv2.CV_32F), cv2.blur(gray, (7, 7))], -1)
        windows = np.lib.stride_tricks.sliding_window_view(rgb, (7, 7), axis=(0, 1))[::2, ::2]
        grid = windows.shape[:2]
        rows.append(np.concatenate([windows.reshape(-1, 147), extra[3::2, 3::2][: grid[0], : grid[1]].reshape(-1, 5)], 1))
    return np.ascontiguousarray(np.concatenate(rows), dtype=np.float32)


def test_features_are_real_and_contain_ties(pcb, bsd, bsd_wide):
    assert pcb.shape == (1944, 75) and bsd.shape == (2592, 75) and bsd_wide.shape[1] == 152
    assert len(np.unique(pcb, axis=0)) < 0.8 * len(pcb)  # duplicated patches: the tie-breaking is exercised
    assert bsd.std() > 0.02 and bsd_wide.std() > 0.02


def test_squared_distances_do_not_depend_on_the_batch(bsd_wide):
    """Each row's value is the same alone, in any subset, and in paired form: what makes exactness possible."""
    rows = random_projection(bsd_wide, 128, seed=0)
    centre = rows[17]
    full = squared_distances(rows, centre)
    rng = np.random.default_rng(0)
    for size in (1, 2, 7, 8, 9, 100, 1001):
        subset = rng.choice(len(rows), size, replace=False)
        assert np.array_equal(squared_distances(rows[subset], centre), full[subset])
        assert np.array_equal(squared_distances(rows[subset], np.repeat(centre[None], size, 0)), full[subset])
    expected = ((rows.astype(np.float64) - centre) ** 2).sum(1)
    np.testing.assert_allclose(full, expected, rtol=1e-5)


CASES = [
    # (data, n_select, projection_dim, hot_size): identity (D = 75 < 128) and real projections, many
    # blocks (tiny hot sets) and one block, ratios up to selecting every feature.
    ("pcb", 100, 128, None),
    ("pcb", 400, 128, 16),
    ("pcb", 1944, 128, 64),  # every feature: most of the run is among exact duplicates (all ties at 0)
    ("pcb", 600, 16, 32),
    ("bsd", 26, 128, 8),
    ("bsd", 260, 32, None),
    ("bsd", 650, 128, 100),
    ("bsd_wide", 200, 128, 64),
    ("bsd_wide", 500, 128, 5000),
    ("bsd_all", 972, 128, 256),  # several regions, many blocks
    ("bsd_all", 2500, 32, None),
]


@pytest.mark.parametrize("name, n_select, projection_dim, hot_size", CASES)
def test_fast_selection_is_identical_to_the_reference(request, name, n_select, projection_dim, hot_size):
    features = request.getfixturevalue(name)
    fast = greedy_coreset(features, n_select, projection_dim=projection_dim, seed=3, hot_size=hot_size)
    plain = reference_greedy_coreset(features, n_select, projection_dim=projection_dim, seed=3)
    assert isinstance(fast, CoresetResult)
    assert fast.indices.dtype == np.int64 and fast.indices.shape == (n_select,)
    np.testing.assert_array_equal(fast.indices, plain.indices)
    np.testing.assert_array_equal(fast.radii, plain.radii)  # every covering radius, bit for bit
    assert len(np.unique(fast.indices)) == n_select
    assert fast.n_total == len(features) and fast.projection_dim == min(projection_dim, features.shape[1])
    assert plain.distance_evaluations == len(features) * n_select
    assert 0 < fast.exact_evaluations <= fast.distance_evaluations


def test_exact_on_duplicated_and_quantised_features(bsd):
    """Whole-bank duplicates and coarse quantisation: ties everywhere, still the reference's choices."""
    doubled = np.concatenate([bsd[:800], bsd[:800], np.round(bsd[800:1400] * 4) / 4])
    for n_select in (150, 1100):
        fast = greedy_coreset(doubled, n_select, projection_dim=128, seed=1, hot_size=32)
        plain = reference_greedy_coreset(doubled, n_select, projection_dim=128, seed=1)
        np.testing.assert_array_equal(fast.indices, plain.indices)


def test_work_is_a_fraction_of_the_plain_loop(bsd_wide):
    fast = greedy_coreset(bsd_wide, 300, seed=0, hot_size=128)
    assert fast.distance_evaluations < 0.7 * len(bsd_wide) * 300
    assert fast.exact_evaluations < 0.1 * len(bsd_wide) * 300


def test_deterministic_for_a_seed(bsd):
    first = greedy_coreset(bsd, 200, projection_dim=32, seed=5)
    again = greedy_coreset(bsd, 200, projection_dim=32, seed=5)
    other = greedy_coreset(bsd, 200, projection_dim=32, seed=6)
    np.testing.assert_array_equal(first.indices, again.indices)
    assert first.indices[0] != other.indices[0]  # a different seed starts somewhere else
    assert not np.array_equal(first.indices, other.indices)


def test_radii_shrink_and_end_at_the_projected_coverage(bsd):
    result = greedy_coreset(bsd, 300, projection_dim=128, seed=0)
    assert np.all(np.diff(result.radii) <= 0) and result.radii[-1] > 0
    # D = 75 < 128: no projection, so the final greedy radius is the full-space coverage radius.
    assert math.isclose(result.radii[-1], coverage_radius(bsd, result.indices), rel_tol=1e-5)


def test_greedy_covers_better_than_a_random_subset(pcb, bsd_wide):
    for features in (pcb, bsd_wide):
        n_select = len(features) // 10
        greedy = greedy_coreset(features, n_select, seed=0).indices
        random = np.random.default_rng(0).choice(len(features), n_select, replace=False)
        assert coverage_radius(features, greedy) < 0.8 * coverage_radius(features, random)


def brute_force_coverage(features: np.ndarray, indices: np.ndarray) -> float:
    bank = features.astype(np.float64)
    return math.sqrt(((bank[:, None, :] - bank[indices][None]) ** 2).sum(-1).min(1).max())


def test_coverage_radius_is_exact(bsd_wide, pcb):
    greedy = greedy_coreset(bsd_wide, 150, seed=2).indices
    random = np.random.default_rng(0).choice(len(bsd_wide), 150, replace=False)
    for indices in (greedy, random, np.concatenate([random[::-1], random[:5]])):  # any order, duplicates
        assert coverage_radius(bsd_wide, indices) == brute_force_coverage(bsd_wide, indices)
    ties = greedy_coreset(pcb, 50, seed=0).indices  # binarised PCB: many points tie at the maximum
    assert coverage_radius(pcb, ties) == brute_force_coverage(pcb, ties)
    assert coverage_radius(bsd_wide, np.arange(len(bsd_wide))) == 0.0


def test_progress_is_reported_up_to_the_total(bsd):
    calls: list[tuple[int, int]] = []
    greedy_coreset(bsd, 250, projection_dim=32, progress=lambda done, total: calls.append((done, total)))
    assert calls[-1] == (250, 250)
    assert [done for done, _ in calls] == sorted(done for done, _ in calls) and len(calls) >= 50


def test_random_projection(bsd_wide):
    projected = random_projection(bsd_wide, 64, seed=0)
    assert projected.shape == (len(bsd_wide), 64) and projected.dtype == np.float32
    np.testing.assert_array_equal(projected, random_projection(bsd_wide, 64, seed=0))
    assert not np.array_equal(projected, random_projection(bsd_wide, 64, seed=1))
    # JL scaling: squared distances are preserved in expectation.
    rng = np.random.default_rng(0)
    a, b = rng.integers(len(bsd_wide), size=(2, 2000))
    ratio = ((projected[a] - projected[b]) ** 2).sum(1).sum() / ((bsd_wide[a] - bsd_wide[b]) ** 2).sum(1).sum()
    assert 0.8 < ratio < 1.25
    # dim >= D: the identity (exact geometry), not an upward projection.
    np.testing.assert_array_equal(random_projection(bsd_wide, 152), bsd_wide)


@pytest.mark.parametrize(
    "spec, n, expected",
    [(0.1, 200, 20), (0.29, 100, 29), (1.0, 7, 7), (1e-9, 50, 1), (1, 5, 1), (5000, 300, 300), (np.int64(3), 10, 3),
     (np.float32(0.5), 10, 5)],
)
def test_resolve_count(spec, n, expected):
    assert resolve_count(spec, n) == expected


@pytest.mark.parametrize(
    "spec, n, message",
    [(0.0, 10, "ratio"), (1.5, 10, "ratio"), (-0.2, 10, "ratio"), (float("nan"), 10, "ratio"), (0, 10, "count"),
     (-3, 10, "count"), (True, 10, "boolean"), ("0.1", 10, "expected a ratio"), (0.5, 0, "at least one")],
)
def test_resolve_count_errors(spec, n, message):
    with pytest.raises(ValueError, match=message):
        resolve_count(spec, n)


def test_bad_input_is_refused(bsd):
    with pytest.raises(ValueError, match="n_select must be in"):
        greedy_coreset(bsd, len(bsd) + 1)
    with pytest.raises(ValueError, match="n_select must be an int"):
        greedy_coreset(bsd, 0.1)
    with pytest.raises(ValueError, match=r"\[N, D\]"):
        greedy_coreset(bsd[0], 1)
    broken = bsd.copy()
    broken[7, 3] = np.nan
    with pytest.raises(ValueError, match="first bad row: 7"):
        reference_greedy_coreset(broken, 10)
    with pytest.raises(ValueError, match="overflow"):
        greedy_coreset(bsd * np.float32(1e30), 10)
    with pytest.raises(ValueError, match="out of range"):
        coverage_radius(bsd, np.array([0, len(bsd)]))
