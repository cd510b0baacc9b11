"""Statistical estimate of the rounding error (an estimate, not a bound).

Model: each weight's rounding error is independent, zero-mean and uniform on ``[-s/2, s/2]``
(variance ``s^2 / 12``), and so is each quantized activation's; the output change is linearised
at each test input through the network's Jacobian. Then per input ``x`` and class ``o``

    Var[dF_o(x)]              = sum_w (dF_o/dw)^2 s_w^2 / 12
    Var[d(F_c - F_o)(x)]      = sum_w (dF_c/dw - dF_o/dw)^2 s_w^2 / 12   (c: predicted class)

With the scales fixed per layer (per tensor) or per output channel, these are sums over (layer,
channel) of precomputed squared-Jacobian sums times ``s^2 / 12``, so a sweep over bit widths costs
nothing once the Jacobians are known. The estimated accuracy treats each margin change as normal:
``P(flip) ~ min(1, sum_o Phi(-m_o / sigma_o))``; the estimated deviation is ``Z_SIGMA * max sigma``.
"""
from __future__ import annotations

import math
from typing import Mapping

import torch
from torch import Tensor
from torch.func import jacrev, vmap

from hwrel.network import Network
from hwrel.quantize.search import perturbed_forward

Z_SIGMA = 3.0


class JacobianSums:
    """Squared Jacobian sums per (layer, output channel) and per activation node, per test input."""

    def __init__(self, net: Network, x: Tensor, pred: Tensor, layers: tuple[int, ...], acts: tuple[int, ...],
                 chunk: int = 32):
        self.layers, self.acts = layers, acts
        zw = {i: torch.zeros_like(net.nodes[i].affine.weight) for i in layers}
        za = {i: torch.zeros(net.nodes[i].shape, dtype=x.dtype) for i in acts}

        def f(dw, da, xi):
            return perturbed_forward(net, xi[None], dw, {k: v[None] for k, v in da.items()})[0]

        jac = vmap(jacrev(f, argnums=(0, 1)), in_dims=(None, None, 0))
        out_w: dict[int, list] = {i: [] for i in layers}
        out_mw: dict[int, list] = {i: [] for i in layers}
        out_a: dict[int, list] = {i: [] for i in acts}
        out_ma: dict[int, list] = {i: [] for i in acts}
        for s in range(0, len(x), chunk):
            jw, ja = jac(zw, za, x[s:s + chunk])
            c = pred[s:s + chunk]
            for store, mstore, jd in ((out_w, out_mw, jw), (out_a, out_ma, ja)):
                for i, j in jd.items():  # j: (B, C, *shape)
                    jc = j[torch.arange(len(c)), c][:, None]
                    if store is out_w:  # keep the output-channel dim, sum the rest
                        store[i].append((j ** 2).flatten(3).sum(-1) if j.dim() > 3 else j ** 2)
                        mstore[i].append(((jc - j) ** 2).flatten(3).sum(-1) if j.dim() > 3 else (jc - j) ** 2)
                    else:
                        store[i].append((j ** 2).flatten(2).sum(-1))
                        mstore[i].append(((jc - j) ** 2).flatten(2).sum(-1))
        # weights: (N, C, out_channels); activations: (N, C)
        self.w = {i: torch.cat(v) for i, v in out_w.items()}
        self.mw = {i: torch.cat(v) for i, v in out_mw.items()}
        self.a = {i: torch.cat(v) for i, v in out_a.items()}
        self.ma = {i: torch.cat(v) for i, v in out_ma.items()}

    def variances(self, steps: Mapping[int, Tensor], act_steps: Mapping[int, float]) -> tuple[Tensor, Tensor]:
        """``(Var dF, Var d margin)``, each ``(N, C)``; ``steps[i]`` per output channel ``(out,)``."""
        v = m = 0.0
        for i in self.layers:
            s2 = steps[i].to(torch.float64) ** 2 / 12
            v = v + self.w[i] @ s2
            m = m + self.mw[i] @ s2
        for i, s in act_steps.items():
            v = v + self.a[i] * s ** 2 / 12
            m = m + self.ma[i] * s ** 2 / 12
        return v, m


def estimated_accuracy(logits: Tensor, correct: Tensor, var_margin: Tensor) -> float:
    """Expected accuracy under the normal model of the margin changes (an estimate)."""
    pred = logits.argmax(1)
    margin = logits.gather(1, pred[:, None]) - logits
    sigma = var_margin.clamp(min=0).sqrt()
    z = torch.where(sigma > 0, -margin / sigma.clamp(min=1e-300), torch.full_like(margin, -math.inf))
    p = 0.5 * torch.erfc(-z / math.sqrt(2))
    p = p.scatter(1, pred[:, None], 0.0).sum(1).clamp(max=1.0)
    return float((correct.double() * (1 - p)).mean())


def estimated_deviation(var_out: Tensor) -> Tensor:
    """Per input, ``Z_SIGMA`` standard deviations of the most uncertain output (an estimate)."""
    return Z_SIGMA * var_out.clamp(min=0).sqrt().amax(1)
