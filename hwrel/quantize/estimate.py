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


Z_SIGMA = 3.0


class JacobianSums:
    """Squared Jacobian sums per (layer, output channel) and per activation node, per test input.

    ``out[i]`` / ``margin[i]``: for affine node ``i``, ``(N, C, out_channels)`` sums of
    ``(dF_o/dW)^2`` / ``(d(F_c - F_o)/dW)^2`` over each output channel's weights; for activation
    node ``i``, ``(N, C)`` sums of ``(dF_o/dy)^2`` (computed by :class:`hwrel.bounds.linearized.LinearizedBound`).
    """

    def __init__(self, out: Mapping[int, Tensor], margin: Mapping[int, Tensor], layers: tuple[int, ...],
                 acts: tuple[int, ...]):
        self.layers, self.acts = layers, acts
        self.w = {i: out[i] for i in layers}
        self.mw = {i: margin[i] for i in layers}
        self.a = {i: out[i] for i in acts}
        self.ma = {i: margin[i] for i in acts}

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
