"""Tests for hwrel.formats: flips against independent arithmetic/struct references, sound bounds."""
from __future__ import annotations

import math
import struct

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hwrel.errors import HwrelError
from hwrel.formats import (BF16, FP8_E4M3, FP8_E5M2, FP16, FP32, FloatFormat, IntFormat,
                           IntStorage, _binade_candidates, flip, flip_delta, flip_mask, from_bits,
                           max_flip_delta, parse_format, positions_to_mask, range_restrict,
                           stuck_at, to_bits)

FLOATS = [FP32, FP16, BF16, FP8_E4M3, FP8_E5M2]
INTS = [IntFormat(b, s) for b in range(2, 17) for s in (True, False)]
ALL = INTS + FLOATS


# --- independent references ---------------------------------------------------------------------

def f32_bits(x: float) -> int:
    return struct.unpack("<I", struct.pack("<f", x))[0]


def f32_val(p: int) -> float:
    return struct.unpack("<f", struct.pack("<I", p))[0]


def f16_val(p: int) -> float:
    return struct.unpack("<e", struct.pack("<H", p))[0]


def bf16_val(p: int) -> float:
    return f32_val(p << 16)  # bf16 is the top half of an fp32 pattern


def fp8_val(p: int, exp_bits: int, man_bits: int, ieee_specials: bool) -> float:
    """Decode an fp8 pattern from the format definition (OCP e4m3fn / e5m2)."""
    sign = -1.0 if p >> 7 else 1.0
    e = (p >> man_bits) & ((1 << exp_bits) - 1)
    m = p & ((1 << man_bits) - 1)
    bias = (1 << (exp_bits - 1)) - 1
    all_ones = e == (1 << exp_bits) - 1
    if ieee_specials and all_ones:
        return sign * math.inf if m == 0 else math.nan
    if not ieee_specials and all_ones and m == (1 << man_bits) - 1:
        return math.nan  # e4m3fn: only S.1111.111 is NaN, no Inf
    if e == 0:
        return sign * (m / (1 << man_bits)) * 2.0 ** (1 - bias)
    return sign * (1 + m / (1 << man_bits)) * 2.0 ** (e - bias)


REF_DECODE = {
    "fp32": f32_val, "fp16": f16_val, "bf16": bf16_val,
    "fp8_e4m3": lambda p: fp8_val(p, 4, 3, False), "fp8_e5m2": lambda p: fp8_val(p, 5, 2, True),
}


def same(a: float, b: float) -> bool:
    """Equal as floats, NaN == NaN, and -0 != +0."""
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    return a == b and math.copysign(1.0, a) == math.copysign(1.0, b)


def same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    a, b = a.double(), b.double()
    both_nan = a.isnan() & b.isnan()
    eq = (a == b) & (torch.signbit(a) == torch.signbit(b))
    return bool((both_nan | eq).all())


def sample_patterns(fmt: FloatFormat, n: int, seed: int) -> list[int]:
    """All patterns for narrow formats, else specials plus random ones."""
    if fmt.bits <= 8:
        return list(range(1 << fmt.bits))
    g = torch.Generator().manual_seed(seed)
    rnd = torch.randint(0, 1 << fmt.bits, (n,), generator=g, dtype=torch.int64).tolist()
    top_exp = ((1 << fmt.exp_bits) - 1) << fmt.man_bits
    sign = 1 << (fmt.bits - 1)
    specials = [0, 1, (1 << fmt.man_bits) - 1, 1 << fmt.man_bits, top_exp, top_exp - 1, top_exp + 1]
    return specials + [p | sign for p in specials] + rnd


# --- formats and parsing ------------------------------------------------------------------------

@pytest.mark.parametrize("text,fmt", [
    ("int8", IntFormat(8)), ("UINT4", IntFormat(4, False)), ("int16", IntFormat(16)),
    ("int2", IntFormat(2)), ("int32", IntFormat(32)), ("uint24", IntFormat(24, False)),
    ("fp32", FP32), ("Float32", FP32), ("fp16", FP16), ("BF16", BF16),
    ("fp8_e4m3", FP8_E4M3), ("E4M3", FP8_E4M3), ("fp8_e5m2", FP8_E5M2), ("e5m2", FP8_E5M2),
])
def test_parse_format(text, fmt):
    assert parse_format(text) == fmt
    assert parse_format(fmt.name) == fmt


@pytest.mark.parametrize("text", ["int1", "int33", "uint1", "uint64", "fp64", "int", "", "e3m4"])
def test_parse_format_rejects(text):
    with pytest.raises(HwrelError, match="valid are int2..int32") as e:
        parse_format(text)
    assert "\n" not in str(e.value)


def test_names_widths_roles():
    assert [f.name for f in FLOATS] == ["fp32", "fp16", "bf16", "fp8_e4m3", "fp8_e5m2"]
    assert [f.bits for f in FLOATS] == [32, 16, 16, 8, 8]
    assert IntFormat(4, False).name == "uint4" and IntFormat(8).bits == 8
    for f in FLOATS:
        roles = [f.bit_role(k) for k in range(f.bits)]
        assert roles == ["mantissa"] * f.man_bits + ["exponent"] * f.exp_bits + ["sign"]
    assert [IntFormat(3).bit_role(k) for k in range(3)] == ["magnitude", "magnitude", "sign"]
    assert {IntFormat(3, False).bit_role(k) for k in range(3)} == {"magnitude"}
    for bad in (1, 33, True):
        with pytest.raises(HwrelError):
            IntFormat(bad)
    with pytest.raises(HwrelError, match="bit 8 out of range for int8"):
        IntFormat(8).bit_role(8)


# --- integer flips: two's complement arithmetic -------------------------------------------------

@pytest.mark.parametrize("fmt", INTS, ids=lambda f: f.name)
def test_int_flip_matches_twos_complement(fmt):
    codes = torch.arange(fmt.qmin, fmt.qmax + 1)  # exhaustive, all widths
    b = fmt.bits
    assert (fmt.qmin, fmt.qmax) == ((-(2 ** (b - 1)), 2 ** (b - 1) - 1) if fmt.signed
                                    else (0, 2 ** b - 1))
    unsigned_view = torch.remainder(codes, 2 ** b)  # the stored word, by arithmetic
    assert torch.equal(to_bits(fmt, codes), unsigned_view)
    assert torch.equal(from_bits(fmt, unsigned_view), codes)
    for k in range(b):
        bit_set = (unsigned_view // 2 ** k) % 2 == 1
        if fmt.signed and k == b - 1:  # sign bit weighs -2^(b-1)
            expected = torch.where(bit_set, codes + 2 ** k, codes - 2 ** k)
        else:
            expected = torch.where(bit_set, codes - 2 ** k, codes + 2 ** k)
        got = flip(fmt, codes, k)
        assert torch.equal(got, expected)
        assert torch.equal(flip(fmt, got, k), codes)
        exact = torch.full(codes.shape, 2.0 ** k * 0.5, dtype=torch.float64)
        assert torch.equal(flip_delta(fmt, codes, k, scale=0.5), exact)
        assert max_flip_delta(fmt, k, max_abs=2 ** b, scale=0.5) == 2.0 ** k * 0.5


@pytest.mark.parametrize("fmt", [IntFormat(b, s) for b in (17, 24, 31, 32) for s in (True, False)],
                         ids=lambda f: f.name)
def test_wide_int_flip_matches_twos_complement(fmt):
    # Too wide to enumerate: the extremes, zero, +-1 and random codes against Python integers.
    b = fmt.bits
    g = torch.Generator().manual_seed(b)
    rnd = torch.randint(fmt.qmin, fmt.qmax + 1, (64,), generator=g, dtype=torch.int64).tolist()
    codes = sorted({fmt.qmin, fmt.qmax, 0, 1, fmt.qmin + 1, fmt.qmax - 1, *rnd}
                   | ({-1} if fmt.signed else set()))
    t = torch.tensor(codes, dtype=torch.int64)
    assert to_bits(fmt, t).tolist() == [c % 2 ** b for c in codes]
    assert torch.equal(from_bits(fmt, to_bits(fmt, t)), t)
    for k in (0, b // 2, b - 2, b - 1):
        expect = []
        for c in codes:
            p = (c % 2 ** b) ^ (1 << k)
            expect.append(p - 2 ** b if fmt.signed and p >= 2 ** (b - 1) else p)
        assert flip(fmt, t, k).tolist() == expect
        assert torch.equal(flip_delta(fmt, t, k, scale=0.25),
                           torch.full(t.shape, 2.0 ** k * 0.25, dtype=torch.float64))
        assert max_flip_delta(fmt, k, max_abs=1.0, scale=0.25) == 2.0 ** k * 0.25
    if fmt.signed and b == 32:  # the int32 bias sign bit: 2^31 * scale
        assert fmt.bit_role(31) == "sign"
        assert float(flip_delta(fmt, torch.tensor([5]), 31, scale=1e-6)) == 2.0 ** 31 * 1e-6
    with pytest.raises(HwrelError, match="out of range"):
        to_bits(fmt, torch.tensor([fmt.qmax + 1]))


def test_int_flip_broadcast_mask_and_stuck_at():
    fmt = IntFormat(5)
    codes = torch.arange(fmt.qmin, fmt.qmax + 1)
    bits = torch.arange(5)
    table = flip(fmt, codes[:, None], bits)
    assert table.shape == (32, 5)
    for k in range(5):
        assert torch.equal(table[:, k], flip(fmt, codes, k))
    for i in range(5):
        for j in range(5):
            mask = positions_to_mask(fmt, torch.tensor([i, j]))
            twice = flip(fmt, flip(fmt, codes, i), j) if i != j else flip(fmt, codes, i)
            assert torch.equal(flip_mask(fmt, codes, mask), twice)
    for k in range(5):
        for level in (0, 1):
            got = stuck_at(fmt, codes, k, level)
            has = (to_bits(fmt, codes) >> k) & 1
            assert torch.equal(got, torch.where(has == level, codes, flip(fmt, codes, k)))


# --- float flips against struct and a reference decoder -----------------------------------------

@pytest.mark.parametrize("fmt", FLOATS, ids=lambda f: f.name)
def test_from_bits_matches_reference_decoder(fmt):
    pats = sample_patterns(fmt, 3000, seed=1)
    got = from_bits(fmt, torch.tensor(pats)).tolist()
    ref = REF_DECODE[fmt.name]
    assert all(same(g, ref(p)) for g, p in zip(got, pats))


@pytest.mark.parametrize("fmt", FLOATS, ids=lambda f: f.name)
def test_float_flip_matches_reference(fmt):
    ref = REF_DECODE[fmt.name]
    pats = [p for p in sample_patterns(fmt, 400, seed=2)]
    # Start from the value (not the pattern) except NaNs, whose payload a cast need not keep.
    values = torch.tensor([ref(p) for p in pats], dtype=torch.float64)
    keep = ~values.isnan()
    if fmt is FP32:  # fp32 keeps NaN payloads bit for bit through from_bits
        values = from_bits(fmt, torch.tensor(pats))
        keep = torch.ones(len(pats), dtype=torch.bool)
    for k in range(fmt.bits):
        got = flip(fmt, values[keep], k).tolist()
        expect = [ref(p ^ (1 << k)) for p, kp in zip(pats, keep.tolist()) if kp]
        assert all(same(g, e) for g, e in zip(got, expect)), (fmt.name, k)


def test_fp32_flip_struct_specials_and_delta():
    xs = [0.0, -0.0, 1.0, -2.5, 1e-45, 3.4028234663852886e38, math.inf, -math.inf, 1e-40]
    for x in (f32_val(f32_bits(x)) for x in xs):  # the stored (fp32-rounded) value
        for k in range(32):
            expect = f32_val(f32_bits(x) ^ (1 << k))
            got = float(flip(FP32, torch.tensor(x, dtype=torch.float32), k))
            assert same(got, expect)
            d = float(flip_delta(FP32, torch.tensor(x), k))
            true = abs(expect - x) if math.isfinite(expect) and math.isfinite(x) else math.inf
            assert d == true
    assert float(flip(FP32, torch.tensor(1.0), 30)) == math.inf
    assert float(flip_delta(FP32, torch.tensor(1.0), 30, clamp=4.0)) == 3.0
    assert float(flip_delta(FP32, torch.tensor(math.nan), 0)) == math.inf


@pytest.mark.parametrize("fmt", FLOATS, ids=lambda f: f.name)
def test_float_round_trip_and_stuck_at(fmt):
    pats = torch.tensor(sample_patterns(fmt, 2000, seed=3))
    vals = from_bits(fmt, pats)
    keep = ~vals.isnan() if fmt is not FP32 else torch.ones_like(pats, dtype=torch.bool)
    assert torch.equal(to_bits(fmt, vals[keep]), pats[keep])
    assert vals.dtype == torch.float32
    g = torch.Generator().manual_seed(4)
    bits = torch.randint(0, fmt.bits, pats.shape, generator=g)
    for level in (0, 1):
        got = stuck_at(fmt, vals, bits, level)
        has = (pats >> bits) & 1
        expect = torch.where(has == level, vals, flip(fmt, vals, bits))
        assert same_tensor(got, expect)
        expect_pat = torch.where(torch.tensor(level) == 1, pats | (1 << bits), pats & ~(1 << bits))
        assert same_tensor(got[keep], from_bits(fmt, expect_pat)[keep])


def test_float_values_are_rounded_to_format():
    # fp16 stores 1 + 2^-11 as 1.0 (round to even); flipping bit 0 gives 1 + 2^-10.
    assert float(flip(FP16, torch.tensor(1 + 2 ** -11, dtype=torch.float64), 0)) == 1 + 2 ** -10
    assert float(from_bits(FP8_E4M3, to_bits(FP8_E4M3, torch.tensor(1e6)))) == 448.0


# --- sound bounds -------------------------------------------------------------------------------

FMT_ST = st.sampled_from(ALL)


@st.composite
def fault_case(draw):
    fmt = draw(FMT_ST)
    bit = draw(st.integers(0, fmt.bits - 1))
    scale = draw(st.sampled_from([1.0, 0.37, 2.0 ** -7, 3.0]))
    clamp = draw(st.one_of(st.none(), st.floats(1e-3, 1e3)))
    if isinstance(fmt, IntFormat):
        codes = draw(st.lists(st.integers(fmt.qmin, fmt.qmax), min_size=1, max_size=16))
        max_abs = max(abs(c) for c in codes) + draw(st.integers(0, 3))
        return fmt, bit, torch.tensor(codes), float(max_abs), scale, clamp
    hi = float(torch.finfo(fmt.torch_dtype).max)
    max_abs = draw(st.one_of(st.floats(0.0, hi), st.floats(0.0, 4.0), st.just(hi),
                             st.builds(lambda e: 2.0 ** e, st.integers(-140, 127))))
    fracs = draw(st.lists(st.tuples(st.floats(-1.0, 1.0), st.integers(0, 160)), min_size=1,
                          max_size=16))
    vals = [max_abs * f * 2.0 ** -j for f, j in fracs] + [max_abs, -max_abs]
    return fmt, bit, torch.tensor(vals, dtype=torch.float64), max_abs, scale, clamp


@settings(max_examples=600, deadline=None)
@given(fault_case())
def test_max_flip_delta_bounds_flip_delta(case):
    fmt, bit, values, max_abs, scale, clamp = case
    bound = max_flip_delta(fmt, bit, max_abs, scale=scale, clamp=clamp)
    got = flip_delta(fmt, values, bit, scale=scale, clamp=clamp)
    assert bool((got <= bound).all()), (fmt.name, bit, max_abs, float(got.max()), bound)
    if clamp is not None:
        assert bound <= max_flip_delta(fmt, bit, max_abs, scale=scale)


@pytest.mark.parametrize("fmt", [FP16, BF16, FP8_E5M2], ids=lambda f: f.name)
def test_fp32_binade_shortcut_matches_exhaustive(fmt):
    """fp32 uses per-binade candidates; check that shortcut against enumeration on IEEE formats."""
    pats = torch.arange(1 << (fmt.bits - 1))
    vals = from_bits(fmt, pats).double()
    vals = vals[vals.isfinite()]
    for max_abs in [0.0, 1e-6, 0.3, 1.0, 1.7, 100.0, 6e4, 1e30, math.inf]:
        lim = vals[vals >= max_abs].min() if bool((vals >= max_abs).any()) else vals.max()
        inside = vals[vals <= lim]
        cand = _binade_candidates(fmt, max_abs)
        for k in range(fmt.bits):
            assert float(flip_delta(fmt, cand, k).max()) == float(flip_delta(fmt, inside, k).max())


def test_float_bound_tight_and_textbook():
    for fmt in FLOATS:
        for max_abs in [1.0, 0.25, 3.0]:  # representable, normal range in every format
            for k in range(fmt.man_bits):
                b = max_flip_delta(fmt, k, max_abs)
                assert b <= max_abs * 2.0 ** (k - fmt.man_bits)
                attained = flip_delta(fmt, torch.tensor(max_abs), k)
                assert b >= float(attained) > 0
            assert max_flip_delta(fmt, fmt.bits - 1, max_abs) == 2 * max_abs
    assert max_flip_delta(FP32, 30, 1.0) == math.inf  # exponent MSB of 1.0 -> Inf
    assert max_flip_delta(FP32, 30, 1.0, clamp=4.0) == 4.0  # restricted values keep their sign
    assert max_flip_delta(FP32, 31, 1.0, clamp=0.5) == 1.0
    assert max_flip_delta(IntFormat(8), 7, 3.0, scale=0.5, clamp=1.0) == 2.5  # R + scale * max_abs
    assert max_flip_delta(IntFormat(8), 7, math.inf, scale=0.5, clamp=1.0) == 64.0
    assert max_flip_delta(FP8_E4M3, 6, 1.0) == 255.0  # e4m3fn has no Inf: 1.875 -> 256.875...
    # Above the largest finite value a cast may store Inf, except in saturating e4m3fn.
    assert max_flip_delta(FP16, 0, 65505.0) == math.inf
    assert max_flip_delta(FP8_E4M3, 7, 1e9) == max_flip_delta(FP8_E4M3, 7, 448.0) == 896.0
    # e4m3fn's top binade reaches its NaN pattern S.1111.111 through any mantissa bit.
    assert max_flip_delta(FP8_E4M3, 1, 416.0) == math.inf
    assert max_flip_delta(FP8_E4M3, 0, 240.0) == 16.0
    # Subnormals: flipping a mantissa bit of 0 is not covered by |x| * 2^(k-m).
    assert max_flip_delta(FP16, 0, 0.0) == 2.0 ** -24


def test_range_restrict():
    x = torch.tensor([math.nan, math.inf, -math.inf, 0.5, -7.0, 3.0])
    assert torch.equal(range_restrict(x, 2.0), torch.tensor([0.0, 2.0, -2.0, 0.5, -2.0, 2.0]))
    for bad in (0.0, -1.0, math.inf, math.nan):
        with pytest.raises(HwrelError, match="range-restriction limit"):
            range_restrict(x, bad)


# --- IntStorage ---------------------------------------------------------------------------------

@pytest.mark.parametrize("bits", [2, 4, 8, 16])
@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("symmetric", [True, False])
def test_int_storage_quantization_error(bits, per_channel, symmetric):
    g = torch.Generator().manual_seed(bits)
    w = torch.randn(6, 3, 2, generator=g) * torch.tensor([0.01, 1, 5, 0.2, 3, 1e-3])[:, None, None]
    w[2] = w[2].abs()  # one channel entirely positive
    w[4] = 0.0  # one all-zero channel
    fmt = IntFormat(bits)
    s = IntStorage.from_float(w, fmt, per_channel=per_channel, symmetric=symmetric)
    assert s.codes.dtype == torch.int64 and s.codes.shape == w.shape
    assert int(s.codes.min()) >= fmt.qmin and int(s.codes.max()) <= fmt.qmax
    assert s.scale.shape == ((6,) if per_channel else ())
    scale = s.scale.double().reshape(-1, 1, 1) if per_channel else s.scale.double()
    zp = s.zero_point.reshape(-1, 1, 1) if per_channel else s.zero_point
    deq64 = (s.codes - zp).double() * scale
    assert bool(((deq64 - w.double()).abs() <= scale / 2 * (1 + 1e-12)).all())
    assert torch.allclose(s.dequantize().double(), deq64, rtol=1e-6, atol=0)
    if symmetric:
        assert bool((s.zero_point == 0).all())
    assert s.storage_bits == w.numel() * bits


def test_int_storage_flip_is_pure_and_exact():
    w = torch.linspace(-1, 1, 12).reshape(3, 4)
    s = IntStorage.from_float(w, IntFormat(8), per_channel=True, symmetric=False)
    before = s.codes.clone()
    for idx, k in [(0, 0), (5, 3), (11, 7)]:
        t = s.flip(idx, k)
        assert torch.equal(s.codes, before)  # original untouched
        code_diff = (t.codes - s.codes).reshape(-1)
        assert torch.nonzero(code_diff).reshape(-1).tolist() == [idx]
        assert abs(int(code_diff[idx])) == 2 ** k
        # dequantize() is float32: the value moves by 2^k * scale up to float32 rounding.
        diff = (t.dequantize().double() - s.dequantize().double()).abs().reshape(-1)
        assert torch.nonzero(diff).reshape(-1).tolist() == [idx]
        assert math.isclose(float(diff[idx]), 2.0 ** k * float(s.scale[idx // 4]), abs_tol=1e-6)
        assert torch.equal(t.scale, s.scale) and torch.equal(t.zero_point, s.zero_point)


def test_int_storage_rejects_bad_input():
    fmt = IntFormat(4)
    with pytest.raises(HwrelError, match="code 8 out of range for int4"):
        IntStorage(torch.tensor([8]), torch.tensor(1.0), torch.tensor(0), fmt)
    with pytest.raises(HwrelError, match="per-channel"):
        IntStorage(torch.zeros(3, 2, dtype=torch.int64), torch.ones(2), torch.tensor(0), fmt)
    with pytest.raises(HwrelError, match="positive"):
        IntStorage(torch.zeros(3, dtype=torch.int64), torch.tensor(0.0), torch.tensor(0), fmt)
    s = IntStorage(torch.zeros(3, 2, dtype=torch.int64), torch.ones(3, 1), torch.tensor(0), fmt)
    with pytest.raises(HwrelError, match="flat index 6 out of range"):
        s.flip(6, 0)
    with pytest.raises(HwrelError, match="bit 4 out of range for int4"):
        s.flip(0, 4)
    with pytest.raises(HwrelError, match="NaN"):
        IntStorage.from_float(torch.tensor([1.0, math.nan]), fmt)
    with pytest.raises(HwrelError, match="needs w >= 0"):
        IntStorage.from_float(torch.tensor([-1.0]), IntFormat(4, False))


# --- bad input ----------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", [IntFormat(8), IntFormat(3, False), FP16, FP8_E4M3],
                         ids=lambda f: f.name)
def test_bit_out_of_range(fmt):
    v = torch.zeros(3, dtype=torch.int64) if isinstance(fmt, IntFormat) else torch.zeros(3)
    for bad in (fmt.bits, -1, torch.tensor([0, fmt.bits + 2])):
        bad_val = bad if isinstance(bad, int) else fmt.bits + 2
        pattern = f"bit {bad_val} out of range for {fmt.name}"
        for fn in (lambda: flip(fmt, v, bad), lambda: flip_delta(fmt, v, bad),
                   lambda: stuck_at(fmt, v, bad, 1)):
            with pytest.raises(HwrelError, match=pattern):
                fn()
    with pytest.raises(HwrelError, match=f"bit {fmt.bits} out of range for {fmt.name}"):
        max_flip_delta(fmt, fmt.bits, 1.0)
    with pytest.raises(HwrelError, match="stuck-at level 2"):
        stuck_at(fmt, v, 0, 2)


def test_code_and_pattern_errors():
    with pytest.raises(HwrelError, match=r"code 128 out of range for int8: codes lie in \[-128, "):
        to_bits(IntFormat(8), torch.tensor([0, 128]))
    with pytest.raises(HwrelError, match="code -1 out of range for uint4"):
        flip(IntFormat(4, False), torch.tensor([-1]), 0)
    with pytest.raises(HwrelError, match="must be integers"):
        flip(IntFormat(8), torch.tensor([1.0]), 0)
    with pytest.raises(HwrelError, match="bit pattern 256 out of range for fp8_e5m2"):
        from_bits(FP8_E5M2, torch.tensor([256]))
    with pytest.raises(HwrelError, match="flip mask 16 out of range for int4"):
        flip_mask(IntFormat(4), torch.tensor([1]), 16)
    with pytest.raises(HwrelError, match="max_abs must be >= 0"):
        max_flip_delta(FP32, 0, -1.0)
    with pytest.raises(HwrelError, match="scale must be a positive"):
        max_flip_delta(IntFormat(8), 0, 1.0, scale=0.0)
