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
import time

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


# OpenMP threads that spin while they wait cost fault injection (many small parallel steps) most of
# its time as soon as the cores are shared with anything else: measured 30x slower on a busy 2-core
# machine, and `hwrel report mnist-vit` 143 s spinning vs 6 s passive (2026-12-03). On idle cores
# the passive wait costs instead: every parallel step wakes its threads from sleep (the report's
# bit-width certificates on mnist-resnet 1.5-1.9x slower, 2026-12-04: 123-150 s vs 77 s). So
# `inject` and `report` wait passively where other work already keeps the cores busy when they
# start (at least BUSY_CORES cores' worth, sampled from /proc/stat over 0.1 s; else the 1-minute load
# average; neither: passive), unless the variable is set. libgomp reads it once, when torch loads:
# it cannot follow the load during a run.
_PASSIVE_WHEN_BUSY = ("inject", "report")
BUSY_CORES = 0.5


def _cores_in_use(interval: float = 0.1) -> float:
    """Cores' worth of CPU time the rest of the machine used over ``interval`` seconds (this process
    sleeps meanwhile); the 1-minute load average where /proc/stat is missing."""
    def sample() -> tuple[int, int]:
        with open("/proc/stat") as fh:
            v = [int(t) for t in fh.readline().split()[1:9]]  # user nice system idle iowait irq softirq steal
        return sum(v), v[3] + v[4]

    try:
        t0, i0 = sample()
        time.sleep(interval)
        t1, i1 = sample()
    except (OSError, ValueError, IndexError):
        return os.getloadavg()[0]
    total = t1 - t0
    return (total - (i1 - i0)) / total * (os.cpu_count() or 1) if total > 0 else 0.0


def _omp_environment(command: str | None) -> None:
    """Set ``OMP_WAIT_POLICY=PASSIVE`` for ``command`` where :data:`_PASSIVE_WHEN_BUSY` says so."""
    if command not in _PASSIVE_WHEN_BUSY or "torch" in sys.modules or "OMP_WAIT_POLICY" in os.environ:
        return
    try:
        busy = _cores_in_use() >= BUSY_CORES
    except (AttributeError, OSError):  # no load figure at all (Windows): the safe choice on shared cores
        busy = True
    if busy:
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"


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
    _omp_environment(command)
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
