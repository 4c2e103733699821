"""Command line: one sub-command per module of this package; each registers its flags and runs one function."""
from __future__ import annotations

import argparse
import sys

from ..errors import FlowError
from ..util.devices import flush_denormals
from ..util.logs import show_logs
from . import bench, demo, evaluate, export, preprocess, realtime, sample, smoke, train

COMMANDS = (preprocess, train, sample, realtime, export, evaluate, bench, demo, smoke)  # in the order --help lists them


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="codicodec-flow",
                                     description="Streaming music continuation in CoDiCodec's latent space.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        command.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; a user-facing error is one line on stderr and exit status 2, Ctrl-C is 130."""
    flush_denormals()  # every command: training's first steps and a live stream must not stall on subnormals
    args = build_parser().parse_args(argv)
    show_logs()
    try:
        return int(args.func(args) or 0)
    except FlowError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
