"""Which images a list of command-line items names: files, folders (searched recursively) and globs."""

from __future__ import annotations

import glob
import os
from pathlib import Path

from .preprocess import IMAGE_SUFFIXES


def expand_inputs(items: list[str]) -> list[Path]:
    """Files, folders (searched recursively for images) and glob patterns -> sorted unique paths.

    A plain file is kept whatever its suffix (so that a non-image is reported, not silently dropped).
    Raises ``FileNotFoundError`` for an item that names nothing.
    """
    out: list[Path] = []
    for item in items:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise FileNotFoundError(f"{path}: folder contains no images")
            out.extend(found)
        elif path.exists():
            out.append(path)
        elif any(ch in item for ch in "*?["):
            matches = sorted(Path(m) for m in glob.glob(item, recursive=True) if os.path.isfile(m))
            if not matches:
                raise FileNotFoundError(f"{item}: pattern matches no files")
            out.extend(matches)
        else:
            raise FileNotFoundError(f"{item}: no such file or folder")
    seen, unique = set(), []
    for p in out:
        key = p.resolve()
        if key not in seen:
            seen.add(key)
            unique.append(p)
    if not unique:
        raise FileNotFoundError("no input images given")
    return unique


def unique_names(paths: list[Path]) -> list[str]:
    """Output file stems that stay distinct when inputs share names in different folders
    (MVTec's test/good/000.png and test/crack/000.png): the path relative to the inputs' common folder."""
    resolved = [p.resolve() for p in paths]
    common = Path(os.path.commonpath([str(p.parent) for p in resolved])) if len(resolved) > 1 else resolved[0].parent
    names = []
    for p in resolved:
        rel = p.relative_to(common).with_suffix("")
        names.append("__".join(rel.parts))
    return names
