"""Certified damage of bit flips in stored parameters, and exact injection of them.

Used by :mod:`hwrel.seu.analysis`. Certified damage of bit flips in stored parameters (theory sections 4, 5 and 7) [derived]:

* ``g[a][j]`` (:func:`hwrel.bounds.perturb.site_gains`) bounds how far an error ``d`` added to
  receiving neuron ``j`` of affine node ``a`` moves any output, for any input of the domain and any
  size of ``d`` (global Lipschitz slopes; the error map is positive and linear, so injections at
  several neurons add up: output error ``<= sum_j g[a][j] d_j``).
* Flipping bit ``b`` of weight ``W_ji`` changes it by ``|dw| <= delta_b`` (exact per stored code or
  float, rounded up; :mod:`hwrel.formats`) and receiver ``j`` by ``|dw| * |y_i|``; a conv weight
  acts at every output position of its channel, so its *amplification* is
  ``A = sum_positions g[a][j(pos)] * S_i(pos)`` (the weight gradient of ``<g, conv(S)>``) with
  ``S`` the interval bound on ``|y|``; for a dense weight ``A = g_j S_i``, for a bias ``A = sum g``.
  One flip therefore moves any output by at most ``A * delta_b`` (a sound bound; ``inf`` when the
  flip can give Inf/NaN).
* ``k`` flips: with ``(W + dW)(y + e) - W y = W e + dW (y + e)``, each flip injects at most
  ``|dw| (|y_i| + e_i)`` where ``e`` is the error the *other* flips cause at the layer's input, and
  the ``W e`` part is carried by the same positive map. ``e`` is bounded by
  :func:`~hwrel.bounds.perturb.perturbation_radii` with ``count = k - 1`` and per-word radii that
  cover any set of flips in one word (integers: the code range; floats: ``inf`` unless range
  restriction bounds it by ``R + |w|``). So with ``S + e`` in place of ``S``, the error of any ``k``
  flips is at most the sum of their ``k`` individual terms, hence at most ``TopSum_k`` over all
  sites. Sites are (word, bit) pairs for integer codes, whose value is linear in the bits (several
  flips in one word change it by at most the sum of their ``delta_b``), and whole words for floats
  (where two flips in one word can exceed the sum of their single effects).
* Accuracy budgets use the same bound per test input (boxes shrunk to points): the prediction on
  ``x`` provably survives when its logit margin exceeds twice the bound.

Covers weights and biases; activations and accumulators are not modelled. The bounds are about
the deployed model in exact arithmetic of its stored values (what an integer datapath computes;
:class:`FlipModel` measures it in float64); quantized activations add their rounding steps
(:func:`quant_slack`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Mapping, Sequence

import torch
from torch import Tensor

from hwrel.bounds.ibp import interval_bounds, sup_abs
from hwrel.bounds.interval import gains
from hwrel.bounds.perturb import WeightPerturbation, perturbation_radii, site_gains
from hwrel.formats import IntFormat, flip, range_restrict
from hwrel.network import Network
from hwrel.seu.mapping import StoredTensor

_UP = 1.0 + 2.0 ** -40  # absorbs the float64 rounding of products and differences of deltas
MAX_FLIPS = 4096


# ------------------------------------------------------------------------------- flip magnitudes

@dataclass(frozen=True, eq=False)
class FlipSites:
    """Flip magnitudes of one stored tensor (real units, sound upper bounds, float64).

    ``bit_delta[e, b]``: one flip of bit ``b`` of element ``e``; ``word_delta[e]``: any set of
    flips in that word; ``unit[e]`` (integer codes, no range restriction): ``scale``, so that
    ``bit_delta = 2^b * unit``; ``limit``: the range-restriction bound or None. ``free``: bit
    positions that can flip (``(bits,)`` bool; None: all); see :meth:`protect`.
    """

    tensor: StoredTensor
    bit_delta: Tensor
    word_delta: Tensor
    unit: Tensor | None
    limit: float | None
    free: Tensor | None = None

    def protect(self, bits: Sequence[int]) -> "FlipSites":
        """These sites with bit positions ``bits`` unable to flip (protected), still sound.

        Protected columns get ``bit_delta = 0``. The word radius (any set of flips in one word)
        shrinks for integer codes to ``scale * sum of 2^b over the free bits``: the code is linear
        in its bits and range restriction (a clamp) is 1-Lipschitz; floats keep theirs (two flips
        in one float word are not additive), except a word with no free bit, whose radius is 0.
        """
        free = torch.ones(self.tensor.fmt.bits, dtype=torch.bool) if self.free is None \
            else self.free.clone()
        for b in bits:
            free[int(b)] = False
        bit_delta = torch.where(free[None], self.bit_delta, torch.zeros((), dtype=torch.float64))
        word = self.word_delta
        if not bool(free.any()):
            word = torch.zeros_like(word)
        elif self.tensor.codes is not None:
            pw = float(sum(2.0 ** b for b in range(self.tensor.fmt.bits) if free[b]))
            s = self.tensor.scale.expand_as(self.tensor.codes).reshape(-1).to(torch.float64)
            word = torch.minimum(word, s * pw * _UP)
        return replace(self, bit_delta=bit_delta, word_delta=word, free=free)


def _read(values: Tensor, limit: float | None) -> Tensor:
    return values if limit is None else range_restrict(values, limit)


def stored_after_flips(t: StoredTensor, element: int, bits: Sequence[int],
                       limit: float | None = None) -> float:
    """Exact value the deployed model reads after flipping ``bits`` of ``element`` (one word)."""
    if t.codes is not None:
        code = t.codes.reshape(-1)[element]
        for b in bits:
            code = flip(t.fmt, code, b)
        s = t.scale.expand_as(t.codes).reshape(-1)[element]
        z = t.zero_point.expand_as(t.codes).reshape(-1)[element]
        v = s * (code - z).to(torch.float64)
    else:
        v = t.values.reshape(-1)[element]
        for b in bits:
            v = flip(t.fmt, v, b).to(torch.float64)
    return float(_read(v.reshape(1), limit)[0])


def flip_sites(t: StoredTensor, limit: float | None = None) -> FlipSites:
    """Per element and bit magnitudes of single flips and per-word bounds for several flips."""
    old = t.values.reshape(-1).to(torch.float64)
    bits = torch.arange(t.fmt.bits)
    if t.codes is not None:
        codes = t.codes.reshape(-1)
        s = t.scale.expand_as(t.codes).reshape(-1).to(torch.float64)
        z = t.zero_point.expand_as(t.codes).reshape(-1)
        new = s[:, None] * (flip(t.fmt, codes[:, None], bits) - z[:, None]).to(torch.float64)
        span = torch.maximum(t.fmt.qmax - codes, codes - t.fmt.qmin).to(torch.float64)
        word = span * s * _UP
        unit = s * _UP if limit is None else None
    else:
        new = flip(t.fmt, old[:, None].to(torch.float32), bits).to(torch.float64)
        word = torch.full_like(old, math.inf)
        unit = None
    raw = torch.where(torch.isfinite(new), (new - old[:, None]).abs(), math.inf)
    if limit is not None:
        raw = torch.minimum(raw, (_read(new, limit) - _read(old, limit)[:, None]).abs())
        word = torch.minimum(word, (limit + old.abs()) * _UP)
    return FlipSites(t, raw * _UP, word, unit, limit)


def _limits(stored: Sequence[StoredTensor], range_restriction: bool) -> list[float | None]:
    # R = max |stored value| per tensor: the clean model is unchanged by the restriction.
    if not range_restriction:
        return [None] * len(stored)
    return [max(float(t.values.abs().max()), 1e-30) for t in stored]


# ------------------------------------------------------------------------------- amplification

def _amplification(net: Network, t: StoredTensor, S: Tensor, g: Tensor) -> Tensor:
    """``(B, numel)``: per element, the output change per unit change of its value (sound)."""
    aff = net.nodes[t.node].affine
    B = S.shape[0]
    if aff.kind == "linear":
        # a Linear acts on the last dimension: each weight and bias is used at every leading
        # position (none for a flat input), so its amplification sums over them
        out_f = aff.weight.shape[0]
        gp = g.reshape(-1, out_f)  # (P, out)
        if t.part == "bias":
            return gp.sum(0).reshape(1, -1).expand(B, -1)
        sp = S.reshape(B, -1, aff.weight.shape[1])  # (B, P, in)
        return torch.einsum("pj,bpi->bji", gp, sp).reshape(B, -1)
    if t.part == "bias":
        return g.sum(dim=(1, 2)).reshape(1, -1).expand(B, -1)
    out = []
    for b in range(B):  # conv weight: every output position of its channel
        finite = torch.nan_to_num(S[b:b + 1], posinf=1e300)
        a = torch.nn.grad.conv2d_weight(finite, aff.weight.shape, g[None], aff.stride,
                                        aff.padding, aff.dilation, aff.groups)
        a = torch.where(S[b:b + 1].isinf().any(), torch.full_like(a, math.inf), a)
        out.append(a.reshape(1, -1))
    return torch.cat(out)


def _times(a: Tensor, d: Tensor) -> Tensor:
    """``a * d`` where an infinite ``d`` stays infinite even when ``a`` is 0 (Inf * 0 -> NaN)."""
    p = a * d
    return torch.where(torch.isinf(d) | torch.isnan(p), torch.full_like(p, math.inf), p)


def quant_slack(net: Network) -> dict[int, float]:
    """Per affine node ``a``: how far any output can move because quantized activations after
    ``a`` round (sound, for any input of the domain and any change at ``a``).

    A quantized activation is not Lipschitz: a change of its input, however small, can carry it
    across a rounding threshold, one step ``s`` up or down (``|Q(u) - Q(v)| <= K |u - v| + s``
    for ``u != v``). The gains only carry the ``K |u - v|`` part, so every quantized neuron
    downstream of a changed affine node may add one step, which moves the outputs by at most its
    gain times ``s``.
    """
    quant = [i for i, n in enumerate(net.nodes) if n.op == "act" and n.act.quant_step > 0]
    if not quant:
        return {i: 0.0 for i in net.synapse_layers}
    slopes = {i: n.act.lipschitz for i, n in enumerate(net.nodes) if n.op == "act"}
    g = gains(net, slopes, quant, 1)
    per_q = {q: (g[q][:, 0] * net.nodes[q].act.quant_step).flatten(1).sum(1) for q in quant}  # (n_out,)
    consumers = net.consumers()
    out = {}
    for a in net.synapse_layers:
        seen, todo = set(), [a]
        while todo:  # every node that depends on a
            for c in consumers[todo.pop()]:
                if c not in seen:
                    seen.add(c)
                    todo.append(c)
        hit = [per_q[q] for q in quant if q in seen]
        out[a] = float(torch.stack(hit).sum(0).max()) * _UP if hit else 0.0
    return out


@dataclass(eq=False)
class FlipBounds:
    """Sound bounds on the damage of bit flips in stored parameters (see the module docstring).

    ``slack``: per affine node, the extra output change from quantized activations crossing a
    rounding threshold (:func:`quant_slack`); every bound of a flip that changes a value
    includes it.
    """

    net: Network  # deployed, float64
    sites: list[FlipSites]
    gains: dict[int, Tensor]
    slack: dict[int, float] = field(default_factory=dict)

    def protect(self, columns: Mapping[int, Sequence[int]]) -> "FlipBounds":
        """The same bounds when the ``{tensor index: bit positions}`` columns cannot flip
        (protected by ECC or held in registers): sound for any flips among the other bits."""
        sites = [s.protect(columns.get(i, ())) if i in columns else s
                 for i, s in enumerate(self.sites)]
        return FlipBounds(self.net, sites, self.gains, self.slack)

    def inputs_sup(self, lo: Tensor, hi: Tensor, k: int) -> dict[int, Tensor] | None:
        """Per affine node: bound on ``|y| + e`` at its input for ``k - 1`` other flips."""
        los, his = interval_bounds(self.net, lo, hi, float32=False)  # exact arithmetic (module docstring)
        S = {i: sup_abs(los[self.net.nodes[i].inputs[0]], his[self.net.nodes[i].inputs[0]])
             for i in self.net.synapse_layers}
        if k <= 1:
            return S
        if any(bool(torch.isinf(s.word_delta).any()) for s in self.sites):
            return None  # a protected tensor has word_delta 0, so only flippable words count
        wr: dict[int, Tensor] = {}
        br: dict[int, Tensor] = {}
        for s in self.sites:
            shape = s.tensor.values.shape
            (wr if s.tensor.part == "weight" else br)[s.tensor.node] = s.word_delta.reshape(shape)
        p = WeightPerturbation(weight_radius=wr, bias_radius=br, count=k - 1)
        radii = perturbation_radii(self.net, p, lo, hi, "interval", (los, his), rounding=None)
        return {i: S[i] + radii[self.net.nodes[i].inputs[0]] for i in S}

    def bound(self, k: int, lo: Tensor, hi: Tensor) -> Tensor:
        """``(B,)`` sound bound on any output's change under any ``k`` flips, per box."""
        B = lo.shape[0]
        if k <= 0:
            return torch.zeros(B, dtype=torch.float64)
        S = self.inputs_sup(lo, hi, k)
        if S is None:
            return torch.full((B,), math.inf, dtype=torch.float64)
        cands = []
        slack = 0.0  # one rounding step per quantized neuron after the first changed layer, at most
        for s in self.sites:
            if s.free is not None and not bool(s.free.any()):
                continue  # fully protected: no flip can reach it
            if bool((s.bit_delta > 0).any()):
                slack = max(slack, self.slack.get(s.tensor.node, 0.0))
            a = _amplification(self.net, s.tensor, S[s.tensor.node], self.gains[s.tensor.node])
            n = a.shape[1]
            if k == 1:
                cands.append(_times(a, s.bit_delta.max(dim=1).values[None]).amax(1, keepdim=True))
            elif s.unit is not None and isinstance(s.tensor.fmt, IntFormat):
                top = torch.topk(_times(a, s.unit[None]), min(k, n), dim=1).values
                pw = 2.0 ** torch.arange(s.tensor.fmt.bits, dtype=torch.float64)
                if s.free is not None:
                    pw = torch.where(s.free, pw, torch.zeros((), dtype=torch.float64))
                c = (top[:, :, None] * pw).reshape(B, -1)
                cands.append(torch.topk(c, min(k, c.shape[1]), dim=1).values)
            else:
                c = _times(a, s.word_delta[None])
                cands.append(torch.topk(c, min(k, n), dim=1).values)
        if not cands:
            return torch.zeros(B, dtype=torch.float64)
        allc = torch.cat(cands, dim=1)
        return torch.topk(allc, min(k, allc.shape[1]), dim=1).values.sum(1) + slack

    def single(self, S: Mapping[int, Tensor], slack: float = 1.0) -> list[Tensor]:
        """Per tensor ``(numel, bits)``: certified damage of each single flip (``S``: B == 1),
        including ``slack`` times its quantized-activation slack (see :meth:`slack_terms`)."""
        out = []
        for s, extra in zip(self.sites, self.slack_terms()):
            a = _amplification(self.net, s.tensor, S[s.tensor.node], self.gains[s.tensor.node])
            out.append(_times(a[0][:, None], s.bit_delta) + slack * extra)
        return out

    def word(self, S: Mapping[int, Tensor], slack: float = 1.0) -> list[Tensor]:
        """Per tensor ``(numel,)``: certified damage of any flips within one word."""
        out = []
        for s in self.sites:
            a = _amplification(self.net, s.tensor, S[s.tensor.node], self.gains[s.tensor.node])
            extra = self.slack.get(s.tensor.node, 0.0) * (s.word_delta > 0)
            out.append(_times(a[0], s.word_delta) + slack * extra)
        return out

    def slack_terms(self) -> list[Tensor]:
        """Per tensor ``(numel, bits)``: the quantized-activation slack of each single flip (0
        where the flip cannot change the value, e.g. a protected bit)."""
        return [self.slack.get(s.tensor.node, 0.0) * (s.bit_delta > 0).to(torch.float64) for s in self.sites]


def flip_bounds(net64: Network, stored: Sequence[StoredTensor], range_restriction: bool
             ) -> FlipBounds:
    lims = _limits(stored, range_restriction)
    sites = [flip_sites(t, lim) for t, lim in zip(stored, lims)]
    return FlipBounds(net64, sites, site_gains(net64), quant_slack(net64))


# ------------------------------------------------------------------------------- exact injection

class FlipModel:
    """Exact forward of the deployed model with bit flips in its stored parameters.

    ``flips`` are ``(tensor_index, element, bit)`` triples (tensor index into the mapping's
    tensors, flat element index); several bits of one word are applied together. Range
    restriction (``limits``) is applied to every value read, as the deployed model would.
    Computes in float64; only layers from the first faulty one on are recomputed.
    """

    def __init__(self, net64: Network, stored: Sequence[StoredTensor],
                 limits: Sequence[float | None], x: Tensor) -> None:
        self.net, self.stored, self.limits = net64, list(stored), list(limits)
        self.x = x.to(torch.float64)
        with torch.no_grad():
            self.clean = net64.forward_all(self.x)

    @property
    def output(self) -> Tensor:
        return self.clean[-1]

    @torch.no_grad()
    def run(self, flips: Sequence[tuple[int, int, int]]) -> Tensor:
        words: dict[tuple[int, int], list[int]] = {}
        for ti, e, b in flips:
            words.setdefault((int(ti), int(e)), []).append(int(b))
        params: dict[int, dict[str, Tensor]] = {}
        for (ti, e), bits in words.items():
            t = self.stored[ti]
            p = params.setdefault(t.node, {})
            cur = p.get(t.part)
            if cur is None:
                cur = _read(t.values.to(torch.float64), self.limits[ti]).clone()
            cur.view(-1)[e] = stored_after_flips(t, e, bits, self.limits[ti])
            p[t.part] = cur
        if not params:
            return self.clean[-1]
        first = min(params)
        vals = list(self.clean)
        for i in range(first, len(self.net.nodes)):
            node = self.net.nodes[i]
            ins = [vals[j] for j in node.inputs]
            if i in params:
                vals[i] = node.affine(ins[0], params[i].get("weight"), params[i].get("bias"))
            else:
                vals[i] = node.apply(ins)
        return vals[-1]
