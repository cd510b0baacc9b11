"""Per-operation bound rules for general graphs: LayerNorm, softmax, attention, products, ...

Each rule is a pure function from :class:`Val` inputs to a :class:`Val` output. A ``Val`` holds,
elementwise and batched over boxes (leading dimension):

- ``lo, hi``: the exact clean values of the node lie in ``[lo, hi]``;
- ``e``: the faulty float32 forward differs from the exact clean value by at most ``e``;
- ``extra, f``: a failing layer, whose up to ``f`` failed neurons may each be off by ``e + extra``
  (the next linear layer takes each receiver's worst ``f`` senders; any other consumer resolves it
  to ``e + extra`` elementwise, which is sound whichever neurons fail).

Soundness arguments (mean value theorem on each output coordinate, along the segment from the
clean to the faulty input, which lies in the faulty box ``[lo - e, hi + e]``):

- product ``x y``: ``|x'y' - xy| <= |x'| |y' - y| + |x' - x| |y|`` (also for matmul, summed);
- softmax ``p = softmax(s)``: ``dp_i/ds_j = p_i (delta_ij - p_j)``, so
  ``|dp_i| <= p_i (1 - p_i) (e_i + max_{j != i} e_j)`` with ``p_i`` over the faulty box;
- LayerNorm ``y = gamma xhat + beta``, ``xhat = (x - mean) / s``, ``s = sqrt(var + eps)``:
  ``dxhat_i/dx_j = (delta_ij - 1/n - xhat_i xhat_j / n) / s``, so with ``||xhat||_2 <= sqrt(n)``,
  ``|dy_i| <= |gamma_i| / s_min (e_i + mean(e) + |xhat_i|_max ||e||_2 / sqrt(n))``; the standard
  deviation over a box of centre ``c`` and radius ``r`` is within ``||r||_2 / sqrt(n)`` of
  ``std(c)`` (the centring map is a projection), and ``|xhat_i| <= sqrt(n - 1)`` always;
- an additive attention mask (``baddbmm``, :func:`masked_matmul`): ``-inf`` entries are exactly
  ``-inf`` in both forwards and the softmax gives them exactly 0; finite entries shift the interval;
- max pool (:func:`max_pool`): monotone and 1-Lipschitz in the max norm, exact in float32;
- every error is also capped by the width of the output's faulty interval.

Float32 rounding (same assumptions and ``SAFETY`` factor as :mod:`hwrel.bounds.fp32`; the
LayerNorm, softmax and attention terms assume any summation order and blocking, one-pass or
two-pass moments, and ``exp``/``rsqrt`` within 8 ulps; tests check them against float64 on
ill-conditioned inputs). The intervals are of the *exact* clean values, and ``e`` bounds the
float32 faulty forward's distance from them: every rule adds its own rounding (how far one float32
evaluation lands from the exact value, given magnitudes that cover the clean and the faulty
inputs) to ``e`` everywhere. The float32 clean forward is the same computation with no failures,
so ``|faulty32 - clean32| <= e(failures) + e(no failures)`` (:func:`hwrel.bounds.graph.graph_bound`
adds the two). Propagating rounding as an error, with the local slopes, keeps it first-order on a
point: widening the intervals by it instead compounds it exponentially through LayerNorm and
attention.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import Tensor

from hwrel.bounds.fp32 import SAFETY, TINY, U, gamma

EXP_ULPS = 8.0


@dataclass
class Val:
    """Bounds on one tensor of the graph (see the module doc). Float64, batch dimension first."""

    lo: Tensor
    hi: Tensor
    e: Tensor
    extra: Tensor | None = None
    f: int = 0
    l2: Tensor | None = None  # (..., 1): bounds the l2 norm over the last dimension of the error

    def row_l2(self) -> Tensor:
        """A bound on ``||faulty - clean||_2`` over the last dimension, ``(..., 1)``."""
        box = self.resolved().norm(dim=-1, keepdim=True)
        return box if self.l2 is None else torch.minimum(box, self.l2)

    @staticmethod
    def const(t: Tensor) -> "Val":
        t = t.double()
        return Val(t, t, torch.zeros_like(t))

    @property
    def shape(self) -> torch.Size:
        return self.lo.shape

    @property
    def exact(self) -> bool:
        """A constant: one value, no error (computed by the model itself, not bounded)."""
        return self.extra is None and bool((self.lo == self.hi).all()) and not bool(self.e.any())

    def resolved(self) -> Tensor:
        return self.e if self.extra is None else self.e + self.extra

    def mag(self) -> Tensor:
        """Bounds ``|value|`` in the clean forward."""
        return torch.maximum(self.lo.abs(), self.hi.abs())

    def fmag(self) -> Tensor:
        """Bounds ``|value|`` in the clean and the faulty forward."""
        return self.mag() + self.resolved()

    def faulty_box(self) -> tuple[Tensor, Tensor]:
        r = self.resolved()
        return self.lo - r, self.hi + r

    def map(self, fn) -> "Val":  # noqa: ANN001 - an index map (reshape, permute, slice, ...): exact
        extra = None if self.extra is None else fn(self.extra)
        return Val(fn(self.lo), fn(self.hi), fn(self.e), extra, self.f)

    def plain(self) -> "Val":
        """The same bounds with a failing layer's pending error resolved elementwise."""
        return self if self.extra is None else Val(self.lo, self.hi, self.resolved(), l2=self.row_l2())


EXACT = "exact"  # intervals of exact values; e from the exact clean value, rounding added everywhere
RECORDED = "recorded"  # points: the clean float32 values recorded; rounding only where a fault reaches
_mode = [EXACT]


@contextmanager
def rounding_mode(mode: str) -> Iterator[None]:
    """How the rules account for float32 rounding (see the module doc); ``EXACT`` by default."""
    _mode.append(mode)
    try:
        yield
    finally:
        _mode.pop()


def finish(lo: Tensor, hi: Tensor, e: Tensor, rounding: Tensor | float) -> Val:
    """The rule's exact-arithmetic bounds plus its float32 ``rounding`` (see the module doc)."""
    e = e.expand_as(lo)
    if _mode[-1] == RECORDED:
        # both forwards round once here where their inputs differ; the interval is widened too,
        # so that it holds the float32 value of a stage the interpreter has no record of (inside
        # attention or a norm module); recorded nodes get their recorded value after the rule
        r = torch.as_tensor(rounding, dtype=lo.dtype).expand_as(lo)
        return Val(lo - r, hi + r, e + 2 * r * (e > 0))
    return Val(lo, hi, e + rounding)


def with_l2(out: Val, before: Tensor, l2: Tensor) -> Val:
    """``out`` (after :func:`finish`) with the row bound ``l2`` of the rule's error ``before`` the
    rounding, plus the l2 norm of the rounding added (and never above the box's own norm)."""
    added = (out.e - before.expand_as(out.e)).clamp_min(0).norm(dim=-1, keepdim=True)
    out.l2 = torch.minimum(l2 + added, out.e.norm(dim=-1, keepdim=True))
    return out


def _cap(e: Tensor, lo_f: Tensor, hi_f: Tensor) -> Tensor:
    return torch.minimum(e, hi_f - lo_f)


# --- elementwise ------------------------------------------------------------------------------

def add(a: Val, b: Val, sign: float = 1.0) -> Val:
    """``a + b`` (``sign=-1``: ``a - b``), broadcasting; one rounding of the result. A failing layer
    plus a tensor with none, which it is not broadcast against (``tanh(.) + 1`` in a written-out
    GELU, a bias), stays a failing layer: elementwise, still at most ``f`` entries carry ``extra``."""
    failing = a if a.extra is not None and b.extra is None else b if b.extra is not None and a.extra is None else None
    if failing is not None and torch.broadcast_shapes(a.shape, b.shape) == failing.shape:
        lo = a.lo + (b.lo if sign > 0 else -b.hi)
        hi = a.hi + (b.hi if sign > 0 else -b.lo)
        out = Val(lo, hi, (a.e + b.e).expand_as(lo).clone(), failing.extra, failing.f)
        r = (SAFETY * U * (a.fmag() + b.fmag()) + TINY).expand_as(lo)  # magnitudes with the failure
        if _mode[-1] == RECORDED:
            out.lo, out.hi, out.e = out.lo - r, out.hi + r, out.e + 2 * r * (out.e + out.extra > 0)
        else:
            out.e = out.e + r
        return out
    a, b = a.plain(), b.plain()
    lo = a.lo + (b.lo if sign > 0 else -b.hi)
    hi = a.hi + (b.hi if sign > 0 else -b.lo)
    e = (a.e + b.e).expand_as(lo)
    r = SAFETY * U * (a.fmag() + b.fmag()) + TINY
    out = finish(lo, hi, e, r.expand_as(lo))
    if a.lo.dim() and b.lo.dim() and a.shape[-1] == b.shape[-1] == lo.shape[-1]:  # rows not broadcast: norms add
        out = with_l2(out, e, (a.row_l2() + b.row_l2()).expand(*lo.shape[:-1], 1))
    return out


def scale(a: Val, c: Tensor | float) -> Val:
    """``a * c`` for a constant ``c`` (a number or a tensor that broadcasts); one rounding."""
    c = torch.as_tensor(c, dtype=a.lo.dtype)
    if a.extra is not None and torch.broadcast_shapes(a.shape, c.shape) == a.shape:
        # elementwise, so still at most f entries carry a failure: the top-f form is kept
        s = c.abs()
        x, y = a.lo * c, a.hi * c
        out = Val(torch.minimum(x, y), torch.maximum(x, y), a.e * s, a.extra * s, a.f)
        r = SAFETY * U * a.fmag() * s + TINY
        if _mode[-1] == RECORDED:
            out.lo, out.hi, out.e = out.lo - r, out.hi + r, out.e + 2 * r * (out.e + out.extra > 0)
        else:
            out.e = out.e + r
        return out
    a = a.plain()
    x, y = a.lo * c, a.hi * c
    lo, hi = torch.minimum(x, y), torch.maximum(x, y)
    e = (a.e * c.abs()).expand_as(lo)
    r = SAFETY * U * a.fmag() * c.abs() + TINY
    return finish(lo, hi, e, r.expand_as(lo))


def mul(a: Val, b: Val) -> Val:
    """Elementwise product of two bounded tensors (gating, SwiGLU). A failing layer times a tensor
    with none stays a failing layer (elementwise: still at most ``f`` entries carry ``extra``):
    ``|x'y' - xy| <= base + extra |y'|`` for a failed entry."""
    if b.extra is not None and a.extra is None:
        a, b = b, a
    if a.extra is not None and b.extra is None and a.shape == torch.broadcast_shapes(a.shape, b.shape):
        out = mul(Val(a.lo, a.hi, a.e), b)
        out.extra, out.f = a.extra * b.fmag() * (1 + 4 * SAFETY * U), a.f
        return out
    a, b = a.plain(), b.plain()
    corners = torch.stack(torch.broadcast_tensors(a.lo * b.lo, a.lo * b.hi, a.hi * b.lo, a.hi * b.hi))
    lo, hi = corners.amin(0), corners.amax(0)
    e = a.fmag() * b.e + a.e * b.mag()
    r = SAFETY * U * a.fmag() * b.fmag() + TINY
    return finish(lo, hi, e.expand_as(lo), r.expand_as(lo))


def activation(act, a: Val, ulps_rounding) -> Val:  # noqa: ANN001 - hwrel.activations.Activation
    """An elementwise activation: image and slope over the faulty box (the rules of
    :mod:`hwrel.bounds.interval`); ``ulps_rounding(in_mag, out_mag)`` is its float32 rounding."""
    a = a.plain()
    lo, hi = act.image(a.lo, a.hi)
    flo, fhi = act.image(*a.faulty_box())
    k = act.slope_sup(*a.faulty_box())
    e = torch.minimum(k * a.e + act.quant_step * (a.e > 0), fhi - flo)
    out_mag = torch.maximum(flo.abs(), fhi.abs())
    return finish(lo, hi, e, ulps_rounding(a.fmag(), out_mag))


def power2(a: Val) -> Val:
    """``x ** 2``: ``|x'^2 - x^2| = |x' + x| |x' - x|``."""
    a = a.plain()
    lo2, hi2 = a.lo ** 2, a.hi ** 2
    lo = torch.where((a.lo <= 0) & (a.hi >= 0), torch.zeros_like(lo2), torch.minimum(lo2, hi2))
    hi = torch.maximum(lo2, hi2)
    e = (2 * a.mag() + a.e) * a.e
    return finish(lo, hi, e, SAFETY * U * a.fmag() ** 2 + TINY)


def power3(a: Val) -> Val:
    """``x ** 3`` (the tanh GELU written out, GPT-2's ``gelu_new``): increasing, so the interval is
    the cubes of the ends; ``|x'^3 - x^3| = |x' - x| |x'^2 + x' x + x^2|`` with ``|x'|`` up to the
    faulty box's magnitude. Rounding: at most two float32 products (``x * x * x``) or one ``pow``
    within an ulp, ``<= 2u |x|^3`` before ``SAFETY``."""
    a = a.plain()
    m, fm = a.mag(), a.fmag()
    e = (fm * fm + fm * m + m * m) * a.e
    return finish(a.lo ** 3, a.hi ** 3, e, SAFETY * 2 * U * fm ** 3 + TINY)


def rsqrt(a: Val) -> Val:
    """``1 / sqrt(x)``, decreasing and convex on ``x > 0``; unbounded (inf) where ``x`` may be <= 0."""
    a = a.plain()
    inf = torch.full_like(a.lo, math.inf)
    pos = a.lo > 0
    lo = torch.where(a.hi > 0, a.hi.clamp_min(1e-300).rsqrt(), inf)
    hi = torch.where(pos, a.lo.clamp_min(1e-300).rsqrt(), inf)
    flo_in = a.lo - a.e
    fpos = flo_in > 0
    slope = torch.where(fpos, 0.5 * flo_in.clamp_min(1e-300) ** -1.5, inf)
    f_hi = torch.where(fpos, flo_in.clamp_min(1e-300).rsqrt(), inf)
    e = torch.where(a.e > 0, torch.minimum(slope * a.e, f_hi - (a.hi + a.e).rsqrt()), torch.zeros_like(a.e))
    return finish(lo, hi, e, SAFETY * EXP_ULPS * U * f_hi + TINY)


def max_pool(a: Val, pool, reach: int) -> Val:  # noqa: ANN001 - torch's pool, applied to each part
    """A max pool: monotone, so its interval is the pool of the bounds; 1-Lipschitz in the max
    norm (``|max x' - max x| <= max |x' - x|``), so its error is the window's largest ``e``;
    exact in float32 (a max rounds nothing). Padding is ``-inf``, which no bound reaches. A failing
    layer stays one: each input lies in at most ``reach`` windows, so at most ``reach * f`` outputs
    see a failed input, each off by at most the window's largest ``e + extra``."""
    if a.extra is None:
        return Val(pool(a.lo), pool(a.hi), pool(a.e))
    e = pool(a.e)
    return Val(pool(a.lo), pool(a.hi), e, (pool(a.resolved()) - e).clamp_min(0), a.f * reach)


# --- reductions and products ------------------------------------------------------------------

def mean(a: Val, dim: int, keepdim: bool) -> Val:
    """Mean over ``dim``: a positive linear map; a sum of ``n`` terms and one division. Over the
    last dimension a failing layer's at most ``f`` failed entries per row (a row lies in one
    sample, as for a linear layer) add at most the ``f`` largest ``extra`` over ``n``."""
    if dim % len(a.shape) != len(a.shape) - 1:
        a = a.plain()
    n = a.shape[dim]
    lo, hi, e = (t.mean(dim, keepdim=keepdim) for t in (a.lo, a.hi, a.e))
    if a.extra is not None:
        from hwrel.bounds.interval import topsum

        pending = topsum(a.extra, a.f, dim) / n
        e = e + (pending.unsqueeze(dim) if keepdim else pending)
    r = gamma(n + 1) * a.fmag().mean(dim, keepdim=keepdim) + TINY
    return finish(lo, hi, e, r)


def matmul(a: Val, b: Val) -> Val:
    """``a @ b`` of two bounded tensors (attention scores, attention times values); either may be a
    constant. Interval in centre/radius form; error ``|a'| e_b + e_a |b|`` summed over ``k``."""
    a, b = a.plain(), b.plain()
    k = a.shape[-1]
    ac, ar = (a.hi + a.lo) / 2, (a.hi - a.lo) / 2
    bc, br = (b.hi + b.lo) / 2, (b.hi - b.lo) / 2
    c = ac @ bc
    rad = ac.abs() @ br + ar @ bc.abs() + ar @ br
    e = a.fmag() @ b.e + a.e @ b.mag()
    r = gamma(k + 1) * (a.fmag() @ b.fmag()) + (k + 1) * TINY
    return finish(c - rad, c + rad, e, r)


def masked_matmul(a: Val, b: Val, c: Tensor) -> Val:
    """``c + a @ b`` for a constant ``c`` that broadcasts (``torch.baddbmm``, as attention adds
    its mask): where ``c = -inf`` the entry is exactly ``-inf`` in both forwards (``lo = hi = -inf``,
    ``e = 0``: :func:`softmax` reads it as masked); elsewhere the product's bounds shifted by ``c``,
    plus, where ``c != 0``, the rounding of a sum of ``k + 1`` terms in any order (fused or not)."""
    out = matmul(a, b)
    c = c.double()
    neg = torch.isneginf(c)
    fin = c.masked_fill(neg, 0.0)
    if bool((fin != 0).any()):
        k = a.shape[-1]
        r = (gamma(k + 2) * (a.fmag() @ b.fmag() + fin.abs()) + TINY) * (fin != 0)
        out = finish(out.lo + fin, out.hi + fin, out.e, r.expand_as(out.lo))
    neg = neg.expand_as(out.lo)
    return Val(out.lo.masked_fill(neg, -math.inf), out.hi.masked_fill(neg, -math.inf), out.e.masked_fill(neg, 0.0))


def _p_interval(lo: Tensor, hi: Tensor, masked: Tensor | None) -> tuple[Tensor, Tensor]:
    """Sound softmax interval over the last dimension: ``p_i`` is least with ``s_i`` at ``lo`` and
    every other score at ``hi`` (and most the other way round); masked entries are exactly 0."""
    n = lo.shape[-1]
    eye = torch.eye(n, dtype=torch.bool, device=lo.device)
    if masked is not None:
        lo, hi = lo.masked_fill(masked, -math.inf), hi.masked_fill(masked, -math.inf)
    # row i of the last two dimensions: entry j is s_j's extreme for j != i and s_i's for j == i
    worst = torch.where(eye, lo.unsqueeze(-1), hi.unsqueeze(-2))  # (..., i, j)
    best = torch.where(eye, hi.unsqueeze(-1), lo.unsqueeze(-2))
    p_lo = torch.exp(lo - torch.logsumexp(worst, -1))
    p_hi = torch.exp(hi - torch.logsumexp(best, -1))
    if masked is not None:
        p_lo, p_hi = p_lo.masked_fill(masked, 0.0), p_hi.masked_fill(masked, 0.0)
    return p_lo.clamp(0, 1), p_hi.clamp(0, 1)


def softmax(a: Val, masked: Tensor | None = None) -> Val:
    """Softmax over the last dimension; ``masked`` (bool, broadcasts): entries set to ``-inf``
    before it (a causal or padding mask), which are exactly 0 in both forwards, as are entries
    that are exactly ``-inf`` in both (``lo = hi = -inf``, ``e = 0``: :func:`masked_matmul`'s)."""
    a = a.plain()
    n = a.shape[-1]
    minus_inf = torch.isneginf(a.lo) & torch.isneginf(a.hi) & (a.e == 0)
    if bool(minus_inf.any()):
        masked = minus_inf if masked is None else masked.expand_as(a.lo) | minus_inf
        a = Val(a.lo.masked_fill(masked, 0.0), a.hi.masked_fill(masked, 0.0), a.e)
    if masked is not None:
        masked = masked.expand_as(a.lo)
    lo, hi = _p_interval(a.lo, a.hi, masked)
    flo, fhi = _p_interval(*a.faulty_box(), masked)
    q = torch.where((flo <= 0.5) & (fhi >= 0.5), torch.full_like(flo, 0.25),
                    torch.maximum(flo * (1 - flo), fhi * (1 - fhi)))
    e_in = a.e if masked is None else a.e.masked_fill(masked, 0.0)
    other = _max_other(e_in)
    e = _cap(q * (e_in + other), flo, fhi)
    # float32: x - max rounds relative to |x - max| (<= the score spread), exp within EXP_ULPS,
    # the sum of n terms, the division; all relative to p_i
    flo_s, fhi_s = a.faulty_box()
    top = (fhi_s if masked is None else fhi_s.masked_fill(masked, -math.inf)).amax(-1, keepdim=True)
    spread = (top - flo_s).clamp_min(0)
    if masked is not None:
        spread = spread.masked_fill(masked, 0.0)
    rel = SAFETY * (EXP_ULPS + 3 + spread) * U + gamma(n)
    r = rel * fhi + TINY
    if masked is not None:
        r = r.masked_fill(masked, 0.0)
    return finish(lo, hi, e, r)


def _max_other(e: Tensor) -> Tensor:
    """Per entry, the largest ``e`` of the other entries of its row (last dimension)."""
    if e.shape[-1] == 1:
        return torch.zeros_like(e)
    top2 = torch.topk(e, 2, dim=-1).values
    first, second = top2[..., :1], top2[..., 1:2]
    return torch.where(e >= first, second, first).expand_as(e)


def _row_std_bounds(c: Tensor, r: Tensor) -> tuple[Tensor, Tensor]:
    """Bounds on the (population) standard deviation of rows ``x`` with ``|x - c| <= r``."""
    n = c.shape[-1]
    s_c = (c - c.mean(-1, keepdim=True)).norm(dim=-1, keepdim=True)
    rn = r.norm(dim=-1, keepdim=True)
    return (s_c - rn).clamp_min(0) / math.sqrt(n), (s_c + rn) / math.sqrt(n)


def _xhat_interval(lo: Tensor, hi: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """Interval of the normalized ``(x - mean) / sqrt(var + eps)`` over a box (last dimension),
    and the box's least ``sqrt(var + eps)``."""
    n = lo.shape[-1]
    c, r = (hi + lo) / 2, (hi - lo) / 2
    dc = c - c.mean(-1, keepdim=True)
    dr = r * (1 - 1 / n) + (r.sum(-1, keepdim=True) - r) / n
    dl, dh = dc - dr, dc + dr
    sd_lo, sd_hi = _row_std_bounds(c, r)
    s_lo, s_hi = (sd_lo ** 2 + eps).sqrt(), (sd_hi ** 2 + eps).sqrt()
    xl = torch.where(dl >= 0, dl / s_hi, dl / s_lo)
    xh = torch.where(dh <= 0, dh / s_hi, dh / s_lo)
    cap = math.sqrt(max(n - 1, 0))
    return xl.clamp(-cap, cap), xh.clamp(-cap, cap), s_lo


def layer_norm(a: Val, weight: Tensor | None, bias: Tensor | None, eps: float) -> Val:
    """LayerNorm over the last dimension (``weight``/``bias`` of that size, or None)."""
    a = a.plain()
    n = a.shape[-1]
    g = torch.ones(n, dtype=a.lo.dtype) if weight is None else weight.double()
    b = torch.zeros(n, dtype=a.lo.dtype) if bias is None else bias.double()

    def affine(xl: Tensor, xh: Tensor) -> tuple[Tensor, Tensor]:
        y1, y2 = g * xl, g * xh
        return torch.minimum(y1, y2) + b, torch.maximum(y1, y2) + b

    xl, xh, _ = _xhat_interval(a.lo, a.hi, eps)
    lo, hi = affine(xl, xh)
    fxl, fxh, fs_lo = _xhat_interval(*a.faulty_box(), eps)
    l2 = a.row_l2()
    # the faulty rows are within ||r||_2 + l2 of the box centre: a tighter least std than the box's
    c, r0 = (a.hi + a.lo) / 2, (a.hi - a.lo) / 2
    sd_lo = ((c - c.mean(-1, keepdim=True)).norm(dim=-1, keepdim=True) - r0.norm(dim=-1, keepdim=True) - l2).clamp_min(0)
    fs_lo = torch.maximum(fs_lo, ((sd_lo / math.sqrt(n)) ** 2 + eps).sqrt())
    flo, fhi = affine(fxl, fxh)
    xmax = torch.maximum(fxl.abs(), fxh.abs())
    spread = a.e + a.e.mean(-1, keepdim=True) + xmax * l2 / math.sqrt(n)
    e = _cap(g.abs() / fs_lo * spread, flo, fhi)
    # float32: the mean within gamma_n mean|x|; the variance within (4n + 8) u mean(x^2) (one-pass,
    # two-pass or Welford moments); sqrt/rsqrt and eps a few ulps; then (x - mean) * rstd * g + b
    m = a.fmag()
    d_mu = gamma(n) * m.mean(-1, keepdim=True)
    d_var = SAFETY * (4 * n + 8) * U * (m ** 2).mean(-1, keepdim=True)
    rho = d_var / (2 * fs_lo ** 2) + SAFETY * EXP_ULPS * U
    dmag = m + m.mean(-1, keepdim=True) + d_mu
    r = g.abs() * ((dmag / fs_lo) * (rho + SAFETY * 3 * U) + d_mu / fs_lo) \
        + SAFETY * U * torch.maximum(flo.abs(), fhi.abs()) + TINY
    out = finish(lo, hi, e, r)
    # exact outputs have |y_i| <= |g_i| sqrt(n - 1) + |b_i|; a float32 one |g_i| x32 + |b_i| with x32
    # bounding |fl(xhat_i)| = |x_i - mean~| / sqrt(var~ + eps) given the moments' errors above
    # (var~ >= max(var - d_var, 0)): split at var = 2 d_var
    root = math.sqrt(max(n - 1, 0))
    x32 = torch.maximum((math.sqrt(2 * max(n - 1, 0)) * d_var.sqrt() + d_mu) / math.sqrt(eps),
                        math.sqrt(2) * root + d_mu / math.sqrt(eps)) * (1 + 8 * U)
    cap = g.abs() * (x32 + root) + 2 * b.abs() + TINY
    # the normalization's Jacobian (P - xhat xhat^T / n) / s has spectral norm <= 1 / s
    out = with_l2(out, e, g.abs().max() * l2 / fs_lo)
    out.e = torch.minimum(out.e, cap)
    return out


def rms_norm(a: Val, weight: Tensor | None, eps: float) -> Val:
    """``y = x / sqrt(mean(x^2) + eps) * weight`` over the last dimension (LLaMA's RMSNorm).

    ``dy_i/dx_j = (delta_ij - yhat_i yhat_j / n) / s`` with ``yhat = x / s``, ``||yhat||_2 <= sqrt(n)``,
    so ``|dy_i| <= |w_i| / s_min (e_i + |yhat_i|_max ||e||_2 / sqrt(n))``; the root mean square over
    a box of centre ``c`` and radius ``r`` is at least ``(||c||_2 - ||r||_2) / sqrt(n)``, and
    ``|yhat_i| <= sqrt(n)``."""
    a = a.plain()
    n = a.shape[-1]
    w = torch.ones(n, dtype=a.lo.dtype) if weight is None else weight.double()
    root = math.sqrt(n)

    def yhat(lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        c, r = (hi + lo) / 2, (hi - lo) / 2
        cn, rn = c.norm(dim=-1, keepdim=True), r.norm(dim=-1, keepdim=True)
        s_lo = (((cn - rn).clamp_min(0) / root) ** 2 + eps).sqrt()
        s_hi = (((cn + rn) / root) ** 2 + eps).sqrt()
        yl = torch.where(lo >= 0, lo / s_hi, lo / s_lo)
        yh = torch.where(hi <= 0, hi / s_hi, hi / s_lo)
        return yl.clamp(-root, root), yh.clamp(-root, root), s_lo

    def affine(yl: Tensor, yh: Tensor) -> tuple[Tensor, Tensor]:
        y1, y2 = w * yl, w * yh
        return torch.minimum(y1, y2), torch.maximum(y1, y2)

    yl, yh, _ = yhat(a.lo, a.hi)
    lo, hi = affine(yl, yh)
    fyl, fyh, fs_lo = yhat(*a.faulty_box())
    l2 = a.row_l2()
    c, r0 = (a.hi + a.lo) / 2, (a.hi - a.lo) / 2  # faulty rows: within ||r||_2 + l2 of the centre
    rms_lo = (c.norm(dim=-1, keepdim=True) - r0.norm(dim=-1, keepdim=True) - l2).clamp_min(0) / root
    fs_lo = torch.maximum(fs_lo, (rms_lo ** 2 + eps).sqrt())
    flo, fhi = affine(fyl, fyh)
    ymax = torch.maximum(fyl.abs(), fyh.abs())
    e = _cap(w.abs() / fs_lo * (a.e + ymax * l2 / root), flo, fhi)
    # float32: the mean square within (n + 4) u of mean(x^2) (a sum of squares, always >= 0), rsqrt
    # and eps within EXP_ULPS, two products
    m = a.fmag()
    d_ms = gamma(n + 4) * (m ** 2).mean(-1, keepdim=True)
    rho = d_ms / (2 * fs_lo ** 2) + SAFETY * (EXP_ULPS + 3) * U
    r = w.abs() * m / fs_lo * rho + TINY
    out = finish(lo, hi, e, r)
    # |fl(yhat_i)| <= |x_i| / sqrt(max(ms - d_ms, 0) + eps): split at ms = 2 d_ms as for LayerNorm
    x32 = torch.maximum(math.sqrt(2 * n) * d_ms.sqrt() / math.sqrt(eps), math.sqrt(2) * root * torch.ones_like(d_ms))
    out = with_l2(out, e, w.abs().max() * l2 / fs_lo)  # the Jacobian (I - yhat yhat^T / n) / s: norm <= 1 / s
    out.e = torch.minimum(out.e, w.abs() * (x32 * (1 + 8 * U) + root) + TINY)
    return out


def attention(q: Val, k: Val, v: Val, scale_: float, masked: Tensor | None) -> Val:
    """``softmax(q k^T * scale + mask) v``, as ``F.scaled_dot_product_attention`` computes it.

    Rounding: each stage's own (scores, softmax, weighted sum), plus a slack for the blocked
    online softmax of fused kernels (rescaling by ``exp(m_old - m_new)`` per key block)."""
    s = scale(matmul(q, k.map(lambda t: t.transpose(-1, -2))), scale_)
    p = softmax(s, masked)
    out = matmul(p, v)
    t = k.shape[-2]
    blocks = max(1, -(-t // 32))
    slack = SAFETY * (EXP_ULPS + 4) * (blocks + 2) * U * (p.hi.clamp_min(0) @ v.fmag()) + TINY
    # a convex combination of the value rows (up to rounding): |out| <= max_j |v_j| in both forwards
    vmax = v.mag().amax(-2, keepdim=True)
    cap = ((vmax + v.resolved().amax(-2, keepdim=True)) * (1 + 2.0 ** -12) + vmax).expand_as(out.e)
    if _mode[-1] == RECORDED:
        out.lo, out.hi, out.e = out.lo - slack, out.hi + slack, out.e + 2 * slack * (out.e > 0)
    else:
        out.e = out.e + slack
    out.e = torch.minimum(out.e, cap)
    return out
