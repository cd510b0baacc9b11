"""Hardening options for a model on an accelerator, ranked by certified gain per stored bit of cost.

From an :class:`hwrel.seu.analysis.SEUResult`: each option protects some stored bits, costs some
extra stored bits, and removes the certified vulnerable FIT of the bits it protects (the FIT of
upsets that can break the budget: certified vulnerable bits x the memory's raw rate, an upper
bound given the rates; protected bits keep the SECDED residual of :func:`hwrel.seu.rates.
secded_residual_fit`). Options:

- SECDED (72,64) ECC on a whole memory holding parameters (12.5 % check bits);
- SECDED over the top bit columns of every weight tensor (the sign bit, the sign and the top
  magnitude bit, ...; for float formats the sign and exponent bits), check bits per protected
  column as in :func:`hwrel.seu.mission.protection_plan`;
- SECDED over every bias bit (biases are few and their high bits critical);
- the greedy protection plan of the SEU analysis, when it protects anything;
- range restriction (every value read is clamped to its tensor's ``max |w|``; costs one 32-bit
  limit register per tensor) where the analysis evaluated it (float formats).

``gain_fit``: certified vulnerable FIT removed; ``fit_after``; ``overhead_bits``; ``gain_per_bit``
= gain / overhead; ``certified_flips_after`` where the analysis certified it (biases protected,
the plan), else NaN (not computed). An estimate given the rates; the ranking is exact arithmetic.
"""
from __future__ import annotations

import math
from typing import Any

import pandas as pd

from hwrel.seu import rates
from hwrel.seu.accelerator import Accelerator


def _column_gain(acc: Accelerator, seu: Any, cols: pd.DataFrame) -> tuple[float, float, int]:
    """(FIT removed, SECDED residual added, check bits) of protecting the columns ``cols`` (rows of
    ``critical_bits``) with SECDED (72,64) per column, in unprotected memories only."""
    alt = seu.altitude_factor
    ts = seu.scrub_hours if seu.scrub_hours is not None else (seu.mission_hours if seu.mission_hours > 0 else 1.0)
    saved = added = 0.0
    check = 0
    for c in cols.itertuples():
        m = acc.memory(c.memory)
        if m.protection.kind != "none":
            continue
        ser = m.ser_fit_per_mbit * alt
        saved += ser * (1 - m.mbu_fraction) * c.vulnerable_bits / 1e6
        added += rates.secded_residual_fit(ser, c.elements, 64, 8, ts).silent_fit
        check += int(math.ceil(c.elements / 64) * 8)
    return saved, added, check


def _top_columns(crit: pd.DataFrame, count: int, float_format: bool) -> pd.DataFrame:
    w = crit[crit.part == "weight"]
    if float_format:
        return w[w.role.isin(["sign", "exponent"])]
    top = w.groupby("tensor").bit.transform("max")
    return w[w.bit > top - count]


def hardening_options(acc: Accelerator, seu: Any) -> pd.DataFrame:
    """Every option of the module docstring, best gain per overhead bit first."""
    crit, mems = seu.critical_bits, seu.memories
    fit = float(seu.fit)
    total = int(seu.total_bits)
    rows: list[dict[str, Any]] = []

    def add(option: str, what: str, gain: float, overhead: int, k_after: float = math.nan,
            after: float | None = None) -> None:
        gain = max(0.0, gain)
        rows.append({"option": option, "protects": what, "gain_fit": gain,
                     "fit_after": max(0.0, fit - gain) if after is None else after,
                     "overhead_bits": int(overhead), "overhead_percent": 100.0 * overhead / total if total else 0.0,
                     "gain_per_bit": gain / overhead if overhead else (math.inf if gain > 0 else 0.0),
                     "certified_flips_after": k_after})

    for r in mems.itertuples():
        if not str(r.protection).startswith("secded"):
            add(f"SECDED ECC on {r.memory}", f"all {int(r.bits):,} parameter bits in {r.memory}",
                float(r.fit) - float(r.fit_with_ecc), int(math.ceil(r.bits / 64) * 8),
                after=fit - float(r.fit) + float(r.fit_with_ecc))
    is_float = bool(crit.role.isin(["exponent", "mantissa"]).any())
    tiers = [(1, "SECDED on the sign and exponent bits of every weight", "sign and exponent columns")] \
        if is_float else [(1, "SECDED on the sign bit of every weight", "the sign bit column of each weight tensor"),
                          (2, "SECDED on the top 2 bits of every weight", "sign + top magnitude bit columns"),
                          (3, "SECDED on the top 3 bits of every weight", "sign + top 2 magnitude bit columns")]
    for count, option, what in tiers:
        cols = _top_columns(crit, count, is_float)
        saved, added, check = _column_gain(acc, seu, cols)
        if check:
            add(option, what, saved - added, check)
    bias = crit[crit.part == "bias"]
    if len(bias):
        saved, added, check = _column_gain(acc, seu, bias)
        if check:
            add("SECDED on every bias bit", f"{int(bias.elements.groupby(bias.tensor).first().sum()):,} "
                "biases", saved - added, check, float(seu.certified_flips_weights_only))
    plan = seu.protection_plan
    prot = plan[plan.action == "protect"]
    if len(prot):
        add("greedy protection plan (SECDED columns)", f"{len(prot)} bit columns",
            fit - float(prot.fit.iloc[-1]), int(prot.check_bits.sum()), float(seu.certified_flips_with_plan))
    rr = plan[plan.action == "range_restrict"]
    if len(rr):
        add("range restriction (clamp to max |w|)", "every stored value read", fit - float(rr.fit.iloc[0]),
            32 * len(seu.mapping))
    df = pd.DataFrame(rows, columns=["option", "protects", "gain_fit", "fit_after", "overhead_bits",
                                     "overhead_percent", "gain_per_bit", "certified_flips_after"])
    df = df.sort_values(["gain_per_bit", "gain_fit"], ascending=False, kind="stable").reset_index(drop=True)
    df.insert(0, "rank", range(1, len(df) + 1))
    return df
