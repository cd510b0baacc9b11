"""The report's evidence: rates with their sources, the 10x sensitivity, ISO 26262-5 figures and
hardening options, on a test accelerator whose buffer rate is assumed (tests/accelerators/)."""
from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import pytest

from hwrel.report.iso26262 import LIMITS, iso_metrics
from hwrel.report.provenance import rate_provenance, rerun, sensitivity
from hwrel.seu import rates
from hwrel.seu.accelerator import load_accelerator
from hwrel.seu.analysis import seu_analysis
from hwrel.seu.hardening import hardening_options

TOML = Path(__file__).resolve().parent / "accelerators" / "assumed-rates.toml"


@pytest.fixture(scope="module")
def acc():
    return load_accelerator(str(TOML))


@pytest.fixture(scope="module")
def seu(acc):
    return seu_analysis("digits-mlp", acc, mission_hours=87600, target="asil-b", max_accuracy_drop=0.01,
                        campaign_size=20, max_samples=96, seed=0)


def _published(acc):
    """The same accelerator with every rate published instead of assumed."""
    mems = tuple(replace(m, confidence=tuple((k, "verified") for k, _ in m.confidence)) for m in acc.memories)
    return replace(acc, memories=mems)


def test_rerun_reproduces_and_scales_the_fit(acc, seu):
    same = rerun(acc, seu, {})
    assert same["fit"] == pytest.approx(seu.fit, rel=1e-12) and same["p_failure"] == pytest.approx(
        seu.mission_failure_probability, rel=1e-12)
    assert same["fit_with_ecc"] == pytest.approx(seu.fit_with_ecc, rel=1e-12)
    up = rerun(acc, seu, {"buffer": 10.0})  # unprotected memory: FIT is linear in the raw rate
    assert up["fit"] == pytest.approx(10 * seu.fit, rel=1e-12)
    assert up["p_failure"] > same["p_failure"]


def test_sensitivity_changes_the_verdict_when_an_assumed_rate_is_10x_off(acc, seu):
    assert seu.meets_target and 10 * seu.fit >= seu.target_max_fit  # the test accelerator's premise
    s = sensitivity(acc, seu)
    assert s.assumed == ("buffer",) and s.changes
    t = s.table.set_index("scenario")
    assert t.loc["as stated", "verdict"] == "MEETS" and t.loc["assumed rates x10", "verdict"] == "DOES NOT MEET"
    assert t.loc["assumed rates /10", "verdict"] == "MEETS"
    assert "assumed" in s.line and "buffer" in s.line and "CHANGES" in s.line and "DOES NOT MEET" in s.line
    # the same analysis with the rate published: nothing assumed, no change claimed for assumed rates
    p = sensitivity(_published(acc), seu)
    assert p.assumed == () and not p.changes and "No rate is assumed" in p.line
    assert "assumed rates x10" not in set(p.table.scenario)


def test_every_rate_carries_its_source_and_status(acc, seu):
    prov = rate_provenance(acc, seu.memories, rates.parse_target("asil-b"))
    assert len(prov) >= 3
    assert prov.source.str.len().gt(0).all() and prov.status.isin(["measured", "published", "assumed"]).all()
    ser = prov[prov.quantity.str.startswith("raw SER")].set_index("quantity")
    assert set(ser.index) == {f"raw SER of {m}" for m in seu.memories.memory}
    assert ser.loc["raw SER of buffer", "status"] == "assumed" and ser.loc["raw SER of buffer", "value"] == 5000.0
    assert ser.loc["raw SER of buffer", "source"] == acc.memory("buffer").ser_source
    target = prov[prov.quantity == "asil-b limit"].iloc[0]
    assert target.value == 100.0 and "ISO 26262" in target.source


def test_iso_metrics_follow_their_definitions(seu):
    iso = iso_metrics(seu)
    raw, fit = float(seu.memories.fit_raw.sum()), float(seu.memories.fit.sum())
    assert iso.spfm == pytest.approx(1 - fit / raw) and 0 < iso.spfm < 1
    assert iso.lfm == 0.0  # no safety mechanism detects an upset in an unprotected buffer
    assert iso.lfm_ecc == 1.0 and iso.spfm_ecc == pytest.approx(1 - seu.fit_with_ecc / raw)
    assert iso.pmhf_fit == pytest.approx(seu.mission_failure_probability / seu.mission_hours * 1e9)
    t = iso.table[(iso.table.configuration == "as built")].set_index("metric")
    assert list(t.asil.unique()) == ["asil-b"]
    assert t.loc["SPFM", "met"] == (iso.spfm >= 0.90) and not t.loc["LFM", "met"]
    assert t.loc["LFM", "limit_status"] == "assumed" and LIMITS["asil-b"]["lfm"][1] == "assumed"
    assert iso.met() is False and iso.met(ecc=True) is (iso.pmhf_fit_ecc < 100 and iso.spfm_ecc >= 0.9)


def test_hardening_options_ranked_by_gain_per_bit(acc, seu):
    opt = hardening_options(acc, seu)
    assert list(opt["rank"]) == list(range(1, len(opt) + 1))
    assert (opt.gain_per_bit.diff().dropna() <= 1e-18).all()  # best first
    ecc = opt[opt.option == "SECDED ECC on buffer"].iloc[0]
    assert ecc.gain_fit == pytest.approx(seu.fit - seu.fit_with_ecc)
    assert ecc.overhead_bits == math.ceil(seu.total_bits / 64) * 8
    # the sign-bit option, recomputed from the certified vulnerable bits of the sign columns
    crit = seu.critical_bits
    sign = crit[(crit.part == "weight") & (crit.role == "sign")]
    m = acc.memory("buffer")
    ts = seu.mission_hours
    expect = sum(m.ser_fit_per_mbit * c.vulnerable_bits / 1e6
                 - rates.secded_residual_fit(m.ser_fit_per_mbit, c.elements, 64, 8, ts).silent_fit
                 for c in sign.itertuples())
    row = opt[opt.option == "SECDED on the sign bit of every weight"].iloc[0]
    assert row.gain_fit == pytest.approx(max(0.0, expect), rel=1e-9)
    assert row.overhead_bits == sum(math.ceil(c.elements / 64) * 8 for c in sign.itertuples())
    bias = opt[opt.option == "SECDED on every bias bit"].iloc[0]
    assert bias.certified_flips_after == seu.certified_flips_weights_only
