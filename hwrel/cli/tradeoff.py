"""``hwrel tradeoff``: robustness vs learning cost on a reference data set (trains a grid of MLPs)."""
from __future__ import annotations

import argparse

from hwrel.cli.common import check_writable, print_json
from hwrel.errors import HwrelError
from hwrel.tradeoff import ACTIVATIONS, DATASETS, DEFAULT_MIN_ACCURACY, plot, tradeoff


def _list(text: str, kind: type, what: str) -> list:
    try:
        return [kind(v) for v in text.split(",")]
    except ValueError:
        raise HwrelError(f"{what} must be a comma-separated list, got {text!r}") from None


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("tradeoff", help="robustness vs learning cost: train MLPs of several widths and "
                       "regularisations, compare eps' + Fep with eps",
                       description="Train MLPs of several widths and L2 weight-regularisation strengths on a "
                       "reference data set and tabulate (and plot) each one's own error eps', training cost, "
                       "certified Fep for the given crashes per hidden layer and the measured error under them; "
                       "mark the networks with eps' + Fep <= eps.")
    p.add_argument("--dataset", default="digits", choices=sorted(DATASETS))
    p.add_argument("--widths", default="16,32,64,128", help="hidden widths (default 16,32,64,128)")
    p.add_argument("--weight-decays", default="0,1e-4,1e-3,1e-2", help="L2 strengths (default 0,1e-4,1e-3,1e-2)")
    p.add_argument("--depth", type=int, default=2, help="hidden layers (default 2)")
    p.add_argument("--activation", default="sigmoid", choices=sorted(ACTIVATIONS))
    p.add_argument("--failures", type=int, default=1, help="crashed neurons per hidden layer (default 1)")
    p.add_argument("--epsilon", type=float, default=1.5, help="total error budget eps (target units)")
    p.add_argument("--quantile", type=float, default=0.95, help="quantile of the per-input error used as eps'")
    p.add_argument("--max-epochs", type=int, default=100)
    p.add_argument("--target-accuracy", type=float, default=0.97, help="training accuracy that stops training")
    p.add_argument("--min-accuracy", type=float, default=DEFAULT_MIN_ACCURACY,
                   help=f"clean test accuracy (fraction) below which a network never meets the target "
                   f"(default {DEFAULT_MIN_ACCURACY:g}; chance is 0.1 on the 10-class data sets)")
    p.add_argument("--search", type=int, default=100, help="random crash sets tried per network")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write the figure here (PNG)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.depth < 1 or args.max_epochs < 1 or args.search < 0:
        raise HwrelError("--depth and --max-epochs must be >= 1 and --search >= 0")
    if args.out:
        check_writable(args.out, "--out")  # before the training, not after it
    res = tradeoff(args.dataset, widths=_list(args.widths, int, "--widths"),
                   weight_decays=_list(args.weight_decays, float, "--weight-decays"), depth=args.depth,
                   failures=args.failures, epsilon=args.epsilon, quantile=args.quantile,
                   activation=args.activation, max_epochs=args.max_epochs, target_accuracy=args.target_accuracy,
                   search=args.search, seed=args.seed, min_accuracy=args.min_accuracy)
    if args.out:
        plot(res, args.out)
    if args.json:
        print_json(res.to_dict())
        return 0
    print(f"{args.dataset}: {len(res.table)} networks, {res.failures} crash(es) per hidden layer, "
          f"eps = {res.epsilon:g}, eps' = {res.quantile:g}-quantile of max_o |F_o - onehot_o| on the test set")
    print(res.table.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    low = int(res.table["below_min_accuracy"].sum())
    print(f"meeting eps' + Fep <= {res.epsilon:g} with test accuracy >= {res.min_accuracy:.0%}: "
          f"{int(res.table['meets'].sum())} of {len(res.table)}"
          + (f" ({low} below {res.min_accuracy:.0%} clean accuracy never count)" if low else ""))
    if args.out:
        print(f"figure written to {args.out}")
    return 0
