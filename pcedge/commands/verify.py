"""``pcedge verify``: the on-device acceptance test after flashing, PASS or FAIL per check, with figures; the
checks are :mod:`pcedge.runtime.verification`'s."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pcedge.commands.common import EF, add_detector_arguments, print_skipped, q
from pcedge.runtime.verification import run_checks

def int8_problem(bundle: str, backend: str) -> str | None:
    """Why ``--precision int8`` cannot run on ``bundle`` with ``backend`` (no INT8 graph it runs, or the export's
    gate refused it); None when it can, or when the bundle does not open (the checksum check then reports that)."""
    from pcedge.runtime.backends import int8_graph_problem
    from pcedge.runtime.bundle import BundleError, open_bundle

    try:
        return int8_graph_problem(open_bundle(Path(bundle), verify=False), backend)
    except BundleError:
        return None


HELP = "acceptance test on the device: checksums, backend vs stored reference, index recall (PASS/FAIL)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("bundle", help="bundle directory (NAME.pcedge)")
    add_detector_arguments(parser, index=False)
    parser.add_argument("--ef", type=EF, default=None, help="HNSW query ef to check (default: the bundle's)")


def run(args: argparse.Namespace) -> int:
    if args.precision == "int8" and (problem := int8_problem(args.bundle, args.backend)) is not None:
        print(f"pcedge verify: --precision int8: {problem}", file=sys.stderr)
        return 2
    checks, description = run_checks(args.bundle, args.backend, args.threads, args.precision, args.ef, args.trust,
                                     on_open=lambda backend: print_skipped(backend, args, "verify"))
    if description:
        print(f"pcedge verify {args.bundle}: {description}")
    for check in checks:
        print(f"{'PASS' if check.passed else 'FAIL'}  {check.name:22s} {check.detail}")
    failed = [c for c in checks if not c.passed]
    if failed:
        print(f"FAIL: {len(failed)} of {len(checks)} checks failed. When reporting, include this output and "
              f"`pcedge info {q(args.bundle)}`.")
        return 1
    print(f"PASS: all {len(checks)} checks. next: pcedge watch {q(args.bundle)} SOURCE")
    return 0
