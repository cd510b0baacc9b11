"""Gain-vector bound (theory 4b): read the positive error map backwards from each output.

``Fep_W = max_o sum_l TopSum_{f_l}(delta_l (.) g_l[o])``. Sound for any slopes that upper-bound the
activations' derivatives on the faulty reachable set (the global Lipschitz constant, or the
per-neuron slopes of :func:`hwrel.bounds.interval.forward_radii`).
"""
from __future__ import annotations

import torch
from torch import Tensor

from hwrel.bounds.interval import conv_topsum, gains, topsum
from hwrel.network import Network


def gain_bound(net: Network, counts: dict[int, int], slopes: dict[int, Tensor | float],
               deltas: dict[int, Tensor], batch: int, synapse: bool = False,
               quant_slack: dict[int, Tensor] | None = None) -> Tensor:
    """Per-output bound ``(B, n_out)``.

    Args:
        counts: failure count per failing node (layer act nodes, or affine nodes for synapses).
        slopes: per act node, a sound slope bound (float or tensor ``(B, *shape)``).
        deltas: per failing node, the per-failure error, broadcastable to ``(B, *shape)``; for
            synapse faults, the per-input error of the affine's inputs.
        quant_slack: per quantized act node, the additive rounding slack vector ``(B, *shape)``.
    """
    quant_slack = quant_slack or {}
    fail = [i for i, c in counts.items() if c > 0]
    at = sorted(set(fail) | set(quant_slack))
    n_out = net.nodes[-1].size
    dtype = net.input_lo.dtype
    if not at:
        return torch.zeros(batch, n_out, dtype=dtype, device=net.input_lo.device)
    g = gains(net, slopes, at, batch)
    total = torch.zeros(n_out, batch, dtype=dtype, device=net.input_lo.device)
    for i in fail:
        k = counts[i]
        if synapse:
            total += _synapse_term(net, i, g[i], deltas[i], k)
        else:
            d = deltas[i].expand(batch, *net.nodes[i].shape)
            total += topsum((g[i] * d[None]).flatten(2), k, dim=2)
    for i, slack in quant_slack.items():
        total += (g[i] * slack[None]).flatten(2).sum(2)
    return total.T


def _synapse_term(net: Network, i: int, g: Tensor, d_in: Tensor, k: int) -> Tensor:
    """TopSum over (receiver j, sender i') pairs of ``g_j |W_ji'| delta_i'`` (conv: ``k * max``)."""
    node = net.nodes[i]
    a = node.affine
    n_out, batch = g.shape[0], g.shape[1]
    src_shape = net.nodes[node.inputs[0]].shape
    d_in = d_in.expand(batch, *src_shape)
    if a.kind == "linear":
        # a Linear acts on the last dimension: receiver (p, j) hears senders (p, i) only
        w = a.weight.abs()
        n_recv, n_send = w.shape
        out = torch.empty(n_out, batch, dtype=g.dtype, device=g.device)
        for o in range(n_out):
            for b in range(batch):
                pairs = g[o, b].reshape(-1, n_recv, 1) * w * d_in[b].reshape(-1, 1, n_send)
                out[o, b] = topsum(pairs.flatten(), k, dim=0)
        return out
    m = conv_topsum(node, d_in, 1)  # per receiver: the largest single |w| * delta in its window
    return k * (g * m[None]).flatten(2).amax(dim=2)
