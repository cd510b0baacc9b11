"""Domain-aware bounds: per-neuron error radii over the reachable set (theory section 4).

Everything here is batched over boxes: a batch of one box gives a bound over the input domain, a
batch of points (``lo == hi``) gives per-sample certified errors.

Two sound bounds, each returning a per-output-coordinate error bound of shape ``(B, n_out)``:

- :func:`forward_radii`: propagate elementwise radii ``e >= |dy|``. An activation multiplies by
  its largest slope over the *faulty* reachable pre-activation interval ``[lo - e, hi + e]`` (and
  is capped by the width of its image there); at a failing layer any ``f`` neurons may be off by
  their own ``delta_i`` instead, and the next affine layer lets every receiving neuron take its own
  worst ``f`` senders (top-``f`` sum of ``|W_ji| * (delta_i - e_i)^+``).
- :func:`gain_bound`: the same positive linear error map read backwards (gain vectors, theory 4b)
  with the slopes found by the forward pass: ``sum_l TopSum_f(delta_l * g_l)``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from hwrel.bounds.faults import FaultModel
from hwrel.bounds.fp32 import local_rounding
from hwrel.bounds.ibp import interval_bounds, sup_abs
from hwrel.network import Network, Node

_CHUNK = 1 << 24  # elements of a temporary (B, out, in) product


def topsum(x: Tensor, k: int, dim: int = -1) -> Tensor:
    """Sum of the ``k`` largest entries along ``dim`` (all of them if ``k`` >= the size)."""
    if k <= 0:
        return x.sum(dim) * 0
    if k >= x.shape[dim]:
        return x.sum(dim)
    return torch.topk(x, k, dim=dim).values.sum(dim)


def linear_topsum(w_abs: Tensor, extra: Tensor, k: int) -> Tensor:
    """Per batch and receiver ``(..., j)``: ``TopSum_k(|W_j| * extra[..., :])``.

    ``extra`` is ``(B, *lead, in)``: a Linear acts on the last dimension, so receiver ``j`` at a
    leading position takes its senders from that position only. Returns ``(B, *lead, out)``.
    """
    if k >= w_abs.shape[1]:
        return extra @ w_abs.T
    rows = extra.reshape(-1, extra.shape[-1])
    out = []
    step = max(1, _CHUNK // max(1, w_abs.numel()))
    for b in range(0, rows.shape[0], step):
        prod = w_abs[None] * rows[b:b + step, None, :]
        out.append(topsum(prod, k, dim=-1))
    return torch.cat(out).reshape(*extra.shape[:-1], w_abs.shape[0])


def conv_topsum(node: Node, extra: Tensor, k: int) -> Tensor:
    """Sound ``TopSum_k`` term for a convolution: top-``k`` kernel weights of each output channel times
    the largest ``extra`` in the receptive window (all channels). Capped by ``|W| * extra``."""
    a = node.affine
    w = a.weight.abs()
    ts = topsum(w.flatten(1), k, dim=1)  # (C_out,)
    m = extra.amax(dim=1, keepdim=True)
    ph, pw = a.padding
    m = F.pad(m, (pw, pw, ph, ph))
    win = F.max_pool2d(m, w.shape[2:], a.stride, 0, a.dilation)
    return torch.minimum(ts[None, :, None, None] * win, a.abs_map(extra))


def affine_topsum(node: Node, extra: Tensor, k: int) -> Tensor:
    if node.affine.kind == "linear":
        return linear_topsum(node.affine.weight.abs(), extra, k)
    return conv_topsum(node, extra, k)


@dataclass
class RadiiResult:
    bound: Tensor  # (B, n_out) per output coordinate
    radii: list[Tensor]  # per node, resolved elementwise radii (B, *shape)
    slopes: dict[int, Tensor]  # per act node: slope bound used, (B, *shape)
    deltas: dict[int, Tensor]  # per failing layer node: per-neuron delta (B, *shape)
    syn_deltas: dict[int, Tensor]  # per affine with synapse faults: per-input delta
    rounding: dict[int, Tensor]  # per node a fault reaches: float32 rounding added there (B, *shape)


# How float32 rounding enters an error radius (see :mod:`hwrel.bounds.fp32`):
BOTH = "both"  # both forwards (faulty and clean) run in float32; the nominal ranges cover both
FAULTY = "faulty"  # the faulty forward runs in float32, the clean reference is exact


def add_rounding(node: Node, e: Tensor, mags: list[Tensor], out_mag: Tensor | None = None,
                 weight_radius: Tensor | None = None, mode: str | None = BOTH) -> tuple[Tensor, Tensor | None]:
    """``e`` plus the float32 rounding at ``node``; returns the new radius and what was added.

    ``BOTH``: where ``e`` is 0 no fault reaches the neuron, and the faulty and the clean forward
    compute the same float32 operations on the same values; elsewhere each rounds once, by at most
    :func:`hwrel.bounds.fp32.local_rounding`. ``FAULTY``: the faulty forward rounds everywhere
    (against an exact clean reference). ``None``: exact arithmetic, nothing added.
    """
    if mode is None:
        return e, None
    r = local_rounding(node, mags, out_mag, weight_radius)
    if not isinstance(r, Tensor):
        return e, None
    add = 2 * r * (e > 0) if mode == BOTH else r.expand_as(e)
    return e + add, add


def neuron_deltas(fault: FaultModel, lo: Tensor, hi: Tensor) -> Tensor:
    return fault.delta(sup_abs(lo, hi))


@torch.no_grad()
def forward_radii(net: Network, fault: FaultModel, counts: dict[int, int], lo: Tensor, hi: Tensor,
                  nominal: tuple[list[Tensor], list[Tensor]] | None = None,
                  rounding: str | None = BOTH) -> RadiiResult:
    """Sound per-neuron error radii; ``counts`` maps layer (or affine) node index to failure count.

    ``rounding`` (see :func:`add_rounding`): ``BOTH`` bounds the difference of the faulty and the
    clean float32 forwards (``nominal`` must then cover the clean float32 values, as
    :func:`interval_bounds` gives them); ``FAULTY`` the faulty float32 forward against the exact
    clean network (``nominal``: exact values, ``interval_bounds(..., float32=False)``)."""
    if nominal is None:
        los, his = interval_bounds(net, lo, hi, float32=rounding == BOTH)
    else:
        los, his = nominal
    radii: list[Tensor] = []
    pending: list[tuple[Tensor, int] | None] = []
    slopes: dict[int, Tensor] = {}
    deltas: dict[int, Tensor] = {}
    syn_deltas: dict[int, Tensor] = {}
    rounding: dict[int, Tensor] = {}

    def resolved(j: int) -> Tensor:
        p = pending[j]
        return radii[j] if p is None else radii[j] + p[0]

    def mag(j: int) -> Tensor:  # bounds |value| of node j in both the clean and the faulty forward
        return sup_abs(los[j], his[j]) + resolved(j)

    for i, node in enumerate(net.nodes):
        pend = None
        out_mag = None
        if node.op == "input":
            e = torch.zeros_like(lo)
        elif node.op == "affine":
            src = node.inputs[0]
            e = node.affine.abs_map(radii[src])
            if pending[src] is not None:
                extra, f = pending[src]
                e = e + affine_topsum(node, extra, f)
            g = counts.get(i, 0) if fault.synapse else 0
            if g:
                d = neuron_deltas(fault, los[src], his[src])
                syn_deltas[i] = d
                e = e + affine_topsum(node, d, g)
        elif node.op == "act":
            src = node.inputs[0]
            e_in = resolved(src)
            pre_lo, pre_hi = los[src] - e_in, his[src] + e_in
            k = node.act.slope_sup(pre_lo, pre_hi)
            slopes[i] = k
            img_lo, img_hi = node.act.image(pre_lo, pre_hi)
            out_mag = sup_abs(img_lo, img_hi)
            step = node.act.quant_step
            e = torch.minimum(k * e_in + step * (e_in > 0), img_hi - img_lo)
        elif node.op == "pool":
            e = node.pool(resolved(node.inputs[0]))
        elif node.op == "reshape":
            src = node.inputs[0]
            e = radii[src].reshape(radii[src].shape[0], *node.shape)
            if pending[src] is not None:
                pend = (pending[src][0].reshape(e.shape), pending[src][1])
        elif node.op == "add":
            e = sum(resolved(j) for j in node.inputs)
        else:  # pragma: no cover
            raise ValueError(node.op)
        if node.op != "input":
            e, added = add_rounding(node, e, [mag(j) for j in node.inputs], out_mag, mode=rounding)
            if added is not None:
                rounding[i] = added
        if node.op == "act":
            f = counts.get(i, 0) if not fault.synapse else 0
            if f:
                # d covers |clean value| (in float32 too, with BOTH: the nominal range is widened),
                # so a failed neuron is off by at most d from the clean value
                d = neuron_deltas(fault, los[i], his[i])
                deltas[i] = d
                pend = (torch.relu(d - e), f)
        radii.append(e)
        pending.append(pend)
    out = resolved(len(net.nodes) - 1)
    return RadiiResult(out.flatten(1), [resolved(j) for j in range(len(net.nodes))], slopes, deltas, syn_deltas,
                       rounding)


def _positive_map(net: Network, slopes: dict[int, Tensor | float], injections: dict[int, Tensor],
                  batch: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """The positive linear error map from per-node injections to the output, ``(B, n_out)``."""
    vals: list[Tensor] = []
    for i, node in enumerate(net.nodes):
        if node.op == "input":
            v = torch.zeros(batch, *node.shape, dtype=dtype, device=device)
        elif node.op == "affine":
            v = node.affine.abs_map(vals[node.inputs[0]])
        elif node.op == "act":
            v = slopes[i] * vals[node.inputs[0]]
        elif node.op == "pool":
            x = vals[node.inputs[0]]
            p = node.pool
            if p.kind == "max":  # max of a window <= its sum: linear and sound
                v = F.avg_pool2d(x, p.kernel, p.stride, p.padding, p.ceil_mode, count_include_pad=True)
                v = v * (p.kernel[0] * p.kernel[1])
            else:
                v = p(x)
        elif node.op == "reshape":
            x = vals[node.inputs[0]]
            v = x.reshape(x.shape[0], *node.shape)
        else:
            v = sum(vals[j] for j in node.inputs)
        if i in injections:
            v = v + injections[i]
        vals.append(v)
    return vals[-1].flatten(1)


def gains(net: Network, slopes: dict[int, Tensor | float], at: list[int], batch: int) -> dict[int, Tensor]:
    """Gain vectors: ``g[node][o]`` = d output_o / d injection at ``node`` of the positive error map.

    Returns per node a tensor ``(n_out, B, *shape)``.
    """
    dtype = net.input_lo.dtype
    device = net.input_lo.device
    inj = {i: torch.zeros(batch, *net.nodes[i].shape, dtype=dtype, device=device, requires_grad=True) for i in at}
    with torch.enable_grad():
        out = _positive_map(net, slopes, inj, batch, dtype, device)
        n_out = out.shape[1]
        per: dict[int, list[Tensor]] = {i: [] for i in at}
        for o in range(n_out):
            grads = torch.autograd.grad(out[:, o].sum(), [inj[i] for i in at], retain_graph=o < n_out - 1,
                                        allow_unused=True)
            for i, g in zip(at, grads):
                per[i].append(torch.zeros_like(inj[i]) if g is None else g.detach())
    return {i: torch.stack(v) for i, v in per.items()}


def global_slopes(net: Network) -> dict[int, float]:
    return {i: n.act.lipschitz for i, n in enumerate(net.nodes) if n.op == "act"}
