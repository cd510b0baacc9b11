"""Adversarial search: the worst rounding-sized perturbation a gradient search finds (a lower end).

Every perturbation tried lies inside the quantization box (``|dW| <= R``, activations moved by at
most their radius), so each damage found is *real*: an input broken here is broken by some
Byzantine rounding within half a step, and no sound certificate may claim it. Two searches:

- per input: each input gets its own perturbation (PGD with sign steps and restarts on the margin
  to the runner-up class, batched as per-sample weights), which is what a per-input certificate
  must cover;
- shared: one perturbation for the whole test set (what a real quantizer, or an adversary choosing
  the rounding, applies), found by PGD with restarts on the summed clipped margins.

Both search in float32 (fast) and judge the perturbation they found in the float64 network, so
every reported break is a float64 break of a perturbation inside the box.

Neither is a bound: they under-estimate the worst case, and are labelled *adversarial*.
"""
from __future__ import annotations

import math
from typing import Mapping

import torch
from torch import Tensor
import torch.nn.functional as F

from hwrel.network import Network


def _walk(net: Network, x: Tensor, dw: Mapping[int, Tensor], da: Mapping[int, Tensor], affine) -> Tensor:
    """Forward with perturbed affine nodes computed by ``affine(node, input, dw)`` and activation
    outputs moved by ``da[i]``."""
    vals: list[Tensor] = []
    for i, node in enumerate(net.nodes):
        if node.op == "input":
            v = x
        elif node.op == "affine" and i in dw:
            v = affine(node, vals[node.inputs[0]], dw[i])
        else:
            v = node.apply([vals[j] for j in node.inputs])
        if i in da:
            v = v + da[i]
        vals.append(v)
    return vals[-1]


def perturbed_forward(net: Network, x: Tensor, dw: Mapping[int, Tensor], da: Mapping[int, Tensor]) -> Tensor:
    """Output with weights ``W + dw[i]`` and activation outputs moved by ``da[i]`` (vmappable)."""
    return _walk(net, x, dw, da, lambda node, y, d: node.affine(y, weight=node.affine.weight + d))


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
        out = torch.einsum("b...i,boi->b...o", x, w)  # a Linear acts on the last dimension
        return out if a.bias is None else out + a.bias
    n = x.shape[0]
    out = F.conv2d(x.reshape(1, -1, *x.shape[2:]), w.reshape(-1, *w.shape[2:]), None, a.stride, a.padding,
                   a.dilation, a.groups * n)
    out = out.reshape(n, -1, *out.shape[2:])
    return out if a.bias is None else out + a.bias[None, :, None, None]


def _forward_per_sample(net: Network, x: Tensor, dw: Mapping[int, Tensor], da: Mapping[int, Tensor]) -> Tensor:
    """Like :func:`perturbed_forward` with a separate weight perturbation ``dw[i][b]`` per sample."""
    return _walk(net, x, dw, da, _per_sample_affine)


def _step_size(t: int, steps: int) -> float:
    """Sign-step length as a fraction of the radius: a full jump to the corner, then cosine decay."""
    return 1.0 if t == 0 else 0.05 + 0.45 * (1 + math.cos(math.pi * t / steps))


def _start(r: Tensor, restart: int, gen: torch.Generator) -> Tensor:
    """Restart 0 starts at zero (its first full step lands on the gradient-sign corner); others at
    a random corner-biased point of the box (drawn on the CPU: the same start on every device)."""
    if restart == 0:
        return torch.zeros_like(r)
    u = torch.rand(r.shape, generator=gen, dtype=r.dtype, device="cpu").to(r.device) * 2 - 1
    return r * torch.sign(u) * u.abs().sqrt()


def per_input_attack(net: Network, x: Tensor, c: Tensor, wr: Mapping[int, Tensor], ar: Mapping[int, Tensor],
                     steps: int = 20, restarts: int = 2, chunk: int = 64, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Per input, the smallest margin found and the largest ``|dF_o|`` seen (``(N,)`` each).

    PGD on the margin to the runner-up class (``F_c - max_{o != c} F_o``) with sign steps inside
    the box, ``restarts`` starts per input (zero, then random), searched in float32 for speed.
    Each input's best perturbation is then re-evaluated in the float64 network, and only that
    margin and deviation are returned, so a negative margin is a real break. ``ar[i]`` is a
    per-sample radius ``(N, *shape)`` for activation node ``i``.
    """
    gen = torch.Generator().manual_seed(seed)
    net32 = net.to(torch.float32)
    best_m, best_dev = [], []
    with torch.no_grad():
        clean = net.forward(x)
    for s in range(0, len(x), chunk):
        xb, cb = x[s:s + chunk], c[s:s + chunk]
        n = len(xb)
        rw = {k: v.expand(n, *v.shape).to(torch.float32) for k, v in wr.items()}
        ra = {k: v[s:s + chunk].to(torch.float32) for k, v in ar.items()}
        radii = list(rw.values()) + list(ra.values())
        keep = [torch.zeros_like(r) for r in radii]  # each input's best perturbation so far
        m_keep = torch.full((n,), float("inf"), device=x.device)
        x32 = xb.to(torch.float32)
        for restart in range(restarts):
            params = [_start(r, restart, gen).requires_grad_(True) for r in radii]
            for t in range(steps + 1):
                dw = dict(zip(rw, params[:len(rw)]))
                da = dict(zip(ra, params[len(rw):]))
                m = _margin(_forward_per_sample(net32, x32, dw, da), cb)
                with torch.no_grad():
                    better = m < m_keep
                    m_keep = torch.where(better, m.detach(), m_keep)
                    for kv, v in zip(keep, params):
                        kv[better] = v.detach()[better]
                if t == steps:
                    break
                gs = torch.autograd.grad(m.sum(), params)
                step = _step_size(t, steps)
                with torch.no_grad():
                    for v, g, r in zip(params, gs, radii):
                        v.copy_(torch.clamp(v - step * r * torch.sign(g), -r, r))
        with torch.no_grad():  # the float64 verdict on the best perturbation found
            dw = {k: torch.minimum(torch.maximum(v.double(), -wr[k]), wr[k]) for k, v in zip(rw, keep[:len(rw)])}
            da = {k: torch.minimum(torch.maximum(v.double(), -ar[k][s:s + chunk]), ar[k][s:s + chunk])
                  for k, v in zip(ra, keep[len(rw):])}
            out = _forward_per_sample(net, xb, dw, da)
        best_m.append(_margin(out, cb))
        best_dev.append((out - clean[s:s + chunk]).abs().amax(1))
    return torch.cat(best_m), torch.cat(best_dev)


def shared_attack(net: Network, x: Tensor, c: Tensor, wr: Mapping[int, Tensor], steps: int = 40,
                  kappa: float = 0.0, restarts: int = 2, seed: int = 0) -> tuple[Tensor, dict[int, Tensor]]:
    """One weight perturbation for all inputs; returns the float64 margins under it and the perturbation.

    PGD (float32 search, sign steps, ``restarts`` starts) on the summed runner-up margins clipped
    at ``-kappa`` (an input already lost stops pulling); the perturbation breaking the most inputs
    in float64 wins.
    """
    gen = torch.Generator().manual_seed(seed)
    net32 = net.to(torch.float32)
    x32 = x.to(torch.float32)
    r32 = {k: v.to(torch.float32) for k, v in wr.items()}
    best, best_dw = None, None
    for restart in range(restarts):
        dw = {k: _start(v, restart, gen).requires_grad_(True) for k, v in r32.items()}
        for t in range(steps):
            m = _margin(perturbed_forward(net32, x32, dw, {}), c)
            gs = torch.autograd.grad(torch.clamp(m, min=-kappa).sum(), list(dw.values()))
            step = _step_size(t, steps)
            with torch.no_grad():
                for (k, v), g in zip(dw.items(), gs):
                    v.copy_(torch.clamp(v - step * r32[k] * torch.sign(g), -r32[k], r32[k]))
        with torch.no_grad():
            cand = {k: torch.minimum(torch.maximum(v.detach().double(), -wr[k]), wr[k]) for k, v in dw.items()}
            m = _margin(perturbed_forward(net, x, cand, {}), c)
        if best is None or int((m < 0).sum()) > int((best < 0).sum()):
            best, best_dw = m, cand
    return best, best_dw
