"""OpenCV preprocessing: pixel formats, geometry modes, and mapping maps back to the original image."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from pcedge.runtime.bundle import Geometry
from pcedge.runtime.preprocess import ImageError, check_geometry, crop_resize_size, fit_geometry, read_image

from conftest import BSD

IMAGE = sorted((BSD / "train" / "good").iterdir())[0]  # a real 1130x460 RGB photo


def test_pixel_formats_give_the_same_input(tmp_path):
    bgr = read_image(IMAGE)
    assert bgr.dtype == np.uint8 and bgr.shape == (460, 1130, 3)
    g = Geometry(mode="stretch", height=224, width=224)
    ref, _ = fit_geometry(bgr, g)
    assert ref.shape == (224, 224, 3) and ref.dtype == np.float32 and 0 <= ref.min() and ref.max() <= 1
    # BGR -> RGB: the first channel of the input is the file's red channel.
    red = cv2.resize(bgr[:, :, 2], (224, 224), interpolation=cv2.INTER_AREA).astype(np.float32) / 255
    np.testing.assert_allclose(ref[:, :, 0], red, atol=1e-6)
    cv2.imwrite(str(tmp_path / "a.png"), cv2.cvtColor(bgr, cv2.COLOR_BGR2BGRA))
    cv2.imwrite(str(tmp_path / "d.png"), bgr.astype(np.uint16) * 257)
    for name in ("a.png", "d.png"):
        out, _ = fit_geometry(read_image(tmp_path / name), g)
        np.testing.assert_allclose(out, ref, atol=2.5 / 255)  # 16-bit resizes without uint8 rounding
    gray = cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY)
    out, _ = fit_geometry(gray, g)
    assert np.array_equal(out[:, :, 0], out[:, :, 1]) and np.array_equal(out[:, :, 1], out[:, :, 2])


def test_dark_16_bit_frame_is_not_stretched_to_full_range():
    dark = np.full((64, 64), 1000, dtype=np.uint16)  # about 1.5 % of full scale
    out, _ = fit_geometry(dark, Geometry(height=32, width=32))
    assert out.max() == pytest.approx(1000 / 65535, rel=1e-5)


@pytest.mark.parametrize("mode", ["stretch", "letterbox", "crop"])
def test_placement_maps_back_onto_the_original(mode):
    bgr = read_image(IMAGE)
    g = Geometry(mode=mode, height=224, width=224, resize=256)
    _, placement = fit_geometry(bgr, g)
    net_map = np.zeros((224, 224), np.float32)
    net_map[:, :112] = 1.0  # left half of the network input is "hot"
    full = placement.to_original(net_map)
    assert full.shape == (460, 1130)
    seen = placement.seen_mask()
    assert np.array_equal(np.isfinite(full), seen)
    if mode == "crop":
        # 1130x460 -> 629x256 -> centre 224 crop: only the middle ~40 % of the width is seen.
        assert 0.3 < seen.mean() < 0.45
        assert np.isnan(full[:, 0]).all() and np.isnan(full[:, -1]).all()
    else:
        assert seen.all()
        assert full[230, 10] == pytest.approx(1.0) and full[230, 1120] == pytest.approx(0.0)


def test_letterbox_keeps_aspect_and_pads():
    bgr = read_image(IMAGE)
    out, placement = fit_geometry(bgr, Geometry(mode="letterbox", height=224, width=224, pad_value=0.5))
    assert placement.inner_w == 224 and placement.inner_h == round(460 * 224 / 1130)
    assert np.allclose(out[0], 0.5) and np.allclose(out[-1], 0.5)


def test_bad_files_and_geometry(tmp_path):
    (tmp_path / "x.png").write_text("hello")
    with pytest.raises(ImageError, match="x.png: not a readable image"):
        read_image(tmp_path / "x.png")
    with pytest.raises(ImageError, match="no such file"):
        read_image(tmp_path / "absent.png")
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(ImageError, match="empty file"):
        read_image(tmp_path / "empty.png")
    with pytest.raises(ValueError, match="multiple of 16"):
        check_geometry(Geometry(height=200, width=224))
    with pytest.raises(ValueError, match="mode"):
        check_geometry(Geometry(mode="zoom"))


@pytest.mark.parametrize("width, height", [(1130, 460), (460, 1130), (1260, 500), (641, 640), (300, 257), (256, 256)])
def test_crop_geometry_is_torchvisions_to_the_pixel(width, height):
    """Resize(256) + CenterCrop(224) in torchvision and in fit_geometry pick the same source pixels.

    A frame whose every pixel holds its own column (and row) index, nearest-neighbour resizing in torchvision:
    the crop's first row and column index the same source row and column as our placement's origin says.
    """
    import torch
    from torchvision.transforms import v2

    resized = v2.Resize(256, interpolation=v2.InterpolationMode.NEAREST)(torch.zeros(1, height, width))
    assert crop_resize_size(width, height, 256) == (resized.shape[2], resized.shape[1])
    rows = torch.arange(resized.shape[1], dtype=torch.float32)[:, None].expand(resized.shape[1:])
    cols = torch.arange(resized.shape[2], dtype=torch.float32)[None, :].expand(resized.shape[1:])
    cropped = v2.CenterCrop(224)(torch.stack([rows, cols]))
    top, left = int(cropped[0, 0, 0]), int(cropped[1, 0, 0])
    frame = np.zeros((height, width, 3), np.uint8)
    _, placement = fit_geometry(frame, Geometry(mode="crop", height=224, width=224, resize=256))
    rw, rh = resized.shape[2], resized.shape[1]
    assert placement.x0 == pytest.approx(left * width / rw) and placement.y0 == pytest.approx(top * height / rh)
