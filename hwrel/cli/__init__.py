"""The ``hwrel`` command line: a thin layer over the Python API.

Each subcommand lives in its own module ``hwrel/cli/<name>.py`` exposing
``add_parser(subparsers)`` (registers the subcommand and its options) and ``run(args) -> int``.
Bad input (:class:`hwrel.errors.HwrelError`) prints ``hwrel: error: <one line>`` and exits 2; so
do usage errors (:class:`hwrel.cli.common.Parser`: one line with a pointer to ``--help``).
"""
from __future__ import annotations

import argparse
import importlib
import sys

from hwrel.errors import HwrelError

# Order is the order shown by `hwrel --help`. A module that is missing is skipped.
COMMANDS = [
    "report", "models", "bound", "tolerance", "inject", "bitwidth", "seu", "accelerators",
    "boost", "tradeoff", "expected",
]


def build_parser() -> argparse.ArgumentParser:
    from hwrel import __version__

    from hwrel.cli.common import Parser

    parser = Parser(
        prog="hwrel",
        description="Hardware reliability and quantization analysis for neural networks.",
    )
    parser.add_argument("--version", action="version", version=f"hwrel {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"hwrel.cli.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"hwrel.cli.{name}":
                continue
            raise
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help / --version (0), or a usage error already printed in one line (2)
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except HwrelError as exc:
        print(f"hwrel: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("hwrel: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
