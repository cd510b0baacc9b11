"""Linearized sound bounds for weight perturbations: exact first order, sound remainder.

Per test input ``x``, with every weight moved by ``|dW| <= R`` at once (rounding), the change of
an output (or of a logit margin ``m_c = F_p - F_c``) splits exactly, along the network linearized
at ``x``, into

    dm = sum_affine g_i . (dW_i y_i)                      first order: <G_i, dW_i>
       + sum_affine g_i . (dW_i dy_i + db_i)               second order, bias
       + sum_act    g_i . r_i  + sum_maxpool g_i . r_i     linearization residuals

where ``g_i = dm/dz_i`` is the gradient of the linearized network at node ``i`` (a fixed vector per
input), ``y_i`` the nominal input of affine node ``i``, ``dy_i`` its error and ``r_i`` how far an
activation (or max-pool) departs from its tangent at the nominal point. Hence the sound bound

    |dm| <= sum_i <|G_i|, R_i> + |g_i| . (R_i * e_i + Rb_i) + |g_i| . rho_i

with ``e`` the sound interval error radii (:func:`hwrel.bounds.perturb.perturbation_radii`) and
``rho_i >= |r_i|`` computed from ``e`` and the nominal pre-activation. The first term is the exact
worst case of the first-order change: ``G_i = g_i y_i^T`` summed over a convolution's output
positions *before* the absolute value, so a shared kernel weight rounds once for all positions
(the interval bound instead lets each position take its own worst rounding). The remaining terms
are second order in ``R`` except near kinks (ReLU within ``e`` of 0, ties in a max-pool window).

Guarantee: sound (an upper bound for every rounding within the radii, in exact arithmetic; a
relative slack of 2^-20 absorbs float64 rounding). Cost: one backward pass per output at each input
(shared with the estimate), then cheap per radius. :mod:`hwrel.bounds.refine` tightens the radii
``e`` where they drive the remainder.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from hwrel.activations import Activation
from hwrel.bounds.fp32 import local_rounding
from hwrel.bounds.perturb import WeightPerturbation
from hwrel.errors import HwrelError
from hwrel.network import Network, Node
from hwrel.valleys import VALLEYS

PAD_REL = 2.0 ** -20
# nodes whose output gets a gradient: where something enters beyond the tangent (residuals,
# second-order terms, float32 rounding)
TAPPED = ("affine", "act", "pool", "add")
# sup |phi''| of the smooth activations (sigmoid: 1/(6 sqrt 3); tanh: 4/(3 sqrt 3))
_CURVATURE = {"sigmoid": 1 / (6 * math.sqrt(3)), "tanh": 4 / (3 * math.sqrt(3))}
# kinks (position, slope jump) of the piecewise-linear activations
KINKS = {
    "relu": lambda a: ((0.0, 1.0),),
    "leaky_relu": lambda a: ((0.0, abs(1.0 - a.params[0])),),
    "relu6": lambda a: ((0.0, 1.0), (6.0, 1.0)),
    "hardtanh": lambda a: ((a.params[0], 1.0), (a.params[1], 1.0)),
    "hardsigmoid": lambda a: ((-3.0, 1 / 6), (3.0, 1 / 6)),
    "identity": lambda a: (),
}


# ------------------------------------------------------------------------- per-node linearization

def act_slope(act: Activation, s: Tensor) -> Tensor:
    """The tangent slope ``D`` used at nominal pre-activation ``s`` (the residual bound matches it)."""
    k = act.kind
    if k in VALLEYS:
        return VALLEYS[k].d1(s)
    if k == "identity":
        return torch.ones_like(s)
    if k == "relu":
        return (s > 0).to(s.dtype)
    if k == "leaky_relu":
        return torch.where(s > 0, torch.ones_like(s), torch.full_like(s, act.params[0]))
    if k == "relu6":
        return ((s > 0) & (s < 6)).to(s.dtype)
    if k == "hardtanh":
        return ((s > act.params[0]) & (s < act.params[1])).to(s.dtype)
    if k == "hardsigmoid":
        return ((s > -3) & (s < 3)).to(s.dtype) / 6
    if k == "sigmoid":
        y = torch.sigmoid(s)
        return y * (1 - y)
    if k == "tanh":
        return 1 - torch.tanh(s) ** 2
    return torch.zeros_like(s)  # quantized (step) activations: no tangent, the residual is everything


def act_residual(act: Activation, s: Tensor, e: Tensor, e_out: Tensor) -> Tensor:
    """Sound ``rho >= |phi(s + d) - phi(s) - D(s) d|`` for every ``|d| <= e``.

    Piecewise linear: zero unless a kink lies within ``e`` of ``s``, then at most (slope jump) x (how
    far past the kink). Smooth: ``min(sup|phi''| e^2 / 2, e * max(D - L, K - D))`` (``L <= phi' <= K``,
    ``L = slope_lo``, 0 for the monotone ones); Hardswish, whose ``phi'`` jumps, only the second term.
    Quantized activations have no tangent: the residual is the whole output error ``e_out``.
    """
    k = act.kind
    if k in KINKS:
        rho = torch.zeros_like(s)
        for at, jump in KINKS[k](act):
            rho = rho + jump * torch.clamp(e - (s - at).abs(), min=0)
        return rho
    if k in VALLEYS:
        d = act_slope(act, s)
        first = e * torch.maximum(d - act.slope_lo, act.lipschitz - d)
        curv = VALLEYS[k].curvature
        if math.isfinite(curv):
            first = torch.minimum(curv / 2 * e * e, first)
        return first + 1e-12 * e
    if k in _CURVATURE:
        d = act_slope(act, s)
        first = e * torch.maximum(d, act.lipschitz - d)
        return torch.minimum(_CURVATURE[k] / 2 * e * e, first) + 1e-12 * e
    return e_out


def maxpool_residual(node: Node, z: Tensor, e: Tensor, idx: Tensor) -> Tensor:
    """Sound ``rho >= |maxpool(z + d) - maxpool(z) - d[argmax]|`` for every ``|d| <= e``.

    ``maxpool(z + d) - z[k*] - d[k*]`` lies in ``[0, max_{k != k*}(z_k + e_k) - (z[k*] - e[k*])]``:
    zero when the window's maximum stays ahead of every other element.
    """
    p = node.pool
    b, c, h, w = z.shape
    flat_z, flat_e = z.reshape(b, c, -1), e.reshape(b, c, -1)
    z_star = flat_z.gather(2, idx.reshape(b, c, -1)).reshape(idx.shape)
    e_star = flat_e.gather(2, idx.reshape(b, c, -1)).reshape(idx.shape)
    up = z + e
    if p.overlap == 1:
        # disjoint windows: mask each window's arg-max element to get the best of the others
        up = up.reshape(b, c, -1).scatter(2, idx.reshape(b, c, -1), float("-inf")).reshape(b, c, h, w)
    # (overlapping windows: a masked element may be an ordinary member of another window, so the
    # unmasked maximum stands in for the others' maximum there: sound, looser)
    other = F.max_pool2d(up, p.kernel, p.stride, p.padding, ceil_mode=p.ceil_mode)
    return torch.clamp(other - (z_star - e_star), min=0)


# ---------------------------------------------------------------------------- the linearization

def _pair(v) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


def unfold(y: Tensor, kernel, dilation, padding, stride) -> Tensor:
    """``F.unfold`` by strided slices (``(B, C*kh*kw, P)``, same order): CPU im2col is far slower."""
    (kh, kw), (dh, dw), (ph, pw), (sh, sw) = map(_pair, (kernel, dilation, padding, stride))
    yp = F.pad(y, (pw, pw, ph, ph))
    ho = (yp.shape[2] - dh * (kh - 1) - 1) // sh + 1
    wo = (yp.shape[3] - dw * (kw - 1) - 1) // sw + 1
    cols = [yp[:, :, i * dh:i * dh + sh * (ho - 1) + 1:sh, j * dw:j * dw + sw * (wo - 1) + 1:sw]
            for i in range(kh) for j in range(kw)]
    return torch.stack(cols, 2).reshape(y.shape[0], -1, ho * wo)


def unfold_input(node: Node, y: Tensor) -> Tensor:
    """The input windows of an affine node, ``(B, fan_in, P)``: what each output position reads.

    A convolution's windows (``in*kh*kw`` rows, all input channels; a grouped convolution's
    output channel reads its group's block of them, see :func:`group_windows`); a Linear acting on
    the last dimension of a ``(B, *lead, in)`` input reads one row per leading position
    (``P = prod(lead)``; a flat input has ``P = 1``).
    """
    a = node.affine
    if a.kind == "linear":
        return y.reshape(y.shape[0], -1, y.shape[-1]).transpose(1, 2)
    return unfold(y, a.weight.shape[2:], a.dilation, a.padding, a.stride)


def group_windows(node: Node, t: Tensor) -> Tensor:
    """``t`` of shape ``(..., C_out, in*kh*kw)`` (per output channel, against every row of
    :func:`unfold_input`) restricted to the rows each output channel reads: ``(..., C_out, fan_in)``
    in the order of its weight. The identity unless the convolution is grouped."""
    a = node.affine
    if a.kind == "linear" or a.groups == 1:
        return t
    c_out, fan = a.weight.shape[0], a.fan_in
    group = torch.arange(c_out, device=t.device) // (c_out // a.groups)
    idx = group[:, None] * fan + torch.arange(fan, device=t.device)[None, :]  # (C_out, fan_in)
    return t.gather(-1, idx.expand(*t.shape[:-2], c_out, fan))


def output_positions(node: Node, g: Tensor) -> Tensor:
    """``g`` of shape ``(N, *node.shape)`` (one value per output neuron) as ``(N, C_out, P)``, the
    position order of :func:`unfold_input`."""
    if node.affine.kind == "linear":
        return g.reshape(g.shape[0], -1, node.shape[-1]).transpose(1, 2)
    return g.reshape(g.shape[0], g.shape[1], -1)


def is_flat_dense(node: Node, y: Tensor) -> bool:
    """A Linear on a flat input (one position): its weight gradient is the outer product ``g y^T``."""
    return node.affine.kind == "linear" and y.dim() == 2


def conv_weight_grad(node: Node, y: Tensor, g: Tensor) -> Tensor:
    """Per-sample, per-output gradient of an affine node's weights: ``(B, O, out, fan_in)``.

    ``g`` is ``dF/ds`` at the node's output ``(B, O, *shape)``; the gradient sums ``g x window(y)``
    over output positions (a convolution's positions, or a Linear's leading positions).
    """
    u = unfold_input(node, y)
    b, o = g.shape[:2]
    gp = output_positions(node, g.reshape(b * o, *g.shape[2:]))  # (B*O, out, P)
    c = gp.shape[1]
    return group_windows(node, torch.bmm(gp.reshape(b, o * c, -1), u.transpose(1, 2)).reshape(b, o, c, -1))


@dataclass
class Linearization:
    """Everything about a batch of inputs that does not depend on the radii.

    ``values``: nominal value of every node ``(B, *shape)``. ``grads``: node -> ``dF_o/dz_i``
    ``(B, O, *shape)`` of the linearized network at every affine, activation and max-pool output.
    ``pool_idx``: the arg-max each max-pool's tangent routes through. ``pred``: predicted class.
    """

    net: Network
    values: list[Tensor]
    grads: dict[int, Tensor]
    pool_idx: dict[int, Tensor]
    pred: Tensor

    def margin(self, g: Tensor) -> Tensor:
        """``d(F_p - F_o)`` from ``dF_o`` (rows of the predicted class become 0)."""
        return g[torch.arange(len(g), device=g.device), self.pred][:, None] - g


def linearize(net: Network, x: Tensor) -> Linearization:
    """Gradients of every output along the network linearized at each input (one backward per output)."""
    vals: list[Tensor] = []
    taps: dict[int, Tensor] = {}
    pool_idx: dict[int, Tensor] = {}
    b = x.shape[0]
    with torch.enable_grad():
        for i, node in enumerate(net.nodes):
            if node.op == "input":
                vals.append(x.detach())
                continue
            ins = [vals[j] for j in node.inputs]
            if node.op == "act":
                s = ins[0]
                v = node.act(s.detach()) + act_slope(node.act, s.detach()) * (s - s.detach())
            elif node.op == "pool" and node.pool.kind == "max":
                z = ins[0]
                p = node.pool
                nom, idx = F.max_pool2d(z.detach(), p.kernel, p.stride, p.padding, ceil_mode=p.ceil_mode,
                                        return_indices=True)
                pool_idx[i] = idx
                dz = (z - z.detach()).flatten(2).gather(2, idx.flatten(2)).reshape(idx.shape)
                v = nom + dz
            else:
                v = node.apply(ins)
            if node.op in TAPPED:
                taps[i] = torch.zeros(b, *node.shape, dtype=x.dtype, device=x.device, requires_grad=True)
                v = v + taps[i]
            vals.append(v)
        out = vals[-1]
        keys = list(taps)
        per_out = [torch.autograd.grad(out[:, o].sum(), [taps[k] for k in keys], retain_graph=True,
                                       allow_unused=True) for o in range(out.shape[1])]
    grads = {}
    for n, k in enumerate(keys):
        gs = [torch.zeros(b, *net.nodes[k].shape, dtype=x.dtype, device=x.device) if g[n] is None else g[n]
              for g in per_out]
        grads[k] = torch.stack(gs, 1)
    values = [v.detach() for v in vals]
    return Linearization(net, values, grads, pool_idx, values[-1].argmax(1))


def _dot(g: Tensor, v: Tensor) -> Tensor:
    """``sum over the node of g[b, c] * v[b]`` for ``g`` ``(B, C, *shape)`` and ``v`` ``(B, *shape)``."""
    return torch.bmm(g.reshape(g.shape[0], g.shape[1], -1), v.reshape(v.shape[0], -1, 1))[..., 0]


class LinearizedBound:
    """Sound per-input bounds on every output's and every margin's change, for any radii.

    Build once per batch of inputs (:func:`linearize` plus the per-sample convolution weight
    gradients), then :meth:`bounds` costs one interval error pass plus a few dot products.
    ``kinds``: ``("out", "margin")``, or ``("margin",)`` when only certificates are needed.
    Also keeps the squared Jacobian sums the statistical estimate uses (:attr:`squares`).
    """

    def __init__(self, lin: Linearization, kinds: tuple[str, ...] = ("out", "margin")):
        self.lin, self.kinds = lin, kinds
        net = lin.net
        signed = {"out": dict(lin.grads), "margin": {i: lin.margin(g) for i, g in lin.grads.items()}}
        self.abs_y: dict[int, Tensor] = {}  # dense: |nominal input|
        # squares[kind][i]: per input, output and output channel, sum of (dF/dW)^2 (affine) or of (dF/dy)^2 (act)
        self.squares: dict[str, dict[int, Tensor]] = {"out": {}, "margin": {}}
        weight_grads: dict[str, dict[int, Tensor]] = {"out": {}, "margin": {}}
        for i, node in enumerate(net.nodes):
            if node.op == "act":
                for k in signed:
                    self.squares[k][i] = (signed[k][i] ** 2).flatten(2).sum(-1)
            if node.op != "affine":
                continue
            y = lin.values[node.inputs[0]]
            if is_flat_dense(node, y):
                self.abs_y[i] = y.abs()
                for k in signed:
                    self.squares[k][i] = signed[k][i] ** 2 * (y ** 2).sum(1)[:, None, None]
            else:
                gw = conv_weight_grad(node, y, lin.grads[i])
                for k in signed:
                    v = gw if k == "out" else lin.margin(gw)
                    self.squares[k][i] = (v ** 2).sum(-1)
                    if k in kinds:
                        weight_grads[k][i] = v.abs()
        self.abs_g = {k: {i: g.abs() for i, g in signed[k].items()} for k in kinds}
        self.abs_gw = {k: weight_grads[k] for k in kinds}  # conv, Linear on rows: |dF/dW| (B, O, out, fan_in)

    def subset(self, rows: Tensor, kinds: tuple[str, ...] | None = None) -> "LinearizedBound":
        """The same bound for the inputs ``rows`` of this batch only (``kinds``: a subset of
        :attr:`kinds`; no estimate sums)."""
        lin = self.lin
        sub = object.__new__(LinearizedBound)
        sub.kinds = self.kinds if kinds is None else kinds
        sub.lin = Linearization(lin.net, [v[rows] for v in lin.values], {},
                                {i: v[rows] for i, v in lin.pool_idx.items()}, lin.pred[rows])
        sub.abs_g = {k: {i: g[rows] for i, g in self.abs_g[k].items()} for k in sub.kinds}
        sub.abs_gw = {k: {i: g[rows] for i, g in self.abs_gw[k].items()} for k in sub.kinds}
        sub.abs_y = {i: y[rows] for i, y in self.abs_y.items()}
        sub.squares = {}
        return sub

    def first_order(self, p: WeightPerturbation) -> dict[str, Tensor]:
        """``sum_i <|G_i|, R_i>`` per input and output (or margin) ``(B, O)``: a lower end of
        :meth:`bounds` (the exact worst case of the first-order change)."""
        b = self.lin.values[-1].shape[0]
        n_out = next(iter(self.abs_g[self.kinds[0]].values())).shape[1]
        t = {k: self.lin.values[-1].new_zeros(b, n_out) for k in self.kinds}
        for i, r in p.weight_radius.items():
            ry = F.linear(self.abs_y[i], r) if i in self.abs_y else None  # dense: (B, out)
            for k in self.kinds:
                if ry is not None:
                    t[k] = t[k] + _dot(self.abs_g[k][i], ry)
                else:
                    gw = self.abs_gw[k][i]
                    t[k] = t[k] + (gw.reshape(gw.shape[0], gw.shape[1], -1) @ r.reshape(-1, 1))[..., 0]
        return t

    def bounds(self, p: WeightPerturbation, radii: list[Tensor],
               inject: dict[int, Tensor | None] | None = None, float32: bool = False) -> dict[str, Tensor]:
        """Sound ``(B, O)`` bounds on ``|dF_o|`` (``"out"``) and ``|d(F_p - F_o)|`` (``"margin"``).

        ``radii``: sound error radii of every node under ``p`` at these inputs (interval method).
        ``inject``: :func:`injections` of these inputs, if already known. ``float32``: the perturbed
        model runs in float32 and is compared with the exact clean network (its rounding is one
        more injection at every node; ``radii`` must cover it, as ``perturbation_radii(...,
        rounding=FAULTY)`` gives them); otherwise both in exact arithmetic.
        """
        if p.count is not None:
            raise HwrelError("the linearized bound covers perturbations of every weight (rounding), not k flips")
        lin = self.lin
        if inject is None:
            inject = injections(lin.net, p, lin.values, lin.pool_idx, radii, float32=float32)
        t = self.first_order(p)
        for i, v in inject.items():
            if v is None or i not in self.abs_g[self.kinds[0]]:
                continue
            v = v.expand(lin.values[i].shape)
            for k in self.kinds:
                t[k] = t[k] + _dot(self.abs_g[k][i], v)
        return {k: x * (1 + PAD_REL) for k, x in t.items()}


def injections(net: Network, p: WeightPerturbation, values: list[Tensor], pool_idx: dict[int, Tensor],
               radii: list[Tensor], nodes=None, float32: bool = False) -> dict[int, Tensor | None]:
    """Per node, a sound bound on what enters it beyond its tangent (``None``: nothing).

    Affine: ``R * e_in + Rb`` (the second-order weight term and the bias); activation: its
    residual (plus an additive output rounding); max-pool: its residual. ``nodes``: only these.
    ``float32``: plus the float32 rounding of the perturbed forward at every node (see
    :meth:`LinearizedBound.bounds`).
    """
    out: dict[int, Tensor | None] = {}
    for i in (range(len(net.nodes)) if nodes is None else nodes):
        node = net.nodes[i]
        v = None
        if node.op == "affine":
            r = p.weight_radius.get(i)
            if r is not None:
                e_in = radii[node.inputs[0]]
                if bool(e_in.any()):
                    v = F.linear(e_in, r) if node.affine.kind == "linear" else F.conv2d(
                        e_in, r, None, node.affine.stride, node.affine.padding, node.affine.dilation,
                        node.affine.groups)
            rb = p.bias_radius.get(i)
            if rb is not None:
                rb = rb if node.affine.kind == "linear" else rb[:, None, None]
                v = rb.expand(values[i].shape) if v is None else v + rb
        elif node.op == "act":
            src = node.inputs[0]
            v = act_residual(node.act, values[src], radii[src], radii[i])
            if node.act.kind != "quant" and i in p.act_radius:
                v = v + p.act_radius[i]  # additive rounding of the activation's output
        elif node.op == "pool" and node.pool.kind == "max":
            src = node.inputs[0]
            v = maxpool_residual(node, values[src], radii[src], pool_idx[i])
        if float32 and node.op in TAPPED:  # the perturbed float32 forward rounds here
            mags = [values[j].abs() + radii[j] for j in node.inputs]
            # (a refined node's own radius is not known yet: it is an affine or an addition,
            # whose rounding depends on its inputs only)
            out_mag = values[i].abs() + radii[i] if i < len(radii) else None
            loc = local_rounding(node, mags, out_mag, p.weight_radius.get(i))
            if isinstance(loc, Tensor):
                v = loc if v is None else v + loc
        out[i] = v if v is not None and bool(v.any()) else None
    return out

