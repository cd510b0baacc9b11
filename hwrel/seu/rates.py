"""Soft-error arithmetic: FIT, Poisson upset counts, altitude, SECDED/parity residuals, targets.

Units throughout: FIT = failures (or upsets) per 1e9 device-hours; raw memory rates are FIT per
Mbit (1e6 bits); times are hours; altitudes metres. Theory: ``theory.md`` section 7. All functions
are pure and validate their inputs (negative or non-finite values raise
:class:`~hwrel.errors.HwrelError`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from hwrel.errors import HwrelError

HOURS_PER_YEAR = 8760.0

# Neutron flux relative to sea level (NYC, JESD89A). hardware.md [S]: ~3.5x at 1.5 km, ~300x at
# 10-12 km cruise; IEC 62396-1 [R]: ~460x at 40 kft (12 192 m). Interpolated log-linearly.
ALTITUDE_ANCHORS: tuple[tuple[float, float], ...] = (
    (0.0, 1.0), (1500.0, 3.5), (10000.0, 300.0), (12192.0, 460.0),
)


def _nonneg(value: float, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise HwrelError(f"{name}: expected a number, got {value!r}")
    if not math.isfinite(value) or value < 0:
        raise HwrelError(f"{name}: must be a finite number >= 0, got {value!r}")
    return float(value)


def _positive(value: float, name: str) -> float:
    if _nonneg(value, name) == 0:
        raise HwrelError(f"{name}: must be > 0, got {value!r}")
    return float(value)


def _count(value: int, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise HwrelError(f"{name}: must be an integer >= {minimum}, got {value!r}")
    return value


def _fraction(value: float, name: str) -> float:
    if _nonneg(value, name) > 1:
        raise HwrelError(f"{name}: must be in [0, 1], got {value!r}")
    return float(value)


def fit_to_rate_per_hour(fit: float) -> float:
    """Exact conversion: ``fit`` [per 1e9 h] -> events per hour."""
    return _nonneg(fit, "fit") * 1e-9


def bit_rate_per_hour(fit_per_mbit: float) -> float:
    """Exact conversion: raw SER [FIT/Mbit] -> upsets per bit per hour (``lambda_bit``)."""
    return _nonneg(fit_per_mbit, "fit_per_mbit") * 1e-15


def expected_upsets(fit_per_mbit: float, bits: float, hours: float,
                    altitude_factor: float = 1.0) -> float:
    """Exact Poisson mean number of upsets in ``bits`` bits over ``hours`` hours.

    ``mu = fit_per_mbit * (bits / 1e6) * 1e-9 * hours * altitude_factor`` (dimensionless).
    """
    return (bit_rate_per_hour(fit_per_mbit) * _nonneg(bits, "bits") * _nonneg(hours, "hours")
            * _nonneg(altitude_factor, "altitude_factor"))


def poisson_at_least(mu: float, k: int) -> float:
    """Exact ``P(N >= k)`` for ``N ~ Poisson(mu)``, accurate to float rounding for any ``mu``.

    For ``mu < k`` the tail is summed directly in log space (no ``1 - (1 - tiny)`` cancellation, so
    ``P(N >= 2)`` at ``mu = 1e-12`` is ``5e-25``, not 0); otherwise ``1 - CDF(k-1)``, which is then
    at least about one half.
    """
    mu = _nonneg(mu, "mu")
    k = _count(k, "k", 0)
    if k == 0:
        return 1.0
    if mu == 0:
        return 0.0
    if k == 1:
        return -math.expm1(-mu)
    log_mu = math.log(mu)
    term = lambda i: math.exp(-mu + i * log_mu - math.lgamma(i + 1))  # noqa: E731
    if mu < k:
        total, i = 0.0, k
        while True:
            t = term(i)
            total += t
            # Terms fall by mu / (i + 1) < 1 each step; stop once they no longer change the sum.
            if t <= total * 1e-17 or t == 0.0:
                return min(total, 1.0)
            i += 1
    cdf = math.fsum(term(i) for i in range(k))
    return max(0.0, 1.0 - cdf)


def altitude_factor(altitude_m: float) -> float:
    """Approximate atmospheric neutron flux at ``altitude_m`` relative to sea level (>= 1).

    An approximation, not a physics model: log-linear interpolation through
    :data:`ALTITUDE_ANCHORS` (1.0 at 0 m, 3.5 at 1500 m, 300 at 10 000 m, 460 at 12 192 m; sources
    in hardware.md: JESD89A-based scaling [S] and IEC 62396-1 [R]). It ignores latitude (geomagnetic
    cutoff), solar cycle and shielding. Above 12 192 m the flux keeps rising to the Pfotzer maximum
    and this table has no data, so it raises.
    """
    h = _nonneg(altitude_m, "altitude_m")
    top = ALTITUDE_ANCHORS[-1][0]
    if h > top:
        raise HwrelError(f"altitude_m: {altitude_m!r} is above {top:g} m, where this "
                         "interpolation has no data")
    for (h0, f0), (h1, f1) in zip(ALTITUDE_ANCHORS, ALTITUDE_ANCHORS[1:]):
        if h <= h1:
            return math.exp(math.log(f0) + (h - h0) / (h1 - h0) * (math.log(f1) - math.log(f0)))
    return ALTITUDE_ANCHORS[-1][1]


@dataclass(frozen=True)
class ResidualFit:
    """FIT left after protection: ``silent_fit`` corrupts data unnoticed, ``detected_fit`` is
    flagged but not corrected (a detected unrecoverable error)."""

    silent_fit: float
    detected_fit: float

    @property
    def total_fit(self) -> float:
        return self.silent_fit + self.detected_fit


def _word_mu(fit_per_mbit: float, word_bits: int, scrub_hours: float, mbu_fraction: float,
             interleave: int) -> float:
    # With interleave >= 2 an MBU (assumed no wider than `interleave` cells) lands as single-bit
    # errors in distinct words: it adds at most `interleave` bit errors instead of one event.
    per_bit = bit_rate_per_hour(fit_per_mbit)
    if interleave > 1:
        per_bit *= 1.0 - mbu_fraction + mbu_fraction * interleave
    else:
        per_bit *= 1.0 - mbu_fraction
    return word_bits * per_bit * scrub_hours


def _check_word(fit_per_mbit: float, bits: float, data_bits: int, check_bits: int,
                scrub_hours: float, mbu_fraction: float, interleave: int) -> tuple[float, int]:
    _nonneg(fit_per_mbit, "fit_per_mbit")
    _count(data_bits, "word_data_bits", 1)
    _count(check_bits, "word_check_bits", 1)
    _positive(scrub_hours, "scrub_hours")
    _fraction(mbu_fraction, "mbu_fraction")
    _count(interleave, "interleave", 1)
    return math.ceil(_nonneg(bits, "bits") / data_bits), data_bits + check_bits


def secded_uncorrectable_fit(fit_per_mbit: float, bits: float, word_data_bits: int,
                             word_check_bits: int, scrub_hours: float, mbu_fraction: float = 0.0,
                             interleave: int = 1) -> float:
    """Equivalent FIT of uncorrectable words in a SECDED memory scrubbed every ``scrub_hours``.

    ``bits`` are data bits; ``ceil(bits / word_data_bits)`` words of ``n = data + check`` bits are
    stored. Single-bit upsets accumulate per word and window with ``mu_w = n * lambda_bit * T_s``
    and a word fails when ``N >= 2`` (exact Poisson tail, ``~ mu_w**2 / 2``). Multi-bit upsets
    (fraction ``mbu_fraction`` of events) defeat SECDED outright without interleaving; with
    ``interleave >= 2`` each counts as up to ``interleave`` single-bit errors in different words
    (MBUs wider than ``interleave`` cells are not modelled). Result:
    ``FIT = words * P_window * 1e9 / T_s + [interleave == 1] * mbu_fraction * raw FIT``.
    An estimate under these assumptions; it includes detected (2-bit) and miscorrected words.
    """
    words, n = _check_word(fit_per_mbit, bits, word_data_bits, word_check_bits, scrub_hours,
                           mbu_fraction, interleave)
    mu_w = _word_mu(fit_per_mbit, n, scrub_hours, mbu_fraction, interleave)
    fit = words * poisson_at_least(mu_w, 2) * 1e9 / scrub_hours
    if interleave == 1:
        fit += mbu_fraction * fit_per_mbit * words * n / 1e6
    return fit


def secded_residual_fit(fit_per_mbit: float, bits: float, word_data_bits: int,
                        word_check_bits: int, scrub_hours: float, mbu_fraction: float = 0.0,
                        interleave: int = 1) -> ResidualFit:
    """:func:`secded_uncorrectable_fit` split into detected (exactly 2 errors in a word) and silent
    (3 or more, which SECDED may miscorrect; un-interleaved MBUs counted silent, conservatively)."""
    words, n = _check_word(fit_per_mbit, bits, word_data_bits, word_check_bits, scrub_hours,
                           mbu_fraction, interleave)
    mu_w = _word_mu(fit_per_mbit, n, scrub_hours, mbu_fraction, interleave)
    scale = words * 1e9 / scrub_hours
    p3 = poisson_at_least(mu_w, 3)
    p2 = max(0.0, poisson_at_least(mu_w, 2) - p3)
    mbu = mbu_fraction * fit_per_mbit * words * n / 1e6 if interleave == 1 else 0.0
    return ResidualFit(silent_fit=p3 * scale + mbu, detected_fit=p2 * scale)


def parity_residual_fit(fit_per_mbit: float, bits: float, word_data_bits: int,
                        scrub_hours: float, mbu_fraction: float = 0.0,
                        interleave: int = 1) -> ResidualFit:
    """Parity (one check bit per ``word_data_bits``) detects an odd number of errors in a word and
    corrects nothing. Per word and window: ``P(odd) = (1 - e^{-2 mu_w}) / 2`` -> detected,
    ``P(even >= 2) = e^{-mu_w} (cosh mu_w - 1)`` -> silent. Un-interleaved MBUs are counted silent
    (a 2-bit MBU passes parity; conservative for wider ones). Estimate; FIT per 1e9 h.
    """
    words, n = _check_word(fit_per_mbit, bits, word_data_bits, 1, scrub_hours, mbu_fraction,
                           interleave)
    mu = _word_mu(fit_per_mbit, n, scrub_hours, mbu_fraction, interleave)
    scale = words * 1e9 / scrub_hours
    odd = -math.expm1(-2.0 * mu) / 2.0
    even = math.exp(-mu) * 2.0 * math.sinh(mu / 2.0) ** 2  # cosh(mu) - 1 without cancellation
    mbu = mbu_fraction * fit_per_mbit * words * n / 1e6 if interleave == 1 else 0.0
    return ResidualFit(silent_fit=even * scale + mbu, detected_fit=odd * scale)


def combine_windows(p_window: float, n_windows: float) -> float:
    """Exact ``1 - (1 - p_window) ** n_windows`` for independent windows, stable for tiny p."""
    p = _fraction(p_window, "p_window")
    n = _nonneg(n_windows, "n_windows")
    if p == 1.0:
        return 1.0 if n > 0 else 0.0
    return -math.expm1(n * math.log1p(-p))


def mission_failure_probability(fit: float, hours: float,
                                scrub_hours: float | None = None) -> float:
    """Probability of at least one failure over a mission of ``hours`` at constant rate ``fit``.

    Without scrubbing: ``1 - exp(-fit * 1e-9 * hours)``. With ``scrub_hours``: per window
    ``P_w = 1 - exp(-fit * 1e-9 * T_s)`` and ``P = 1 - (1 - P_w) ** (hours / T_s)`` (a fractional
    last window counted pro rata). For a constant ``fit`` both agree exactly; scrubbing only
    matters through the ``fit`` itself, e.g. from :func:`secded_uncorrectable_fit`.
    """
    rate = fit_to_rate_per_hour(fit)
    t = _nonneg(hours, "hours")
    if scrub_hours is None:
        return poisson_at_least(rate * t, 1)
    ts = _positive(scrub_hours, "scrub_hours")
    return combine_windows(poisson_at_least(rate * ts, 1), t / ts)


def model_fit(raw_fit_per_mbit: float, bits: float, vulnerable_fraction: float) -> float:
    """``FIT = raw_fit_per_mbit * bits / 1e6 * vulnerable_fraction`` (AVF-weighted), exact given
    its inputs; a sound upper bound when ``vulnerable_fraction`` is a certified upper bound."""
    return (_nonneg(raw_fit_per_mbit, "raw_fit_per_mbit") * _nonneg(bits, "bits") / 1e6
            * _fraction(vulnerable_fraction, "vulnerable_fraction"))


@dataclass(frozen=True)
class Target:
    """A reliability target: a design meets it when its FIT is below ``max_fit``."""

    name: str
    max_fit: float
    description: str
    source: str
    confidence: str

    def met_by(self, fit: float) -> bool:
        return _nonneg(fit, "fit") < self.max_fit


TARGETS: dict[str, Target] = {t.name: t for t in (
    Target("asil-b", 100.0, "ISO 26262 ASIL B: PMHF < 100 FIT (1e-7/h)", "hardware.md [S/R]",
           "secondary"),
    Target("asil-c", 100.0, "ISO 26262 ASIL C: PMHF < 100 FIT (1e-7/h)", "hardware.md [S/R]",
           "secondary"),
    Target("asil-d", 10.0, "ISO 26262 ASIL D: PMHF < 10 FIT (1e-8/h)", "hardware.md [S/R]",
           "secondary"),
    Target("sil2", 1000.0, "IEC 61508 SIL 2, continuous mode: PFH 1e-7 to < 1e-6 /h "
           "(100-1000 FIT)", "IEC 61508-1 Table 3, recalled", "assumed"),
    Target("sil3", 100.0, "IEC 61508 SIL 3, continuous mode: PFH 1e-8 to < 1e-7 /h (10-100 FIT)",
           "hardware.md [R]", "assumed"),
    Target("sil4", 10.0, "IEC 61508 SIL 4, continuous mode: PFH 1e-9 to < 1e-8 /h (1-10 FIT)",
           "hardware.md [R]", "assumed"),
    Target("avionics-catastrophic", 1.0, "AC 25.1309 catastrophic: <= 1e-9 per flight hour "
           "(1 FIT)", "hardware.md [R]", "assumed"),
)}


def parse_target(name: str) -> Target:
    """Look up a target by name (case-insensitive)."""
    key = name.strip().lower() if isinstance(name, str) else name
    if key in TARGETS:
        return TARGETS[key]
    hint = " (ISO 26262 sets no PMHF target for ASIL A)" if key == "asil-a" else ""
    raise HwrelError(f"target: unknown {name!r}{hint} (valid: {', '.join(TARGETS)})")
