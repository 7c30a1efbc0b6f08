"""Files written whole or not at all: a temporary name, fsync, then a rename over the target.

Every writer in the runtime goes through here, so that a crash or Ctrl-C never leaves half a file under
the real name. Temporary names end in ``.tmp`` (bundle checksums skip them).
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import numpy as np


def write_bytes_atomic(path: str | os.PathLike[str], data) -> None:
    """Write ``data`` (bytes or a buffer) to ``path`` via ``path.tmp`` and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` via ``path.tmp`` and a rename."""
    write_bytes_atomic(path, text.encode("utf-8"))


def to_jsonable(value):
    """Dataclasses -> dicts, paths -> strings, numpy scalars -> Python numbers, NaN/inf -> None
    (JSON has no NaN: strict parsers reject it)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (np.floating, float)):
        return float(value) if np.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value


def write_json(path: str | os.PathLike[str], value) -> None:
    """A dataclass report (or plain data) -> indented JSON at ``path``, written atomically."""
    write_text_atomic(path, json.dumps(to_jsonable(value), indent=2) + "\n")
