"""``pcedge unpack``: turn an archive from ``pcedge pack`` back into a verified bundle directory."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pcedge.commands.common import q
from pcedge.runtime.archive import unpack
from pcedge.runtime.bundle import BundleError

HELP = "unpack an archive made by `pcedge pack` into a bundle directory, verifying every file first"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("archive", type=Path, help="archive written by `pcedge pack` (.tar.gz)")
    parser.add_argument("dest", type=Path, help="bundle directory to create (NAME.pcedge)")
    parser.add_argument("--force", action="store_true", help="replace DEST if it is a pcedge bundle (anything else is refused)")
    parser.add_argument("--trust", metavar="PUBKEY", default=None,
                        help="refuse the archive unless it is signed by this Ed25519 public key (`pcedge sign`)")


def run(args: argparse.Namespace) -> int:
    try:
        dest = unpack(args.archive, args.dest, force=args.force, trust=args.trust)
    except (BundleError, OSError) as exc:
        print(f"pcedge unpack: {exc}", file=sys.stderr)
        return 2
    signed = f"; signed by the trusted key {args.trust}" if args.trust else ""
    print(f"wrote       {dest} (every file's sha256 matches its manifest{signed})")
    print(f"next: pcedge build-engine {q(dest)}   (or without TensorRT: pcedge verify {q(dest)})")
    return 0
