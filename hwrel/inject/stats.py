"""Statistics for fault-injection campaigns: confidence intervals and sample sizes.

* :func:`wilson_interval` / :func:`clopper_pearson_interval`: two-sided confidence intervals for a
  binomial rate ``k / n`` (e.g. the fraction of injected faults that cause a silent data
  corruption). Clopper-Pearson is exact (conservative: coverage >= the confidence for every true
  rate); Wilson is the usual approximate score interval, tighter and well behaved at ``k = 0``.
* :func:`sample_size`: how many random faults to inject for a margin of error ``e`` at confidence
  ``c`` over a population of ``N`` fault sites (Leveugle et al., "Statistical fault injection:
  quantified error and confidence", DATE 2009, eq. 3 with the finite population correction).
* :func:`margin_of_error`: the same relation solved for ``e`` given ``n``.

Rates and margins are fractions in [0, 1], not percent.
"""
from __future__ import annotations

import math
from statistics import NormalDist

import numpy as np

from hwrel.errors import HwrelError, check


def _confidence(confidence: float) -> float:
    ok = isinstance(confidence, (int, float)) and not isinstance(confidence, bool)
    check(ok and 0.0 < float(confidence) < 1.0,
          f"confidence must be a number strictly between 0 and 1, got {confidence!r}")
    return float(confidence)


def z_value(confidence: float) -> float:
    """Two-sided standard-normal quantile ``t`` for ``confidence`` (1.959964 for 0.95)."""
    c = _confidence(confidence)
    return NormalDist().inv_cdf(0.5 + c / 2.0)


def _counts(k: int | np.ndarray, n: int | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    ka, na = np.asarray(k), np.asarray(n)
    for name, a in (("successes k", ka), ("trials n", na)):
        check(a.dtype.kind in "iu" or (a.dtype.kind == "f" and bool(np.all(a == np.round(a)))),
              f"{name} must be integers, got {a.tolist()!r}")
    ka, na = ka.astype(np.float64), na.astype(np.float64)
    check(bool(np.all(na >= 0)) and bool(np.all((ka >= 0) & (ka <= na))),
          f"need 0 <= k <= n, got k={ka.tolist()!r}, n={na.tolist()!r}")
    return ka, na


def _out(a: np.ndarray, k: object, n: object) -> np.ndarray | float:
    """A float for scalar ``k`` and ``n``, else the array."""
    return float(a) if np.ndim(k) == 0 and np.ndim(n) == 0 else np.asarray(a, dtype=np.float64)


def wilson_interval(k: int | np.ndarray, n: int | np.ndarray, confidence: float = 0.95
                    ) -> tuple[np.ndarray | float, np.ndarray | float]:
    """Wilson score interval ``(lo, hi)`` for the rate ``k / n`` (arrays broadcast; floats for scalars).

    ``center = (p + t^2/2n) / (1 + t^2/n)``, ``half = t / (1 + t^2/n) * sqrt(p(1-p)/n + t^2/4n^2)``
    with ``p = k/n``. Approximate (coverage near, not guaranteed at, ``confidence``). ``n = 0``
    gives the uninformative ``(0, 1)``. Results are clipped to [0, 1].
    """
    t = z_value(confidence)
    ka, na = _counts(k, n)
    with np.errstate(divide="ignore", invalid="ignore"):
        p = ka / na
        denom = 1.0 + t * t / na
        center = (p + t * t / (2 * na)) / denom
        half = t / denom * np.sqrt(p * (1 - p) / na + t * t / (4 * na * na))
        lo, hi = np.clip(center - half, 0.0, 1.0), np.clip(center + half, 0.0, 1.0)
    # Exact endpoints where the formula is exact (k = 0 gives lo = 0, k = n gives hi = 1).
    lo = np.where(ka == 0, 0.0, lo)
    hi = np.where(ka == na, 1.0, hi)
    lo, hi = np.where(na == 0, 0.0, lo), np.where(na == 0, 1.0, hi)
    return _out(lo, k, n), _out(hi, k, n)


def clopper_pearson_interval(k: int | np.ndarray, n: int | np.ndarray, confidence: float = 0.95
                             ) -> tuple[np.ndarray | float, np.ndarray | float]:
    """Exact (Clopper-Pearson) interval ``(lo, hi)`` for ``k / n``: beta quantiles
    ``B(a/2; k, n-k+1)`` and ``B(1-a/2; k+1, n-k)`` with ``a = 1 - confidence``. Conservative:
    covers the true rate with probability >= ``confidence``. ``n = 0`` gives ``(0, 1)``."""
    a = 1.0 - _confidence(confidence)
    ka, na = _counts(k, n)
    with np.errstate(divide="ignore", invalid="ignore"):
        from scipy.stats import beta  # on first use: scipy.stats takes most of a second to import

        lo = np.where(ka == 0, 0.0, beta.ppf(a / 2, np.maximum(ka, 1), na - ka + 1))
        hi = np.where(ka == na, 1.0, beta.ppf(1 - a / 2, ka + 1, np.maximum(na - ka, 1)))
    return _out(np.nan_to_num(lo, nan=0.0), k, n), _out(np.nan_to_num(hi, nan=1.0), k, n)


def _population(population: int | float | None) -> float:
    if population is None:
        return math.inf
    ok = isinstance(population, (int, float, np.integer)) and not isinstance(population, bool)
    check(ok and population >= 1 and (math.isinf(population) or float(population).is_integer()),
          f"population N must be an integer >= 1 (or None for infinite), got {population!r}")
    return float(population)


def _rate(p: float) -> float:
    ok = isinstance(p, (int, float)) and not isinstance(p, bool)
    check(ok and 0.0 < float(p) < 1.0, f"expected rate p must lie strictly between 0 and 1, got {p!r}")
    return float(p)


def sample_size(margin: float, confidence: float = 0.95, population: int | None = None,
                p: float = 0.5) -> int:
    """Random faults to inject so the rate estimate has margin of error ``margin`` at ``confidence``.

    Leveugle et al. (DATE 2009): ``n = N / (1 + e^2 (N-1) / (t^2 p (1-p)))`` over a population of
    ``N`` fault sites (``n = t^2 p (1-p) / e^2`` for ``N = None``, i.e. infinite), rounded up and
    never above ``N``. ``p = 0.5`` (the default) is the worst case, valid whatever the true rate.
    """
    ok = isinstance(margin, (int, float)) and not isinstance(margin, bool)
    check(ok and 0.0 < float(margin) < 1.0, f"margin of error must lie strictly between 0 and 1, "
          f"got {margin!r}")
    t, pp, big_n = z_value(confidence), _rate(p), _population(population)
    base = t * t * pp * (1 - pp)
    if math.isinf(big_n):
        n = base / (margin * margin)
    else:
        n = big_n / (1.0 + margin * margin * (big_n - 1.0) / base)
    # Round away float noise first, so that e.g. 16.000000000000004 does not become 17.
    out = math.ceil(round(n, 9))
    return int(min(out, big_n)) if not math.isinf(big_n) else int(out)


def margin_of_error(n: int, confidence: float = 0.95, population: int | None = None,
                    p: float = 0.5) -> float:
    """Margin of error ``e`` achieved by ``n`` random faults (Leveugle's relation solved for ``e``):
    ``e = t sqrt(p(1-p)/n * (N-n)/(N-1))``; 0 when ``n = N`` (every site injected)."""
    ok = isinstance(n, (int, np.integer)) and not isinstance(n, bool)
    check(ok and n >= 1, f"sample size n must be an integer >= 1, got {n!r}")
    t, pp, big_n = z_value(confidence), _rate(p), _population(population)
    if math.isinf(big_n):
        return t * math.sqrt(pp * (1 - pp) / n)
    if n > big_n:
        raise HwrelError(f"sample size n={n} exceeds the population N={int(big_n)}")
    if big_n == 1:
        return 0.0
    return t * math.sqrt(pp * (1 - pp) / n * (big_n - n) / (big_n - 1))
