"""One schema for manifest.json: the manifest dataclass tree's field types, plus range rules.

:func:`build` turns parsed JSON into the dataclass tree, driven only by the dataclasses' fields and their
annotations (``int``, ``float``, ``str``, ``bool``, ``X | None``, ``list[X]``, ``dict[str, X]``,
``Literal[...]``, nested dataclasses, ``Any`` = one JSON scalar): a field added to any section with a default is validated without
touching this module. :func:`check_ranges` then applies the rules types cannot express (a positive finite
threshold, a grid that agrees with the input size and stride, known modes, paths confined to the bundle,
every file the runtime reads listed with a checksum). Every message names the file and the field
(``manifest.json: threshold.value: ...``).

This module knows no section by its class (``bundle.py`` imports it, not the other way round); the range
rules read the manifest's attributes by name.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from pathlib import PurePosixPath
from typing import Any

#: A manifest is a few kilobytes; anything this large is not one (and would cost memory to parse).
MAX_MANIFEST_BYTES = 16 * 1024 * 1024
GEOMETRY_MODES = ("stretch", "letterbox", "crop")
INDEX_KINDS = ("hnsw",)
INDEX_SPACES = ("l2",)
#: hnswlib accepts any M; beyond this no memory-bank graph is sensible and the file would be huge.
MAX_HNSW_M = 4096
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class SchemaError(ValueError):
    """A manifest value of the wrong type or out of range; the message names the file and the field."""


# --------------------------------------------------------------------------------------------------
# Types, from the dataclass tree
# --------------------------------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    if tp is Any:
        return "a number or string"
    if tp in (int,):
        return "an integer"
    if tp is float:
        return "a finite number"
    if tp is str:
        return "a string"
    if tp is bool:
        return "true or false"
    return getattr(tp, "__name__", str(tp))


def _describe(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _convert(tp: Any, value: Any, where: str, source: str) -> Any:
    """``value`` (parsed JSON) as type ``tp``, or :class:`SchemaError` naming ``where``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        real = [o for o in options if o is not type(None)]
        errors = []
        for option in real:
            try:
                return _convert(option, value, where, source)
            except SchemaError as exc:
                errors.append(exc)
        wanted = " or ".join(_type_name(o) for o in real) + (" or null" if type(None) in options else "")
        raise SchemaError(f"{source}: {where}: expected {wanted}, got {_describe(value)}")
    if dataclasses.is_dataclass(tp):
        return build(tp, value, source, where)
    if origin is typing.Literal:
        allowed = typing.get_args(tp)
        if value not in allowed or isinstance(value, bool) != any(isinstance(a, bool) for a in allowed):
            raise SchemaError(f"{source}: {where}: expected one of {', '.join(map(repr, allowed))}, got {_describe(value)}")
        return value
    if origin is list:
        (item,) = typing.get_args(tp) or (Any,)
        if not isinstance(value, list):
            raise SchemaError(f"{source}: {where}: expected a list, got {_describe(value)}")
        return [_convert(item, v, f"{where}[{i}]", source) for i, v in enumerate(value)]
    if origin is dict:
        key_type, item = typing.get_args(tp) or (str, Any)
        if not isinstance(value, dict):
            raise SchemaError(f"{source}: {where}: expected an object, got {_describe(value)}")
        return {k: _convert(item, v, f"{where}.{k}", source) for k, v in value.items()}
    if tp is Any:  # e.g. a shape entry: a number or a symbolic name, never a nested structure
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise SchemaError(f"{source}: {where}: expected a number or string, got {_describe(value)}")
        if isinstance(value, float) and not math.isfinite(value):
            raise SchemaError(f"{source}: {where}: expected a finite number, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise SchemaError(f"{source}: {where}: expected true or false, got {_describe(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise SchemaError(f"{source}: {where}: expected an integer, got {_describe(value)}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise SchemaError(f"{source}: {where}: expected a finite number, got {_describe(value)}")
        if not math.isfinite(value):
            raise SchemaError(f"{source}: {where}: expected a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise SchemaError(f"{source}: {where}: expected a string, got {_describe(value)}")
        return value
    raise TypeError(f"manifest schema: field {where} has an unsupported annotation {tp!r}")  # a bug of ours


def build(cls: type, data: Any, source: str, where: str = "") -> Any:
    """Dataclass ``cls`` from parsed JSON ``data``; missing keys take their defaults, unknown keys are an error."""
    label = where or "manifest"
    if not isinstance(data, dict):
        raise SchemaError(f"{source}: {label}: expected an object, got {_describe(data)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - fields)
    if unknown:
        raise SchemaError(f"{source}: {label}: unknown keys {unknown}")
    kwargs = {}
    for key, value in data.items():
        kwargs[key] = _convert(hints[key], value, f"{where}.{key}" if where else key, source)
    return cls(**kwargs)


# --------------------------------------------------------------------------------------------------
# Ranges and cross-field rules
# --------------------------------------------------------------------------------------------------


def confined_relpath(rel: str) -> bool:
    """True when ``rel`` is a plain relative POSIX path that cannot leave the bundle directory."""
    if not rel or "\\" in rel or "\x00" in rel or rel.startswith("/"):
        return False
    parts = PurePosixPath(rel).parts
    return bool(parts) and all(p not in ("..", ".", "") for p in parts) and ":" not in parts[0]


def check_ranges(m: Any, source: str, schema_version: int, fmt: str, manifest_name: str) -> None:
    """The rules the field types cannot say; :class:`SchemaError` names the first field that breaks one."""

    def fail(field: str, problem: str) -> SchemaError:
        return SchemaError(f"{source}: {field}: {problem}")

    if m.format != fmt:
        raise fail("format", f"expected {fmt!r}, got {_describe(m.format)}")
    if not 1 <= m.schema_version <= schema_version:
        raise fail("schema_version", f"{m.schema_version} is not one this pcedge reads (1..{schema_version})")

    # ---- input geometry and the output grid it must produce --------------------------------------
    g, out, model, bank = m.input.geometry, m.output, m.model, m.memory_bank
    if g.mode not in GEOMETRY_MODES:
        raise fail("input.geometry.mode", f"unknown mode {g.mode!r}; expected one of {', '.join(GEOMETRY_MODES)}")
    if out.stride < 1:
        raise fail("output.stride", f"must be >= 1, got {out.stride}")
    multiple = max([out.stride, *[s for s in model.layer_strides if s > 0]])
    for name in ("height", "width"):
        value = getattr(g, name)
        if value < multiple or value % multiple:
            raise fail(f"input.geometry.{name}", f"{value} is not a positive multiple of the backbone stride {multiple}")
    if g.mode == "crop" and g.resize < max(g.height, g.width):
        raise fail("input.geometry.resize", f"{g.resize} is smaller than the crop {g.width}x{g.height}")
    if not 0.0 <= g.pad_value <= 1.0:
        raise fail("input.geometry.pad_value", f"{g.pad_value} is outside [0, 1]")
    shape = m.input.shape
    if len(shape) != 4 or shape[1] != 3 or shape[2] != g.height or shape[3] != g.width:
        raise fail("input.shape", f"{shape} does not match [batch, 3, {g.height}, {g.width}] (input.geometry)")
    if m.input.dtype != "float32":
        raise fail("input.dtype", f"{m.input.dtype!r}; the runtime feeds float32")
    if m.input.colour_order != "RGB":
        raise fail("input.colour_order", f"{m.input.colour_order!r}; the runtime feeds RGB")
    if len(m.input.value_range) != 2 or not m.input.value_range[0] < m.input.value_range[1]:
        raise fail("input.value_range", f"{m.input.value_range} is not [low, high]")
    for name, cells, side in (("grid_h", out.grid_h, g.height), ("grid_w", out.grid_w, g.width)):
        if cells * out.stride != side:
            raise fail(f"output.{name}", f"{cells} x stride {out.stride} != input side {side}: the grid disagrees with the input")
    if out.dim < 1:
        raise fail("output.dim", f"must be >= 1, got {out.dim}")
    if len(out.shape) != 3 or out.shape[1] != out.grid_h * out.grid_w or out.shape[2] != out.dim:
        raise fail("output.shape", f"{out.shape} does not match [batch, {out.grid_h * out.grid_w}, {out.dim}] (grid and dim)")

    # ---- model, memory bank, index, scoring, threshold -----------------------------------------
    if model.projection_dim is not None and model.projection_dim < 1:
        raise fail("model.projection_dim", f"must be >= 1 or null, got {model.projection_dim}")
    if bank.n < 1:
        raise fail("memory_bank.n", f"must be >= 1, got {bank.n}")
    if bank.dim != out.dim:
        raise fail("memory_bank.dim", f"{bank.dim} != output.dim {out.dim}")
    if bank.dtype != "float32":
        raise fail("memory_bank.dtype", f"{bank.dtype!r}; the runtime reads float32 banks")
    index = m.index
    if index.kind not in INDEX_KINDS:
        raise fail("index.kind", f"unknown kind {index.kind!r}; expected one of {', '.join(INDEX_KINDS)}")
    if index.space not in INDEX_SPACES:
        raise fail("index.space", f"unknown space {index.space!r}; expected one of {', '.join(INDEX_SPACES)}")
    if not 2 <= index.M <= MAX_HNSW_M:
        raise fail("index.M", f"must be in 2..{MAX_HNSW_M}, got {index.M}")
    for name in ("ef", "ef_construction"):
        if getattr(index, name) < 1:
            raise fail(f"index.{name}", f"must be >= 1, got {getattr(index, name)}")
    s = m.scoring
    if not 1 <= s.k <= bank.n:
        raise fail("scoring.k", f"must be in 1..{bank.n} (memory_bank.n), got {s.k}")
    if not 1 <= s.reweight_b <= bank.n:
        raise fail("scoring.reweight_b", f"must be in 1..{bank.n} (memory_bank.n), got {s.reweight_b}")
    if not s.blur_sigma > 0:
        raise fail("scoring.blur_sigma", f"must be > 0, got {s.blur_sigma}")
    if s.blur_reference_size < 1:
        raise fail("scoring.blur_reference_size", f"must be >= 1, got {s.blur_reference_size}")
    thresholds = [("threshold", m.threshold)]  # the float32 graph's, and each INT8 graph's own
    thresholds += [(f"model.{name}.threshold", report.threshold)
                   for name, report in (("int8", model.int8), ("int8_cpu", model.int8_cpu))
                   if report is not None and report.threshold is not None]
    for where, t in thresholds:
        if not t.value > 0:
            raise fail(f"{where}.value", f"must be a positive finite number, got {t.value}")
        if not t.scale > 0:
            raise fail(f"{where}.scale", f"must be > 0, got {t.scale}")
        if not 0 < t.target_fpr < 1:
            raise fail(f"{where}.target_fpr", f"must be in (0, 1), got {t.target_fpr}")

    # ---- every path confined to the bundle, every file the runtime reads listed ------------------
    for rel, entry in m.files.items():
        if not confined_relpath(rel) or rel == manifest_name:
            raise fail(f"files.{rel}", "not a plain relative path inside the bundle")
        if not _SHA256.match(entry.sha256):
            raise fail(f"files.{rel}.sha256", f"{_describe(entry.sha256)} is not a sha256 hex digest")
        if entry.size < 0:
            raise fail(f"files.{rel}.size", f"must be >= 0, got {entry.size}")
    read = [("model.file", model.file), ("memory_bank.file", bank.file)]
    if model.int8_file is not None:
        read.append(("model.int8_file", model.int8_file))
    if model.int8_cpu_file is not None:
        read.append(("model.int8_cpu_file", model.int8_cpu_file))
    if index.file is not None:
        read.append(("index.file", index.file))
    check = m.check
    check_paths = [("check.images", check.images), ("check.embeddings", check.embeddings), ("check.scores", check.scores)]
    given = [p for _, p in check_paths if p is not None]
    if given and len(given) != 3:
        raise fail("check", "images, embeddings and scores must be given together (or none)")
    read += [(name, p) for name, p in check_paths if p is not None]
    read += [(f"engines[{i}].file", e.file) for i, e in enumerate(m.engines)]
    for name, rel in read:
        if not confined_relpath(rel):
            raise fail(name, f"{_describe(rel)} is not a plain relative path inside the bundle")
        if rel not in m.files:
            raise fail(name, f"{rel} is not listed in files (every file the runtime reads must have a checksum)")


__all__ = ["MAX_MANIFEST_BYTES", "SchemaError", "build", "check_ranges", "confined_relpath"]
