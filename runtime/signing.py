"""Optional Ed25519 signatures over a bundle's manifest, for fleets that must run only their own bundles.

The manifest lists every file's sha256 and size, so one signature over it covers the whole bundle; the
runtime checks the files against the manifest as always. What is signed is the manifest *without its
TensorRT engines* (``engines: []`` and no ``engines/`` entries in ``files``), as canonical JSON (sorted
keys, no spaces, ASCII): engines are built on each device and recorded by ``pcedge build-engine``, which
must not invalidate the signature, and ``pcedge pack`` leaves them out of archives.

Files: ``manifest.sig`` beside ``manifest.json`` (JSON: algorithm, the signer's raw public key and its id,
the signature, all hex); keys are PEM files, the private key PKCS#8 written with mode 0600, the public key
SubjectPublicKeyInfo. Cryptography comes from the ``cryptography`` package (the ``sign`` extra), imported
only when a signature is made or checked.

This module imports no other pcedge module (``bundle.py`` imports it); callers map :class:`SignatureError`
to their own error types.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from pathlib import Path
from typing import Any

SIGNATURE = "manifest.sig"
SIGNATURE_FORMAT = "pcedge-signature"
ALGORITHM = "ed25519"
#: Engines are device-local: neither their entries nor their files are signed (see the module docstring).
UNSIGNED_PREFIX = "engines/"
_MAX_SIGNATURE_BYTES = 64 * 1024
_MAX_MANIFEST_BYTES = 16 * 1024 * 1024


class SignatureError(ValueError):
    """Unsigned, wrongly signed, or a key that cannot be used; the message names the file."""


def _crypto():
    try:
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ModuleNotFoundError as exc:
        raise SignatureError("signed bundles need the `sign` extra: pip install 'pcedge[sign]' (the cryptography package)") from exc
    return ed25519, serialization, InvalidSignature


def canonical_manifest(data: dict[str, Any]) -> bytes:
    """The bytes that are signed: the manifest without engines, as canonical JSON."""
    signed = copy.deepcopy(data)
    signed["engines"] = []
    files = signed.get("files")
    if isinstance(files, dict):
        signed["files"] = {rel: entry for rel, entry in files.items() if not str(rel).startswith(UNSIGNED_PREFIX)}
    return json.dumps(signed, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode("ascii")


def _read_manifest_data(manifest_path: Path) -> dict[str, Any]:
    try:
        if manifest_path.stat().st_size > _MAX_MANIFEST_BYTES:
            raise SignatureError(f"{manifest_path}: too large to be a pcedge manifest")
        data = json.loads(manifest_path.read_bytes().decode("utf-8"))
    except (OSError, ValueError, RecursionError) as exc:
        raise SignatureError(f"{manifest_path}: cannot be read as JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise SignatureError(f"{manifest_path}: not a pcedge manifest")
    return data


def _raw_public(public_key) -> bytes:
    _, serialization, _ = _crypto()
    return public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def key_id(public_key) -> str:
    """A short fingerprint of an Ed25519 public key: the first 16 hex digits of sha256 of its raw bytes."""
    return hashlib.sha256(_raw_public(public_key)).hexdigest()[:16]


# --------------------------------------------------------------------------------------------------
# Keys
# --------------------------------------------------------------------------------------------------


def generate_key(private_path: str | os.PathLike[str]) -> tuple[Path, Path]:
    """Write a new Ed25519 key pair: ``PATH`` (private, PKCS#8 PEM, mode 0600) and ``PATH.pub`` (public PEM).

    Existing files are never overwritten (a lost signing key cannot be recovered).
    """
    ed25519, serialization, _ = _crypto()
    private_path = Path(private_path)
    public_path = private_path.with_name(private_path.name + ".pub")
    for path in (private_path, public_path):
        if path.exists() or path.is_symlink():
            raise SignatureError(f"{path}: already exists; a key file is never overwritten")
    key = ed25519.Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
    public_pem = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    private_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # never world-readable, not even briefly
    with os.fdopen(fd, "wb") as handle:
        handle.write(private_pem)
    fd = os.open(public_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    with os.fdopen(fd, "wb") as handle:
        handle.write(public_pem)
    return private_path, public_path


def load_private_key(path: str | os.PathLike[str]):
    ed25519, serialization, _ = _crypto()
    path = Path(path)
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise SignatureError(f"{path}: not a readable unencrypted PEM private key ({exc})") from exc
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise SignatureError(f"{path}: not an Ed25519 private key ({type(key).__name__})")
    return key


def load_public_key(path_or_key):
    """An Ed25519 public key from a PEM file (``KEY.pub``); a key object is returned as is."""
    ed25519, serialization, _ = _crypto()
    if isinstance(path_or_key, ed25519.Ed25519PublicKey):
        return path_or_key
    path = Path(path_or_key)
    try:
        key = serialization.load_pem_public_key(path.read_bytes())
    except (OSError, ValueError, TypeError) as exc:
        raise SignatureError(f"{path}: not a readable PEM public key ({exc})") from exc
    if not isinstance(key, ed25519.Ed25519PublicKey):
        raise SignatureError(f"{path}: not an Ed25519 public key ({type(key).__name__})")
    return key


# --------------------------------------------------------------------------------------------------
# Signing and checking
# --------------------------------------------------------------------------------------------------


def sign_manifest(manifest_path: Path, private_key_path: str | os.PathLike[str]) -> Path:
    """Sign ``manifest_path`` (a verified bundle's manifest); write ``manifest.sig`` beside it atomically."""
    key = load_private_key(private_key_path)
    manifest_path = Path(manifest_path)
    payload = canonical_manifest(_read_manifest_data(manifest_path))
    public = key.public_key()
    record = {
        "format": SIGNATURE_FORMAT,
        "algorithm": ALGORITHM,
        "key_id": key_id(public),
        "public_key": _raw_public(public).hex(),
        "signed": "manifest.json without engines, canonical JSON (sorted keys, compact, ASCII)",
        "signature": key.sign(payload).hex(),
    }
    out = manifest_path.with_name(SIGNATURE)
    tmp = out.with_name(out.name + ".tmp")
    try:
        tmp.write_text(json.dumps(record, indent=2) + "\n")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def verify_manifest_signature(manifest_path: Path, trusted) -> str:
    """Check ``manifest.sig`` beside ``manifest_path`` against the ``trusted`` public key (file or key).

    Returns the signer's key id; raises :class:`SignatureError` naming the file when the bundle is
    unsigned, signed by another key, or the manifest changed after signing.
    """
    ed25519, _, InvalidSignature = _crypto()
    trusted = load_public_key(trusted)
    manifest_path = Path(manifest_path)
    sig_path = manifest_path.with_name(SIGNATURE)
    if not sig_path.is_file():
        raise SignatureError(f"{sig_path}: missing: the bundle is unsigned and a trusted key is required")
    try:
        if sig_path.stat().st_size > _MAX_SIGNATURE_BYTES:
            raise SignatureError(f"{sig_path}: too large to be a pcedge signature")
        record = json.loads(sig_path.read_bytes().decode("utf-8"))
    except (OSError, ValueError, RecursionError) as exc:
        raise SignatureError(f"{sig_path}: not a readable signature file ({exc})") from exc
    if not isinstance(record, dict) or record.get("format") != SIGNATURE_FORMAT or record.get("algorithm") != ALGORITHM:
        raise SignatureError(f"{sig_path}: not a pcedge {ALGORITHM} signature")
    try:
        signer = ed25519.Ed25519PublicKey.from_public_bytes(bytes.fromhex(str(record.get("public_key"))))
        signature = bytes.fromhex(str(record.get("signature")))
    except ValueError as exc:
        raise SignatureError(f"{sig_path}: malformed key or signature ({exc})") from exc
    if _raw_public(signer) != _raw_public(trusted):
        raise SignatureError(f"{sig_path}: signed by key {key_id(signer)}, not by the trusted key {key_id(trusted)}; refused")
    try:
        payload = canonical_manifest(_read_manifest_data(manifest_path))
    except ValueError as exc:  # NaN or infinity: nothing a signer produced
        raise SignatureError(f"{manifest_path}: cannot be checked against its signature ({exc})") from exc
    try:
        trusted.verify(signature, payload)
    except InvalidSignature:
        raise SignatureError(
            f"{sig_path}: the signature does not match {manifest_path.name}: the manifest was changed after signing; refused"
        ) from None
    return key_id(trusted)


__all__ = [
    "SIGNATURE",
    "SignatureError",
    "canonical_manifest",
    "generate_key",
    "key_id",
    "load_private_key",
    "load_public_key",
    "sign_manifest",
    "verify_manifest_signature",
]
