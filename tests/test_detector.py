"""The torch-free detector on real fixture bundles: preprocessing parity, scores, maps, backends."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pcedge.export.backbones import build_backbone
from pcedge.export.embedder import PatchEmbedder
from pcedge.export.fit import load_images
from pcedge.runtime.backends import open_backend
from pcedge.runtime.bundle import open_bundle
from pcedge.runtime.detector import Detector
from pcedge.runtime.errors import BackendUnavailable
from pcedge.runtime.scoring import eq7_weight

from conftest import BSD, PCB


@pytest.fixture(scope="module")
def detector(fixture_bundle):
    with Detector.open(fixture_bundle, backend="ort-cpu", index="exact", threads=2) as d:
        yield d


@pytest.mark.parametrize("path", [sorted((BSD / "test" / "pitting").iterdir())[0],  # RGB JPEG
                                  sorted((PCB / "test" / "defect").iterdir())[0]])  # grayscale PNG
def test_runtime_preprocessing_and_backend_match_the_exporter(detector, path):
    """The exporter's own pipeline (torch on its image loading) and the device's (OpenCV + ONNX Runtime)."""
    embedder = PatchEmbedder(build_backbone("efficientnet_lite0")).eval()
    images, _ = load_images([path], detector.geometry, [])
    with torch.inference_mode():
        ref = embedder(torch.from_numpy(np.stack(images).transpose(0, 3, 1, 2).copy())).numpy()
    result = detector.batch([path])[0]  # the device path: OpenCV decode + geometry, ONNX Runtime, index
    expected = detector.scorer.patch_scores(ref)[0].distances.reshape(result.patch_scores.shape)
    np.testing.assert_allclose(result.patch_scores, expected, rtol=1e-4, atol=1e-4)
    assert result.source == str(path)


def test_results_are_complete_and_consistent(detector):
    paths = sorted((BSD / "test" / "pitting").iterdir())[:3]
    batch = detector.batch(paths)
    for path, r in zip(paths, batch):
        single = detector(path)
        assert single.score == pytest.approx(r.score, rel=1e-5)
        assert r.anomaly_map.shape == (460, 1130) and np.isfinite(r.anomaly_map).all()  # stretch sees everything
        assert r.patch_scores.shape == (28, 28)
        assert r.s_star == pytest.approx(float(r.patch_scores.max()))
        assert 0 < r.score <= r.s_star  # Eq. 7 weight lies in (0, 1)
        assert r.anomalous == (r.score > r.threshold)
        assert r.normalised == pytest.approx(np.clip(0.5 + 0.5 * (r.score - detector.threshold) / detector.scale, 0, 1))
        t = r.timings
        assert min(t.preprocess_ms, t.backbone_ms, t.index_ms, t.scoring_ms) > 0
        assert t.total_ms == pytest.approx(t.preprocess_ms + t.backbone_ms + t.index_ms + t.scoring_ms)


def test_threshold_override_and_frames_from_opencv(fixture_bundle):
    import cv2

    path = sorted((BSD / "test" / "good").iterdir())[0]
    with Detector.open(fixture_bundle, backend="ort-cpu", threshold=1e-3) as d:
        r = d(cv2.imread(str(path)))
        assert r.anomalous and r.normalised == 1.0 and r.source is None


def test_defects_score_higher_than_good_parts(detector):
    good = [r.score for r in detector.batch(sorted((BSD / "test" / "good").iterdir()))]
    bad = [r.score for r in detector.batch(sorted((BSD / "test" / "pitting").iterdir()))]
    assert np.mean(bad) > np.mean(good)


def test_pitting_is_localised_inside_its_mask(detector):
    """Pixels on the annotated pitting score higher than the rest of the frame (pixel AUROC).

    The pits are small (0.01-1 % of a 1130x460 frame, some below one 8-px patch at 224 px input), so a
    perfect ranking is not expected on this 27-image fixture; 0.95 was measured.
    """
    import cv2

    from pcedge.runtime.evaluation.metrics import pixel_auroc

    masks, maps = [], []
    for path in sorted((BSD / "test" / "pitting").iterdir()):
        masks.append(cv2.imread(str(BSD / "ground_truth" / "pitting" / f"{path.stem}_mask.png"), cv2.IMREAD_GRAYSCALE) > 0)
        maps.append(detector(path).anomaly_map)
    assert pixel_auroc(masks, maps) > 0.85
    # the largest pit is found: the map's peak lies within one patch (dilation) of its mask
    big = int(np.argmax([m.sum() for m in masks]))
    near = cv2.dilate(masks[big].astype(np.uint8), np.ones((41, 41), np.uint8)) > 0
    assert near.flat[np.nanargmax(maps[big])]


def test_eq7_weight_by_hand():
    # distances from m_test,* to N_b(m*) = [1, 2, 3]: weight = 1 - e^1 / (e^1 + e^2 + e^3)
    expected = 1 - np.e / (np.e + np.e**2 + np.e**3)
    assert eq7_weight(np.array([1.0, 2.0, 3.0])) == pytest.approx(expected)
    # an isolated m* (its neighbours far away) leaves s* almost untouched; a crowded one damps it
    assert eq7_weight(np.array([5.0, 50.0, 50.0])) > 0.99
    assert eq7_weight(np.array([5.0, 5.0, 5.0])) == pytest.approx(2 / 3)
    assert eq7_weight(np.array([1000.0, 1001.0])) == pytest.approx(1 - 1 / (1 + np.e))  # no overflow


def test_hnsw_with_rescoring_gives_exact_image_scores(fixture_bundle):
    paths = sorted((BSD / "test").rglob("*.jpg"))
    with Detector.open(fixture_bundle, backend="ort-cpu", index="exact") as exact:
        ref = [r.score for r in exact.batch(paths)]
    with Detector.open(fixture_bundle, backend="ort-cpu", index="hnsw") as approx:
        got = approx.batch(paths)
    rel = np.abs(np.array([r.score for r in got]) - ref) / np.array(ref)
    assert rel.max() <= 0.005
    assert all(r.n_rescored >= 1 for r in got)


def test_explicit_backend_that_cannot_run_says_why(fixture_bundle):
    bundle = open_bundle(fixture_bundle)
    with pytest.raises(BackendUnavailable, match="CUDAExecutionProvider"):
        open_backend("ort-cuda", bundle)
    with pytest.raises(BackendUnavailable, match="tensorrt"):
        open_backend("tensorrt", bundle)
    auto = open_backend("auto", bundle, threads=1)
    assert auto.name == "ort-cpu" and "skipped tensorrt" in auto.description
    auto.close()
    with pytest.raises(ValueError, match="unknown backend"):
        open_backend("cuda", bundle)
