"""``hwrel tolerance``: how many failures each layer (and the network) provably tolerates."""
from __future__ import annotations

import argparse

from hwrel.bounds import METHODS
from hwrel.bounds.faults import KINDS
from hwrel.bounds.tolerance import tolerance
from hwrel.cli.common import add_model_args, load_network, model_info, print_json


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("tolerance", help="largest tolerated failures per layer within an error budget",
                       description="Largest number of failures each layer tolerates alone, and a maximal "
                                   "failure vector, such that the certified bound stays within "
                                   "epsilon - epsilon' (epsilon' = the model's own error).")
    add_model_args(p)
    p.add_argument("--epsilon", type=float, required=True, help="total output-error budget")
    p.add_argument("--epsilon-prime", type=float, default=None,
                   help="the model's own error (default: measured on the test data, --data or a "
                        "built-in model's, as max |logit - one-hot label|; 0 without data)")
    p.add_argument("--fault", default="crash", choices=KINDS)
    p.add_argument("--capacity", type=float, default=None)
    p.add_argument("--mode", default="safe", choices=("safe", "paper"))
    p.add_argument("--method", default="best", choices=METHODS)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    md, net = load_network(args)
    data = None
    if args.epsilon_prime is None and md.y is not None:
        data = (md.x, md.y)
    res = tolerance(net, args.epsilon, args.fault, capacity=args.capacity, mode=args.mode, method=args.method,
                    epsilon_prime=args.epsilon_prime if args.epsilon_prime is not None else (None if data else 0.0),
                    data=data)
    if args.json:
        print_json({**model_info(md), **res.to_dict()})
        return 0
    print(md.domain_note)
    print(f"model {md.name}, fault {res.fault}, budget {res.budget:.6g} = epsilon {res.epsilon:.6g} "
          f"- epsilon' {res.epsilon_prime:.6g} (method {res.method})")
    print(res.table().to_string(index=False))
    print(f"certified bound at the maximal vector: {res.bound_maximal:.6g}")
    return 0
