"""Structural validation of an hnswlib index file before hnswlib (native code) reads it.

hnswlib's ``loadIndex`` trusts the file: neighbour ids are used as array offsets, list counts as loop
bounds, element levels as offsets into per-element link blocks. A file with a neighbour id of 0x7ffffff0
and a recomputed sha256 makes the process die with SIGSEGV on the first query. Checksums catch accidents,
not intent, so the runtime validates the whole structure here, in numpy, against the memory bank (the
source of truth), and only hands a file that passes to hnswlib.

Layout (hnswlib 0.8 ``HierarchicalNSW::saveIndex``/``loadIndex`` in ``hnswalg.h``), little-endian:

- header: ``offsetLevel0_, max_elements_, cur_element_count, size_data_per_element_, label_offset_,
  offsetData_`` (size_t), ``maxlevel_`` (int), ``enterpoint_node_`` (uint32), ``maxM_, maxM0_, M_``
  (size_t), ``mult_`` (double), ``ef_construction_`` (size_t);
- level 0, ``cur_element_count`` records of ``size_data_per_element_`` bytes each: a uint32 whose low 16
  bits are the neighbour count and whose third byte carries the deleted mark, ``maxM0_`` uint32 neighbour
  ids, the vector (``dim`` float32 at ``offsetData_``), the label (uint64 at ``label_offset_``);
- per element: a uint32 ``linkListSize`` then that many bytes: ``level`` blocks of
  ``maxM_ * 4 + 4`` bytes (count + ``maxM_`` ids) for levels 1..level.

Checked: every header field against the values hnswlib itself derives (``offsetData_ = maxM0_*4+4``,
``maxM0_ = 2*M_``, ...), the file length, every count against its maximum, every id < the element count,
every upper-level neighbour present on that level, the entry point on the top level, no deleted marks,
the labels a permutation of ``0..N-1`` and every stored vector equal to its bank row.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .manifest_schema import MAX_HNSW_M as MAX_M  # a larger M is no memory-bank graph (and huge records)

HEADER = struct.Struct("<QQQQQQiIQQQdQ")
_DELETE_MARK = 0x01


class HnswFormatError(ValueError):
    """An index file whose structure hnswlib must not be given; the message names the file and the fault."""


@dataclass
class HnswHeader:
    offset_level0: int
    max_elements: int
    count: int
    size_per_element: int
    label_offset: int
    offset_data: int
    max_level: int
    entry_point: int
    max_m: int
    max_m0: int
    m: int
    mult: float
    ef_construction: int

    @property
    def dim(self) -> int:
        return (self.label_offset - self.offset_data) // 4


def read_header(path: Path) -> HnswHeader:
    """The header fields of the hnswlib file at ``path`` (no consistency checks)."""
    try:
        with open(path, "rb") as handle:
            raw = handle.read(HEADER.size)
    except OSError as exc:
        raise HnswFormatError(f"{path}: cannot read the index file ({exc})") from exc
    if len(raw) < HEADER.size:
        raise HnswFormatError(f"{path}: {len(raw)} bytes, too short to be an hnswlib index")
    return HnswHeader(*HEADER.unpack(raw))


def _fail(path: Path, what: str) -> HnswFormatError:
    return HnswFormatError(f"{path}: not a valid hnswlib index ({what})")


def check_header(path: Path, h: HnswHeader, dim: int) -> None:
    """The header's fields against what hnswlib derives from ``M`` and ``dim`` itself (hnswalg.h constructor)."""
    if not 2 <= h.m <= MAX_M:
        raise _fail(path, f"M = {h.m}, expected 2..{MAX_M}")
    if h.max_m != h.m or h.max_m0 != 2 * h.m:
        raise _fail(path, f"maxM {h.max_m} / maxM0 {h.max_m0} are not M {h.m} / 2M")
    links0 = h.max_m0 * 4 + 4
    expected = {
        "offsetLevel0": (h.offset_level0, 0),
        "offsetData": (h.offset_data, links0),
        "label_offset": (h.label_offset, links0 + dim * 4),
        "size_data_per_element": (h.size_per_element, links0 + dim * 4 + 8),
    }
    for name, (found, want) in expected.items():
        if found != want:
            raise _fail(path, f"{name} is {found}, expected {want} for dimension {dim} and M {h.m}")
    if h.max_elements < h.count:
        raise _fail(path, f"max_elements {h.max_elements} < element count {h.count}")
    if h.count == 0:
        raise _fail(path, "no elements")
    if not 0 <= h.max_level <= 64:  # levels are ~ -ln(U) / ln(M): 64 is unreachable for any real graph
        raise _fail(path, f"maxlevel {h.max_level} out of range 0..64")
    if h.entry_point >= h.count:
        raise _fail(path, f"entry point {h.entry_point} >= element count {h.count}")
    if not (np.isfinite(h.mult) and h.mult > 0):
        raise _fail(path, f"level multiplier {h.mult!r} is not a positive number")


def validate_hnsw_file(path: str | Path, bank: np.ndarray) -> HnswHeader:
    """Validate the hnswlib file at ``path`` for ``bank [N, D]`` float32; raise :class:`HnswFormatError`.

    Cost: one read of the file plus vectorised checks on level 0 (``N * (2M + 1)`` ids and ``N * D``
    floats) and a Python pass over the per-element upper-level sizes (``N`` small reads from memory).
    """
    path = Path(path)
    n, dim = bank.shape
    h = read_header(path)
    check_header(path, h, dim)
    if h.count != n:
        raise _fail(path, f"{h.count} elements, but the memory bank has {n} rows")
    try:
        data = np.fromfile(path, dtype=np.uint8)
    except OSError as exc:
        raise HnswFormatError(f"{path}: cannot read the index file ({exc})") from exc
    level0_end = HEADER.size + n * h.size_per_element
    if data.size < level0_end + 4 * n:
        raise _fail(path, f"{data.size} bytes, but the header needs at least {level0_end + 4 * n}: truncated")

    # ---- level 0: counts, ids, deleted marks, vectors, labels --------------------------------------
    records = data[HEADER.size:level0_end].reshape(n, h.size_per_element)
    head = records[:, :4].copy().view("<u4")[:, 0]  # [N]
    counts = (head & 0xFFFF).astype(np.int64)
    if (head >> 16 & _DELETE_MARK).any():
        raise _fail(path, f"element {int(np.argmax(head >> 16 & _DELETE_MARK))} is marked deleted")
    if (counts > h.max_m0).any():
        bad = int(np.argmax(counts > h.max_m0))
        raise _fail(path, f"element {bad} has {counts[bad]} level-0 neighbours, at most {h.max_m0} allowed")
    ids = records[:, 4:h.offset_data].copy().view("<u4")  # [N, maxM0]
    used = np.arange(h.max_m0)[None, :] < counts[:, None]
    if (ids[used] >= n).any():
        bad = int(np.argmax(((ids >= n) & used).any(axis=1)))
        raise _fail(path, f"element {bad} links to id {int(ids[bad][used[bad]].max())} on level 0, but there are {n} elements")
    labels = records[:, h.label_offset:h.label_offset + 8].copy().view("<u8")[:, 0]  # [N]
    if (labels >= n).any() or np.bincount(labels.astype(np.int64), minlength=n).max() != 1:
        raise _fail(path, f"labels are not the bank rows 0..{n - 1}, each once")
    vectors = records[:, h.offset_data:h.label_offset].copy().view("<f4")  # [N, D]
    if not np.array_equal(vectors, bank[labels.astype(np.int64)]):
        raise _fail(path, "stored vectors differ from the memory bank's rows: built from another bank")

    # ---- upper levels: sizes, counts, ids present on that level -------------------------------------
    block = h.max_m * 4 + 4
    levels = np.zeros(n, dtype=np.int64)
    starts = np.zeros(n, dtype=np.int64)
    pos, size = level0_end, data.size
    raw = data.data  # memoryview: struct.unpack_from without copies
    for i in range(n):
        if pos + 4 > size:
            raise _fail(path, f"truncated in the link lists of element {i}")
        (nbytes,) = struct.unpack_from("<I", raw, pos)
        pos += 4
        if nbytes:
            if nbytes % block or nbytes // block > h.max_level:
                raise _fail(path, f"element {i} has {nbytes} bytes of upper-level links (blocks of {block}, "
                                  f"at most {h.max_level} levels)")
            levels[i], starts[i] = nbytes // block, pos
            pos += nbytes
    if pos != size:
        raise _fail(path, f"{size} bytes, but its structure accounts for {pos}")
    if levels[h.entry_point] != h.max_level:
        raise _fail(path, f"entry point {h.entry_point} is on level {levels[h.entry_point]}, not the top level {h.max_level}")
    for level in range(1, h.max_level + 1):
        members = np.flatnonzero(levels >= level)
        offsets = starts[members] + (level - 1) * block
        rows = data[offsets[:, None] + np.arange(block)[None, :]]  # [members, block]
        lcounts = rows[:, :4].copy().view("<u4")[:, 0] & 0xFFFF
        if (lcounts > h.max_m).any():
            bad = int(members[np.argmax(lcounts > h.max_m)])
            raise _fail(path, f"element {bad} has more than {h.max_m} neighbours on level {level}")
        lids = rows[:, 4:].copy().view("<u4")
        used = np.arange(h.max_m)[None, :] < lcounts[:, None].astype(np.int64)
        target = lids[used].astype(np.int64)
        if (target >= n).any():
            raise _fail(path, f"a level-{level} link points to id {int(target.max())}, but there are {n} elements")
        if (levels[target] < level).any():
            raise _fail(path, f"a level-{level} link points to an element that is not on level {level}")
    return h


__all__ = ["HEADER", "HnswFormatError", "HnswHeader", "check_header", "read_header", "validate_hnsw_file"]
