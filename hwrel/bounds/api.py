"""Public bound API: ``fep``, ``tolerance`` and ``certified_accuracy``.

Methods (all sound upper bounds on ``max_o sup_{x in domain} |F_o(x) - F~_o(x)|``):

- ``"paper"``: the paper's Forward Error Propagation (closed form, theory 2).
- ``"weights"``: weight-aware bounds (theory 4): min of the top-sum recursion and gain vectors.
- ``"interval"``: domain-aware (IBP over the input box, per-neuron radii and slopes).
- ``"best"`` (default): the smallest of all of them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import pandas as pd
import torch
from torch import Tensor

from hwrel.bounds.faults import FaultModel, as_fault
from hwrel.bounds.gain import gain_bound
from hwrel.bounds.ibp import interval_bounds, sup_abs
from hwrel.bounds.interval import FAULTY, forward_radii, global_slopes
from hwrel.bounds.paper import layer_deltas, propagate
from hwrel.errors import HwrelError
from hwrel.network import Network

METHODS = ("paper", "weights", "interval", "best")


@dataclass(frozen=True)
class BoundResult:
    """A certified bound on the worst-case output error (same units as the model's outputs).

    ``bound`` is the value of ``method``; ``by_method`` holds every method computed.
    """

    bound: float
    method: str
    fault: str
    failures: tuple[int, ...]
    at_most: bool
    by_method: dict[str, float] = field(default_factory=dict)

    def __float__(self) -> float:
        return self.bound

    def to_dict(self) -> dict:
        return {"bound": self.bound, "method": self.method, "fault": self.fault,
                "failures": list(self.failures), "at_most": self.at_most, "by_method": dict(self.by_method),
                "kind": "certified"}


class Analyzer:
    """Caches what all queries on one network share (float64 copy, nominal intervals, gains)."""

    def __init__(self, net: Network, device: "torch.device | str | None" = None):
        if not isinstance(net, Network):
            raise HwrelError(f"expected a hwrel.Network (use Network.from_module), got {type(net).__name__}")
        self.device = torch.device(device) if device is not None else net.input_lo.device
        self.net = net.to(torch.float64, self.device)
        self.lo = self.net.input_lo[None]
        self.hi = self.net.input_hi[None]
        self.nominal = interval_bounds(self.net, self.lo, self.hi)
        self.sups = [sup_abs(lo, hi) for lo, hi in zip(*self.nominal)]
        self.scalar_sup = layer_deltas(self.net, self.sups)
        self._global_gains: dict[tuple, Tensor] = {}
        self._domain_radii: dict[tuple, object] = {}

    # -- argument checks --------------------------------------------------------------------
    def counts(self, failures: Sequence[int], fault: FaultModel) -> dict[int, int]:
        nodes = self.net.synapse_layers if fault.synapse else self.net.layers
        what = "synapse layers (affine layers)" if fault.synapse else "hidden layers"
        if isinstance(failures, (int, float)) or isinstance(failures, str):
            raise HwrelError(f"failures must be a list with one count per {what[:-1]}, got {failures!r}")
        failures = list(failures)
        if len(failures) != len(nodes):
            raise HwrelError(f"failures has {len(failures)} entries but the network has {len(nodes)} {what}")
        out = {}
        for k, (node, f) in enumerate(zip(nodes, failures)):
            if isinstance(f, bool) or not float(f).is_integer() or f < 0:
                raise HwrelError(f"failures[{k}] = {f!r}: expected a non-negative integer")
            cap = self.net.nodes[node].affine.weight.numel() if fault.synapse else self.net.nodes[node].size
            if f > cap:
                raise HwrelError(f"failures[{k}] = {int(f)} exceeds the {cap} "
                                 f"{'synapses' if fault.synapse else 'neurons'} of layer {self.net.nodes[node].name}")
            out[node] = int(f)
        return out

    # -- methods ----------------------------------------------------------------------------
    def paper(self, fault: FaultModel, failures: Sequence[int], at_most: bool) -> float:
        return propagate(self.net, fault, list(failures), self.sups, "paper", at_most)

    def topsum(self, fault: FaultModel, failures: Sequence[int], at_most: bool) -> float:
        return propagate(self.net, fault, list(failures), self.sups, "topsum", at_most)

    def gains_global(self, fault: FaultModel, counts: dict[int, int]) -> float:
        deltas = {}
        for i in counts:
            src = self.net.nodes[i].inputs[0] if fault.synapse else i
            deltas[i] = fault.delta(torch.tensor(self.scalar_sup[src], dtype=torch.float64, device=self.device))
        slack = self._quant_slack(None, counts)
        # float32 rounding where a fault reaches, as the domain's interval radii bound it
        _add(slack, self.domain_radii(fault, counts).rounding)
        return float(gain_bound(self.net, counts, global_slopes(self.net), deltas, 1, fault.synapse, slack).max())

    def domain_radii(self, fault: FaultModel, counts: dict[int, int]):
        """:func:`forward_radii` over the input domain, computed once per fault and counts."""
        key = (fault, tuple(sorted(counts.items())))
        if key not in self._domain_radii:
            self._domain_radii[key] = forward_radii(self.net, fault, counts, self.lo, self.hi, self.nominal)
        return self._domain_radii[key]

    def _quant_slack(self, radii, counts) -> dict[int, Tensor]:
        out = {}
        if not any(counts.values()):
            return out
        for i, node in enumerate(self.net.nodes):
            if node.op == "act" and node.act.quant_step > 0:
                if radii is None:
                    out[i] = torch.full((1, *node.shape), node.act.quant_step, dtype=torch.float64, device=self.device)
                else:
                    e_in = radii[node.inputs[0]]
                    out[i] = node.act.quant_step * (e_in > 0).to(torch.float64)
        return out

    def interval(self, fault: FaultModel, counts: dict[int, int], lo: Tensor | None = None,
                 hi: Tensor | None = None, nominal=None, reference: str = "float32") -> Tensor:
        """Per-box, per-output bound ``(B, n_out)`` (domain box by default) on the change from the
        clean to the faulty float32 forward; ``reference="exact"``: from the exact clean network
        (what a per-sample certificate needs: no clean float32 rounding to cover)."""
        lo = self.lo if lo is None else lo
        hi = self.hi if hi is None else hi
        domain = lo is self.lo and hi is self.hi and nominal is None and reference == "float32"
        if domain:
            r = self.domain_radii(fault, counts)
        elif reference == "exact":
            r = forward_radii(self.net, fault, counts, lo, hi, nominal, rounding=FAULTY)
        else:
            r = forward_radii(self.net, fault, counts, lo, hi, nominal)
        if not any(counts.values()):
            return r.bound
        deltas = r.syn_deltas if fault.synapse else r.deltas
        slack = self._quant_slack(r.radii, counts)
        _add(slack, r.rounding)
        g = gain_bound(self.net, counts, r.slopes, deltas, lo.shape[0], fault.synapse, slack)
        return torch.minimum(r.bound, g)

    def all_methods(self, fault: FaultModel, failures: Sequence[int], at_most: bool,
                    only: str = "best") -> dict[str, float]:
        """Bound by each method (``only`` other than "best" computes just that one)."""
        counts = self.counts(failures, fault)
        wanted = METHODS if only == "best" else (only,)
        if not any(counts.values()):
            return {m: 0.0 for m in wanted}
        out: dict[str, float] = {}
        if "paper" in wanted:
            out["paper"] = self.paper(fault, failures, at_most)
        if "weights" in wanted:
            out["weights"] = min(self.topsum(fault, failures, at_most), self.gains_global(fault, counts))
        if "interval" in wanted:
            out["interval"] = float(self.interval(fault, counts).max())
        if only == "best":
            out["best"] = min(out["paper"], out["weights"], out["interval"])
        return out


def _add(into: dict[int, Tensor], extra: dict[int, Tensor]) -> None:
    """Add the injections ``extra`` (per node) into ``into``, broadcasting per-box tensors."""
    for i, v in extra.items():
        into[i] = into[i] + v if i in into else v


def _check_method(method: str) -> None:
    if method not in METHODS:
        raise HwrelError(f"unknown method {method!r}; expected one of {', '.join(METHODS)}")


def fep(net: Network, failures: Sequence[int], fault: str | FaultModel = "crash", *,
        capacity: float | None = None, mode: str = "safe", method: str = "best",
        at_most: bool = False, device: "torch.device | str | None" = None) -> BoundResult:
    """Certified bound on the worst-case output error under the given failures.

    Args:
        net: from :meth:`hwrel.Network.from_module`.
        failures: one count per hidden layer (neuron faults) or per affine layer (synapse faults).
        fault: ``"crash"``, ``"byzantine"``, ``"synapse-crash"``, ``"synapse-byzantine"``.
        capacity: Byzantine transmission capacity ``C``; ``mode``: ``"safe"`` or ``"paper"`` error.
        method: ``"paper"``, ``"weights"``, ``"interval"`` or ``"best"``.
        at_most: bound every failure vector ``f' <= failures`` (what tolerance queries need);
            otherwise exactly ``failures`` (the paper's semantics; the other methods are
            monotone so both coincide for them).
        device: where to compute (``"cuda"`` for a GPU); results agree with the CPU up to
            float64 rounding.

    Returns:
        :class:`BoundResult`; ``bound`` upper-bounds ``max_o sup_x |F_o(x) - F~_o(x)|`` over the
        input domain and every failure set of the given sizes (sound, tested against injection).
    """
    _check_method(method)
    fm = as_fault(fault, capacity, mode)
    an = Analyzer(net, device)
    res = an.all_methods(fm, failures, at_most, only=method)
    return BoundResult(res[method], method, fm.describe(), tuple(int(f) for f in failures), at_most, res)


def fep_table(net: Network, fault: str | FaultModel = "crash", *, capacity: float | None = None,
              mode: str = "safe", failures_per_layer: int = 1) -> pd.DataFrame:
    """Bounds per method for ``failures_per_layer`` failures in each layer alone (one row per layer)."""
    fm = as_fault(fault, capacity, mode)
    an = Analyzer(net)
    nodes = net.synapse_layers if fm.synapse else net.layers
    rows = []
    for k, node in enumerate(nodes):
        f = [0] * len(nodes)
        cap = net.nodes[node].affine.weight.numel() if fm.synapse else net.nodes[node].size
        f[k] = min(failures_per_layer, cap)
        res = an.all_methods(fm, f, at_most=True)
        rows.append({"layer": k + 1, "name": net.nodes[node].name, "failures": f[k], **res,
                     "weights_over_paper": res["weights"] / res["paper"] if res["paper"] > 0 else float("nan")})
    return pd.DataFrame(rows)


def check_epsilon(epsilon: float, name: str = "epsilon") -> float:
    if isinstance(epsilon, bool) or not isinstance(epsilon, (int, float)) or math.isnan(epsilon) or epsilon < 0:
        raise HwrelError(f"{name} must be a number >= 0, got {epsilon!r}")
    return float(epsilon)
