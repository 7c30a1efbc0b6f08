"""Overlays a person can read: the anomaly map as a heat map on the frame, the outline of what is above
the threshold, the score and the verdict (OpenCV drawing only)."""

from __future__ import annotations

import cv2
import numpy as np

from .preprocess import to_rgb_float

GOOD_BGR = (60, 180, 60)
BAD_BGR = (40, 40, 230)
UNSEEN_BGR = (90, 90, 90)


def to_bgr_uint8(frame: np.ndarray) -> np.ndarray:
    """Any OpenCV-convention frame (gray/BGR/BGRA, uint8/uint16/float) -> BGR uint8 for drawing."""
    if frame.dtype == np.uint8 and frame.ndim == 3 and frame.shape[2] == 3:
        return frame.copy()
    rgb = to_rgb_float(frame.astype(np.float32) if frame.dtype == np.float64 else frame)
    return cv2.cvtColor((rgb * 255.0 + 0.5).astype(np.uint8), cv2.COLOR_RGB2BGR)


def render_overlay(frame: np.ndarray, result, normalised_map: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """``frame`` [H, W(, C)] and the map on the normalised scale [H, W] (threshold = 0.5, NaN = unseen)
    -> BGR uint8 [H, W, 3] with heat map, threshold outline, and score/verdict text."""
    canvas = to_bgr_uint8(frame)
    seen = np.isfinite(normalised_map)
    heat_values = np.where(seen, np.clip(normalised_map, 0.0, 1.0), 0.0)
    heat = cv2.applyColorMap((heat_values * 255).astype(np.uint8), cv2.COLORMAP_JET)
    blended = cv2.addWeighted(canvas, 1.0 - alpha, heat, alpha, 0.0)
    canvas = np.where(seen[:, :, None], blended, canvas)
    if not seen.all():
        # Regions the model never saw (e.g. outside a centre crop) are hatched grey, not shown as "good".
        hatch = np.zeros(seen.shape, dtype=bool)
        yy, xx = np.indices(seen.shape)
        hatch[((xx + yy) // 6) % 4 == 0] = True
        canvas[~seen & hatch] = UNSEEN_BGR
    above = (seen & (normalised_map > 0.5)).astype(np.uint8)
    contours, _ = cv2.findContours(above, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    thickness = max(1, round(max(canvas.shape[:2]) / 300))
    cv2.drawContours(canvas, contours, -1, (255, 255, 255), thickness + 1)
    cv2.drawContours(canvas, contours, -1, BAD_BGR, thickness)
    colour = BAD_BGR if result.anomalous else GOOD_BGR
    text = f"{result.verdict.upper()}  score {result.score:.3f}  ({result.normalised:.2f})"
    scale = max(0.4, canvas.shape[1] / 900)
    (tw, th), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, thickness)
    cv2.rectangle(canvas, (0, 0), (tw + 12, th + base + 12), (0, 0, 0), -1)
    cv2.putText(canvas, text, (6, th + 6), cv2.FONT_HERSHEY_SIMPLEX, scale, colour, thickness, cv2.LINE_AA)
    return canvas


def write_image(path, image: np.ndarray) -> None:
    """Write with a temporary name, then rename (no half-written overlays)."""
    import os
    from pathlib import Path

    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    ok, data = cv2.imencode(path.suffix or ".png", image)
    if not ok:
        raise ValueError(f"{path}: OpenCV could not encode an image with suffix {path.suffix!r}")
    data.tofile(str(tmp))
    os.replace(tmp, path)
