"""``pcedge eval`` on fixture bundles (real ONNX Runtime, real hnswlib), and on broken category folders."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from pcedge.cli import main
from pcedge.runtime.bundle import Geometry
from pcedge.runtime.evaluation.accuracy import AccuracyAccumulator, coverage_warning, downscale_map, downscale_mask, eval_size
from pcedge.runtime.evaluation.dataset import TestItem, load_category

ROOT = Path(__file__).resolve().parents[1]
BSD = ROOT / "fixtures" / "ball_screw_drive"
PCB = ROOT / "fixtures" / "pcb"


def _unit(value: float) -> bool:
    return 0.0 <= value <= 1.0


def test_eval_fixture_bundle_writes_sensible_metrics(fixture_bundle, tmp_path, capsys):
    out = tmp_path / "report" / "eval.json"
    code = main(["eval", str(fixture_bundle), "--data", str(BSD), "--json", str(out), "--backend", "ort-cpu",
                 "--index", "hnsw", "--threads", "2", "--quiet"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "image AUROC" in captured.out and "AUPRO (FPR <= 0.3)" in captured.out
    assert "256x104" in captured.out  # the stated pixel-metric resolution (1130x460 scaled to <= 256)
    assert f"wrote {out}" in captured.out and "next: pcedge predict" in captured.out
    report = json.loads(out.read_text())
    assert not list(out.parent.glob("*.tmp"))
    m = report["metrics"]
    assert (m["n_good"], m["n_anomalous"]) == (8, 8)
    for key in ("image_auroc", "pixel_auroc", "aupro", "image_f1_max"):
        assert _unit(m[key]), key
    # Sensible on this fixture (the full-bank reference reaches about 0.83 image AUROC, 0.97 pixel AUROC):
    # clearly better than chance, and pixel AUROC high since most pixels are easy good background.
    assert m["image_auroc"] > 0.6
    assert m["pixel_auroc"] > 0.85
    assert m["aupro"] > 0.2
    assert m["image_f1_max"] >= 2 * 8 / (2 * 8 + 8)  # never below "flag everything" (precision 0.5, recall 1)
    t = m["at_threshold"]
    assert t["tp"] + t["fn"] == 8 and t["fp"] + t["tn"] == 8
    assert [d["label"] for d in m["per_defect"]] == ["pitting"]
    assert m["per_defect"][0]["image_auroc"] == pytest.approx(m["image_auroc"])  # one defect type
    assert len(report["images"]) == 16
    assert report["coverage"]["n_defect_masks"] == 8
    assert report["coverage"]["n_wholly_outside"] + report["coverage"]["n_partly_outside"] == 0  # stretch sees all


def test_eval_with_exact_index_agrees_with_hnsw(fixture_bundle, tmp_path):
    # The detector re-scores HNSW's decisive patches exactly, so image scores (and image AUROC) agree.
    reports = {}
    for index in ("exact", "hnsw"):
        out = tmp_path / f"{index}.json"
        assert main(["eval", str(fixture_bundle), "--data", str(BSD), "--json", str(out), "--backend", "ort-cpu",
                     "--index", index, "--threads", "2", "--quiet", "--batch", "4"]) == 0
        reports[index] = json.loads(out.read_text())
    exact = [r["score"] for r in reports["exact"]["images"]]
    hnsw = [r["score"] for r in reports["hnsw"]["images"]]
    np.testing.assert_allclose(hnsw, exact, rtol=1e-5)
    assert reports["hnsw"]["metrics"]["image_auroc"] == reports["exact"]["metrics"]["image_auroc"]


def test_crop_geometry_warns_about_unseen_defects(bundle_factory, tmp_path, capsys):
    # The paper's MVTec protocol (resize 256, centre-crop 224) on 1130x460 frames sees only the middle
    # 402x460: pitting near the ends of the spindle is invisible to the model, and eval must say so.
    bundle = bundle_factory("bsd_crop", geometry=Geometry(mode="crop", height=224, width=224, resize=256)).bundle
    out = tmp_path / "crop.json"
    assert main(["eval", str(bundle), "--data", str(BSD), "--json", str(out), "--backend", "ort-cpu",
                 "--threads", "2", "--quiet"]) == 0
    err = capsys.readouterr().err
    coverage = json.loads(out.read_text())["coverage"]
    # Count independently from the masks and the crop's visible columns.
    category = load_category(BSD)
    resized_w = round(1130 * 256 / 460)  # shorter side 460 -> 256
    crop_left = (resized_w - 224) // 2
    left, right = round(crop_left * 1130 / resized_w), round((crop_left + 224) * 1130 / resized_w)
    affected = 0
    for item in category.test:
        if item.is_anomalous:
            mask = cv2.imread(str(item.mask_path), cv2.IMREAD_GRAYSCALE) > 0
            outside = mask.copy()
            outside[:, left:right] = False
            affected += bool(outside.any())
    assert affected > 0  # the fixture does have pitting outside the crop
    assert coverage["n_wholly_outside"] + coverage["n_partly_outside"] == affected
    assert f"warning: {affected} of 8 defect masks lie outside the region the model sees" in err


def _broken_copy(tmp_path: Path) -> Path:
    root = tmp_path / "pcb"
    shutil.copytree(PCB, root)
    return root


def test_eval_refuses_a_folder_without_test(fixture_bundle, tmp_path, capsys):
    (tmp_path / "train" / "good").mkdir(parents=True)
    assert main(["eval", str(fixture_bundle), "--data", str(tmp_path), "--backend", "ort-cpu"]) == 2
    err = capsys.readouterr().err
    assert "missing" in err and str(tmp_path / "test") in err


def test_eval_lists_every_missing_mask(fixture_bundle, tmp_path, capsys):
    root = _broken_copy(tmp_path)
    masks = sorted((root / "ground_truth" / "defect").iterdir())
    for m in masks[::2]:
        m.unlink()
    assert main(["eval", str(fixture_bundle), "--data", str(root), "--backend", "ort-cpu"]) == 2
    err = capsys.readouterr().err
    assert f"{len(masks[::2])} defect images have no ground-truth mask" in err
    for m in masks[::2]:
        assert str(m) in err


def test_eval_names_a_mask_of_the_wrong_size(fixture_bundle, tmp_path, capsys):
    root = _broken_copy(tmp_path)
    bad = sorted((root / "ground_truth" / "defect").iterdir())[0]
    cv2.imwrite(str(bad), np.zeros((320, 300), np.uint8))
    assert main(["eval", str(fixture_bundle), "--data", str(root), "--backend", "ort-cpu", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "320x300" in err and "640x640" in err


# ------------------------------------------------------------------------------------ the pieces


def test_eval_size_keeps_aspect_and_never_enlarges():
    assert eval_size(460, 1130, 256) == (104, 256)
    assert eval_size(640, 640, 256) == (256, 256)
    assert eval_size(100, 120, 256) == (100, 120)
    assert eval_size(460, 1130, 0) == (460, 1130)


def test_downscale_map_averages_seen_pixels_only():
    amap = np.arange(16, dtype=np.float32).reshape(4, 4)
    amap[:, 3] = np.nan
    small = downscale_map(amap, (2, 2))
    assert small[0, 0] == pytest.approx(np.mean([0, 1, 4, 5]))
    assert small[0, 1] == pytest.approx(np.mean([2, 6]))  # the NaN column is left out, not propagated
    amap[:, 2] = np.nan
    assert np.isnan(downscale_map(amap, (2, 2))[:, 1]).all()  # nothing seen: stays unseen
    mask = np.zeros((4, 4), bool)
    mask[0, 0] = True
    assert downscale_mask(mask, (2, 2)).dtype == bool


def test_accumulator_counts_masks_outside_the_seen_region(tmp_path):
    masks = []
    for i, cols in enumerate([(0, 3), (2, 6), (5, 8)]):  # wholly outside, partly, inside
        mask = np.zeros((6, 10), np.uint8)
        mask[2:4, cols[0] : cols[1]] = 255
        path = tmp_path / f"{i}_mask.png"
        cv2.imwrite(str(path), mask)
        masks.append(path)
    seen = np.zeros((6, 10), bool)
    seen[:, 3:10] = True
    acc = AccuracyAccumulator(pixel_size=0)
    amap = np.where(seen, 1.0, np.nan).astype(np.float32)
    for i, path in enumerate(masks):
        acc.add(TestItem(path, "crack", True, path), float(i), amap, None, seen)
    acc.add(TestItem(tmp_path / "g.png", "good", False, None), -1.0, amap, None, None)
    cov = acc.coverage
    assert (cov.n_defect_masks, cov.n_wholly_outside, cov.n_partly_outside) == (3, 1, 1)
    assert cov.unseen_defect_pixel_fraction == pytest.approx((6 + 2) / (6 + 8 + 6))
    assert cov.files == [str(masks[0]), str(masks[1])]
    metrics = acc.metrics()
    assert metrics.at_threshold is None  # no verdicts given
    assert metrics.image_auroc == 1.0


def test_empty_defect_masks_are_counted_and_reported(tmp_path):
    path = tmp_path / "0_mask.png"
    cv2.imwrite(str(path), np.zeros((6, 10), np.uint8))
    acc = AccuracyAccumulator(pixel_size=0)
    amap = np.ones((6, 10), np.float32)
    acc.add(TestItem(path, "crack", True, path), 1.0, amap, None, np.ones((6, 10), bool))
    assert (acc.coverage.n_defect_masks, acc.coverage.n_empty, acc.coverage.n_affected) == (1, 1, 0)
    assert "1 defect images have an empty mask" in coverage_warning(acc.coverage)
