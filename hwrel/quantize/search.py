"""Adversarial search: the worst rounding-sized perturbation a gradient search finds (a lower end).

Every perturbation tried lies inside the quantization box (``|dW| <= R``, activations moved by at
most their radius), so each damage found is *real*: an input broken here is broken by some
Byzantine rounding within half a step, and no sound certificate may claim it. Two searches:

- per input: each input gets its own perturbation (sign-gradient steps on the logit margin,
  batched with ``torch.func.vmap``), which is what a per-input certificate must cover;
- shared: one perturbation for the whole test set (what a real quantizer, or an adversary choosing
  the rounding, applies), found by sign-gradient steps on the summed clipped margins.

Neither is a bound: they under-estimate the worst case, and are labelled *adversarial*.
"""
from __future__ import annotations

from typing import Mapping

import torch
from torch import Tensor
import torch.nn.functional as F

from hwrel.network import Network


def perturbed_forward(net: Network, x: Tensor, dw: Mapping[int, Tensor], da: Mapping[int, Tensor]) -> Tensor:
    """Output with weights ``W + dw[i]`` and activation outputs moved by ``da[i]`` (vmappable)."""
    vals: list[Tensor] = []
    for i, node in enumerate(net.nodes):
        if node.op == "input":
            v = x
        elif node.op == "affine" and i in dw:
            v = node.affine(vals[node.inputs[0]], weight=node.affine.weight + dw[i])
        else:
            v = node.apply([vals[j] for j in node.inputs])
        if i in da:
            v = v + da[i]
        vals.append(v)
    return vals[-1]


def _margin(logits: Tensor, c: Tensor) -> Tensor:
    """``F_c - max_{o != c} F_o`` per row (negative: class ``c`` lost)."""
    own = logits.gather(-1, c[..., None])[..., 0]
    other = logits.scatter(-1, c[..., None], float("-inf")).amax(-1)
    return own - other


def _per_sample_affine(node, x: Tensor, dw: Tensor) -> Tensor:
    """Affine map with weight ``W + dw[b]`` for sample ``b`` (dense: einsum; conv: grouped conv)."""
    a = node.affine
    w = a.weight[None] + dw
    if a.kind == "linear":
        out = torch.einsum("bi,boi->bo", x, w)
        return out if a.bias is None else out + a.bias
    n = x.shape[0]
    out = F.conv2d(x.reshape(1, -1, *x.shape[2:]), w.reshape(-1, *w.shape[2:]), None, a.stride, a.padding,
                   a.dilation, a.groups * n)
    out = out.reshape(n, -1, *out.shape[2:])
    return out if a.bias is None else out + a.bias[None, :, None, None]


def _forward_per_sample(net: Network, x: Tensor, dw: Mapping[int, Tensor], da: Mapping[int, Tensor]) -> Tensor:
    vals: list[Tensor] = []
    for i, node in enumerate(net.nodes):
        if node.op == "input":
            v = x
        elif node.op == "affine" and i in dw:
            v = _per_sample_affine(node, vals[node.inputs[0]], dw[i])
        else:
            v = node.apply([vals[j] for j in node.inputs])
        if i in da:
            v = v + da[i]
        vals.append(v)
    return vals[-1]


def per_input_attack(net: Network, x: Tensor, c: Tensor, wr: Mapping[int, Tensor], ar: Mapping[int, Tensor],
                     steps: int = 4, chunk: int = 64) -> tuple[Tensor, Tensor]:
    """Per input, the smallest margin found and the largest ``|dF_o|`` on the way (``(N,)`` each).

    Each input has its own weight perturbation (``(B, *W.shape)``): the summed margin's gradient
    with respect to it is each input's own gradient. ``ar[i]`` is a per-sample radius
    ``(N, *shape)`` for activation node ``i``.
    """
    best_m, best_dev = [], []
    with torch.no_grad():
        clean = net.forward(x)
    for s in range(0, len(x), chunk):
        xb, cb = x[s:s + chunk], c[s:s + chunk]
        n = len(xb)
        rw = {k: v.expand(n, *v.shape) for k, v in wr.items()}
        ra = {k: v[s:s + chunk] for k, v in ar.items()}
        dw = {k: torch.zeros_like(v, requires_grad=True) for k, v in rw.items()}
        da = {k: torch.zeros_like(v, requires_grad=True) for k, v in ra.items()}
        m_best = torch.full((n,), float("inf"), dtype=x.dtype)
        dev = torch.zeros(n, dtype=x.dtype)
        for t in range(steps + 1):
            out = _forward_per_sample(net, xb, dw, da)
            m = _margin(out, cb)
            with torch.no_grad():
                m_best = torch.minimum(m_best, m)
                dev = torch.maximum(dev, (out - clean[s:s + chunk]).abs().amax(1))
            if t == steps:
                break
            params = list(dw.values()) + list(da.values())
            gs = torch.autograd.grad(m.sum(), params)
            step = 1.0 if t == 0 else 0.5 / (1 + t // 3)
            with torch.no_grad():
                radii = list(rw.values()) + list(ra.values())
                for v, g, r in zip(params, gs, radii):
                    v.copy_(torch.clamp(v - step * r * torch.sign(g), -r, r))
        best_m.append(m_best)
        best_dev.append(dev)
    return torch.cat(best_m), torch.cat(best_dev)


def shared_attack(net: Network, x: Tensor, c: Tensor, wr: Mapping[int, Tensor], steps: int = 20,
                  kappa: float = 0.0) -> tuple[Tensor, dict[int, Tensor]]:
    """One weight perturbation for all inputs; returns the margins under it and the perturbation."""
    dw = {k: torch.zeros_like(v, requires_grad=True) for k, v in wr.items()}
    best, best_dw = None, None
    for t in range(steps + 1):
        out = perturbed_forward(net, x, dw, {})
        m = _margin(out, c)
        with torch.no_grad():
            if best is None or int((m < 0).sum()) > int((best < 0).sum()):
                best, best_dw = m.detach().clone(), {k: v.detach().clone() for k, v in dw.items()}
        if t == steps:
            break
        loss = torch.clamp(m, min=-kappa).sum()
        gs = torch.autograd.grad(loss, list(dw.values()))
        step = 1.0 if t == 0 else 0.5 / (1 + t // 5)
        with torch.no_grad():
            for (k, v), g in zip(dw.items(), gs):
                v.copy_(torch.clamp(v - step * wr[k] * torch.sign(g), -wr[k], wr[k]))
    return best, best_dw
