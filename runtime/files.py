"""Writing output files without destroying what pcedge did not create.

Every file pcedge writes goes through :func:`open_output`. What happens depends on what the target is:

- **nothing yet, or a regular file**: the data goes to a hidden temporary name beside it
  (``.NAME.<pid>.<random>.tmp``), is fsynced, and is renamed over the target only when complete, so a
  crash or Ctrl-C never leaves half a file under the real name (bundle checksums skip ``.tmp`` names);
- **a character device or a FIFO** (``/dev/null``, ``/dev/stdout``, a named pipe another program reads):
  written in place. Renaming over it would replace the device node or the pipe with a regular file;
- **a symlink**: followed, like a shell's ``>`` does. The rules above then apply to what it points to
  (a link to a regular file: that file is replaced atomically and the link stays; a dangling link: its
  target is created). A link loop is refused;
- **a directory, a block device or a socket**: refused with :class:`OutputError` (a report written over a
  disk is never what was meant).

:func:`check_output` and :func:`check_output_dir` run the same rules up front, before a command does any
work, so an unwritable ``--json`` fails in a second rather than after a whole evaluation.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import secrets
import stat
from pathlib import Path
from typing import IO, Iterator

import numpy as np

#: What :func:`output_kind` calls a target.
NEW, REGULAR, STREAM = "new", "regular", "stream"


class OutputError(OSError):
    """An output path pcedge will not or cannot write; the message names the path and why."""


def _resolve(path: Path) -> Path:
    """Follow symlinks (a loop is an :class:`OutputError`)."""
    if not path.is_symlink():
        return path
    try:
        return Path(os.path.realpath(path, strict=False))
    except OSError as exc:  # pragma: no cover - realpath(strict=False) only raises on odd platforms
        raise OutputError(f"{path}: cannot follow the symlink ({exc.strerror or exc})") from exc


def output_kind(path: str | os.PathLike[str]) -> tuple[Path, str]:
    """``(the path to write, NEW | REGULAR | STREAM)`` for an output path, or :class:`OutputError`."""
    original = Path(path)
    if str(path) == "":
        raise OutputError("empty output path")
    target = _resolve(original)
    try:
        st = os.stat(target)
    except FileNotFoundError:
        return target, NEW
    except OSError as exc:  # ELOOP (a symlink loop), EACCES on a parent, ...
        raise OutputError(f"{original}: cannot be written ({exc.strerror or exc})") from exc
    mode = st.st_mode
    if stat.S_ISREG(mode):
        return target, REGULAR
    if stat.S_ISCHR(mode) or stat.S_ISFIFO(mode):
        return target, STREAM
    what = {stat.S_IFDIR: "a folder", stat.S_IFBLK: "a block device (a disk)", stat.S_IFSOCK: "a socket"}.get(
        stat.S_IFMT(mode), "not a regular file")
    shown = original if target == original else f"{original} (-> {target})"
    raise OutputError(f"{shown} is {what}; refused: give a file name")


def _probe_folder(folder: Path, shown: Path) -> None:
    """Create ``folder`` if needed and prove a file can be created in it (root ignores modes, read-only
    mounts do not: only trying tells)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except FileExistsError as exc:
        raise OutputError(f"{shown}: {folder} is not a folder") from exc
    except OSError as exc:
        raise OutputError(f"{shown}: cannot create the folder {folder} ({exc.strerror or exc})") from exc
    if not folder.is_dir():
        raise OutputError(f"{shown}: {folder} is not a folder")
    probe = folder / f".pcedge-write-test.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as exc:
        raise OutputError(f"{shown}: cannot write in {folder} ({exc.strerror or exc})") from exc
    os.close(fd)
    probe.unlink(missing_ok=True)


def check_output(path: str | os.PathLike[str]) -> None:
    """Raise :class:`OutputError` unless ``path`` can be written by :func:`open_output` (its folder is
    created if missing). A device or FIFO is accepted without opening it (opening a FIFO would wait)."""
    target, kind = output_kind(path)
    if kind != STREAM:
        _probe_folder(target.parent, Path(path))


def check_output_dir(path: str | os.PathLike[str]) -> None:
    """Raise :class:`OutputError` unless ``path`` is (or can be created as) a folder pcedge can write in."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputError(f"{path}: exists and is not a folder")
    _probe_folder(path, path)


def _temporary(target: Path) -> tuple[int, Path]:
    # O_EXCL with a random name: two writers never share a temporary; mode 0666 minus the umask, as a
    # plain open() would give (mkstemp's 0600 would hide reports from other users).
    while True:
        tmp = target.with_name(f"{temporary_prefix(target)}{secrets.token_hex(4)}.tmp")
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), tmp
        except FileExistsError:  # pragma: no cover - 32 random bits
            continue


@contextlib.contextmanager
def open_output(path: str | os.PathLike[str], mode: str = "wb",
                keep_partial: tuple[type[BaseException], ...] = ()) -> Iterator[IO]:
    """A handle to write ``path`` (see the module docstring for what each kind of target gets).

    ``mode`` is ``"wb"`` or ``"w"`` (UTF-8). On an exception the temporary file is removed and the target
    left as it was, unless the exception is one of ``keep_partial`` (e.g. ``(KeyboardInterrupt,)``): then
    what was written is renamed into place first (a log of the images scored before Ctrl-C is worth
    keeping) and the exception goes on. Stale temporaries of dead processes beside the target are removed.
    """
    if mode not in ("wb", "w"):
        raise ValueError(f"mode {mode!r}: expected 'wb' or 'w'")
    target, kind = output_kind(path)
    text = {"encoding": "utf-8"} if mode == "w" else {}
    if kind == STREAM:
        try:
            handle = open(target, mode, **text)
        except OSError as exc:
            raise OutputError(f"{path}: cannot be opened for writing ({exc.strerror or exc})") from exc
        with handle:
            yield handle
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(target)
    fd, tmp = _temporary(target)
    committed = False
    try:
        with os.fdopen(fd, mode, **text) as handle:
            try:
                yield handle
            except BaseException as exc:
                if not isinstance(exc, keep_partial):
                    raise
                _commit(handle, tmp, target)
                committed = True
                raise
            _commit(handle, tmp, target)
            committed = True
    finally:
        if not committed:
            tmp.unlink(missing_ok=True)


def _commit(handle: IO, tmp: Path, target: Path) -> None:
    handle.flush()
    os.fsync(handle.fileno())
    if target.exists():
        # Keep the permissions of the file being replaced.
        os.chmod(tmp, stat.S_IMODE(os.stat(target).st_mode))
    os.replace(tmp, target)


def temporary_prefix(target: str | os.PathLike[str]) -> str:
    """The name every temporary of ``target`` starts with: ``.NAME.<pid>.`` (the PID lets a later run tell
    a dead process's leftovers from a live writer's work in progress)."""
    return f".{Path(target).name}.{os.getpid()}."


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    except (OverflowError, OSError):
        return False
    return True


def remove_stale_temporaries(target: str | os.PathLike[str]) -> list[Path]:
    """Remove ``.NAME.<pid>.*.partial`` / ``.NAME.<pid>.*.tmp`` beside ``target`` left by processes that are
    gone (SIGKILL, a power cut); returns what was removed.

    Only names of exactly that form are touched, and only when no process with that PID exists on this
    machine (a reused PID keeps a leftover until the next run: harmless). Temporaries of a live writer,
    and anything else in the folder, stay.
    """
    import re
    import shutil

    target = Path(target)
    folder = target.parent if str(target.parent) else Path(".")
    pattern = re.compile(rf"^\.{re.escape(target.name)}\.(\d+)\.[A-Za-z0-9_]+\.(partial|tmp)$")
    removed = []
    try:
        entries = list(folder.iterdir())
    except OSError:
        return removed
    for entry in entries:
        match = pattern.match(entry.name)
        if match is None or _pid_alive(int(match.group(1))):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed


def write_bytes_atomic(path: str | os.PathLike[str], data) -> None:
    """Write ``data`` (bytes or a buffer) to ``path`` through :func:`open_output`."""
    with open_output(path, "wb") as handle:
        handle.write(data)


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` through :func:`open_output`."""
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
    if isinstance(value, np.bool_):
        return bool(value)
    return value


def json_line(value) -> str:
    """One strict JSON line (NaN/inf -> null) for a JSONL log."""
    return json.dumps(to_jsonable(value), allow_nan=False) + "\n"


def write_json(path: str | os.PathLike[str], value) -> None:
    """A dataclass report (or plain data) -> indented strict JSON at ``path``, written through :func:`open_output`."""
    write_text_atomic(path, json.dumps(to_jsonable(value), indent=2, allow_nan=False) + "\n")
