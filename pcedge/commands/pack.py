"""``pcedge pack``: one .tar.gz of a bundle, for copying or flashing to a device."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pcedge.commands.common import q
from pcedge.runtime.archive import archive_digest, pack
from pcedge.runtime.bundle import BundleError
from pcedge.runtime.files import STREAM, output_kind

HELP = "pack a bundle into one verified .tar.gz for copying to a device"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("bundle", help="bundle directory (NAME.pcedge)")
    parser.add_argument("-o", "--output", required=True, type=Path, metavar="FILE", help="archive to write (.tar.gz)")
    parser.add_argument("--force", action="store_true", help="replace FILE if it exists (a regular file only)")
    parser.add_argument("--include-engines", action="store_true",
                        help="also pack TensorRT engines (they only run on the GPU and TensorRT they were built with)")


def run(args: argparse.Namespace) -> int:
    try:
        _, kind = output_kind(args.output)
        out = pack(args.bundle, args.output, include_engines=args.include_engines, force=args.force)
    except (BundleError, OSError) as exc:
        print(f"pcedge pack: {exc}", file=sys.stderr)
        return 2
    engines = "with engines" if args.include_engines else "without engines (build them on the device)"
    if kind == STREAM:  # a device or pipe: it cannot be read back for its size and digest
        print(f"wrote       {out} (a device or pipe, {engines})")
        return 0
    print(f"wrote       {out} ({out.stat().st_size / 1e6:.2f} MB, {engines})")
    print(f"sha256      {archive_digest(out)}")
    print(f"next: copy {q(out.name)} to the device, then: pcedge unpack {q(out.name)} {q(Path(args.bundle).resolve().name)}")
    return 0
