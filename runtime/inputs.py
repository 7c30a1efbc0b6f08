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
            found = _images_below(path)
            if not found:
                raise FileNotFoundError(f"{path}: folder contains no images")
            out.extend(found)
        elif path.exists() or path.is_symlink():
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
        try:
            key = p.resolve()
        except RuntimeError:  # a symlink loop (Python < 3.13): keep it, reading it reports the loop
            key = p.absolute()
        if key not in seen:
            seen.add(key)
            unique.append(p)
    if not unique:
        raise FileNotFoundError("no input images given")
    return unique


def unique_names(paths: list[Path]) -> list[str]:
    """Output file stems that stay distinct when inputs share names in different folders
    (MVTec's test/good/000.png and test/crack/000.png): the path relative to the inputs' common folder."""
    absolute = [Path(os.path.abspath(p)) for p in paths]  # not resolve(): a symlink's own name counts
    common = Path(os.path.commonpath([str(p.parent) for p in absolute])) if len(absolute) > 1 else absolute[0].parent
    stems = ["__".join(p.relative_to(common).with_suffix("").parts) for p in absolute]
    counts: dict[str, int] = {}
    for stem in stems:
        counts[stem] = counts.get(stem, 0) + 1
    # part.jpg and part.png in one folder: keep the suffix in the name, or one overlay would overwrite the other.
    names = [stem if counts[stem] == 1 else f"{stem}_{p.suffix.lstrip('.').lower()}"
             for stem, p in zip(stems, absolute)]
    taken: set[str] = set()
    for i, name in enumerate(names):  # still equal (part.JPG and part.jpg): number them
        candidate, n = name, 1
        while candidate in taken:
            n += 1
            candidate = f"{name}_{n}"
        names[i] = candidate
        taken.add(candidate)
    return names


def _images_below(folder: Path) -> list[Path]:
    """Image files below ``folder`` (recursively), sorted, plus every sub-folder that cannot be listed.

    Nothing vanishes silently: image-named symlinks that lead nowhere (loops, missing targets) and folders
    that cannot be listed (permission denied) are kept, so that reading them reports them by name like any
    other unreadable image (:func:`~pcedge.runtime.preprocess.read_image` says why).
    """
    found: list[Path] = []
    unlisted: list[Path] = []
    for root, dirs, files in os.walk(folder, onerror=lambda exc: unlisted.append(Path(exc.filename))):
        for name in files + [d for d in dirs if os.path.islink(os.path.join(root, d))]:
            candidate = Path(root) / name
            if candidate.suffix.lower() in IMAGE_SUFFIXES and (candidate.is_file() or candidate.is_symlink()):
                found.append(candidate)
    return sorted(found) + sorted(unlisted)
