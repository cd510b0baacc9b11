"""FIT per memory, mission reliability over time, and selective hardening to reach a target.

Estimates under the soft-error model of theory section 7 (Poisson upsets at the accelerator
description's raw rates times the altitude factor); exact arithmetic given those inputs. Used by
:mod:`hwrel.seu.analysis`.

Per memory holding model parameters (``bits`` data bits, ``v_b`` certified vulnerable fraction of
single flips, ``v_w`` of whole words, MBU share ``m``, scrub/reload window ``T_s``):

- unprotected: ``FIT = SER * bits / 1e6 * ((1 - m) v_b + m v_w)``; every upset reaches the model;
- SECDED / parity: the silent residual of :func:`~hwrel.seu.rates.secded_residual_fit` /
  :func:`~hwrel.seu.rates.parity_residual_fit` times ``v_w`` (a residual corrupts a whole word);
  detected-uncorrectable events are reported apart (a DUE, not a silent corruption);
- ``with ECC``: every parameter memory as SECDED (its own, or (72,64) without interleaving).

Mission, per window ``T_s`` with ``N`` upsets reaching the model (Poisson; each counted as one
flip, an approximation for multi-bit residual events): the budget can only be exceeded when
``N >= k + 1`` (``k`` certified flips) or, for ``k = 0``, when a single upset hits a vulnerable bit:
``p_w = [k = 0] P(N = 1) v + P(N >= max(2, k + 1))`` with ``v = FIT / reaching rate``; windows
combine as ``1 - (1 - p_w)^(t / T_s)``.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import pandas as pd

from hwrel.seu import rates
from hwrel.seu.accelerator import Accelerator, Memory
from hwrel.seu.mapping import ModelMapping, StoredTensor


def _memory_fit(m: Memory, bits: float, vb: float, vw: float, alt: float, ts: float,
                ecc: bool) -> tuple[float, float, float]:
    """(silent FIT, detected FIT, reaching events FIT) of one memory's parameter bits."""
    ser = m.ser_fit_per_mbit * alt
    kind, p = m.protection.kind, m.protection
    if bits == 0:
        return 0.0, 0.0, 0.0
    if ecc and kind != "secded":
        kind, d, c, il = "secded", 64, 8, 1
    else:
        d, c, il = p.data_bits, p.check_bits, p.interleave
    if kind == "none":
        raw = ser * bits / 1e6
        return raw * ((1 - m.mbu_fraction) * vb + m.mbu_fraction * vw), 0.0, raw
    if kind == "secded":
        r = rates.secded_residual_fit(ser, bits, d, c, ts, m.mbu_fraction, il)
    else:
        r = rates.parity_residual_fit(ser, bits, p.data_bits, ts, m.mbu_fraction)
    return r.silent_fit * vw, r.detected_fit, r.silent_fit


def memory_fit(m: Memory, bits: float, vb: float, vw: float, alt: float, ts: float,
               ecc: bool) -> tuple[float, float, float]:
    """(silent FIT, detected FIT, FIT of upsets reaching the model) of ``bits`` parameter bits in
    memory ``m`` with certified vulnerable fractions ``vb`` (single flips) and ``vw`` (words);
    ``ecc``: as if the memory had SECDED (its own, or (72,64)). The arithmetic of :func:`fit_table`
    (an estimate given the memory's raw rate; used to rerun it with other rates)."""
    return _memory_fit(m, bits, vb, vw, alt, ts, ecc)


def fit_table(acc: Accelerator, per_tensor: Sequence[tuple[StoredTensor, float, float]],
              alt: float, ts: float, measured_fraction: float = math.nan) -> pd.DataFrame:
    """One row per memory holding parameters: bits, vulnerable fractions, FIT with/without ECC.

    ``per_tensor``: (tensor, certified vulnerable single-flip bits, vulnerable words).
    ``fit_measured`` uses ``measured_fraction`` for single flips and whole words.
    """
    agg: dict[str, list[float]] = {}
    for t, vb, vw in per_tensor:
        a = agg.setdefault(t.memory, [0.0, 0.0, 0.0])
        a[0] += t.bits
        a[1] += float(vb)
        a[2] += float(vw) * t.fmt.bits
    rows = []
    for name, (bits, vb, vwb) in agg.items():
        m = acc.memory(name)
        fb, fw = vb / bits, vwb / bits
        fit, det, reach = _memory_fit(m, bits, fb, fw, alt, ts, False)
        fit_e, det_e, reach_e = _memory_fit(m, bits, fb, fw, alt, ts, True)
        mf = measured_fraction if not math.isnan(measured_fraction) else 0.0
        fit_m = _memory_fit(m, bits, mf, mf, alt, ts, False)[0]
        rows.append({"memory": name, "off_chip": m.off_chip,
                     "protection": m.protection.describe(), "bits": int(bits),
                     "ser_fit_per_mbit": m.ser_fit_per_mbit, "mbu_fraction": m.mbu_fraction,
                     "vulnerable_fraction": fb, "vulnerable_word_fraction": fw,
                     "fit_raw": m.ser_fit_per_mbit * alt * bits / 1e6, "fit": fit,
                     "fit_measured": fit_m, "detected": det, "fit_with_ecc": fit_e,
                     "detected_with_ecc": det_e, "reaching_fit": reach,
                     "reaching_fit_with_ecc": reach_e})
    return pd.DataFrame(rows)


def _window_p(rate_fit: float, fit: float, t: float, k: int) -> float:
    mu = rate_fit * 1e-9 * t
    v = min(1.0, fit / rate_fit) if rate_fit > 0 else 0.0
    p = rates.poisson_at_least(mu, max(2, k + 1))
    if k == 0:
        p += mu * math.exp(-mu) * v
    return min(1.0, p)


def _over_time(p_full: float, p_part: float, n_full: int) -> float:
    return 1.0 - (1.0 - rates.combine_windows(p_full, n_full)) * (1.0 - p_part)


def failure_probability(rate_fit: float, fit: float, hours: float, scrub: float | None,
                        k: int) -> float:
    """Probability the budget is exceeded at least once in ``hours`` (see module docstring)."""
    if hours <= 0:
        return 0.0
    ts = scrub if scrub is not None else hours
    n_full = int(hours // ts)
    rest = hours - n_full * ts
    return _over_time(_window_p(rate_fit, fit, ts, k), _window_p(rate_fit, fit, rest, k), n_full)


def _exceed(rate_fit: float, hours: float, scrub: float | None, k: int) -> float:
    if hours <= 0:
        return 0.0
    ts = scrub if scrub is not None else hours
    n_full = int(hours // ts)
    rest = hours - n_full * ts
    pk = lambda t: rates.poisson_at_least(rate_fit * 1e-9 * t, k + 1)  # noqa: E731
    return _over_time(pk(ts), pk(rest), n_full)


def mission_table(mems: pd.DataFrame, hours: float, scrub: float | None, k: int
                  ) -> tuple[pd.DataFrame, dict[str, float]]:
    """Curve over time (hours on a log grid up to the mission) and the end-of-mission figures."""
    reach, fit = float(mems.reaching_fit.sum()), float(mems.fit.sum())
    reach_e, fit_e = float(mems.reaching_fit_with_ecc.sum()), float(mems.fit_with_ecc.sum())
    raw = float(mems.fit_raw.sum())
    grid = np.geomspace(max(hours, 1e-9) / 1e4, hours, 60) if hours > 0 else np.array([0.0])
    rows = [{"hours": float(t),
             "p_at_least_1_upset": rates.poisson_at_least(raw * 1e-9 * t, 1),
             "p_exceed_certified_flips": _exceed(reach, t, scrub, k),
             "p_failure": failure_probability(reach, fit, t, scrub, k),
             "p_failure_with_ecc": failure_probability(reach_e, fit_e, t, scrub, k),
             "p_failure_fit_only": rates.mission_failure_probability(fit, t, scrub)}
            for t in grid]
    summary = {"expected_upsets": raw * 1e-9 * hours,
               "p_exceed_certified": _exceed(reach, hours, scrub, k),
               "p_failure": failure_probability(reach, fit, hours, scrub, k),
               "p_failure_ecc": failure_probability(reach_e, fit_e, hours, scrub, k)}
    return pd.DataFrame(rows), summary


def protection_plan(acc: Accelerator, mapping: ModelMapping, crit: pd.DataFrame,
                    mems: pd.DataFrame, alt: float, ts: float, target: Any,
                    restricted: tuple[pd.DataFrame, Any] | None) -> pd.DataFrame:
    """Greedy selective hardening: protect (SECDED, (72,64)) whole (tensor, bit position) columns
    in unprotected memories, densest in vulnerable bits first, until FIT < the target's (all
    vulnerable columns without a target). Float formats first try range restriction (no bits).

    Each row: the action, what it covers, data and check bits added, FIT after it (protected
    columns contribute their SECDED residual), and whether the target is met. An estimate.
    """
    rows: list[dict[str, Any]] = []
    fit = float(mems.fit.sum())
    max_fit = target.max_fit if target is not None else None
    meets = (lambda f: f < max_fit) if max_fit is not None else (lambda f: None)  # noqa: E731
    rows.append({"step": 0, "action": "none", "tensor": "", "bit": -1, "role": "",
                 "memory": "", "protected_bits": 0, "check_bits": 0, "cumulative_bits": 0,
                 "fit": fit, "meets_target": meets(fit)})
    col = crit
    if restricted is not None:
        r_mems, r_vul = restricted
        fit_r = float(r_mems.fit.sum())
        if fit_r < fit:
            fit = fit_r
            col = crit.assign(vulnerable_bits=[int(r_vul.bits[ti][b]) for ti, t in
                                               enumerate(mapping.tensors)
                                               for b in range(t.fmt.bits)])
            rows.append({"step": 1, "action": "range_restrict", "tensor": "all", "bit": -1,
                         "role": "", "memory": "", "protected_bits": 0, "check_bits": 0,
                         "cumulative_bits": 0, "fit": fit, "meets_target": meets(fit)})
    if max_fit is not None and fit < max_fit:
        return pd.DataFrame(rows)
    cand = col[col.vulnerable_bits > 0].copy()
    cand["density"] = cand.vulnerable_bits / cand.elements
    cand = cand.sort_values(["density", "vulnerable_bits"], ascending=False, kind="stable")
    total = 0
    for _, c in cand.iterrows():
        m = acc.memory(c.memory)
        if m.protection.kind != "none":
            continue
        ser = m.ser_fit_per_mbit * alt
        saved = ser * (1 - m.mbu_fraction) * c.vulnerable_bits / 1e6
        added = rates.secded_residual_fit(ser, c.elements, 64, 8, ts).silent_fit
        fit = max(0.0, fit - saved) + added
        total += int(c.elements)
        rows.append({"step": len(rows), "action": "protect", "tensor": c.tensor,
                     "bit": int(c.bit), "role": c.role, "memory": c.memory,
                     "protected_bits": int(c.elements),
                     "check_bits": int(math.ceil(c.elements / 64) * 8),
                     "cumulative_bits": total, "fit": fit, "meets_target": meets(fit)})
        if max_fit is not None and fit < max_fit:
            break
    return pd.DataFrame(rows)
