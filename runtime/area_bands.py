"""OpenCV INTER_AREA shrinks split into bands that are resized independently, bit-identical to one call.

OpenCV's area resize (``imgproc/src/resize.cpp``: ``computeResizeAreaTab`` and ``ResizeArea_Invoker``,
the same code in 4.x and 5.x) builds, per axis, a table of ``(output index, source index, weight)`` from
the sizes alone, and computes every output row from those tables in a fixed order; rows do not depend on
each other. So a band of output rows ``[d0, d1)`` resized from the source rows ``[s0, s1)`` gives exactly
the full call's rows whenever the band's own table is the full table's slice shifted by ``(d0, s0)``:
same source rows, same float32 weights, same order. That needs ``d0 * src / dst`` to be a whole source row
(``s0``) -- the band has the same scale as the whole -- and the double-precision positions OpenCV computes
for the band to round to the same weights, which :func:`plan_area_bands` checks by computing both tables
as OpenCV does (a few hundred entries, once per frame size). Sizes with no such boundary get no split.

Only the area path (both scales >= 1) is split; an enlarging axis goes through OpenCV's bilinear code,
whose tables are not checked here. tests/test_area_bands.py compares banded and whole resizes bit for bit
over many sizes, scales, geometries and dtypes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class AreaBand:
    """Output rows (``axis`` 0) or columns (``axis`` 1) ``[dst_start, dst_stop)``, resized from the source's
    ``[src_start, src_stop)`` along the same axis (the other axis whole)."""

    axis: int
    src_start: int
    src_stop: int
    dst_start: int
    dst_stop: int


def area_table(ssize: int, dsize: int) -> list[tuple[int, int, float]]:
    """OpenCV's ``computeResizeAreaTab`` for one axis (one channel): ``(dst, src, float32 weight)`` entries.

    Written as OpenCV computes it, in doubles (``scale = 1 / (dsize / ssize)`` as ``cv::resize`` derives
    it), weights rounded to float32 as OpenCV stores them.
    """
    scale = 1.0 / (dsize / ssize)
    table: list[tuple[int, int, float]] = []
    for dx in range(dsize):
        fsx1 = dx * scale
        fsx2 = fsx1 + scale
        cell = min(scale, ssize - fsx1)
        sx1, sx2 = math.ceil(fsx1), math.floor(fsx2)
        sx2 = min(sx2, ssize - 1)
        sx1 = min(sx1, sx2)
        if sx1 - fsx1 > 1e-3:
            table.append((dx, sx1 - 1, float(np.float32((sx1 - fsx1) / cell))))
        for sx in range(sx1, sx2):
            table.append((dx, sx, float(np.float32(1.0 / cell))))
        if fsx2 - sx2 > 1e-3:
            table.append((dx, sx2, float(np.float32(min(min(fsx2 - sx2, 1.0), cell) / cell))))
    return table


def _aligned_boundaries(ssize: int, dsize: int, bands: int) -> list[tuple[int, int]]:
    """``(dst, src)`` inner boundaries nearest to an even split where ``dst * ssize / dsize`` is whole."""
    unit = dsize // math.gcd(ssize, dsize)  # dst boundaries that land on a whole source row: multiples of unit
    chosen: list[int] = []
    for i in range(1, bands):
        d = int(round(i * dsize / bands / unit)) * unit
        if 0 < d < dsize and (not chosen or d > chosen[-1]):
            chosen.append(d)
    return [(d, d * ssize // dsize) for d in chosen]


def _axis_bands(ssize: int, dsize: int, bands: int, axis: int) -> tuple[AreaBand, ...]:
    """Bands along one axis whose tables are the full table's slices; () if there is none."""
    inner = _aligned_boundaries(ssize, dsize, bands)
    if not inner:
        return ()
    edges = [(0, 0), *inner, (dsize, ssize)]
    full = area_table(ssize, dsize)
    out = []
    for (d0, s0), (d1, s1) in zip(edges, edges[1:]):
        want = [(di - d0, si - s0, w) for di, si, w in full if d0 <= di < d1]
        if area_table(s1 - s0, d1 - d0) != want:
            return ()  # a weight rounds differently in the band: not bit-identical, no split
        out.append(AreaBand(axis, s0, s1, d0, d1))
    return tuple(out)


def plan_area_bands(src_h: int, src_w: int, dst_h: int, dst_w: int, bands: int) -> tuple[AreaBand, ...]:
    """Up to ``bands`` bands (rows preferred: contiguous memory) for an INTER_AREA shrink ``src -> dst``.

    Returns () when the resize is not on the area path (an axis enlarges), ``bands < 2``, or no boundary
    is bit-exact along either axis; the caller then resizes in one call.
    """
    if bands < 2 or dst_h > src_h or dst_w > src_w or dst_h < 1 or dst_w < 1:
        return ()
    return _axis_bands(src_h, dst_h, bands, 0) or _axis_bands(src_w, dst_w, bands, 1)
