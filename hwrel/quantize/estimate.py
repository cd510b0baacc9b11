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
import torch.nn.functional as F
from torch import Tensor

from hwrel.errors import HwrelError

from hwrel.network import Network

Z_SIGMA = 3.0


def _forward_values(net: Network, x: Tensor, taps: Mapping[int, Tensor]) -> list[Tensor]:
    vals: list[Tensor] = []
    for i, node in enumerate(net.nodes):
        v = x if node.op == "input" else node.apply([vals[j] for j in node.inputs])
        vals.append(v + taps[i] if i in taps else v)
    return vals


def _pair(v) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _unfold(y: Tensor, kernel, dilation, padding, stride) -> Tensor:
    """``F.unfold`` by strided slices (``(B, C*kh*kw, P)``, same order): CPU im2col is far slower."""
    (kh, kw), (dh, dw), (ph, pw), (sh, sw) = map(_pair, (kernel, dilation, padding, stride))
    yp = F.pad(y, (pw, pw, ph, ph))
    ho = (yp.shape[2] - dh * (kh - 1) - 1) // sh + 1
    wo = (yp.shape[3] - dw * (kw - 1) - 1) // sw + 1
    cols = [yp[:, :, i * dh:i * dh + sh * (ho - 1) + 1:sh, j * dw:j * dw + sw * (wo - 1) + 1:sw]
            for i in range(kh) for j in range(kw)]
    return torch.stack(cols, 2).reshape(y.shape[0], -1, ho * wo)


def _weight_grad_sq(node, y: Tensor, g: Tensor) -> Tensor:
    """Per sample, class and output channel: ``sum over the channel's weights of (dF/dW)^2``.

    ``g`` is ``dF/ds`` at the affine output ``(B, C, *out_shape)``, ``y`` its input. Dense:
    ``dF/dW_ji = g_j y_i``. Convolution: the per-sample weight gradient is ``g`` times the unfolded
    input, summed over output positions.
    """
    a = node.affine
    if a.kind == "linear":
        return g ** 2 * (y ** 2).sum(1)[:, None, None]
    if a.groups != 1:
        raise HwrelError(f"layer {node.name}: grouped convolutions are not supported by the estimate")
    u = _unfold(y, a.weight.shape[2:], a.dilation, a.padding, a.stride)  # (B, in*k*k, P)
    b, c, o = g.shape[:3]
    gw = torch.bmm(g.reshape(b, c * o, -1), u.transpose(1, 2))  # (B, C*out, in*k*k)
    return (gw ** 2).sum(-1).reshape(b, c, o)


class JacobianSums:
    """Squared Jacobian sums per (layer, output channel) and per activation node, per test input."""

    def __init__(self, net: Network, x: Tensor, pred: Tensor, layers: tuple[int, ...], acts: tuple[int, ...],
                 chunk: int = 256):
        self.layers, self.acts = layers, acts
        sq: dict[tuple[str, int], list] = {}
        for s in range(0, len(x), chunk):
            xb, c = x[s:s + chunk], pred[s:s + chunk]
            n = len(xb)
            # zero offsets on each affine output / activation output: their gradients are dF/ds, dF/dy
            taps = {i: torch.zeros(n, *net.nodes[i].shape, dtype=x.dtype, requires_grad=True)
                    for i in tuple(layers) + tuple(acts)}
            vals = _forward_values(net, xb, taps)
            out = vals[-1]
            params = list(taps.values())
            grads = [torch.autograd.grad(out[:, o].sum(), params, retain_graph=True) for o in range(out.shape[1])]
            for k, i in enumerate(taps):
                g = torch.stack([gr[k] for gr in grads], 1)  # (B, C, *shape)
                gm = g[torch.arange(n), c][:, None] - g  # margin F_c - F_o
                if i in layers:
                    y = vals[net.nodes[i].inputs[0]]
                    pair = (_weight_grad_sq(net.nodes[i], y, g), _weight_grad_sq(net.nodes[i], y, gm))
                else:
                    pair = ((g ** 2).flatten(2).sum(-1), (gm ** 2).flatten(2).sum(-1))
                sq.setdefault(("v", i), []).append(pair[0])
                sq.setdefault(("m", i), []).append(pair[1])
        cat = {k: torch.cat(v) for k, v in sq.items()}
        # weights: (N, C, out_channels); activations: (N, C)
        self.w = {i: cat[("v", i)] for i in layers}
        self.mw = {i: cat[("m", i)] for i in layers}
        self.a = {i: cat[("v", i)] for i in acts}
        self.ma = {i: cat[("m", i)] for i in acts}

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
