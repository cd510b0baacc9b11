"""``hwrel boost``: quorums that let neurons fire early, with a certified error and a latency simulation."""
from __future__ import annotations

import argparse

import torch

from hwrel.boosting import BOOST_METHODS, SUBSTITUTES, boosting, simulate
from hwrel.cli.common import _ints, add_model_args, load_network, model_info, print_json
from hwrel.errors import HwrelError


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("boost", help="boosting: quorums per layer with a certified output error, and a "
                       "latency simulation", description="Choose (or certify) how many input signals each "
                       "neuron waits for, with the substitute value for missing ones and a certified bound on "
                       "the output error; then simulate message passing with random link latencies, with and "
                       "without quorums. Dense (MLP) models only.")
    add_model_args(p)
    p.add_argument("--epsilon", type=float, default=None, help="error budget (output units) quorums must meet")
    p.add_argument("--epsilon-prime", type=float, default=0.0, help="the network's own error eps' (default 0)")
    p.add_argument("--quorum", default=None, help="certify these quorums instead, e.g. 64,64,58 "
                   "(one per receiving layer: hidden layers, then the output)")
    p.add_argument("--latency", default="pareto:1.5",
                   help="link latency: exp:MEAN, lognormal:MU,SIGMA or pareto:ALPHA[,SCALE] (default pareto:1.5)")
    p.add_argument("--substitute", default="neuron", choices=SUBSTITUTES,
                   help="substitute per sender (its range midpoint) or one per layer")
    p.add_argument("--method", default="interval", choices=BOOST_METHODS, help="bound used to choose quorums")
    p.add_argument("--samples", type=int, default=None, help="simulate on this many inputs (default: all "
                   "test inputs, --data or a built-in model's; 1000 random domain points without data)")
    p.add_argument("--repeats", type=int, default=1, help="latency draws per input")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    md, net = load_network(args)
    quorum = _ints(args.quorum, "--quorum") if args.quorum else None
    plan = boosting(net, args.epsilon, quorum=quorum, epsilon_prime=args.epsilon_prime,
                    substitute=args.substitute, method=args.method)
    if args.samples is not None and args.samples < 1:
        raise HwrelError(f"--samples must be >= 1, got {args.samples}")
    labels = None
    if md.x is not None:
        inputs, labels = md.x, md.y
    else:
        g = torch.Generator().manual_seed(args.seed)
        n = args.samples or 1000
        inputs = net.input_lo + (net.input_hi - net.input_lo) * torch.rand(n, *net.input_shape, generator=g,
                                                                           dtype=net.input_lo.dtype)
    if args.samples is not None:
        inputs = inputs[:args.samples]
        labels = labels[:args.samples] if labels is not None else None
    sim = simulate(net, plan, inputs, args.latency, seed=args.seed, repeats=args.repeats, labels=labels)
    summary = sim.summary()
    if args.json:
        print_json({**model_info(md), "plan": plan.to_dict(), "simulation": summary})
        return 0
    print(f"model {md.name}: {net}")
    print(md.domain_note)
    if plan.epsilon is not None:
        print(f"budget epsilon - epsilon' = {plan.budget:.6g}; quorums chosen with the {plan.method} bound")
    table = plan.table()
    print(table.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    print(f"certified output error: {plan.certified:.6g} (interval), {plan.certified_paper:.6g} (paper formula)")
    if plan.relaxed == (0,) * len(plan.relaxed):
        print("no relaxation fits the budget: every neuron waits for all its inputs")
    print(f"simulation: {summary['runs']} runs, link latency {summary['latency']}")
    for q in ("p50", "p99"):
        print(f"  {q} latency: {summary[q + '_full']:.4g} without quorums, {summary[q + '_quorum']:.4g} with "
              f"({100 * summary[q + '_reduction']:.1f} % lower)")
    print(f"  measured output error: max {summary['max_error']:.4g}, mean {summary['mean_error']:.4g} "
          f"({'within' if summary['within_certified'] else 'ABOVE'} the certified {plan.certified:.4g})")
    if "accuracy_full" in summary:
        print(f"  measured accuracy: {summary['accuracy_full']:.2%} without quorums, "
              f"{summary['accuracy_quorum']:.2%} with")
    return 0
