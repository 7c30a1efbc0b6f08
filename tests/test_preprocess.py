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


def _previous_fit_geometry(image: np.ndarray, g: Geometry) -> np.ndarray:
    """The network input as it was computed before InputBuffers (fe4377b): resize in the native dtype, a
    float RGB copy of the resized frame (to_rgb_float), letterbox padding around it, crop as a slice."""
    from pcedge.runtime.preprocess import crop_resize_size, to_rgb_float

    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    if image.dtype == np.float64:
        image = image.astype(np.float32)

    def resize(im, w, h):
        shrinking = w < im.shape[1] or h < im.shape[0]
        return cv2.resize(im, (w, h), interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR)

    h, w = image.shape[:2]
    if g.mode == "stretch":
        return to_rgb_float(resize(image, g.width, g.height))
    if g.mode == "letterbox":
        scale = min(g.width / w, g.height / h)
        iw, ih = max(1, min(g.width, int(round(w * scale)))), max(1, min(g.height, int(round(h * scale))))
        top, left = (g.height - ih) // 2, (g.width - iw) // 2
        out = np.full((g.height, g.width, 3), g.pad_value, dtype=np.float32)
        out[top : top + ih, left : left + iw] = to_rgb_float(resize(image, iw, ih))
        return out
    rw, rh = crop_resize_size(w, h, g.resize)
    rw, rh = max(g.width, rw), max(g.height, rh)
    resized = resize(image, rw, rh)
    top, left = int(round((rh - g.height) / 2.0)), int(round((rw - g.width) / 2.0))
    return to_rgb_float(np.ascontiguousarray(resized[top : top + g.height, left : left + g.width]))


def _pixel_formats(bgr: np.ndarray) -> dict[str, np.ndarray]:
    """The real photo in every pixel format a camera or a file gives (OpenCV convention)."""
    gray = cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY)
    wide = bgr.astype(np.float64) / 255.0
    wide[0, 0] = (1.5, -0.25, 0.5)  # out of range: float frames are clipped to [0, 1]
    return {
        "bgr-u8": bgr, "bgra-u8": cv2.cvtColor(bgr, cv2.COLOR_BGR2BGRA), "gray-u8": gray,
        "gray-u8-1ch": gray[:, :, None], "bgr-u16": bgr.astype(np.uint16) * 257 + 3,
        "gray-u16": gray.astype(np.uint16) * 250, "bgr-f32": wide.astype(np.float32), "bgr-f64": wide,
    }


@pytest.mark.parametrize("mode", ["stretch", "letterbox", "crop"])
@pytest.mark.parametrize("size", [(460, 1130), (96, 150), (300, 200)])  # the photo, enlarged and portrait
def test_reused_buffers_give_exactly_the_previous_pixels(mode, size):
    """InputBuffers (resize in the native dtype, one conversion pass into a reused [B, 3, H, W]) must give
    bit-identical network inputs to the previous to_rgb_float + to_tensor path: the exporter and every
    bundle already exported saw those pixels."""
    from pcedge.runtime.preprocess import InputBuffers, to_tensor

    bgr = cv2.resize(read_image(IMAGE), (size[1], size[0]), interpolation=cv2.INTER_AREA)
    g = Geometry(mode=mode, height=224, width=160, resize=256)
    buffers = InputBuffers(g)
    for name, frame in _pixel_formats(bgr).items():
        expected = to_tensor([_previous_fit_geometry(frame, g)])
        tensor, placements = buffers.prepare([frame])
        assert tensor.shape == (1, 3, 224, 160) and tensor.dtype == np.float32 and tensor.flags.c_contiguous
        assert np.array_equal(tensor, expected), f"{mode} {size} {name}: pixels differ from the previous path"
        fitted, placement = fit_geometry(frame, g)  # the exporter's entry point: the same pixels, [H, W, 3]
        assert np.array_equal(to_tensor([fitted]), expected) and placement == placements[0]


def test_input_buffers_are_reused_and_batches_keep_their_order():
    from pcedge.runtime.preprocess import InputBuffers, to_tensor

    bgr = read_image(IMAGE)
    frames = [bgr, cv2.flip(bgr, 1), cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY)]
    g = Geometry(height=224, width=224)
    buffers = InputBuffers(g)
    first, _ = buffers.prepare(frames)
    expected = to_tensor([fit_geometry(f, g)[0] for f in frames])
    assert np.array_equal(first, expected)
    again, _ = buffers.prepare(frames[::-1])
    assert again is first  # the same memory, overwritten
    assert np.array_equal(again, expected[::-1])
    single, _ = buffers.prepare(frames[:1])
    assert single.shape == (1, 3, 224, 224) and np.array_equal(single[0], expected[0])
    with pytest.raises(ImageError, match="cam0: unsupported pixel type int32"):
        buffers.prepare([bgr.astype(np.int32)], ["cam0"])
