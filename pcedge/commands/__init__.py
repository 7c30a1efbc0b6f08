"""One module per ``pcedge`` verb, each thin: parse the arguments, call the library, print.

Each module exposes ``HELP`` (one line), ``add_arguments(parser)`` and ``run(args) -> int``, and imports
heavy packages (torch, tensorrt) inside ``run`` only, so that ``pcedge --help`` and every device command work
on a machine without torch. ``common.py`` holds the detector arguments the device commands share.
"""
