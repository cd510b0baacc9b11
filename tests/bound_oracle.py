"""A plain reference for faulty forwards, independent of hwrel's bound code.

Faults are applied to an ``nn.Sequential`` of Linear/activation modules with forward hooks, the way
a user would do it by hand; the tests compare hwrel's bounds against what this measures.
"""
from __future__ import annotations

import itertools
from typing import Iterable, Sequence

import torch
from torch import nn


def act_modules(model: nn.Sequential) -> list[nn.Module]:
    """Activation modules that sit between two Linear layers (the hidden layers)."""
    mods = list(model)
    lin = [k for k, m in enumerate(mods) if isinstance(m, nn.Linear)]
    return [mods[k + 1] for k in lin[:-1]]


def linear_modules(model: nn.Sequential) -> list[nn.Linear]:
    return [m for m in model if isinstance(m, nn.Linear)]


def faulty_forward(model: nn.Sequential, x: torch.Tensor, neuron_faults: Sequence[dict[int, float]] = (),
                   synapse_faults: Sequence[dict[tuple[int, int], float | None]] = ()) -> torch.Tensor:
    """Output with hidden neuron ``i`` of layer ``l`` replaced by ``neuron_faults[l][i]`` and/or the
    synapse ``(j, i)`` into linear layer ``l`` transmitting ``v`` instead of ``y_i`` (``None``: crash = 0)."""
    with torch.no_grad():
        return _faulty_with_grad(model, x, neuron_faults, synapse_faults)


def probe_inputs(lo: float, hi: float, dim: int, n_random: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    rnd = lo + (hi - lo) * torch.rand(n_random, dim, generator=g)
    if dim <= 10:
        corners = torch.tensor(list(itertools.product([lo, hi], repeat=dim)), dtype=torch.float32)
        rnd = torch.cat([rnd, corners])
    return rnd


def gradient_worst_input(model: nn.Sequential, lo: float, hi: float, dim: int, neuron_faults, synapse_faults=(),
                         steps: int = 60, restarts: int = 4, seed: int = 0) -> float:
    """Projected gradient ascent on the input for a fixed fault set: max_o |F~_o(x) - F_o(x)|."""
    g = torch.Generator().manual_seed(seed)
    best = 0.0
    for _ in range(restarts):
        x = (lo + (hi - lo) * torch.rand(1, dim, generator=g)).requires_grad_(True)
        for _ in range(steps):
            with torch.enable_grad():
                clean = model(x)
                faulty = _faulty_with_grad(model, x, neuron_faults, synapse_faults)
                diff = (faulty - clean).abs().max()
                (grad,) = torch.autograd.grad(diff, x)
            best = max(best, float(diff.detach()))
            with torch.no_grad():
                x += 0.05 * (hi - lo) * grad.sign()
                x.clamp_(lo, hi)
    return best


def _faulty_with_grad(model, x, neuron_faults, synapse_faults):
    hooks = []
    for mod, faults in zip(act_modules(model), neuron_faults):
        if faults:
            def hook(m, inp, out, faults=faults):
                out = out.clone()
                for i, v in faults.items():
                    out[:, i] = v
                return out
            hooks.append(mod.register_forward_hook(hook))
    for mod, faults in zip(linear_modules(model), synapse_faults):
        if faults:
            def hook(m, inp, out, faults=faults):
                out = out.clone()
                y = inp[0]
                for (j, i), v in faults.items():
                    sent = 0.0 if v is None else v
                    out[:, j] = out[:, j] + m.weight[j, i] * (sent - y[:, i])
                return out
            hooks.append(mod.register_forward_hook(hook))
    try:
        return model(x)
    finally:
        for h in hooks:
            h.remove()


def failure_sets(sizes: Sequence[int], counts: Sequence[int]) -> Iterable[tuple[tuple[int, ...], ...]]:
    """Every choice of ``counts[l]`` neurons out of ``sizes[l]`` in each layer."""
    return itertools.product(*[itertools.combinations(range(n), f) for n, f in zip(sizes, counts)])
