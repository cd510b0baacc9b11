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
