"""ISO 26262-5 hardware metrics of the model's parameter memories: SPFM, LFM, PMHF contribution.

Estimates, under stated assumptions, from the SEU analysis (:class:`hwrel.seu.analysis.SEUResult`):

- hardware element: the bits of the model's stored parameters (weights and biases) in the
  accelerator's memories; activations, accumulators, datapath and control are not covered;
- safety goal: the model's accuracy budget holds (a violation is a failure);
- ``lambda`` (total): every upset of those bits, the raw FIT (``fit_raw``);
- single-point / residual faults (``lambda_SPF + lambda_RF``): upsets that alone can break the
  budget and that no safety mechanism corrects: the certified vulnerable FIT (``fit``, an upper
  bound given the rates: bits not certified safe count as vulnerable);
- latent multi-point faults (``lambda_MPF,latent``): the other upsets, unless a safety mechanism
  detects them (SECDED or parity on the memory; reloading the weights removes faults but detects
  none, so it does not count as detection); they stay until reload and can combine with later ones;
- PMHF contribution: the mission failure probability over the mission time (which counts two or
  more upsets beyond the certified tolerance as well as single vulnerable ones), in FIT.

``SPFM = 1 - (lambda_SPF + lambda_RF) / lambda``; ``LFM = 1 - lambda_MPF,latent / (lambda -
lambda_SPF - lambda_RF)``. The ASIL limits (ISO 26262-5:2018 Tables 4-6, target values) are for
the whole item; giving all of them to the model's memories is itself an assumption.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import pandas as pd

# ASIL -> (SPFM >=, LFM >=, PMHF < FIT), with status and source per figure.
LIMITS: dict[str, dict[str, tuple[float, str, str]]] = {
    "asil-b": {"spfm": (0.90, "published", "ISO 26262-5:2018 Table 4, via hardware.md [S/R]"),
               "lfm": (0.60, "assumed", "ISO 26262-5:2018 Table 5, recalled (not in hwrel's references)"),
               "pmhf": (100.0, "published", "ISO 26262-5:2018 Table 6, via hardware.md [S/R]")},
    "asil-c": {"spfm": (0.97, "published", "ISO 26262-5:2018 Table 4, via hardware.md [S/R]"),
               "lfm": (0.80, "assumed", "ISO 26262-5:2018 Table 5, recalled (not in hwrel's references)"),
               "pmhf": (100.0, "published", "ISO 26262-5:2018 Table 6, via hardware.md [S/R]")},
    "asil-d": {"spfm": (0.99, "published", "ISO 26262-5:2018 Table 4, via hardware.md [S/R]"),
               "lfm": (0.90, "published", "ISO 26262-5:2018 Table 5, via hardware.md [S/R]"),
               "pmhf": (10.0, "published", "ISO 26262-5:2018 Table 6, via hardware.md [S/R]")},
}
ASSUMPTIONS = (
    "hardware element: the stored parameter bits only (activations, accumulators, datapath, control not covered)",
    "safety goal: the accuracy budget holds; a single-point fault is an upset that alone can break it "
    "(certified vulnerable bits: an upper bound)",
    "the memory's own SECDED/parity is the only safety mechanism; reloading weights detects nothing",
    "the whole ASIL budget is allocated to these memories (in a real item they get a share of it)",
    "rates, mission time and altitude as stated above (see the rates' provenance)",
)


@dataclass(frozen=True, eq=False)
class IsoMetrics:
    """``table``: one row per metric and configuration (as built / with SECDED ECC), value, the
    limit of the target ASIL (or of ASIL B/C/D), met or not, the limit's status and source."""

    target: str | None
    spfm: float
    lfm: float
    pmhf_fit: float
    spfm_ecc: float
    lfm_ecc: float
    pmhf_fit_ecc: float
    table: pd.DataFrame

    def met(self, ecc: bool = False) -> bool | None:
        t = self.table[(self.table.configuration == ("with SECDED ECC" if ecc else "as built"))
                       & (self.table.asil == (self.target or ""))]
        return None if not len(t) else bool(t.met.all())


def _ratio(num: float, den: float) -> float:
    return 1.0 - num / den if den > 0 else math.nan


def iso_metrics(seu: Any) -> IsoMetrics:
    """SPFM, LFM and PMHF contribution of ``seu`` (an SEUResult) as built and with SECDED ECC."""
    mems = seu.memories
    raw = float(mems.fit_raw.sum())
    spf = float(mems.fit.sum())
    spf_e = float(mems.fit_with_ecc.sum())
    latent = 0.0
    for r in mems.itertuples():
        if str(r.protection) == "none":  # nothing detects an upset: every non-vulnerable one stays latent
            latent += max(0.0, float(r.fit_raw) - float(r.fit))
    hours = seu.mission_hours
    pmhf = seu.mission_failure_probability / hours * 1e9 if hours > 0 else math.nan
    pmhf_e = seu.mission_failure_probability_with_ecc / hours * 1e9 if hours > 0 else math.nan
    spfm, spfm_e = _ratio(spf, raw), _ratio(spf_e, raw)
    lfm = _ratio(latent, raw - spf)
    lfm_e = _ratio(0.0, raw - spf_e)  # SECDED corrects (and so detects) every single upset
    values = {"as built": {"spfm": spfm, "lfm": lfm, "pmhf": pmhf},
              "with SECDED ECC": {"spfm": spfm_e, "lfm": lfm_e, "pmhf": pmhf_e}}
    target = seu.target if seu.target in LIMITS else None
    asils = [target] if target else list(LIMITS)
    rows = []
    for conf, vals in values.items():
        for asil in asils:
            for metric, (limit, st, src) in LIMITS[asil].items():
                v = vals[metric]
                met = (v < limit) if metric == "pmhf" else (v >= limit)
                rows.append({"configuration": conf, "asil": asil, "metric": metric.upper(),
                             "value": v, "unit": "FIT" if metric == "pmhf" else "fraction",
                             "limit": f"< {limit:g} FIT" if metric == "pmhf" else f">= {limit:.0%}",
                             "met": bool(met) if not math.isnan(v) else False, "limit_status": st,
                             "limit_source": src})
    return IsoMetrics(target, spfm, lfm, pmhf, spfm_e, lfm_e, pmhf_e, pd.DataFrame(rows))
