"""Where every rate behind the verdict comes from, and how the verdict moves if the rates are wrong.

:func:`rate_provenance` lists, per memory holding model parameters, its raw soft-error rate with
the source and the *status* the accelerator file gives it: ``measured`` (on this chip),
``published`` (read in a document, primary or secondary: confidence ``verified``/``secondary``)
or ``assumed`` (a placeholder or a rate carried over from another technology), plus the target's
limit with its own source. :func:`sensitivity` reruns the FIT and mission arithmetic of
:mod:`hwrel.seu.mission` with the assumed rates (and, as a stress case, every rate) scaled by 10x
up and down and says whether the verdict changes. Exact arithmetic given the certified vulnerable
fractions; the FIT figures themselves are estimates under the Poisson soft-error model.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import pandas as pd

from hwrel.seu.accelerator import Accelerator
from hwrel.seu.mission import failure_probability, memory_fit

STATUS = {"measured": "measured", "verified": "published", "secondary": "published", "assumed": "assumed"}
FACTOR = 10.0


def status(confidence: str) -> str:
    """``measured``, ``published`` or ``assumed`` for an accelerator file's confidence level."""
    return STATUS.get(confidence, "assumed")


def rate_provenance(acc: Accelerator, memories: pd.DataFrame, target: Any = None) -> pd.DataFrame:
    """One row per memory holding model parameters (``memories``: the SEU FIT table): rate,
    status, the file's confidence level and source; then the target limit when one is given."""
    rows = []
    for r in memories.itertuples():
        m = acc.memory(r.memory)
        conf = m.confidence_of("ser_fit_per_mbit")
        rows.append({"quantity": f"raw SER of {m.name}", "value": m.ser_fit_per_mbit, "unit": "FIT/Mbit",
                     "status": status(conf), "confidence": conf, "source": m.ser_source,
                     "file": acc.path.name})
        if m.mbu_fraction:
            c = m.confidence_of("mbu_fraction")
            rows.append({"quantity": f"multi-bit upset share of {m.name}", "value": m.mbu_fraction,
                         "unit": "fraction", "status": status(c), "confidence": c, "source": m.ser_source,
                         "file": acc.path.name})
        pc = m.confidence_of("protection")
        rows.append({"quantity": f"protection of {m.name}", "value": math.nan, "unit": m.protection.describe(),
                     "status": status(pc), "confidence": pc, "source": m.source, "file": acc.path.name})
    if target is not None:
        rows.append({"quantity": f"{target.name} limit", "value": target.max_fit, "unit": "FIT",
                     "status": status(target.confidence), "confidence": target.confidence,
                     "source": f"{target.description}; {target.source}", "file": "hwrel.seu.rates.TARGETS"})
    return pd.DataFrame(rows, columns=["quantity", "value", "unit", "status", "confidence", "source", "file"])


def _scaled(acc: Accelerator, factors: dict[str, float]) -> Accelerator:
    mems = tuple(replace(m, ser_fit_per_mbit=m.ser_fit_per_mbit * factors.get(m.name, 1.0)) for m in acc.memories)
    return replace(acc, memories=mems)


def rerun(acc: Accelerator, seu: Any, factors: dict[str, float]) -> dict[str, float]:
    """FIT (without and with SECDED) and mission failure probabilities of ``seu`` (an SEUResult)
    with each memory's raw rate multiplied by ``factors[memory]`` (1 where absent). With no factor
    this reproduces ``seu.fit``, ``seu.fit_with_ecc`` and the mission figures exactly."""
    scaled = _scaled(acc, factors)
    ts = seu.scrub_hours if seu.scrub_hours is not None else (seu.mission_hours if seu.mission_hours > 0 else 1.0)
    fit = fit_e = reach = reach_e = 0.0
    for r in seu.memories.itertuples():
        m = scaled.memory(r.memory)
        f, _, rch = memory_fit(m, r.bits, r.vulnerable_fraction, r.vulnerable_word_fraction, seu.altitude_factor,
                               ts, False)
        fe, _, rche = memory_fit(m, r.bits, r.vulnerable_fraction, r.vulnerable_word_fraction,
                                 seu.altitude_factor, ts, True)
        fit, fit_e, reach, reach_e = fit + f, fit_e + fe, reach + rch, reach_e + rche
    k = seu.certified_flips
    return {"fit": fit, "fit_with_ecc": fit_e,
            "p_failure": failure_probability(reach, fit, seu.mission_hours, seu.scrub_hours, k),
            "p_failure_with_ecc": failure_probability(reach_e, fit_e, seu.mission_hours, seu.scrub_hours, k)}


@dataclass(frozen=True, eq=False)
class Sensitivity:
    """``table``: one row per scenario (as stated; assumed rates x10 and /10; every rate x10 and
    /10), with FIT, mission probability and verdict. ``assumed``: the memories whose rate is
    assumed. ``line``: the one sentence the summary shows. ``changes``: whether any assumed-rate
    scenario changes the verdict without ECC."""

    table: pd.DataFrame
    assumed: tuple[str, ...]
    line: str
    changes: bool


def _verdict(met: bool | None) -> str:
    return "-" if met is None else ("MEETS" if met else "DOES NOT MEET")


def sensitivity(acc: Accelerator, seu: Any, factor: float = FACTOR) -> Sensitivity:
    """How the verdict of ``seu`` (an SEUResult) moves when rates are off by ``factor``."""
    used = list(seu.memories["memory"])
    assumed = tuple(m for m in used if status(acc.memory(m).confidence_of("ser_fit_per_mbit")) == "assumed")
    scen = [("as stated", {})]
    if assumed:
        scen += [(f"assumed rates x{factor:g}", {m: factor for m in assumed}),
                 (f"assumed rates /{factor:g}", {m: 1 / factor for m in assumed})]
    scen += [(f"every rate x{factor:g}", {m: factor for m in used}),
             (f"every rate /{factor:g}", {m: 1 / factor for m in used})]
    limit = seu.target_max_fit
    rows = []
    for name, f in scen:
        r = rerun(acc, seu, f)
        met = None if limit is None else r["fit"] < limit
        met_e = None if limit is None else r["fit_with_ecc"] < limit
        rows.append({"scenario": name, "memories_scaled": ", ".join(f) or "none", **r,
                     "verdict": _verdict(met), "verdict_with_ecc": _verdict(met_e)})
    t = pd.DataFrame(rows)
    base = t.iloc[0]
    target = seu.target or "the target"
    if limit is None:
        return Sensitivity(t, assumed, "No target given: no verdict to test.", False)
    changes = bool((t[t.scenario.str.startswith("assumed")]["verdict"] != base.verdict).any())
    if assumed:
        up = t[t.scenario == f"assumed rates x{factor:g}"].iloc[0]
        head = (f"Rates of {', '.join(assumed)} are assumed: {factor:g}x higher gives FIT {up.fit:.3g} and "
                f"{up.verdict} {target}")
        head += (" (the verdict CHANGES)" if up.verdict != base.verdict else " (the verdict holds)")
    else:
        up = t[t.scenario == f"every rate x{factor:g}"].iloc[0]
        head = (f"No rate is assumed (all {', '.join(sorted({status(acc.memory(m).confidence_of('ser_fit_per_mbit')) for m in used}))}); "
                f"every rate {factor:g}x higher gives FIT {up.fit:.3g} and {up.verdict} {target}")
    every = t[t.scenario == f"every rate x{factor:g}"].iloc[0]
    tail = "" if not assumed else f"; every rate {factor:g}x higher: FIT {every.fit:.3g}, {every.verdict}"
    return Sensitivity(t, assumed, head + tail + ".", changes)
