"""Bounds for bounded perturbations of the stored weights (theory 3.1, 4 and 5).

Quantization and bit flips are Byzantine faults of synapses: weight ``W_ji`` becomes
``W_ji + dW_ji`` with ``|dW_ji| <= R_ji``. With ``y`` the nominal input of a layer and ``e`` its
error, ``(W + dW)(y + e) - W y = (W + dW) e + dW y``, so per receiving neuron

    |ds_j| <= sum_i (|W_ji| + R_ji) e_i + sum_i R_ji |y_i|   (dense: every weight perturbed)

and, when at most ``k`` entries are perturbed, the second sum becomes its ``k`` largest terms.
Methods (all sound over the input box):

- ``"paper"``: the scalar recursion of theory 3.1, ``E_l <= N_l K (w~_m E_(l-1) + nu_l N_(l-1) C_(l-1))``;
- ``"weights"``: per-neuron radii through the actual ``|W|`` and ``R`` matrices, global slopes;
- ``"interval"``: the same with each neuron's slope over its faulty reachable interval; batched
  over boxes, so points give per-sample certificates.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from hwrel.bounds.ibp import interval_bounds, sup_abs
from hwrel.bounds.fp32 import scalar_rounding
from hwrel.bounds.interval import BOTH, add_rounding, affine_topsum, gains
from hwrel.errors import HwrelError
from hwrel.network import Network, Node

PERTURB_METHODS = ("paper", "weights", "interval")


@dataclass(frozen=True)
class WeightPerturbation:
    """Elementwise bounds on weight, bias and activation changes.

    Attributes:
        weight_radius: affine node index -> ``R`` (shape of the weight), ``|dW| <= R``.
        bias_radius: affine node index -> bound on ``|db|`` (shape of the bias).
        act_radius: act node index -> additive bound on the activation's output change
            (activation quantization: half a step), scalar or shape of the node.
        count: ``None`` if every entry may be perturbed at once (rounding); ``k`` if at most ``k``
            weight/bias entries change in each layer (bit flips; sound for ``k`` in total).
    """

    weight_radius: dict[int, Tensor] = field(default_factory=dict)
    bias_radius: dict[int, Tensor] = field(default_factory=dict)
    act_radius: dict[int, Tensor | float] = field(default_factory=dict)
    count: int | None = None


def _radius_map(node: Node, r: Tensor, s: Tensor, count: int | None) -> Tensor:
    """``sum_i R_ji s_i`` per receiver (or its top-``count`` terms)."""
    a = node.affine
    if count is not None:
        shadow = Node(node.name, node.op, node.inputs, node.shape, affine=_with_weight(a, r))
        return affine_topsum(shadow, s, count)
    if a.kind == "linear":
        return F.linear(s, r)
    return F.conv2d(s, r, None, a.stride, a.padding, a.dilation, a.groups)


def _with_weight(a, w):
    from dataclasses import replace

    return replace(a, weight=w)


def _shape_bias(node: Node, rb: Tensor, batch: int) -> Tensor:
    if node.affine.kind == "linear":  # the bias adds at every leading position
        return rb.expand(batch, *node.shape)
    return rb[None, :, None, None].expand(batch, -1, *node.shape[1:])


@torch.no_grad()
def perturbation_radii(net: Network, p: WeightPerturbation, lo: Tensor, hi: Tensor, method: str = "interval",
                       nominal=None, tighten=None, rounding: str | None = BOTH) -> list[Tensor]:
    """Sound per-node error radii ``(B, *shape)`` under the perturbation (``weights``/``interval``).

    ``tighten(i, e, radii)``: optional, returns a sound radius for node ``i`` given its interval
    radius ``e`` and the radii of the nodes before it (the result is capped at ``e``).

    ``rounding`` (see :func:`hwrel.bounds.interval.add_rounding`): ``BOTH`` bounds the difference
    of the perturbed and the clean float32 forwards (``nominal`` must cover the clean float32
    values, as :func:`~hwrel.bounds.ibp.interval_bounds` gives them); ``FAULTY`` the perturbed
    float32 forward against the exact clean network (``nominal``: exact values); ``None``: exact
    arithmetic of both."""
    if nominal is None:
        los, his = interval_bounds(net, lo, hi, float32=rounding == BOTH)
    else:
        los, his = nominal
    radii: list[Tensor] = []
    for i, node in enumerate(net.nodes):
        if node.op == "input":
            e = torch.zeros_like(lo)
        elif node.op == "affine":
            src = node.inputs[0]
            e_in = radii[src]
            e = node.affine.abs_map(e_in)
            r = p.weight_radius.get(i)
            if r is not None:
                y = sup_abs(los[src], his[src])
                if p.count is None:
                    e = e + _radius_map(node, r, e_in, None) + _radius_map(node, r, y, None)
                else:
                    e = e + _radius_map(node, r, y + e_in, p.count)
            rb = p.bias_radius.get(i)
            if rb is not None:
                rb_full = _shape_bias(node, rb.to(e.dtype), e.shape[0])
                if p.count is None:
                    e = e + rb_full
                else:  # at most `count` entries of the whole layer change: one bias per receiver
                    e = e + rb_full
        elif node.op == "act":
            src = node.inputs[0]
            e_in = radii[src]
            if method == "interval":
                pre_lo, pre_hi = los[src] - e_in, his[src] + e_in
                k = node.act.slope_sup(pre_lo, pre_hi)
                img_lo, img_hi = node.act.image(pre_lo, pre_hi)
                e = torch.minimum(k * e_in + node.act.quant_step * (e_in > 0), img_hi - img_lo)
            else:
                e = node.act.lipschitz * e_in + node.act.quant_step * (e_in > 0)
            if i in p.act_radius:
                e = e + p.act_radius[i]
        elif node.op == "pool":
            e = node.pool(radii[node.inputs[0]])
        elif node.op == "reshape":
            x = radii[node.inputs[0]]
            e = x.reshape(x.shape[0], *node.shape)
        else:
            e = sum(radii[j] for j in node.inputs)
        if rounding is not None and node.op != "input":
            mags = [sup_abs(los[j], his[j]) + radii[j] for j in node.inputs]
            e, _ = add_rounding(node, e, mags, sup_abs(los[i], his[i]) + e, p.weight_radius.get(i), rounding)
        if tighten is not None:
            t = tighten(i, e, radii)
            if t is not None:
                e = torch.minimum(e, t)
        radii.append(e)
    return radii


def paper_perturbation(net: Network, p: WeightPerturbation, sups: list[Tensor]) -> float:
    """Theory 3.1's scalar recursion, extended like :mod:`hwrel.bounds.paper` to pools and residuals."""
    E: list[float] = []
    U: list[float] = []
    for i, node in enumerate(net.nodes):
        if node.op == "input":
            e_sum, u = 0.0, 0.0
        elif node.op == "affine":
            src = node.inputs[0]
            nu = float(p.weight_radius[i].max()) if i in p.weight_radius else 0.0
            nub = float(p.bias_radius[i].max()) if i in p.bias_radius else 0.0
            w_t = node.affine.max_abs_weight + nu
            c_in = float(sups[src].max())
            n_in = node.affine.fan_in
            if p.count is not None:
                n_in = min(n_in, p.count)
            u = w_t * E[src] + nu * n_in * c_in + nub
            e_sum = node.size * u
        elif node.op == "act":
            src = node.inputs[0]
            k = node.act.lipschitz
            step = node.act.quant_step if U[src] > 0 else 0.0
            r = p.act_radius.get(i, 0.0)
            extra = float(r.max()) if isinstance(r, Tensor) else float(r)
            u = k * U[src] + step + extra
            e_sum = k * E[src] + node.size * (step + extra)
        elif node.op == "pool":
            src = node.inputs[0]
            u = node.pool.gain * U[src]
            e_sum = min(node.pool.overlap * E[src], node.size * u)
        elif node.op == "reshape":
            e_sum, u = E[node.inputs[0]], U[node.inputs[0]]
        else:
            e_sum, u = sum(E[j] for j in node.inputs), sum(U[j] for j in node.inputs)
        if u > 0:  # float32 rounding of both forwards where they differ
            nu = float(p.weight_radius[i].max()) if node.op == "affine" and i in p.weight_radius else 0.0
            r = 2 * scalar_rounding(node, [float(sups[j].max()) + U[j] for j in node.inputs],
                                    float(sups[i].max()) + u, nu)
            u, e_sum = u + r, e_sum + node.size * r
        E.append(e_sum)
        U.append(u)
    return U[-1]


def perturbation_bound(net: Network, p: WeightPerturbation, method: str = "interval",
                       lo: Tensor | None = None, hi: Tensor | None = None) -> Tensor:
    """Per-box, per-output bound ``(B, n_out)`` on ``|F~(x) - F(x)|`` for ``x`` in the box(es).

    ``net`` should be in float64 (``net.to()``); the default box is the network's input domain.
    """
    if method not in PERTURB_METHODS:
        raise HwrelError(f"unknown method {method!r}; expected one of {', '.join(PERTURB_METHODS)}")
    lo = net.input_lo[None] if lo is None else lo
    hi = net.input_hi[None] if hi is None else hi
    nominal = interval_bounds(net, lo, hi)
    if method == "paper":
        sups = [sup_abs(a, b).amax(dim=tuple(range(1, a.dim())) if a.dim() > 1 else 0, keepdim=False)
                for a, b in zip(*nominal)]
        if lo.shape[0] != 1:
            raise HwrelError("the paper's bound is domain-wide: use one box")
        val = paper_perturbation(net, p, [s.max() for s in sups])
        return torch.full((1, net.nodes[-1].size), val, dtype=net.input_lo.dtype, device=net.input_lo.device)
    radii = perturbation_radii(net, p, lo, hi, method, nominal)
    return radii[-1].flatten(1)


def site_gains(net: Network) -> dict[int, Tensor]:
    """Per affine node: gain of each receiving neuron to the worst output, ``(*shape)``.

    With global slopes, an error ``d`` added to neuron ``j`` of affine node ``a`` moves every output
    by at most ``g[a][j] * d`` (sound for any input in the domain and any size of ``d``).
    """
    slopes = {i: n.act.lipschitz for i, n in enumerate(net.nodes) if n.op == "act"}
    at = list(net.synapse_layers)
    g = gains(net, slopes, at, 1)
    return {i: g[i].amax(dim=0)[0] for i in at}
