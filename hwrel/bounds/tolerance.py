"""Inverse questions: how many failures can each layer, and the network, tolerate?

Uses the "at most f" (monotone) bounds, so a tolerated count ``f`` means *every* failure vector
with at most ``f`` failures in that layer keeps the certified output error within the budget
``epsilon - epsilon'``.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd
import torch
from torch import Tensor

from hwrel.bounds.api import Analyzer, _check_method, check_epsilon
from hwrel.bounds.faults import FaultModel, as_fault
from hwrel.errors import HwrelError
from hwrel.network import Network


@dataclass(frozen=True)
class ToleranceResult:
    """Certified tolerated failures.

    Attributes:
        per_layer: largest count each layer tolerates alone (others at 0).
        maximal: a maximal failure vector (no single entry can grow) within the budget.
        budget: ``epsilon - epsilon_prime`` used for the bound.
        epsilon, epsilon_prime: the total error budget and the network's own error.
        bound_maximal: the certified bound at ``maximal``.
    """

    per_layer: tuple[int, ...]
    maximal: tuple[int, ...]
    budget: float
    epsilon: float
    epsilon_prime: float
    method: str
    fault: str
    bound_maximal: float
    layers: tuple[str, ...] = field(default=())
    sizes: tuple[int, ...] = field(default=())

    def table(self) -> pd.DataFrame:
        return pd.DataFrame({"layer": range(1, len(self.per_layer) + 1), "name": self.layers,
                             "size": self.sizes, "tolerated_alone": self.per_layer, "maximal_vector": self.maximal})

    def to_dict(self) -> dict:
        return {"per_layer": list(self.per_layer), "maximal": list(self.maximal), "budget": self.budget,
                "epsilon": self.epsilon, "epsilon_prime": self.epsilon_prime, "method": self.method,
                "fault": self.fault, "bound_maximal": self.bound_maximal, "layers": list(self.layers),
                "sizes": list(self.sizes), "kind": "certified"}


def own_error(net: Network, inputs: Tensor, targets: Tensor) -> float:
    """``epsilon'`` measured on data: ``max |F(x) - target|`` over samples and outputs.

    ``targets`` are either outputs-shaped tensors or integer class labels (then one-hot targets).
    This is a measurement on the given data, not a bound over the domain.
    """
    with torch.no_grad():
        out = net.forward(inputs.to(net.input_lo.dtype).to(net.input_lo.device)).cpu()
    if targets.dtype in (torch.int64, torch.int32) and targets.dim() == 1:
        if targets.numel() != out.shape[0]:
            raise HwrelError(f"{targets.numel()} labels for {out.shape[0]} inputs")
        if int(targets.max()) >= out.shape[1] or int(targets.min()) < 0:
            raise HwrelError(f"labels must be in [0, {out.shape[1] - 1}] for {out.shape[1]} outputs")
        targets = torch.nn.functional.one_hot(targets, out.shape[1]).to(out.dtype)
    if targets.shape != out.shape:
        raise HwrelError(f"targets of shape {tuple(targets.shape)} do not match outputs {tuple(out.shape)}")
    return float((out - targets).abs().max())


def tolerance(net: Network, epsilon: float, fault: str | FaultModel = "crash", *, capacity: float | None = None,
              mode: str = "safe", method: str = "best", epsilon_prime: float | None = None,
              data: tuple[Tensor, Tensor] | None = None,
              device: "torch.device | str | None" = None) -> ToleranceResult:
    """Largest tolerated failures such that the certified bound stays within ``epsilon - epsilon'``.

    ``epsilon'`` is given, or measured on ``data=(inputs, targets_or_labels)``, or 0.
    """
    _check_method(method)
    check_epsilon(epsilon)
    fm = as_fault(fault, capacity, mode)
    an = Analyzer(net, device)
    if epsilon_prime is None:
        epsilon_prime = own_error(an.net, *data) if data is not None else 0.0
    check_epsilon(epsilon_prime, "epsilon_prime")
    budget = float(epsilon) - float(epsilon_prime)
    if budget < 0:
        raise HwrelError(f"epsilon {epsilon} is below the network's own error epsilon' = {epsilon_prime:.6g}: "
                         "no failure is tolerable")
    nodes = an.net.synapse_layers if fm.synapse else an.net.layers
    caps = [an.net.nodes[i].affine.weight.numel() if fm.synapse else an.net.nodes[i].size for i in nodes]

    def ok(vec: list[int]) -> bool:
        return an.all_methods(fm, vec, at_most=True, only=method)[method] <= budget

    def largest(vec: list[int], k: int) -> int:
        lo, hi = vec[k], caps[k]  # vec[k] is known to be ok
        while lo < hi:
            mid = (lo + hi + 1) // 2
            trial = list(vec)
            trial[k] = mid
            if ok(trial):
                lo = mid
            else:
                hi = mid - 1
        return lo

    zeros = [0] * len(nodes)
    per_layer = [largest(zeros, k) for k in range(len(nodes))]
    vec = list(zeros)
    for k in range(len(nodes)):
        vec[k] = largest(vec, k)
    bound = an.all_methods(fm, vec, at_most=True, only=method)[method]
    return ToleranceResult(tuple(per_layer), tuple(vec), budget, float(epsilon), float(epsilon_prime), method,
                           fm.describe(), bound, tuple(an.net.nodes[i].name for i in nodes), tuple(caps))


# ------------------------------------------------------------------ general graphs (ViT, LLaMA-style LM)

@dataclass(frozen=True)
class GraphToleranceResult:
    """Certified tolerated failures per failure layer of a general graph (:mod:`hwrel.bounds.graph`),
    on the given test inputs (not over the input domain, where these bounds are vacuous).

    ``table``: one row per layer (the others at 0 failures): ``tolerated`` (largest count within the
    budget, found by doubling then bisection over counts; each reported count itself evaluated),
    ``bound_max`` / ``bound_median`` at that count over the inputs (output units),
    ``certified_fraction`` (inputs, or token positions of a language model, whose top-1 provably
    stays the clean model's) and, for a classifier with labels, ``certified_accuracy``; the same
    columns at one failure (``*_1``). ``criterion``: ``"epsilon"`` (every input's bound within
    ``budget = epsilon - epsilon'``) or ``"agreement"`` (the certified share of unchanged top-1
    predictions, or of correct ones with labels, drops by at most ``budget``).
    """

    table: pd.DataFrame
    criterion: str
    budget: float
    fault: str
    inputs: int
    epsilon: float | None = None
    epsilon_prime: float | None = None
    max_drop: float | None = None
    clean_accuracy: float | None = None

    def to_dict(self) -> dict:
        return {"path": "graph", "criterion": self.criterion, "budget": self.budget, "fault": self.fault,
                "inputs": self.inputs, "epsilon": self.epsilon, "epsilon_prime": self.epsilon_prime,
                "max_drop": self.max_drop, "clean_accuracy": self.clean_accuracy, "kind": "certified",
                "over": "test inputs", "per_layer": self.table.to_dict(orient="records")}


def graph_tolerance(model: torch.nn.Module, inputs: Tensor, labels: Tensor | None = None, *,
                    epsilon: float | None = None, epsilon_prime: float = 0.0, max_drop: float | None = None,
                    fault: str | FaultModel = "crash", capacity: float | None = None, batch: int = 64,
                    progress=None) -> GraphToleranceResult:
    """Largest failures each layer of a general graph tolerates alone, **sound on each test input**.

    Exactly one budget: ``epsilon`` (with the model's own error ``epsilon_prime``): every input's
    certified bound (max over outputs, :func:`hwrel.bounds.graph.graph_bound`) stays within
    ``epsilon - epsilon_prime``; or ``max_drop``: the fraction of inputs (token positions for a
    language model's ``(B, T, V)`` logits) whose top-1 is certified unchanged (and correct, given
    class ``labels``) is at most ``max_drop`` below the clean model's. A count is reported only as
    evaluated: the search (doubling, then bisection) assumes the bound grows with the failures, as
    every rule does; were it not so, a smaller tolerated count would be reported, never a wrong one.
    ``progress(fraction, message)`` after each evaluation.
    """
    from hwrel.bounds.certify import certified_from_bounds
    from hwrel.bounds.graph import graph_bound, layer_sizes, trace
    from hwrel.inject.general_sites import plain_forward

    if (epsilon is None) == (max_drop is None):
        raise HwrelError("give exactly one budget: epsilon (output units) or max_drop (a fraction)")
    fm = as_fault(fault, capacity)
    if epsilon is not None:
        check_epsilon(epsilon)
        check_epsilon(epsilon_prime, "epsilon_prime")
        budget = float(epsilon) - float(epsilon_prime)
        if budget < 0:
            raise HwrelError(f"epsilon {epsilon} is below the model's own error epsilon' = {epsilon_prime:.6g}: "
                             "no failure is tolerable")
    else:
        if isinstance(max_drop, bool) or not isinstance(max_drop, (int, float)) or not 0 <= max_drop < 1:
            raise HwrelError(f"max_drop must be a fraction in [0, 1), got {max_drop!r}")
        budget = float(max_drop)
    gm = trace(model)
    sizes = layer_sizes(gm, inputs)
    layers = list(sizes)
    batches = [inputs[s:s + batch] for s in range(0, inputs.shape[0], batch)]
    with plain_forward():
        clean = [gm(xb).double() for xb in batches]
    if max_drop is not None and clean[0].dim() not in (2, 3):
        raise HwrelError(f"max_drop needs class logits (B, C) or language-model logits (B, T, V); the model "
                         f"outputs {tuple(clean[0].shape[1:])} per input: give epsilon instead")
    ys = None
    if labels is not None and clean[0].dim() == 2:
        ys = [labels[s:s + batch] for s in range(0, inputs.shape[0], batch)]
        clean_acc = float(torch.cat([c.argmax(1) == y for c, y in zip(clean, ys)]).double().mean())
    else:
        clean_acc = None
    say = progress or (lambda frac, msg: None)
    done = [0]

    def evaluate(layer: str, f: int) -> dict[str, float]:
        per, good = [], []
        for k, xb in enumerate(batches):
            b = graph_bound(gm, {layer: f}, fm, lo=xb).bound
            per.append(b.amax(1))
            if max_drop is not None:
                c = clean[k]
                logits = c.reshape(-1, c.shape[-1])
                pred, cert = certified_from_bounds(logits, b.reshape(logits.shape))
                if ys is not None:
                    cert = cert & (pred == ys[k])
                good.append(cert)
        done[0] += 1
        say(min(0.95, done[0] / (12 * len(layers))), f"tolerance: {layer}, {f} failures")
        per_t = torch.cat(per)
        row = {"bound_max": float(per_t.max()), "bound_median": float(per_t.median())}
        if good:
            share = float(torch.cat(good).double().mean())
            row["certified_fraction"] = share
            row["drop"] = (clean_acc if ys is not None else 1.0) - share
        return row

    rows = []
    for layer in layers:
        size = sizes[layer]
        seen: dict[int, dict[str, float]] = {}

        def ok(f: int) -> bool:
            if f not in seen:
                seen[f] = evaluate(layer, f)
            r = seen[f]
            return (r["bound_max"] <= budget) if epsilon is not None else (r["drop"] <= budget + 1e-12)

        lo, f = 0, 1
        while f <= size and ok(f):
            lo, f = f, 2 * f
        hi = min(f, size + 1)  # the first count that failed, or size + 1
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if ok(mid) else (lo, mid)
        at = seen[lo] if lo else evaluate(layer, 0)
        one = seen.get(1) or evaluate(layer, 1)
        row = {"layer": layer, "size": size, "tolerated": lo, "tolerated_fraction": lo / size,
               "bound_max": at["bound_max"], "bound_median": at["bound_median"]}
        if "certified_fraction" in at:
            row["certified_fraction"] = at["certified_fraction"]
            if ys is not None:
                row["certified_accuracy"] = (clean_acc or 0.0) - at["drop"]
        row.update({"bound_max_1": one["bound_max"], "bound_median_1": one["bound_median"]})
        if "certified_fraction" in one:
            row["certified_fraction_1"] = one["certified_fraction"]
        rows.append(row)
    say(1.0, "tolerance: done")
    return GraphToleranceResult(pd.DataFrame(rows), "epsilon" if epsilon is not None else "agreement", budget,
                                fm.describe(), int(inputs.shape[0]),
                                float(epsilon) if epsilon is not None else None,
                                float(epsilon_prime) if epsilon is not None else None,
                                float(max_drop) if max_drop is not None else None, clean_acc)


def own_error_of_outputs(model: torch.nn.Module, inputs: Tensor, labels: Tensor) -> float:
    """``epsilon'`` of a general model measured on data, as :func:`own_error`: ``max |F(x) -
    one-hot label|`` for class logits ``(B, C)``; 0 for other outputs (no target to compare with).
    A measurement on the given data, not a bound."""
    from hwrel.inject.general_sites import plain_forward

    with plain_forward():
        out = model(inputs[:1])
    if out.dim() != 2 or labels is None or labels.dim() != 1:
        return 0.0
    with plain_forward():
        out = torch.cat([model(inputs[s:s + 256]) for s in range(0, inputs.shape[0], 256)]).double()
    return float((out - torch.nn.functional.one_hot(labels.long(), out.shape[1]).double()).abs().max())
