"""One-file archives of a bundle, for copying or flashing to a device.

An archive is a gzip-compressed tar holding one folder (the bundle's name, e.g. ``bottle.pcedge/``) with
``manifest.json`` first, then exactly the files the manifest lists. The manifest inside carries every
file's sha256, so :func:`unpack` can prove the copy intact before anything appears at the destination.
TensorRT engines are device-specific and left out unless asked for; the manifest inside then lists no
engines, so the archive describes exactly what it contains.
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import os
import shutil
import tarfile
import tempfile
import zlib
from pathlib import Path, PurePosixPath

from . import manifest_schema
from .bundle import (
    ENGINES_DIR,
    MANIFEST,
    SIGNATURE,
    BundleError,
    Manifest,
    check_replaceable,
    open_bundle,
    read_manifest,
    rename_no_replace,
    replace_dir,
    sha256_file,
)
from .files import STREAM, open_output, output_kind

_CHUNK = 1 << 20


class ArchiveError(BundleError):
    """An archive that cannot be packed or unpacked safely; the message names the archive and member."""


# --------------------------------------------------------------------------------------------------
# Packing
# --------------------------------------------------------------------------------------------------


def _archive_manifest(manifest: Manifest, include_engines: bool) -> Manifest:
    """The manifest as it must read inside the archive: without engines unless they are packed."""
    inside = copy.deepcopy(manifest)
    if not include_engines:
        inside.engines = []
        prefix = f"{ENGINES_DIR}/"
        inside.files = {rel: entry for rel, entry in inside.files.items() if not rel.startswith(prefix)}
    return inside


def _archive_manifest_text(path: Path, include_engines: bool) -> bytes:
    """The manifest's own JSON, minus the engines unless they are packed (the same content as
    :func:`_archive_manifest`). Working on the JSON as written, rather than re-serialising the dataclasses,
    keeps exactly the keys the exporter (and a signer) saw, so a signature made with another pcedge
    version still matches inside the archive."""
    data = json.loads(path.read_bytes().decode("utf-8"))
    if not include_engines:
        data["engines"] = []
        prefix = f"{ENGINES_DIR}/"
        data["files"] = {rel: entry for rel, entry in data.get("files", {}).items() if not rel.startswith(prefix)}
    return (json.dumps(data, indent=2) + "\n").encode("utf-8")


def _tarinfo(name: str, size: int, mtime: float) -> tarfile.TarInfo:
    # Owner and permissions are not the sender's business: plain 0644 files owned by root, so that an
    # archive made by any user unpacks the same everywhere.
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, int(mtime), 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


class _HashingReader(io.RawIOBase):
    """A file reader that hashes what it hands to ``tarfile``: what is packed is exactly what is checked."""

    def __init__(self, handle):
        self.handle, self.digest = handle, hashlib.sha256()

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        data = self.handle.read(size)
        self.digest.update(data)
        return data


def _check_archive_target(out: Path, force: bool) -> None:
    """An existing ``out`` is replaced only with ``force``, and only if it is a regular file."""
    if not (out.exists() or out.is_symlink()):
        return
    if not force:
        raise ArchiveError(f"{out}: already exists; pass --force to replace it")
    if out.is_symlink() or not out.is_file():
        raise ArchiveError(f"{out}: exists and is not a regular file; refused (pack replaces only archive files)")



def _write_archive(handle, bundle, manifest: Manifest, top: str, include_engines: bool, mode: str) -> None:
    """The tar.gz stream: the manifest as written (minus engines unless included), its signature if any, then
    every listed file, each hashed again while it is read (a file changed during packing is an error)."""
    with tarfile.open(fileobj=handle, mode=mode, format=tarfile.PAX_FORMAT) as tar:
        text = _archive_manifest_text(bundle.root / MANIFEST, include_engines)
        tar.addfile(_tarinfo(f"{top}/{MANIFEST}", len(text), (bundle.root / MANIFEST).stat().st_mtime), io.BytesIO(text))
        signature = bundle.root / SIGNATURE
        if signature.is_file() and not signature.is_symlink():
            data = signature.read_bytes()
            tar.addfile(_tarinfo(f"{top}/{SIGNATURE}", len(data), signature.stat().st_mtime), io.BytesIO(data))
        for rel, entry in manifest.files.items():
            path = bundle.root / rel
            with open(path, "rb") as source:
                reader = _HashingReader(source)
                tar.addfile(_tarinfo(f"{top}/{rel}", entry.size, path.stat().st_mtime), reader)
            if reader.digest.hexdigest() != entry.sha256:
                raise ArchiveError(f"{path}: changed while it was being packed; pack again")


def pack(bundle_root: str | os.PathLike[str], out_file: str | os.PathLike[str], include_engines: bool = False,
         force: bool = False) -> Path:
    """Write the bundle at ``bundle_root`` to one ``.tar.gz`` at ``out_file`` (temp name, then rename).

    The bundle's checksums are verified first, and each file is hashed again while it is packed, so a
    file that changes during packing is an error rather than a silently inconsistent archive. An existing
    ``out_file`` is replaced only with ``force``; without it, a file that appears at ``out_file`` while
    packing (another run) is kept and this run fails. The signature (``manifest.sig``), if any, is packed
    right after the manifest: it signs the manifest without its engines, which is what an archive holds.
    """
    bundle = open_bundle(bundle_root, verify=True)
    out = Path(out_file)
    if out.resolve().is_relative_to(bundle.root.resolve()):
        raise ArchiveError(f"{out}: write the archive outside the bundle it packs ({bundle.root})")
    manifest = _archive_manifest(bundle.manifest, include_engines)
    top = bundle.root.resolve().name
    # Where the archive goes decides how it is written: a device or FIFO (`-o /dev/stdout`, a pipe to
    # `ssh`) in place, never renamed over; a regular file (symlinks followed, as a shell's `>` does) under a
    # temporary name, then renamed, replacing an existing file only with --force; anything else is refused.
    target, kind = output_kind(out)
    if kind == STREAM:
        with open_output(target, "wb") as handle:
            _write_archive(handle, bundle, manifest, top, include_engines, mode="w|gz")
        return out
    _check_archive_target(target, force)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        with open(tmp, "wb") as handle:
            _write_archive(handle, bundle, manifest, top, include_engines, mode="w:gz")
            handle.flush()
            os.fsync(handle.fileno())
        if force:
            _check_archive_target(target, force)  # still a regular file (or gone)
            os.replace(tmp, target)
        else:
            try:
                rename_no_replace(tmp, target)
            except FileExistsError:
                raise ArchiveError(f"{out}: appeared while packing (another pcedge run?); it was kept, nothing written") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return out


# --------------------------------------------------------------------------------------------------
# Unpacking
# --------------------------------------------------------------------------------------------------


def _member_path(archive: Path, member: tarfile.TarInfo) -> PurePosixPath:
    """The member's path, refusing anything that could land outside the destination or is not a plain file."""
    name = member.name
    if not (member.isfile() or member.isdir()):
        kind = "a link" if (member.issym() or member.islnk()) else "not a regular file"
        raise ArchiveError(f"{archive}: member {name!r} is {kind}; refused (a bundle archive holds plain files only)")
    path = PurePosixPath(name)
    if path.is_absolute() or name.startswith(("/", "\\")) or "\\" in name or ":" in path.parts[0]:
        raise ArchiveError(f"{archive}: member {name!r} has an absolute path; refused")
    if any(part == ".." for part in path.parts):
        raise ArchiveError(f"{archive}: member {name!r} climbs out of the archive folder ('..'); refused")
    if not path.parts or path.parts == (".",):
        raise ArchiveError(f"{archive}: member with an empty name; refused")
    return path


def _bundle_rel(archive: Path, member: tarfile.TarInfo, top: str | None) -> tuple[str, str | None]:
    """``(top folder, bundle-relative path or None for a directory)`` of a member, refusing unsafe names."""
    path = _member_path(archive, member)
    parts = [p for p in path.parts if p != "."]
    top = top or parts[0]
    if parts[0] != top:
        raise ArchiveError(f"{archive}: member {member.name!r} is outside the archive's folder {top!r}; refused")
    if member.isdir():
        return top, None
    if len(parts) < 2:
        raise ArchiveError(f"{archive}: member {member.name!r} is not inside a bundle folder; refused")
    return top, "/".join(parts[1:])


def _write_member(archive: Path, tar: tarfile.TarFile, member: tarfile.TarInfo, target: Path, limit: int) -> str:
    """Stream one member to ``target``, refusing it as soon as it exceeds ``limit`` bytes; return its sha256."""
    digest = hashlib.sha256()
    written = 0
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise ArchiveError(f"{archive}: member {member.name!r} lies under a file of the bundle; refused") from None
    source = tar.extractfile(member)
    try:
        with open(target, "xb") as handle:
            while block := source.read(_CHUNK):
                written += len(block)
                if written > limit:
                    raise ArchiveError(
                        f"{archive}: member {member.name!r} is larger than the {limit} bytes its manifest lists; refused"
                    )
                digest.update(block)
                handle.write(block)
    except (tarfile.TarError, zlib.error, EOFError, OSError) as exc:
        raise ArchiveError(f"{archive}: member {member.name!r} cannot be read ({exc}); the archive is damaged") from exc
    return digest.hexdigest()


def _extract_verified(archive: Path, tar: tarfile.TarFile, staging: Path, dest: Path, trust=None) -> None:
    """Stream the archive into ``staging``, checking as it goes: the manifest first (schema-validated, and
    with ``trust`` its signature), then only members the manifest lists, each no larger than listed, after
    a free-space check for the total. Every listed file present with its sha256 at the end."""
    top: str | None = None
    manifest: Manifest | None = None
    hashes: dict[str, str] = {}
    signature_seen = False
    for member in tar:
        top, rel = _bundle_rel(archive, member, top)
        if rel is None:
            continue
        if rel in hashes or (rel == SIGNATURE and signature_seen):
            raise ArchiveError(f"{archive}: member {member.name!r} appears twice; refused")
        if manifest is None:
            if rel != MANIFEST:
                raise ArchiveError(f"{archive}: the first file is {member.name!r}, not {top}/{MANIFEST}; "
                                   "not a pcedge archive (pack writes the manifest first)")
            _write_member(archive, tar, member, staging / MANIFEST, manifest_schema.MAX_MANIFEST_BYTES)
            try:
                manifest = read_manifest(staging)
            except BundleError as exc:
                raise ArchiveError(f"{archive}: its {MANIFEST} is not usable: {exc}") from exc
            hashes[MANIFEST] = ""
            needed = sum(entry.size for entry in manifest.files.values())
            free = shutil.disk_usage(staging).free
            if needed > free:
                raise ArchiveError(
                    f"{archive}: unpacking needs {needed / 1e6:.1f} MB, only {free / 1e6:.1f} MB free on {dest.parent}; "
                    "nothing written"
                )
            continue
        if rel == SIGNATURE:
            _write_member(archive, tar, member, staging / SIGNATURE, 64 * 1024)
            signature_seen = True
            if trust is not None:
                _check_trust(archive, staging, trust)
            continue
        if trust is not None and not signature_seen:
            raise ArchiveError(f"{archive}: unsigned (no {SIGNATURE} after the manifest); --trust refuses unsigned archives")
        entry = manifest.files.get(rel)
        if entry is None:
            raise ArchiveError(f"{archive}: member {member.name!r} is not listed in the manifest; refused")
        if member.size != entry.size:
            raise ArchiveError(
                f"{archive}: member {member.name!r} is {member.size} bytes, the manifest lists {entry.size}; refused"
            )
        hashes[rel] = _write_member(archive, tar, member, staging.joinpath(*rel.split("/")), entry.size)
        if hashes[rel] != entry.sha256:
            raise ArchiveError(
                f"{archive}: {rel} does not match the sha256 in its manifest: the archive was corrupted or changed; "
                "copy it again"
            )
    if top is None or manifest is None:
        raise ArchiveError(f"{archive}: empty archive" if top is None else f"{archive}: no {MANIFEST} inside; not a pcedge bundle archive")
    if trust is not None and not signature_seen:
        raise ArchiveError(f"{archive}: unsigned (no {SIGNATURE} inside); --trust refuses unsigned archives")
    for rel in manifest.files:
        if rel not in hashes:
            raise ArchiveError(f"{archive}: {rel} is listed in the manifest but missing from the archive")


def _check_trust(archive: Path, staging: Path, trust) -> None:
    from .signing import SignatureError, verify_manifest_signature

    try:
        verify_manifest_signature(staging / MANIFEST, trust)
    except SignatureError as exc:
        raise ArchiveError(f"{archive}: {exc}") from exc


def unpack(archive: str | os.PathLike[str], dest_dir: str | os.PathLike[str], force: bool = False,
           trust: str | os.PathLike[str] | None = None) -> Path:
    """Unpack ``archive`` into the bundle directory ``dest_dir``, verifying every file before it appears.

    Members are streamed to a hidden staging directory beside ``dest_dir`` and checked as they come (see
    :func:`_extract_verified`); only then is the staging directory renamed into place. On any error it
    is removed and ``dest_dir`` is untouched. An existing ``dest_dir`` is replaced only with ``force``,
    and only if it is a pcedge bundle. With ``trust`` (an Ed25519 public key file) the archive must carry a
    valid signature by that key, checked before any data member is written.
    """
    archive, dest = Path(archive), Path(dest_dir)
    if not archive.is_file():
        raise ArchiveError(f"{archive}: no such archive file")
    if str(dest_dir) in ("", ".", "..") or dest.name in ("", ".", ".."):
        raise ArchiveError(f"{str(dest_dir) or repr('')}: name the bundle directory to create, e.g. part.pcedge")
    try:
        check_replaceable(dest, force)
    except (FileExistsError, ValueError) as exc:
        raise ArchiveError(str(exc)) from None
    if trust is not None:
        from .signing import SignatureError, load_public_key

        try:
            trust = load_public_key(trust)
        except SignatureError as exc:
            raise ArchiveError(str(exc)) from exc
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".unpacking", dir=dest.parent))
    try:
        try:
            with tarfile.open(archive, "r:gz") as tar:
                _extract_verified(archive, tar, staging, dest, trust)
        except (tarfile.TarError, zlib.error, EOFError) as exc:
            raise ArchiveError(f"{archive}: not a readable .tar.gz ({exc}); the file is damaged or not a pcedge archive") from exc
        try:
            replace_dir(staging, dest, force)
        except FileExistsError as exc:
            raise ArchiveError(str(exc)) from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return dest


def archive_digest(archive: str | os.PathLike[str]) -> str:
    """sha256 of the archive file itself, to compare a copy on the device with the original."""
    return sha256_file(Path(archive))
