"""Certified-masked weight and bias changes: flips proven not to change any input's top-1 class.

Two sound certificates, both about the injector's own stored weights and inputs (see
:class:`hwrel.inject.engine.Injector`), so a certified site needs no forward at all:

* *dead inputs* (:func:`dead_weights`, exact): a weight whose every input value is exactly zero,
  for every input of the batch and every position it is applied at (padding of a convolution
  whose output is smaller than its kernel's reach, ReLU zeros, ...), contributes ``w * 0 = 0``
  whatever finite value it holds. The faulty forward then computes the same sums, term for term,
  as the clean one: every value downstream equals the clean one (a zero may change sign), so the
  outputs are the clean outputs and no class changes (value-exact, not only top-1). Assumes, as
  :mod:`hwrel.bounds.fp32` does, a direct or GEMM convolution (not Winograd or FFT).
* *bounded change* (:class:`LayerCertificate`, sound including float32 rounding): per affine
  node ``L``, output unit or channel ``j`` and input ``b``, a radius ``tau[j, b]`` such that any
  change of that unit (at every row or spatial position) of magnitude at most ``tau`` leaves the
  top-1 class of input ``b`` unchanged in any float32 evaluation. Found by bisection over
  ``tau = 2^k`` on an elementwise error propagation from ``L`` to the output (activations take
  their largest slope over the reachable interval, max pools the largest radius, every node
  downstream adds twice its float32 rounding, :func:`hwrel.bounds.interval.add_rounding`); the
  propagated bound is monotone in ``tau``, so the bisection is exact about what it certifies. A
  Linear layer applied over rows (inputs with positions) changes unit ``j`` at every row: the
  radius holds for all rows at once. The bound is on the faulty float32 forward against the
  clean float32 forward of the same evaluation (the injector's clean run; the deep-copied model
  with the value written, computed like the clean model, keeps its class): slopes are taken
  between the clean values and the faulty ones (within the radius), and the top-1 check compares
  with the clean float32 outputs themselves.

  A weight ``(j, i)`` (or ``(co, ci, a, b)``) changed by ``dw`` changes the faulty layer's unit
  ``j`` by at most ``|dw| * X_b(i) (1 + 2 g) + 2 R[j, b]`` for input ``b`` (``X``: its largest
  input magnitude over the positions it is applied at; ``R``: the layer's own float32 rounding
  bound, ``g`` its rounding factor), so it is certified when ``|dw| <= T_w`` with
  ``T_w = min_b (tau[j, b] - 2 R[j, b]) / ((1 + 2 g) X_b(i))`` (:meth:`LayerCertificate.weight_threshold`).
  For the mantissa bits of a float word ``|dw|`` grows with the bit position, so the certified
  bits of a word are its low positions up to a cut: found by comparing each bit's exact change to
  ``T_w`` (no bit is assumed masked because a higher one is).

Grouped convolutions are not certified (every site is injected).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from hwrel.bounds.fp32 import gamma, local_rounding
from hwrel.bounds.ibp import sup_abs
from hwrel.bounds.interval import BOTH, add_rounding
from hwrel.inject.windows import window_max, zero_input_weights  # noqa: F401  (re-exported)
from hwrel.network import Network

K_LO, K_HI = -80, 24  # tau = 2^k searched in this range (k = K_LO - 1: nothing certified)
_ROWS = 1 << 23  # floats per stacked radius tensor (J x B rows of a node)


@dataclass
class Nominal:
    """The certificate's view of an injector: its network in float64 and, per node, the interval
    covering the exact and every float32 clean value of each input point."""

    net: Network
    los: list[Tensor]
    his: list[Tensor]
    clean: Tensor  # (B, n_out) float64: the clean float32 outputs of the injector's evaluation
    top1: Tensor  # (B,) their top-1 class


def nominal(inj) -> Nominal:  # noqa: ANN001
    """Float64 copy of ``inj``'s network (its stored weights) and, per node, the clean float32
    values of its run as point intervals: the faulty forward is compared with the clean forward of
    the same evaluation, whose values these are (a faulty value lies within its radius of them).
    (Intervals widened for any float32 evaluation, :func:`hwrel.bounds.ibp.interval_bounds`, grow
    layer after layer: on a ResNet-18 the last layer's input magnitudes reached 1e4 for logits of
    0.07, and nothing was certifiable.)"""
    net = inj.net.to(torch.float64, inj.device)
    vals = [c.double() for c in inj.clean]
    return Nominal(net, vals, vals, vals[-1], inj.clean_top1)


def _unit_box(node_shape: tuple[int, ...], rows: bool, J: int, tau: Tensor, units: Tensor) -> Tensor:
    """``(J, B, *node_shape)`` radii: ``tau[j, b]`` on unit/channel ``units[j]`` (at every row of
    a Linear over rows, at every position of a channel), 0 elsewhere."""
    B = tau.shape[1]
    ar = torch.arange(J, device=tau.device)
    if rows:
        e = torch.zeros(J, B, int(np.prod(node_shape[:-1])), node_shape[-1], dtype=tau.dtype, device=tau.device)
        e[ar, :, :, units] = tau[:, :, None]
    elif len(node_shape) == 3:
        e = torch.zeros(J, B, node_shape[0], node_shape[1] * node_shape[2], dtype=tau.dtype, device=tau.device)
        e[ar, :, units, :] = tau[:, :, None]
    else:
        e = torch.zeros(J, B, node_shape[0], dtype=tau.dtype, device=tau.device)
        e[ar, :, units] = tau
    return e.reshape(J, B, *node_shape)


def propagate(nom: Nominal, start: int, e_start: Tensor) -> Tensor:
    """Output radii ``(J, B, n_out)`` bounding ``|faulty - clean|`` of any float32 evaluation,
    for a change of node ``start`` bounded elementwise by ``e_start`` ``(J, B, *shape)`` (its own
    rounding included), every node after it adding twice its float32 rounding where the change
    reaches it. Sound: the rules of :func:`hwrel.bounds.interval.forward_radii`."""
    net, los, his = nom.net, nom.los, nom.his
    J, B = e_start.shape[:2]
    radii: dict[int, Tensor] = {start: e_start}

    def flat(t: Tensor) -> Tensor:
        return t.reshape(J * B, *t.shape[2:])

    def unflat(t: Tensor) -> Tensor:
        return t.reshape(J, B, *t.shape[1:])

    def mag(j: int) -> Tensor:
        m = sup_abs(los[j], his[j])[None]
        return m + radii[j] if j in radii else m.expand(J, *m.shape[1:])

    for i in range(start + 1, len(net.nodes)):
        node = net.nodes[i]
        if not any(j in radii for j in node.inputs):
            continue
        out_mag = None
        if node.op == "affine":
            e = unflat(node.affine.abs_map(flat(radii[node.inputs[0]])))
        elif node.op == "act":
            src = node.inputs[0]
            e_in = radii[src]
            pre_lo, pre_hi = los[src][None] - e_in, his[src][None] + e_in
            k = node.act.slope_sup(pre_lo, pre_hi)
            img_lo, img_hi = node.act.image(pre_lo, pre_hi)
            out_mag = sup_abs(img_lo, img_hi)
            e = torch.minimum(k * e_in + node.act.quant_step * (e_in > 0), img_hi - img_lo)
        elif node.op == "pool":
            e = unflat(node.pool(flat(radii[node.inputs[0]])))
        elif node.op == "reshape":
            src = radii[node.inputs[0]]
            e = src.reshape(J, B, *node.shape)
        elif node.op == "add":
            e = sum(radii[j] for j in node.inputs if j in radii)
        else:  # pragma: no cover
            raise ValueError(node.op)
        mags = [flat(mag(j)) for j in node.inputs]
        e2, _ = add_rounding(node, flat(e), mags, None if out_mag is None else flat(out_mag), mode=BOTH)
        radii[i] = unflat(e2)
        for j in list(radii):
            if j != i and all(c <= i for c in _consumers(net)[j]):
                del radii[j]
    last = len(net.nodes) - 1
    if last not in radii:
        return torch.zeros(J, B, net.nodes[last].size, dtype=e_start.dtype, device=e_start.device)
    return radii[last].reshape(J, B, -1)


_CONS: dict[int, list[list[int]]] = {}


def _consumers(net: Network) -> list[list[int]]:
    key = id(net)
    if key not in _CONS:
        _CONS.clear()
        _CONS[key] = [c if c else [len(net.nodes)] for c in net.consumers()]
    return _CONS[key]


def top1_kept(nom: Nominal, e_out: Tensor) -> Tensor:
    """``(J, B)``: the output radii ``e_out`` ``(J, B, n_out)`` keep the top-1 class at the clean
    one, ``z_p - z_k > e_p + e_k`` for every ``k != p``, where ``z`` is the clean float32 output
    of the evaluation the faulty one is compared with (the radii bound faulty minus clean of one
    and the same float32 evaluation, :data:`hwrel.bounds.interval.BOTH`)."""
    z = nom.clean.reshape(e_out.shape[1], -1)
    p = nom.top1[:, None]
    z_p = z.gather(1, p)  # (B, 1)
    e_p = e_out.gather(2, p[None].expand(e_out.shape[0], -1, 1))  # (J, B, 1)
    gap = z_p[None] - z[None] - e_p - e_out  # (J, B, K)
    gap.scatter_(2, p[None].expand(e_out.shape[0], -1, 1), math.inf)
    return (gap > 0).all(2)


@dataclass
class LayerCertificate:
    """The bounded-change certificate of affine node ``node`` (see the module docstring)."""

    node: int
    tau: Tensor  # (J, B) float64: certified radius per output unit/channel and input (0: none)
    rounding: Tensor  # (J, B): R, the layer's own float32 rounding bound (max over positions)
    g: float  # the layer's rounding factor (gamma of its fan-in)
    x_max: Tensor  # linear (B, in_features) / conv (B, Cin, kh, kw): X_b(i)

    def weight_threshold(self, weight_shape: tuple[int, ...]) -> Tensor:
        """``T_w`` per weight (flat, float64; negative where nothing is certified)."""
        num = self.tau - 2 * self.rounding  # (J, B)
        J = num.shape[0]
        xm = self.x_max.reshape(self.x_max.shape[0], -1)  # (B, I)
        out = torch.empty(J, xm.shape[1], dtype=torch.float64, device=num.device)
        step = max(1, (1 << 24) // max(1, xm.numel()))
        for j0 in range(0, J, step):
            n = num[j0: j0 + step, :, None]  # (j, B, 1)
            with torch.no_grad():
                t = torch.where(xm[None] > 0, n / ((1 + 2 * self.g) * xm[None]), math.inf)
                t = torch.where(n >= 0, t, -1.0)
            out[j0: j0 + step] = t.amin(1)
        return out.reshape(-1)

    def bias_threshold(self) -> Tensor:
        num = self.tau - 2 * self.rounding
        t = num / (1 + 2 * self.g)
        return torch.where(num >= 0, t, torch.full_like(t, -1.0)).amin(1)


def input_max(nom: Nominal, node: int) -> Tensor:
    """``X_b(i)``: largest magnitude of each weight's (clean) input over the positions it is
    applied at."""
    nd = nom.net.nodes[node]
    src = nd.inputs[0]
    return window_max(nd, sup_abs(nom.los[src], nom.his[src]))


def dead_weights(nom: Nominal, node: int) -> Tensor:
    """Flat bool per weight of affine ``node``: every input value it multiplies is exactly zero
    in the clean run, for every input and position (so any finite value there leaves the outputs
    exactly clean)."""
    nd = nom.net.nodes[node]
    src = nd.inputs[0]
    return zero_input_weights(nd, sup_abs(nom.los[src], nom.his[src]))


def downstream_macs(net: Network, node: int) -> int:
    """Multiply-adds per input of the affine layers after ``node`` (what one propagation costs)."""
    return sum(n.size * n.affine.fan_in for n in net.nodes[node + 1:] if n.op == "affine")


def certificate(nom: Nominal, node: int, *, max_rows: int = _ROWS,
                max_macs: float = 5e10) -> LayerCertificate | None:
    """The bounded-change certificate of affine ``node``; None for grouped convolutions and where
    the bisection would cost more than ``max_macs`` multiply-adds (units x inputs x downstream
    multiply-adds x iterations: deep layers of big networks, whose sites are then injected).

    Bisection over ``k`` in ``K_LO..K_HI`` on ``tau = 2^k`` for every (unit, input) at once,
    in stacks of units sized to ``max_rows`` floats per node."""
    nd = nom.net.nodes[node]
    a = nd.affine
    if a.kind == "conv2d" and a.groups != 1:
        return None
    iters = math.ceil(math.log2(K_HI - K_LO + 2))
    if a.weight.shape[0] * nom.los[0].shape[0] * downstream_macs(nom.net, node) * iters > max_macs:
        return None
    src = nd.inputs[0]
    B = nom.los[0].shape[0]
    rows = a.kind == "linear" and len(nom.net.nodes[src].shape) > 1
    J = a.weight.shape[0]
    r = local_rounding(nd, [sup_abs(nom.los[src], nom.his[src])])
    r = torch.as_tensor(r, dtype=torch.float64, device=a.weight.device)
    if r.dim() == 0:
        r = r.expand(B, *nd.shape)
    if rows:
        R = r.reshape(B, -1, J).amax(1).t()
    elif len(nd.shape) == 3:
        R = r.amax((2, 3)).t()
    else:
        R = r.t()
    R = R.contiguous()
    g = gamma(a.fan_in + 1 + (8 if a.fold_magnitude is not None else 0))
    per = max(1, max_rows // max(1, B * max(nom.net.nodes[n].size for n in range(node, len(nom.net.nodes)))))
    lo = torch.full((J, B), K_LO - 1, dtype=torch.int64, device=a.weight.device)
    hi = torch.full((J, B), K_HI + 1, dtype=torch.int64, device=a.weight.device)
    units_all = torch.arange(J, device=a.weight.device)
    while bool((hi - lo > 1).any()):
        mid = (lo + hi) // 2
        ok = torch.empty(J, B, dtype=torch.bool, device=a.weight.device)
        for j0 in range(0, J, per):
            u = units_all[j0: j0 + per]
            tau = torch.ldexp(torch.ones(len(u), B, dtype=torch.float64, device=a.weight.device), mid[u])
            e = _unit_box(tuple(nd.shape), rows, len(u), tau, u)
            ok[u] = top1_kept(nom, propagate(nom, node, e))
        lo = torch.where(ok, mid, lo)
        hi = torch.where(ok, hi, mid)
    tau = torch.where(lo >= K_LO, torch.ldexp(torch.ones_like(lo, dtype=torch.float64), lo),
                      torch.zeros_like(lo, dtype=torch.float64))
    return LayerCertificate(node, tau, R, g, input_max(nom, node))
