"""``hwrel tolerance``: how many failures each layer (and the network) provably tolerates."""
from __future__ import annotations

import argparse

from hwrel.bounds import METHODS
from hwrel.bounds.faults import KINDS
from hwrel.bounds.tolerance import tolerance
from hwrel.cli.common import add_model_args, fraction, model_info, print_json
from hwrel.errors import HwrelError, UnsupportedLayerError


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("tolerance", help="largest tolerated failures per layer within an error budget",
                       description="Largest number of failures each layer tolerates alone, and a maximal "
                                   "failure vector, such that the certified bound stays within "
                                   "epsilon - epsilon' (epsilon' = the model's own error). On models the "
                                   "Network bounds do not cover (ViTs, LLaMA-style LMs) the graph bounds "
                                   "are used, sound on each test input, with --epsilon or "
                                   "--max-accuracy-drop.")
    add_model_args(p)
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--epsilon", type=float, help="total output-error budget (output units)")
    g.add_argument("--max-accuracy-drop", type=fraction, default=None,
                   help="graph models: the certified accuracy (with labels) or top-1 agreement (language "
                        "models: per token position) may drop by at most this, e.g. 1%%")
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
    from hwrel.cli.common import load
    from hwrel.report.general import general_target

    md = load(args)
    general = general_target(md)
    if general is not None:
        return _run_graph(args, md, general.reason)
    if args.max_accuracy_drop is not None:
        raise HwrelError(f"--max-accuracy-drop: on model {md.name} (a Network) the tolerance is over the input "
                         "domain: give --epsilon (the accuracy-budget tolerance per layer is in `hwrel report`)")
    net = md.network()
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


def _run_graph(args: argparse.Namespace, md, engine_reason: str) -> int:
    """Tolerance on a general graph (:func:`hwrel.bounds.tolerance.graph_tolerance`): per failure
    layer, sound on each test input."""
    import sys

    from hwrel.bounds.graph import check_supported
    from hwrel.bounds.tolerance import graph_tolerance, own_error_of_outputs
    from hwrel.cli.bound import _refusal
    from hwrel.report.general import bounds_reason

    if args.fault.startswith("synapse"):
        raise HwrelError(f"--fault {args.fault}: the graph bounds of model {md.name} cover neuron faults "
                         "(crash, byzantine)")
    if args.method not in ("best", "interval"):
        raise HwrelError(f"--method {args.method} is not applicable to model {md.name} "
                         f"({bounds_reason(engine_reason)}); its graph bound is an interval bound")
    try:
        check_supported(md.module, md.x)
    except UnsupportedLayerError as exc:
        raise HwrelError(_refusal(md.name, engine_reason, str(exc))) from None
    if md.x is None:
        raise HwrelError(f"hwrel tolerance on model {md.name} needs test inputs (its bounds are per input): "
                         "give --data FILE")
    eps_prime = args.epsilon_prime
    if args.epsilon is not None and eps_prime is None:
        eps_prime = own_error_of_outputs(md.module, md.x, md.y) if md.y is not None else 0.0
    show = not args.json and sys.stderr.isatty()

    def progress(frac: float, msg: str) -> None:
        if show:
            print(f"\r  {msg} ({frac:.0%})\033[K", end="" if frac < 1 else "\n", file=sys.stderr, flush=True)

    try:
        res = graph_tolerance(md.module, md.x, md.y, epsilon=args.epsilon, epsilon_prime=eps_prime or 0.0,
                              max_drop=args.max_accuracy_drop, fault=args.fault, capacity=args.capacity,
                              progress=progress)
    except UnsupportedLayerError as exc:
        raise HwrelError(_refusal(md.name, engine_reason, str(exc))) from None
    if args.json:
        print_json({**model_info(md), "engine_refused": engine_reason, **res.to_dict()})
        return 0
    print(f"model {md.name}: general graph ({bounds_reason(engine_reason)}; bounded over its torch.fx graph)")
    print(f"sound on each of the {res.inputs} test inputs (the bounds over the input domain are vacuous here)")
    if res.criterion == "epsilon":
        print(f"fault {res.fault}, budget {res.budget:.6g} = epsilon {res.epsilon:.6g} - epsilon' "
              f"{res.epsilon_prime:.6g} on every input's largest output change")
    else:
        what = "accuracy" if res.clean_accuracy is not None else "top-1 agreement with the clean model"
        print(f"fault {res.fault}, budget: certified {what} at most {res.budget:.2%} below "
              + (f"the clean {res.clean_accuracy:.2%}" if res.clean_accuracy is not None else "100%"))
    print(res.table.to_string(index=False))
    print("tolerated: the largest count whose bound meets the budget, each layer alone (each bound covers "
          "every set of at most that many failed elements)")
    return 0
