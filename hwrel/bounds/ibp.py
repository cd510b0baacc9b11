"""Interval bound propagation (IBP): sound nominal ranges of every node over an input box."""
from __future__ import annotations

import torch
from torch import Tensor

from hwrel.bounds.fp32 import local_rounding
from hwrel.network import Network, Node


def affine_interval(node: Node, lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor]:
    """Exact-in-exact-arithmetic interval image of an affine map (centre/radius form)."""
    a = node.affine
    mid, rad = (hi + lo) / 2, (hi - lo) / 2
    c = a(mid)
    r = a.abs_map(rad)
    return c - r, c + r


def node_interval(node: Node, ins: list[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    lo, hi = ins[0]
    if node.op == "affine":
        return affine_interval(node, lo, hi)
    if node.op == "act":
        return node.act.image(lo, hi)
    if node.op == "pool":  # max and avg pooling are monotone
        return node.pool(lo), node.pool(hi)
    if node.op == "reshape":
        return lo.reshape(lo.shape[0], *node.shape), hi.reshape(hi.shape[0], *node.shape)
    if node.op == "add":
        return sum(i[0] for i in ins), sum(i[1] for i in ins)
    raise ValueError(node.op)


@torch.no_grad()
def interval_bounds(net: Network, lo: Tensor, hi: Tensor, float32: bool = True) -> tuple[list[Tensor], list[Tensor]]:
    """Per-node ``(lo, hi)`` for inputs in the box ``[lo, hi]`` (batched: shape ``(B, *input_shape)``).

    Sound: every value a node takes for an input in the box lies within its interval, both in
    exact arithmetic and (``float32``) in the model's float32 forward: each interval is widened by
    the rounding the float32 evaluation of its node may add (:mod:`hwrel.bounds.fp32`).
    ``float32=False``: exact arithmetic only (a box of one point gives the point's exact values).
    """
    los: list[Tensor] = []
    his: list[Tensor] = []
    for node in net.nodes:
        if node.op == "input":
            l, h = lo, hi
        else:
            ins = [(los[j], his[j]) for j in node.inputs]
            l, h = node_interval(node, ins)
            r = local_rounding(node, [sup_abs(a, b) for a, b in ins], sup_abs(l, h)) if float32 else 0.0
            if isinstance(r, Tensor):
                l, h = l - r, h + r
        los.append(l)
        his.append(h)
    return los, his


def sup_abs(lo: Tensor, hi: Tensor) -> Tensor:
    return torch.maximum(lo.abs(), hi.abs())


def point_rounding(net: Network, x: Tensor) -> list[Tensor]:
    """Per node and input ``(B,)``: how far the float32 forward of ``x`` may be from the exact
    value of each neuron of that node (sound: the width of the point's widened interval; loose on
    deep networks, where interval arithmetic amplifies the rounding layer after layer)."""
    los, his = interval_bounds(net, x, x)
    return [(h - l).flatten(1).amax(1) if h.dim() > 1 else (h - l) for l, h in zip(los, his)]
