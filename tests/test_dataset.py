"""pcedge.runtime.evaluation.dataset on the real fixture categories and on broken copies of them."""

from __future__ import annotations

import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from pcedge.runtime.evaluation.dataset import DatasetError, load_category, read_mask

ROOT = Path(__file__).resolve().parents[1]
BSD = ROOT / "fixtures" / "ball_screw_drive"
PCB = ROOT / "fixtures" / "pcb"


def copy_category(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_loads_the_fixture_categories():
    bsd = load_category(BSD)
    assert bsd.name == "ball_screw_drive"
    assert len(bsd.train) == 30
    assert bsd.defect_types == ["pitting"]
    assert bsd.count("good") == 8 and bsd.count("pitting") == 8
    for item in bsd.test:
        assert item.path.is_file()
        assert item.is_anomalous == (item.label != "good")
        if item.is_anomalous:
            assert item.mask_path == BSD / "ground_truth" / "pitting" / f"{item.path.stem}_mask.png"
        else:
            assert item.mask_path is None
    pcb = load_category(PCB)
    assert pcb.defect_types == ["defect"] and pcb.count("good") == 8


def test_read_mask_is_bool_with_defect_pixels():
    item = next(i for i in load_category(BSD).test if i.is_anomalous)
    image = cv2.imread(str(item.path))
    mask = read_mask(item.mask_path, image.shape[:2])
    assert mask.dtype == bool and mask.shape == image.shape[:2]
    assert 0 < mask.sum() < mask.size
    good = read_mask(None, (5, 7))
    assert good.shape == (5, 7) and not good.any()


def test_folder_without_test_lists_what_is_missing(tmp_path):
    (tmp_path / "train" / "good").mkdir(parents=True)
    with pytest.raises(DatasetError) as info:
        load_category(tmp_path)
    message = str(info.value)
    assert str(tmp_path / "test") in message
    assert "test/good" in message and "test/<defect>" in message


def test_missing_folder_is_named(tmp_path):
    with pytest.raises(DatasetError, match="no such category folder"):
        load_category(tmp_path / "nope")


def test_test_folder_without_good_or_defects_lists_both(tmp_path):
    (tmp_path / "test" / "good").mkdir(parents=True)
    with pytest.raises(DatasetError) as info:
        load_category(tmp_path)
    message = str(info.value)
    assert "nominal test images" in message
    assert "defective test images" in message


def test_every_missing_mask_is_listed(tmp_path):
    root = copy_category(BSD, tmp_path / "bsd")
    masks = sorted((root / "ground_truth" / "pitting").iterdir())
    removed = masks[:3]
    for m in removed:
        m.unlink()
    with pytest.raises(DatasetError) as info:
        load_category(root)
    message = str(info.value)
    assert "3 defect images have no ground-truth mask" in message
    for m in removed:
        assert str(m) in message
    for kept in masks[3:]:
        assert str(kept) not in message


def test_missing_ground_truth_folder_lists_all_masks(tmp_path):
    root = copy_category(PCB, tmp_path / "pcb")
    shutil.rmtree(root / "ground_truth")
    with pytest.raises(DatasetError) as info:
        load_category(root)
    assert "8 defect images have no ground-truth mask" in str(info.value)


def test_mask_of_the_wrong_size_names_file_and_sizes(tmp_path):
    path = tmp_path / "000_mask.png"
    cv2.imwrite(str(path), np.full((100, 50), 255, np.uint8))
    with pytest.raises(DatasetError) as info:
        read_mask(path, (460, 1130))
    message = str(info.value)
    assert str(path) in message
    assert "100x50" in message and "460x1130" in message


def test_unreadable_mask_is_named(tmp_path):
    path = tmp_path / "000_mask.png"
    path.write_bytes(b"not a png")
    with pytest.raises(DatasetError, match="000_mask.png: not a readable mask image"):
        read_mask(path, (10, 10))


def test_colour_and_0_1_masks(tmp_path):
    colour = np.zeros((6, 8, 3), np.uint8)
    colour[1:3, 2:5, 2] = 200  # red in BGR
    cv2.imwrite(str(tmp_path / "c_mask.png"), colour)
    ones = np.zeros((6, 8), np.uint8)
    ones[4, 4] = 1
    cv2.imwrite(str(tmp_path / "o_mask.png"), ones)
    assert read_mask(tmp_path / "c_mask.png", (6, 8)).sum() == 6
    assert read_mask(tmp_path / "o_mask.png", (6, 8)).sum() == 1
