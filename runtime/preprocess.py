"""Decoding and geometry: file -> decoded array -> network input ``[B, 3, H, W]`` float32 RGB in [0, 1].

OpenCV and numpy only. Arrays follow OpenCV's convention (what ``cv2.imread`` and ``cv2.VideoCapture``
give): gray ``[H, W]``, BGR ``[H, W, 3]`` or BGRA ``[H, W, 4]``; uint8, uint16, or float in [0, 1]. The frame is
resized in its native dtype first and converted to float RGB afterwards, in one pass straight into the
network input (:class:`InputBuffers` reuses that memory from frame to frame), so the per-pixel work happens
on the small image. The exporter uses these same functions, so training and inference see identical pixels. The inverse
(:meth:`Placement.to_original`) puts an anomaly map computed on the network input back into the original
image's coordinates, marking pixels the network never saw as NaN.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from .area_bands import AreaBand, plan_area_bands
from .bundle import Geometry
from .core_split import CoreSplit

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".pgm", ".ppm", ".pnm")


class ImageError(ValueError):
    """An input image that cannot be used; the message names the file and what is wrong."""


def to_rgb_float(image: np.ndarray, source: str = "<array>") -> np.ndarray:
    """Any OpenCV-decoded array (BGR/BGRA/gray, uint8/uint16/float) -> float32 RGB ``[H, W, 3]`` in [0, 1].

    The pixel scale comes from the dtype (uint8: /255, uint16: /65535), never from the image's maximum,
    so a dark frame stays dark. Alpha is dropped (the camera's colour is what matters, not transparency).
    """
    if image is None or not isinstance(image, np.ndarray) or image.size == 0:
        raise ImageError(f"{source}: empty or undecodable image")
    if image.dtype == np.uint8:
        scale = 1.0 / 255.0
    elif image.dtype == np.uint16:
        scale = 1.0 / 65535.0
    elif image.dtype in (np.float32, np.float64):
        scale = 1.0
    else:
        raise ImageError(f"{source}: unsupported pixel type {image.dtype}")
    if image.ndim == 2:
        image = cv2.cvtColor(image, cv2.COLOR_GRAY2RGB)
    elif image.ndim == 3 and image.shape[2] == 1:
        image = cv2.cvtColor(image[:, :, 0], cv2.COLOR_GRAY2RGB)
    elif image.ndim == 3 and image.shape[2] == 3:
        image = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    elif image.ndim == 3 and image.shape[2] == 4:
        image = cv2.cvtColor(image, cv2.COLOR_BGRA2RGB)
    else:
        raise ImageError(f"{source}: unsupported image shape {list(image.shape)}")
    out = image.astype(np.float32) * np.float32(scale)
    return np.clip(out, 0.0, 1.0, out=out)


def read_image(path: str | os.PathLike[str]) -> np.ndarray:
    """Decode a file as OpenCV does (gray, BGR or BGRA; uint8 or uint16), unchanged in size.

    :class:`ImageError` names the file if it cannot be read.
    """
    path = str(path)
    if not os.path.isfile(path):
        raise ImageError(f"{path}: {_why_not_a_file(path)}")
    try:
        data = np.fromfile(path, dtype=np.uint8)  # fromfile + imdecode also handles non-ASCII paths
    except OSError as exc:  # permission denied, I/O error: this image is bad, the run goes on
        raise ImageError(f"{path}: cannot be read ({exc.strerror or exc})") from exc
    if data.size == 0:
        raise ImageError(f"{path}: empty file")
    image = cv2.imdecode(data, cv2.IMREAD_UNCHANGED | cv2.IMREAD_IGNORE_ORIENTATION)
    if image is None:
        raise ImageError(f"{path}: not a readable image (corrupt, truncated or not an image format OpenCV decodes)")
    check_frame(image, path)
    return image


def _why_not_a_file(path: str) -> str:
    """Why ``path`` is not a readable regular file, in words (a symlink loop is not "no such file")."""
    try:
        os.stat(path)
    except OSError as exc:
        if os.path.islink(path):
            if exc.errno == errno.ELOOP:
                return "symlink loop (the link points back to itself); not readable"
            if exc.errno == errno.ENOENT:
                return f"broken symlink (its target {os.readlink(path)!r} does not exist)"
        if exc.errno == errno.ENOENT:
            return "no such file"
        return f"cannot be read ({exc.strerror or exc})"
    if os.path.isdir(path):
        try:
            os.listdir(path)
        except OSError as exc:
            return f"folder cannot be listed ({exc.strerror or exc}); its images were not read"
        return "a folder, not an image file"
    return "not a regular file"


def check_frame(image: np.ndarray, source: str = "<array>") -> None:
    """Raise :class:`ImageError` unless ``image`` is a usable OpenCV-convention frame.

    Float frames must be finite: a NaN patch would give a NaN score, and ``NaN > threshold`` is False,
    so the image would be judged good.
    """
    if not isinstance(image, np.ndarray) or image.size == 0:
        raise ImageError(f"{source}: empty or undecodable image")
    if image.dtype not in (np.uint8, np.uint16, np.float32, np.float64):
        raise ImageError(f"{source}: unsupported pixel type {image.dtype}")
    if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (1, 3, 4)):
        raise ImageError(f"{source}: unsupported image shape {list(image.shape)} (expected gray, BGR or BGRA)")
    if image.dtype.kind == "f":
        finite = np.isfinite(image)
        if not finite.all():
            bad = int(finite.size - np.count_nonzero(finite))
            raise ImageError(f"{source}: {bad} non-finite pixel value(s) (NaN or inf); refused, it cannot be scored")


def list_images(folder: str | os.PathLike[str]) -> list[Path]:
    """Image files directly inside ``folder`` (by suffix), sorted by name.

    A symlink with an image suffix that does not lead to a file (a loop, a missing target) is listed too,
    so that reading it reports it like any other unreadable image instead of it vanishing silently.
    """
    folder = Path(folder)
    return sorted(p for p in folder.iterdir()
                  if p.suffix.lower() in IMAGE_SUFFIXES and (p.is_file() or p.is_symlink()))


@dataclass(frozen=True)
class Placement:
    """Where the network input sits in the original image.

    The network input (``net_h x net_w``) shows the original region ``[y0:y1, x0:x1]`` (in original pixel
    coordinates, possibly fractional), drawn into the input rectangle ``[top:top+inner_h, left:left+inner_w]``
    (letterbox padding outside it).
    """

    orig_h: int
    orig_w: int
    net_h: int
    net_w: int
    # region of the original image that is visible, in original pixels
    x0: float
    y0: float
    x1: float
    y1: float
    # where that region lands in the network input
    top: int
    left: int
    inner_h: int
    inner_w: int

    def to_original(self, net_map: np.ndarray) -> np.ndarray:
        """``[net_h, net_w]`` float32 map -> ``[orig_h, orig_w]`` float32; pixels the network did not see are NaN."""
        inner = net_map[self.top : self.top + self.inner_h, self.left : self.left + self.inner_w]
        ix0, iy0 = int(round(self.x0)), int(round(self.y0))
        ix1, iy1 = int(round(self.x1)), int(round(self.y1))
        ix0, iy0 = max(ix0, 0), max(iy0, 0)
        ix1, iy1 = min(ix1, self.orig_w), min(iy1, self.orig_h)
        out = np.empty((self.orig_h, self.orig_w), dtype=np.float32)
        if (ix0, iy0, ix1, iy1) != (0, 0, self.orig_w, self.orig_h):
            out.fill(np.nan)  # crop: the network did not see the margins
        if ix1 > ix0 and iy1 > iy0:
            # Resized straight into the frame-sized map: no frame-sized temporary and copy (the map of a
            # 1130x460 frame is 2 MB; this halves the placement's time).
            target = out[iy0:iy1, ix0:ix1]
            placed = cv2.resize(np.ascontiguousarray(inner, dtype=np.float32), (ix1 - ix0, iy1 - iy0), dst=target,
                                interpolation=cv2.INTER_LINEAR)
            if placed is not target:  # OpenCV allocated instead of writing into the view
                target[...] = placed
        return out

    def seen_mask(self) -> np.ndarray:
        """``[orig_h, orig_w]`` bool: True where the network saw the original image."""
        mask = np.zeros((self.orig_h, self.orig_w), dtype=bool)
        ix0, iy0 = max(int(round(self.x0)), 0), max(int(round(self.y0)), 0)
        ix1, iy1 = min(int(round(self.x1)), self.orig_w), min(int(round(self.y1)), self.orig_h)
        mask[iy0:iy1, ix0:ix1] = True
        return mask


def _resize(image: np.ndarray, width: int, height: int, buffer: "_ResizeBuffer | None" = None,
            split: CoreSplit | None = None) -> np.ndarray:
    # INTER_AREA when shrinking (anti-aliased, like a camera's binning), bilinear when enlarging.
    shrinking = width < image.shape[1] or height < image.shape[0]
    interpolation = cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR
    bands = ()
    if split is not None and shrinking and image.shape[0] * image.shape[1] >= MIN_SPLIT_SOURCE_PIXELS:
        plans = buffer or _ResizeBuffer()
        bands = plans.bands(image.shape[0], image.shape[1], height, width, split.threads)
    if not bands:
        if buffer is None:
            return cv2.resize(image, (width, height), interpolation=interpolation)
        dst = buffer.get((height, width, *image.shape[2:]), image.dtype)
        return cv2.resize(image, (width, height), dst=dst, interpolation=interpolation)
    shape = (height, width, *image.shape[2:])
    dst = buffer.get(shape, image.dtype) if buffer is not None else np.empty(shape, dtype=image.dtype)
    split.map(lambda band: _resize_band(image, dst, band), bands)
    return dst


#: Frames smaller than this (source pixels) are resized in one call even when a split is offered: the
#: hand-off to a helper thread would eat the saving. Measured (benchmarks/bench_core_split.py, results/
#: core_split.json, shrink of a uint8 BGR frame to 224x224, median of 5 rounds, quiet machine): 1130x460
#: 1.45 -> 0.80 ms, 565x230 0.57 -> 0.38, 336x252 (85k pixels) 0.36 -> 0.26: still a gain at 85k; in an
#: earlier run with another job on the second core, never more than ~0.07 ms lost. Below 64k pixels the
#: whole resize is ~0.2 ms.
MIN_SPLIT_SOURCE_PIXELS = 64 * 1024


def _resize_band(image: np.ndarray, dst: np.ndarray, band: AreaBand) -> None:
    """INTER_AREA-resize one band of ``image`` into its rows (or columns) of ``dst`` (see runtime/area_bands.py)."""
    if band.axis == 0:
        source, target = image[band.src_start : band.src_stop], dst[band.dst_start : band.dst_stop]
    else:
        source, target = image[:, band.src_start : band.src_stop], dst[:, band.dst_start : band.dst_stop]
    placed = cv2.resize(source, (target.shape[1], target.shape[0]), dst=target, interpolation=cv2.INTER_AREA)
    if placed is not target:  # a column band's view is not contiguous: OpenCV allocated instead
        target[...] = placed


def crop_resize_size(width: int, height: int, resize: int) -> tuple[int, int]:
    """``(width, height)`` after torchvision's ``Resize(resize)``: shorter side ``resize``, longer truncated."""
    if width <= height:
        return resize, int(resize * height / width)
    return int(resize * width / height), resize


def fit_geometry(image: np.ndarray, geometry: Geometry, source: str = "<array>") -> tuple[np.ndarray, Placement]:
    """OpenCV-convention frame ``[h, w(, c)]`` -> float32 RGB ``[H, W, 3]`` in [0, 1] and its :class:`Placement`.

    The same pixels as :class:`InputBuffers` writes into the network input (it is computed by the same
    code, :func:`fit_geometry_into`), laid out channel-last for the exporter and for display.
    """
    planes = np.empty((3, geometry.height, geometry.width), dtype=np.float32)
    placement = fit_geometry_into(image, geometry, planes, source)
    return np.ascontiguousarray(planes.transpose(1, 2, 0)), placement  # contiguous, as OpenCV and torch expect


def fit_geometry_into(image: np.ndarray, geometry: Geometry, out: np.ndarray, source: str = "<array>",
                      resize_buffer: "_ResizeBuffer | None" = None, split: CoreSplit | None = None) -> Placement:
    """Write one frame's network input into ``out`` ``[3, H, W]`` float32 (RGB, [0, 1]); return its placement.

    The frame is resized in its native dtype (uint8 stays uint8) and then converted once, channel by
    channel, straight into ``out``: the BGR -> RGB order, the gray -> RGB copy and the dtype's scale
    happen in that one pass, with no float copy of the frame in between. ``resize_buffer`` (optional)
    reuses the resized frame's memory across calls; ``split`` (optional) resizes a large frame's
    INTER_AREA shrink in bands on its threads, bit-identical to one call (runtime/area_bands.py).
    """
    check_frame(image, source)
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    if image.dtype == np.float64:
        image = image.astype(np.float32)
    h, w = image.shape[:2]
    H, W = geometry.height, geometry.width
    if out.shape != (3, H, W) or out.dtype != np.float32:
        raise ValueError(f"network input buffer is {list(out.shape)} {out.dtype}, expected [3, {H}, {W}] float32")
    if geometry.mode == "stretch":
        _to_rgb_planes(_resize(image, W, H, resize_buffer, split), out, source)
        return Placement(h, w, H, W, 0.0, 0.0, float(w), float(h), 0, 0, H, W)
    if geometry.mode == "letterbox":
        scale = min(W / w, H / h)
        inner_w = max(1, min(W, int(round(w * scale))))
        inner_h = max(1, min(H, int(round(h * scale))))
        top, left = (H - inner_h) // 2, (W - inner_w) // 2
        out[...] = np.float32(geometry.pad_value)
        inner = out[:, top : top + inner_h, left : left + inner_w]
        _to_rgb_planes(_resize(image, inner_w, inner_h, resize_buffer, split), inner, source)
        return Placement(h, w, H, W, 0.0, 0.0, float(w), float(h), top, left, inner_h, inner_w)
    if geometry.mode == "crop":
        # torchvision's Resize(int) + CenterCrop, to the pixel: the shorter side becomes `resize` and the
        # longer one int(resize * long / short) (truncated); the crop starts at round((side - crop) / 2)
        # (Python's round, half to even, as CenterCrop computes it).
        rw, rh = crop_resize_size(w, h, geometry.resize)
        rw, rh = max(W, rw), max(H, rh)
        resized = _resize(image, rw, rh, resize_buffer, split)
        top, left = int(round((rh - H) / 2.0)), int(round((rw - W) / 2.0))
        _to_rgb_planes(resized[top : top + H, left : left + W], out, source)
        sx, sy = w / rw, h / rh
        return Placement(h, w, H, W, left * sx, top * sy, (left + W) * sx, (top + H) * sy, 0, 0, H, W)
    raise ValueError(f"unknown geometry mode {geometry.mode!r} (expected stretch, letterbox or crop)")


def _to_rgb_planes(image: np.ndarray, out: np.ndarray, source: str) -> None:
    """Resized frame ``[h, w(, c)]`` (gray/BGR/BGRA; uint8/uint16/float32) -> ``out`` ``[3, h, w]`` RGB in [0, 1].

    Pixel for pixel what :func:`to_rgb_float` computes (tests/test_preprocess.py checks equality): the
    colour conversions are pure channel copies, and ``float32(x) * float32(scale)`` is the same product
    whether numpy casts the whole frame first or each channel on the way into ``out``.
    """
    scale = _PIXEL_SCALE.get(image.dtype)
    if scale is None:
        raise ImageError(f"{source}: unsupported pixel type {image.dtype}")
    if image.ndim == 2:
        channels = (image, image, image)
    elif image.ndim == 3 and image.shape[2] in (3, 4):
        channels = (image[:, :, 2], image[:, :, 1], image[:, :, 0])  # BGR(A) -> RGB, alpha dropped
    else:
        raise ImageError(f"{source}: unsupported image shape {list(image.shape)}")
    for plane, channel in zip(out, channels):
        np.multiply(channel, scale, out=plane)
    if image.dtype.kind == "f":
        # Integer pixels times their dtype's scale never leave [0, 1] (checked for every uint8 and uint16
        # value); float frames may, and are clipped as to_rgb_float does.
        np.clip(out, 0.0, 1.0, out=out)


#: Pixel scale per dtype: from the dtype, never from the image's maximum, so a dark frame stays dark.
_PIXEL_SCALE = {np.dtype(np.uint8): np.float32(1.0 / 255.0), np.dtype(np.uint16): np.float32(1.0 / 65535.0),
                np.dtype(np.float32): np.float32(1.0)}


class _ResizeBuffer:
    """The last resized frame's memory, reused while the shape and dtype stay the same (a camera's frames),
    and the band plan for the last frame size (planning checks OpenCV's tables: ~1 ms, once per size)."""

    def __init__(self) -> None:
        self.array: np.ndarray | None = None
        self._plan_key: tuple[int, ...] | None = None
        self._plan: tuple[AreaBand, ...] = ()

    def bands(self, src_h: int, src_w: int, dst_h: int, dst_w: int, bands: int) -> tuple[AreaBand, ...]:
        key = (src_h, src_w, dst_h, dst_w, bands)
        if key != self._plan_key:
            self._plan, self._plan_key = plan_area_bands(src_h, src_w, dst_h, dst_w, bands), key
        return self._plan

    def get(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        if self.array is None or self.array.shape != shape or self.array.dtype != dtype:
            self.array = np.empty(shape, dtype=dtype)
        return self.array


class InputBuffers:
    """Frames -> network input ``[B, 3, H, W]`` float32, written into memory reused from call to call.

    One instance per thread that prepares inputs (the returned tensor is overwritten by the next call).
    The pixels are :func:`fit_geometry`'s exactly, which is what the exporter saw. ``split`` (optional, not
    owned: its creator closes it) shrinks large frames in bands on its threads -- for a caller that owns
    the machine (the single-stream detector); the watch pipeline's backbone thread passes none.
    """

    def __init__(self, geometry: Geometry, split: CoreSplit | None = None):
        self.geometry = geometry
        self.split = split
        self._tensor: np.ndarray | None = None  # [B, 3, H, W] float32
        self._resized = _ResizeBuffer()

    def prepare(self, frames: list[np.ndarray], sources: list[str | None] | None = None
                ) -> tuple[np.ndarray, list[Placement]]:
        """OpenCV-convention frames -> (network input ``[B, 3, H, W]``, valid until the next call; placements)."""
        g = self.geometry
        shape = (len(frames), 3, g.height, g.width)
        if self._tensor is None or self._tensor.shape != shape:
            self._tensor = np.empty(shape, dtype=np.float32)
        sources = sources or [None] * len(frames)
        placements = [fit_geometry_into(frame, g, self._tensor[b], source or "<array>", self._resized,
                                        self.split)
                      for b, (frame, source) in enumerate(zip(frames, sources))]
        return self._tensor, placements


def check_geometry(geometry: Geometry, multiple: int = 16) -> None:
    """The backbone's stride-16 tap needs input sides that are multiples of 16."""
    if geometry.mode not in ("stretch", "letterbox", "crop"):
        raise ValueError(f"geometry mode {geometry.mode!r}: expected stretch, letterbox or crop")
    for name, value in (("height", geometry.height), ("width", geometry.width)):
        if value <= 0 or value % multiple:
            raise ValueError(f"input {name} {value} must be a positive multiple of {multiple}")
    if geometry.mode == "crop" and geometry.resize < max(geometry.height, geometry.width):
        raise ValueError(f"resize {geometry.resize} is smaller than the crop {geometry.height}x{geometry.width}")


def to_tensor(images: list[np.ndarray]) -> np.ndarray:
    """List of float32 RGB ``[H, W, 3]`` -> contiguous float32 ``[B, 3, H, W]``."""
    return np.ascontiguousarray(np.stack(images).transpose(0, 3, 1, 2), dtype=np.float32)


def prepare(images: list[np.ndarray], geometry: Geometry) -> tuple[np.ndarray, list[Placement]]:
    """OpenCV-convention frames -> network batch ``[B, 3, H, W]`` and one placement per image."""
    fitted = [fit_geometry(image, geometry) for image in images]
    return to_tensor([f[0] for f in fitted]), [f[1] for f in fitted]


def load_batch(paths: list[str | os.PathLike[str]], geometry: Geometry) -> tuple[np.ndarray, list[Placement]]:
    """Files -> network batch ``[B, 3, H, W]`` and placements (raises :class:`ImageError` on a bad file)."""
    fitted = [fit_geometry(read_image(p), geometry, str(p)) for p in paths]
    return to_tensor([f[0] for f in fitted]), [f[1] for f in fitted]
