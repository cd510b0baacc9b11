"""Boosting (theory 3.2): neurons that fire before all their inputs arrived, with a certified error.

A neuron of layer ``l+1`` waits for a *quorum* ``q_l = N_l - f_l`` of its ``N_l`` input signals and
substitutes a constant ``m_i`` for each missing sender ``i``. Layers are indexed by the *sending*
layer: ``l = 0`` are the inputs (received by the first hidden layer), ``l = L`` the last hidden layer
(received by the outputs). The substitute is the midpoint of the sender's interval-propagated
nominal range (``substitute="neuron"``) or of the whole layer's range (``"layer"``, the theory's
single ``m_l``); the per-signal error is ``d_i = sup |y_i - m_i|`` over that range.

Two sound bounds on ``max_o sup_x |F~_o(x) - F_o(x)|`` over the input domain and every pattern of
missing signals (each receiver may miss a different set):

- ``"paper"``: ``sum_l f_l d_l w_m^(L+1) prod_{l'>l} K N_l' w_m^(l')`` with ``d_l = max_i d_i``;
- ``"interval"``: per-neuron radii, each receiver missing its own worst ``f_l`` senders
  (``TopSum_f(|W_j,:| (d - e)^+)``), slopes over the faulty reachable interval. Never larger in
  practice; used to choose quorums.

:func:`simulate` runs the network as message passing with random link latencies and measures both
the latency gain and the output error (which the tests compare with both bounds). Dense (MLP)
networks only.
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from hwrel.bounds.api import Analyzer, check_epsilon
from hwrel.bounds.fp32 import local_rounding, scalar_rounding
from hwrel.bounds.interval import linear_topsum
from hwrel.errors import HwrelError, UnsupportedLayerError
from hwrel.network import Network, Node

BOOST_METHODS = ("paper", "interval")
SUBSTITUTES = ("neuron", "layer")
LATENCIES = {"exp": ("mean",), "lognormal": ("mu", "sigma"), "pareto": ("alpha", "scale")}
_LATENCY_DEFAULTS = {"exp": (1.0,), "lognormal": (0.0, 1.0), "pareto": (1.5, 1.0)}


@dataclass(frozen=True)
class _Stage:
    """One receiving layer: its affine node, and its activation node (None for the output)."""

    affine: Node
    act: Node | None
    pre: int  # node index of the affine (for nominal intervals)
    post: int | None  # node index of the activation


def dense_chain(net: Network) -> list[_Stage]:
    """The ``Linear -> act -> ... -> Linear`` chain of ``net``; anything else is unsupported."""
    stages: list[_Stage] = []
    nodes = net.nodes
    i = 1
    while i < len(nodes) and nodes[i].op == "reshape" and len(nodes[i].shape) == 1 and not stages:
        i += 1  # a leading flatten keeps the flat order of the inputs
    while i < len(nodes):
        node = nodes[i]
        if node.op != "affine" or node.affine.kind != "linear":
            raise UnsupportedLayerError(f"boosting supports dense (MLP) networks only: node {node.name!r} "
                                        f"is {node.affine.kind if node.affine else node.op}")
        if len(nodes[node.inputs[0]].shape) != 1:
            raise UnsupportedLayerError(f"boosting supports dense (MLP) networks only: linear layer {node.name!r} "
                                        f"acts on the rows of a {tuple(nodes[node.inputs[0]].shape)} input")
        nxt = nodes[i + 1] if i + 1 < len(nodes) else None
        if nxt is not None and nxt.op != "act":
            raise UnsupportedLayerError(f"boosting supports dense (MLP) networks only: node {nxt.name!r} "
                                        f"({nxt.op}) follows linear layer {node.name!r}")
        stages.append(_Stage(node, nxt, i, i + 1 if nxt is not None else None))
        i += 2
    if not stages or stages[-1].act is not None:
        raise UnsupportedLayerError("boosting needs a network ending in a linear output layer")
    return stages


@dataclass(frozen=True)
class BoostResult:
    """Quorums and substitutes per sending layer ``l = 0..L``, with the certified output error.

    ``certified`` (method ``interval``) and ``certified_paper`` are sound bounds on
    ``max_o sup_x |F~_o(x) - F_o(x)|`` in the model's output units; ``quorum[l]`` is how many of
    its ``fan_in[l]`` signals each neuron of layer ``l+1`` waits for.
    """

    quorum: tuple[int, ...]
    fan_in: tuple[int, ...]
    substitutes: tuple[np.ndarray, ...]
    signal_error: tuple[float, ...]  # max_i d_i per sending layer
    certified: float
    certified_paper: float
    budget: float
    epsilon: float | None
    epsilon_prime: float
    method: str
    substitute: str
    receivers: tuple[str, ...]

    @property
    def relaxed(self) -> tuple[int, ...]:
        return tuple(n - q for n, q in zip(self.fan_in, self.quorum))

    @property
    def bound(self) -> float:
        return self.certified if self.method == "interval" else self.certified_paper

    def table(self) -> pd.DataFrame:
        return pd.DataFrame({
            "sender_layer": range(len(self.quorum)), "receiver": self.receivers, "fan_in": self.fan_in,
            "quorum": self.quorum, "may_miss": self.relaxed,
            "substitute_min": [float(m.min()) for m in self.substitutes],
            "substitute_max": [float(m.max()) for m in self.substitutes],
            "signal_error": self.signal_error})

    def to_dict(self) -> dict:
        return {"quorum": list(self.quorum), "fan_in": list(self.fan_in), "may_miss": list(self.relaxed),
                "substitutes": [m.tolist() for m in self.substitutes], "signal_error": list(self.signal_error),
                "certified": self.certified, "certified_paper": self.certified_paper, "budget": self.budget,
                "epsilon": self.epsilon, "epsilon_prime": self.epsilon_prime, "method": self.method,
                "substitute": self.substitute, "receivers": list(self.receivers), "kind": "certified"}


class _Boost:
    """What every quorum query on one network shares: float64 chain, nominal ranges, substitutes."""

    def __init__(self, net: Network, substitute: str):
        if substitute not in SUBSTITUTES:
            raise HwrelError(f"unknown substitute {substitute!r}; expected one of {', '.join(SUBSTITUTES)}")
        self.an = Analyzer(net)
        self.stages = dense_chain(self.an.net)
        los, his = self.an.nominal
        senders = [self.stages[0].pre - 1] + [s.post for s in self.stages[:-1]]
        self.ranges = [(los[i][0].flatten(), his[i][0].flatten()) for i in senders]
        self.pre = [(los[s.pre][0], his[s.pre][0]) for s in self.stages]
        self.subs, self.d = [], []
        for lo, hi in self.ranges:
            m = (lo + hi) / 2 if substitute == "neuron" else torch.full_like(lo, float(lo.min() + hi.max()) / 2)
            self.subs.append(m)
            # outward by a few ulps: d must cover |y - m| as the float64 forward computes it
            self.d.append(torch.maximum(hi - m, m - lo) * (1 + 1e-12))
        self.fan_in = [s.affine.affine.weight.shape[1] for s in self.stages]

    def interval(self, f: Sequence[int]) -> float:
        e = torch.zeros_like(self.ranges[0][0])
        for k, st in enumerate(self.stages):
            w = st.affine.affine.weight.abs()
            e_s = e @ w.T
            if f[k]:
                e_s = e_s + linear_topsum(w, torch.relu(self.d[k] - e)[None], f[k])[0]
            # float32: both forwards round where they differ (the nominal ranges cover the rounding)
            mag = torch.maximum(self.ranges[k][0].abs(), self.ranges[k][1].abs()) + e
            e_s = e_s + 2 * local_rounding(st.affine, [mag[None]])[0] * (e_s > 0)
            if st.act is None:
                return float(e_s.max()) * (1 + 1e-12)
            act = st.act.act
            lo, hi = self.pre[k][0] - e_s, self.pre[k][1] + e_s
            img_lo, img_hi = act.image(lo, hi)
            e = torch.minimum(act.slope_sup(lo, hi) * e_s + act.quant_step * (e_s > 0), img_hi - img_lo)
            r = local_rounding(st.act, [(torch.maximum(lo.abs(), hi.abs()))[None]],
                               torch.maximum(img_lo.abs(), img_hi.abs())[None])
            if isinstance(r, torch.Tensor):
                e = e + 2 * r[0] * (e > 0)
        raise AssertionError("unreachable")  # pragma: no cover

    def paper(self, f: Sequence[int]) -> float:
        # E = bound on the summed |error| over a layer; the closed form of theory 3.2 unrolled,
        # plus float32 rounding of both forwards (as in interval)
        E = 0.0
        for k, st in enumerate(self.stages):
            wm = st.affine.affine.max_abs_weight
            u = wm * (E + f[k] * float(self.d[k].max()))  # any one receiver's pre-activation error
            mag = float(torch.maximum(self.ranges[k][0].abs(), self.ranges[k][1].abs()).max()) + E
            pre = float(torch.maximum(self.pre[k][0].abs(), self.pre[k][1].abs()).max()) + u
            u += 2 * scalar_rounding(st.affine, [mag], pre) if u > 0 else 0.0
            if st.act is None:
                return u * (1 + 1e-12)
            act = st.act.act
            v = act.lipschitz * u + (act.quant_step if u > 0 else 0.0)
            v += 2 * scalar_rounding(st.act, [pre], act.max_abs if act.bounded else pre) if v > 0 else 0.0
            E = st.act.size * v
        raise AssertionError("unreachable")  # pragma: no cover

    def bound(self, f: Sequence[int], method: str) -> float:
        return self.interval(f) if method == "interval" else self.paper(f)

    def check_quorum(self, quorum: Sequence[int]) -> list[int]:
        if isinstance(quorum, (str, int, float)):
            raise HwrelError(f"quorum must be a list with one count per receiving layer, got {quorum!r}")
        q = list(quorum)
        if len(q) != len(self.stages):
            raise HwrelError(f"quorum has {len(q)} entries but the network has {len(self.stages)} receiving "
                             "layers (hidden layers and output)")
        for k, (v, n) in enumerate(zip(q, self.fan_in)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) and not (
                    isinstance(v, float) and v.is_integer()):
                raise HwrelError(f"quorum[{k}] = {v!r}: expected an integer")
            if not 1 <= int(v) <= n:
                raise HwrelError(f"quorum[{k}] = {int(v)} for layer {self.stages[k].affine.name!r}: must lie in "
                                 f"[1, {n}] (its fan-in)")
        return [int(v) for v in q]

    def select(self, budget: float, method: str) -> list[int]:
        """A maximal relaxation: round-robin, each layer may miss one more signal while the bound allows."""
        f = [0] * len(self.stages)
        grown = True
        while grown:
            grown = False
            for k in range(len(f)):
                if f[k] + 1 < self.fan_in[k]:
                    f[k] += 1
                    if self.bound(f, method) <= budget:
                        grown = True
                    else:
                        f[k] -= 1
        return [n - x for n, x in zip(self.fan_in, f)]


def boosting(net: Network, epsilon: float | None = None, *, quorum: Sequence[int] | None = None,
             epsilon_prime: float = 0.0, substitute: str = "neuron", method: str = "interval") -> BoostResult:
    """Quorums (signals each neuron waits for) and substitutes with a certified output error.

    With ``quorum`` given, certifies it (and checks it against ``epsilon`` if given). Otherwise
    picks a maximal relaxation whose ``method`` bound is ``<= epsilon - epsilon_prime``: no layer
    can miss one more signal without exceeding it. Both bounds are sound over the input domain.
    """
    if method not in BOOST_METHODS:
        raise HwrelError(f"unknown method {method!r}; expected one of {', '.join(BOOST_METHODS)}")
    if epsilon is None and quorum is None:
        raise HwrelError("boosting needs epsilon (to choose quorums) or quorum (to certify them)")
    check_epsilon(epsilon_prime, "epsilon_prime")
    b = _Boost(net, substitute)
    budget = math.inf
    if epsilon is not None:
        check_epsilon(epsilon)
        budget = float(epsilon) - float(epsilon_prime)
        if budget < 0:
            raise HwrelError(f"epsilon {epsilon} is below the network's own error epsilon' = {epsilon_prime:.6g}: "
                             "no quorum can meet it")
    if quorum is not None:
        q = b.check_quorum(quorum)
    else:
        q = b.select(budget, method)
    f = [n - x for n, x in zip(b.fan_in, q)]
    res = BoostResult(tuple(q), tuple(b.fan_in), tuple(m.numpy().copy() for m in b.subs),
                      tuple(float(d.max()) for d in b.d), b.interval(f), b.paper(f), budget,
                      None if epsilon is None else float(epsilon), float(epsilon_prime), method, substitute,
                      tuple(s.affine.name for s in b.stages))
    if res.bound > budget:
        raise HwrelError(f"quorum {list(q)} has certified error {res.bound:.6g} ({method}) above "
                         f"epsilon - epsilon' = {budget:.6g}")
    return res


# ------------------------------------------------------------------------------------ simulation

@dataclass(frozen=True)
class Latency:
    """A link-latency distribution (arbitrary time unit): ``exp:MEAN``, ``lognormal:MU,SIGMA``
    (of the underlying normal) or ``pareto:ALPHA[,SCALE]`` (``P(T > t) = (SCALE/t)^ALPHA``, heavy-tailed;
    infinite variance for ``ALPHA <= 2``)."""

    kind: str
    params: tuple[float, ...]

    def sample(self, rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
        if self.kind == "exp":
            return rng.exponential(self.params[0], shape)
        if self.kind == "lognormal":
            return rng.lognormal(self.params[0], self.params[1], shape)
        return (rng.pareto(self.params[0], shape) + 1.0) * self.params[1]

    def describe(self) -> str:
        return f"{self.kind}:" + ",".join(f"{p:g}" for p in self.params)


def parse_latency(spec: "str | Latency") -> Latency:
    """``"pareto:1.5"`` -> :class:`Latency`; missing parameters take their defaults."""
    if isinstance(spec, Latency):
        return spec
    if not isinstance(spec, str):
        raise HwrelError(f"latency must be a string like 'pareto:1.5', got {spec!r}")
    kind, _, rest = spec.strip().partition(":")
    kind = {"exponential": "exp", "log-normal": "lognormal"}.get(kind, kind)
    if kind not in LATENCIES:
        raise HwrelError(f"unknown latency distribution {kind!r} in {spec!r}; expected exp:MEAN, "
                         "lognormal:MU,SIGMA or pareto:ALPHA[,SCALE]")
    names = LATENCIES[kind]
    parts = [p for p in rest.split(",") if p.strip()] if rest else []
    if len(parts) > len(names):
        raise HwrelError(f"latency {spec!r}: {kind} takes at most {len(names)} parameters ({', '.join(names)})")
    params = list(_LATENCY_DEFAULTS[kind])
    for k, text in enumerate(parts):
        try:
            v = float(text)
        except ValueError:
            raise HwrelError(f"latency {spec!r}: {names[k]} = {text.strip()!r} is not a number") from None
        positive = names[k] != "mu"
        if not math.isfinite(v) or (positive and v <= 0):
            raise HwrelError(f"latency {spec!r}: {names[k]} must be a finite number{' > 0' if positive else ''}")
        params[k] = v
    return Latency(kind, tuple(params))


@dataclass(frozen=True)
class SimulationResult:
    """Message-passing runs with and without quorums on the same latency draws (one row per run).

    ``per_sample`` columns: ``latency_full`` (all outputs ready, every neuron waiting for all its
    inputs), ``latency_quorum`` (with the plan's quorums), ``error`` (``max_o |F~_o - F_o|``,
    measured); with labels, ``correct_full`` and ``correct_quorum`` (top-1 equals the label).
    ``certified``/``certified_paper`` come from the plan.
    """

    latency: str
    quorum: tuple[int, ...]
    per_sample: pd.DataFrame
    certified: float
    certified_paper: float

    def summary(self) -> dict:
        d = self.per_sample
        full, quo = d["latency_full"], d["latency_quorum"]
        out = {"latency": self.latency, "quorum": list(self.quorum), "runs": len(d)}
        for q, name in ((0.5, "p50"), (0.99, "p99")):
            a, b = float(full.quantile(q)), float(quo.quantile(q))
            out.update({f"{name}_full": a, f"{name}_quorum": b, f"{name}_reduction": 1 - b / a if a > 0 else 0.0})
        out.update({"max_error": float(d["error"].max()), "mean_error": float(d["error"].mean()),
                    "certified": self.certified, "certified_paper": self.certified_paper,
                    "within_certified": bool(d["error"].max() <= self.certified)
                    and bool(d["error"].max() <= self.certified_paper)})
        if "correct_full" in d:
            out.update({"accuracy_full": float(d["correct_full"].mean()),
                        "accuracy_quorum": float(d["correct_quorum"].mean())})
        return out


def _received(arrival: Tensor, q: int) -> Tensor:
    """Mask of the ``q`` earliest arrivals along the last dim (exactly ``q``, ties by index)."""
    if q >= arrival.shape[-1]:
        return torch.ones_like(arrival, dtype=torch.bool)
    order = arrival.argsort(dim=-1, stable=True)
    return torch.zeros_like(arrival, dtype=torch.bool).scatter_(-1, order[..., :q], True)


@torch.no_grad()
def simulate(net: Network, plan: BoostResult, inputs: Tensor, latency: "str | Latency" = "pareto:1.5", *,
             seed: int = 0, repeats: int = 1, chunk: int = 64,
             labels: Tensor | None = None) -> SimulationResult:
    """Run ``inputs`` (``repeats`` times each) as message passing with i.i.d. link latencies.

    Inputs are available at time 0; a neuron fires when its quorum of input signals has arrived
    (signal = sender firing time + link latency) and substitutes the plan's constants for the rest;
    outputs are computed exactly with those substitutions (float64). The same latency draws run
    once with full quorums (the baseline). Measured, not a bound. ``labels`` (class indices of
    ``inputs``) add the measured accuracy with and without quorums.
    """
    lat = parse_latency(latency)
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise HwrelError(f"repeats must be an integer >= 1, got {repeats!r}")
    stages = dense_chain(net.to(torch.float64))
    if len(plan.quorum) != len(stages) or tuple(plan.fan_in) != tuple(s.affine.affine.weight.shape[1] for s in stages):
        raise HwrelError("the boosting plan was made for a different network")
    if not isinstance(inputs, Tensor) or inputs.dim() < 2 or inputs.shape[0] == 0:
        raise HwrelError("inputs must be a non-empty batch tensor")
    x_all = inputs.to(torch.float64).flatten(1).repeat(repeats, 1)
    y_all = None
    if labels is not None:
        labels = torch.as_tensor(labels)
        if labels.shape != (inputs.shape[0],):
            raise HwrelError(f"labels must be one class index per input ({inputs.shape[0]}), got shape "
                             f"{tuple(labels.shape)}")
        y_all = labels.repeat(repeats)
    rng = np.random.default_rng(seed)
    rows = []
    for b in range(0, x_all.shape[0], chunk):
        y = y_ref = x_all[b:b + chunk]
        t = t_full = torch.zeros_like(y)
        for k, st in enumerate(stages):
            a = st.affine.affine
            n_out, n_in = a.weight.shape
            link = torch.from_numpy(lat.sample(rng, (y.shape[0], n_out, n_in)))
            arr, arr_full = t[:, None, :] + link, t_full[:, None, :] + link
            got = _received(arr, plan.quorum[k])
            m = torch.from_numpy(plan.substitutes[k]).to(torch.float64)
            # exact substitution as a correction to the plain layer: zero when nothing is missing
            fix = torch.where(got, torch.zeros_like(arr), m[None, None, :] - y[:, None, :])
            s = a(y) + torch.einsum("bji,ji->bj", fix, a.weight)
            t = torch.where(got, arr, torch.full_like(arr, -math.inf)).amax(-1)
            t_full = arr_full.amax(-1)
            y_ref = a(y_ref)
            if st.act is not None:
                s, y_ref = st.act.act(s), st.act.act(y_ref)
            y = s
        err = (y - y_ref).abs().amax(1)
        cols = {"latency_full": t_full.amax(1).numpy(), "latency_quorum": t.amax(1).numpy(), "error": err.numpy()}
        if y_all is not None:
            lab = y_all[b:b + chunk]
            cols.update({"correct_full": (y_ref.argmax(1) == lab).numpy(),
                         "correct_quorum": (y.argmax(1) == lab).numpy()})
        rows.append(pd.DataFrame(cols))
    return SimulationResult(lat.describe(), tuple(plan.quorum), pd.concat(rows, ignore_index=True),
                            plan.certified, plan.certified_paper)


class _CallableModule(type(sys.modules[__name__])):
    """``hwrel.boosting`` is this module and the function :func:`boosting`: calling it calls the function."""

    def __call__(self, *args, **kwargs):  # noqa: ANN002, ANN003, ANN204
        return boosting(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
