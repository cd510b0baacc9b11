"""``hwrel seu``: SEU tolerance, FIT and mission reliability of a model on an accelerator."""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile

from hwrel.cli.common import add_model_args, check_writable, fraction, load, model_info
from hwrel.errors import HwrelError


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("seu", help="bit flips in accelerator memory: certified flips, FIT, mission",
                       description="Map MODEL's weights onto an accelerator's memories, certify "
                       "how many arbitrary bit flips it tolerates within a budget, bound and "
                       "measure the vulnerable fraction of bits, and turn it into FIT (with and "
                       "without ECC) and mission failure probabilities. On a model the bounds do not support (a ViT, a "
                       "GPT) nothing is certified: random flips are injected on the exact general path and the "
                       "vulnerable fraction, FIT and mission figures are estimates from them.")
    add_model_args(p)
    p.add_argument("--accelerator", required=True, help="accelerator name (hwrel accelerators) "
                   "or a .toml description")
    p.add_argument("--format", default=None, help="weight storage format (default: the "
                   "accelerator's first)")
    p.add_argument("--memory", default=None, help="put every layer in this memory")
    p.add_argument("--mission-hours", type=float, required=True)
    p.add_argument("--altitude-m", type=float, default=0.0)
    p.add_argument("--scrub-hours", type=float, default=None,
                   help="weights reloaded every so many hours (default: never)")
    p.add_argument("--target", default=None, help="asil-b, asil-d, sil3, ...")
    p.add_argument("--epsilon", type=float, default=None,
                   help="output-error budget, domain-wide (default: an accuracy budget)")
    p.add_argument("--max-accuracy-drop", type=fraction, default=None, metavar="DROP",
                   help="accuracy budget, e.g. 1%% or 0.01 (default 1%%)")
    p.add_argument("--range-restriction", action="store_true",
                   help="clamp stored values to each tensor's max |w| (NaN -> 0)")
    p.add_argument("--campaign-size", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--plot", default=None, metavar="DIR",
                   help="write critical_bits.png and mission.png into DIR")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=run)


def _save(fig, path: str) -> None:
    fd, tmp = tempfile.mkstemp(suffix=".png", dir=os.path.dirname(path) or ".")
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=120)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def _breaker_line(b: dict, what: str) -> str:
    alone = "alone breaks the budget" if b["alone"] else "dominates the one-flip bound"
    return (f"  {what}: one flip of bit {b['bit']} ({b['role']}) of {b['tensor']} "
            f"({b['format']}) {alone}: certified damage {b['certified_damage']:.4g}; "
            f"flipping element {b['element']} measured max |output change| "
            f"{b['measured_max_abs_delta']:.4g}, decisions changed on "
            f"{b['measured_decision_changed']:.2%} of the evaluated inputs")


def _why_zero(res) -> list[str]:
    """Why the certified counts are 0, in words (empty when they are not)."""
    out = []
    if res.single_flip_breaker is not None:
        out.append(_breaker_line(res.single_flip_breaker, "why 0"))
    if res.single_flip_breaker_weights is not None:
        out.append(_breaker_line(res.single_flip_breaker_weights, "with biases protected, why 0"))
    if res.certified_flips_with_plan == 0:
        out.append("  with the plan, why 0: " + (
            "the plan protects nothing (the FIT target is met without it)"
            if res.plan_protected_bits == 0 else
            "the plan stops once the FIT target is met, leaving bits whose single flip breaks "
            "the budget unprotected"))
    return out


def run(args: argparse.Namespace) -> int:
    from hwrel.seu import analysis

    if args.plot is not None and not os.path.isdir(args.plot):
        raise HwrelError(f"--plot: {args.plot} is not a directory")
    if args.plot is not None:
        check_writable(args.plot, "--plot", folder=True)
    md = load(args)
    from hwrel.report.general import general_target

    general = general_target(md)
    if general is not None:  # the bounds have no rule for one of its operations: measure only
        return _run_measured(args, md, general)
    if md.train is not None and args.input_domain is None:
        model, data = md.model.reference, None  # a built-in model with its own test split
    else:
        if args.epsilon is None:
            md.labelled("hwrel seu with an accuracy budget (or give --epsilon)")
        model, data = md.network(), ((md.x, md.y) if md.y is not None else None)
    res = analysis.seu_analysis(model, args.accelerator, data=data,
                       format=args.format, memory=args.memory, mission_hours=args.mission_hours,
                       altitude_m=args.altitude_m, scrub_hours=args.scrub_hours,
                       target=args.target, epsilon=args.epsilon,
                       max_accuracy_drop=args.max_accuracy_drop,
                       range_restriction=args.range_restriction, seed=args.seed,
                       campaign_size=args.campaign_size)
    res = dataclasses.replace(res, model=md.name)
    if args.plot is not None:
        from hwrel.seu.plots import critical_bits_heatmap, mission_plot

        _save(critical_bits_heatmap(res), os.path.join(args.plot, "critical_bits.png"))
        _save(mission_plot(res), os.path.join(args.plot, "mission.png"))
    if res.violations:
        print(f"hwrel seu: BOUND VIOLATIONS FOUND: {res.violations} of {res.campaign_size} measured flips exceed "
              "their certificate; the certified figures are NOT trustworthy (report this as a soundness bug)",
              file=sys.stderr)
    if args.json:
        print(json.dumps({**model_info(md), **res.to_dict()}, indent=2))
        return 1 if res.violations else 0
    lo, hi = res.vulnerable_fraction_measured_ci
    lines = [
        f"{res.model} on {res.accelerator} ({res.format}, {res.total_bits} parameter bits), "
        f"budget {res.budget}; {md.domain_note}",
        f"certified tolerated flips: {res.certified_flips}"
        + (" (search cap)" if res.certified_flips_capped else "")
        + f"; biases protected: {res.certified_flips_weights_only}"
        + (" (search cap)" if res.certified_flips_weights_only_capped else "")
        + f"; with the protection plan ({res.plan_protected_bits} bits protected): "
        f"{res.certified_flips_with_plan}"
        + (" (search cap)" if res.certified_flips_with_plan_capped else ""),
        *_why_zero(res),
        f"vulnerable fraction: certified <= {res.vulnerable_fraction_certified:.4g}, measured "
        f"{res.vulnerable_fraction_measured:.4g} [{lo:.4g}, {hi:.4g}] (n={res.campaign_size})",
        f"FIT (altitude factor {res.altitude_factor:.3g}): raw {res.fit_raw:.4g}, model "
        f"{res.fit:.4g} (measured {res.fit_measured:.4g}), with SECDED {res.fit_with_ecc:.4g}",
        f"mission {res.mission_hours:g} h: P(failure) {res.mission_failure_probability:.4g}, "
        f"with SECDED {res.mission_failure_probability_with_ecc:.4g}; expected upsets "
        f"{res.expected_upsets:.4g}",
    ]
    if res.target is not None:
        lines.append(f"target {res.target} (< {res.target_max_fit:g} FIT): "
                     f"{'met' if res.meets_target else 'NOT met'}"
                     f"{'' if res.meets_target else ', with SECDED: ' + ('met' if res.meets_target_with_ecc else 'not met')}")
    print("\n".join(lines))
    crit = res.critical_bits.sort_values("certified_damage", ascending=False).head(10)
    print("\nmost critical bits (certified damage of one flip):")
    print(crit[["tensor", "bit", "role", "certified_damage", "vulnerable_fraction"]]
          .to_string(index=False))
    plan = res.protection_plan
    if len(plan) > 1:
        last = plan.iloc[-1]
        print(f"\nprotection plan: {len(plan) - 1} step(s), {int(last.cumulative_bits)} "
              f"protected bits, FIT {last.fit:.4g}")
    return 1 if res.violations else 0


def _run_measured(args: argparse.Namespace, md, general) -> int:
    """``hwrel seu`` on a model the bounds do not support: random single flips injected by the
    exact general path; the vulnerable fraction, FIT and mission figures are estimates from it
    (nothing is certified, so no flip count is tolerated: k = 0)."""
    from hwrel.report import general as gen
    from hwrel.seu.rates import parse_target
    from hwrel.seu.accelerator import load_accelerator

    reason = gen.bounds_reason(general.reason)
    for flag, given in (("--epsilon", args.epsilon is not None), ("--range-restriction", args.range_restriction),
                        ("--plot", args.plot is not None)):
        if given:
            raise HwrelError(f"{flag} needs the certified analysis, which is not applicable to model {md.name}: "
                             f"{reason}")
    x, y = md.labelled("hwrel seu")
    acc = load_accelerator(args.accelerator)
    if args.target is not None:
        parse_target(args.target)
    fmt = args.format or acc.formats[0]
    if fmt not in acc.formats:
        raise HwrelError(f"--format {fmt}: {acc.name} stores {', '.join(acc.formats)}")
    if args.campaign_size < 1:
        raise HwrelError(f"--campaign-size must be >= 1, got {args.campaign_size}")
    params = gen.parameter_table(md.module, x, fmt, acc, args.memory)
    drop = 0.01 if args.max_accuracy_drop is None else args.max_accuracy_drop
    res = gen.measured_seu(general, acc, x, y, params, fmt=fmt, campaign=args.campaign_size, max_samples=256,
                           seed=args.seed, hours=args.mission_hours, target_name=args.target,
                           max_accuracy_drop=drop, altitude_m=args.altitude_m, scrub_hours=args.scrub_hours,
                           progress=not args.json and sys.stderr.isatty())
    lm = y.dim() == 2
    budget = f"accuracy drop <= {drop:g}" + (" (next-token top-1)" if lm else "")
    lo, hi = res.ci
    if args.json:
        from hwrel.cli.common import print_json

        print_json({**model_info(md), "accelerator": acc.name, "format": fmt, "path": res.path,
                    "certified": gen.not_applicable(reason), "metric": "next-token" if lm else "class",
                    "budget": budget, "samples": res.samples, "campaign_size": res.campaign_size,
                    "total_bits": res.total_bits, "vulnerable": res.vulnerable,
                    "vulnerable_fraction_measured": res.vulnerable_fraction,
                    "vulnerable_fraction_measured_ci": list(res.ci), "budget_breaking": res.budget_breaking,
                    "stored_accuracy": res.stored_accuracy, "float_accuracy": res.float_accuracy,
                    "fit_measured": res.fit, "fit_measured_hi": res.fit_hi, "fit_measured_with_ecc": res.fit_with_ecc,
                    "mission_hours": args.mission_hours,
                    "mission_failure_probability_estimate": res.mission_failure_probability,
                    "mission_failure_probability_estimate_with_ecc": res.mission_failure_probability_with_ecc,
                    "target": res.target, "target_max_fit": res.target_max_fit,
                    "meets_target_estimate": res.meets_target,
                    "memories": res.memories.to_dict("records"), "per_tensor": res.per_tensor.to_dict("records"),
                    "per_bit": res.per_bit.to_dict("records")})
        return 0
    breaking = ("" if res.budget_breaking is None else
                f"; {res.budget_breaking} of them break the budget ({budget})")
    lines = [
        f"{md.name} on {acc.name} ({fmt}, {res.total_bits} parameter bits); {md.domain_note}",
        f"certified figures: {gen.not_applicable(reason)}; every figure below is measured by the exact "
        f"general injection path on {res.samples} inputs (an estimate, not a bound)",
        f"vulnerable fraction (decision changed on an evaluated input): measured {res.vulnerable_fraction:.4g} "
        f"[{lo:.4g}, {hi:.4g}] (95% Wilson, n={res.campaign_size}){breaking}",
        f"stored accuracy {res.stored_accuracy:.2%} (float {res.float_accuracy:.2%})"
        + (" next-token top-1" if lm else ""),
        f"FIT estimate: {res.fit:.4g} (interval upper end {res.fit_hi:.4g}), with SECDED {res.fit_with_ecc:.4g}",
        f"mission {args.mission_hours:g} h: P(failure) estimate {res.mission_failure_probability:.4g}, with SECDED "
        f"{res.mission_failure_probability_with_ecc:.4g} (interval upper end; no flip count certified, k = 0)",
    ]
    if res.target is not None:
        lines.append(f"target {res.target} (< {res.target_max_fit:g} FIT): "
                     f"{'met' if res.meets_target else 'NOT met'} by the estimate's upper end (not certified)")
    print("\n".join(lines))
    top = res.per_tensor.sort_values("vulnerable_fraction", ascending=False, kind="stable").head(10)
    print("\nmost vulnerable tensors (measured):")
    print(top[["tensor", "flips", "vulnerable", "vulnerable_fraction", "ci_hi"]].to_string(index=False))
    return 0
