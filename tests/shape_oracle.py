"""A plain reference for faults in networks whose layers act on the last dimension of 2-D and
3-D per-sample inputs (a Linear over rows, as in every transformer), independent of hwrel's code.

Faults are applied with forward hooks on the model's own modules, the way a user would do it by
hand: a neuron is an element of an activation module's per-sample output (flat index), a synapse
of a Linear over rows is a connection ``(position, j, i)`` from input ``i`` to output ``j`` at one
leading position (the weight ``W_ji`` is shared by every position, the connections are not).
"""
from __future__ import annotations

import itertools
import math
from contextlib import contextmanager
from typing import Iterable, Iterator, Sequence

import torch
from torch import nn

ACTS = {"relu": nn.ReLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid, "hardtanh": lambda: nn.Hardtanh(-0.5, 0.8),
        "leaky": lambda: nn.LeakyReLU(0.1), "relu6": nn.ReLU6}


class RowNet(nn.Module):
    """``Linear -> act -> ... -> Linear -> act`` on the last dimension, then flatten and a Linear
    head (optionally ``head_act`` between two head Linears)."""

    def __init__(self, lead: Sequence[int], widths: Sequence[int], act: str, n_out: int, head_hidden: int = 0):
        super().__init__()
        self.lead = tuple(lead)
        self.body = nn.ModuleList()
        self.acts = nn.ModuleList()
        for a, b in zip(widths[:-1], widths[1:]):
            self.body.append(nn.Linear(a, b, bias=bool(len(self.body) % 2)))
            self.acts.append(ACTS[act]())
        flat = math.prod(self.lead) * widths[-1]
        if head_hidden:
            self.head = nn.Sequential(nn.Linear(flat, head_hidden), ACTS[act](), nn.Linear(head_hidden, n_out))
        else:
            self.head = nn.Sequential(nn.Linear(flat, n_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for lin, act in zip(self.body, self.acts):
            x = act(lin(x))
        return self.head(torch.flatten(x, 1))

    def hidden_acts(self) -> list[nn.Module]:
        """The hidden layers in hwrel's order (activations between two affine layers)."""
        return list(self.acts) + ([self.head[1]] if len(self.head) == 3 else [])

    def linears(self) -> list[nn.Linear]:
        return list(self.body) + [m for m in self.head if isinstance(m, nn.Linear)]


def row_net(lead, widths, act, n_out, seed, scale=1.0, head_hidden=0) -> RowNet:
    torch.manual_seed(seed)
    m = RowNet(lead, widths, act, n_out, head_hidden).eval()
    with torch.no_grad():
        for lin in m.linears():
            lin.weight.mul_(scale * math.sqrt(lin.in_features))
            if lin.bias is not None:
                lin.bias.mul_(math.sqrt(lin.in_features))
    return m


def per_element_box(shape, seed, fixed_fraction=0.3) -> tuple[torch.Tensor, torch.Tensor]:
    """A random per-element input box; about ``fixed_fraction`` of the elements are fixed (lo == hi)."""
    g = torch.Generator().manual_seed(seed)
    centre = torch.rand(shape, generator=g) * 2 - 1
    width = torch.rand(shape, generator=g) * 1.5
    width[torch.rand(shape, generator=g) < fixed_fraction] = 0.0
    return centre - width / 2, centre + width / 2


def box_points(lo, hi, n, seed) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    u = torch.rand((n, *lo.shape), generator=g)
    corner = (torch.rand((n, *lo.shape), generator=g) < 0.5).float()
    u[: n // 2] = corner[: n // 2]  # half the points at corners of the box
    return torch.maximum(torch.minimum(lo + u * (hi - lo), hi), lo)  # float32 rounding stays inside


@contextmanager
def neuron_faults(mods: Sequence[nn.Module], faults: Sequence[dict[int, float]]) -> Iterator[None]:
    """Within the block, element ``i`` (flat, per sample) of ``mods[l]``'s output is ``faults[l][i]``."""
    hooks = []
    for mod, f in zip(mods, faults):
        if f:
            idx = torch.tensor(list(f))
            vals = torch.tensor(list(f.values()), dtype=torch.float32)

            def hook(m, inp, out, idx=idx, vals=vals):
                o = out.clone().reshape(out.shape[0], -1)
                o[:, idx] = vals.to(o.dtype)
                return o.reshape(out.shape)
            hooks.append(mod.register_forward_hook(hook))
    try:
        yield
    finally:
        for h in hooks:
            h.remove()


@contextmanager
def synapse_faults(lins: Sequence[nn.Linear], faults: Sequence[dict[tuple[int, int, int], float | None]]
                   ) -> Iterator[None]:
    """Connection ``(position, j, i)`` into ``lins[l]`` sends ``v`` (``None``: 0, a crash) instead of
    its input ``y[position, i]`` (``position``: flat index over the leading per-sample dims)."""
    hooks = []
    for mod, f in zip(lins, faults):
        if f:
            def hook(m, inp, out, f=f):
                y = inp[0].reshape(inp[0].shape[0], -1, m.in_features)
                o = out.clone().reshape(out.shape[0], -1, m.out_features)
                for (p, j, i), v in f.items():
                    sent = 0.0 if v is None else v
                    o[:, p, j] = o[:, p, j] + m.weight[j, i] * (sent - y[:, p, i])
                return o.reshape(out.shape)
            hooks.append(mod.register_forward_hook(hook))
    try:
        yield
    finally:
        for h in hooks:
            h.remove()


def connections(lin: nn.Linear, positions: int) -> list[tuple[int, int, int]]:
    return [(p, j, i) for p in range(positions) for j in range(lin.out_features) for i in range(lin.in_features)]


def choose(pools: Sequence[Sequence], counts: Sequence[int]) -> Iterable[tuple[tuple, ...]]:
    """Every choice of ``counts[l]`` items of ``pools[l]`` in each layer."""
    return itertools.product(*[itertools.combinations(p, k) for p, k in zip(pools, counts)])


def worst_input(model, lo, hi, faulty, clean=None, steps=40, restarts=3, seed=0) -> float:
    """Projected sign-gradient ascent over the box for ``max_o |F~_o(x) - F_o(x)|`` with the faults
    that the context manager factory ``faulty()`` installs."""
    g = torch.Generator().manual_seed(seed)
    best = 0.0
    for _ in range(restarts):
        x = (lo + torch.rand(lo.shape, generator=g) * (hi - lo))[None].requires_grad_(True)
        for _ in range(steps):
            with torch.enable_grad():
                c = model(x)
                with faulty():
                    f = model(x)
                diff = (f - c).abs().max()
                (grad,) = torch.autograd.grad(diff, x)
            best = max(best, float(diff.detach()))
            with torch.no_grad():
                x += 0.1 * (hi - lo) * grad.sign()
                x.copy_(torch.maximum(torch.minimum(x, hi), lo))
    return best
