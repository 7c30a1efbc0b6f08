"""``pcedge sign``: an Ed25519 signature over a bundle's manifest, and key generation (``--generate-key``)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HELP = "sign a bundle's manifest with an Ed25519 key (devices check it with --trust), or generate a key pair"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("bundle", nargs="?", help="bundle directory (NAME.pcedge) to sign")
    parser.add_argument("--key", type=Path, metavar="KEY", help="private key file (PEM) to sign with")
    parser.add_argument("--generate-key", type=Path, metavar="KEY",
                        help="write a new key pair: KEY (private, mode 0600: keep it off the devices) and KEY.pub")


def run(args: argparse.Namespace) -> int:
    from pcedge.runtime.bundle import MANIFEST, BundleError, open_bundle
    from pcedge.runtime.signing import SignatureError, generate_key, key_id, load_public_key, sign_manifest

    if args.generate_key is None and (args.bundle is None or args.key is None):
        print("pcedge sign: give BUNDLE --key KEY to sign, or --generate-key KEY to make a key pair", file=sys.stderr)
        return 2
    try:
        if args.generate_key is not None:
            private, public = generate_key(args.generate_key)
            print(f"wrote       {private} (private key, mode 0600: keep it on the signing workstation only)")
            print(f"wrote       {public} (public key {key_id(load_public_key(public))}: copy it to the devices)")
            if args.bundle is None or args.key is None:
                print(f"next: pcedge sign BUNDLE --key {private}")
                return 0
        bundle = open_bundle(args.bundle, verify=True)  # sign only what verifies
        signature = sign_manifest(bundle.root / MANIFEST, args.key)
    except (SignatureError, BundleError, OSError) as exc:
        print(f"pcedge sign: {exc}", file=sys.stderr)
        return 2
    print(f"wrote       {signature} (Ed25519 over {MANIFEST}, which lists every file's sha256)")
    print(f"next: pcedge pack {bundle.root} -o ARCHIVE.tar.gz; on the device: pcedge unpack ARCHIVE.tar.gz DEST "
          f"--trust {args.key.name}.pub")
    return 0
