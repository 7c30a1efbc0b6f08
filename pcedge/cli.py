"""The ``pcedge`` command: one sub-command per module.

Each command lives in its own module exposing ``HELP`` (one line), ``add_arguments(parser)`` and
``run(args) -> int``. Those modules import heavy packages (torch, tensorrt) inside ``run`` only, so
``pcedge --help`` and every device command work on a machine without torch. This composition root is the
only place that names both sides; ``pcedge.runtime`` itself never imports ``pcedge.export``.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from . import __version__

#: (command, module). Order is the order of a user's workflow.
COMMANDS: list[tuple[str, str]] = [
    ("export", "pcedge.commands.export"),
    ("info", "pcedge.commands.info"),
    ("predict", "pcedge.commands.predict"),
    ("verify", "pcedge.commands.verify"),
    ("eval", "pcedge.commands.eval"),
    ("bench", "pcedge.commands.bench"),
    ("build-engine", "pcedge.commands.build_engine"),
    ("pack", "pcedge.commands.pack"),
    ("unpack", "pcedge.commands.unpack"),
    ("watch", "pcedge.commands.watch"),
    ("triton", "pcedge.commands.triton"),
    ("serve", "pcedge.commands.serve"),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pcedge",
        description="PatchCore anomaly detection for edge GPUs: export on a workstation, run on the device.",
    )
    parser.add_argument("--version", action="version", version=f"pcedge {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, module_name in COMMANDS:
        module = importlib.import_module(module_name)
        command = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(command)
        command.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
