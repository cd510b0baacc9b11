"""``hwrel report``: one command from a model to a reliability report an engineer can sign."""
from __future__ import annotations

import argparse

from hwrel.cli.common import add_model_args, fraction
from hwrel.errors import HwrelError


def add_parser(sub: argparse._SubParsersAction) -> None:
    from hwrel.report import DEFAULT_ACCELERATOR, DEFAULT_MODEL

    p = sub.add_parser(
        "report", help="reliability report (HTML, Markdown, CSV) of a model on an accelerator",
        description="Run every analysis on MODEL mapped onto an accelerator (Fep bounds and tolerance, "
                    "safe bit width, SEU/FIT/mission), validate each certified number by fault injection, "
                    f"and write reports/<model>-<accelerator>/. Without MODEL: {DEFAULT_MODEL} on "
                    f"{DEFAULT_ACCELERATOR}. A model the bounds do not support (attention, LayerNorm, ...) gets "
                    "the measured analyses only (exact general injection path); every certified section says "
                    "why it is not applicable.")
    add_model_args(p, default=DEFAULT_MODEL)
    p.add_argument("--accelerator", default=DEFAULT_ACCELERATOR,
                   help=f"accelerator name (see `hwrel accelerators`) or a .toml file (default {DEFAULT_ACCELERATOR})")
    p.add_argument("--max-accuracy-drop", type=fraction, default=0.01, metavar="DROP",
                   help="accuracy budget, e.g. 1%% or 0.01 (default 1%%)")
    p.add_argument("--mission-hours", type=float, default=87600.0, help="mission length in hours (default 87600)")
    p.add_argument("--target", default="asil-b", help="reliability target, e.g. asil-b, asil-d, sil3, or none")
    p.add_argument("--out", default=None, metavar="DIR", help="output folder (default reports/<model>-<accelerator>)")
    p.add_argument("--force", action="store_true", help="replace the output folder if it exists")
    p.add_argument("--seed", type=int, default=0, help="seed of every random choice (default 0)")
    p.add_argument("--quick", action="store_true",
                   help="a quick draft: fewer inputs, failure sets, flips and bit widths, random failure "
                        "sets only, no per-layer widths (about 10 s on the digits models, 25-40 s on the "
                        "reference CNNs); the default profile is the one to sign")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from hwrel.report import QUICK, build_report

    if not 0 <= args.max_accuracy_drop < 1:
        raise HwrelError(f"--max-accuracy-drop must be in [0, 100%), got {args.max_accuracy_drop:g}")
    target = None if args.target.lower() == "none" else args.target
    shape = tuple(int(v) for v in args.input_shape.split(",")) if args.input_shape else None
    if args.label_column is not None and args.data is None and args.calibration is None:
        raise HwrelError("--label-column names a column of --data; give --data FILE")
    # The report's "how to reproduce" command is rebuilt from these options (hwrel.report._command).
    path = build_report(args.model, args.accelerator, out=args.out, force=args.force,
                        max_accuracy_drop=args.max_accuracy_drop, mission_hours=args.mission_hours,
                        target=target, seed=args.seed, progress=not args.quiet, trust_pickle=args.trust_pickle,
                        architecture=args.architecture, architecture_args=args.architecture_args,
                        data=args.data, calibration=args.calibration, label_column=args.label_column,
                        input_domain=args.input_domain, input_shape=shape, config=QUICK if args.quick else None)
    print(path / "index.html")
    return 0
