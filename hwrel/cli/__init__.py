"""The ``hwrel`` command line: a thin layer over the Python API.

Each subcommand lives in its own module ``hwrel/cli/<name>.py`` exposing
``add_parser(subparsers)`` (registers the subcommand and its options) and ``run(args) -> int``.
Bad input (:class:`hwrel.errors.HwrelError`) prints ``hwrel: error: <one line>`` and exits 2; so
do usage errors (:class:`hwrel.cli.common.Parser`: one line with a pointer to ``--help``).
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

from hwrel.errors import HwrelError

# Order is the order shown by `hwrel --help`. A module that is missing is skipped.
COMMANDS = [
    "report", "models", "bound", "tolerance", "inject", "bitwidth", "seu", "accelerators",
    "boost", "tradeoff", "expected",
]
# One line per command for `hwrel --help`, so that listing the commands imports none of them
# (tests/test_cli_startup.py checks these equal what each module registers).
HELP = {
    "report": "reliability report (HTML, Markdown, CSV) of a model on an accelerator",
    "models": "list the built-in reference models",
    "bound": "certified output-error bound (Forward Error Propagation) under failures",
    "tolerance": "largest tolerated failures per layer within an error budget",
    "inject": "run a fault-injection campaign",
    "bitwidth": "smallest safe weight bit width, predicted and verified",
    "seu": "bit flips in accelerator memory: certified flips, FIT, mission",
    "accelerators": "list and validate accelerator descriptions",
    "boost": "boosting: quorums per layer with a certified output error, and a latency simulation",
    "tradeoff": "robustness vs learning cost: train MLPs of several widths and regularisations, "
                "compare eps' + Fep with eps",
    "expected": "expected output error under independent random crashes",
}


# Environment a command sets (unless already set) before it imports torch. OpenMP threads that
# spin while they wait cost fault injection (many small parallel steps) most of its time as soon as
# the cores are shared with anything else: measured 30x slower on a busy 2-core machine.
# `hwrel report` injects too (1,000-flip campaigns; mnist-vit's on the general path: 143 s spinning vs
# 6 s passive on the busy 2-core machine, 2026-12-03).
_ENV = {"inject": {"OMP_WAIT_POLICY": "PASSIVE"}, "report": {"OMP_WAIT_POLICY": "PASSIVE"}}


def _command_of(argv: list[str]) -> str | None:
    """The subcommand named on the command line (the first word that is not an option)."""
    for a in argv:
        if not a.startswith("-"):
            return a if a in COMMANDS else None
    return None


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The full parser; with ``only``, that command's parser in full and the others as stubs
    (their one-line help only), so nothing but the command that runs is imported."""
    from hwrel import __version__

    from hwrel.cli.common import Parser

    parser = Parser(
        prog="hwrel",
        description="Hardware reliability and quantization analysis for neural networks.",
    )
    parser.add_argument("--version", action="version", version=f"hwrel {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        if only is not None and name != only:
            sub.add_parser(name, help=HELP[name])
            continue
        try:
            module = importlib.import_module(f"hwrel.cli.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"hwrel.cli.{name}":
                continue
            raise
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    command = _command_of(argv)
    if "torch" not in sys.modules:
        for key, value in _ENV.get(command or "", {}).items():
            os.environ.setdefault(key, value)
    parser = build_parser(only=command or "")
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help / --version (0), or a usage error already printed in one line (2)
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    if args.command is None:
        parser.print_help()
        return 0
    import warnings

    # torch.export's own deprecation notice, raised on every copy of an exported program (a Hugging
    # Face folder): not the user's to act on
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)", category=FutureWarning)
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
