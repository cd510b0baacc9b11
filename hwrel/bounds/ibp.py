"""Interval bound propagation (IBP): sound nominal ranges of every node over an input box."""
from __future__ import annotations

import torch
from torch import Tensor

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
def interval_bounds(net: Network, lo: Tensor, hi: Tensor) -> tuple[list[Tensor], list[Tensor]]:
    """Per-node ``(lo, hi)`` for inputs in the box ``[lo, hi]`` (batched: shape ``(B, *input_shape)``).

    Sound: every value a node takes for an input in the box lies within its interval (up to
    float rounding, which the callers absorb with a relative margin).
    """
    los: list[Tensor] = []
    his: list[Tensor] = []
    for node in net.nodes:
        if node.op == "input":
            l, h = lo, hi
        else:
            l, h = node_interval(node, [(los[j], his[j]) for j in node.inputs])
        los.append(l)
        his.append(h)
    return los, his


def sup_abs(lo: Tensor, hi: Tensor) -> Tensor:
    return torch.maximum(lo.abs(), hi.abs())
