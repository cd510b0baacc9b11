"""Shape facts of the valley-shaped activations (GELU, GELU-tanh, SiLU, Mish, Hardswish).

Each ``phi`` here is non-increasing on ``(-inf, x*]`` and non-decreasing on ``[x*, inf)``, so the
image of ``[lo, hi]`` is ``[min(phi(lo), phi(hi), phi(x*) if x* in [lo, hi]), max(phi(lo), phi(hi))]``;
``phi'`` is monotone between consecutive zeros of ``phi''`` (its *critical points*), so
``sup |phi'|`` over ``[lo, hi]`` is the max of ``|phi'|`` at the ends and at the critical points inside.

The smooth ones' ``x*`` and critical points are found once, on first use, by a float64 grid scan of
``[-GRID, GRID]`` (step 1e-3) for sign changes of ``phi'`` / ``phi''`` (``phi''`` by autograd of the
closed-form ``phi'``) refined by 200 bisections; beyond the grid every one of them is in its
asymptotic regime (``phi'`` monotone towards 0 or 1). Hardswish is piecewise quadratic and given in
closed form. Guarantee: sound up to the padding — a point within ``WINDOW`` of the interval counts
as inside, the minimum value is padded down and every ``|phi'|`` value up by ``PAD`` (absolute) —
which dwarfs the float64 error of the root finding (~1e-15).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from collections.abc import Iterator, Mapping
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

GRID, STEP = 20.0, 1e-3
WINDOW = 1e-6  # a point this close to [lo, hi] counts as inside
PAD = 1e-9  # absolute padding of the minimum value (down) and of |phi'| values (up)
_C = math.sqrt(2.0 / math.pi)
_A = 0.044715


@dataclass(frozen=True)
class Valley:
    """``x_min``: the minimum point; ``v_min``: a value ``<= min phi`` (padded); ``d1``: ``phi'`` on
    tensors; ``crit``: ``(x, sup |phi'| near x)`` per critical point of ``phi'`` (padded up);
    ``lipschitz``/``slope_lo``: global ``sup |phi'|`` / ``<= inf phi'``; ``curvature``: ``>= sup |phi''|``
    (``inf`` where ``phi'`` jumps)."""

    x_min: float
    v_min: float
    d1: Callable[[Tensor], Tensor]
    crit: tuple[tuple[float, float], ...]
    lipschitz: float
    slope_lo: float
    curvature: float


def gelu_d1(x: Tensor) -> Tensor:
    return 0.5 * (1 + torch.erf(x / math.sqrt(2.0))) + x * torch.exp(-x * x / 2) / math.sqrt(2 * math.pi)


def gelu_tanh_d1(x: Tensor) -> Tensor:
    t = torch.tanh(_C * (x + _A * x ** 3))
    return 0.5 * (1 + t) + 0.5 * x * (1 - t * t) * _C * (1 + 3 * _A * x * x)


def silu_d1(x: Tensor) -> Tensor:
    s = torch.sigmoid(x)
    return s * (1 + x * (1 - s))


def mish_d1(x: Tensor) -> Tensor:
    t = torch.tanh(F.softplus(x))
    return t + x * (1 - t * t) * torch.sigmoid(x)


def hardswish_d1(x: Tensor) -> Tensor:
    mid = (2 * x + 3) / 6
    return torch.where(x < -3, torch.zeros_like(x), torch.where(x > 3, torch.ones_like(x), mid))


def _roots(f: Callable[[Tensor], Tensor]) -> list[float]:
    """Sign changes of ``f`` on the grid, each refined by bisection (float64)."""
    x = torch.arange(-GRID, GRID + STEP / 2, STEP, dtype=torch.float64)
    y = f(x)
    idx = torch.nonzero((torch.sign(y[:-1]) * torch.sign(y[1:])) < 0).flatten().tolist()
    out = []
    for i in idx:
        a, b = float(x[i]), float(x[i + 1])
        fa = float(f(torch.tensor([a], dtype=torch.float64)))
        for _ in range(200):
            m = (a + b) / 2
            fm = float(f(torch.tensor([m], dtype=torch.float64)))
            if (fm < 0) == (fa < 0):
                a, fa = m, fm
            else:
                b = m
        out.append((a + b) / 2)
    return out


def _second(d1: Callable[[Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
    def d2(x: Tensor) -> Tensor:
        with torch.enable_grad():
            x = x.detach().clone().requires_grad_(True)
            (g,) = torch.autograd.grad(d1(x).sum(), x)
        return g.detach()

    return d2


def _smooth(fn: Callable[[Tensor], Tensor], d1: Callable[[Tensor], Tensor], name: str) -> Valley:
    zeros = _roots(d1)
    if len(zeros) != 1:
        raise AssertionError(f"{name}: phi' changes sign {len(zeros)} times on the grid, expected once")
    x_min = zeros[0]
    v_min = float(fn(torch.tensor([x_min], dtype=torch.float64))) - PAD
    d2 = _second(d1)
    crit = tuple((c, abs(float(d1(torch.tensor([c], dtype=torch.float64)))) + PAD) for c in _roots(d2))
    vals = [float(d1(torch.tensor([c], dtype=torch.float64))) for c, _ in crit]
    lip = max([1.0] + [k for _, k in crit])
    slope_lo = min([0.0] + vals) - PAD
    grid = torch.arange(-GRID, GRID + STEP / 2, STEP, dtype=torch.float64)
    curv = float(d2(grid).abs().max()) + 1e-2  # |phi'''| < 2 for all of them: grid miss < 1e-3
    return Valley(x_min, v_min, d1, crit, lip, slope_lo, curv)


def _gelu_tanh(x: Tensor) -> Tensor:
    return F.gelu(x, approximate="tanh")


_HARDSWISH = Valley(-1.5, -0.375 - PAD, hardswish_d1, ((-3.0, 0.5 + PAD), (3.0, 1.5 + PAD)),
                    1.5 + PAD, -0.5 - PAD, math.inf)  # x relu6(x + 3) / 6: minimum -3/8 at -3/2; phi' = (2x + 3)/6 on (-3, 3)


class _Valleys(Mapping[str, Valley]):
    """The valleys by activation name, each computed on first use: the grid scans take about a
    second together, and most commands (injection, a ReLU model's bounds) never need them."""

    _MAKERS: dict[str, Callable[[], Valley]] = {
        "gelu": lambda: _smooth(F.gelu, gelu_d1, "gelu"),
        "gelu_tanh": lambda: _smooth(_gelu_tanh, gelu_tanh_d1, "gelu_tanh"),
        "silu": lambda: _smooth(F.silu, silu_d1, "silu"),
        "mish": lambda: _smooth(F.mish, mish_d1, "mish"),
        "hardswish": lambda: _HARDSWISH,
    }

    def __init__(self) -> None:
        self._done: dict[str, Valley] = {}

    def __getitem__(self, kind: str) -> Valley:
        if kind not in self._done:
            self._done[kind] = self._MAKERS[kind]()
        return self._done[kind]

    def __contains__(self, kind: object) -> bool:  # without computing it
        return kind in self._MAKERS

    def __iter__(self) -> Iterator[str]:
        return iter(self._MAKERS)

    def __len__(self) -> int:
        return len(self._MAKERS)


VALLEYS: Mapping[str, Valley] = _Valleys()


def valley_image(v: Valley, fn: Callable[[Tensor], Tensor], lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor]:
    """Sound interval image of ``[lo, hi]`` (elementwise); the ends' values are widened by 8 ulps
    of their dtype (``fn`` is not correctly rounded and need not be monotone to the last bit)."""
    a, b = fn(lo), fn(hi)
    eps = 8 * torch.finfo(lo.dtype).eps if lo.is_floating_point() else 0.0
    top = torch.maximum(a, b)
    top = top + eps * top.abs()
    bottom = torch.minimum(a, b)
    bottom = bottom - eps * bottom.abs()
    near = (lo <= v.x_min + WINDOW) & (hi >= v.x_min - WINDOW)
    return torch.where(near, torch.clamp(bottom, max=v.v_min), bottom), top


def valley_slope(v: Valley, lo: Tensor, hi: Tensor) -> Tensor:
    """Sound ``>= sup |phi'|`` over ``[lo, hi]`` (elementwise)."""
    k = torch.maximum(v.d1(lo).abs(), v.d1(hi).abs()) * (1 + 1e-12) + PAD
    for c, kc in v.crit:
        near = (lo <= c + WINDOW) & (hi >= c - WINDOW)
        k = torch.where(near, torch.clamp(k, min=kc), k)
    return k
