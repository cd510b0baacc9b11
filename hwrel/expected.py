"""Expected output error under independent random crashes (theory 6), beside Monte Carlo injection.

Each neuron of hidden layer ``l`` crashes (transmits 0) independently with probability ``p_l``.
Three numbers per output ``o``, for the inputs ``x`` given:

- sound bounds on ``E|dF_o(x)|`` (expectation over the crashes), valid for every ``x`` in the box:
  ``"paper"``, the scalar recursion ``B_l = rho_(l+1) (p_l C_l + (1 - p_l) K B_(l-1))`` of theory 6
  (``rho`` = largest row l1-norm, ``C_l`` = sup |y| over layer ``l``), and ``"interval"``, its
  per-neuron form ``e_i = p_l sup|y_i| + (1 - p_l) min(kappa_i (|W| e)_i, width_i)`` with slopes and
  widths over the faulty reachable interval (linearity of expectation, independence of a neuron's
  crash from upstream errors, and Jensen for the concave ``min``);
- the first-order estimate ``E[dF] ~ -sum_l p_l sum_i (dF/dy_i) y_i``,
  ``Var[dF] ~ sum_l p_l (1 - p_l) sum_i ((dF/dy_i) y_i)^2`` (exact when only the last hidden layer
  fails; an estimate elsewhere), compared through ``sqrt(E[dF^2]) = sqrt(mean^2 + var)``;
- Monte Carlo: exact crash injection, ``trials`` per input, with normal confidence intervals.

Summaries are per output averaged over the inputs, then the largest over outputs.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor

from hwrel.bounds.fp32 import local_rounding, scalar_rounding
from hwrel.bounds.ibp import interval_bounds, node_interval, sup_abs
from hwrel.errors import HwrelError
from hwrel.inject.stats import z_value
from hwrel.network import Network


def check_probabilities(net: Network, p: Sequence[float]) -> list[float]:
    if isinstance(p, (str, bytes)) or not hasattr(p, "__len__"):
        raise HwrelError(f"p must be a list with one crash probability per hidden layer, got {p!r}")
    p = list(p)
    if len(p) != net.num_layers:
        raise HwrelError(f"p has {len(p)} entries but the network has {net.num_layers} hidden layers")
    for k, v in enumerate(p):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= float(v) <= 1.0:
            raise HwrelError(f"p[{k}] = {v!r}: a crash probability must lie in [0, 1]")
    return [float(v) for v in p]


@torch.no_grad()
def paper_bound(net: Network, probs: dict[int, float]) -> float:
    """Theory 6's scalar recursion (extended soundly to pooling and residual additions)."""
    los, his = interval_bounds(net, net.input_lo[None], net.input_hi[None])
    u: list[float] = []
    for i, node in enumerate(net.nodes):
        if node.op == "input":
            v = 0.0
        elif node.op == "affine":
            rho = float(node.affine.abs_map(torch.ones_like(los[node.inputs[0]])).max())
            v = rho * u[node.inputs[0]]
        elif node.op == "act":
            a, v_in, p = node.act, u[node.inputs[0]], probs.get(i, 0.0)
            c = a.max_abs if a.bounded else float(sup_abs(los[i], his[i]).max())
            ok = a.lipschitz * v_in + (a.quant_step if v_in > 0 else 0.0)
            v = p * c + (1 - p) * ok if p > 0 else ok
        elif node.op == "pool":  # E max|d| over a window <= its sum
            v = u[node.inputs[0]] * (node.pool.kernel[0] * node.pool.kernel[1] if node.pool.kind == "max"
                                     else node.pool.gain)
        elif node.op == "reshape":
            v = u[node.inputs[0]]
        else:
            v = sum(u[j] for j in node.inputs)
        if v > 0:  # float32 rounding of both forwards where they differ
            mags = [float(sup_abs(los[j], his[j]).max()) + u[j] for j in node.inputs]
            v += 2 * scalar_rounding(node, mags, float(sup_abs(los[i], his[i]).max()) + v)
        u.append(v)
    return u[-1] * (1 + 1e-12)


@torch.no_grad()
def interval_bound(net: Network, probs: dict[int, float], lo: Tensor, hi: Tensor) -> Tensor:
    """Per-box, per-output sound bound ``(B, n_out)`` on ``E|dF_o(x)|`` for ``x`` in each box."""
    los, his = interval_bounds(net, lo, hi)
    flo: list[Tensor] = []  # faulty reachable ranges: crashed outputs may be 0
    fhi: list[Tensor] = []
    e: list[Tensor] = []
    for i, node in enumerate(net.nodes):
        if node.op == "input":
            a, b, v = lo, hi, torch.zeros_like(lo)
        else:
            a, b = node_interval(node, [(flo[j], fhi[j]) for j in node.inputs])
            src = node.inputs[0]
            if node.op == "affine":
                v = node.affine.abs_map(e[src])
            elif node.op == "act":
                act, e_in = node.act, e[src]
                img_lo, img_hi = act.image(flo[src], fhi[src])
                v = torch.minimum(act.slope_sup(flo[src], fhi[src]) * e_in + act.quant_step * (e_in > 0),
                                  img_hi - img_lo)
                p = probs.get(i, 0.0)
                if p > 0:
                    v = p * sup_abs(los[i], his[i]) + (1 - p) * v
                    a, b = torch.minimum(a, torch.zeros_like(a)), torch.maximum(b, torch.zeros_like(b))
            elif node.op == "pool":
                pl = node.pool
                if pl.kind == "max":
                    v = F.avg_pool2d(e[src], pl.kernel, pl.stride, pl.padding, pl.ceil_mode, count_include_pad=True)
                    v = v * (pl.kernel[0] * pl.kernel[1])
                else:
                    v = pl(e[src])
            elif node.op == "reshape":
                v = e[src].reshape(e[src].shape[0], *node.shape)
            else:
                v = sum(e[j] for j in node.inputs)
            # float32: the ranges cover the rounded values, and both forwards round where they differ
            mags = [sup_abs(flo[j], fhi[j]) + e[j] for j in node.inputs]
            r = local_rounding(node, mags, sup_abs(a, b) + v)
            if isinstance(r, Tensor):
                a, b = a - r, b + r
                v = v + 2 * r * (v > 0)
        flo.append(a)
        fhi.append(b)
        e.append(v)
    return e[-1].flatten(1) * (1 + 1e-12)


def _forward(net: Network, x: Tensor, masks: dict[int, Tensor] | None = None,
             shifts: dict[int, Tensor] | None = None) -> Tensor:
    """Forward with crashes (``y * mask``: a crashed neuron transmits exactly 0) or additive shifts."""
    vals: list[Tensor] = []
    for i, node in enumerate(net.nodes):
        v = x if node.op == "input" else node.apply([vals[j] for j in node.inputs])
        if masks is not None and i in masks:
            v = v * masks[i]
        if shifts is not None and i in shifts:
            v = v + shifts[i]
        vals.append(v)
    return vals[-1].flatten(1)


def first_order(net: Network, probs: dict[int, float], x: Tensor) -> tuple[Tensor, Tensor]:
    """First-order mean and variance of ``dF`` per input and output, ``(B, n_out)`` each (an estimate)."""
    layers = [i for i, p in probs.items() if p > 0]
    with torch.no_grad():
        vals = net.forward_all(x)
    zs = {i: torch.zeros_like(vals[i], requires_grad=True) for i in layers}
    mean = torch.zeros(x.shape[0], net.nodes[-1].size, dtype=x.dtype)
    var = torch.zeros_like(mean)
    with torch.enable_grad():
        out = _forward(net, x, shifts=zs)
        for o in range(out.shape[1]):
            grads = torch.autograd.grad(out[:, o].sum(), [zs[i] for i in layers], retain_graph=True,
                                        allow_unused=True)
            for i, g in zip(layers, grads):
                c = (torch.zeros_like(vals[i]) if g is None else g) * vals[i]
                mean[:, o] -= probs[i] * c.flatten(1).sum(1)
                var[:, o] += probs[i] * (1 - probs[i]) * (c.flatten(1) ** 2).sum(1)
    return mean.detach(), var.detach()


@torch.no_grad()
def monte_carlo(net: Network, probs: dict[int, float], x: Tensor, trials: int, g: torch.Generator,
                rows: int, labels: Tensor | None = None) -> dict[str, Tensor]:
    """Per input and output: sums over ``trials`` crash draws of ``dF``, ``dF^2``, ``|dF|``; with
    ``labels``, ``correct``: per input, the number of draws whose top-1 class is the label."""
    ref = _forward(net, x)
    acc = {k: torch.zeros_like(ref) for k in ("s", "s2")}
    acc["a"] = torch.zeros_like(ref)
    if labels is not None:
        acc["correct"] = torch.zeros(x.shape[0], dtype=torch.int64)
    per = max(1, rows // max(1, x.shape[0]))
    done = 0
    while done < trials:
        t = min(per, trials - done)
        xb = x.repeat(t, *[1] * (x.dim() - 1))
        masks = {i: (torch.rand((xb.shape[0], *net.nodes[i].shape), generator=g, dtype=x.dtype) >= p).to(x.dtype)
                 for i, p in probs.items() if p > 0}
        d = (_forward(net, xb, masks) - ref.repeat(t, 1)).reshape(t, *ref.shape)
        acc["s"] += d.sum(0)
        acc["s2"] += (d ** 2).sum(0)
        acc["a"] += d.abs().sum(0)
        if labels is not None:
            faulty = d + ref[None]
            acc["correct"] += (faulty.argmax(-1) == labels[None]).sum(0)
        done += t
    return acc


@dataclass(frozen=True)
class ExpectedResult:
    """One row per scenario (each failing layer alone, then all together): bounds, MC, first order.

    Columns: ``bound_paper`` and ``bound`` (interval, over the input box) and ``bound_data`` (interval,
    per input, averaged) are sound bounds on ``max_o mean_x E|dF_o|``; ``mc_abs`` with
    ``mc_abs_lo``/``mc_abs_hi`` is its Monte Carlo estimate and confidence interval; ``mc_rms`` and
    ``fo_rms`` are ``sqrt(mean_{x,o} E[dF^2])`` measured and first-order; ``fo_rms_rel_err`` and
    ``fo_mean_rel_err`` (``sum|m_fo - m_mc| / sum|m_mc|``) say how far the first order is from MC,
    ``fo_mean_noise`` (``sum se(m_mc) / sum|m_mc|``) is the MC noise that relative error carries.
    ``bound_ok``: every per-output bound >= the MC lower confidence limit; ``point_bound_ok``: the same
    per input and output (Bonferroni-corrected over all of them). With labels: ``clean_accuracy``
    and ``mc_accuracy`` (measured accuracy under the random crashes, over inputs and draws).
    """

    p: tuple[float, ...]
    trials: int
    inputs: int
    confidence: float
    table: pd.DataFrame

    def to_dict(self) -> dict:
        return {"p": list(self.p), "trials": self.trials, "inputs": self.inputs, "confidence": self.confidence,
                "scenarios": self.table.to_dict(orient="records"), "kind": "bound+estimate+measured"}


def _scenario(net: Network, name: str, probs: dict[int, float], x: Tensor, trials: int, confidence: float,
              g: torch.Generator, rows: int, labels: Tensor | None = None) -> dict:
    n, z = x.shape[0], z_value(confidence)
    b_dom = interval_bound(net, probs, net.input_lo[None], net.input_hi[None])[0]
    b_pts = torch.cat([interval_bound(net, probs, xb, xb) for xb in x.split(256)])
    acc = monte_carlo(net, probs, x, trials, g, rows, labels)
    m_abs = acc["a"] / trials
    v_abs = (acc["s2"] / trials - m_abs ** 2).clamp_min(0) * trials / (trials - 1)
    a_o = m_abs.mean(0)
    hw = z * (v_abs.sum(0) / trials).sqrt() / n
    fo_m, fo_v = first_order(net, probs, x)
    mc_m = acc["s"] / trials
    mc_rms = float((acc["s2"] / trials).mean().sqrt())
    fo_rms = float((fo_m ** 2 + fo_v).mean().sqrt())
    se_m = ((acc["s2"] / trials - mc_m ** 2).clamp_min(0) / (trials - 1)).sqrt()
    z_all = z_value(1 - (1 - confidence) / m_abs.numel())
    o = int(a_o.argmax())
    measured = {}
    if labels is not None:
        measured = {"clean_accuracy": float((_forward(net, x).argmax(1) == labels).double().mean()),
                    "mc_accuracy": float(acc["correct"].sum()) / (trials * n)}
    return {
        "scenario": name, "p": [probs.get(i, 0.0) for i in net.layers],
        "bound_paper": paper_bound(net, probs), "bound": float(b_dom.max()),
        "bound_data": float(b_pts.mean(0).max()),
        "mc_abs": float(a_o[o]), "mc_abs_lo": float(a_o[o] - hw[o]), "mc_abs_hi": float(a_o[o] + hw[o]),
        "mc_rms": mc_rms, "fo_rms": fo_rms,
        "fo_rms_rel_err": abs(fo_rms - mc_rms) / mc_rms if mc_rms > 0 else 0.0,
        "fo_mean_rel_err": float((fo_m - mc_m).abs().sum() / mc_m.abs().sum()) if mc_m.abs().sum() > 0 else 0.0,
        "fo_mean_noise": float(se_m.sum() / mc_m.abs().sum()) if mc_m.abs().sum() > 0 else 0.0,
        "bound_ok": bool((b_dom >= a_o - hw).all() and (b_pts.mean(0) >= a_o - hw).all()),
        # per input and output, with a Bonferroni interval over all of them
        "point_bound_ok": bool((b_pts >= m_abs - z_all * (v_abs / trials).sqrt()).all()),
        **measured,
    }


def expected_error(net: Network, p: Sequence[float], *, inputs: Tensor | None = None, trials: int = 1000,
                   samples: int = 256, seed: int = 0, confidence: float = 0.95, per_layer: bool = True,
                   rows: int = 1 << 16, labels: Tensor | None = None) -> ExpectedResult:
    """Expected output error under independent crashes with probability ``p[l]`` in hidden layer ``l``.

    Args:
        p: one crash probability per hidden layer, each in [0, 1].
        inputs: where to measure (default: ``samples`` uniform points of the input box, from ``seed``).
        labels: class indices of ``inputs``: the table gains the measured ``clean_accuracy`` and
            ``mc_accuracy`` (accuracy under the random crashes).
        trials: Monte Carlo crash draws per input; ``confidence`` for its intervals.
        per_layer: also run each failing layer alone (how far the first order is, layer by layer).
    """
    probs_list = check_probabilities(net, p)
    if isinstance(trials, bool) or not isinstance(trials, int) or trials < 2:
        raise HwrelError(f"trials must be an integer >= 2, got {trials!r}")
    z_value(confidence)  # validates it
    net64 = net.to(torch.float64)
    g = torch.Generator().manual_seed(seed)
    if inputs is None:
        if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
            raise HwrelError(f"samples must be an integer >= 1, got {samples!r}")
        lo, hi = net64.input_lo, net64.input_hi
        x = lo + (hi - lo) * torch.rand(samples, *net.input_shape, generator=g, dtype=torch.float64)
    else:
        if not isinstance(inputs, Tensor) or inputs.dim() < 1 or inputs.shape[0] == 0:
            raise HwrelError("inputs must be a non-empty batch tensor")
        if tuple(inputs.shape[1:]) != tuple(net.input_shape):
            raise HwrelError(f"inputs have per-sample shape {tuple(inputs.shape[1:])}, the network expects "
                             f"{tuple(net.input_shape)}")
        x = inputs.to(torch.float64)
        if bool(((x < net64.input_lo) | (x > net64.input_hi)).any()):
            raise HwrelError("some inputs lie outside the network's input domain (the bounds assume it)")
    probs = {i: q for i, q in zip(net.layers, probs_list)}
    scenarios = []
    failing = [i for i in net.layers if probs[i] > 0]
    if per_layer and len(failing) > 1:
        for k, i in enumerate(net.layers):
            if probs[i] > 0:
                scenarios.append((f"layer {k + 1} ({net.nodes[i].name})", {i: probs[i]}))
    scenarios.append(("all" if len(failing) != 1 else
                      f"layer {net.layers.index(failing[0]) + 1} ({net.nodes[failing[0]].name})", probs))
    if labels is not None:
        if inputs is None:
            raise HwrelError("labels need the inputs they belong to")
        labels = torch.as_tensor(labels)
        if labels.shape != (x.shape[0],):
            raise HwrelError(f"labels must be one class index per input ({x.shape[0]}), got shape "
                             f"{tuple(labels.shape)}")
    rows_out = [_scenario(net64, name, pr, x, trials, confidence, g, rows, labels) for name, pr in scenarios]
    return ExpectedResult(tuple(probs_list), trials, int(x.shape[0]), float(confidence), pd.DataFrame(rows_out))
