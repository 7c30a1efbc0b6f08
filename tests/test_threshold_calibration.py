"""The threshold from out-of-fold scores of every training image, and its false-alarm estimate."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from pcedge.cli import main
from pcedge.export.backbones import build_backbone
from pcedge.export.calibration import calibrate_threshold, false_alarm_estimate
from pcedge.export.embedder import PatchEmbedder
from pcedge.export.fit import extract_features, find_good_images
from pcedge.export.out_of_fold import fold_assignment, out_of_fold_scores
from pcedge.runtime.bundle import Geometry, Manifest, ScoringSpec, open_bundle

ROOT = Path(__file__).resolve().parents[1]
BSD = ROOT / "fixtures" / "ball_screw_drive"


@pytest.fixture(scope="module")
def fixture_features() -> tuple[np.ndarray, int]:
    """Patch features ``[n_images * 784, 152]`` of fixtures/ball_screw_drive/train/good at 224 px."""
    torch.set_num_threads(2)
    embedder = PatchEmbedder(build_backbone("efficientnet_lite0")).eval()
    features, kept = extract_features(embedder, find_good_images(BSD), Geometry(), 8, [], progress=False)
    return features, len(kept)


def test_folds_cover_every_image_once_with_balanced_sizes():
    folds = fold_assignment(23, 5, seed=3)
    assert folds.shape == (23,) and set(folds.tolist()) == set(range(5))
    sizes = np.bincount(folds)
    assert sizes.max() - sizes.min() <= 1 and sizes.sum() == 23
    assert np.array_equal(folds, fold_assignment(23, 5, seed=3))
    with pytest.raises(ValueError, match="too few for 5 folds"):
        fold_assignment(4, 5)
    with pytest.raises(ValueError, match="at least 2 folds"):
        fold_assignment(10, 1)


def test_out_of_fold_scores_equal_brute_force_against_the_other_folds(fixture_features):
    """Full fold banks (coreset 1.0), Eq. 6 only: each image's score is max over its patches of the distance
    to the nearest patch of every image outside its fold, computed here with plain numpy."""
    features, n = fixture_features
    oof = out_of_fold_scores(features, n, 3, 1.0, ScoringSpec(reweight=False), seed=0)
    by_image = features.reshape(n, 784, -1).astype(np.float64)
    for i in range(n):
        others = by_image[oof.folds != oof.folds[i]].reshape(-1, by_image.shape[2])
        d2 = (by_image[i] ** 2).sum(1)[:, None] - 2 * by_image[i] @ others.T + (others ** 2).sum(1)[None, :]
        expected = np.sqrt(np.maximum(d2.min(axis=1), 0)).max()
        assert oof.scores[i] == pytest.approx(expected, rel=1e-4), i
    assert (oof.scores > 0).all()  # no image is in its own fold's bank


def test_out_of_fold_scores_with_a_coreset_are_at_least_the_full_banks(fixture_features):
    """A fold bank's coreset is a subset of its full bank, so no patch can come nearer: scores only rise."""
    features, n = fixture_features
    full = out_of_fold_scores(features, n, 3, 1.0, ScoringSpec(reweight=False), seed=0)
    small = out_of_fold_scores(features, n, 3, 0.05, ScoringSpec(reweight=False), seed=0)
    assert np.array_equal(full.folds, small.folds)
    assert (small.scores >= full.scores - 1e-4).all() and (small.scores > full.scores + 1e-3).any()


def test_false_alarm_estimate_matches_simulation():
    """The Beta(m + 1, n - m) law of the mass above an order statistic, checked against exchangeable draws."""
    n, m = 40, 2
    mean, low, high = false_alarm_estimate(n, m)
    assert mean == pytest.approx((m + 1) / (n + 1))
    rng = np.random.default_rng(0)
    draws = rng.random((20000, n))
    thresholds = np.sort(draws, axis=1)[:, n - m - 1]  # m of n above
    rates = 1.0 - thresholds  # uniform scores: P(new > t) = 1 - t
    assert rates.mean() == pytest.approx(mean, rel=0.03)
    assert np.mean(rates < low) == pytest.approx(0.025, abs=0.006)
    assert np.mean(rates > high) == pytest.approx(0.025, abs=0.006)


def test_calibration_records_the_rate_and_its_interval():
    scores = np.linspace(1.0, 2.0, 300)
    t = calibrate_threshold(scores, 0.01, "test", folds=5)
    assert t.folds == 5 and t.n_images == 300 and t.n_above == 3
    assert "empirical 0.99 quantile of 300 5-fold out-of-fold" in t.method
    assert t.expected_fpr == pytest.approx(4 / 301)
    assert t.fpr_interval[0] < 0.01 < t.fpr_interval[1] < 0.04
    assert "expected false-alarm rate 1.33% on good parts (95% interval" in t.false_alarm_summary()


def test_default_export_calibrates_on_every_training_image(fixture_report, fixture_bundle, capsys):
    m = fixture_report.manifest
    n = fixture_report.n_train_images
    assert m.memory_bank.n_train_images == n == len(find_good_images(BSD))  # none lost to a held-out split
    assert m.threshold.folds == 5 and m.threshold.n_images == n and len(m.threshold.nominal_scores) == n
    assert "out-of-fold" in m.threshold.source and m.threshold.expected_fpr is not None
    low, high = m.threshold.fpr_interval
    assert 0 <= low < m.threshold.expected_fpr < high <= 1
    assert main(["info", str(fixture_bundle)]) == 0
    out = capsys.readouterr().out
    assert "expected false-alarm rate" in out and "95% interval" in out and "border: zero" in out


def test_older_manifest_without_the_new_fields_still_loads(fixture_bundle, tmp_path, capsys):
    data = json.loads((fixture_bundle / "manifest.json").read_text())
    for key in ("expected_fpr", "fpr_interval", "confidence", "n_above", "folds"):
        del data["threshold"][key]
    del data["model"]["border"]
    m = Manifest.from_dict(data)
    assert m.threshold.expected_fpr is None and m.model.border == "mean"
    assert "not estimated" in m.threshold.false_alarm_summary()
    copy = tmp_path / "old.pcedge"
    shutil.copytree(fixture_bundle, copy)
    (copy / "manifest.json").write_text(json.dumps(data))
    assert main(["info", str(copy)]) == 0
    assert "false-alarm rate not estimated" in capsys.readouterr().out


def test_held_out_and_val_dir_calibration_still_work(bundle_factory, tmp_path):
    held = bundle_factory("bsd_holdout", folds=0).manifest
    assert held.threshold.folds == 0 and "held-out fraction" in held.threshold.source
    assert held.memory_bank.n_train_images + held.threshold.n_images == len(find_good_images(BSD))
    val = BSD / "test" / "good"
    report = bundle_factory("bsd_valdir", val_dir=val)
    assert report.manifest.threshold.n_images == len(list(val.iterdir()))
    assert "val dir" in report.manifest.threshold.source and report.manifest.threshold.folds == 0
    assert open_bundle(report.bundle).manifest.check.names  # verify's reference images exist either way


def test_bad_folds_flag_is_a_clear_error(tmp_path, capsys):
    assert main(["export", "--data", str(BSD), "-o", str(tmp_path / "x.pcedge"), "--folds", "1", "--quiet"]) == 2
    assert "--folds 1: expected 0 (hold images out) or at least 2" in capsys.readouterr().err
    assert not (tmp_path / "x.pcedge").exists()
