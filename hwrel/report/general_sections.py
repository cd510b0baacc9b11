"""The report's sections for a model the bounds do not support: measured figures, and "not applicable".

Same section ids and order as the certified report (:func:`hwrel.report._assemble`), so the page
reads the same; every section that needs the bounds says ``not applicable: <reason>`` (the bounds'
own one-line reason, naming the node and operation) and shows no number in place of a bound.
Everything shown is measured on the test inputs or estimated from measurements, and says so.
"""
from __future__ import annotations

import math
from typing import Any

import pandas as pd

from hwrel.report.general import MeasuredBitwidth, MeasuredSEU, not_applicable
from hwrel.report.render import Facts, Report, Section, Table, Text
from hwrel.report.summary import ExecutiveSummary

PATH_LINE = ("Injection path: **general** (exact: every flip is a forward of the model with the faulty stored "
             "value written in, `hwrel.inject.general`); the fast engine has no rule for this model: {why}.")


def _mission(s: MeasuredSEU, hours: float) -> str:
    return (f"{s.mission_failure_probability:.3e} over {hours:g} h without ECC, "
            f"{s.mission_failure_probability_with_ecc:.3e} with SECDED (fraction at its CI upper end; no flip "
            "count certified, so every window with two or more upsets counts as a failure)")


def _na(section_id: str, title: str, reason: str, what: str) -> Section:
    return Section(section_id, title, (Text(f"{what}: {not_applicable(reason)}.", "note"),))


def executive(name: str, acc: Any, reason: str, clean: float, n: int, seu: MeasuredSEU | None,
              bw: MeasuredBitwidth | None, checksum: str, data_source: str, generated: str,
              accuracy_note: str = "", hours: float = 0.0, graph: pd.DataFrame | None = None,
              tolerance: pd.DataFrame | None = None, drop: float | None = None, gbw: Any = None) -> ExecutiveSummary:
    na = not_applicable(reason)
    rows: list[tuple[str, str, float, str, str, str]] = []
    if graph is not None and len(graph):
        last = graph.iloc[-1]
        cert = last["certified_top1_fraction"]
        rows.append((f"Fep over the graph, 1 crash in {last['layer']} (certified)",
                     f"output change <= {last['bound_max']:.4g} on every test input (median {last['bound_median']:.4g})"
                     + ("" if math.isnan(cert) else f"; top-1 certified unchanged on {cert:.1%} of them"),
                     float(last["bound_max"]), "output units", "certified", "fep"))
        if tolerance is not None and len(tolerance):
            per = ", ".join(f"{r.layer} {int(r.tolerated)}" for r in tolerance.itertuples())
            rows.append((f"tolerated crashes per failure layer (certified, {drop:.2%} budget)" if drop is not None
                         else "tolerated crashes per failure layer (certified)",
                         f"{per} (each layer alone, on every test input)",
                         float(tolerance["tolerated"].iloc[-1]), "elements", "certified", "fep"))
        parts = ["bounds"] + (["tolerance"] if tolerance is not None and len(tolerance) else []) \
            + (["weight bit width"] if gbw is not None and not isinstance(gbw, str) else [])
        what = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
        headline = (f"Certified over the model's graph: only the neuron-crash {what}; every other certified "
                    f"analysis {na}. The rest is measured (exact general injection path)")
    else:
        headline = f"Certified analyses {na}. Only measured figures below (exact general injection path)"
    rows += [
        ("certified analyses (" + ("" if len(rows) > 1 else "tolerance, " if rows else "Fep, tolerance, ")
         + "certified flips, ISO 26262)", na, math.nan, "", "not applicable", "fep"),
        ("test accuracy (float)", f"{clean:.2%} on {n} inputs{accuracy_note}", clean, "fraction", "measured",
         "summary")]
    certified_rows = bool(graph is not None and len(graph))
    if seu is not None:
        lo, hi = seu.ci
        rows += [
            ("injection path", f"{seu.path} (exact); fast engine: {seu.engine_refused or 'not used'}", math.nan, "",
             "exact", "seu"),
            ("test accuracy as stored", f"{seu.stored_accuracy:.2%} with parameters stored as {seu.format} "
             f"(float: {seu.float_accuracy:.2%} on the same {seu.samples} inputs)", seu.stored_accuracy, "fraction",
             "measured", "seu"),
            ("tolerated bit flips (certified)", na, math.nan, "flips", "not applicable", "seu"),
            ("vulnerable fraction of stored bits (measured)",
             f"{seu.vulnerable_fraction:.4%} (95% CI {lo:.4%} .. {hi:.4%}; {seu.vulnerable} of {seu.campaign_size} "
             "random single flips changed a decision)", seu.vulnerable_fraction, "fraction", "measured", "seu"),
            ("FIT (estimate from the measured fraction)",
             f"{seu.fit:.4g} without ECC (CI upper end {seu.fit_hi:.4g}), {seu.fit_with_ecc:.3g} with SECDED",
             seu.fit, "FIT", "estimate given the rates", "seu")]
        if seu.target is not None:
            verdict = "meets" if seu.meets_target else "DOES NOT MEET"
            headline += (f"; FIT estimate {seu.fit_hi:.4g} (CI upper end) {verdict} {seu.target} "
                         f"(< {seu.target_max_fit:g} FIT): an estimate, not a certificate")
            rows.append(("verdict (estimate)", f"{verdict} {seu.target} by the measured-fraction FIT estimate "
                         f"(CI upper end {seu.fit_hi:.4g} vs < {seu.target_max_fit:g})",
                         seu.fit_hi / seu.target_max_fit, "FIT / limit", "estimate given the rates", "seu"))
        rows.append(("fewest flips breaking the budget (search)", not_applicable(
            "the adversarial bit-flip search needs the fast engine"), math.nan, "flips", "not applicable", "seu"))
        rows.append(("mission failure probability (estimate)", _mission(seu, hours), seu.mission_failure_probability,
                     "probability", "estimate given the rates", "seu"))
    if gbw is not None and not isinstance(gbw, str):
        cb = gbw.certified_bits
        rows.append(("safe bit width (certified)", _certified_width(gbw, reason),
                     float(cb) if cb is not None else math.nan, "bits", "certified", "bitwidth"))
    else:
        rows.append(("safe bit width (certified)", _certified_width(gbw, reason), math.nan, "bits", "not applicable",
                     "bitwidth"))
    if bw is not None:
        shown = (f"{bw.measured_bits} bits" if bw.measured_bits is not None else "none in the sweep")
        rows.append(("bit width meeting the budget (measured on the test inputs)",
                     f"{shown} ({bw.method}; an estimate, not a certificate)",
                     float(bw.measured_bits) if bw.measured_bits is not None else math.nan, "bits", "measured",
                     "bitwidth"))
    prov = (f"Generated {generated} by hwrel. Model {name}, SHA-256 {checksum[:16]}... (parameters). Data: "
            f"{data_source}. Accelerator: {acc.name} ({acc.path.name}).")
    notes = (("The only bounds in this report are the graph Fep bounds and what is built on them: tolerance"
              + (" and the certified bit width" if gbw is not None and not isinstance(gbw, str) else "")
              + " (marked certified); every other "
              "measured figure is a lower end of the true worst case (random flips on the test inputs), "
              "estimates carry their interval." if certified_rows else
              "No number in this report is a bound: measured figures are lower ends of the true worst case "
              "(random flips on the test inputs), estimates carry their interval."),)
    return ExecutiveSummary(headline, None, tuple(rows), notes, prov)


def summary(info: dict[str, Any], params: pd.DataFrame, memories: pd.DataFrame) -> Section:
    return Section("summary", "Model and accelerator", (
        Facts(tuple((k, str(v)) for k, v in info.items())),
        Table("parameters", "Stored parameter tensors (general injection path)", params,
              note="Every floating parameter is a fault site. Integer formats: `weight` sites are stored as "
                   "per-tensor symmetric codes (scale fixed), `bias` sites as fp32; float formats round every "
                   "parameter to the format. Each module's parameters go whole into the first weight memory with "
                   "room, on-chip first."),
        Table("memories", "Accelerator memories and the model bits stored in each", memories)))


def _certified_width(gbw: Any, reason: str) -> str:
    """The certified-width fact: the width, none in the sweep (with the best bound), or why not."""
    if gbw is None:
        return not_applicable(reason)
    if isinstance(gbw, str):
        return not_applicable(f"{reason}; the graph bounds: {gbw}")
    if gbw.certified_bits is not None:
        row = gbw.table[gbw.table["bits"] == gbw.certified_bits].iloc[0]
        trivial = "" if row["certified_fraction"] > 0 else (
            f"; no input is certified: the budget holds only because the clean accuracy "
            f"({gbw.clean_accuracy:.2%}) is within the allowed drop ({gbw.max_accuracy_drop:.2%})")
        return (f"{gbw.certified_bits} bits (sound on each of the test inputs, over the model's graph; weight "
                f"rounding per-channel symmetric, float activations{trivial})")
    top = gbw.table.iloc[-1]
    return (f"none in the sweep: at {int(top['bits'])} bits the bound over the graph is {top['bound_max']:.3g} "
            f"(output units; certified {top['certified_fraction']:.1%} of the inputs): interval precision through "
            "normalization and attention makes the bound on perturbing every layer vacuous")


def bitwidth(bw: MeasuredBitwidth | None, reason: str, gbw: Any = None) -> Section:
    title = "Safe bit width (quantization)"
    if bw is None:
        return _na("bitwidth", title, reason, "Safe bit-width analysis")
    facts = Facts((
        ("recommended width (certified)", _certified_width(gbw, reason)),
        ("width meeting the budget, measured on the test inputs (an estimate, not a certificate)",
         f"{bw.measured_bits} bits" if bw.measured_bits is not None else
         "none in the sweep (every swept width, or a wider one, drops the accuracy beyond the budget)"),
        ("budget", f"max accuracy drop {bw.max_accuracy_drop:.2%} from the float accuracy {bw.float_accuracy:.2%}"),
        ("quantizer", bw.method),
        ("weights quantized", f"{len(bw.quantized)} tensors ({', '.join(bw.quantized[:6])}"
                              f"{', ...' if len(bw.quantized) > 6 else ''}); every other parameter stays float"),
    ))
    blocks: list = [facts]
    if bw.note:
        blocks.append(Text(bw.note + "; the copies are quantized by hwrel's weight rounding instead.", "note"))
    blocks.append(Table("bitwidth", "Per bit width: measured on the test inputs", bw.table,
                        note="Measured: accuracy and largest logit change of the weight-quantized copy against the "
                             "float model on the test inputs. A width from which every wider swept width keeps the "
                             "budget is the measured recommendation; other inputs may differ (no certificate)."))
    if gbw is not None and not isinstance(gbw, str):
        blocks.append(Table("graph_bitwidth", "Per bit width: certified over the model's graph, on the test inputs",
                            gbw.table,
                            note="Certified (sound per test input): bound_max / bound_median of the largest output "
                                 "change when every rounded weight moves by up to half a quantization step; "
                                 "certified_fraction: inputs (token positions) whose top-1 provably stays; "
                                 "certified_accuracy: provably kept and correct; below a width that certifies "
                                 "nothing the narrower ones are not evaluated (certified 0). measured_max: the "
                                 "largest change of the rounded copy; violations: (input, output) pairs beyond "
                                 "their bound (must be 0)."))
    return Section("bitwidth", title, tuple(blocks))


def seu(s: MeasuredSEU | None, reason: str, hours: float) -> Section:
    title = "Soft errors (SEU) in accelerator memory"
    if s is None:
        return _na("seu", title, reason, "SEU analysis")
    lo, hi = s.ci
    facts = Facts((
        ("storage format", f"{s.format} (integer formats: weight sites as codes, bias sites fp32)"),
        ("stored parameter bits", f"{s.total_bits:,}"),
        ("test accuracy as stored (measured)", f"{s.stored_accuracy:.2%} (float: {s.float_accuracy:.2%}) on the "
                                               f"{s.samples} evaluated inputs"),
        ("certified tolerated flips (any bits)", not_applicable(reason)),
        ("fewest flips breaking the budget (adversarial search)",
         not_applicable("the adversarial bit-flip search needs the fast engine")),
        ("vulnerable fraction, certified (upper bound)", not_applicable(reason)),
        ("vulnerable fraction, measured", f"{s.vulnerable_fraction:.4%} (95% CI {lo:.4%} .. {hi:.4%}, "
                                          f"{s.campaign_size} random single flips on {s.samples} inputs)"),
        ("flips beyond the accuracy budget (measured)",
         f"{s.budget_breaking} of {s.campaign_size}" if s.budget_breaking is not None else
         "not measured: a language model's campaign measures next-token agreement and cross-entropy "
         "(see the tables)"),
        ("FIT without ECC (estimate: measured fraction x raw rates)",
         f"{s.fit:.4g} (95% CI upper end {s.fit_hi:.4g})"),
        ("FIT with SECDED ECC (estimate)", f"{s.fit_with_ecc:.4g}"),
        ("mission failure probability (estimate)", _mission(s, hours)),
        ("verdict", "no target given" if s.target is None else
         f"estimate {'meets' if s.meets_target else 'DOES NOT MEET'} {s.target} (max {s.target_max_fit:g} FIT) "
         "by the FIT at the measured fraction's 95% CI upper end; not a certificate"),
    ))
    return Section("seu", title, (
        Text(PATH_LINE.format(why=s.engine_refused or reason)),
        Text("A flip is vulnerable when it changes the decision (the top-1 class, or a language model's top-1 next "
             "token) on at least one evaluated input (or makes an output non-finite); the fraction is measured by "
             "random single flips of the stored bits, uniform over every "
             "stored bit of every parameter tensor.", "note"),
        facts,
        Table("seu_tensors", "Measured vulnerable flips per parameter tensor", s.per_tensor),
        Table("seu_bits", "Measured vulnerable flips per stored format and bit position", s.per_bit),
        Table("seu_fit", "FIT estimate per memory (measured fraction)", s.memories),
        Table("seu_campaign", "Injected flips (measured)", s.campaign, max_rows=12),
    ))


def fep(graph: dict[str, Any] | None, reason: str) -> Section:
    """Neuron failures: the graph bounds where they have a rule for every operation, one crash per
    layer, with their validation; tolerance and certified accuracy at a budget not applicable."""
    title = "Neuron failures (Forward Error Propagation)"
    if not graph or "table" not in graph:
        why = reason if not graph else f"{reason}; the graph bounds: {graph['reason']}"
        return _na("fep", title, why, "Fep bounds, certified tolerance and certified accuracy")
    t = graph["table"]
    blocks: tuple[Any, ...] = (
        Text("Certified (sound) bounds over the model's torch.fx graph (`hwrel.bounds.graph`: intervals and "
             "l2 row bounds through LayerNorm, RMSNorm, softmax, attention and products of activations, "
             "float32 rounding included), per test input, for one crashed element of each failure layer. "
             "The paper's closed-form Fep: not applicable (LayerNorm and products of two activations have no "
             "Lipschitz constant independent of the input). Tolerance curves over failure counts: "
             f"{not_applicable(reason)}.", "note"),
        Table("graph_fep", "Certified bound per failure layer (1 crash), on the test inputs", t,
              note="bound_max / bound_median: over the inputs of the largest output change the bound allows "
                   "(output units); certified_top1_fraction: inputs whose top-1 class provably stays (classifiers); "
                   "measured_max: the largest change over random single crashes injected exactly in that layer; "
                   "violations: (input, output) pairs where a measured change exceeds its bound (must be 0)."),
    )
    tol = graph.get("tolerance")
    if tol is not None and len(tol):
        blocks += (Table("graph_tolerance", "Certified tolerated crashes per failure layer (each alone), on the "
                         "test inputs", tol,
                         note=f"tolerated: the largest number of crashed elements of the layer for which the "
                              f"certified {graph.get('tolerance_what', 'accuracy')} stays within the budget "
                              "(doubling, then bisection; the count shown was itself evaluated; as every rule "
                              "grows with the failures, any smaller count holds too); bound_max / bound_median "
                              "and certified_fraction at that count (0 crashes: the bound is 0 and the fraction "
                              "is the clean model's)."),)
    return Section("fep", title, blocks)


def provenance(prov: pd.DataFrame, acc: Any) -> Section:
    """The rates behind the FIT estimate, with their sources (no sensitivity: it needs a certified analysis)."""
    return Section("provenance", "Rates and their sources", (
        Text("Status: measured (on this chip), published (read in a document) or assumed. Every number comes from "
             f"`{acc.path.name}`; its sources: " + " | ".join(acc.sources)),
        Table("rates", "Rates and limits behind the FIT estimate", prov, ("quantity", "value", "unit", "status",
                                                                          "source")),
    ))


def _validation(graph: dict[str, Any] | None, reason: str, gbw: Any = None) -> Section:
    title = "Validation against fault injection"
    if not graph or "table" not in graph:
        return Section("validation", title, (
            Text(f"Bound validation: {not_applicable('no certified number to validate; ' + reason)}.", "note"),))
    t = graph["table"]
    bad = int(t["violations"].sum())
    verdict = (f"BOUND VIOLATIONS FOUND: {bad} (input, output) pairs" if bad else
               "no violation: every measured change is within its certified bound")
    quant = ""
    if gbw is not None and not isinstance(gbw, str):
        qbad = int(gbw.table["violations"].sum())
        quant = (" Certified bit width against the rounded copy at every evaluated width: "
                 + (f"BOUND VIOLATIONS FOUND: {qbad} (input, output) pairs." if qbad else
                    "no violation: every output change is within its bound."))
    return Section("validation", title, (
        Text(f"Graph bounds against random single crashes injected exactly (each layer's elements set to 0 "
             f"in the model's own forward): {verdict}.{quant} Other analyses: "
             f"{not_applicable('no certified number to validate; ' + reason)}.", "note"),))


def assemble(res: dict[str, Any], name: str, acc: Any, versions: dict[str, str], generated: str,
             prov_section: Section | None, reproduce: Section) -> Report:
    """The whole report of :func:`hwrel.report.general.analyse`'s results ``res``."""
    reason = res["reason"]
    s, bw = res["seu"], res["bitwidth"]
    graph = res.get("graph") or {}
    exe = executive(name, acc, reason, res["clean_accuracy"], len(res["x"]), s, bw, res["checksum"],
                    res["data_source"], generated, res.get("accuracy_note", ""), res["hours"], graph.get("table"),
                    graph.get("tolerance"), res.get("max_accuracy_drop"), res.get("graph_bitwidth"))
    secs = [exe.section(), summary(res["info"], res["params"], res["memories"]),
            fep(res.get("graph"), reason),
            bitwidth(bw, reason, res.get("graph_bitwidth")), seu(s, reason, res["hours"])]
    if prov_section is not None:
        secs.append(prov_section)
    secs += [_na("iso26262", "ISO 26262-5 hardware metrics (estimates)", reason,
                 "ISO 26262 metrics (they need the certified vulnerable fractions)"),
             _validation(res.get("graph"), reason, res.get("graph_bitwidth")),
             reproduce]
    if res.get("graph") and "table" in res["graph"]:
        gbw = res.get("graph_bitwidth")
        extra = (" and the certified bit width over it (section Safe bit width)"
                 if gbw is not None and not isinstance(gbw, str) else "")
        banner = Text("Certified figures: only the neuron-crash bounds and tolerance over the model's graph (section "
                      f"Neuron failures){extra}; every other certified figure: {not_applicable(reason)}. The rest "
                      "of this report shows measurements and estimates.", "note")
    else:
        banner = Text(f"Certified figures: {not_applicable(reason)}. This report shows measurements and estimates only.",
                      "note")
    sub = (f"{acc.name}, accuracy budget {res['max_accuracy_drop']:.2%}, mission {res['hours']:g} h. "
           f"Generated {generated} by hwrel {versions['hwrel']}. Injection path: general.")
    return Report(f"Reliability report: {name} on {acc.name}", sub, tuple(secs), banner,
                  (Table("summary", "Executive summary", exe.table()),))


__all__ = ["assemble", "bitwidth", "executive", "seu", "summary"]
