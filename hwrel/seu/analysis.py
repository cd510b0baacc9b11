"""SEU tolerance of a model mapped onto an accelerator: certified flips, critical bits, FIT, mission.

:func:`seu_analysis` maps the model's parameters onto the accelerator's memories
(:mod:`hwrel.seu.mapping`), bounds the damage of bit flips in them (:mod:`hwrel.seu.flips`, sound),
measures single flips by exact injection (an estimate with a Wilson interval), and turns the
vulnerable fraction into FIT and mission probabilities with the accelerator's raw rates
(:mod:`hwrel.seu.rates`, estimates under a Poisson model).

Budgets: ``epsilon`` (every output moves by at most ``epsilon`` for every input of the domain), or
``max_accuracy_drop`` (certified accuracy on the evaluated inputs stays within that many points of
the clean accuracy; the default, 0.01, when data is given). A bit is *vulnerable* when its single
flip can exceed ``epsilon`` somewhere in the domain (epsilon budget) or can change the decision on
one of the evaluated inputs (accuracy budget); the certified fraction is a sound upper bound, the
measured one comes from a campaign on the same inputs.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn

from hwrel.errors import HwrelError
from hwrel.formats import FloatFormat
from hwrel.network import Network
from hwrel.seu import rates
from hwrel.seu.accelerator import Accelerator, load_accelerator
from hwrel.seu.flips import MAX_FLIPS, FlipBounds, FlipModel, flip_bounds
from hwrel.seu.mapping import ModelMapping, map_model
from hwrel.seu.mission import fit_table, mission_table, protection_plan

DEFAULT_ACCURACY_DROP = 0.01
# A measured flip above its certified damage by more than VIOLATION_REL (relative) plus
# VIOLATION_ABS times the output scale is a violation: the certificate is about the deployed model
# in exact arithmetic, the measurement a float64 forward whose rounding is ~1e-15 of the outputs.
VIOLATION_REL = 1e-9
VIOLATION_ABS = 1e-12


@dataclass(frozen=True, eq=False)
class SEUResult:
    """Everything :func:`seu_analysis` found; :meth:`to_dict` is the CLI's JSON.

    Certified figures are sound for the stated budget and storage (``certified_flips``,
    ``vulnerable_fraction_certified``, ``fit`` given the raw rates); ``*_measured`` figures are
    campaign estimates; FIT and probabilities are per 1e9 h and per mission under a Poisson model.

    ``certified_flips`` counts arbitrary flips anywhere in the stored parameters;
    ``certified_flips_weights_only`` the same with every bias bit protected (biases in ECC memory
    or registers); ``certified_flips_with_plan`` with the protection plan applied: its SECDED
    columns, every bit already in a SECDED memory (``plan_protected_bits`` in all) and its range
    restriction when it has one are protected, flips land anywhere else. Protected bits are
    assumed never to flip (ECC corrects them); every other figure is as sound as
    ``certified_flips``. ``single_flip_breaker`` (only when ``certified_flips == 0``): the bit
    column whose single flip breaks the budget alone (``alone``: the bound with only that column
    flippable still fails), with its certified damage and one measured flip of its worst
    element; ``single_flip_breaker_weights`` the same among weight bits when
    ``certified_flips_weights_only == 0``. ``violations``: campaign flips measured beyond their
    certified damage, or measured vulnerable but certified not (0 unless hwrel has a bug; the
    CLI and the report say so loudly).
    """

    model: str
    accelerator: str
    format: str
    budget: dict[str, Any]
    certified_flips: int
    certified_flips_capped: bool
    clean_accuracy: float | None
    vulnerable_fraction_certified: float
    vulnerable_fraction_measured: float
    vulnerable_fraction_measured_ci: tuple[float, float]
    campaign_size: int
    total_bits: int
    range_restriction: bool
    altitude_m: float
    altitude_factor: float
    mission_hours: float
    scrub_hours: float | None
    fit_raw: float
    fit: float
    fit_measured: float
    fit_with_ecc: float
    fit_with_ecc_detected: float
    expected_upsets: float
    p_upsets_exceed_certified: float
    mission_failure_probability: float
    mission_failure_probability_with_ecc: float
    target: str | None
    target_max_fit: float | None
    meets_target: bool | None
    meets_target_with_ecc: bool | None
    flip_bounds: pd.DataFrame
    critical_bits: pd.DataFrame
    memories: pd.DataFrame
    protection_plan: pd.DataFrame
    mission_curve: pd.DataFrame
    campaign: pd.DataFrame
    mapping: pd.DataFrame
    certified_flips_weights_only: int = 0
    certified_flips_weights_only_capped: bool = False
    certified_flips_with_plan: int = 0
    certified_flips_with_plan_capped: bool = False
    plan_protected_bits: int = 0
    single_flip_breaker: dict[str, Any] | None = None
    single_flip_breaker_weights: dict[str, Any] | None = None
    violations: int = 0  # campaign flips measured beyond their certificate (must be 0)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (tables as lists of records; the campaign is summarised)."""
        def records(df: pd.DataFrame) -> list[dict[str, Any]]:
            return [{k: _jsonable(v) for k, v in r.items()} for r in df.to_dict("records")]
        out = {k: _jsonable(getattr(self, k)) for k in (
            "model", "accelerator", "format", "budget", "certified_flips",
            "certified_flips_capped", "clean_accuracy", "vulnerable_fraction_certified",
            "vulnerable_fraction_measured", "vulnerable_fraction_measured_ci", "campaign_size",
            "total_bits", "range_restriction", "altitude_m", "altitude_factor", "mission_hours",
            "scrub_hours", "fit_raw", "fit", "fit_measured", "fit_with_ecc",
            "fit_with_ecc_detected", "expected_upsets", "p_upsets_exceed_certified",
            "mission_failure_probability", "mission_failure_probability_with_ecc", "target",
            "target_max_fit", "meets_target", "meets_target_with_ecc",
            "certified_flips_weights_only", "certified_flips_weights_only_capped",
            "certified_flips_with_plan", "certified_flips_with_plan_capped", "plan_protected_bits",
            "single_flip_breaker", "single_flip_breaker_weights", "violations")}
        for name in ("flip_bounds", "critical_bits", "memories", "protection_plan", "mapping"):
            out[name] = records(getattr(self, name))
        return out


def _jsonable(v: Any) -> Any:
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, (np.bool_, bool)):
        return bool(v)
    if isinstance(v, (np.integer,)):
        return int(v)
    if isinstance(v, (float, np.floating)):
        f = float(v)
        return None if math.isnan(f) else (str(f) if math.isinf(f) else f)
    return v


# ------------------------------------------------------------------------------- inputs

def _resolve(model: Any, data: Any, input_domain: tuple[float, float] | None
             ) -> tuple[str, Network, Tensor | None, Tensor | None]:
    from hwrel import models as refs

    name = "model"
    if isinstance(model, str):
        model = refs.load(model)
    if isinstance(model, refs.ReferenceModel):
        name = model.name
        if data is None:
            data = model
        net = Network.from_module(model.module, model.input_domain, model.input_shape)
    elif isinstance(model, Network):
        net = model
    elif isinstance(model, nn.Module):
        net = Network.from_module(model, input_domain or (0.0, 1.0))
    else:
        raise HwrelError(f"model: expected an nn.Module, Network, ReferenceModel or built-in "
                         f"name, got {type(model).__name__}")
    if isinstance(data, refs.ReferenceModel):
        data = (data.x_test, data.y_test)
    if data is None:
        return name, net, None, None
    if not (isinstance(data, (tuple, list)) and len(data) == 2):
        raise HwrelError("data: expected (inputs, labels) or a ReferenceModel")
    x, y = (torch.as_tensor(d) for d in data)
    if x.shape[0] == 0 or tuple(x.shape[1:]) != tuple(net.input_shape):
        raise HwrelError(f"data: inputs of shape {tuple(x.shape)} do not match the model's "
                         f"input shape {tuple(net.input_shape)}")
    if y.shape[0] != x.shape[0]:
        raise HwrelError(f"data: {y.shape[0]} labels for {x.shape[0]} inputs")
    return name, net, x.to(torch.float64), y.to(torch.int64)


def _nonneg(v: Any, name: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
        raise HwrelError(f"{name}: must be a finite number >= 0, got {v!r}")
    return float(v)


# ------------------------------------------------------------------------------- budgets

def _largest_k(ok, cap: int) -> tuple[int, bool]:
    """Largest ``k <= cap`` with ``ok(k)`` for a monotone ``ok`` (``ok(0)`` assumed)."""
    if not ok(1):
        return 0, False
    lo, hi = 1, 2
    while hi <= cap and ok(hi):
        lo, hi = hi, hi * 2
    if hi > cap:
        if ok(cap):
            return cap, True
        hi = cap
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if ok(mid) else (lo, mid)
    return lo, False


def _sample_bound(fb: FlipBounds, k: int, x: Tensor, chunk: int = 64) -> Tensor:
    return torch.cat([fb.bound(k, x[i:i + chunk], x[i:i + chunk])
                      for i in range(0, x.shape[0], chunk)])


def _margins(out: Tensor) -> Tensor:
    top2 = out.topk(2, dim=1).values
    return top2[:, 0] - top2[:, 1]


@dataclass(frozen=True, eq=False)
class _Vulnerability:
    """Per stored tensor: vulnerable single-flip counts per bit, vulnerable words, max damage."""

    bits: list[np.ndarray]
    words: list[int]
    damage: list[np.ndarray]  # domain-wide certified damage of one flip, max over elements
    flags: list[Tensor]  # (numel, bits) bool
    full: list[Tensor]  # (numel, bits) domain-wide certified damage of each single flip


def _vulnerability(fb: FlipBounds, epsilon: float | None, x: Tensor | None) -> _Vulnerability:
    net = fb.net
    lo, hi = net.input_lo[None], net.input_hi[None]
    S_dom = fb.inputs_sup(lo, hi, 1)
    dmg = fb.single(S_dom)
    if epsilon is not None:
        flags = [d > epsilon for d in dmg]
        words = [int((w > epsilon).sum()) for w in fb.word(S_dom)]
    else:  # decision change on some evaluated input: 2 * A(x) * delta >= margin(x)
        with torch.no_grad():
            vals = net.forward_all(x)
        m = _margins(vals[-1]).clamp(min=1e-300)
        Z = {}
        for i in net.synapse_layers:
            y = vals[net.nodes[i].inputs[0]].abs()
            r = (2 * y / m.reshape(-1, *([1] * (y.dim() - 1)))).clamp(max=1e300)
            Z[i] = r.amax(dim=0, keepdim=True)
        # A bias's amplification does not depend on the input, so Z's 2/margin never reaches
        # it: scale its damage by the worst sample's 2/margin instead.
        inv = float((2 / m).max())
        scale = [inv if s.tensor.part == "bias" else 1.0 for s in fb.sites]
        # the quantized-activation slack does not depend on the input either: scaled like a bias
        flags = [d * c + inv * sl >= 1 for d, c, sl in zip(fb.single(Z, slack=0.0), scale, fb.slack_terms())]
        word_slack = [fb.slack.get(s.tensor.node, 0.0) * (s.word_delta > 0) for s in fb.sites]
        words = [int((w * c + inv * sl >= 1).sum()) for w, c, sl in zip(fb.word(Z, slack=0.0), scale, word_slack)]
    return _Vulnerability([f.sum(0).numpy() for f in flags], words,
                          [d.amax(0).numpy() for d in dmg], flags, dmg)


def _campaign(fm: FlipModel, vul: _Vulnerability, epsilon: float | None,
              n: int, seed: int) -> pd.DataFrame:
    stored = fm.stored
    sizes = np.array([t.bits for t in stored], dtype=np.int64)
    total = int(sizes.sum())
    n = min(int(n), total)
    rng = np.random.default_rng(seed)
    picks = np.sort(rng.choice(total, size=n, replace=False)) if n else np.zeros(0, np.int64)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    clean = fm.output
    pred = clean.argmax(1)
    slack = VIOLATION_ABS * (1.0 + float(clean.abs().max()))
    rows = []
    for p in picks:
        ti = int(np.searchsorted(starts, p, side="right") - 1)
        local = int(p - starts[ti])
        width = stored[ti].fmt.bits
        e, b = local // width, local % width
        out = fm.run([(ti, e, b)])
        finite = bool(torch.isfinite(out).all())
        delta = float((out - clean).abs().max()) if finite else math.inf
        changed = (not finite) or bool((out.argmax(1) != pred).any())
        vulnerable = delta > epsilon if epsilon is not None else changed
        cert, cert_vul = float(vul.full[ti][e, b]), bool(vul.flags[ti][e, b])
        rows.append({"tensor": stored[ti].name, "tensor_index": ti, "element": e, "bit": b,
                     "max_abs_delta": delta, "decision_changed": changed,
                     "vulnerable": vulnerable, "certified_damage": cert,
                     "certified_vulnerable": cert_vul,
                     # a measurement beyond its certificate: a soundness bug, never a silent row
                     "violation": bool(delta > cert * (1 + VIOLATION_REL) + slack) or (vulnerable and not cert_vul)})
    return pd.DataFrame(rows, columns=["tensor", "tensor_index", "element", "bit",
                                       "max_abs_delta", "decision_changed", "vulnerable",
                                       "certified_damage", "certified_vulnerable", "violation"])


def _critical_table(mapping: ModelMapping, vul: _Vulnerability, campaign: pd.DataFrame
                    ) -> pd.DataFrame:
    rows = []
    for ti, t in enumerate(mapping.tensors):
        for b in range(t.fmt.bits):
            sel = campaign[(campaign.tensor_index == ti) & (campaign.bit == b)]
            rows.append({"tensor": t.name, "layer": t.layer, "part": t.part, "format": t.fmt.name,
                         "memory": t.memory, "bit": b, "role": t.fmt.bit_role(b),
                         "elements": t.numel, "certified_damage": float(vul.damage[ti][b]),
                         "vulnerable_bits": int(vul.bits[ti][b]),
                         "vulnerable_fraction": float(vul.bits[ti][b]) / t.numel,
                         "measured_samples": len(sel),
                         "measured_vulnerable": float(sel.vulnerable.mean()) if len(sel)
                         else math.nan})
    return pd.DataFrame(rows)


@dataclass(frozen=True, eq=False)
class _Budget:
    """The budget test ``ok(k)`` of :func:`seu_analysis` for any (possibly protected) bounds."""

    epsilon: float | None
    max_accuracy_drop: float | None
    x: Tensor
    lo: Tensor
    hi: Tensor
    clean_acc: float | None
    correct: Tensor | None
    margin: Tensor | None

    def ok(self, fb: FlipBounds, k: int, seen: dict[int, dict[str, float]] | None = None) -> bool:
        """Sound: True only when every set of ``k`` flips fb allows stays within the budget."""
        if self.epsilon is not None:
            b = float(fb.bound(k, self.lo[None], self.hi[None])[0])
            if seen is not None:
                seen[k] = {"bound": b}
            return b <= self.epsilon
        bnd = _sample_bound(fb, k, self.x)
        cert = float((self.correct & (self.margin > 2 * bnd)).double().mean())
        if seen is not None:
            seen[k] = {"bound": float(bnd.max()), "certified_accuracy": cert}
        return self.clean_acc - cert <= self.max_accuracy_drop + 1e-12

    def largest(self, fb: FlipBounds, cap: int, seen: dict[int, dict[str, float]] | None = None
                ) -> tuple[int, bool]:
        return _largest_k(lambda k: self.ok(fb, k, seen), cap)


def plan_bounds(net64: Network, mapping: ModelMapping, plan: pd.DataFrame, fb: FlipBounds
                ) -> tuple[FlipBounds, dict[int, list[int]]]:
    """Flip bounds once ``plan`` is applied, and the protected ``{tensor index: bits}`` columns:
    the plan's ``protect`` columns, every bit of tensors in SECDED memories, and range
    restriction when the plan restricts (``fb`` is reused otherwise)."""
    index = {t.name: i for i, t in enumerate(mapping.tensors)}
    cols: dict[int, list[int]] = {}
    for i, t in enumerate(mapping.tensors):
        if mapping.accelerator.memory(t.memory).protection.kind == "secded":
            cols[i] = list(range(t.fmt.bits))
    for r in plan[plan.action == "protect"].itertuples():
        cols.setdefault(index[r.tensor], []).append(int(r.bit))
    if bool((plan.action == "range_restrict").any()):
        fb = flip_bounds(net64, mapping.tensors, True)
    return fb.protect(cols), {i: sorted(set(b)) for i, b in cols.items()}


def _breaker(fb: FlipBounds, fm: FlipModel, vul: _Vulnerability, budget: _Budget,
             mapping: ModelMapping, parts: tuple[str, ...] = ("weight", "bias"), tries: int = 8
             ) -> dict[str, Any]:
    """Why ``certified_flips`` is 0: the bit column with the largest certified single-flip
    damage that fails the budget with every other bit protected (``alone``), else the largest;
    its worst element is injected once on the evaluated inputs (a measurement)."""
    cols = sorted(((float(d[b]), ti, b) for ti, d in enumerate(vul.damage)
                   if mapping.tensors[ti].part in parts for b in range(d.shape[0])),
                  key=lambda c: -c[0])
    pick, alone = cols[0], False
    for c in cols[:tries]:
        _, ti, b = c
        only = {i: range(t.fmt.bits) for i, t in enumerate(mapping.tensors) if i != ti}
        only[ti] = [p for p in range(mapping.tensors[ti].fmt.bits) if p != b]
        if not budget.ok(fb.protect(only), 1):
            pick, alone = c, True
            break
    dmg, ti, b = pick
    t = mapping.tensors[ti]
    e = int(torch.nan_to_num(vul.full[ti][:, b], posinf=1e308).argmax())
    out = fm.run([(ti, e, b)])
    finite = bool(torch.isfinite(out).all())
    return {"tensor": t.name, "bit": int(b), "role": t.fmt.bit_role(b), "format": t.fmt.name,
            "element": e, "alone": alone, "certified_damage": dmg,
            "measured_max_abs_delta": float((out - fm.output).abs().max()) if finite
            else math.inf,
            "measured_decision_changed": float(((out.argmax(1) != fm.output.argmax(1))
                                                | ~torch.isfinite(out).all(1)).double().mean())}


# ------------------------------------------------------------------------------- the analysis

def seu_analysis(model: nn.Module | Network | Any, accelerator: str | Accelerator, *,
                 data: Any = None, format: str | None = None,
                 memory: str | Mapping[str, str] | None = None, mission_hours: float,
                 altitude_m: float = 0.0, scrub_hours: float | None = None,
                 target: str | None = None, epsilon: float | None = None,
                 max_accuracy_drop: float | None = None, range_restriction: bool = False,
                 seed: int = 0, campaign_size: int = 1000, max_samples: int = 256,
                 max_flips: int = MAX_FLIPS,
                 input_domain: tuple[float, float] | None = None) -> SEUResult:
    """SEU tolerance of ``model`` stored on ``accelerator`` (see the module docstring).

    ``data``: ``(inputs, labels)`` or a ReferenceModel (default: a ReferenceModel's test set); at
    most ``max_samples`` inputs (a seeded subset) are evaluated. ``memory`` forces the placement
    (one memory name, or ``{layer: memory}``). ``range_restriction``: every stored value is read
    through NaN->0 and a clamp to its tensor's ``max |w|`` (the clean model is unchanged).
    ``scrub_hours``: weights reloaded every so many hours (default: never during the mission).
    """
    acc = accelerator if isinstance(accelerator, Accelerator) else load_accelerator(accelerator)
    hours = _nonneg(mission_hours, "mission_hours")
    alt = rates.altitude_factor(_nonneg(altitude_m, "altitude_m"))
    if scrub_hours is not None and _nonneg(scrub_hours, "scrub_hours") == 0:
        raise HwrelError("scrub_hours: must be > 0")
    tgt = rates.parse_target(target) if target is not None else None
    if epsilon is not None and max_accuracy_drop is not None:
        raise HwrelError("give either epsilon or max_accuracy_drop, not both")
    if epsilon is not None and (_nonneg(epsilon, "epsilon") == 0):
        raise HwrelError("epsilon: must be > 0")
    if max_accuracy_drop is not None and not 0 <= _nonneg(max_accuracy_drop,
                                                           "max_accuracy_drop") <= 1:
        raise HwrelError(f"max_accuracy_drop: must be in [0, 1], got {max_accuracy_drop!r}")
    if isinstance(campaign_size, bool) or not isinstance(campaign_size, int) or campaign_size < 0:
        raise HwrelError(f"campaign_size: must be an integer >= 0, got {campaign_size!r}")
    name, net, x, y = _resolve(model, data, input_domain)
    if epsilon is None and x is None:
        raise HwrelError("data: an accuracy budget needs (inputs, labels); give data or epsilon")
    if epsilon is None and max_accuracy_drop is None:
        max_accuracy_drop = DEFAULT_ACCURACY_DROP
    mapping = map_model(net, acc, format, memory)
    net64 = mapping.deployed(net.to())
    rng = np.random.default_rng(seed)
    if x is None:  # epsilon budget without data: measure on seeded points of the domain box
        u = torch.as_tensor(rng.random((max_samples, *net.input_shape)))
        x = net64.input_lo + u * (net64.input_hi - net64.input_lo)
    elif x.shape[0] > max_samples:
        keep = evaluated_subset(x.shape[0], max_samples, seed)
        x, y = x[keep], (y[keep] if y is not None else None)
    lo, hi = net64.input_lo, net64.input_hi
    if bool(((x < lo - 1e-12) | (x > hi + 1e-12)).any()):
        raise HwrelError("data: some inputs lie outside the model's input domain")
    fb = flip_bounds(net64, mapping.tensors, range_restriction)
    fm = FlipModel(net64, mapping.tensors, [s.limit for s in fb.sites], x)

    # Certified flips.
    seen: dict[int, dict[str, float]] = {}
    clean_acc = None
    margin = correct = None
    if epsilon is None:
        pred = fm.output.argmax(1)
        correct = pred == y
        clean_acc = float(correct.double().mean())
        margin = _margins(fm.output)
    budget = _Budget(epsilon, max_accuracy_drop, x, lo, hi, clean_acc, correct, margin)
    k_cert, capped = budget.largest(fb, max_flips, seen)
    bounds = pd.DataFrame([{"k": k, **v} for k, v in sorted(seen.items())])

    # Vulnerable fractions.
    eval_x = None if epsilon is not None else x
    vul = _vulnerability(fb, epsilon, eval_x)
    total_bits = mapping.total_bits
    vf_cert = sum(float(v.sum()) for v in vul.bits) / total_bits
    camp = _campaign(fm, vul, epsilon, campaign_size, seed)
    n_c = len(camp)
    k_meas = int(camp.vulnerable.sum()) if n_c else 0
    vf_meas = k_meas / n_c if n_c else math.nan
    ci = _wilson(k_meas, n_c)

    # FIT, ECC, mission, plan.
    ts = scrub_hours if scrub_hours is not None else (hours if hours > 0 else 1.0)
    per_tensor = [(t, vul.bits[i].sum(), vul.words[i]) for i, t in enumerate(mapping.tensors)]
    mems = fit_table(acc, per_tensor, alt, ts, measured_fraction=vf_meas)
    fit = float(mems.fit.sum())
    fit_ecc = float(mems.fit_with_ecc.sum())
    curve, summary = mission_table(mems, hours, scrub_hours, k_cert)
    crit = _critical_table(mapping, vul, camp)
    restricted = None
    if isinstance(mapping.fmt, FloatFormat) and not range_restriction:
        fb_r = flip_bounds(net64, mapping.tensors, True)
        vr = _vulnerability(fb_r, epsilon, eval_x)
        per_r = [(t, vr.bits[i].sum(), vr.words[i]) for i, t in enumerate(mapping.tensors)]
        restricted = (fit_table(acc, per_r, alt, ts), vr)
    plan = protection_plan(acc, mapping, crit, mems, alt, ts, tgt, restricted)
    biases = {i: range(t.fmt.bits) for i, t in enumerate(mapping.tensors) if t.part == "bias"}
    k_w, capped_w = budget.largest(fb.protect(biases), max_flips)
    fb_plan, cols = plan_bounds(net64, mapping, plan, fb)
    k_p, capped_p = budget.largest(fb_plan, max_flips)
    plan_bits = sum(mapping.tensors[i].numel * len(b) for i, b in cols.items())
    breaker = _breaker(fb, fm, vul, budget, mapping) if k_cert == 0 else None
    breaker_w = _breaker(fb, fm, vul, budget, mapping, ("weight",)) if k_w == 0 else None
    return SEUResult(
        model=name, accelerator=acc.name, format=mapping.fmt.name,
        budget={"epsilon": epsilon} if epsilon is not None else
        {"max_accuracy_drop": max_accuracy_drop, "samples": int(x.shape[0])},
        certified_flips=k_cert, certified_flips_capped=capped, clean_accuracy=clean_acc,
        vulnerable_fraction_certified=vf_cert, vulnerable_fraction_measured=vf_meas,
        vulnerable_fraction_measured_ci=ci, campaign_size=n_c, total_bits=total_bits,
        range_restriction=range_restriction, altitude_m=float(altitude_m), altitude_factor=alt,
        mission_hours=hours, scrub_hours=scrub_hours, fit_raw=float(mems.fit_raw.sum()),
        fit=fit, fit_measured=float(mems.fit_measured.sum()), fit_with_ecc=fit_ecc,
        fit_with_ecc_detected=float(mems.detected_with_ecc.sum()),
        expected_upsets=summary["expected_upsets"],
        p_upsets_exceed_certified=summary["p_exceed_certified"],
        mission_failure_probability=summary["p_failure"],
        mission_failure_probability_with_ecc=summary["p_failure_ecc"],
        target=tgt.name if tgt else None, target_max_fit=tgt.max_fit if tgt else None,
        meets_target=tgt.met_by(fit) if tgt else None,
        meets_target_with_ecc=tgt.met_by(fit_ecc) if tgt else None,
        flip_bounds=bounds, critical_bits=crit, memories=mems, protection_plan=plan,
        mission_curve=curve, campaign=camp, mapping=mapping.table(),
        certified_flips_weights_only=k_w, certified_flips_weights_only_capped=capped_w,
        certified_flips_with_plan=k_p, certified_flips_with_plan_capped=capped_p,
        plan_protected_bits=plan_bits, single_flip_breaker=breaker,
        single_flip_breaker_weights=breaker_w,
        violations=int(camp.violation.sum()) if n_c else 0)


def evaluated_subset(n: int, max_samples: int, seed: int) -> np.ndarray | None:
    """Indices (sorted) of the inputs :func:`seu_analysis` evaluates out of ``n`` given ones with
    ``max_samples`` and ``seed``; None when it evaluates all of them."""
    if n <= max_samples:
        return None
    return np.sort(np.random.default_rng(seed).choice(n, size=max_samples, replace=False))


def _wilson(k: int, n: int) -> tuple[float, float]:
    if n == 0:
        return (0.0, 1.0)
    from hwrel.inject.stats import wilson_interval

    lo, hi = wilson_interval(k, n, 0.95)
    return float(lo), float(hi)


def bit_profile(model: nn.Module | Network | Any, *, data: Any = None,
                formats: tuple[str, ...] = ("fp32", "fp16", "bf16", "int8"),
                range_restriction: tuple[bool, ...] = (False, True), samples_per_bit: int = 32,
                max_samples: int = 128, seed: int = 0) -> pd.DataFrame:
    """Per storage format, range restriction and bit position: certified worst damage of one flip
    (domain-wide, any output; sound, ``inf`` when unbounded), certified fraction of weight bits
    whose flip can change a decision on the evaluated inputs (sound upper bound), and the measured
    silent-data-corruption rate (decision changed) over ``samples_per_bit`` seeded weight flips
    per bit with its Wilson interval. No accelerator: the format alone.
    """
    from hwrel.formats import parse_format
    from hwrel.seu.mapping import store_parameters

    name, net, x, y = _resolve(model, data, None)
    if x is None:
        raise HwrelError("data: bit_profile needs (inputs, labels) or a ReferenceModel")
    rng = np.random.default_rng(seed)
    if x.shape[0] > max_samples:
        x = x[np.sort(rng.choice(x.shape[0], size=max_samples, replace=False))]
    rows = []
    for fname in formats:
        fmt = parse_format(fname)
        stored = [t for t in store_parameters(net, fmt) if t.part == "weight"]
        net64 = ModelMapping(None, fmt, tuple(stored)).deployed(net.to())  # type: ignore[arg-type]
        for rr in range_restriction:
            fb = flip_bounds(net64, stored, rr)
            vul = _vulnerability(fb, None, x)
            fm = FlipModel(net64, stored, [s.limit for s in fb.sites], x)
            pred = fm.output.argmax(1)
            sizes = np.array([t.numel for t in stored])
            g = np.random.default_rng([seed, fmt.bits, int(rr)])
            for b in range(fmt.bits):
                hits = 0
                for _ in range(samples_per_bit):
                    ti = int(g.choice(len(stored), p=sizes / sizes.sum()))
                    e = int(g.integers(stored[ti].numel))
                    out = fm.run([(ti, e, b)])
                    hits += int((not bool(torch.isfinite(out).all()))
                                or bool((out.argmax(1) != pred).any()))
                lo_ci, hi_ci = _wilson(hits, samples_per_bit)
                vb = sum(int(v[b]) for v in vul.bits)
                rows.append({"format": fmt.name, "range_restriction": rr, "bit": b,
                             "role": fmt.bit_role(b),
                             "certified_damage": max(float(d[b]) for d in vul.damage),
                             "certified_vulnerable_fraction": vb / int(sizes.sum()),
                             "measured_sdc": hits / samples_per_bit if samples_per_bit else
                             math.nan, "measured_lo": lo_ci, "measured_hi": hi_ci,
                             "samples": samples_per_bit})
    return pd.DataFrame(rows)
