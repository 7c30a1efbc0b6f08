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
import os
import shutil
import tarfile
import tempfile
import zlib
from pathlib import Path, PurePosixPath

from .files import open_output
from .bundle import ENGINES_DIR, MANIFEST, BundleError, Manifest, open_bundle, read_manifest, sha256_file

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


def pack(bundle_root: str | os.PathLike[str], out_file: str | os.PathLike[str], include_engines: bool = False) -> Path:
    """Write the bundle at ``bundle_root`` to one ``.tar.gz`` at ``out_file`` (temp name, then rename).

    The bundle's checksums are verified first, and each file is hashed again while it is packed, so a
    file that changes during packing is an error rather than a silently inconsistent archive.
    """
    bundle = open_bundle(bundle_root, verify=True)
    out = Path(out_file)
    if out.resolve().is_relative_to(bundle.root.resolve()):
        raise ArchiveError(f"{out}: write the archive outside the bundle it packs ({bundle.root})")
    manifest = _archive_manifest(bundle.manifest, include_engines)
    top = bundle.root.resolve().name
    # open_output: a temporary name and a rename over a regular file; written in place to a device or FIFO
    # (never renamed over one); a folder, disk or socket is refused.
    with open_output(out, "wb") as handle, tarfile.open(fileobj=handle, mode="w|gz", format=tarfile.PAX_FORMAT) as tar:
        text = manifest.to_json().encode()
        tar.addfile(_tarinfo(f"{top}/{MANIFEST}", len(text), (bundle.root / MANIFEST).stat().st_mtime), io.BytesIO(text))
        for rel, entry in manifest.files.items():
            path = bundle.root / rel
            with open(path, "rb") as source:
                reader = _HashingReader(source)
                tar.addfile(_tarinfo(f"{top}/{rel}", entry.size, path.stat().st_mtime), reader)
            if reader.digest.hexdigest() != entry.sha256:
                raise ArchiveError(f"{path}: changed while it was being packed; pack again")
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


def _extract_verified(archive: Path, tar: tarfile.TarFile, staging: Path) -> dict[str, str]:
    """Write every file member into ``staging``; return ``{bundle-relative path: sha256}``."""
    top: str | None = None
    hashes: dict[str, str] = {}
    for member in tar:
        path = _member_path(archive, member)
        parts = [p for p in path.parts if p != "."]
        top = top or parts[0]
        if parts[0] != top:
            raise ArchiveError(f"{archive}: member {member.name!r} is outside the archive's folder {top!r}; refused")
        if member.isdir():
            continue
        if len(parts) < 2:
            raise ArchiveError(f"{archive}: member {member.name!r} is not inside a bundle folder; refused")
        rel = "/".join(parts[1:])
        if rel in hashes:
            raise ArchiveError(f"{archive}: member {member.name!r} appears twice; refused")
        target = staging.joinpath(*parts[1:])
        target.parent.mkdir(parents=True, exist_ok=True)
        digest = hashlib.sha256()
        source = tar.extractfile(member)
        try:
            with open(target, "wb") as handle:
                while block := source.read(_CHUNK):
                    digest.update(block)
                    handle.write(block)
        except (tarfile.TarError, zlib.error, EOFError, OSError) as exc:
            raise ArchiveError(f"{archive}: member {member.name!r} cannot be read ({exc}); the archive is damaged") from exc
        hashes[rel] = digest.hexdigest()
    if top is None:
        raise ArchiveError(f"{archive}: empty archive")
    return hashes


def _check_against_manifest(archive: Path, staging: Path, hashes: dict[str, str]) -> None:
    """Every listed file present with its sha256, and nothing unlisted: or an error naming the member."""
    if MANIFEST not in hashes:
        raise ArchiveError(f"{archive}: no {MANIFEST} inside; not a pcedge bundle archive")
    try:
        manifest = read_manifest(staging)
    except BundleError as exc:
        raise ArchiveError(f"{archive}: its {MANIFEST} is not usable: {exc}") from exc
    for rel, entry in manifest.files.items():
        if rel not in hashes:
            raise ArchiveError(f"{archive}: {rel} is listed in the manifest but missing from the archive")
        if hashes[rel] != entry.sha256:
            raise ArchiveError(
                f"{archive}: {rel} does not match the sha256 in its manifest: the archive was corrupted or changed; "
                "copy it again"
            )
    unlisted = sorted(set(hashes) - set(manifest.files) - {MANIFEST})
    if unlisted:
        raise ArchiveError(f"{archive}: {', '.join(unlisted)} not listed in the manifest; refused")


def unpack(archive: str | os.PathLike[str], dest_dir: str | os.PathLike[str], force: bool = False) -> Path:
    """Unpack ``archive`` into the bundle directory ``dest_dir``, verifying every file before it appears.

    Members are written to a hidden staging directory beside ``dest_dir``, checked against the sha256s of
    the manifest inside, and only then renamed into place; on any error the staging directory is removed
    and ``dest_dir`` is untouched. An existing ``dest_dir`` is replaced only with ``force``.
    """
    archive, dest = Path(archive), Path(dest_dir)
    if not archive.is_file():
        raise ArchiveError(f"{archive}: no such archive file")
    if dest.exists() and not force:
        raise ArchiveError(f"{dest}: already exists; pass --force to replace it")
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".unpacking", dir=dest.parent))
    try:
        try:
            with tarfile.open(archive, "r:gz") as tar:
                hashes = _extract_verified(archive, tar, staging)
        except (tarfile.TarError, zlib.error, EOFError) as exc:
            raise ArchiveError(f"{archive}: not a readable .tar.gz ({exc}); the file is damaged or not a pcedge archive") from exc
        _check_against_manifest(archive, staging, hashes)
        old = None
        if dest.exists():
            old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
            os.replace(dest, old)
        os.replace(staging, dest)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return dest


def archive_digest(archive: str | os.PathLike[str]) -> str:
    """sha256 of the archive file itself, to compare a copy on the device with the original."""
    return sha256_file(Path(archive))
