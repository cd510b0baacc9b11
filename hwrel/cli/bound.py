"""``hwrel bound``: certified worst-case output error under neuron or synapse failures."""
from __future__ import annotations

import argparse

from hwrel.bounds import METHODS, fep
from hwrel.bounds.faults import KINDS
import sys

from hwrel.cli.common import add_model_args, model_info, parse_counts, print_json
from hwrel.errors import HwrelError, UnsupportedLayerError


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
    from hwrel.cli.common import load
    from hwrel.report.general import general_target

    md = load(args)
    general = general_target(md)
    if general is not None:
        return _run_graph(args, md, general.reason)
    net = md.network()
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


PAPER_NA = ("not applicable: LayerNorm, softmax and products of two activations have no Lipschitz "
            "constant independent of the input")


def _run_graph(args: argparse.Namespace, md, engine_reason: str) -> int:
    """A model the Network bounds do not cover (ViT, LLaMA-style LM, ...): the sound bounds over its
    torch.fx graph (:func:`hwrel.bounds.graph.graph_certificate`), over the input box and on each
    test input; the paper's Fep is not applicable."""
    from hwrel.bounds.graph import check_supported, graph_certificate
    from hwrel.report.general import bounds_reason

    if args.method not in ("best", "interval"):
        raise HwrelError(f"--method {args.method} is not applicable to model {md.name} "
                         f"({bounds_reason(engine_reason)}); its graph bound is an interval bound: use "
                         "--method best or interval")
    if args.fault.startswith("synapse"):
        raise HwrelError(f"--fault {args.fault}: the graph bounds of model {md.name} cover neuron faults "
                         "(crash, byzantine)")
    try:
        check_supported(md.module, md.x)  # without data: traced only, refused before asking for it
    except UnsupportedLayerError as exc:
        raise HwrelError(_refusal(md.name, engine_reason, str(exc))) from None
    if md.x is None:
        raise HwrelError(f"hwrel bound on model {md.name} needs test inputs (its bounds are per input): "
                         "give --data FILE")
    counts = parse_counts(args.failures)
    x = md.x
    show = not args.json and sys.stderr.isatty()

    def progress(done: int, total: int) -> None:
        if show:
            print(f"\r  bounds on {done}/{total} inputs", end="" if done < total else "\n", file=sys.stderr, flush=True)

    try:
        cert = graph_certificate(md.module, counts, args.fault, inputs=x, domain=md.input_domain,
                                 capacity=args.capacity, progress=progress)
    except UnsupportedLayerError as exc:  # neither the Network nor the graph bounds have a rule
        raise HwrelError(_refusal(md.name, engine_reason, str(exc))) from None
    per = cert.per_input
    domain_note = ("not applicable: token inputs are not a box; the bounds hold on each test input"
                   if cert.domain_bound is None else f"{cert.domain_bound:.6g}")
    payload = {**model_info(md), "path": "graph", "engine_refused": engine_reason,
               "layers": cert.layers, "layer_sizes": [cert.sizes.get(k) for k in cert.layers],
               "fault": args.fault, "failures": [cert.failures[k] for k in cert.layers], "at_most": args.at_most,
               "method": "graph-interval", "paper": PAPER_NA,
               "bound": cert.domain_bound, "bound_over": "input domain" if cert.domain_bound is not None else None,
               "per_input_max": float(per.max()), "per_input_median": float(per.median()), "inputs": int(per.numel()),
               "certified_fraction": None if cert.certified is None else float(cert.certified.double().mean())}
    if args.json:
        print_json(payload)
        return 0
    print(f"model {md.name}: general graph ({bounds_reason(engine_reason)}; "
          "bounded over its torch.fx graph instead)")
    print(md.domain_note)
    print("failure layers: " + ", ".join(f"{k} ({cert.sizes.get(k, '?')} elements)" for k in cert.layers))
    print(f"fault {args.fault}, failures {[cert.failures[k] for k in cert.layers]}"
          f"{' (at most: every rule grows with the failures)' if args.at_most else ''}")
    print(f"  paper     {PAPER_NA}")
    print(f"  graph     {domain_note}  <- reported")
    if cert.domain_bound is not None:
        print(f"certified bound (graph interval): {domain_note} (output units, max over outputs and the input domain)")
    print(f"on the {per.numel()} test inputs (sound per input): max {float(per.max()):.6g}, "
          f"median {float(per.median()):.6g}")
    if cert.certified is not None:
        print(f"top-1 certified unchanged: {int(cert.certified.sum())} of {per.numel()} inputs "
              f"({float(cert.certified.double().mean()):.1%})")
    return 0


def _refusal(name: str, engine_reason: str, graph_reason: str) -> str:
    """One line: what the Network bounds lack (the first unsupported node), then the graph bounds'."""
    from hwrel.data import unsupported_message

    graph = graph_reason.strip().splitlines()[0] if graph_reason.strip() else graph_reason
    return f"{unsupported_message(name, engine_reason)} (graph bounds: {graph})"
