"""Measured analyses of a model the bounds do not support (it runs on the exact general injection path).

Where :meth:`hwrel.network.Network.from_module` has no rule for an operation, no certified number
exists: the report says "not applicable: <why>" for the Fep bounds, tolerance, certified bit width,
certified flips, ISO metrics and validation, and measures what injection and plain forwards can:

- :func:`measured_seu`: random single bit flips of the stored parameters (the accelerator's storage
  format) injected by the exact general path (:func:`hwrel.inject.campaign.run_campaign`); the
  vulnerable fraction (flips that change a decision on an evaluated input) with its Wilson
  interval, and FIT and mission-failure estimates from it (no flip count certified: k = 0).
  Estimates, not bounds.
- :func:`measured_bitwidth`: accuracy of weight-quantized copies at each width (Brevitas PTQ where it
  can quantize the model, else per-channel symmetric round-to-nearest of every Linear/Conv weight and
  attention input projection). Measured on the test inputs: an estimate, not a certificate.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import pandas as pd
import torch
from torch import Tensor, nn

from hwrel.errors import HwrelError, UnsupportedLayerError


def not_applicable(reason: str) -> str:
    """``"not applicable: <reason>"`` (the one form every section uses)."""
    return f"not applicable: {reason}"


def bounds_reason(engine_refused: str) -> str:
    """The one-line reason from the bounds, naming the node and operation they have no rule for."""
    first = engine_refused.strip().splitlines()[0] if engine_refused.strip() else engine_refused
    tail = " is not supported"
    if first.endswith(tail):
        return f"the bounds do not support {first[: -len(tail)]} yet"
    return f"the bounds do not support this model yet ({first})"


def general_target(md: Any) -> Any:
    """The model's :class:`hwrel.inject.target.GeneralModel` when the bounds have no rule for one of
    its operations (then only measured analyses can run), else None (the certified analyses run).
    ``md``: a :class:`hwrel.data.ModelData`."""
    from hwrel.inject.target import GeneralModel, as_target

    try:
        md.network()
        return None
    except HwrelError:
        found = as_target(md.module, md.input_domain, md.input_shape)
        if not isinstance(found, GeneralModel):
            raise
        return found


# ------------------------------------------------------------------------------- parameters

def _layer_of(name: str) -> str:
    """The module path a parameter belongs to (the parameter's own name at the top level)."""
    return name.rpartition(".")[0] or name


def parameter_table(module: nn.Module, x: Tensor, fmt: str, acc: Any, memory: str | None = None) -> pd.DataFrame:
    """One row per stored parameter tensor as the general path stores it in ``fmt`` (integer
    formats: weight sites as per-tensor symmetric codes, bias sites fp32), with its memory (each
    module's parameters go whole into the first weight memory with room, as for the fast engine,
    or all into ``memory``)."""
    from hwrel.inject.general import GeneralInjector
    from hwrel.seu.mapping import _place

    inj = GeneralInjector(module, x[:1], format=fmt, replay=False)
    rows = [{"tensor": p.name, "layer": _layer_of(p.name), "site": p.site, "shape": str(tuple(p.shape)),
             "elements": p.numel, "format": p.fmt.name, "bits": p.numel * p.fmt.bits}
            for p in inj.params.values()]
    df = pd.DataFrame(rows, columns=["tensor", "layer", "site", "shape", "elements", "format", "bits"])
    per_layer: dict[str, int] = {}
    for r in df.itertuples():
        per_layer[r.layer] = per_layer.get(r.layer, 0) + int(r.bits)
    placed = _place(acc, list(per_layer.items()), memory)
    df["memory"] = [placed[layer] for layer in df["layer"]]
    return df


# ------------------------------------------------------------------------------- SEU (measured)

@dataclass(frozen=True, eq=False)
class MeasuredSEU:
    """Single bit flips measured by the exact general path; every figure an estimate.

    ``vulnerable``: flips that changed the decision on at least one evaluated input (or made an
    output non-finite), the same definition as the fast engine's measured fraction. ``memories``:
    per memory, its parameter bits and the FIT estimate ``fit_measured`` (raw rate x bits x measured
    fraction, FIT per 1e9 h), ``fit_measured_hi`` with the interval's upper end, with SECDED.
    ``budget_breaking``: flips whose measured accuracy drop exceeds the budget (None for a
    language model, whose campaign measures next-token agreement and cross-entropy instead).
    ``mission_failure_probability`` (``_with_ecc``: every memory SECDED): over the mission, with the
    CI upper end of the fraction and no certified flip tolerance (k = 0: a single upset fails
    with the vulnerable fraction's probability, two or more in the mission always count as a
    failure; :func:`hwrel.seu.mission.failure_probability`), an estimate.
    ``stored_accuracy``: the clean model as stored, ``float_accuracy``: as trained, both on the
    ``samples`` evaluated inputs."""

    format: str
    path: str
    engine_refused: str | None
    samples: int
    campaign_size: int
    total_bits: int
    vulnerable: int
    vulnerable_fraction: float
    ci: tuple[float, float]
    budget_breaking: int | None
    stored_accuracy: float
    float_accuracy: float
    memories: pd.DataFrame
    per_tensor: pd.DataFrame
    per_bit: pd.DataFrame
    campaign: pd.DataFrame
    fit: float
    fit_hi: float
    fit_with_ecc: float
    mission_failure_probability: float
    mission_failure_probability_with_ecc: float
    target: str | None
    target_max_fit: float | None

    @property
    def meets_target(self) -> bool | None:
        return None if self.target_max_fit is None else self.fit_hi < self.target_max_fit


def measured_seu(target: Any, acc: Any, x: Tensor, y: Tensor, params: pd.DataFrame, *, fmt: str, campaign: int,
                 max_samples: int, seed: int, hours: float, target_name: str | None, max_accuracy_drop: float,
                 altitude_m: float = 0.0, scrub_hours: float | None = None, progress: bool = False
                 ) -> MeasuredSEU:
    """``campaign`` random single bit flips of the stored parameters, measured on at most
    ``max_samples`` inputs (a seeded subset) by :func:`hwrel.inject.campaign.run_campaign`.
    ``altitude_m`` scales the raw rates (:func:`hwrel.seu.rates.altitude_factor`); ``scrub_hours``:
    the weights are reloaded that often (None: never)."""
    from hwrel.inject.campaign import run_campaign
    from hwrel.inject.stats import wilson_interval
    from hwrel.seu import rates
    from hwrel.seu.analysis import evaluated_subset
    from hwrel.seu.mission import memory_fit

    keep = evaluated_subset(len(x), max_samples, seed)
    xs, ys = (x, y) if keep is None else (x[torch.as_tensor(keep)], y[torch.as_tensor(keep)])
    total_bits = int(params["bits"].sum())
    n = min(int(campaign), total_bits)
    df = run_campaign(target, {"fault": "bitflip", "format": fmt, "count": n, "sites": ("weight", "bias")},
                      xs, ys, seed=seed, progress=progress)
    path = df.attrs.get("injection_path", "general")
    vul = (df["mismatch_rate"].to_numpy() > 0) | df["nonfinite"].to_numpy().astype(bool)
    df = df.assign(vulnerable=vul)
    k = int(vul.sum())
    lo, hi = wilson_interval(k, len(df), 0.95) if len(df) else (0.0, 1.0)
    frac = k / len(df) if len(df) else math.nan
    from hwrel.inject.general import GeneralInjector

    stored_acc = accuracy(GeneralInjector(target.module, xs, format=fmt, replay=False).clean, ys)
    float_acc = accuracy(_forward(target.module, xs), ys)
    breaking = (int((stored_acc - df["accuracy"].to_numpy() > max_accuracy_drop + 1e-12).sum())
                if "accuracy" in df else None)  # a language model's campaign measures agreement, not accuracy
    alt = rates.altitude_factor(altitude_m)
    ts = scrub_hours if scrub_hours is not None else (hours if hours > 0 else 1.0)
    mem_rows = []
    reach = reach_ecc = fit_hi_ecc = 0.0
    for name, bits in params.groupby("memory", sort=False)["bits"].sum().items():
        m = acc.memory(name)
        fit = memory_fit(m, bits, frac, frac, alt, ts, False)[0]
        fit_hi, _, r = memory_fit(m, bits, float(hi), float(hi), alt, ts, False)
        fit_ecc = memory_fit(m, bits, frac, frac, alt, ts, True)[0]
        f_e, _, r_e = memory_fit(m, bits, float(hi), float(hi), alt, ts, True)
        reach, reach_ecc, fit_hi_ecc = reach + r, reach_ecc + r_e, fit_hi_ecc + f_e
        mem_rows.append({"memory": name, "off_chip": m.off_chip, "protection": m.protection.describe(),
                         "bits": int(bits), "ser_fit_per_mbit": m.ser_fit_per_mbit,
                         "fit_raw": m.ser_fit_per_mbit * alt * bits / 1e6, "vulnerable_fraction_measured": frac,
                         "fit_measured": fit, "fit_measured_hi": fit_hi, "fit_measured_with_ecc": fit_ecc})
    mems = pd.DataFrame(mem_rows)
    from hwrel.seu.mission import failure_probability

    # k = 0: no flip count is certified, so every window with two or more upsets counts as a failure
    p_fail = failure_probability(reach, float(mems["fit_measured_hi"].sum()), hours, scrub_hours, 0)
    p_fail_ecc = failure_probability(reach_ecc, fit_hi_ecc, hours, scrub_hours, 0)
    tgt = rates.parse_target(target_name) if target_name is not None else None

    def rates_by(col: list[str]) -> pd.DataFrame:
        g = df.groupby(col, sort="bit" in col)
        extra = {"min_accuracy": ("accuracy", "min")} if "accuracy" in df else \
            {"max_cross_entropy_delta": ("cross_entropy_delta", "max")}
        t = g.agg(flips=("vulnerable", "size"), vulnerable=("vulnerable", "sum"),
                  max_abs_delta=("max_abs_delta", "max"), **extra).reset_index()
        lo_, hi_ = wilson_interval(t["vulnerable"].to_numpy(), t["flips"].to_numpy(), 0.95)
        at = list(t.columns).index("vulnerable") + 1
        t.insert(at, "vulnerable_fraction", t["vulnerable"] / t["flips"])
        t.insert(at + 1, "ci_lo", lo_)
        t.insert(at + 2, "ci_hi", hi_)
        if col == ["layer"]:  # model order, as in the parameter table
            order = {n: i for i, n in enumerate(params["tensor"])}
            t = t.sort_values("layer", key=lambda c: c.map(order), kind="stable").reset_index(drop=True)
        return t.rename(columns={"layer": "tensor"})

    keep_cols = [c for c in ("config_id", "layer", "index", "bit", "format", "old_value", "new_value",
                             "max_abs_delta", "mismatch_rate", "nonfinite", "accuracy", "cross_entropy_delta",
                             "vulnerable") if c in df]
    return MeasuredSEU(format=fmt, path=path, engine_refused=df.attrs.get("engine_refused"), samples=len(xs),
                       campaign_size=len(df), total_bits=total_bits, vulnerable=k, vulnerable_fraction=frac,
                       ci=(float(lo), float(hi)), budget_breaking=breaking, stored_accuracy=stored_acc,
                       float_accuracy=float_acc,
                       memories=mems, per_tensor=rates_by(["layer"]), per_bit=rates_by(["format", "bit"]),
                       campaign=df[keep_cols].rename(columns={"layer": "tensor"}),
                       fit=float(mems["fit_measured"].sum()), fit_hi=float(mems["fit_measured_hi"].sum()),
                       fit_with_ecc=float(mems["fit_measured_with_ecc"].sum()),
                       mission_failure_probability=p_fail, mission_failure_probability_with_ecc=p_fail_ecc,
                       target=tgt.name if tgt else None, target_max_fit=tgt.max_fit if tgt else None)


# ------------------------------------------------------------------------------- bit width (measured)

@dataclass(frozen=True, eq=False)
class MeasuredBitwidth:
    """Accuracy of weight-quantized copies per width, measured on the test inputs (an estimate).

    ``method``: what quantized the copies; ``note``: why Brevitas PTQ did not (or None);
    ``measured_bits``: the smallest swept width from which every wider swept width's measured
    accuracy drop is within the budget (None if none is); ``quantized``: the weight tensors rounded
    (every other parameter kept float)."""

    method: str
    note: str | None
    float_accuracy: float
    max_accuracy_drop: float
    table: pd.DataFrame
    measured_bits: int | None
    quantized: tuple[str, ...]
    float_weight_bits: int


def _rounded_weights(module: nn.Module) -> list[tuple[str, nn.Module, str]]:
    """:func:`hwrel.quantize.graph.rounded_weights` (imported on use: hwrel.quantize loads Brevitas)."""
    from hwrel.quantize.graph import rounded_weights

    return rounded_weights(module)


def round_weights(module: nn.Module, bits: int) -> nn.Module:
    """:func:`hwrel.quantize.graph.round_weights`: a copy with its Linear/Conv weights (and attention
    input projections) rounded to ``bits``-bit per-channel symmetric codes, dequantized."""
    from hwrel.quantize.graph import round_weights as rw

    return rw(module, bits)


def accuracy(out: Tensor, y: Tensor) -> float:
    """Top-1 accuracy: of the class (``(B, classes)`` scores, ``(B,)`` labels), or of the next token
    (a causal LM's ``(B, T, vocab)`` logits, ``(B, T - 1)`` targets: positions ``0..T-2``)."""
    if out.dim() == 3 and y.dim() == 2:
        return float((out[:, :-1].argmax(-1) == y).double().mean())
    return float((out.argmax(1) == y).double().mean())


def _forward(model: nn.Module, x: Tensor, batch: int = 512) -> Tensor:
    from hwrel.inject.general_sites import model_output, plain_forward

    with plain_forward():
        return torch.cat([model_output(model(x[i:i + batch])).float() for i in range(0, len(x), batch)])


def measured_bitwidth(module: nn.Module, x: Tensor, y: Tensor, calib: Tensor | None, bits: tuple[int, ...],
                      max_accuracy_drop: float, progress: Callable[[float, str], None] | None = None
                      ) -> MeasuredBitwidth:
    """Per width in ``bits``: measured accuracy and largest logit change of the quantized copy
    against the float model on ``x`` (see :class:`MeasuredBitwidth`)."""
    import warnings

    from hwrel.quantize.brevitas_ptq import ptq

    say = progress or (lambda f, m: None)
    ref = _forward(module, x)
    acc0 = accuracy(ref, y)
    note = None
    quantizer: Callable[[int], nn.Module]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ptq(module, calib, bits[0], per_channel=True)
        method = "Brevitas PTQ (weights per-channel symmetric, float activations)"
        quantizer = lambda b: ptq(module, calib, b, per_channel=True)  # noqa: E731
    except (UnsupportedLayerError, HwrelError) as exc:
        note = f"Brevitas PTQ cannot quantize this model ({str(exc).splitlines()[0]})"
        method = "weight rounding (per-channel symmetric round to nearest; float activations)"
        quantizer = lambda b: round_weights(module, b)  # noqa: E731
    weights = _rounded_weights(module)
    quantized = tuple(n for n, _, _ in weights)
    wbits = sum(int(getattr(m, p).numel()) for _, m, p in weights)
    rows = []
    for i, b in enumerate(bits):
        say(i / len(bits), f"measured bit width: {b} bits ({i + 1} of {len(bits)})")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = _forward(quantizer(b), x)
        finite = bool(torch.isfinite(out).all())
        acc = accuracy(out, y)
        rows.append({"bits": b, "measured_accuracy": acc, "measured_accuracy_drop": acc0 - acc,
                     "measured_max_abs_delta": float((out - ref).abs().max()) if finite else math.inf,
                     "meets_budget_measured": acc0 - acc <= max_accuracy_drop + 1e-12,
                     "weight_bits": wbits * b})
    table = pd.DataFrame(rows)
    meets = table.sort_values("bits")["meets_budget_measured"].to_numpy()
    widths = table.sort_values("bits")["bits"].to_numpy()
    # the smallest width from which every wider swept width meets the budget too
    good = [int(widths[i]) for i in range(len(widths)) if meets[i:].all()]
    return MeasuredBitwidth(method, note, acc0, max_accuracy_drop, table, good[0] if good else None,
                            quantized, 32 * wbits)


# ------------------------------------------------------------------------------- the whole analysis

def analyse(name: str, target: Any, acc: Any, x: Tensor, y: Tensor, calib: Tensor | None, *, drop: float,
            hours: float, target_name: str | None, seed: int, cfg: Any, log: Any, input_domain: tuple[float, float],
            input_shape: Any, quantize: bool = True) -> dict[str, Any]:
    """Every measured analysis of a model on the general path (``target``: its
    :class:`hwrel.inject.target.GeneralModel`); the results :mod:`hwrel.report.general_sections` shows."""
    reason = bounds_reason(target.reason)
    module = target.module
    log.stage("fep", f"certified analyses not applicable ({reason}); measuring only")
    fmt = acc.formats[0]
    params = parameter_table(module, x, fmt, acc)  # one forward first: a failing one is a one-line error
    clean = accuracy(_forward(module, x), y)
    note = " (next-token top-1 over every position)" if y.dim() == 2 else ""
    res: dict[str, Any] = {"x": x, "y": y, "reason": reason, "accuracy_note": note,
                           "engine_refused": target.reason, "hours": float(hours),
                           "max_accuracy_drop": drop, "clean_accuracy": clean, "params": params,
                           "missing": [], "checks_violated": 0, "bitwidth": None}
    res["graph"] = graph_fep(module, x, cfg, log, seed, y=y, drop=drop)
    if "table" in res["graph"]:
        res["checks_violated"] = int(res["graph"]["table"]["violations"].sum())
    if quantize:
        log.stage("bitwidth", f"bit width: measuring {len(cfg.bits)} weight-quantized copies on the test inputs")
        res["bitwidth"] = measured_bitwidth(module, x, y, calib, tuple(cfg.bits), drop, progress=log.part)
        res["graph_bitwidth"] = certified_graph_bitwidth(module, x, y, tuple(cfg.bits), drop, log) \
            if "table" in res["graph"] else None
        gbw = res["graph_bitwidth"]
        if gbw is not None and not isinstance(gbw, str):
            res["checks_violated"] += int(gbw.table["violations"].sum())
    log.stage("seu", f"SEU on {acc.name}: {cfg.seu_campaign} random single flips, exact general injection path")
    res["seu"] = measured_seu(target, acc, x, y, params, fmt=fmt, campaign=cfg.seu_campaign,
                              max_samples=cfg.seu_samples, seed=seed, hours=hours, target_name=target_name,
                              max_accuracy_drop=drop)
    stored = params.groupby("memory")["bits"].sum()
    mems = pd.DataFrame([{"memory": m.name, "holds": ", ".join(m.holds), "size_bytes": m.size_bytes,
                          "off_chip": m.off_chip, "protection": m.protection.describe(),
                          "ser_fit_per_mbit": m.ser_fit_per_mbit, "model_bits_stored": int(stored.get(m.name, 0))}
                         for m in acc.memories])
    n_par = int(sum(p.numel() for p in module.parameters()))
    res["memories"] = mems
    res["info"] = {
        "model": name, "input shape": tuple(input_shape) if input_shape is not None else tuple(x.shape[1:]),
        "input domain": f"[{input_domain[0]:g}, {input_domain[1]:g}]",
        "parameters": f"{n_par:,} (as trained, float32: {32 * n_par:,} bits)",
        "test accuracy (analysed inputs)": f"{clean:.2%} on {len(x)} inputs{note}",
        "certified analyses": not_applicable(reason),
        "injection path": "general (exact; the fast engine has no rule for this model)",
        "accelerator": f"{acc.name}: {acc.title}",
        "formats": ", ".join(acc.formats) + f" (model stored as {fmt})",
        "technology": f"{acc.technology_node_nm:g} nm" + (f", {acc.clock_mhz:g} MHz" if acc.clock_mhz else ""),
        "stored parameter bits": f"{int(params['bits'].sum()):,}"}
    return res


def certified_graph_bitwidth(module: nn.Module, x: Tensor, y: Tensor, bits: tuple[int, ...], drop: float,
                             log: Any) -> Any:
    """The certified bit width over the model's graph (:func:`hwrel.quantize.graph.graph_bitwidth`,
    verified against the rounded copy), or the one-line reason the graph bounds cannot give it."""
    from hwrel.quantize.graph import graph_bitwidth

    log.stage("bitwidth", f"certified bit width over the graph: {len(bits)} widths, {len(x)} inputs")
    try:
        return graph_bitwidth(module, x, y, bits=bits, max_accuracy_drop=drop, progress=log.part)
    except (UnsupportedLayerError, HwrelError) as exc:
        return str(exc).strip().splitlines()[0]


def graph_fep(module: nn.Module, x: Tensor, cfg: Any, log: Any, seed: int, y: Tensor | None = None,
              drop: float | None = None) -> dict[str, Any]:
    """Certified neuron-crash bounds over the model's torch.fx graph (:mod:`hwrel.bounds.graph`), one
    crash per failure layer at a time, on the test inputs, each validated against random crashes
    injected exactly; with the accuracy budget ``drop``, the certified tolerance per layer
    (:func:`hwrel.bounds.tolerance.graph_tolerance`, labels ``y`` for a classifier, top-1 agreement
    per position for a language model) as ``"tolerance"``. ``{"reason": ...}`` where the graph
    bounds have no rule either."""
    from hwrel.bounds import graph as G
    from hwrel.bounds.tolerance import graph_tolerance

    try:
        layers = G.check_supported(module, x)
    except (UnsupportedLayerError, HwrelError) as exc:
        return {"reason": str(exc).strip().splitlines()[0]}
    sizes = G.layer_sizes(module, x)
    rows = []
    for k, name in enumerate(layers):
        log.stage("fep", f"graph bound: 1 crash in {name} ({k + 1}/{len(layers)} layers), {len(x)} inputs")
        cert = G.graph_certificate(module, {name: 1}, inputs=x,
                                   progress=lambda done, total: log.part(done / total, f"{done}/{total} inputs"))
        check = G.validate(module, x, name, cert.bound, sets=max(4, cfg.random_sets), seed=seed)
        rows.append({"layer": name, "elements": sizes.get(name), "failures": 1,
                     "bound_max": float(cert.per_input.max()), "bound_median": float(cert.per_input.median()),
                     "certified_top1_fraction": (float(cert.certified.double().mean())
                                                 if cert.certified is not None else float("nan")),
                     "measured_max": check["measured_max"], "violations": check["violations"]})
    out: dict[str, Any] = {"table": pd.DataFrame(rows)}
    if drop is not None:
        log.stage("fep", f"graph tolerance: crashes each layer tolerates within a {drop:.2%} drop, {len(x)} inputs")
        labels = y if y is not None and y.dim() == 1 else None
        tol = graph_tolerance(module, x, labels, max_drop=drop, progress=log.part)
        keep = ["layer", "size", "tolerated", "tolerated_fraction", "bound_max", "bound_median", "certified_fraction"]
        out["tolerance"] = tol.table[[c for c in keep if c in tol.table]]
        out["tolerance_what"] = "accuracy" if labels is not None else "top-1 agreement with the clean model"
    return out


__all__ = ["MeasuredBitwidth", "MeasuredSEU", "analyse", "bounds_reason", "general_target", "measured_bitwidth", "measured_seu",
           "not_applicable", "parameter_table", "round_weights"]
