"""Bit-level storage formats (intB, fp32/fp16/bf16/fp8) and exact flip arithmetic.

Fault injection and soft-error analysis share these definitions (theory section 5). Bit ``k`` is the
bit of weight ``2^k`` in the raw pattern: bit 0 is the least significant, bit ``bits - 1`` the sign.

* Integer formats hold *codes*: two's complement when signed, plain binary otherwise. Every function
  here takes and returns codes as int64 tensors; real values are ``scale * (code - zero_point)``
  (see :class:`IntStorage`, whose scale is held fixed under faults: a flip changes codes only).
* Float formats hold values rounded by torch's cast to the format (round to nearest even; note that
  torch saturates fp8_e4m3 at +-448 and maps +-Inf there, as e4m3fn has no Inf). Results come back
  as float32 tensors, which represent every fp16/bf16/fp8 value exactly; NaN and Inf are preserved.

``flip``/``stuck_at``/``flip_mask``/``to_bits``/``from_bits`` are exact. ``flip_delta`` is exact up
to one float64 rounding. ``max_flip_delta`` is a sound upper bound (the exact worst case over
representable values, rounded up).
"""
from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass
from fractions import Fraction
from typing import Callable

import torch

from hwrel.errors import HwrelError, check

_INT_VIEW = {8: torch.int8, 16: torch.int16, 32: torch.int32}


@dataclass(frozen=True)
class IntFormat:
    """``bits``-wide integer code (2..32 bits), two's complement when ``signed``.

    32 bits covers the int32 biases of int8 accelerators (theory 5: bit 31 of a bias is critical).
    Codes and patterns are int64 tensors, which hold every 32-bit code exactly.
    """

    bits: int
    signed: bool = True

    def __post_init__(self) -> None:
        ok = isinstance(self.bits, int) and not isinstance(self.bits, bool)
        check(ok and 2 <= self.bits <= 32,
              f"integer format width {self.bits!r} not supported: use 2..32 bits")

    @property
    def name(self) -> str:
        return f"{'' if self.signed else 'u'}int{self.bits}"

    @property
    def qmin(self) -> int:
        """Smallest code."""
        return -(1 << (self.bits - 1)) if self.signed else 0

    @property
    def qmax(self) -> int:
        """Largest code."""
        return (1 << (self.bits - 1)) - 1 if self.signed else (1 << self.bits) - 1

    def bit_role(self, k: int) -> str:
        """``"sign"`` for the top bit of a signed format, else ``"magnitude"``."""
        _check_bit_int(self, k)
        return "sign" if self.signed and k == self.bits - 1 else "magnitude"


@dataclass(frozen=True)
class FloatFormat:
    """IEEE-style float: 1 sign bit, ``exp_bits`` exponent bits, ``man_bits`` mantissa bits."""

    name: str
    exp_bits: int
    man_bits: int
    torch_dtype: torch.dtype

    def __post_init__(self) -> None:
        width = torch.finfo(self.torch_dtype).bits
        check(1 + self.exp_bits + self.man_bits == width and width in _INT_VIEW,
              f"float format {self.name}: 1 + {self.exp_bits} + {self.man_bits} bits does not "
              f"match {self.torch_dtype}")

    @property
    def bits(self) -> int:
        return 1 + self.exp_bits + self.man_bits

    def bit_role(self, k: int) -> str:
        """``"sign"``, ``"exponent"`` or ``"mantissa"``."""
        _check_bit_int(self, k)
        if k == self.bits - 1:
            return "sign"
        return "exponent" if k >= self.man_bits else "mantissa"


Format = IntFormat | FloatFormat

FP32 = FloatFormat("fp32", 8, 23, torch.float32)
FP16 = FloatFormat("fp16", 5, 10, torch.float16)
BF16 = FloatFormat("bf16", 8, 7, torch.bfloat16)
FP8_E4M3 = FloatFormat("fp8_e4m3", 4, 3, torch.float8_e4m3fn)
FP8_E5M2 = FloatFormat("fp8_e5m2", 5, 2, torch.float8_e5m2)
_FLOAT_NAMES = {"fp32": FP32, "float32": FP32, "fp16": FP16, "float16": FP16, "bf16": BF16,
                "bfloat16": BF16, "fp8_e4m3": FP8_E4M3, "e4m3": FP8_E4M3, "fp8_e5m2": FP8_E5M2,
                "e5m2": FP8_E5M2}
_VALID = ("int2..int32, uint2..uint32, fp32 (float32), fp16, bf16, fp8_e4m3 (e4m3), "
          "fp8_e5m2 (e5m2)")


def parse_format(text: str) -> Format:
    """Format from its name, case-insensitive: ``"int8"``, ``"uint4"``, ``"bf16"``, ``"e4m3"``..."""
    key = str(text).strip().lower()
    if key in _FLOAT_NAMES:
        return _FLOAT_NAMES[key]
    m = re.fullmatch(r"(u?)int(\d+)", key)
    if m and 2 <= int(m.group(2)) <= 32:
        return IntFormat(int(m.group(2)), signed=not m.group(1))
    raise HwrelError(f"unknown storage format {text!r}: valid are {_VALID}")


# --- validation helpers -------------------------------------------------------------------------

def _check_bit_int(fmt: Format, k: int) -> None:
    check(isinstance(k, int) and not isinstance(k, bool) and 0 <= k < fmt.bits,
          f"bit {k!r} out of range for {fmt.name}: valid bit positions are 0..{fmt.bits - 1}")


def _as_tensor(x) -> torch.Tensor:
    """``x`` as a tensor, a tensor left where it is (``torch.as_tensor`` would move it to a default
    device set with ``torch.set_default_device``)."""
    return x if isinstance(x, torch.Tensor) else torch.as_tensor(x)


def _int_tensor(x: int | torch.Tensor, what: str, fmt: Format) -> torch.Tensor:
    t = _as_tensor(x)
    check(not t.is_floating_point() and not t.is_complex() and t.dtype != torch.bool,
          f"{what} for {fmt.name} must be integers, got dtype {t.dtype}")
    return t.to(torch.int64)


def _check_range(t: torch.Tensor, lo: int, hi: int, what: str, fmt: Format, valid: str) -> None:
    bad = (t < lo) | (t > hi)
    if bool(bad.any()):
        raise HwrelError(f"{what} {int(t[bad][0])} out of range for {fmt.name}: {valid}")


def _bit_tensor(fmt: Format, bit: int | torch.Tensor) -> torch.Tensor:
    t = _int_tensor(bit, "bit positions", fmt)
    _check_range(t, 0, fmt.bits - 1, "bit", fmt, f"valid bit positions are 0..{fmt.bits - 1}")
    return t


def _number(x: float, what: str) -> float:
    try:
        v = float(x)
    except (TypeError, ValueError):
        v = math.nan
    check(not isinstance(x, bool) and not math.isnan(v), f"{what} must be a number, got {x!r}")
    return v


def _positive_finite(x: float, what: str) -> float:
    v = _number(x, what)
    check(math.isfinite(v) and v > 0, f"{what} must be a positive finite number, got {x!r}")
    return v


# --- raw patterns -------------------------------------------------------------------------------

def to_bits(fmt: Format, values: torch.Tensor | float | int) -> torch.Tensor:
    """Raw bit pattern of each stored value as an int64 in ``[0, 2^bits)``. Exact.

    IntFormat: ``values`` are integer codes, checked to lie in ``[qmin, qmax]``. FloatFormat: values
    are first rounded to the format by torch's cast, then reinterpreted bit for bit.
    """
    mask = (1 << fmt.bits) - 1
    if isinstance(fmt, IntFormat):
        codes = _int_tensor(values, "codes", fmt)
        _check_range(codes, fmt.qmin, fmt.qmax, "code", fmt,
                     f"codes lie in [{fmt.qmin}, {fmt.qmax}]")
        return codes & mask
    t = _as_tensor(values)
    stored = t.to(fmt.torch_dtype).contiguous()
    return stored.view(_INT_VIEW[fmt.bits]).to(torch.int64) & mask


def from_bits(fmt: Format, bits: torch.Tensor | int) -> torch.Tensor:
    """Value of each raw pattern in ``[0, 2^bits)``. Exact.

    IntFormat: int64 codes. FloatFormat: float32 values (exact for every format here; fp32 patterns,
    NaN payloads included, come back bit for bit).
    """
    b = _int_tensor(bits, "bit patterns", fmt)
    _check_range(b, 0, (1 << fmt.bits) - 1, "bit pattern", fmt,
                 f"patterns lie in [0, {(1 << fmt.bits) - 1}]")
    half = 1 << (fmt.bits - 1)
    signed = torch.where(b >= half, b - 2 * half, b)
    if isinstance(fmt, IntFormat):
        return signed if fmt.signed else b
    raw = signed.to(_INT_VIEW[fmt.bits]).contiguous().view(fmt.torch_dtype)
    return raw.to(torch.float32)


def _apply(fmt: Format, values: torch.Tensor | float | int,
           op: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    return from_bits(fmt, op(to_bits(fmt, values)))


def flip(fmt: Format, values: torch.Tensor | float | int, bit: int | torch.Tensor) -> torch.Tensor:
    """Values with bit ``bit`` inverted. Exact.

    ``bit`` is an int or an int tensor broadcastable against ``values`` (one position per element).
    For several flips in one word use :func:`flip_mask`.
    """
    b = _bit_tensor(fmt, bit)
    return _apply(fmt, values, lambda p: p ^ (torch.ones_like(b) << b).to(p.device))


def flip_mask(fmt: Format, values: torch.Tensor | float | int,
              mask: int | torch.Tensor) -> torch.Tensor:
    """Values with every bit set in ``mask`` (an int pattern in ``[0, 2^bits)``) inverted. Exact."""
    m = _int_tensor(mask, "flip masks", fmt)
    _check_range(m, 0, (1 << fmt.bits) - 1, "flip mask", fmt,
                 f"masks lie in [0, {(1 << fmt.bits) - 1}]")
    return _apply(fmt, values, lambda p: p ^ m.to(p.device))


def positions_to_mask(fmt: Format, positions: torch.Tensor) -> torch.Tensor:
    """Mask for :func:`flip_mask` with the bits listed along the last dim of ``positions`` set.

    A position listed twice is set once (a set of bits, not two flips cancelling).
    """
    b = _bit_tensor(fmt, positions)
    check(b.dim() >= 1, "positions_to_mask needs positions along a last dimension")
    onehot = torch.zeros(*b.shape, fmt.bits, dtype=torch.int64).scatter_(-1, b.unsqueeze(-1), 1)
    present = onehot.amax(dim=-2)
    weights = torch.ones(fmt.bits, dtype=torch.int64) << torch.arange(fmt.bits)
    return (present * weights).sum(-1)


def stuck_at(fmt: Format, values: torch.Tensor | float | int, bit: int | torch.Tensor,
             level: int | torch.Tensor) -> torch.Tensor:
    """Values with bit ``bit`` forced to ``level`` (0 or 1). Exact; a no-op where it already is."""
    b = _bit_tensor(fmt, bit)
    lv = _int_tensor(level, "stuck-at levels", fmt)
    _check_range(lv, 0, 1, "stuck-at level", fmt, "levels are 0 or 1")
    m = torch.ones_like(b) << b

    def force(p: torch.Tensor) -> torch.Tensor:
        mm = m.to(p.device)
        return torch.where(lv.to(p.device) == 1, p | mm, p & ~mm)
    return _apply(fmt, values, force)


# --- flip magnitudes ----------------------------------------------------------------------------

def range_restrict(values: torch.Tensor, limit: float) -> torch.Tensor:
    """NaN -> 0, then clamp to ``[-limit, limit]`` (+-Inf -> +-limit). Exact.

    ``torch.clamp`` alone passes NaN, hence ``nan_to_num`` first.
    """
    lim = _positive_finite(limit, "range-restriction limit")
    return torch.nan_to_num(values, nan=0.0).clamp(-lim, lim)


def flip_delta(fmt: Format, values: torch.Tensor | float | int, bit: int | torch.Tensor, *,
               scale: float = 1.0, clamp: float | None = None) -> torch.Tensor:
    """``|new - old|`` for flipping ``bit`` of each stored value, as float64 (one rounding).

    Units: real value ``scale * stored`` (``stored`` = the code for IntFormat, the rounded float for
    FloatFormat). Without ``clamp``, Inf when old or new is Inf/NaN. With ``clamp=R`` both old and
    new pass through :func:`range_restrict` at ``R`` (the deployed model reads restricted values).
    """
    s = _positive_finite(scale, "scale")
    old = from_bits(fmt, to_bits(fmt, values)).to(torch.float64)
    new = flip(fmt, values, bit).to(torch.float64)
    old, new = torch.broadcast_tensors(old, new)
    if isinstance(fmt, IntFormat):
        raw = (new - old).abs() * s
    else:
        raw = torch.where(torch.isfinite(old) & torch.isfinite(new),
                          (new - old).abs(), torch.full_like(old, math.inf)) * s
    if clamp is None:
        return raw
    restricted = (range_restrict(new * s, clamp) - range_restrict(old * s, clamp)).abs()
    return torch.minimum(raw, restricted)


def _ceil(q: Fraction) -> float:
    """Smallest float64 >= q (inf when q overflows)."""
    try:
        f = float(q)
    except OverflowError:
        return math.inf
    return math.nextafter(f, math.inf) if Fraction(f) < q else f


@functools.lru_cache(maxsize=None)
def _float_table(fmt: FloatFormat, bit: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """All finite non-negative values of a <=16-bit format, sorted, with the running worst flip."""
    vals = from_bits(fmt, torch.arange(1 << (fmt.bits - 1)))
    vals = vals[torch.isfinite(vals)].to(torch.float64).sort().values
    vals = vals[torch.cat([torch.tensor([True]), vals[1:] != vals[:-1]])]
    deltas = flip_delta(fmt, vals, bit)
    return vals, deltas, torch.cummax(deltas, 0).values


def _binade_candidates(fmt: FloatFormat, max_abs: float) -> torch.Tensor:
    """Largest magnitude of each binade up to the first representable value >= max_abs.

    For IEEE formats with Inf (fp32, fp16, bf16, e5m2) a flip's |delta| depends only on the
    exponent for mantissa bits and grows with the mantissa for sign and exponent bits, so these
    candidates attain the worst case (checked against exhaustive enumeration in the tests).
    """
    top = (1 << (fmt.bits - 1)) - (1 << fmt.man_bits) - 1  # largest finite pattern
    lim = torch.tensor(max_abs, dtype=torch.float64).to(fmt.torch_dtype)
    p_lim = int(to_bits(fmt, lim)) if math.isfinite(float(lim)) else top
    if float(lim) < max_abs:  # patterns of non-negative floats are ordered like their values
        p_lim += 1
    p_lim = min(p_lim, top)
    tops = torch.arange(1 << fmt.exp_bits) * (1 << fmt.man_bits) + (1 << fmt.man_bits) - 1
    pats = torch.cat([tops[tops <= p_lim], torch.tensor([p_lim])])
    return from_bits(fmt, pats).to(torch.float64)


def _saturates(fmt: FloatFormat) -> bool:
    """True when torch's cast maps +-Inf to a finite value (fp8_e4m3 has no Inf)."""
    return math.isfinite(float(torch.tensor(math.inf).to(fmt.torch_dtype)))


def _float_worst(fmt: FloatFormat, bit: int, max_abs: float) -> float:
    if max_abs > torch.finfo(fmt.torch_dtype).max and not _saturates(fmt):
        return math.inf  # such values may be stored as Inf (a flip then gives Inf or NaN)
    if fmt.bits <= 16:
        vals, deltas, run = _float_table(fmt, bit)
        idx = min(int(torch.searchsorted(vals, torch.tensor([max_abs], dtype=torch.float64))),
                  len(vals) - 1)
        cand, cd = vals[: idx + 1], deltas[: idx + 1]
        worst = float(run[idx])
    else:
        cand = _binade_candidates(fmt, max_abs)
        cd = flip_delta(fmt, cand, bit)
        worst = float(cd.max())
    if math.isinf(worst):
        return math.inf
    # Computed deltas are rounded; the true maximum is among those rounding to ``worst``.
    at = cand[cd == worst]
    olds = [Fraction(float(x)) for x in at]
    news = [Fraction(float(x)) for x in flip(fmt, at, bit).to(torch.float64)]
    return _ceil(max(abs(n - o) for n, o in zip(news, olds)))


def max_flip_delta(fmt: Format, bit: int, max_abs: float, scale: float = 1.0,
                   clamp: float | None = None) -> float:
    """Sound upper bound on ``|new - old|`` (real units) when bit ``bit`` of a stored value flips.

    Real value = ``scale * stored``; ``max_abs`` bounds ``|stored|`` (code units for IntFormat,
    where with a zero point it must bound ``|code - zero_point|``; the float's own units for
    FloatFormat).

    * IntFormat: exact, ``2^k * scale`` for bit ``k`` (the sign bit ``2^(b-1) * scale``), whatever
      the code.
    * FloatFormat: the exact worst case over all finite representable values not larger than
      ``max_abs`` rounded up to the format (so it also covers real values ``<= max_abs`` before
      rounding), itself rounded up to float64; ``inf`` when ``max_abs`` exceeds the largest finite
      value of a format with Inf, as the cast may store Inf. At most ``max_abs * 2^(k-m)`` for
      mantissa bit ``k`` in the normal range (not below: subnormal flips do not shrink with
      ``|x|``) and ``2 * max_abs`` for the sign when ``max_abs`` is representable; may be ``inf``
      for exponent bits and, in fp8_e4m3's top binade, mantissa bits (Inf/NaN results).
    * ``clamp=R`` (old and new values both read through :func:`range_restrict` at ``R``):
      IntFormat ``min(raw, R + scale * max_abs)``; FloatFormat ``min(raw, R)`` for non-sign bits and
      ``min(raw, 2R)`` for the sign: tighter than ``R + max_abs``, as restriction keeps the sign.
    """
    _check_bit_int(fmt, bit)
    s = _positive_finite(scale, "scale")
    m = _number(max_abs, "max_abs")
    check(m >= 0, f"max_abs must be >= 0, got {max_abs!r}")
    if isinstance(fmt, IntFormat):
        raw = _ceil(Fraction(s) * (1 << bit))
    else:
        worst = _float_worst(fmt, bit, m)
        raw = math.inf if math.isinf(worst) else _ceil(Fraction(s) * Fraction(worst))
    if clamp is None:
        return raw
    r = _positive_finite(clamp, "range-restriction limit")
    if isinstance(fmt, FloatFormat):
        # Restricted values keep the stored sign (NaN -> 0): a non-sign flip moves a value within
        # [0, R] or [-R, 0]; the sign flip maps r(x) to -r(x).
        return min(raw, r if fmt.bit_role(bit) != "sign" else 2 * r)
    if math.isinf(m):
        return raw
    return min(raw, _ceil(Fraction(r) + Fraction(_ceil(Fraction(s) * Fraction(m)))))


# --- quantized integer storage ------------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class IntStorage:
    """Integer-coded tensor: real value = ``scale * (codes - zero_point)``.

    ``scale``/``zero_point`` are per tensor (one element) or per output channel (``codes.shape[0]``
    elements along dim 0); they are stored normalised to shape ``()`` or ``(C,)``. Faults hit the
    codes only: the scale and zero point are held fixed (they live in separate, typically protected
    registers), so a flip of bit ``k`` changes the real value by exactly ``2^k * scale``.
    """

    codes: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor
    fmt: IntFormat

    def __post_init__(self) -> None:
        check(isinstance(self.fmt, IntFormat), f"IntStorage needs an IntFormat, got {self.fmt!r}")
        codes = from_bits(self.fmt, to_bits(self.fmt, self.codes))  # validates dtype and range
        scale = _as_tensor(self.scale)
        check(scale.is_floating_point(),
              f"IntStorage scale must be floating point, got {scale.dtype}")
        zp = _int_tensor(self.zero_point, "zero points", self.fmt)
        channels = codes.shape[0] if codes.dim() else 1
        for name, t in (("scale", scale), ("zero_point", zp)):
            ok = t.numel() == 1 or (codes.dim() >= 1 and t.numel() == channels
                                    and all(d == 1 for d in t.shape[1:]) and t.shape[0] == channels)
            check(ok, f"IntStorage {name} of shape {tuple(t.shape)} is neither per-tensor nor "
                      f"per-channel for codes of shape {tuple(codes.shape)}")
        check(bool(torch.isfinite(scale).all()) and bool((scale > 0).all()),
              "IntStorage scale must be positive and finite")
        norm = (lambda t: t.reshape(()) if t.numel() == 1 else t.reshape(-1))  # noqa: E731
        object.__setattr__(self, "codes", codes)
        object.__setattr__(self, "scale", norm(scale))
        object.__setattr__(self, "zero_point", norm(zp))

    def _bcast(self, t: torch.Tensor) -> torch.Tensor:
        return t.reshape(-1, *([1] * (self.codes.dim() - 1))) if t.dim() == 1 else t

    def dequantize(self) -> torch.Tensor:
        """``scale * (codes - zero_point)`` in the scale's dtype."""
        diff = (self.codes - self._bcast(self.zero_point)).to(torch.float64)
        return (diff * self._bcast(self.scale).to(torch.float64)).to(self.scale.dtype)

    @property
    def storage_bits(self) -> int:
        """Bits of code storage (``numel * fmt.bits``), the target of soft errors."""
        return self.codes.numel() * self.fmt.bits

    def flip(self, flat_index: int, bit: int) -> IntStorage:
        """New storage with bit ``bit`` of code ``codes.flatten()[flat_index]`` inverted (exact)."""
        n = self.codes.numel()
        check(isinstance(flat_index, int) and not isinstance(flat_index, bool)
              and 0 <= flat_index < n, f"flat index {flat_index!r} out of range for {n} codes")
        _check_bit_int(self.fmt, bit)
        codes = self.codes.clone()
        flat = codes.view(-1)
        flat[flat_index] = flip(self.fmt, flat[flat_index], bit)
        return IntStorage(codes, self.scale, self.zero_point, self.fmt)

    @classmethod
    def from_float(cls, w: torch.Tensor, fmt: IntFormat, per_channel: bool = False,
                   symmetric: bool = True) -> IntStorage:
        """Round-to-nearest quantization of ``w``; ``|w - dequantize()| <= scale / 2`` elementwise.

        Symmetric: zero point 0, ``scale = max|w| / qmax`` (signed codes use ``[-qmax, qmax]``;
        unsigned codes need ``w >= 0``). Asymmetric: the range ``[min(w, 0), max(w, 0)]`` maps onto
        ``[qmin, qmax]`` with an integer zero point. ``per_channel`` takes the range per slice along
        dim 0 (output channel). The scale is float32 and held fixed under faults. A zero range gets
        scale 1.
        """
        check(isinstance(fmt, IntFormat), f"from_float needs an IntFormat, got {fmt!r}")
        w64 = _as_tensor(w).detach().to(torch.float64)
        check(w64.numel() > 0 and bool(torch.isfinite(w64).all()),
              "cannot quantize an empty tensor or one with NaN/Inf")
        check(not per_channel or w64.dim() >= 1,
              "per-channel quantization needs a tensor with dim >= 1")
        rows = w64.reshape(w64.shape[0], -1) if per_channel else w64.reshape(1, -1)
        lo = rows.amin(1).clamp(max=0.0)
        hi = rows.amax(1).clamp(min=0.0)
        if symmetric:
            check(fmt.signed or bool((lo >= 0).all()),
                  f"symmetric {fmt.name} quantization needs w >= 0, got min {float(lo.min())}")
            span, levels = torch.maximum(-lo, hi), fmt.qmax
        else:
            span, levels = hi - lo, fmt.qmax - fmt.qmin
        scale = torch.where(span > 0, span / levels, torch.ones_like(span)).to(torch.float32)
        s64 = scale.to(torch.float64)  # codes from the stored (float32) scale, in float64
        zp = (torch.zeros_like(s64) if symmetric else torch.round(fmt.qmin - lo / s64)
              ).clamp(fmt.qmin, fmt.qmax).to(torch.int64)
        shape = (-1, *([1] * (w64.dim() - 1))) if per_channel else ()
        s_b, zp_b = s64.reshape(shape), zp.reshape(shape)
        codes = (torch.round(w64 / s_b) + zp_b).clamp(fmt.qmin, fmt.qmax).to(torch.int64)
        if not per_channel:
            scale, zp = scale.reshape(()), zp.reshape(())
        return cls(codes, scale, zp, fmt)
