"""Confidence intervals and sample sizes against hand-computed values."""
from __future__ import annotations

import math

import numpy as np
import pytest

from hwrel.errors import HwrelError
from hwrel.inject.stats import (clopper_pearson_interval, margin_of_error, sample_size,
                                wilson_interval, z_value)


def test_z_values() -> None:
    assert z_value(0.95) == pytest.approx(1.959964, abs=1e-6)
    assert z_value(0.99) == pytest.approx(2.575829, abs=1e-6)


def test_wilson_hand_computed() -> None:
    # k=5, n=10, z=1.959964: center 0.5, half = z/(1+z^2/n) * sqrt(0.25/10 + z^2/400) = 0.263407
    lo, hi = wilson_interval(5, 10)
    assert (lo, hi) == (pytest.approx(0.236593, abs=1e-6), pytest.approx(0.763407, abs=1e-6))
    # k=0: lo = 0 exactly, hi = z^2/n / (1 + z^2/n) = 0.384146 / 1.384146 = 0.277533
    lo, hi = wilson_interval(0, 10)
    assert lo == 0.0 and hi == pytest.approx(0.277533, abs=1e-6)
    # k=n mirrors k=0.
    lo, hi = wilson_interval(10, 10)
    assert hi == 1.0 and lo == pytest.approx(1 - 0.277533, abs=1e-6)
    # k=1, n=20 at 95%: p=0.05, center (0.05 + 0.096037)/1.192073 = 0.122506,
    # half = 1.959964/1.192073 * sqrt(0.002375 + 0.002401) = 1.644165 * 0.069109 = 0.113626
    lo, hi = wilson_interval(1, 20)
    assert lo == pytest.approx(0.008880, abs=2e-6) and hi == pytest.approx(0.236131, abs=2e-6)


def test_wilson_arrays_and_empty() -> None:
    lo, hi = wilson_interval(np.array([0, 5, 0]), np.array([10, 10, 0]))
    assert lo.shape == (3,) and lo[2] == 0.0 and hi[2] == 1.0
    assert lo[1] == pytest.approx(0.236593, abs=1e-6)


def test_clopper_pearson_hand_computed() -> None:
    # k=0: hi = 1 - (alpha/2)^(1/n) = 1 - 0.025^(1/10) = 0.308497
    lo, hi = clopper_pearson_interval(0, 10)
    assert lo == 0.0 and hi == pytest.approx(1 - 0.025 ** 0.1, abs=1e-9)
    # k=n: lo = (alpha/2)^(1/n)
    lo, hi = clopper_pearson_interval(10, 10)
    assert hi == 1.0 and lo == pytest.approx(0.025 ** 0.1, abs=1e-9)
    # k=1, n=2: lo solves 1-(1-p)^2 = 0.025 -> 1 - sqrt(0.975); hi = sqrt(0.975) by symmetry.
    lo, hi = clopper_pearson_interval(1, 2)
    assert lo == pytest.approx(1 - math.sqrt(0.975), abs=1e-9)
    assert hi == pytest.approx(math.sqrt(0.975), abs=1e-9)
    # Exact interval contains the Wilson one's center and is wider at the boundary.
    assert clopper_pearson_interval(0, 10)[1] > wilson_interval(0, 10)[1]


def test_sample_size_leveugle() -> None:
    # N=1000, e=5%, 95%: t^2 p(1-p) = 0.960365; n = 1000 / (1 + 0.0025*999/0.960365) = 277.74 -> 278
    assert sample_size(0.05, 0.95, population=1000) == 278
    # Infinite population: t^2 / (4 e^2) = 3.841459 / 0.01 = 384.15 -> 385
    assert sample_size(0.05, 0.95) == 385
    # Leveugle et al. Table: e=1%, 99%, huge N: 2.575829^2 * 0.25 / 1e-4 = 16587.4 -> 16588
    assert sample_size(0.01, 0.99, population=10**12) == 16588
    # Small populations: never more than N; N=1 -> 1.
    assert sample_size(0.01, 0.99, population=50) <= 50
    assert sample_size(0.05, population=1) == 1
    # p away from 0.5 needs fewer: p=0.1 -> 3.841459*0.09/0.0025 = 138.29 -> 139
    assert sample_size(0.05, 0.95, p=0.1) == 139


def test_margin_of_error_inverts_sample_size() -> None:
    for big_n in (1000, 10**6):
        n = sample_size(0.02, 0.95, population=big_n)
        assert margin_of_error(n, 0.95, population=big_n) <= 0.02
        assert margin_of_error(n - 1, 0.95, population=big_n) > 0.02 - 1e-12
    assert margin_of_error(1000, 0.95, population=1000) == 0.0
    assert margin_of_error(100) == pytest.approx(1.959964 * 0.05, abs=1e-6)


@pytest.mark.parametrize("call", [
    lambda: wilson_interval(3, 2), lambda: wilson_interval(-1, 2), lambda: wilson_interval(1, 2, 1.0),
    lambda: clopper_pearson_interval(1.5, 2), lambda: sample_size(0.0), lambda: sample_size(0.05, 1.2),
    lambda: sample_size(0.05, population=0), lambda: sample_size(0.05, p=1.0),
    lambda: margin_of_error(0), lambda: margin_of_error(11, population=10),
])
def test_bad_input_raises(call) -> None:  # noqa: ANN001
    with pytest.raises(HwrelError):
        call()
