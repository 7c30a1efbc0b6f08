"""The ``pcedge`` command: one sub-command per module.

Each command lives in its own module exposing ``HELP`` (one line), ``add_arguments(parser)`` and
``run(args) -> int``. Those modules import heavy packages (torch, tensorrt) inside ``run`` only, so
``pcedge --help`` and every device command work on a machine without torch. This composition root is the
only place that names both sides; ``pcedge.runtime`` itself never imports ``pcedge.export``.
"""

from __future__ import annotations

import argparse
import importlib
import os
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
    ("sign", "pcedge.commands.sign"),
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


#: Exit code after the reader of our output went away (``pcedge info B | head -1``): what a shell reports for
#: a program killed by SIGPIPE (128 + 13), the usual outcome for a command whose output nobody reads.
EXIT_BROKEN_PIPE = 141


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so that the interpreter's final flush does not fail a second time."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):  # stdout already closed or not a real file (pytest's capture)
        pass


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code = int(args._run(args) or 0)
        sys.stdout.flush()  # here, not at interpreter exit, so that a closed pipe is caught below
        return code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader (head, less, grep -q) closed the pipe: nothing is wrong, and nobody wants a traceback.
        _silence_stdout()
        return EXIT_BROKEN_PIPE


if __name__ == "__main__":
    sys.exit(main())
