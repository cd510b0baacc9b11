"""``hwrel expected``: expected output error under random crashes: sound bound, first order, Monte Carlo."""
from __future__ import annotations

import argparse

from hwrel.cli.common import add_model_args, load_network, print_json
from hwrel.errors import HwrelError
from hwrel.expected import expected_error


def _floats(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",")]
    except ValueError:
        raise HwrelError(f"-p must be comma-separated probabilities, e.g. 0.01,0.01; got {text!r}") from None


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("expected", help="expected output error under independent random crashes",
                       description="For independent crash probabilities per hidden layer: sound bounds on the "
                       "expected output error (theory 6 and a per-neuron form), the first-order estimate, and a "
                       "Monte Carlo injection with confidence intervals; each failing layer alone, then all.")
    add_model_args(p)
    p.add_argument("-p", "--p", dest="p", required=True, help="crash probability per hidden layer, e.g. 0.01,0.01")
    p.add_argument("--trials", type=int, default=1000, help="Monte Carlo crash draws per input")
    p.add_argument("--samples", type=int, default=None, help="inputs to use (default: the built-in model's "
                   "test set, or 256 uniform domain points for a file)")
    p.add_argument("--confidence", type=float, default=0.95)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    lm, net = load_network(args)
    if args.samples is not None and args.samples < 1:
        raise HwrelError(f"--samples must be >= 1, got {args.samples}")
    inputs = None
    if lm.reference is not None:
        inputs = lm.reference.x_test[:args.samples] if args.samples else lm.reference.x_test
    res = expected_error(net, _floats(args.p), inputs=inputs, trials=args.trials, samples=args.samples or 256,
                         seed=args.seed, confidence=args.confidence)
    if args.json:
        print_json({"model": lm.name, **res.to_dict()})
        return 0
    print(f"model {lm.name}: {net}")
    print(f"crash probabilities {list(res.p)}; {res.inputs} inputs x {res.trials} trials; "
          f"{100 * res.confidence:g} % intervals")
    t = res.table.drop(columns=["p"])
    print(t.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    print("bound_paper / bound: sound over the input domain; bound_data: sound, per input, averaged; "
          "mc_abs: measured E|dF| (largest output); fo_*: first-order estimate vs Monte Carlo")
    return 0
