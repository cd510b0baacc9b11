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
(shared with the estimate), then cheap per radius.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from hwrel.activations import Activation
from hwrel.bounds.perturb import WeightPerturbation
from hwrel.errors import HwrelError
from hwrel.network import Network, Node

_PAD_REL = 2.0 ** -20
# sup |phi''| of the smooth activations (sigmoid: 1/(6 sqrt 3); tanh: 4/(3 sqrt 3))
_CURVATURE = {"sigmoid": 1 / (6 * math.sqrt(3)), "tanh": 4 / (3 * math.sqrt(3))}
# kinks (position, slope jump) of the piecewise-linear activations
_KINKS = {
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
    far past the kink). Smooth: ``min(sup|phi''| e^2 / 2, e * max(D, K - D))`` (``0 <= phi' <= K``).
    Quantized activations have no tangent: the residual is the whole output error ``e_out``.
    """
    k = act.kind
    if k in _KINKS:
        rho = torch.zeros_like(s)
        for at, jump in _KINKS[k](act):
            rho = rho + jump * torch.clamp(e - (s - at).abs(), min=0)
        return rho
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
    """The input windows of a convolution, ``(B, in*kh*kw, P)``."""
    a = node.affine
    if a.groups != 1:
        raise HwrelError(f"layer {node.name}: grouped convolutions are not supported by the linearized bound")
    return unfold(y, a.weight.shape[2:], a.dilation, a.padding, a.stride)


def conv_weight_grad(node: Node, y: Tensor, g: Tensor, u: Tensor | None = None) -> Tensor:
    """Per-sample, per-output gradient of a convolution's weights: ``(B, C, out, in*kh*kw)``.

    ``g`` is ``dF/ds`` at the convolution's output ``(B, C, out, H, W)``; the gradient sums
    ``g x window(y)`` over output positions. ``u``: :func:`unfold_input` of ``y`` if known.
    """
    u = unfold_input(node, y) if u is None else u
    b, c, o = g.shape[:3]
    return torch.bmm(g.reshape(b, c * o, -1), u.transpose(1, 2)).reshape(b, c, o, -1)


def _grouped_weight_grad(g: Tensor, u: Tensor, rows: Tensor) -> Tensor:
    """:func:`conv_weight_grad` for ``g`` ``(P, C, out, H, W)`` whose rows belong to inputs ``rows``
    (sorted) with unfolded inputs ``u`` ``(S, in*k*k, positions)``: one matmul per input."""
    p, c, o = g.shape[:3]
    gf = g.reshape(p, c * o, -1)
    out = torch.empty(p, c * o, u.shape[1], dtype=g.dtype)
    vals, counts = torch.unique_consecutive(rows, return_counts=True)
    start = 0
    for r, n in zip(vals.tolist(), counts.tolist()):
        out[start:start + n] = gf[start:start + n] @ u[r].transpose(0, 1)
        start += n
    return out.reshape(p, c, o, -1)


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
        return g[torch.arange(len(g)), self.pred][:, None] - g


def linearize(net: Network, x: Tensor, select: Tensor | None = None) -> Linearization:
    """Gradients of every output along the network linearized at each input (one backward per output).

    ``select``: one output per input (``(B,)``), whose gradients alone are computed (``O = 1``), in
    one backward pass for the whole batch."""
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
            if node.op in ("affine", "act", "pool"):
                taps[i] = torch.zeros(b, *node.shape, dtype=x.dtype, requires_grad=True)
                v = v + taps[i]
            vals.append(v)
        out = vals[-1]
        keys = list(taps)
        heads = [out[:, o] for o in range(out.shape[1])] if select is None else [out.gather(1, select[:, None])]
        per_out = [torch.autograd.grad(h.sum(), [taps[k] for k in keys], retain_graph=True, allow_unused=True)
                   for h in heads]
    grads = {}
    for n, k in enumerate(keys):
        gs = [torch.zeros(b, *net.nodes[k].shape, dtype=x.dtype) if g[n] is None else g[n] for g in per_out]
        grads[k] = torch.stack(gs, 1)
    values = [v.detach() for v in vals]
    return Linearization(net, values, grads, pool_idx, values[-1].argmax(1))


def neuron_gradients(net: Network, values: list[Tensor], pool_idx: dict[int, Tensor], i: int, rows: Tensor,
                     cols: Tensor, slopes: dict[int, Tensor] | None = None) -> dict[int, Tensor]:
    """Gradients of single neurons (``cols``, flat index into node ``i``) of inputs ``rows`` along
    the linearized network, at every affine, activation and max-pool output before ``i``.

    The same tangents as :func:`linearize` (activation slopes :func:`act_slope`, max-pools through
    their nominal arg-max), from the nominal ``values`` without a new forward pass: one backward
    pass for all ``(row, col)`` pairs at once. ``slopes``: the activation slopes of every input
    (activation node -> ``(B, *shape)``), if already known. Returns ``node -> (P, 1, *shape)``.
    """
    p = len(rows)
    dtype = values[0].dtype
    seed = torch.zeros(p, net.nodes[i].size, dtype=dtype)
    seed[torch.arange(p), cols] = 1.0
    adj: dict[int, Tensor] = {i: seed.reshape(p, *net.nodes[i].shape)}
    grads: dict[int, Tensor] = {}

    def send(j: int, g: Tensor) -> None:
        adj[j] = adj[j] + g if j in adj else g

    for k in range(i, 0, -1):
        a = adj.pop(k, None)
        if a is None:
            continue
        node = net.nodes[k]
        if node.op in ("affine", "act", "pool"):
            grads[k] = a[:, None]
        src = node.inputs[0]
        if node.op == "affine":
            aff = node.affine
            if aff.kind == "linear":
                send(src, a @ aff.weight)
            else:
                send(src, torch.nn.grad.conv2d_input((p, *net.nodes[src].shape), aff.weight, a, aff.stride,
                                                     aff.padding, aff.dilation, aff.groups))
        elif node.op == "act":
            d = slopes[k] if slopes is not None and k in slopes else act_slope(node.act, values[src])
            send(src, a * d[rows])
        elif node.op == "pool" and node.pool.kind == "max":
            idx = pool_idx[k][rows]
            flat = torch.zeros(p, a.shape[1], net.nodes[src].size // a.shape[1], dtype=dtype)
            send(src, flat.scatter_add(2, idx.flatten(2), a.flatten(2)).reshape(p, *net.nodes[src].shape))
        elif node.op == "add":
            for j in node.inputs:
                send(j, a)
        else:  # reshape, average pool: linear, differentiate at zero
            with torch.enable_grad():
                z = torch.zeros(p, *net.nodes[src].shape, dtype=dtype, requires_grad=True)
                g, = torch.autograd.grad(node.apply([z]), z, a)
            send(src, g)
    return grads


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

    def __init__(self, lin: Linearization, kinds: tuple[str, ...] = ("out", "margin"), squares: bool = True,
                 unfolded: tuple[dict[int, Tensor], Tensor] | None = None):
        self.lin, self.kinds = lin, kinds
        net = lin.net
        signed = {"out": dict(lin.grads)}
        if squares or "margin" in kinds:
            signed["margin"] = {i: lin.margin(g) for i, g in lin.grads.items()}
        self.abs_y: dict[int, Tensor] = {}  # dense: |nominal input|
        # squares[kind][i]: per input, output and output channel, sum of (dF/dW)^2 (affine) or of (dF/dy)^2 (act)
        self.squares: dict[str, dict[int, Tensor]] = {"out": {}, "margin": {}}
        weight_grads: dict[str, dict[int, Tensor]] = {"out": {}, "margin": {}}
        for i, node in enumerate(net.nodes):
            if node.op == "act" and squares:
                for k in signed:
                    self.squares[k][i] = (signed[k][i] ** 2).flatten(2).sum(-1)
            if node.op != "affine":
                continue
            y = lin.values[node.inputs[0]]
            if node.affine.kind == "linear":
                self.abs_y[i] = y.abs()
                if squares:
                    for k in signed:
                        self.squares[k][i] = signed[k][i] ** 2 * (y ** 2).sum(1)[:, None, None]
            else:
                if unfolded is None:
                    gw = conv_weight_grad(node, y, lin.grads[i])
                else:
                    gw = _grouped_weight_grad(lin.grads[i], unfolded[0][i], unfolded[1])
                for k in signed:
                    v = gw if k == "out" else lin.margin(gw)
                    if squares:
                        self.squares[k][i] = (v ** 2).sum(-1)
                    if k in kinds:
                        weight_grads[k][i] = v.abs()
        self.abs_g = {k: {i: g.abs() for i, g in signed[k].items()} for k in kinds}
        self.abs_gw = {k: weight_grads[k] for k in kinds}  # conv: |dF/dW| (B, C, out, in*kh*kw)

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
        t = {k: torch.zeros(b, n_out, dtype=self.lin.values[-1].dtype) for k in self.kinds}
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
               inject: dict[int, Tensor | None] | None = None) -> dict[str, Tensor]:
        """Sound ``(B, O)`` bounds on ``|dF_o|`` (``"out"``) and ``|d(F_p - F_o)|`` (``"margin"``).

        ``radii``: sound error radii of every node under ``p`` at these inputs (interval method).
        ``inject``: :func:`injections` of these inputs, if already known.
        """
        if p.count is not None:
            raise HwrelError("the linearized bound covers perturbations of every weight (rounding), not k flips")
        lin = self.lin
        inject = injections(lin.net, p, lin.values, lin.pool_idx, radii) if inject is None else inject
        t = self.first_order(p)
        for i, v in inject.items():
            if v is None or i not in self.abs_g[self.kinds[0]]:
                continue
            v = v.expand(lin.values[i].shape)
            for k in self.kinds:
                t[k] = t[k] + _dot(self.abs_g[k][i], v)
        return {k: x * (1 + _PAD_REL) for k, x in t.items()}


def injections(net: Network, p: WeightPerturbation, values: list[Tensor], pool_idx: dict[int, Tensor],
               radii: list[Tensor], nodes=None) -> dict[int, Tensor | None]:
    """Per node, a sound bound on what enters it beyond its tangent (``None``: nothing).

    Affine: ``R * e_in + Rb`` (the second-order weight term and the bias); activation: its
    residual (plus an additive output rounding); max-pool: its residual. ``nodes``: only these.
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
        out[i] = v if v is not None and bool(v.any()) else None
    return out


class NeuronRefiner:
    """Tighter sound radii for the pre-activations that decide the remainder.

    The remainder of :class:`LinearizedBound` is driven by neurons within their error radius of a
    kink (an unstable ReLU): there the interval radius, which lets every position of a convolution
    take its own worst rounding and loses every sign cancellation between layers, turns into
    residual. Each such neuron gets its own linearized bound instead (the same theorem with the
    neuron as the output): exact first order over every weight before it, plus the remainder of the
    layers before it, computed in topological order so that each refinement feeds the next. Used as
    the ``tighten`` hook of :func:`hwrel.bounds.perturb.perturbation_radii`; sound, and capped there
    at the interval radius. Cost: one forward and backward pass of the network up to the neuron, per
    unstable neuron and input.
    """

    def __init__(self, net: Network, chunk: int = 512):
        self.net, self.chunk = net, chunk
        self.targets: dict[int, int] = {}  # node -> the activation node it feeds
        for i, node in enumerate(net.nodes):
            if node.op != "act" or node.act.kind not in _KINKS or node.act.kind == "identity":
                continue
            src = node.inputs[0]
            s_node = net.nodes[src]
            if s_node.op == "affine" and net.nodes[s_node.inputs[0]].op == "input":
                continue  # the first layer's interval radius is already exact
            if s_node.op in ("affine", "add"):
                self.targets[src] = i
        self._pass: list | None = None
        self._inject: dict[int, Tensor | None] = {}
        self._first: dict[int, Tensor] = {}
        self._slopes: dict[int, Tensor] = {}

    def _prepare(self, values, pool_idx, p: WeightPerturbation, radii, i: int) -> None:
        """Per input, what every pair shares up to node ``i``: injections, activation slopes, and
        per affine node the first-order data (conv: unfolded input; dense: ``R |y|``)."""
        todo = [k for k in range(i) if k not in self._inject]
        self._inject.update(injections(self.net, p, values, pool_idx, radii, todo))
        for k in range(1, i + 1):
            nd = self.net.nodes[k]
            if k in self._first or k in self._slopes or nd.op not in ("affine", "act"):
                continue
            if nd.op == "act":
                self._slopes[k] = act_slope(nd.act, values[nd.inputs[0]])
            elif k in p.weight_radius:
                y = values[nd.inputs[0]]
                self._first[k] = (F.linear(y.abs(), p.weight_radius[k]) if nd.affine.kind == "linear"
                                  else unfold_input(nd, y))

    def _pair_bound(self, grads: dict[int, Tensor], rows: Tensor, p: WeightPerturbation) -> Tensor:
        """:meth:`LinearizedBound.bounds` for single neurons (``grads`` of :func:`neuron_gradients`),
        the per-input data shared through :meth:`_prepare`."""
        total = torch.zeros(len(rows), dtype=next(iter(grads.values())).dtype)
        vals, counts = torch.unique_consecutive(rows, return_counts=True)
        bounds = [0]
        for n in counts.tolist():
            bounds.append(bounds[-1] + n)
        for k, g in grads.items():
            g = g[:, 0].flatten(1).abs() if k not in self._first or self.net.nodes[k].affine.kind == "linear" else g[:, 0]
            terms = []
            inj = self._inject.get(k)
            first = self._first.get(k)
            for r, a, b in zip(vals.tolist(), bounds[:-1], bounds[1:]):
                t = 0.0
                if inj is not None:
                    t = g[a:b] @ inj[r].flatten() if g.dim() == 2 else g[a:b].flatten(1).abs() @ inj[r].flatten()
                if first is not None:
                    if g.dim() == 2:  # dense: |g| . (R |y|)
                        t = t + g[a:b] @ first[r]
                    else:  # conv: <|G|, R> with G = g x windows, summed over positions
                        gw = (g[a:b].flatten(2) @ first[r].transpose(0, 1)).abs()
                        t = t + (gw.flatten(1) @ p.weight_radius[k].flatten())
                terms.append(t if isinstance(t, Tensor) else torch.zeros(b - a, dtype=total.dtype))
            total = total + torch.cat(terms)
        return total

    def unstable(self, i: int, s: Tensor, e: Tensor) -> Tensor:
        """Neurons of node ``i`` whose interval ``s +- e`` reaches a kink of the activation it feeds."""
        act = self.net.nodes[self.targets[i]].act
        out = torch.zeros_like(s, dtype=torch.bool)
        for at, _ in _KINKS[act.kind](act):
            out |= (s - at).abs() < e
        return out

    def refine(self, x: Tensor, values: list[Tensor], pool_idx: dict[int, Tensor], p: WeightPerturbation, i: int,
               e: Tensor, radii: list[Tensor], weight=None, share: float = 0.0) -> Tensor | None:
        """Sound radii for node ``i`` at inputs ``x`` (nominal ``values`` and max-pool arg-maxes of
        :func:`linearize`), given the radii of the nodes before it.

        ``weight(a)``: optional per-input importance ``(B, *shape)`` of activation node ``a``'s
        residual (e.g. the largest ``|d margin / dy|``); then only the unstable neurons carrying all
        but ``share`` of each input's weighted residual are refined, and none whose residual cannot
        move an output (the others keep their interval radius: sound either way, cheaper; on
        mnist-resnet ``share=0.05`` cost 0.4 % of certified accuracy at 12 bits).
        """
        if i not in self.targets:
            return None
        a = self.targets[i]
        mask = self.unstable(i, values[i], e).flatten(1)
        if weight is not None and bool(mask.any()):
            mass = (weight(a) * act_residual(self.net.nodes[a].act, values[i], e, e)).flatten(1) * mask
            order = mass.argsort(1, descending=True)
            sorted_mass = mass.gather(1, order)
            before = sorted_mass.cumsum(1) - sorted_mass
            keep = (before < (1 - share) * mass.sum(1, keepdim=True)) & (sorted_mass > 0)
            mask = torch.zeros_like(mask).scatter(1, order, keep)
        pairs = torch.nonzero(mask)
        if len(pairs) == 0:
            return None
        pp = WeightPerturbation(
            weight_radius={k: v for k, v in p.weight_radius.items() if k <= i},
            bias_radius={k: v for k, v in p.bias_radius.items() if k <= i},
            act_radius={k: v for k, v in p.act_radius.items() if k <= i})
        if self._pass is not radii:  # a new radii pass: what is cached per input is stale
            self._pass, self._inject, self._first, self._slopes = radii, {}, {}, {}
        self._prepare(values, pool_idx, p, radii, i)
        out = e.flatten(1).clone()
        for s in range(0, len(pairs), self.chunk):
            rows, cols = pairs[s:s + self.chunk, 0], pairs[s:s + self.chunk, 1]
            grads = neuron_gradients(self.net, values, pool_idx, i, rows, cols, self._slopes)
            out[rows, cols] = self._pair_bound(grads, rows, pp) * (1 + _PAD_REL)
        return out.reshape(e.shape)
