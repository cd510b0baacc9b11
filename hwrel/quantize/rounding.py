"""Rounding as a bounded perturbation: how far quantization can move each weight and activation.

Round-to-nearest integer quantization of a weight ``w`` with scale ``s`` (per tensor or per output
channel, symmetric or with an integer zero point) changes it by at most ``s / 2``; quantizing an
activation with scale ``s`` and clip range ``[s*qmin, s*qmax]`` changes it by at most
``s / 2 + (distance of the nominal value beyond the clip range)``. The scales are computed exactly
as Brevitas computes them (:class:`hwrel.formats.IntStorage` reproduces Brevitas' weight quantizers
to one float32 ulp). Pure functions; the radii are sound (float64, padded for float32 rounding).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from hwrel.errors import check
from hwrel.formats import IntFormat, IntStorage

BITS = tuple(range(2, 17))
_PAD_REL = 2.0 ** -20  # the dequantized value is computed in float32: absorb its rounding


@dataclass(frozen=True)
class QuantSpec:
    """How weights (and optionally activations) are quantized.

    ``per_channel``: one scale per output channel (else per tensor). ``symmetric``: signed codes
    with zero point 0 and ``scale = max|w| / (2^(b-1) - 1)``; else unsigned codes over
    ``[min(w, 0), max(w, 0)]`` with an integer zero point (Brevitas' ``ShiftedUint8`` quantizers).
    ``act_bits``: ``None`` (float activations), an int (fixed width) or ``"same"`` (the weight width)
    for the outputs of the hidden activations; max-calibrated per-tensor scales, unsigned when the
    activation is non-negative.
    """

    per_channel: bool = False
    symmetric: bool = True
    act_bits: int | str | None = None

    def __post_init__(self) -> None:
        a = self.act_bits
        check(a is None or a == "same" or (isinstance(a, int) and not isinstance(a, bool) and 2 <= a <= 16),
              f"act_bits must be None, 'same' or an integer in 2..16, got {a!r}")

    def act_width(self, bits: int) -> int | None:
        return bits if self.act_bits == "same" else self.act_bits  # type: ignore[return-value]

    @property
    def label(self) -> str:
        w = f"{'per-channel' if self.per_channel else 'per-tensor'} {'symmetric' if self.symmetric else 'asymmetric'}"
        return w + ("" if self.act_bits is None else f", activations {self.act_bits}")


def check_bits(bits: int) -> int:
    check(isinstance(bits, int) and not isinstance(bits, bool) and 2 <= bits <= 16,
          f"bit width {bits!r} not supported: use 2..16")
    return bits


def weight_storage(w: Tensor, bits: int, spec: QuantSpec) -> IntStorage:
    """The integer storage Brevitas produces for ``w`` at ``bits`` (round to nearest)."""
    return IntStorage.from_float(w, IntFormat(check_bits(bits), signed=spec.symmetric),
                                 per_channel=spec.per_channel, symmetric=spec.symmetric)


def weight_radius(w: Tensor, bits: int, spec: QuantSpec) -> Tensor:
    """Sound elementwise bound ``R >= |Q(w) - w|`` (float64): half a step, zero for zero weights."""
    st = weight_storage(w, bits, spec)
    s = st._bcast(st.scale).to(torch.float64).expand_as(w)
    w64 = w.to(torch.float64)
    r = s / 2 * (1 + _PAD_REL) + _PAD_REL * (w64.abs() + s)
    return torch.where(w64 == 0, torch.zeros_like(r), r)  # 0 maps to code 0 (or the zero point) exactly


def act_radius(lo: Tensor, hi: Tensor, scale: float, clip_lo: float, clip_hi: float) -> Tensor:
    """``s/2`` plus how far the nominal range ``[lo, hi]`` reaches beyond the clip range.

    Sound: ``|Q(y~) - y| <= |Q(z) - z| + |clamp(y~) - clamp(y)| + |clamp(y) - y|`` with
    ``z = clamp(y~)``; the first term is at most ``s/2``, the second at most ``|y~ - y|`` (already
    propagated), the third the excess of ``y`` beyond the clip range.
    """
    excess = torch.clamp(hi - clip_hi, min=0) + torch.clamp(clip_lo - lo, min=0)
    return (scale / 2 + excess) * (1 + _PAD_REL)
