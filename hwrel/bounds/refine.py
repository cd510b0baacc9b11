"""Refined error radii for the linearized bound: each unstable neuron gets its own linearized bound.

The remainder of :class:`hwrel.bounds.linearized.LinearizedBound` is driven by neurons within their
error radius of a kink (an unstable ReLU): there the interval radius, which lets every position of a
convolution take its own worst rounding and loses every sign cancellation between layers, turns
into residual. :class:`NeuronRefiner` bounds such a neuron's pre-activation change by the same
theorem with the neuron as the output. Sound; one batched backward pass per unstable neuron.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from hwrel.bounds.linearized import (KINKS, PAD_REL, TAPPED, act_residual, act_slope, group_windows,
                                    injections, is_flat_dense, output_positions, unfold_input)
from hwrel.bounds.perturb import WeightPerturbation
from hwrel.network import Network


def _spans(rows: Tensor) -> list[tuple[int, int, int]]:
    """``(input, start, stop)`` of each run of equal entries in the sorted ``rows``."""
    vals, counts = torch.unique_consecutive(rows, return_counts=True)
    spans, start = [], 0
    for r, n in zip(vals.tolist(), counts.tolist()):
        spans.append((r, start, start + n))
        start += n
    return spans


def neuron_gradients(net: Network, values: list[Tensor], pool_idx: dict[int, Tensor], i: int, rows: Tensor,
                     cols: Tensor, slopes: dict[int, Tensor] | None = None) -> dict[int, Tensor]:
    """Gradients of single neurons (``cols``, flat index into node ``i``) of inputs ``rows`` along
    the linearized network, at every affine, activation and max-pool output before ``i``. ``rows``
    must be sorted (as :func:`torch.nonzero` returns them).

    The same tangents as :func:`linearize` (activation slopes :func:`act_slope`, max-pools through
    their nominal arg-max), from the nominal ``values`` without a new forward pass: one backward
    pass for all ``(row, col)`` pairs at once. ``slopes``: the activation slopes of every input
    (activation node -> ``(B, *shape)``), if already known. Returns ``node -> (P, 1, *shape)``.
    """
    p = len(rows)
    dtype = values[0].dtype
    spans = _spans(rows)
    device = values[0].device
    seed = torch.zeros(p, net.nodes[i].size, dtype=dtype, device=device)
    seed[torch.arange(p, device=device), cols] = 1.0
    adj: dict[int, Tensor] = {i: seed.reshape(p, *net.nodes[i].shape)}
    grads: dict[int, Tensor] = {}

    def send(j: int, g: Tensor) -> None:
        if net.nodes[j].op != "input":
            adj[j] = adj[j] + g if j in adj else g

    for k in range(i, 0, -1):
        a = adj.pop(k, None)
        if a is None:
            continue
        node = net.nodes[k]
        if node.op in TAPPED:
            grads[k] = a[:, None]
        src = node.inputs[0]
        if node.op != "add" and net.nodes[src].op == "input":
            continue  # nothing before the input needs a gradient
        if node.op == "affine":
            aff = node.affine
            if aff.kind == "linear":
                send(src, a @ aff.weight)
            else:
                send(src, torch.nn.grad.conv2d_input((p, *net.nodes[src].shape), aff.weight, a, aff.stride,
                                                     aff.padding, aff.dilation, aff.groups))
        elif node.op == "act":
            d = slopes[k] if slopes is not None and k in slopes else act_slope(node.act, values[src])
            out = torch.empty_like(a)
            for r, lo, hi in spans:  # each input's slopes in place, no per-pair copy
                torch.mul(a[lo:hi], d[r], out=out[lo:hi])
            send(src, out)
        elif node.op == "pool" and node.pool.kind == "max":
            idx = pool_idx[k][rows]
            flat = a.new_zeros(p, a.shape[1], net.nodes[src].size // a.shape[1])
            send(src, flat.scatter_add(2, idx.flatten(2), a.flatten(2)).reshape(p, *net.nodes[src].shape))
        elif node.op == "add":
            for j in node.inputs:
                send(j, a)
        else:  # reshape, average pool: linear, differentiate at zero
            with torch.enable_grad():
                z = torch.zeros(p, *net.nodes[src].shape, dtype=dtype, device=device, requires_grad=True)
                g, = torch.autograd.grad(node.apply([z]), z, a)
            send(src, g)
    return grads


class NeuronRefiner:
    """Tighter sound radii for the pre-activations that decide the remainder.

    The remainder of :class:`LinearizedBound` is driven by neurons within their error radius of a
    kink (an unstable ReLU): there the interval radius, which lets every position of a convolution
    take its own worst rounding and loses every sign cancellation between layers, turns into
    residual. Each such neuron gets its own linearized bound instead (the same theorem with the
    neuron as the output): exact first order over every weight before it, plus the remainder of the
    layers before it, computed in topological order so that each refinement feeds the next. Used as
    the ``tighten`` hook of :func:`hwrel.bounds.perturb.perturbation_radii`; sound, and capped there
    at the interval radius. Cost: one backward pass of the network up to the neuron (from the
    nominal state, batched), per unstable neuron and input.
    """

    def __init__(self, net: Network, chunk: int = 512):
        self.net, self.chunk = net, chunk
        self.targets: dict[int, int] = {}  # node -> the activation node it feeds
        for i, node in enumerate(net.nodes):
            if node.op != "act" or node.act.kind not in KINKS or node.act.kind == "identity":
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

    def _prepare(self, values, pool_idx, p: WeightPerturbation, radii, i: int, float32: bool = False) -> None:
        """Per input, what every pair shares up to node ``i`` (included): injections, slopes, and
        per affine node the first-order data (conv: unfolded input; dense: ``R |y|``)."""
        # node i's own second-order and bias terms included: they enter its pre-activation too
        todo = [k for k in range(i + 1) if k not in self._inject]
        self._inject.update(injections(self.net, p, values, pool_idx, radii, todo, float32))
        for k in range(1, i + 1):
            nd = self.net.nodes[k]
            if k in self._first or k in self._slopes or nd.op not in ("affine", "act"):
                continue
            if nd.op == "act":
                self._slopes[k] = act_slope(nd.act, values[nd.inputs[0]])
            elif k in p.weight_radius:
                y = values[nd.inputs[0]]
                self._first[k] = (F.linear(y.abs(), p.weight_radius[k]) if is_flat_dense(nd, y)
                                  else unfold_input(nd, y))

    def _pair_bound(self, grads: dict[int, Tensor], rows: Tensor, p: WeightPerturbation) -> Tensor:
        """:meth:`LinearizedBound.bounds` for single neurons (``grads`` of :func:`neuron_gradients`),
        the per-input data shared through :meth:`_prepare`. ``rows`` is sorted: the pairs of one
        input are contiguous and use that input's data in place (no per-pair copies)."""
        dtype = next(iter(grads.values())).dtype
        spans = _spans(rows)
        total = torch.zeros(len(rows), dtype=dtype, device=rows.device)
        for k, g in grads.items():
            g = g[:, 0]
            inj, first = self._inject.get(k), self._first.get(k)
            # windows (convolutions, Linear on rows) or, for a flat dense layer, R |y|
            conv_first = first is not None and first.dim() == 3
            flat = g.abs().flatten(1) if inj is not None or (first is not None and not conv_first) else None
            if inj is not None:
                for r, a, b in spans:  # |g| . injection
                    total[a:b] += flat[a:b] @ inj[r].flatten()
            if first is None:
                continue
            if not conv_first:  # dense: |g| . (R |y|)
                for r, a, b in spans:
                    total[a:b] += flat[a:b] @ first[r]
                continue
            rw = p.weight_radius[k].flatten()
            g3 = output_positions(self.net.nodes[k], g)
            for r, a, b in spans:  # <|G|, R>, G = g x windows summed over positions, then |.|
                windows = group_windows(self.net.nodes[k], g3[a:b] @ first[r].transpose(0, 1))
                total[a:b] += windows.abs().flatten(1) @ rw
        return total

    def unstable(self, i: int, s: Tensor, e: Tensor) -> Tensor:
        """Neurons of node ``i`` whose interval ``s +- e`` reaches a kink of the activation it feeds."""
        act = self.net.nodes[self.targets[i]].act
        out = torch.zeros_like(s, dtype=torch.bool)
        for at, _ in KINKS[act.kind](act):
            out |= (s - at).abs() < e
        return out

    def refine(self, x: Tensor, values: list[Tensor], pool_idx: dict[int, Tensor], p: WeightPerturbation, i: int,
               e: Tensor, radii: list[Tensor], weight=None, share: float = 0.0,
               float32: bool = False) -> Tensor | None:
        """Sound radii for node ``i`` at inputs ``x`` (nominal ``values`` and max-pool arg-maxes of
        :func:`linearize`), given the radii of the nodes before it. ``float32``: the perturbed
        forward runs in float32 against the exact clean network (see
        :meth:`LinearizedBound.bounds`), as the interval radii ``e`` do then.

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
        self._prepare(values, pool_idx, p, radii, i, float32)
        out = e.flatten(1).clone()
        for s in range(0, len(pairs), self.chunk):
            rows, cols = pairs[s:s + self.chunk, 0], pairs[s:s + self.chunk, 1]
            grads = neuron_gradients(self.net, values, pool_idx, i, rows, cols, self._slopes)
            out[rows, cols] = self._pair_bound(grads, rows, pp) * (1 + PAD_REL)
        return out.reshape(e.shape)
