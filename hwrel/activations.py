"""Elementwise activations and the facts the bounds need about them.

Most activations hwrel analyses are monotone non-decreasing, so the image of an interval is the
interval of the images, and its Lipschitz constant over an interval is the sup of its derivative
there. The smooth gated ones (GELU exact and tanh, SiLU, Mish, Hardswish) are *valley-shaped*:
non-increasing up to one minimum point ``x*`` and non-decreasing after it. Their interval image is
``[min(phi(lo), phi(hi), m*), max(phi(lo), phi(hi))]`` where ``m*`` (a value padded below the
minimum) enters whenever ``[lo, hi]`` comes within a margin of ``x*``; their local Lipschitz
constant is ``sup |phi'|`` over ``[lo, hi]``, the max of ``|phi'|`` at the ends and at every
extremum of ``phi'`` (computed once numerically, padded outward) within a margin of the interval.
``lipschitz`` is always ``sup |phi'|`` over the real line, ``slope_lo <= phi'`` its global infimum
(negative for the valley-shaped ones). Quantized activations (Brevitas ``QuantReLU``/``QuantIdentity``) are not Lipschitz: rounding
to a grid of step ``s`` can move an output by up to one step more than its input moved, so they carry
an additive slack ``quant_step`` (``|Q(a) - Q(b)| <= K |a - b| + s`` whenever ``a != b``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor

from hwrel.valleys import VALLEYS, valley_image, valley_slope

INF = math.inf


@dataclass(frozen=True)
class Activation:
    """An elementwise activation: monotone non-decreasing, or valley-shaped (see the module doc).

    Attributes:
        kind: name of the rule ("relu", "sigmoid", ...).
        lipschitz: global Lipschitz constant ``K`` (sup of ``|phi'|``).
        lo, hi: range of the function (may be infinite).
        params: kind-specific parameters (negative slope, clip limits).
        quant_step: additive rounding slack of a quantized activation (0 for float ones).
        fn: the function itself, applied to tensors (exactly what the model computes).
        slope_lo: a global lower bound on ``phi'`` (0 for the monotone ones).
    """

    kind: str
    lipschitz: float
    lo: float
    hi: float
    params: tuple[float, ...] = ()
    quant_step: float = 0.0
    fn: Callable[[Tensor], Tensor] = field(default=lambda x: x, compare=False, repr=False)
    slope_lo: float = 0.0

    @property
    def monotone(self) -> bool:
        """Non-decreasing over the whole real line."""
        return self.kind not in VALLEYS

    @property
    def bounded(self) -> bool:
        return math.isfinite(self.lo) and math.isfinite(self.hi)

    @property
    def max_abs(self) -> float:
        """sup |phi| over the whole real line (may be inf)."""
        return max(abs(self.lo), abs(self.hi))

    def __call__(self, x: Tensor) -> Tensor:
        return self.fn(x)

    def image(self, lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor]:
        """Sound interval image: ``[phi(lo), phi(hi)]`` if monotone (exact); valley-shaped: the
        minimum value (padded down) joins when the interval reaches its minimum point."""
        if self.kind in VALLEYS:
            return valley_image(VALLEYS[self.kind], self.fn, lo, hi)
        if self.kind == "quant" and lo.dtype != torch.float32:
            return (self.fn(_outward32(lo, True)).to(lo.dtype), self.fn(_outward32(hi, False)).to(hi.dtype))
        return self.fn(lo), self.fn(hi)

    def slope_sup(self, lo: Tensor, hi: Tensor) -> Tensor:
        """Sound upper bound on ``sup |phi'|`` over ``[lo, hi]``, elementwise (a local Lipschitz constant)."""
        return _SLOPE_RULES[self.kind](self, lo, hi)


def _bell(deriv: Callable[[Tensor], Tensor]):
    # derivative is unimodal with its peak at 0: sup over [lo, hi] is at the point of [lo, hi] nearest 0
    def rule(act: Activation, lo: Tensor, hi: Tensor) -> Tensor:
        return deriv(torch.clamp(torch.zeros_like(lo), lo, hi))

    return rule


def _window(a: float, b: float, slope: float):
    # piecewise linear with slope `slope` on (a, b) and flat outside
    def rule(act: Activation, lo: Tensor, hi: Tensor) -> Tensor:
        active = (hi > a) & (lo < b)
        return torch.where(active, torch.full_like(lo, slope), torch.zeros_like(lo))

    return rule


def _relu_slope(act: Activation, lo: Tensor, hi: Tensor) -> Tensor:
    return (hi > 0).to(lo.dtype)


def _leaky_slope(act: Activation, lo: Tensor, hi: Tensor) -> Tensor:
    neg = act.params[0]
    up = torch.where(hi > 0, torch.ones_like(lo), torch.zeros_like(lo))
    down = torch.where(lo < 0, torch.full_like(lo, abs(neg)), torch.zeros_like(lo))
    return torch.maximum(up, down)


def _const_slope(act: Activation, lo: Tensor, hi: Tensor) -> Tensor:
    return torch.full_like(lo, act.lipschitz)


def _clip_slope(act: Activation, lo: Tensor, hi: Tensor) -> Tensor:
    a, b = act.params
    return _window(a, b, act.lipschitz)(act, lo, hi)


def _sigmoid_d(x: Tensor) -> Tensor:
    s = torch.sigmoid(x)
    return s * (1 - s)


def _tanh_d(x: Tensor) -> Tensor:
    return 1 - torch.tanh(x) ** 2


_SLOPE_RULES = {
    "identity": _const_slope,
    "quant": _const_slope,
    "relu": _relu_slope,
    "leaky_relu": _leaky_slope,
    "relu6": lambda act, lo, hi: _window(0.0, 6.0, 1.0)(act, lo, hi),
    "hardtanh": _clip_slope,
    "hardsigmoid": lambda act, lo, hi: _window(-3.0, 3.0, 1.0 / 6.0)(act, lo, hi),
    "sigmoid": _bell(_sigmoid_d),
    "tanh": _bell(_tanh_d),
}
_SLOPE_RULES.update({k: (lambda k: lambda act, lo, hi: valley_slope(VALLEYS[k], lo, hi))(k) for k in VALLEYS})


# Constructors, one per supported activation.

def identity() -> Activation:
    return Activation("identity", 1.0, -INF, INF, fn=lambda x: x)


def relu() -> Activation:
    return Activation("relu", 1.0, 0.0, INF, fn=torch.relu)


def relu6() -> Activation:
    return Activation("relu6", 1.0, 0.0, 6.0, fn=lambda x: torch.clamp(x, 0.0, 6.0))


def leaky_relu(negative_slope: float) -> Activation:
    # negative slopes would make it non-monotone; extraction rejects them
    k = max(1.0, negative_slope)
    lo = 0.0 if negative_slope == 0 else -INF
    return Activation("leaky_relu", k, lo, INF, (negative_slope,),
                      fn=lambda x: torch.nn.functional.leaky_relu(x, negative_slope))


def sigmoid() -> Activation:
    return Activation("sigmoid", 0.25, 0.0, 1.0, fn=torch.sigmoid)


def tanh() -> Activation:
    return Activation("tanh", 1.0, -1.0, 1.0, fn=torch.tanh)


def hardsigmoid() -> Activation:
    return Activation("hardsigmoid", 1.0 / 6.0, 0.0, 1.0, fn=torch.nn.functional.hardsigmoid)


def hardtanh(min_val: float = -1.0, max_val: float = 1.0) -> Activation:
    return Activation("hardtanh", 1.0, min_val, max_val, (min_val, max_val),
                      fn=lambda x: torch.clamp(x, min_val, max_val))


def _valley(kind: str, fn: Callable[[Tensor], Tensor]) -> Activation:
    v = VALLEYS[kind]
    return Activation(kind, v.lipschitz, v.v_min, INF, fn=fn, slope_lo=v.slope_lo)


def gelu(approximate: str = "none") -> Activation:
    """GELU, exact (``x Phi(x)``) or its tanh approximation, as ``torch.nn.functional.gelu`` computes it."""
    if approximate == "tanh":
        return _valley("gelu_tanh", lambda x: torch.nn.functional.gelu(x, approximate="tanh"))
    if approximate != "none":
        raise ValueError(f"GELU approximate={approximate!r}: expected 'none' or 'tanh'")
    return _valley("gelu", torch.nn.functional.gelu)


def silu() -> Activation:
    return _valley("silu", torch.nn.functional.silu)


def mish() -> Activation:
    return _valley("mish", torch.nn.functional.mish)


def hardswish() -> Activation:
    return _valley("hardswish", torch.nn.functional.hardswish)


def quantized(fn: Callable[[Tensor], Tensor], lipschitz: float, lo: float, hi: float,
              step: float) -> Activation:
    """A quantizing activation (Brevitas): monotone, ``|Q(a)-Q(b)| <= K|a-b| + step`` if ``a != b``.

    The quantizer runs in float32 as in the model; a float64 interval end is first rounded
    outward to float32 so that the image stays sound.
    """
    def call(x: Tensor) -> Tensor:
        if x.dtype == torch.float32:
            return fn(x)
        return fn(x.float()).to(x.dtype)

    act = Activation("quant", lipschitz, lo, hi, quant_step=step, fn=call)
    return act


def _outward32(x: Tensor, down: bool) -> Tensor:
    x32 = x.float()
    if x.dtype == torch.float32:
        return x32
    bad = x32.double() > x.double() if down else x32.double() < x.double()
    toward = torch.full_like(x32, -math.inf if down else math.inf)
    return torch.where(bad, torch.nextafter(x32, toward), x32)
