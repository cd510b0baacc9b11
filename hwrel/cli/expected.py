"""``hwrel expected``: expected output error under random crashes: sound bound, first order, Monte Carlo."""
from __future__ import annotations

import argparse

from hwrel.cli.common import add_model_args, fraction, load_network, model_info, percent, print_json
from hwrel.errors import HwrelError
from hwrel.expected import expected_error


def _floats(text: str) -> list[float]:
    return [percent(v, "-p") for v in text.split(",")]


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("expected", help="expected output error under independent random crashes",
                       description="For independent crash probabilities per hidden layer: sound bounds on the "
                       "expected output error (theory 6 and a per-neuron form), the first-order estimate, and a "
                       "Monte Carlo injection with confidence intervals; each failing layer alone, then all.")
    add_model_args(p)
    p.add_argument("-p", "--p", dest="p", required=True, help="crash probability per hidden layer, e.g. 0.01,0.01 or 1%%,1%%")
    p.add_argument("--trials", type=int, default=1000, help="Monte Carlo crash draws per input")
    p.add_argument("--samples", type=int, default=None, help="inputs to use (default: the test data, --data "
                   "or a built-in model's; 256 uniform domain points without data)")
    p.add_argument("--confidence", type=fraction, default=0.95, help="of the intervals, e.g. 0.95 or 95%%")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    md, net = load_network(args)
    if args.samples is not None and args.samples < 1:
        raise HwrelError(f"--samples must be >= 1, got {args.samples}")
    inputs = labels = None
    if md.x is not None:
        inputs, labels = md.x[:args.samples], (md.y[:args.samples] if md.y is not None else None)
    res = expected_error(net, _floats(args.p), inputs=inputs, trials=args.trials, samples=args.samples or 256,
                         seed=args.seed, confidence=args.confidence, labels=labels)
    if args.json:
        print_json({**model_info(md), **res.to_dict()})
        return 0
    print(f"model {md.name}: {net}")
    print(md.domain_note)
    print(f"crash probabilities {list(res.p)}; {res.inputs} inputs x {res.trials} trials; "
          f"{100 * res.confidence:g} % intervals")
    t = res.table.drop(columns=["p"])
    print(t.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    print("bound_paper / bound: sound over the input domain; bound_data: sound, per input, averaged; "
          "mc_abs: measured E|dF| (largest output); fo_*: first-order estimate vs Monte Carlo")
    return 0
