"""The paper's Forward Error Propagation and its weight-aware top-sum variant (theory 2, 4a).

Both propagate two numbers per node: ``E``, a bound on the summed absolute error over the node's
neurons (the paper's ``E_l``), and ``u``, a bound on any single neuron's error. For a plain chain
``Linear -> act -> ... -> Linear`` the ``"paper"`` variant reproduces the paper's closed form

    Fep = delta * sum_l f_l K^(L-l) w_m^(L+1) prod_{l'>l} (N_l' - f_l') w_m^(l')

exactly (tested against it); residual additions (``E = E_a + E_b``), pooling (an error spreads
to at most ``overlap`` windows) and quantized activations (one rounding step of slack) extend it
soundly. The ``"topsum"`` variant replaces ``(N_l - f_l) * w_m^(l)`` by the largest sum of
``N_l - f_l`` outgoing weights of any one input neuron, which is never larger.

``at_most=True`` gives the "at most f_l failures per layer" semantics: every rule is monotone in
its inputs' ``(E, u)``, so maximising each layer's contribution over ``f' in [0, f_l]`` in order
is the exact maximum over all smaller failure vectors of this (multilinear) recursion.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from hwrel.bounds.faults import FaultModel
from hwrel.bounds.fp32 import scalar_rounding
from hwrel.bounds.ibp import sup_abs
from hwrel.network import Network


@dataclass
class _State:
    E: float  # summed |error| over the node's neurons
    u: float  # max |error| of one neuron
    base_u: float = 0.0  # affine outputs: per-neuron part w_m * E_in (before synapse faults)
    extra: float = 0.0  # affine outputs: summed synapse-fault part
    E_src: float = 0.0  # affine outputs: E of the affine's input
    affine: int | None = None  # affine outputs: node index


class ColumnTopsums:
    """``cs(k)`` = the largest sum of ``k`` outgoing |weights| of any one input neuron.

    For a convolution the outgoing weights of an input neuron are a subset of its input channel's
    kernel entries over all output channels (each used at most once), so their top sums bound it.
    Sorting is only done when some ``k`` is below the number of entries (otherwise ``cs(k)`` is the
    largest column sum).
    """

    def __init__(self, net: Network, idx: int):
        a = net.nodes[idx].affine
        w = a.abs_weight
        self.cols = w if a.kind == "linear" else w.transpose(0, 1).reshape(w.shape[1], -1).T
        self.rows = self.cols.shape[0]
        self.full = float(self.cols.sum(0).max())
        self._sorted: Tensor | None = None

    def __call__(self, ks: Tensor) -> Tensor:
        ks = ks.long()
        if bool((ks >= self.rows).all()):
            return torch.full(ks.shape, self.full, dtype=torch.float64)
        if self._sorted is None:
            srt = torch.sort(self.cols, dim=0, descending=True).values
            cs = torch.cumsum(srt, dim=0).max(dim=1).values
            self._sorted = torch.cat([cs.new_zeros(1), cs]).to(torch.float64).cpu()
        return self._sorted[ks.clamp(max=self.rows)]


def column_topsums(net: Network, idx: int) -> ColumnTopsums:
    return ColumnTopsums(net, idx)


def layer_deltas(net: Network, nominal_sup: list[Tensor]) -> list[float]:
    """Per node: ``sup |y|`` used by the domain-free methods (activation range if bounded)."""
    out = []
    for i, node in enumerate(net.nodes):
        if node.op == "act" and node.act.bounded:
            out.append(node.act.max_abs)
        else:
            out.append(float(nominal_sup[i].max()))
    return out


def propagate(net: Network, fault: FaultModel, failures: list[int], nominal_sup: list[Tensor],
              variant: str = "paper", at_most: bool = False) -> float:
    """Bound on ``max_o sup_x |F_o(x) - F~_o(x)|`` (sound). ``failures`` is per layer or synapse layer."""
    layer_f = {n: 0 for n in net.layers}
    syn_g = {n: 0 for n in net.synapse_layers}
    target = syn_g if fault.synapse else layer_f
    for node_idx, f in zip(net.synapse_layers if fault.synapse else net.layers, failures):
        target[node_idx] = int(f)
    sups = layer_deltas(net, nominal_sup)
    cs_cache: dict[int, Tensor] = {}

    def cs_of(idx: int) -> Tensor:
        if idx not in cs_cache:
            cs_cache[idx] = column_topsums(net, idx)
        return cs_cache[idx]

    st: list[_State] = []
    for i, node in enumerate(net.nodes):
        if node.op == "input":
            st.append(_State(0.0, 0.0))
            continue
        ins = [st[j] for j in node.inputs]
        if node.op == "affine":
            src = node.inputs[0]
            w_m = node.affine.max_abs_weight
            g = syn_g.get(i, 0)
            dsyn = float(fault.delta(torch.tensor(sups[src]))) if g else 0.0
            base_u = w_m * ins[0].E
            extra = w_m * g * dsyn
            if variant == "paper":
                E = node.size * base_u + extra
                u = base_u + extra
            else:
                E = cs_of(i).full * ins[0].E + extra
                row_l1 = float(node.affine.abs_weight.flatten(1).sum(1).max())
                u = min(base_u, row_l1 * ins[0].u) + extra
            st.append(_State(E, u, base_u, extra, ins[0].E, i))
        elif node.op == "act":
            st.append(_act(net, i, ins[0], layer_f.get(i, 0), fault, sups[i], variant, at_most, cs_of))
        elif node.op == "pool":
            s = ins[0]
            u = node.pool.gain * s.u
            st.append(_State(min(node.pool.overlap * s.E, node.size * u), u))
        elif node.op == "reshape":
            s = ins[0]
            st.append(_State(s.E, s.u))
        elif node.op == "add":
            st.append(_State(sum(s.E for s in ins), sum(s.u for s in ins)))
        else:  # pragma: no cover
            raise ValueError(node.op)
        s_i = st[-1]
        if s_i.u > 0:  # float32 rounding of both forwards wherever a fault reaches
            mags = [sups[j] + st[j].u for j in node.inputs]
            r = 2 * scalar_rounding(node, mags, sups[i] + s_i.u)
            if r:
                s_i.u += r
                s_i.E += node.size * r
                s_i.extra += node.size * r  # an affine's summed part: what its act's rules add
    return st[-1].u


def _act(net: Network, i: int, s: _State, f: int, fault: FaultModel, sup: float, variant: str,
         at_most: bool, cs_of) -> _State:
    node = net.nodes[i]
    act = node.act
    n = node.size
    k = act.lipschitz
    step = act.quant_step
    delta = float(fault.delta(torch.tensor(sup))) if (f and not fault.synapse) else 0.0
    fs = torch.arange(0, f + 1, dtype=torch.float64) if at_most else torch.tensor([float(f)], dtype=torch.float64)
    if s.affine is not None and variant == "topsum":
        correct = cs_of(s.affine)(n - fs) * s.E_src + s.extra
    elif s.affine is not None:
        correct = (n - fs) * s.base_u + s.extra
    else:
        correct = torch.minimum(torch.full_like(fs, s.E), (n - fs) * s.u)
    step_term = (n - fs) * step if s.u > 0 else torch.zeros_like(fs)
    E = fs * delta + k * correct + step_term
    u_in = k * s.u + (step if s.u > 0 else 0.0)
    u = max(delta if f else 0.0, u_in)
    return _State(float(E.max()), u)


def sup_from_intervals(los: list[Tensor], his: list[Tensor]) -> list[Tensor]:
    return [sup_abs(lo, hi) for lo, hi in zip(los, his)]
