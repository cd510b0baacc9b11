"""The executive summary: the answers a safety engineer signs, on one screen, with their evidence.

:func:`executive_summary` reads the very result objects the report's sections are built from
(no figure is computed twice), so every number it shows equals the one in its section;
:meth:`ExecutiveSummary.table` lists them with their unit, kind (certified / measured / estimate)
and the section that holds the detail (``tables/summary.csv``; the tests compare it with the
sections' tables).
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Any

import pandas as pd
import torch
from torch import nn

from hwrel.report.render import Facts, Section, Text


def model_checksum(module: nn.Module) -> str:
    """SHA-256 of the model's parameters and buffers (names, dtypes, shapes, bytes), sorted by name."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        if not isinstance(t, torch.Tensor):
            continue
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        # reshape first: a 0-dim buffer (batch norm's num_batches_tracked) cannot be viewed as bytes
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def k_zero_meaning(seu: Any) -> str:
    """What a certified tolerance of 0 flips means beside a met (or missed) rate target."""
    k = seu.certified_flips
    met = seu.meets_target
    if k > 0:
        return (f"Certified tolerated flips k = {k}: any {k} bit flips anywhere in the stored parameters keep the "
                "budget, for every choice of the bits (sound); the FIT counts only what can go beyond that.")
    b = seu.single_flip_breaker or {}
    who = f" (e.g. {b.get('tensor')} bit {b.get('bit')})" if b else ""
    verdict = ("meets" if met else "misses") if met is not None else "is compared with"
    return (f"k = 0 does not mean the model fails: it means no number of flips is safe whatever bits they hit, "
            f"because some single bits{who} can alone break the budget. The target is a rate: the FIT counts "
            f"only upsets of the {seu.vulnerable_fraction_certified:.2%} of stored bits not certified safe "
            f"(upper bound), at the memories' raw rates, and {verdict} the limit on that basis; over the mission "
            f"{seu.expected_upsets:.3g} upsets are expected in all.")


def failure_vs_fit(seu: Any) -> str:
    """Why the mission failure probability exceeds FIT x mission time when k is small."""
    fit_t = 1 - math.exp(-seu.fit * 1e-9 * seu.mission_hours)
    k = seu.certified_flips
    return (f"P(failure) {seu.mission_failure_probability:.3g} vs 1 - exp(-FIT t) = {fit_t:.3g}: FIT x t counts "
            f"single vulnerable upsets only; P(failure) also counts every window with more than "
            f"max(1, k) = {max(1, k)} upsets (k = {k} certified), since no certificate covers those "
            f"(Poisson, {seu.expected_upsets:.3g} upsets expected per mission at the raw rate).")


@dataclass(frozen=True, eq=False)
class ExecutiveSummary:
    """The summary's items: ``rows`` of (item, text shown, numeric value, unit, kind, section)."""

    headline: str
    headline_ok: bool | None
    rows: tuple[tuple[str, str, float, str, str, str], ...]
    notes: tuple[str, ...]
    provenance: str

    def table(self) -> pd.DataFrame:
        return pd.DataFrame(list(self.rows), columns=["item", "shown", "value", "unit", "kind", "section"])

    def section(self) -> Section:
        kind = "p" if self.headline_ok is None else ("ok" if self.headline_ok else "alert")
        facts = Facts(tuple((item, shown) for item, shown, *_ in self.rows))
        blocks = [Text(f"**{self.headline}**", kind), facts, *(Text(n, "note") for n in self.notes),
                  Text(self.provenance, "note")]
        return Section("executive", "Executive summary", tuple(blocks))


def _pct(v: float) -> str:
    return f"{v:.2%}" if v >= 1e-4 or v == 0 else f"{v:.2e}"


def executive_summary(*, name: str, acc: Any, seu: Any, bw: Any, attack: tuple[Any, Any] | None,
                      sens: Any, iso: Any, options: pd.DataFrame | None, provenance: pd.DataFrame | None,
                      checksum: str, data_source: str, generated: str, checks_violated: int) -> ExecutiveSummary:
    """Build the summary from the results the sections show (see the module docstring)."""
    rows: list[tuple[str, str, float, str, str, str]] = []
    notes: list[str] = []
    headline, ok = "No SEU analysis: no verdict against a target.", None
    if seu is not None and seu.target is not None:
        lim, fit = seu.target_max_fit, seu.fit
        if seu.meets_target:
            headline = (f"MEETS {seu.target} without ECC: FIT {fit:.3g} is {lim / fit:.3g}x below the "
                        f"{lim:g} FIT limit" if fit > 0 else f"MEETS {seu.target} without ECC: FIT 0")
        else:
            headline = (f"DOES NOT MEET {seu.target} without ECC: FIT {fit:.3g} is {fit / lim:.3g}x the {lim:g} FIT "
                        f"limit; with SECDED ECC FIT {seu.fit_with_ecc:.3g} "
                        f"({'meets' if seu.meets_target_with_ecc else 'still does not meet'} it)")
        ok = bool(seu.meets_target)
        rows.append(("verdict", headline.split(":")[0] + f" (FIT {fit:.4g} vs < {lim:g})", fit / lim,
                     "FIT / limit", "estimate given the rates", "seu"))
    if iso is not None and iso.met() is False:
        bad = iso.table[(iso.table.configuration == "as built") & (iso.table.asil == iso.target) & ~iso.table.met]
        headline += f"; ISO 26262-5 estimate: {', '.join(bad.metric)} not met (see below)"
    if checks_violated:
        headline = f"BOUND VIOLATIONS FOUND ({checks_violated}): the certified figures are not trustworthy. " + headline
        ok = False
    if bw is not None:
        per = (", per layer " + ", ".join(f"{k}: {v}" for k, v in bw.per_layer.items())) if bw.per_layer else ""
        rows.append(("safe bit width", (f"{bw.certified_bits} bits (certified){per}; measured: {bw.measured_bits} "
                                        "(Brevitas PTQ)") if bw.certified_bits else "none in the sweep (certified)",
                     float(bw.certified_bits) if bw.certified_bits else math.nan, "bits", "certified", "bitwidth"))
    if seu is not None:
        k = seu.certified_flips
        adv = ""
        val = math.nan
        if attack is not None:
            ours, base = attack
            val = float(ours.flips_needed) if ours.broke else math.nan
            adv = (f"; adversarial: {ours.flips_needed} flip(s) break it ({ours.describe(2)}; measured accuracy "
                   f"{ours.clean_accuracy:.1%} -> {ours.accuracy:.1%}), progressive bit search: "
                   f"{base.flips_needed if base.broke else 'none found'}") if ours.broke else \
                f"; adversarial: no breaking set found within {len(ours.flips)} flips"
        what = (f"(any {k} bits, sound)" if k else "(no flip count is safe whatever bits it hits; see the note)")
        rows.append(("tolerated bit flips", f"certified k = {k}{' (capped)' if seu.certified_flips_capped else ''} "
                     f"{what}{adv}", float(k), "flips", "certified", "seu"))
        if attack is not None:
            rows.append(("fewest flips breaking the budget (search)",
                         str(int(val)) if not math.isnan(val) else "none found", val, "flips", "measured", "seu"))
        rows.append(("FIT", f"{seu.fit:.4g} without ECC (certified vulnerable bits x raw rates), "
                     f"{seu.fit_with_ecc:.3g} with SECDED; measured-fraction estimate {seu.fit_measured:.3g}",
                     float(seu.fit), "FIT", "estimate given the rates", "seu"))
        rows.append(("mission failure probability",
                     f"{seu.mission_failure_probability:.3e} over {seu.mission_hours:g} h "
                     f"({seu.mission_hours / 8760:.3g} years) without ECC, "
                     f"{seu.mission_failure_probability_with_ecc:.3e} with SECDED",
                     float(seu.mission_failure_probability), "probability", "estimate given the rates", "seu"))
        if provenance is not None and len(provenance):
            rates = provenance[provenance.quantity.str.startswith("raw SER")]
            src = "; ".join(f"{r.quantity[len('raw SER of '):]} {r.value:g} FIT/Mbit, {r.status}"
                            + (f" ({r.confidence} source: " if r.confidence != r.status else " (")
                            + f"{r.source.split(';')[0].split(',')[0]})" for r in rates.itertuples())
            st = sorted(set(rates.status))
            rows.append(("rates and their confidence", src, math.nan, "", "/".join(st), "provenance"))
        if sens is not None:
            rows.append(("sensitivity (rates off by 10x)", sens.line, math.nan, "", "estimate", "provenance"))
        if iso is not None:
            t = iso.table[iso.table.configuration == "as built"]
            asil = iso.target or "asil-b"
            t = t[t.asil == asil]
            parts = []
            for r in t.itertuples():
                v = f"{r.value:.3g} FIT" if r.metric == "PMHF" else _pct(r.value)
                parts.append(f"{r.metric} {v} ({r.limit}{', assumed limit' if r.limit_status == 'assumed' else ''}: "
                             f"{'met' if r.met else 'NOT met'})")
            rows.append((f"ISO 26262-5 ({asil.upper()}, estimates)", "; ".join(parts), float(iso.spfm),
                         "SPFM", "estimate", "iso26262"))
        if options is not None and len(options):
            top = []
            for r in options.head(3).itertuples():
                k_after = "" if math.isnan(r.certified_flips_after) else f", certified k after {int(r.certified_flips_after)}"
                top.append(f"{r.rank}. {r.option}: -{r.gain_fit:.3g} FIT for {r.overhead_bits:,} extra bits "
                           f"({r.overhead_percent:.2g}% of stored){k_after}")
            rows.append(("top hardening (certified FIT removed per extra bit)", " ".join(top),
                         float(options.gain_per_bit.iloc[0]), "FIT per bit", "estimate given the rates", "hardening"))
        notes.append(k_zero_meaning(seu))
    prov = (f"Generated {generated} by hwrel. Model {name}, SHA-256 {checksum[:16]}... (parameters). Data: "
            f"{data_source}. Accelerator: {acc.name} ({acc.path.name}; {len(acc.sources)} sources listed in the "
            "rates' provenance).")
    return ExecutiveSummary(headline, ok, tuple(rows), tuple(notes), prov)
