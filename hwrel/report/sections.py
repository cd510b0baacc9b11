"""The report's analyses of neuron failures and its sections, each a function of analysis results.

:func:`fep_analysis` computes the Forward Error Propagation side (certified bounds per method per
layer, certified tolerated failures, and the measured worst output change of random and
adversarial failure sets on the test data). :func:`validation_checks` puts every prediction beside
its fault-injection measurement. The ``*_section`` functions turn results into
:class:`hwrel.report.render.Section` blocks; a result that is ``None`` gives a section that says
the analysis is not available in this version.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from hwrel.bounds.api import Analyzer
from hwrel.bounds.certify import certified_from_bounds
from hwrel.bounds.faults import FaultModel
from hwrel.bounds.ibp import point_rounding
from hwrel.network import Network
from hwrel.report import figures as figs
from hwrel.report.render import Facts, Fig, Section, Table, Text

# A measurement violates a bound when it exceeds it by more than this (relative, and absolute
# in output units). The bounds cover the float32 rounding of the forwards they compare
# (hwrel.bounds.fp32); this only absorbs the float64 rounding of the measurements themselves.
VIOLATION_TOL = 1e-9
NOT_AVAILABLE = "not available in this version"


@dataclass(frozen=True, eq=False)
class FepResult:
    """Neuron-failure analysis. ``bounds``: certified, per (fault, layer, failures) and method.
    ``tolerance``: certified tolerated failures per layer (accuracy budget). ``measured``: worst
    output change found by random sets and adversarial search (lower ends of the true worst)."""

    capacity: float
    clean_accuracy: float
    max_accuracy_drop: float
    bounds: pd.DataFrame
    tolerance: pd.DataFrame
    measured: pd.DataFrame | None
    accuracy_curve: pd.DataFrame | None = None


def _layer_names(net: Network) -> list[str]:
    return [f"L{k + 1}" for k in range(len(net.layers))]


def _random_worst(net32: Network, x: Tensor, node: int, f: int, fault: FaultModel, sets: int,
                  g: torch.Generator) -> float:
    """Measured: the largest ``max |faulty - clean|`` output change over ``sets`` random sets of
    ``f`` failed neurons of ``node`` (crash, or Byzantine at ``+-capacity``), on every input.

    Exact: bit for bit a faulty forward from the input; the nodes before ``node`` do not see the
    failure, so they run once for all sets."""
    from hwrel.inject.adversarial import _prefix, _resume

    size = net32.nodes[node].size
    pre = _prefix(net32, x, {}, node - 1)[:node]
    ref = _resume(net32, pre, {}, node)
    worst = 0.0
    for _ in range(sets):
        idx = torch.randperm(size, generator=g)[:f]
        vals = None
        if fault.byzantine:
            vals = float(fault.capacity) * (2 * torch.randint(0, 2, (f,), generator=g).float() - 1)
        out = _resume(net32, pre, {node: (idx, vals)}, node)
        d = (out - ref).abs()
        worst = max(worst, math.inf if not bool(torch.isfinite(out).all()) else float(d.max()))
    return worst


def fep_analysis(net: Network, x: Tensor, y: Tensor, *, capacity: float, counts: tuple[int, ...],
                 max_accuracy_drop: float, random_sets: int, adversarial: dict[str, int] | None,
                 seed: int, log: Callable[[str], None] = lambda s: None, full_curve: bool = True,
                 progress: Callable[[float, str], None] | None = None) -> FepResult:
    """Bounds (sound), tolerance (certified accuracy drop within budget; sound) and measurements.

    ``full_curve``: the certified-accuracy curve at 0, 1, 2, 4, ... failures up to the layer size
    (until it reaches 0); False: only at the counts the tolerance search certified anyway.

    ``adversarial``: keyword arguments of :func:`hwrel.inject.adversarial.worst_neuron_failures`
    (steps, restarts, pool_size, inputs); ``None`` skips the search (random sets only).
    ``progress(fraction, message)``: called as each layer's bounds and each measurement finish."""
    say = progress or (lambda frac, msg: None)
    bounds_share = 0.3  # of the whole analysis (measured on the reference CNNs): the rest measures
    an = Analyzer(net)
    faults = (FaultModel("crash"), FaultModel("byzantine", capacity))
    names = _layer_names(net)
    x64 = x.to(torch.float64)
    with torch.no_grad():
        logits = an.net.forward(x64)
    rho_out = point_rounding(an.net, x64)[-1][:, None]  # the clean float32 outputs' own rounding
    clean = float((logits.argmax(1) == y).double().mean())
    rows, tol_rows, curve = [], [], []
    correct = logits.argmax(1) == y
    methods: dict[tuple[str, int, int], dict[str, float]] = {}  # bounds rows and tolerance share them

    def all_methods(fm: FaultModel, k: int, f: int) -> dict[str, float]:
        if (fm.kind, k, f) not in methods:
            vec = [0] * len(net.layers)
            vec[k] = f
            methods[fm.kind, k, f] = an.all_methods(fm, vec, at_most=True)
        return methods[fm.kind, k, f]

    # no failure: only the float32 rounding of the forward; the same for every layer and fault
    zero = an.counts([0] * len(net.layers), faults[0])
    _, cert0 = certified_from_bounds(logits, torch.minimum(an.interval(faults[0], zero, x64, x64, reference="exact"),
                                                           rho_out))
    cert0 = cert0 & correct
    for fi, fm in enumerate(faults):
        kind = fm.kind
        for k, node in enumerate(net.layers):
            say(bounds_share * (fi * len(net.layers) + k) / (len(faults) * len(net.layers)),
                f"bounds and tolerance: {kind} neurons, layer {names[k]} of {len(net.layers)}")
            size = net.nodes[node].size
            for f in counts:
                if f > size:
                    continue
                res = all_methods(fm, k, f)
                rows.append({"fault": kind, "layer": k + 1, "layer_name": names[k], "module": net.nodes[node].name,
                             "neurons": size, "failures": f, **res})

            cache: dict[int, tuple[float, float]] = {0: (clean - float(cert0.double().mean()), 0.0)}
            # A certificate for at most f failures holds for fewer, and one that fails at f fails for
            # more: each input is certified again only where no earlier f decided it.
            certified_up_to = torch.where(cert0, 0, -1)  # largest f certified so far
            refused_from = torch.where(cert0, size + 1, 0)  # smallest f not certified so far

            def cert_drop(f: int) -> tuple[float, float]:
                if f not in cache:
                    vec = [0] * len(net.layers)
                    vec[k] = f
                    dom = all_methods(fm, k, f)["best"] if f else 0.0
                    todo = (correct & (certified_up_to < f) & (refused_from > f)).nonzero().squeeze(1)
                    if len(todo) and f:  # the domain-wide bound alone settles the inputs with wide margins
                        _, by_dom = certified_from_bounds(logits[todo], (dom + rho_out[todo]).expand(-1, logits.shape[1]))
                        certified_up_to[todo[by_dom]] = f
                        todo = todo[~by_dom]
                    if len(todo):
                        xs = x64[todo]
                        # per input against the exact clean network; the domain-wide bound (two float32
                        # forwards) caps it with the clean forward's own rounding added
                        e = torch.minimum(an.interval(fm, an.counts(vec, fm), xs, xs, reference="exact"),
                                          dom + rho_out[todo])
                        pred, cert = certified_from_bounds(logits[todo], e)
                        cert = cert & (pred == y[todo])
                        certified_up_to[todo[cert]] = f
                        refused_from[todo[~cert]] = f
                    good = correct & (certified_up_to >= f)
                    cache[f] = (clean - float(good.double().mean()), dom)
                return cache[f]

            def ok(f: int) -> bool:
                return cert_drop(f)[0] <= max_accuracy_drop + 1e-12

            # largest f whose certified drop is within budget (monotone in f): doubling from 1, then
            # bisection between the last f that held and the first that failed (tolerances are small,
            # so this costs a few certificates where a bisection over [0, size] costs log2(size))
            lo, f = 0, 1
            while f <= size and ok(f):
                lo, f = f, 2 * f
            hi = min(f, size + 1)  # first failing f, or size + 1
            while hi - lo > 1:
                mid = (lo + hi) // 2
                lo, hi = (mid, hi) if ok(mid) else (lo, mid)
            drop, dom = cert_drop(lo)
            tol_rows.append({"fault": kind, "layer": k + 1, "layer_name": names[k], "module": net.nodes[node].name,
                             "neurons": size, "tolerated": lo, "tolerated_fraction": lo / size,
                             "certified_accuracy_drop": drop, "domain_bound_at_tolerated": dom,
                             "certified_accuracy_1_failure": clean - cert_drop(1)[0]})
            f, floor = 0, False
            while f <= size:  # once the certified accuracy is 0, 0 is its (trivially sound) value beyond
                if full_curve or f in cache or f == 0:
                    acc = 0.0 if floor else clean - cert_drop(f)[0]
                    floor = floor or acc <= 0
                    curve.append({"fault": kind, "layer_name": names[k], "failures": f, "certified_accuracy": acc})
                f = 1 if f == 0 else 2 * f
    bounds = pd.DataFrame(rows)
    tolerance = pd.DataFrame(tol_rows)
    measured = None
    if random_sets or adversarial is not None:
        measured = _measure(net, x, bounds, faults, random_sets, adversarial, seed, log,
                            lambda frac, msg: say(bounds_share + (1 - bounds_share) * frac, msg))
    return FepResult(capacity, clean, max_accuracy_drop, bounds, tolerance, measured, pd.DataFrame(curve))


def _measure(net: Network, x: Tensor, bounds: pd.DataFrame, faults, random_sets: int,
             adversarial: dict[str, Any] | None, seed: int, log, progress=None) -> pd.DataFrame:
    try:
        from hwrel.inject import adversarial as adv
    except ImportError:
        adv = None
    net32 = net.to(torch.float32)
    x32 = x.to(torch.float32)
    g = torch.Generator().manual_seed(seed)
    out = []
    by_kind = {fm.kind: fm for fm in faults}
    for r in bounds.itertuples():
        fm = by_kind[r.fault]
        node = net.layers[r.layer - 1]
        with torch.no_grad():
            rnd = _random_worst(net32, x32, node, int(r.failures), fm, random_sets, g) if random_sets else math.nan
        worst_adv = math.nan
        if adversarial is not None and adv is not None:
            vec = [0] * len(net.layers)
            vec[r.layer - 1] = int(r.failures)
            opts = dict(adversarial)
            n_in = opts.pop("inputs", 32)
            at = len(out) / len(bounds)
            step = (lambda f, m, at=at, r=r: progress(at + f / len(bounds),  # noqa: E731
                                                      f"{r.fault} {r.layer_name} f={r.failures}: {m}")
                    ) if progress is not None else None
            res = adv.worst_neuron_failures(net, vec, fm.kind, capacity=fm.capacity, inputs=x32[:n_in],
                                            seed=seed, progress=step, **opts)
            worst_adv = res.max_abs_delta
        msg = f"measured {r.fault} {r.layer_name} f={r.failures}: random {rnd:.4g}, adversarial {worst_adv:.4g}"
        if progress is not None:
            progress((len(out) + 1) / len(bounds), msg)
        else:
            log(msg)
        out.append({"fault": r.fault, "layer": r.layer, "layer_name": r.layer_name, "failures": r.failures,
                    "random_sets": random_sets, "random_worst": rnd, "adversarial_worst": worst_adv,
                    "measured_worst": np.nanmax([rnd, worst_adv])})
    return pd.DataFrame(out)


# ------------------------------------------------------------------------------- validation

def _violated(measured: float, bound: float) -> bool:
    if math.isnan(measured):
        return False
    if math.isinf(bound):
        return False
    return measured > bound + VIOLATION_TOL * max(1.0, abs(bound))


def validation_checks(fep: FepResult | None, bitwidth: Any, seu: Any, attack: tuple[Any, Any] | None = None
                      ) -> pd.DataFrame:
    """One row per (prediction, measurement) pair: ``bound`` (certified), ``measured`` (fault
    injection), ``violated``. A row is also emitted for a certified accuracy above a measured one."""
    rows: list[dict[str, Any]] = []
    if fep is not None and fep.measured is not None:
        m = fep.bounds.merge(fep.measured, on=["fault", "layer", "layer_name", "failures"])
        for r in m.itertuples():
            for method in ("paper", "weights", "interval", "best"):
                b = float(getattr(r, method))
                rows.append({"analysis": f"Fep {r.fault}", "case": f"{r.layer_name} f={r.failures}",
                             "quantity": f"max |output change|, bound: {method}", "bound": b,
                             "measured": float(r.measured_worst), "violated": _violated(float(r.measured_worst), b)})
    if bitwidth is not None:
        t = bitwidth.table
        for r in t.itertuples():
            rows.append({"analysis": "quantization", "case": f"{int(r.bits)} bits",
                         "quantity": "max |output change| on test inputs (certified per input vs Brevitas PTQ)",
                         "bound": float(r.certified_error), "measured": float(getattr(r, "measured_error", math.nan)),
                         "violated": _violated(float(getattr(r, "measured_error", math.nan)), float(r.certified_error))
                         or int(getattr(r, "bound_violations", 0) or 0) > 0})
            if hasattr(r, "measured_accuracy"):
                rows.append({"analysis": "quantization", "case": f"{int(r.bits)} bits",
                             "quantity": "accuracy: certified (lower bound) vs measured PTQ",
                             "bound": float(r.certified_accuracy), "measured": float(r.measured_accuracy),
                             "violated": float(r.certified_accuracy) > float(r.measured_accuracy) + 1e-12
                             or int(getattr(r, "certified_but_broken", 0) or 0) > 0})
    if seu is not None and len(seu.campaign):
        c = seu.campaign
        for (tensor, bit), grp in c.groupby(["tensor", "bit"], sort=True):
            viol = sum(_violated(float(d), float(b)) for d, b in zip(grp.max_abs_delta, grp.certified_damage))
            viol += int((grp.vulnerable & ~grp.certified_vulnerable).sum())
            if "violation" in grp:
                viol += int(grp.violation.sum())
            rows.append({"analysis": "SEU single flips", "case": f"{tensor} bit {int(bit)} ({len(grp)} flips)",
                         "quantity": "max |output change| of one flip (certified per flipped bit)",
                         "bound": float(grp.certified_damage.max()), "measured": float(grp.max_abs_delta.max()),
                         "violated": viol > 0})
        lo_ci, _ = seu.vulnerable_fraction_measured_ci
        rows.append({"analysis": "SEU vulnerable fraction", "case": f"{len(c)} random flips",
                     "quantity": "vulnerable fraction: certified (upper bound) vs measured (95% CI low end)",
                     "bound": float(seu.vulnerable_fraction_certified), "measured": float(lo_ci),
                     "violated": float(lo_ci) > float(seu.vulnerable_fraction_certified) + 1e-12})
    if seu is not None and attack is not None:
        for r in attack:
            if r.broke:  # k certified flips keep the budget, so breaking it takes at least k + 1
                rows.append({"analysis": "SEU adversarial flips", "case": r.method,
                             "quantity": "flips breaking the accuracy budget (measured) vs certified tolerated + 1",
                             "bound": float(seu.certified_flips + 1), "measured": float(r.flips_needed),
                             "violated": r.flips_needed < seu.certified_flips + 1, "must_hold": "measured >= bound"})
    df = pd.DataFrame(rows, columns=["analysis", "case", "quantity", "bound", "measured", "violated"])
    df.insert(5, "must_hold", [m if isinstance(m, str) else ("measured >= bound" if "accuracy" in q
                                                             else "measured <= bound")
                               for q, m in zip(df["quantity"], [r.get("must_hold") for r in rows])])
    return df


def violation_banner(checks: pd.DataFrame, missing: list[str]) -> Text:
    """The one line that says whether any bound was violated; loud when one was."""
    bad = checks[checks["violated"].astype(bool)] if len(checks) else checks
    if len(bad):
        cases = "; ".join(f"{r.analysis} {r.case}: measured {r.measured:.6g} > bound {r.bound:.6g}"
                          for r in bad.head(5).itertuples())
        return Text(f"BOUND VIOLATIONS FOUND: {len(bad)} of {len(checks)} certified predictions were exceeded "
                    f"by fault injection ({cases}). The certified figures in this report are NOT trustworthy; "
                    "report this as a soundness bug.", "alert")
    extra = f" Not validated (analysis {NOT_AVAILABLE}): {', '.join(missing)}." if missing else ""
    return Text(f"Bound violations: none ({len(checks)} certified predictions checked against fault-injection "
                f"measurements).{extra}", "ok")


# ------------------------------------------------------------------------------- sections

def _na(section_id: str, title: str, what: str) -> Section:
    return Section(section_id, title, (Text(f"{what}: {NOT_AVAILABLE}.", "alert"),))


def summary_section(info: dict[str, Any], layers: pd.DataFrame, affine: pd.DataFrame,
                    memories: pd.DataFrame, mapping: pd.DataFrame | None, stored_as: str | None = None) -> Section:
    storage_note = ("`storage`: how the trained model holds its parameters." +
                    (f" On the accelerator they are stored as {stored_as} (biases int32 for integer formats; see "
                     "where each tensor is stored): every SEU figure is about those stored bits." if stored_as else ""))
    facts = Facts(tuple((k, str(v)) for k, v in info.items()))
    blocks: list = [facts,
                    Table("layers", "Hidden layers (neurons that can fail)", layers,
                          note="Activation range: sound interval over the whole input domain."),
                    Table("parameters", "Parameters per affine layer (as trained)", affine, note=storage_note),
                    Table("memories", "Accelerator memories and the model bits stored in each", memories)]
    if mapping is not None:
        blocks.append(Table("mapping", "Where each parameter tensor is stored", mapping))
    return Section("summary", "Model and accelerator", tuple(blocks))


def fep_section(fep: FepResult | None) -> Section:
    if fep is None:
        return _na("fep", "Neuron failures (Forward Error Propagation)", "Neuron-failure bounds")
    figure = figs.svg_bytes(figs.fep_bounds_figure(fep.bounds, fep.measured,
                                                   "certified bound per method vs measured worst"))
    tol_fig = figs.svg_bytes(figs.tolerance_figure(fep.accuracy_curve, fep.clean_accuracy, fep.max_accuracy_drop))
    worst = fep.tolerance.loc[fep.tolerance["tolerated_fraction"].idxmin()]
    return Section("fep", "Neuron failures (Forward Error Propagation)", (
        Text(f"Crash: a failed neuron sends 0. Byzantine: it sends any value with |v| <= C = {fep.capacity:.4g} "
             "(the largest activation any healthy neuron can reach over the input domain). Bounds are certified "
             "upper bounds on max over outputs and all inputs of the domain of |F(x) - F_faulty(x)|, for every "
             "failure set of the given size (logits). `best` is the smallest sound bound."),
        Table("fep_bounds", "Certified bounds per layer and method (failures in one layer)", fep.bounds,
              ("fault", "layer_name", "module", "neurons", "failures", "paper", "weights", "interval", "best")),
        Fig("fep_bounds", "Bounds per method and measured worst case", figure,
            "Log scale. Bars per configuration (layer, failed neurons f): the certified bound of each method "
            "(blue plain: paper, orange hatched: weight-aware, green dotted: interval) and, light grey cross-hatched, "
            "the worst output change found by injection (random and adversarial failure sets on the test data); "
            "it must never exceed any bound."),
        Text(f"Tolerated failures per layer: the largest number of failed neurons in that layer (others healthy) "
             f"for which the certified accuracy on the test set stays within {fep.max_accuracy_drop:.2%} of the "
             f"clean accuracy {fep.clean_accuracy:.2%}, for every choice of the failed neurons. Least tolerant: "
             f"{worst.layer_name} under {worst.fault} faults ({int(worst.tolerated)} of {int(worst.neurons)})."),
        *_zero_tolerance_note(fep),
        Table("fep_tolerance", "Certified tolerated failures per layer", fep.tolerance,
              ("fault", "layer_name", "module", "neurons", "tolerated", "tolerated_fraction",
               "certified_accuracy_drop", "certified_accuracy_1_failure", "domain_bound_at_tolerated")),
        Fig("fep_tolerance", "Certified accuracy against failed neurons per layer", tol_fig,
            "Sound lower bound on the test accuracy with that many failed neurons in one layer (worst choice "
            "of neurons); solid lines and filled markers crash, dashed lines and open markers Byzantine faults, one marker shape per layer and one colour per curve; the dotted black line is the budget. A layer tolerates the counts on or above it; 0 failures is drawn at 0.5 (log axis)."),
    ))


def _zero_tolerance_note(fep: FepResult) -> tuple[Text, ...]:
    """Why a tolerance table of zeros is not an error."""
    t = fep.tolerance
    if not len(t) or int(t["tolerated"].max()) > 0:
        return ()
    worst = ", ".join(f"{r.layer_name} {r.fault} {r.certified_accuracy_1_failure:.1%}" for r in t.itertuples())
    return (Text(f"Every layer tolerates 0 failed neurons: with one failed neuron (the worst one, any input of the "
                 f"domain) the certified accuracy already falls below the budget "
                 f"{fep.clean_accuracy - fep.max_accuracy_drop:.2%} ({worst}). The certificate covers every choice "
                 "of the failed neuron; the injections above measure typical and searched ones, which cost far less.",
                 "note"),)


def bitwidth_section(bw: Any, float_bits: int | None) -> Section:
    title = "Safe bit width (quantization)"
    if bw is None:
        return _na("bitwidth", title, "Safe bit-width analysis")
    fig = figs.svg_bytes(figs.bitwidth_figure(bw.table, bw.spec))
    facts = [("budget", ", ".join(f"{k} = {v}" for k, v in bw.budget.items())), ("quantizer", bw.spec),
             ("recommended uniform width (certified)", f"{bw.certified_bits} bits" if bw.certified_bits else "none"),
             ("width meeting the budget when measured (Brevitas PTQ)", str(bw.measured_bits)),
             ("width meeting it by adversarial search / estimate", f"{bw.adversarial_bits} / {bw.estimated_bits}")]
    if bw.per_layer:
        facts.append(("recommended per-layer widths (certified)",
                      ", ".join(f"{k}: {v}" for k, v in bw.per_layer.items())))
    if bw.memory_saved_bits is not None:
        base = f" of {float_bits} float32 weight bits" if float_bits else ""
        facts.append(("weight memory saved", f"{bw.memory_saved_bits} bits{base} ({bw.memory_saved_percent:.1f}%)"))
    blocks: list = [Facts(tuple(facts))]
    if bw.message:
        blocks.append(Text(bw.message, "alert"))
    if bw.certified_bits is None:
        blocks.append(Text("Per-layer widths: none (no uniform width is certified to start from).", "note"))
    elif "per_layer_s" not in (bw.timings or {}):
        blocks.append(Text("Per-layer widths: not computed (the --quick profile skips the per-layer search).",
                           "note"))
    elif not bw.per_layer:
        blocks.append(Text("Per-layer widths: none found below the uniform width.", "note"))
    blocks += [Fig("bitwidth", "Predicted vs measured per bit width", fig,
                   "Left (log scale): largest output change per weight width: certified bounds over the whole "
                   "input domain (paper, weight-aware, interval), certified per test input, adversarial search, "
                   "estimate and Brevitas PTQ measurement; a value of 0 (a log axis cannot show it) is drawn as "
                   "an open marker at the axis floor. Right: accuracies, with the float model's. Certified "
                   "curves must stay above the measured error and below the measured accuracy."),
               Table("bitwidth", "Per bit width: predicted and measured", bw.table,
                     ("bits", "bound_interval", "certified_error", "measured_error",
                      "certified_accuracy", "adversarial_accuracy", "estimated_accuracy", "measured_accuracy",
                      "bound_violations"))]
    return Section("bitwidth", title, tuple(blocks))


def _breaker(seu) -> str:
    """Why no flip is certified: the single bit that alone can break the budget."""
    b = getattr(seu, "single_flip_breaker", None)
    if not b:
        return ""
    return f" (one flip of {b.get('tensor')} bit {b.get('bit')} can alone exceed the budget)"


def critical_layers(seu: Any) -> pd.DataFrame:
    """Vulnerable bits (certified) per stored tensor, largest share first."""
    c = seu.critical_bits
    g = c.groupby(["tensor", "layer", "part", "format", "memory"], sort=False).agg(
        elements=("elements", "first"), vulnerable_bits=("vulnerable_bits", "sum")).reset_index()
    bits = dict(zip(seu.mapping["tensor"], seu.mapping["bits"])) if "bits" in seu.mapping else {}
    g["stored_bits"] = [bits.get(t, math.nan) for t in g["tensor"]]
    g["vulnerable_fraction"] = g.vulnerable_bits / g.stored_bits
    g["share_of_vulnerable"] = g.vulnerable_bits / max(1, int(g.vulnerable_bits.sum()))
    return g.sort_values("vulnerable_bits", ascending=False, kind="stable").reset_index(drop=True)


def attack_facts(seu: Any, attack: tuple[Any, Any] | None) -> tuple[tuple[str, str], ...]:
    """The flip verdict: certified tolerance beside the fewest flips the searches need."""
    if attack is None:
        return ()
    ours, base = attack

    def one(r) -> str:
        if not r.broke:
            return f"none found within {len(r.flips)} flips (measured accuracy {r.accuracy:.2%})"
        return (f"{r.flips_needed} ({r.describe(4)}): measured accuracy {r.clean_accuracy:.2%} -> {r.accuracy:.2%} "
                f"on {seu.budget.get('samples', '?')} inputs, {r.forwards} exact forwards")
    return (("fewest flips breaking the budget, hwrel search (measured)", one(ours)),
            ("same, progressive bit search baseline (Rakin et al., ICCV 2019)", one(base)))


def seu_section(seu: Any, heatmap: bytes | None, mission: bytes | None, attack: tuple[Any, Any] | None = None,
                options: pd.DataFrame | None = None) -> Section:
    from hwrel.report.summary import failure_vs_fit, k_zero_meaning

    title = "Soft errors (SEU) in accelerator memory"
    if seu is None:
        return _na("seu", title, "SEU tolerance analysis")
    lo, hi = seu.vulnerable_fraction_measured_ci
    verdict = ("no target given" if seu.target is None else
               f"{'MEETS' if seu.meets_target else 'DOES NOT MEET'} {seu.target} (max {seu.target_max_fit:g} FIT) "
               f"without ECC; {'meets' if seu.meets_target_with_ecc else 'does not meet'} it with SECDED ECC")
    plan = seu.protection_plan
    protect = plan[plan["action"] != "none"]
    if len(protect):
        what = "; ".join(f"{r.action} {r.tensor} bit {r.bit} ({r.role})" if r.action == "protect"
                         else str(r.action) for r in protect.head(8).itertuples())
        what = f"to meet the target: {what}" + (" ..." if len(protect) > 8 else "")
    elif seu.meets_target:
        top = seu.critical_bits.sort_values("vulnerable_bits", ascending=False).head(3)
        what = ("nothing is required to meet the target; for extra margin protect first " +
                ", ".join(f"{r.tensor} bit {r.bit} ({r.role})" for r in top.itertuples() if r.vulnerable_bits > 0))
    else:
        what = "no protection plan reaches the target with column-level SECDED (see the plan table)"
    facts = Facts((
        ("storage format", seu.format), ("budget", ", ".join(f"{k} = {v}" for k, v in seu.budget.items())),
        ("stored parameter bits", f"{seu.total_bits:,}"),
        ("certified tolerated flips (any bits)",
         f"{seu.certified_flips}" + (" (capped)" if seu.certified_flips_capped else "") + _breaker(seu)),
        ("certified tolerated flips, biases protected",
         f"{seu.certified_flips_weights_only}" + (" (capped)" if seu.certified_flips_weights_only_capped else "")),
        ("certified tolerated flips, protection plan applied",
         f"{seu.certified_flips_with_plan}" + (" (capped)" if seu.certified_flips_with_plan_capped else "")),
        *attack_facts(seu, attack),
        ("vulnerable fraction, certified (upper bound)", f"{seu.vulnerable_fraction_certified:.4%}"),
        ("vulnerable fraction, measured", f"{seu.vulnerable_fraction_measured:.4%} (95% CI {lo:.4%} .. {hi:.4%}, "
                                          f"{seu.campaign_size} random flips)"),
        ("FIT without ECC (certified vulnerable bits)", f"{seu.fit:.4g} (raw {seu.fit_raw:.4g}; measured-fraction "
                                                        f"estimate {seu.fit_measured:.4g})"),
        ("FIT with SECDED ECC", f"{seu.fit_with_ecc:.4g}"),
        ("mission", f"{seu.mission_hours:g} h at {seu.altitude_m:g} m: "
                    f"P(failure) {seu.mission_failure_probability:.3e} "
                    f"without ECC, {seu.mission_failure_probability_with_ecc:.3e} with ECC"),
        ("verdict", verdict), ("what to protect", what),
    ))
    blocks: list = [Text(f"Verdict: {verdict}.", "ok" if seu.meets_target in (True, None) else "alert"), facts,
                    Text(k_zero_meaning(seu), "note"), Text(failure_vs_fit(seu), "note"),
                    Table("seu_critical_layers", "Critical layers (certified vulnerable bits)", critical_layers(seu))]
    if heatmap is not None:
        blocks.append(Fig("seu_critical_bits", "Critical bit positions", heatmap,
                          "log10 of the certified worst output change of one flip per tensor and bit position; "
                          "percentages: certified vulnerable fraction of that bit column."))
    crit = seu.critical_bits
    blocks.append(Table("seu_critical_bits", "Vulnerable bit columns (certified), most first",
                        crit[crit.vulnerable_bits > 0].sort_values("vulnerable_bits", ascending=False,
                                                                    kind="stable").reset_index(drop=True),
                        ("tensor", "bit", "role", "memory", "elements", "vulnerable_bits", "vulnerable_fraction",
                         "certified_damage", "measured_samples", "measured_vulnerable"), max_rows=12))
    blocks.append(Table("seu_fit", "FIT per memory", seu.memories,
                        ("memory", "protection", "bits", "ser_fit_per_mbit", "vulnerable_fraction", "fit_raw", "fit",
                         "fit_measured", "fit_with_ecc")))
    if mission is not None:
        blocks.append(Fig("seu_mission", "Mission reliability over time", mission,
                          "Probabilities over the mission (log-log; a probability of 0 is not drawn): at least one "
                          "upset, more upsets than the certified tolerance, failure (budget exceeded) without and "
                          "with SECDED ECC, the FIT-only estimate, and the target's allowance FIT limit x t."))
    blocks.append(Table("seu_protection_plan", "Protection plan (greedy, SECDED per bit column)", plan))
    if options is not None:
        blocks.append(Table("hardening", "Hardening options, best certified FIT removed per extra stored bit first",
                            options, note="Certified vulnerable FIT removed (upper bound given the rates) per bit of "
                            "overhead (check bits, limit registers); `certified_flips_after` where the analysis "
                            "certified it, else -."))
    return Section("seu", title, tuple(blocks))


def provenance_section(prov: pd.DataFrame, sens: Any, acc: Any) -> Section:
    """Every rate with its source and status, the accelerator's sources, and the sensitivity."""
    return Section("provenance", "Rates, their sources and the verdict's sensitivity", (
        Text("Status: measured (on this chip), published (read in a document: the accelerator file's `verified` "
             "or `secondary`) or assumed (a placeholder or a rate carried over from another technology). Every "
             f"number comes from `{acc.path.name}`; its sources: " + " | ".join(acc.sources)),
        Table("rates", "Rates and limits behind the verdict", prov, ("quantity", "value", "unit", "status",
                                                                        "source")),
        Text(f"Sensitivity: {sens.line}", "alert" if sens.changes else "ok"),
        Table("sensitivity", "The verdict with the rates off by 10x", sens.table,
              ("scenario", "memories_scaled", "fit", "fit_with_ecc", "p_failure", "verdict", "verdict_with_ecc")),
    ))


def iso_section(iso: Any) -> Section:
    from hwrel.report.iso26262 import ASSUMPTIONS

    title = "ISO 26262-5 hardware metrics (estimates)"
    if iso is None:
        return _na("iso26262", title, "ISO 26262 metrics (no SEU analysis)")
    assumed = sorted({f"{r.asil.upper()} {r.metric} {r.limit}" for r in iso.table.itertuples()
                      if r.limit_status == "assumed"})
    return Section("iso26262", title, (
        Text("Single-point fault metric SPFM = 1 - (lambda_SPF + lambda_RF) / lambda, latent fault metric "
             "LFM = 1 - lambda_MPF,latent / (lambda - lambda_SPF - lambda_RF), and the PMHF contribution (mission "
             "failure probability / mission hours, in FIT) of the model's parameter memories. Estimates, under "
             "these assumptions: " + "; ".join(ASSUMPTIONS) + "."),
        Text("Limits marked assumed were recalled, not read in the standard: " + (", ".join(assumed) or "none")
             + ". Check them against ISO 26262-5:2018 before signing.", "note"),
        Table("iso26262", "SPFM, LFM and PMHF against the ASIL limits", iso.table,
              ("configuration", "asil", "metric", "value", "limit", "met", "limit_status", "limit_source")),
    ))


def validation_section(checks: pd.DataFrame, banner: Text, scatter: bytes | None) -> Section:
    blocks: list = [banner,
                    Text(f"Every certified number beside what fault injection measured. A measurement violates a "
                         f"bound when it exceeds it by more than {VIOLATION_TOL:g} (relative, or absolute below 1): "
                         "measurements are float32 forwards, bounds float64. Measurements are lower ends of the "
                         "true worst case (random and adversarial search), so the gap to the bound is the price "
                         "of certainty, not an error.")]
    if scatter is not None:
        blocks.append(Fig("validation", "Certified vs measured", scatter,
                          "Every prediction that must upper-bound a measurement (log-log), one colour and marker "
                          "per analysis; the dashed diagonal is measured = bound. A point above it would be a "
                          "violated bound (drawn as a red cross)."))
    blocks.append(Table("validation", "Predictions and measurements", checks))
    return Section("validation", "Validation against fault injection", tuple(blocks))


def reproduce_section(command: str, seed: int, versions: dict[str, str], config: dict[str, Any]) -> Section:
    return Section("reproduce", "How to reproduce", (
        Text(f"`{command}`"),
        Facts((("seed", str(seed)), *((k, v) for k, v in versions.items()),
               *((f"setting: {k}", str(v)) for k, v in config.items()))),
        Text("Built-in models' weights ship with hwrel (hwrel/weights/*.safetensors), so every machine analyses "
             "the same weights; the same versions on the same machine reproduce every number exactly, other "
             "machines may differ in the last digits of floating-point sums.", "note"),
    ))
