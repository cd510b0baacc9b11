"""``hwrel bound``: certified worst-case output error under neuron or synapse failures."""
from __future__ import annotations

import argparse

from hwrel.bounds import METHODS, fep
from hwrel.bounds.faults import KINDS
from hwrel.cli.common import add_model_args, load_network, model_info, parse_counts, print_json


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bound", help="certified output-error bound (Forward Error Propagation) under failures",
                       description="Certified bound on max over outputs and inputs in the domain of "
                                   "|F(x) - F_faulty(x)| for the given failures per layer.")
    add_model_args(p)
    p.add_argument("--failures", required=True,
                   help="failures per hidden layer, e.g. 2,0,1 (per affine layer for synapse faults)")
    p.add_argument("--fault", default="crash", choices=KINDS)
    p.add_argument("--capacity", type=float, default=None, help="Byzantine capacity C (largest |value| sent)")
    p.add_argument("--mode", default="safe", choices=("safe", "paper"),
                   help="Byzantine per-failure error: safe C + sup|y| (always sound) or the paper's C")
    p.add_argument("--method", default="best", choices=METHODS)
    p.add_argument("--at-most", action="store_true", help="bound every failure vector <= FAILURES")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    md, net = load_network(args)
    res = fep(net, parse_counts(args.failures), args.fault, capacity=args.capacity, mode=args.mode,
              method=args.method, at_most=args.at_most)
    payload = {**model_info(md), "layers": net.layer_names(), "layer_sizes": net.layer_sizes(), **res.to_dict()}
    if args.json:
        print_json(payload)
        return 0
    print(f"model {md.name}: {net}")
    print(md.domain_note)
    print(f"fault {res.fault}, failures {list(res.failures)}{' (at most)' if res.at_most else ''}")
    for m, v in res.by_method.items():
        mark = "  <- reported" if m == res.method else ""
        print(f"  {m:9s} {v:.6g}{mark}")
    print(f"certified bound ({res.method}): {res.bound:.6g} (output units, max over outputs and the input domain)")
    return 0
