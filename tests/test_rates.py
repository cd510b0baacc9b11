"""Soft-error arithmetic against hand computations and independent reference sums."""
from __future__ import annotations

import math
from decimal import Decimal, getcontext

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hwrel.errors import HwrelError
from hwrel.seu import rates


def poisson_tail_reference(mu: float, k: int) -> float:
    """P(N >= k) by a direct 60-digit sum of sum_{i<k} (for mu >= k) or of the tail (mu < k)."""
    getcontext().prec = 60
    m = Decimal(mu)
    e = (-m).exp()
    term = e  # i = 0
    terms = [term]
    for i in range(1, k + 400):
        term = term * m / i
        terms.append(term)
    return float(sum(terms[k:]))


def test_fit_conversions_are_exact() -> None:
    assert rates.fit_to_rate_per_hour(1e9) == pytest.approx(1.0, rel=1e-15)
    assert rates.bit_rate_per_hour(1000.0) == pytest.approx(1e-12, rel=1e-15)


def test_hand_computed_year_of_204_8_mbit() -> None:
    # 1000 FIT/Mbit x 204.8 Mbit = 204 800 FIT; x 8760 h x 1e-9 = 1.794 upsets per year.
    mu = rates.expected_upsets(1000.0, 204.8e6, rates.HOURS_PER_YEAR)
    assert mu == pytest.approx(1.794048, rel=1e-12)
    assert round(mu, 2) == 1.79
    p = rates.poisson_at_least(mu, 1)
    assert p == pytest.approx(1 - math.exp(-1.794048), rel=1e-12)
    assert round(p, 2) == 0.83
    # The altitude factor multiplies the mean.
    assert rates.expected_upsets(1000.0, 204.8e6, 8760.0, altitude_factor=3.5) == \
        pytest.approx(3.5 * mu, rel=1e-12)


@pytest.mark.parametrize("mu", [1e-12, 1e-6, 0.01, 0.5, 1.794048, 5.0, 20.0, 80.0])
@pytest.mark.parametrize("k", [0, 1, 2, 3, 5, 10, 40])
def test_poisson_at_least_matches_direct_sum(mu: float, k: int) -> None:
    ref = poisson_tail_reference(mu, k)
    got = rates.poisson_at_least(mu, k)
    if ref < 1e-300:
        assert got == pytest.approx(ref, abs=1e-300)
    else:
        assert got == pytest.approx(ref, rel=1e-12, abs=1e-15 if ref > 1e-3 else 0.0)


def test_poisson_small_mu_keeps_relative_precision() -> None:
    # 1 - (1 - tiny) would give 0 here; the tail is mu^2/2 (1 - 2mu/3 ...).
    assert rates.poisson_at_least(1e-12, 2) == pytest.approx(5e-25, rel=1e-9)
    assert rates.poisson_at_least(1e-20, 1) == pytest.approx(1e-20, rel=1e-12)
    assert rates.poisson_at_least(0.0, 1) == 0.0
    assert rates.poisson_at_least(0.0, 0) == 1.0


@settings(max_examples=200, deadline=None)
@given(st.floats(1e-15, 200.0), st.integers(0, 60))
def test_poisson_tail_is_a_probability_monotone_in_k_and_mu(mu: float, k: int) -> None:
    """0 <= P(N >= k) <= 1, non-increasing in k, non-decreasing in mu."""
    p = rates.poisson_at_least(mu, k)
    assert 0.0 <= p <= 1.0
    assert rates.poisson_at_least(mu, k + 1) <= p * (1 + 1e-12)
    assert rates.poisson_at_least(mu * 1.1, k) >= p * (1 - 1e-12)


def test_altitude_factor_at_anchor_points() -> None:
    assert rates.altitude_factor(0.0) == pytest.approx(1.0)
    assert rates.altitude_factor(1500.0) == pytest.approx(3.5, rel=1e-12)
    assert rates.altitude_factor(10000.0) == pytest.approx(300.0, rel=1e-12)
    for h in (10000.0, 11000.0, 12000.0):  # "about 300x at 10-12 km", IEC ~460x at 12.2 km
        assert 300.0 * (1 - 1e-12) <= rates.altitude_factor(h) <= 460.0


def test_altitude_factor_monotone_and_log_linear_between_anchors() -> None:
    grid = [i * 50.0 for i in range(int(12192 / 50) + 1)] + [12192.0]
    values = [rates.altitude_factor(h) for h in grid]
    assert all(b > a for a, b in zip(values, values[1:]))
    # Geometric mean of the anchor values at the midpoint of a segment.
    assert rates.altitude_factor(750.0) == pytest.approx(math.sqrt(3.5), rel=1e-12)


@pytest.mark.parametrize("h", [-1.0, 12193.0, math.nan, math.inf])
def test_altitude_factor_rejects_out_of_range(h: float) -> None:
    with pytest.raises(HwrelError, match="altitude_m"):
        rates.altitude_factor(h)


def test_secded_72_64_against_the_formula() -> None:
    fit, data_bits, ts = 1000.0, 64e6, 24.0          # 1e6 words of 72 bits, daily scrub
    lam = 1000.0 * 1e-15
    mu_w = 72 * lam * ts
    p2 = mu_w ** 2 / 2 * (1 - 2 * mu_w / 3)             # Poisson P(N >= 2), series to O(mu^4)
    expected = 1e6 * p2 * 1e9 / ts
    got = rates.secded_uncorrectable_fit(fit, data_bits, 64, 8, ts)
    assert got == pytest.approx(expected, rel=1e-9)
    # ~ mu_w^2 / 2 per word and window: orders of magnitude below the raw 72 000 FIT.
    assert got < 1e-3 * rates.model_fit(fit, 72e6, 1.0)


def test_secded_mbu_defeats_ecc_unless_interleaved() -> None:
    base = rates.secded_uncorrectable_fit(1000.0, 64e6, 64, 8, 24.0)
    plain = rates.secded_uncorrectable_fit(1000.0, 64e6, 64, 8, 24.0, mbu_fraction=0.05)
    # Every MBU event is uncorrectable: 5 % of the raw FIT of 72 Mbit stored = 3600 FIT.
    assert plain == pytest.approx(3600.0 + base * 0.95 ** 2, rel=1e-9)
    inter = rates.secded_uncorrectable_fit(1000.0, 64e6, 64, 8, 24.0, mbu_fraction=0.05,
                                           interleave=4)
    assert inter == pytest.approx(base * (0.95 + 0.05 * 4) ** 2, rel=1e-9)
    assert inter < 1e-3 * plain


def test_secded_grows_with_scrub_interval_and_splits_into_detected_and_silent() -> None:
    a = rates.secded_uncorrectable_fit(1000.0, 64e6, 64, 8, 1.0)
    b = rates.secded_uncorrectable_fit(1000.0, 64e6, 64, 8, 100.0)
    assert b == pytest.approx(100 * a, rel=1e-6)      # linear in T_s for small mu_w
    r = rates.secded_residual_fit(1000.0, 64e6, 64, 8, 100.0, mbu_fraction=0.01)
    total = rates.secded_uncorrectable_fit(1000.0, 64e6, 64, 8, 100.0, mbu_fraction=0.01)
    assert r.total_fit == pytest.approx(total, rel=1e-9)
    assert r.silent_fit >= 0.01 * 1000.0 * 72.0


def test_parity_detects_singles_and_misses_pairs() -> None:
    fit, ts = 1000.0, 24.0
    r = rates.parity_residual_fit(fit, 32e6, 32, ts)   # 1e6 words of 33 bits
    mu = 33 * 1e-12 * ts
    assert r.detected_fit == pytest.approx(1e6 * -math.expm1(-2 * mu) / 2 * 1e9 / ts, rel=1e-9)
    assert r.detected_fit == pytest.approx(fit * 33.0, rel=1e-6)   # every single flip detected
    assert r.silent_fit == pytest.approx(1e6 * mu ** 2 / 2 * 1e9 / ts, rel=1e-6)
    r_mbu = rates.parity_residual_fit(fit, 32e6, 32, ts, mbu_fraction=0.1)
    assert r_mbu.silent_fit >= 0.1 * fit * 33.0


def test_mission_failure_probability() -> None:
    assert rates.mission_failure_probability(100.0, 1e4) == pytest.approx(-math.expm1(-1e-3))
    # For a constant rate, splitting into scrub windows changes nothing.
    assert rates.mission_failure_probability(100.0, 1e4, scrub_hours=24.0) == \
        pytest.approx(-math.expm1(-1e-3), rel=1e-12)
    assert rates.combine_windows(0.1, 3) == pytest.approx(1 - 0.9 ** 3, rel=1e-14)
    assert rates.combine_windows(1e-20, 1000) == pytest.approx(1e-17, rel=1e-9)
    assert rates.combine_windows(1.0, 2) == 1.0


def test_model_fit() -> None:
    assert rates.model_fit(1000.0, 8e6, 0.25) == pytest.approx(2000.0)
    with pytest.raises(HwrelError, match="vulnerable_fraction"):
        rates.model_fit(1000.0, 8e6, 1.5)


def test_targets() -> None:
    assert rates.parse_target("ASIL-D").max_fit == 10.0
    assert rates.parse_target("asil-b").max_fit == rates.parse_target("asil-c").max_fit == 100.0
    assert rates.parse_target("sil2").max_fit == pytest.approx(1e-6 / 1e-9)
    assert rates.parse_target("sil4").max_fit == pytest.approx(10.0)
    assert rates.parse_target("avionics-catastrophic").max_fit == pytest.approx(1.0)
    assert rates.parse_target("asil-d").met_by(9.99) and not rates.parse_target("asil-d").met_by(10)
    with pytest.raises(HwrelError, match="ASIL A.*asil-b"):
        rates.parse_target("asil-a")
    with pytest.raises(HwrelError, match="unknown 'sil9'.*valid: asil-b, asil-c, asil-d"):
        rates.parse_target("sil9")


@pytest.mark.parametrize("call, field", [
    (lambda: rates.expected_upsets(1000.0, 1e6, -1.0), "hours"),
    (lambda: rates.expected_upsets(1000.0, -1.0, 1.0), "bits"),
    (lambda: rates.expected_upsets(-5.0, 1e6, 1.0), "fit_per_mbit"),
    (lambda: rates.expected_upsets(math.nan, 1e6, 1.0), "fit_per_mbit"),
    (lambda: rates.fit_to_rate_per_hour(-1.0), "fit"),
    (lambda: rates.poisson_at_least(-0.1, 1), "mu"),
    (lambda: rates.poisson_at_least(1.0, -1), "k"),
    (lambda: rates.secded_uncorrectable_fit(1000.0, 64e6, 64, 8, 0.0), "scrub_hours"),
    (lambda: rates.secded_uncorrectable_fit(1000.0, 64e6, 0, 8, 1.0), "word_data_bits"),
    (lambda: rates.secded_uncorrectable_fit(1000.0, 64e6, 64, 8, 1.0, mbu_fraction=2), "mbu"),
    (lambda: rates.secded_uncorrectable_fit(1000.0, 64e6, 64, 8, 1.0, interleave=0), "interleave"),
    (lambda: rates.mission_failure_probability(10.0, -1.0), "hours"),
    (lambda: rates.mission_failure_probability(10.0, 1.0, scrub_hours=-2.0), "scrub_hours"),
])
def test_bad_inputs_raise_naming_the_field(call, field: str) -> None:
    with pytest.raises(HwrelError, match=field):
        call()
