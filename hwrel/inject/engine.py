"""Exact fault-injection engine: faulty outputs of many fault configurations, fast.

Guarantee: for every configuration, :meth:`Injector.outputs` equals a plain reference (deep-copy
the model, write the faulty value into the weight or replace the activation, forward) up to float
rounding of the changed sums (tests: relative 1e-5 on float models; the stored words, old and new
values, are bit for bit). Weights are held in the storage format: float layers are rounded to the
injector's ``format`` (fp16/bf16/fp8: the model computes in float32 with rounded weights, the
clean outputs included); Brevitas layers keep their native integer codes with the scale and zero
point fixed (exact Brevitas semantics, ``value = (code - zero_point) * scale`` in float32).

Why it is fast:

* *prefix reuse*: the clean forward of ``inputs`` is computed once, every node cached; a faulty
  forward starts at the faulty node;
* *sparse deltas*: a single weight, bias, synapse or neuron fault changes one output neuron (dense)
  or one output channel (conv): that block alone is computed (``s_j + dw * y_i``, a shifted input
  slice for conv), carried through activations, pooling and flattening as a block, and turned into
  the next affine layer's output as ``clean + W[:, block] @ delta`` (a grouped convolution for
  conv layers); only then does the forward become dense;
* *batching faults*: configurations starting at the same node are stacked along a leading
  dimension (F configurations x B samples) and propagated together;
* *tail tables* (``run`` only): when the rest of the network after a flat node is the output,
  ``linear`` or ``linear -> ReLU -> linear``, a change ``d`` of one unit ``j`` moves the output by
  ``v_bj * d`` (per sample b) until a ReLU of the tail switches. Per (sample, unit) thresholds, built
  once from the clean run, bound the ``d`` for which that holds *and* the top-1 class provably stays
  the clean one (margin: a float32 rounding bound of the tail's sums); inside them
  ``max|faulty - clean| = |d| * max_k |v_bjk|`` with no forward, outside (and for NaN/Inf) the row
  takes the exact path. For ``linear -> quantizer`` tails the thresholds keep every pre-activation in
  its quantization bin (output exactly clean). Quantized activations of dense faulty values only
  requantize entries that left their clean bin (bins found by bisection on the quantizer itself).
"""
from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, replace
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hwrel.errors import HwrelError
from hwrel.formats import FloatFormat, Format, IntFormat, from_bits, parse_format, range_restrict, to_bits
from hwrel.inject.faults import Fault, FaultConfig, as_config
from hwrel.network import Network

_BUDGET = 1 << 23  # floats per stacked activation tensor (32 MiB) when choosing chunk sizes
_PIECE = 1 << 20  # floats per piece of rows forwarded past a tail: cache-sized pieces are faster


@dataclass
class _Sparse:
    """A node's value on R rows: clean except unit ``unit[r]`` (a channel of a (C,H,W) node, or a
    block of ``vals.shape[1]`` features of a flat node), whose values are ``vals[r]``."""

    unit: Tensor  # (R,) int64
    vals: Tensor  # (R, *unit_shape)


@dataclass
class _RowSet:
    """Rows of a stacked forward: configuration (within the chunk) and sample of each row."""

    cfg: Tensor  # (R,) int64
    smp: Tensor  # (R,) int64


@dataclass
class _Storage:
    wfmt: Format
    bfmt: FloatFormat
    codes: Tensor | None  # flat int64 codes (integer layers)
    scale: Tensor | None  # flat per weight element (float32)
    zero_point: Tensor | None


@dataclass
class _Tail:
    """Output response to a change ``d`` of one unit ``j`` of flat node ``q`` (all else clean), per
    (unit j, sample b): while ``lo <= d <= hi`` the output is ``clean + v_bj * d`` (no ReLU of the
    tail changes state) up to float rounding, the top-1 class stays the clean one with a margin
    above any float32 evaluation's rounding, and ``max |faulty - clean| = |d| * mx``."""

    hi: Tensor  # (J, B) float32, >= 0
    lo: Tensor  # (J, B) float32, <= 0
    mx: Tensor  # (J, B) float32: max_k |v_bjk|
    clean: Tensor  # (J, B) the node's clean value, transposed


@dataclass
class _Resolved:
    """Faults of one site at one node, resolved to tensors (one entry per fault)."""

    node: int
    site: str
    faults: list[Fault]
    a: Tensor  # weight/bias/neuron/synapse flat index (into weight, bias, node output)
    old: Tensor  # float32 stored old value (weight/bias), NaN otherwise
    new: Tensor  # float32 new value (weight/bias: stored word; neuron/synapse: transmitted value)
    b: Tensor | None = None  # synapse: receiver flat index in the output
    c: Tensor | None = None  # synapse: sender flat index in the input


def _fmt(f: Format | str) -> Format:
    return f if isinstance(f, (IntFormat, FloatFormat)) else parse_format(f)


class Injector:
    """Exact, batched fault injection on one model and one batch of inputs.

    Args:
        model_or_net: an ``nn.Module`` (extracted once, never modified) or a :class:`Network`.
        inputs: ``(B, *input_shape)`` batch, evaluated once clean and cached node by node.
        labels: optional ``(B,)`` class labels, for per-configuration ``accuracy``.
        format: storage format of float (non-Brevitas) layers' weights and of all biases
            (``fp32``, ``fp16``, ``bf16``, ``fp8_e4m3``, ``fp8_e5m2``); an integer format is accepted
            only when every affine layer is Brevitas-quantized with exactly that width/signedness.
        range_limit: ``R`` -> range restriction (NaN -> 0, clamp ``[-R, R]``) of every stored weight
            and bias, clean and faulty, as a deployed protection would apply it.
    """

    def __init__(self, model_or_net: nn.Module | Network, inputs: Tensor, labels: Tensor | None = None, *,
                 format: str | Format = "fp32", range_limit: float | None = None,
                 input_domain: tuple[float, float] = (0.0, 1.0), input_shape: Sequence[int] | None = None,
                 device: str | torch.device = "cpu") -> None:
        inputs = torch.as_tensor(inputs)
        if inputs.dim() < 2 or inputs.shape[0] == 0:
            raise HwrelError(f"inputs must be a non-empty batch (B, *input_shape), got shape {tuple(inputs.shape)}")
        if isinstance(model_or_net, Network):
            net = model_or_net
        else:
            net = Network.from_module(model_or_net, input_domain,
                                      tuple(input_shape) if input_shape is not None else tuple(inputs.shape[1:]))
        if tuple(inputs.shape[1:]) != tuple(net.input_shape):
            raise HwrelError(f"inputs have per-sample shape {tuple(inputs.shape[1:])}, the model expects {net.input_shape}")
        self.device = torch.device(device)
        self.format = _fmt(format)
        self.range_limit = None if range_limit is None else float(range_limit)
        if self.range_limit is not None and not (math.isfinite(self.range_limit) and self.range_limit > 0):
            raise HwrelError(f"range_limit must be a positive finite number, got {range_limit!r}")
        self.net, self.storage = self._store(net.to(torch.float32, self.device))
        self.nodes = self.net.nodes
        self.index = {n.name: i for i, n in enumerate(self.nodes)}
        self._hidden = {self.nodes[i].name: i for i in self.net.layers}
        self._affine = {self.nodes[i].name: i for i in self.net.synapse_layers}
        consumers = self.net.consumers()
        self._last_use = [max(c) if c else len(self.nodes) for c in consumers]
        with torch.no_grad():
            self.clean = self.net.forward_all(inputs.to(self.device, torch.float32))
        out = self.clean[-1]
        if out.dim() != 2:
            raise HwrelError(f"model output must be (B, n_out), got per-sample shape {tuple(out.shape[1:])}")
        self.batch = int(out.shape[0])
        self.clean_top1 = out.argmax(1)
        self.labels = None
        if labels is not None:
            lab = torch.as_tensor(labels).to(self.device).reshape(-1).long()
            if lab.numel() != self.batch:
                raise HwrelError(f"labels have {lab.numel()} entries for {self.batch} inputs")
            self.labels = lab
        self._pad_cache: dict[int, Tensor] = {}
        self._zero_cache: dict[int, Tensor] = {}
        self._t_cache: dict[int, Tensor] = {}
        self._qbins: dict[int, tuple[Tensor, Tensor] | None] = {}
        # tail nodes and their plans; each node's table is built on first use (a campaign that never
        # reaches a tail node, or one campaign chunk of a few faults, builds fewer of them)
        self._tail_plans = self._build_tails(consumers)
        self._tails: dict[int, _Tail] = {}
        # nodes from which a single-unit change stays a single unit (activations only) up to a tail
        self._to_tail = {n for q in self._tail_plans for n in range(q + 1)
                         if all(len(self.nodes[m].shape) == 1 and self.nodes[m].op in ("act", "affine")
                                and (m == n or self.nodes[m].op == "act") for m in range(n, q + 1))}

    # --- storage -----------------------------------------------------------------------------

    def _store(self, net: Network) -> tuple[Network, dict[int, _Storage]]:
        fl = self.format
        int_layers = [net.nodes[i] for i in net.synapse_layers if net.nodes[i].affine.codes is not None]
        if isinstance(fl, IntFormat):
            for i in net.synapse_layers:
                a, name = net.nodes[i].affine, net.nodes[i].name
                if a.codes is None:
                    raise HwrelError(f"layer {name}: format {fl.name} given but the layer holds float weights "
                                     "(no quantization); use a float format or quantize the model with Brevitas")
                got = IntFormat(int(a.bit_width), bool(a.signed)).name
                if got != fl.name:
                    raise HwrelError(f"layer {name}: format {fl.name} given but the layer stores {got} codes")
        bfmt = fl if isinstance(fl, FloatFormat) else parse_format("fp32")
        nodes, storage = list(net.nodes), {}
        for i in net.synapse_layers:
            a = net.nodes[i].affine
            rr = (lambda t: t) if self.range_limit is None else (lambda t: range_restrict(t, self.range_limit))
            bias = None if a.bias is None else rr(from_bits(bfmt, to_bits(bfmt, a.bias.cpu())).to(self.device))
            if a.codes is not None:
                wfmt: Format = IntFormat(int(a.bit_width), bool(a.signed))
                weight = rr(a.weight)
                st = _Storage(wfmt, bfmt, a.codes.reshape(-1).to(self.device),
                              a.scale.expand_as(a.weight).reshape(-1).float(),
                              a.zero_point.expand_as(a.weight).reshape(-1).float())
            else:
                wfmt = bfmt
                weight = rr(from_bits(wfmt, to_bits(wfmt, a.weight.cpu())).to(self.device))
                st = _Storage(wfmt, bfmt, None, None, None)
            nodes[i] = replace(net.nodes[i], affine=replace(a, weight=weight, bias=bias))
            storage[i] = st
        del int_layers
        return replace(net, nodes=tuple(nodes)), storage

    # --- tails: the last affine layer(s) as a per-sample linear map -------------------------------

    def _build_tails(self, consumers: list[list[int]]) -> dict[int, list[int]]:
        """The flat nodes ``q`` from which the rest of the network is a chain ending in the output:
        the output itself (depth 0), ``q -> linear`` (depth 1) or ``q -> linear -> ReLU -> linear``
        (depth 2), each with its tail's nodes (see :meth:`_tail`). A single-unit change there is
        read off per (sample, unit) thresholds instead of a forward; rows outside the thresholds
        take the exact path."""
        nodes, last = self.nodes, len(self.nodes) - 1
        out = self.clean[last]
        if not bool(torch.isfinite(out).all()):
            return {}

        def chain(a: int, b: int) -> bool:  # b consumes a alone, a feeds only b
            return b == a + 1 and consumers[a] == [b] and tuple(nodes[b].inputs) == (a,)

        def flat_lin(n: int) -> bool:
            nd = nodes[n]
            return nd.op == "affine" and nd.affine.kind == "linear" and len(nodes[nd.inputs[0]].shape) == 1

        plans: list[tuple[int, list[int]]] = [(last, [])]
        if flat_lin(last) and chain(last - 1, last):
            q = last - 1
            plans.append((q, [last]))
            a = nodes[q]
            if (a.op == "act" and a.act.kind == "relu" and flat_lin(q - 1) and chain(q - 1, q)
                    and chain(q - 2, q - 1) and bool(torch.isfinite(self.clean[q - 1]).all())):
                plans.append((q - 2, [q - 1, q, last]))
            elif (a.op == "act" and a.act.kind == "quant" and flat_lin(q - 1) and chain(q - 1, q)
                    and chain(q - 2, q - 1) and self._quant_bins(q) is not None):
                plans.append((q - 2, [q - 1, q]))
        return {q: tail for q, tail in plans if nodes[q].op != "input" and len(nodes[q].shape) == 1}

    def _tail(self, q: int) -> _Tail:
        """The table of tail node ``q``, built on first use from the clean run (a pure function of
        it: built now or at construction, the same table)."""
        if q not in self._tails:
            tail = self._tail_plans[q]
            self._tails[q] = self._quant_tail_table(q, tail[0]) if len(tail) == 2 else self._tail_table(q, tail)
        return self._tails[q]

    def _quant_tail_table(self, q: int, m: int) -> _Tail:
        """``q -> linear m -> quantizer``: thresholds on a change ``d`` of unit j within which every
        ``fl(z_m + W_mj * d)`` stays in its quantization bin (bins from :meth:`_quant_bins`, margin
        for the float rounding of the sum): the quantized values, hence the output, stay clean."""
        u = 2.0 ** -24
        lo_b, hi_b = (t.double() for t in self._quant_bins(m + 1))
        z = self.clean[m].double()  # (B, M)
        W = self.nodes[m].affine.weight.double()  # (M, J)
        B, J = z.shape[0], W.shape[1]
        up = (hi_b - z - 4 * u * z.abs()).clamp_min(0)  # room above, (B, M)
        dn = (z - lo_b - 4 * u * z.abs()).clamp_min(0)  # room below
        hi = torch.empty(B, J, dtype=torch.float64, device=self.device)
        lo = torch.empty_like(hi)
        step = max(1, (1 << 20) // (J * W.shape[0]))
        aw = W.abs().t()[None] * (1 + 8 * u)  # (1, J, M)
        pos = (W.t() > 0)[None]
        for b0 in range(0, B, step):
            sl = slice(b0, min(B, b0 + step))
            upb, dnb = up[sl][:, None, :], dn[sl][:, None, :]  # (nb, 1, M)
            room_p = torch.where(pos, upb, dnb) / aw  # d > 0 moves z_m up where W > 0
            room_n = torch.where(pos, dnb, upb) / aw
            room_p = torch.where(aw > 0, room_p, math.inf).nan_to_num(math.inf, math.inf)
            room_n = torch.where(aw > 0, room_n, math.inf).nan_to_num(math.inf, math.inf)
            cap = 1e20 / (1 + aw.amax(2))
            hi[sl] = torch.minimum(room_p.amin(2), cap)
            lo[sl] = -torch.minimum(room_n.amin(2), cap)
        shrink = 1 - 1e-6
        return _Tail((hi * shrink).float().t().contiguous(), (lo * shrink).float().t().contiguous(),
                     torch.zeros(J, B, device=self.device), self.clean[q].t().contiguous())

    def _tail_table(self, q: int, tail: list[int]) -> _Tail:
        u = 2.0 ** -24
        last = len(self.nodes) - 1
        z = self.clean[last].double()  # (B, K)
        B, K = z.shape
        p = self.clean_top1
        J = self.nodes[q].size
        if not tail:
            W, fan = torch.eye(K, dtype=torch.float64, device=self.device), 1
            absum = z.abs()
        else:
            aff = self.nodes[last].affine
            W = aff.weight.double()  # (K, H)
            h = self.clean[last - 1].double()
            absum = h.abs() @ W.abs().t() + (0 if aff.bias is None else aff.bias.double().abs())
            fan = W.shape[1] + 4
        if len(tail) == 3:
            W2 = self.nodes[tail[0]].affine.weight.double()  # (M, J)
            z2 = self.clean[tail[0]].double()  # (B, M)
            C = W.abs() @ W2.abs()  # (K, J)
            fan += W2.shape[1] + 4
            colmax = W2.abs().amax(0)  # (J,)
            w_abs, w_pos = W2.t().abs()[None], (W2.t() > 0)[None]  # (1, J, M)
        else:
            C = W.abs()
            colmax = torch.zeros(J, dtype=torch.float64, device=self.device)
        eps = 4.0 * fan * u  # >= twice the float32 rounding bound of any evaluation order of the tail
        hpos, hneg, mx = (torch.empty(B, J, dtype=torch.float64, device=self.device) for _ in range(3))
        step = max(1, (1 << 20) // (J * max(K, W2.shape[0] if len(tail) == 3 else 1)))
        for b0 in range(0, B, step):
            sl = slice(b0, min(B, b0 + step))
            zb, pb = z[sl], p[sl]
            nb = zb.shape[0]
            if len(tail) == 3:
                act = (z2[sl] > 0).double()  # (nb, M)
                V = torch.einsum("km,bm,mj->bjk", W, act, W2)  # (nb, J, K)
                # ReLU crossings: z2_m + W2_mj * d changes sign at d = -z2_m / W2_mj, for d > 0 where
                # W2_mj > 0 and z2_m <= 0 or W2_mj < 0 and z2_m > 0, for d < 0 where the signs are
                # the other way. Where W2_mj is 0 (or a value is NaN) t is inf, so d > 0 may take
                # (W2_mj > 0) != (z2_m > 0) and d < 0 its complement: the same minima, fewer passes.
                zz = z2[sl][:, None, :]  # (nb, 1, M)
                t = (zz.abs() / w_abs).nan_to_num_(math.inf, math.inf, math.inf)  # (nb, J, M)
                up = w_pos != (zz > 0)
                cross_p = torch.where(up, t, math.inf).amin(2) * (1 - 1e-4)
                cross_n = torch.where(up, math.inf, t).amin(2) * (1 - 1e-4)
            else:
                V = W.t()[None].expand(nb, J, K)
                cross_p = cross_n = torch.full((nb, J), math.inf, dtype=torch.float64, device=self.device)
            zp = zb.gather(1, pb[:, None])  # (nb, 1)
            alpha = eps * (zp.abs() + zb.abs() + absum[sl].gather(1, pb[:, None]) + absum[sl])  # (nb, K)
            G = (zp - zb - alpha)[:, None, :]  # (nb, 1, K)
            a = V.gather(2, pb[:, None, None].expand(nb, J, 1)) - V  # (nb, J, K): slope of the gap
            Ct = C.t()  # (J, K)
            beta = eps * (Ct[:, pb].t()[:, :, None] + Ct[None])  # (nb, J, K)
            inf = torch.full_like(a, math.inf)

            def bound(slope: Tensor) -> Tensor:
                h = torch.where(slope >= 0, inf, G / (-slope).clamp_min(1e-300))
                h = torch.where(G > 0, h, torch.zeros_like(h))
                h.scatter_(2, pb[:, None, None].expand(nb, J, 1), math.inf)  # k = p: no constraint
                return h.amin(2)

            m = V.abs().amax(2)  # (nb, J)
            cap = 1e20 / (1 + m + colmax[None])
            hpos[sl] = torch.minimum(torch.minimum(bound(a - beta), cross_p), cap)
            hneg[sl] = torch.minimum(torch.minimum(bound(-a - beta), cross_n), cap)
            mx[sl] = m
        shrink = 1 - 1e-6  # float64 -> float32 rounds by < 6e-8: the float32 thresholds stay inside
        return _Tail((hpos * shrink).float().t().contiguous(), (-hneg * shrink).float().t().contiguous(),
                     mx.float().t().contiguous(), self.clean[q].t().contiguous())

    def _tail_run(self, q: int, s: _Sparse, rows: _RowSet) -> "tuple[_RowSet, Tensor, tuple[Tensor, Tensor]]":
        """Rows of a width-1 change at tail node ``q``: safe rows give ``(cfg, max|delta|)`` directly,
        the others (beyond a threshold, NaN/Inf) are forwarded exactly, in pieces."""
        T = self._tail(q)
        flat = s.unit * self.batch + rows.smp
        d = s.vals[:, 0] - T.clean.reshape(-1).index_select(0, flat)
        safe = (d <= T.hi.reshape(-1).index_select(0, flat)) & (d >= T.lo.reshape(-1).index_select(0, flat))
        contrib = torch.where(safe, d.abs() * T.mx.reshape(-1).index_select(0, flat), 0.0).double()
        fast = (rows.cfg, contrib)
        return self._tail_exact(q, s, rows, (~safe).nonzero().squeeze(1), fast)

    def _grid_tail(self, start: int, unit: Tensor, v: Tensor) -> "tuple[_RowSet, Tensor, tuple[Tensor, Tensor]]":
        """:meth:`_tail_run` for configuration ``f`` changing unit ``unit[f]`` of node ``start`` to
        ``v[f]`` (all samples, ``(F, B)``): activations up to the tail, then the tables."""
        q = min(t for t in self._tail_plans if t >= start)
        v = v.contiguous()
        for n in range(start + 1, q + 1):
            v = self.nodes[n].act(v)
        T = self._tail(q)
        d = v - T.clean.index_select(0, unit)
        safe = (d <= T.hi.index_select(0, unit)) & (d >= T.lo.index_select(0, unit))
        fm = torch.where(safe, d.abs() * T.mx.index_select(0, unit), 0.0).amax(1).double()
        Fn, B = v.shape
        bad = (~safe).view(-1).nonzero().squeeze(1)
        cfg, smp = bad // B, bad % B
        return self._tail_exact(q, _Sparse(unit[cfg], v.reshape(-1)[bad][:, None]), _RowSet(cfg, smp),
                                torch.arange(bad.numel(), device=self.device),
                                (torch.arange(Fn, device=self.device), fm))

    def _tail_exact(self, q: int, s: _Sparse, rows: _RowSet, bad: Tensor, fast: tuple[Tensor, Tensor]
                    ) -> "tuple[_RowSet, Tensor, tuple[Tensor, Tensor]]":
        if bad.numel() == 0:
            empty = torch.zeros(0, dtype=torch.int64, device=self.device)
            return _RowSet(empty, empty), self.clean[-1][:0], fast
        size = max(self.nodes[n].size for n in range(q, len(self.nodes)))
        piece = max(1, _PIECE // size)
        got_rows, got_out = [], []
        for i in range(0, bad.numel(), piece):
            idx = bad[i: i + piece]
            r, o, _ = self._propagate(q, _Sparse(s.unit[idx], s.vals[idx]), _RowSet(rows.cfg[idx], rows.smp[idx]))
            got_rows.append(r)
            got_out.append(o)
        if len(got_rows) == 1:
            return got_rows[0], got_out[0], fast
        return (_RowSet(torch.cat([r.cfg for r in got_rows]), torch.cat([r.smp for r in got_rows])),
                torch.cat(got_out), fast)

    # --- resolution --------------------------------------------------------------------------

    def _node_of(self, f: Fault) -> int:
        table = self._hidden if f.site == "neuron" else self._affine
        if f.layer not in table:
            what = "hidden (activation) layers" if f.site == "neuron" else "affine layers"
            raise HwrelError(f"{f.site} fault: unknown layer {f.layer!r}; valid {what}: {', '.join(table)}")
        return table[f.layer]

    def _resolve(self, node: int, site: str, faults: list[Fault]) -> _Resolved:
        name = self.nodes[node].name
        dev = self.device
        idx = torch.tensor([f.index for f in faults], dtype=torch.int64)
        nan = torch.full((len(faults),), math.nan)
        if site == "neuron":
            size = self.nodes[node].size
            bad = idx >= size
            if bool(bad.any()):
                raise HwrelError(f"neuron fault at layer {name}: index {int(idx[bad][0])} outside its {size} neurons")
            for f in faults:
                if f.kind == "bitflip":
                    fmt = _fmt(f.format or "fp32")
                    if not isinstance(fmt, FloatFormat):
                        raise HwrelError(f"neuron fault at layer {name} index {f.index}: bit flips of activations "
                                         f"need a float format, got {fmt.name}")
                    if f.bit >= fmt.bits:
                        raise HwrelError(f"neuron fault at layer {name} index {f.index}: bit {f.bit} beyond "
                                         f"{fmt.name} (bits 0..{fmt.bits - 1})")
            new = torch.tensor([0.0 if f.kind == "crash" else f.value if f.kind in ("stuck", "byzantine")
                                else math.nan for f in faults], dtype=torch.float32)
            return _Resolved(node, site, faults, idx.to(dev), nan.to(dev), new.to(dev))
        aff = self.nodes[node].affine
        st = self.storage[node]
        if site == "synapse":
            return self._resolve_synapse(node, faults, idx)
        if site == "bias" and aff.bias is None:
            raise HwrelError(f"bias fault at layer {name}: the layer has no bias")
        tensor = aff.weight if site == "weight" else aff.bias
        fmt = st.wfmt if site == "weight" else st.bfmt
        n = tensor.numel()
        bad = idx >= n
        if bool(bad.any()):
            raise HwrelError(f"{site} fault at layer {name}: index {int(idx[bad][0])} outside its {n} {site}s "
                             f"(shape {tuple(tensor.shape)})")
        for f in {f.format for f in faults if f.format is not None}:
            if _fmt(f).name != fmt.name:
                raise HwrelError(f"{site} fault at layer {name}: format {_fmt(f).name} does not match the "
                                 f"layer's {site} storage {fmt.name}")
        mask = torch.tensor([sum(1 << b for b in f.bits) for f in faults], dtype=torch.int64)
        top = torch.tensor([f.bits[-1] for f in faults], dtype=torch.int64)
        bad = top >= fmt.bits
        if bool(bad.any()):
            k = int(bad.nonzero()[0])
            raise HwrelError(f"{site} fault at layer {name} index {faults[k].index}: bit {int(top[k])} beyond "
                             f"{fmt.name} (bits 0..{fmt.bits - 1})")
        level = torch.tensor([0 if f.kind == "bitflip" else 1 if f.kind == "stuck1" else 2 for f in faults])
        return self._resolve_words(node, site, faults, idx, mask, level)

    def _resolve_words(self, node: int, site: str, faults: list[Fault] | None, idx: Tensor, mask: Tensor,
                       level: Tensor) -> _Resolved:
        """Weight or bias words ``idx`` of node ``node`` with the bits ``mask`` flipped (level 0),
        set (1) or cleared (2); indices and bits already checked."""
        aff, st, dev = self.nodes[node].affine, self.storage[node], self.device
        tensor = aff.weight if site == "weight" else aff.bias
        fmt = st.wfmt if site == "weight" else st.bfmt
        flat_old = tensor.reshape(-1)[idx.to(dev)].cpu()
        stored = st.codes[idx.to(dev)].cpu() if (site == "weight" and st.codes is not None) else flat_old
        raw = to_bits(fmt, stored)
        raw = torch.where(level == 0, raw ^ mask, torch.where(level == 1, raw | mask, raw & ~mask))
        newc = from_bits(fmt, raw)
        if site == "weight" and st.codes is not None:
            i = idx.to(dev)
            new = (newc.to(dev).float() - st.zero_point[i]) * st.scale[i]
        else:
            new = newc.to(dev)
        if self.range_limit is not None:
            new = range_restrict(new, self.range_limit)
        return _Resolved(node, site, faults, idx.to(dev), flat_old.to(dev), new.float())

    def _resolve_synapse(self, node: int, faults: list[Fault], idx: Tensor) -> _Resolved:
        nd = self.nodes[node]
        aff, name = nd.affine, nd.name
        w = aff.weight
        n = w.numel()
        bad = idx >= n
        if bool(bad.any()):
            raise HwrelError(f"synapse fault at layer {name}: index {int(idx[bad][0])} outside its {n} weights")
        in_shape = self.nodes[nd.inputs[0]].shape
        recv, send = [], []
        for f in faults:
            if aff.kind == "linear" and len(in_shape) > 1:
                # a Linear over rows: weight (j, i) connects (p, i) to (p, j) at every position p
                j, i = divmod(f.index, w.shape[1])
                n_in = int(np.prod(in_shape))
                if f.source is None:
                    raise HwrelError(f"synapse fault at layer {name} index {f.index}: a Linear over rows of "
                                     f"a {tuple(in_shape)} input needs source= (flat index of the sender)")
                if not 0 <= f.source < n_in or f.source % w.shape[1] != i:
                    raise HwrelError(f"synapse fault at layer {name} index {f.index}: source {f.source} is not "
                                     f"a sender i = {i} of weight ({j}, {i}) in the {tuple(in_shape)} input")
                recv.append(int(f.source // w.shape[1]) * w.shape[0] + j), send.append(int(f.source))
                continue
            if aff.kind == "linear":
                j, i = divmod(f.index, w.shape[1])
                if f.source is not None and f.source != i:
                    raise HwrelError(f"synapse fault at layer {name} index {f.index}: source {f.source} is not "
                                     f"the sender {i} of weight ({j}, {i})")
                recv.append(j), send.append(i)
                continue
            co, ci, a, b = np.unravel_index(f.index, tuple(w.shape))
            if f.source is None:
                raise HwrelError(f"synapse fault at layer {name} index {f.index}: a convolution synapse needs "
                                 "source= (flat index of the sending input position)")
            cin_n, hin, win = in_shape
            if f.source >= cin_n * hin * win:
                raise HwrelError(f"synapse fault at layer {name}: source {f.source} outside the layer's "
                                 f"{cin_n * hin * win} inputs")
            c, h, x = np.unravel_index(f.source, (cin_n, hin, win))
            cout_g = w.shape[0] // aff.groups
            cin = (co // cout_g) * w.shape[1] + ci
            ho, wo = h + aff.padding[0] - a * aff.dilation[0], x + aff.padding[1] - b * aff.dilation[1]
            _, hout, wout = nd.shape
            ok = (c == cin and ho % aff.stride[0] == 0 and wo % aff.stride[1] == 0
                  and 0 <= ho // aff.stride[0] < hout and 0 <= wo // aff.stride[1] < wout)
            if not ok:
                raise HwrelError(f"synapse fault at layer {name} index {f.index}: weight ({co}, {ci}, {a}, {b}) "
                                 f"does not connect source {f.source} (input ({c}, {h}, {x})) to any output")
            recv.append(int(np.ravel_multi_index((co, ho // aff.stride[0], wo // aff.stride[1]), nd.shape)))
            send.append(int(f.source))
        new = torch.tensor([0.0 if f.kind == "crash" else f.value for f in faults], dtype=torch.float32)
        dev = self.device
        old = w.reshape(-1)[idx.to(dev)]
        return _Resolved(node, "synapse", faults, idx.to(dev), old, new.to(dev),
                         torch.tensor(recv, device=dev), torch.tensor(send, device=dev))

    # --- entry (single faults, sparse) -------------------------------------------------------

    def _clean_t(self, node: int) -> Tensor:
        """Clean value of a flat node, transposed ``(size, B)`` and contiguous (cached)."""
        if node not in self._t_cache:
            self._t_cache[node] = self.clean[node].reshape(self.batch, -1).t().contiguous()
        return self._t_cache[node]

    def _xpad(self, node: int) -> Tensor:
        if node not in self._pad_cache:
            aff = self.nodes[node].affine
            x = self.clean[self.nodes[node].inputs[0]]
            self._pad_cache[node] = F.pad(x, (aff.padding[1], aff.padding[1], aff.padding[0], aff.padding[0]))
        return self._pad_cache[node]

    def _entry(self, r: _Resolved, sel: Tensor) -> _Sparse:
        """State of node ``r.node`` for the faults ``sel`` (indices into r) applied one per config."""
        nd = self.nodes[r.node]
        clean = self.clean[r.node]
        B = self.batch
        a = r.a[sel]
        Fn = int(a.numel())
        ar = torch.arange(Fn, device=self.device)
        if r.site == "neuron":
            flat = clean.reshape(B, -1)
            old = flat[:, a].t()  # (F, B)
            new = r.new[sel][:, None].expand(Fn, B).clone()
            for k in sel.tolist():
                f = r.faults[k]
                if f.kind == "bitflip":
                    pos = int((sel == k).nonzero()[0])
                    from hwrel.formats import flip
                    new[pos] = flip(_fmt(f.format or "fp32"), old[pos].cpu(), f.bit).to(self.device)
            if len(nd.shape) == 3:
                hw = nd.shape[1] * nd.shape[2]
                unit, p = a // hw, a % hw
                vals = clean.reshape(B, nd.shape[0], hw)[:, unit].transpose(0, 1).clone()
                vals[ar, :, p] = new
                return _Sparse(unit, vals.reshape(Fn, B, *nd.shape[1:]))
            return _Sparse(a, new[:, :, None])
        aff = nd.affine
        x = self.clean[nd.inputs[0]]
        if aff.kind == "linear" and x.dim() > 2:
            return self._entry_rows(r, sel)
        if aff.kind == "linear":
            xt = self._clean_t(nd.inputs[0])  # (n_in, B): a fault's samples are one contiguous row
            if r.site == "synapse":
                j, i = r.b[sel], r.c[sel]
                d = r.old[sel][:, None] * (r.new[sel][:, None] - xt.index_select(0, i))
            elif r.site == "bias":
                j = a
                d = (r.new[sel] - r.old[sel])[:, None].expand(Fn, B)
            else:
                j, i = a // aff.weight.shape[1], a % aff.weight.shape[1]
                d = (r.new[sel] - r.old[sel])[:, None] * xt.index_select(0, i)
            return _Sparse(j, (self._clean_t(r.node).index_select(0, j) + d)[:, :, None])
        cout, cin_g, kh, kw = aff.weight.shape
        if r.site == "bias":
            co = a
            vals = clean[:, co].transpose(0, 1) + (r.new[sel] - r.old[sel])[:, None, None, None]
            return _Sparse(co, vals)
        if r.site == "synapse":
            recv, send = r.b[sel], r.c[sel]
            hw = nd.shape[1] * nd.shape[2]
            co = recv // hw
            vals = clean[:, co].transpose(0, 1).clone()
            vv = vals.reshape(Fn, B, hw)
            xs = x.reshape(B, -1)[:, send].t()
            vv[ar, :, recv % hw] += r.old[sel][:, None] * (r.new[sel][:, None] - xs)
            return _Sparse(co, vals)
        co, rest = a // (cin_g * kh * kw), a % (cin_g * kh * kw)
        ci, rest = rest // (kh * kw), rest % (kh * kw)
        ka, kb = rest // kw, rest % kw
        cin = (co // (cout // aff.groups)) * cin_g + ci
        _, ho, wo = nd.shape
        hh = ka[:, None] * aff.dilation[0] + aff.stride[0] * torch.arange(ho, device=self.device)
        ww = kb[:, None] * aff.dilation[1] + aff.stride[1] * torch.arange(wo, device=self.device)
        sl = self._xpad(r.node)[:, cin[:, None, None], hh[:, :, None], ww[:, None, :]]  # (B, F, ho, wo)
        vals = clean[:, co] + (r.new[sel] - r.old[sel])[None, :, None, None] * sl
        return _Sparse(co, vals.transpose(0, 1))

    def _entry_rows(self, r: _Resolved, sel: Tensor) -> _Sparse:
        """Entry state of a Linear over rows: a weight or bias acts at every leading position, so
        the whole output of each faulty configuration is the state (one unit)."""
        nd = self.nodes[r.node]
        B, Fn = self.batch, int(sel.numel())
        out_f, in_f = nd.affine.weight.shape
        ar = torch.arange(Fn, device=self.device)
        xr = self.clean[nd.inputs[0]].reshape(B, -1, in_f)  # (B, P, in)
        vals = self.clean[r.node].reshape(B, -1, out_f).unsqueeze(0).repeat(Fn, 1, 1, 1)  # (F, B, P, out)
        a = r.a[sel]
        if r.site == "synapse":  # one connection: receiver (p, j) from sender (p, i)
            recv, send = r.b[sel], r.c[sel]
            p, j = recv // out_f, recv % out_f
            sent = xr.reshape(B, -1)[:, send].t()  # (F, B)
            vals[ar, :, p, j] += r.old[sel][:, None] * (r.new[sel][:, None] - sent)
        elif r.site == "bias":
            vals[ar, :, :, a] += (r.new[sel] - r.old[sel])[:, None, None]
        else:
            j, i = a // in_f, a % in_f
            vals[ar, :, :, j] += (r.new[sel] - r.old[sel])[:, None, None] * xr[:, :, i].permute(2, 0, 1)
        return _Sparse(torch.zeros(Fn, dtype=torch.long, device=self.device), vals.reshape(Fn, B, *nd.shape))

    # --- propagation (rows = (configuration, sample) pairs still differing from the clean run) ---

    def _materialize(self, node: int, s: "_Sparse | Tensor | None", rows: _RowSet) -> Tensor:
        if s is None:
            return self.clean[node].index_select(0, rows.smp)
        if isinstance(s, Tensor):
            return s
        R = rows.smp.numel()
        out = self.clean[node].index_select(0, rows.smp)
        nunits = out[0].numel() // max(1, s.vals[0].numel()) if R else 1
        out.view(R, nunits, -1)[torch.arange(R, device=self.device), s.unit] = s.vals.reshape(R, -1)
        return out

    def _sparse_step(self, n: int, s: _Sparse, rows: _RowSet) -> "_Sparse | Tensor | None":
        nd = self.nodes[n]
        src = self.nodes[nd.inputs[0]]
        R = s.vals.shape[0]
        if nd.op == "act":
            return _Sparse(s.unit, nd.act(s.vals))
        if nd.op == "pool" and len(src.shape) == 3 and s.vals.dim() == 3:
            return _Sparse(s.unit, nd.pool(s.vals.unsqueeze(1)).squeeze(1))
        if nd.op == "reshape" and len(nd.shape) == 1 and s.vals.dim() in (2, 3):
            return _Sparse(s.unit, s.vals.reshape(R, -1))
        if nd.op != "affine":
            return None
        aff = nd.affine
        cin = self.clean[nd.inputs[0]]
        base = self.clean[n].index_select(0, rows.smp)
        if aff.kind == "linear" and s.vals.dim() == 2 and len(src.shape) == 1:  # flat input only
            w_ = s.vals.shape[1]
            blk = cin.reshape(cin.shape[0], -1, w_)[rows.smp, s.unit]  # (R, w)
            wt = aff.weight.t().reshape(-1, w_, aff.weight.shape[0])
            if w_ == 1:
                return torch.addcmul(base, s.vals - blk, wt[:, 0].index_select(0, s.unit))
            return torch.baddbmm(base.unsqueeze(1), (s.vals - blk).unsqueeze(1), wt[s.unit]).squeeze(1)
        if aff.kind == "conv2d" and aff.groups == 1 and s.vals.dim() == 3:
            delta = (s.vals - cin[rows.smp, s.unit]).unsqueeze(0)  # (1, R, H, W)
            wk = aff.weight[:, s.unit].transpose(0, 1).reshape(-1, 1, *aff.weight.shape[2:])
            y = F.conv2d(delta, wk, None, aff.stride, aff.padding, aff.dilation, R)
            return y.reshape(R, *base.shape[1:]) + base
        return None

    def _eval(self, n: int, states: dict[int, Any], rows: _RowSet) -> "_Sparse | Tensor":
        nd = self.nodes[n]
        first = states.get(nd.inputs[0])
        if isinstance(first, _Sparse) and len(nd.inputs) == 1:
            r = self._sparse_step(n, first, rows)
            if r is not None:
                return r
        if (nd.op == "act" and nd.act.kind == "quant" and isinstance(first, Tensor)
                and self._quant_bins(n) is not None):
            return self._quant_dense(n, first, rows)
        xs = [self._materialize(j, states.get(j), rows) for j in nd.inputs]
        if nd.op == "add":
            out = xs[0]
            for x in xs[1:]:
                out = out + x
            return out
        return nd.apply(xs)

    def _quant_bins(self, n: int) -> "tuple[Tensor, Tensor] | None":
        """Per clean element of quantized activation node ``n``, the float32 interval ``[lo, hi]`` of
        inputs that the quantizer maps to the clean output (it is monotone: an interval), found by
        bisection over the float32 values themselves; ``None`` if the quantizer is not elementwise."""
        if n in self._qbins:
            return self._qbins[n]
        act, z0 = self.nodes[n].act, self.clean[self.nodes[n].inputs[0]]
        y0 = self.clean[n]
        res = None
        if (bool(torch.isfinite(z0).all()) and torch.equal(act(z0.reshape(-1)), y0.reshape(-1))
                and torch.equal(act(z0), y0)):
            def key(z: Tensor) -> Tensor:  # float32 -> int64 key, monotone in the value (-0 = +0)
                i = z.view(torch.int32).long()
                return torch.where(i >= 0, i, -(i & 0x7FFFFFFF))

            def val(k: Tensor) -> Tensor:  # inverse of key
                return torch.where(k >= 0, k, -k - (1 << 31)).to(torch.int32).view(torch.float32)

            k0 = key(z0)
            top = key(torch.tensor(torch.finfo(torch.float32).max))
            ends = []
            for sgn in (1, -1):
                good, bad = k0.clone(), torch.full_like(k0, sgn * (int(top) + 1))
                far = val(bad - sgn)
                whole = act(far) == y0
                good = torch.where(whole, bad - sgn, good)
                for _ in range(34):
                    if bool(((bad - good).abs() <= 1).all()):
                        break
                    mid = good + (bad - good) // 2
                    ok = act(val(mid)) == y0
                    good, bad = torch.where(ok, mid, good), torch.where(ok, bad, mid)
                ends.append(val(good))
            res = (ends[1], ends[0])
        self._qbins[n] = res
        return res

    def _quant_dense(self, n: int, z: Tensor, rows: _RowSet) -> Tensor:
        """Quantized activation of a dense faulty input ``z``: entries inside their clean bin keep the
        clean output (exact: the bins are the quantizer's own), only the others are quantized."""
        lo, hi = self._qbins[n]
        out = self.clean[n].index_select(0, rows.smp)
        z = z.contiguous()
        inside = torch.ge(z, lo.index_select(0, rows.smp))
        inside &= torch.le(z, hi.index_select(0, rows.smp))  # NaN: outside
        idx = inside.logical_not_().view(-1).nonzero().squeeze(1)  # flat indices: cheaper than 2-D
        if idx.numel():
            out.view(-1).index_copy_(0, idx, self.nodes[n].act(z.view(-1).index_select(0, idx)))
        return out

    def _changed(self, n: int, v: "_Sparse | Tensor", rows: _RowSet) -> Tensor:
        """Rows whose value at node ``n`` differs from the clean one (NaN counts as different)."""
        R = rows.smp.numel()
        if isinstance(v, _Sparse):
            nunits = self.clean[n][0].numel() // max(1, v.vals[0].numel())
            ref = self.clean[n].reshape(-1, nunits, v.vals[0].numel())[rows.smp, v.unit]
            return (v.vals.reshape(R, -1) != ref).any(1)
        return (v.reshape(R, -1) != self.clean[n].index_select(0, rows.smp).reshape(R, -1)).any(1)

    def _propagate(self, start: int, state: "_Sparse | Tensor | None", rows: _RowSet,
                   corrections: dict[int, Callable[[Tensor, Callable[[int], Tensor]], None]] | None = None,
                   tail: bool = False) -> "tuple[_RowSet, Tensor, tuple[Tensor, Tensor] | None]":
        """Faulty output rows ``(R, n_out)`` for ``rows``; rows left out equal the clean output.

        After the last correction, whenever a single faulty value is live, rows equal to the clean
        run are dropped (their output is the clean output: exact, not an approximation). With
        ``tail``, a single-unit change reaching a tail node (see :class:`_Tail`) returns, besides
        the rows forwarded exactly, ``(cfg, max|delta|)`` of the rows read off the tables (whose
        top-1 class is the clean one and whose outputs are finite)."""
        corrections = corrections or {}
        fixed_until = max(corrections, default=-1)
        states: dict[int, Any] = {} if state is None else {start: state}
        first = start if state is None else start + 1
        if state is not None and start > fixed_until:
            if tail and self._at_tail(start, states) and rows.smp.numel():
                return self._tail_run(start, states[start], rows)
            if not (tail and start in self._to_tail):
                states, rows = self._prune(start, states, rows)
        for n in range(first, len(self.nodes)):
            if rows.smp.numel() == 0:
                break
            nd = self.nodes[n]
            live = any(j in states for j in nd.inputs)
            fix = corrections.get(n)
            if not live and fix is None:
                continue
            v = self._eval(n, states, rows) if live else self.clean[n].index_select(0, rows.smp)
            if fix is not None:
                v = self._materialize(n, v, rows).contiguous()
                fix(v, lambda j: self._materialize(j, states.get(j), rows))
            states[n] = v
            for j in nd.inputs:
                if self._last_use[j] <= n:
                    states.pop(j, None)
            if n > fixed_until and len(states) == 1 and isinstance(v, _Sparse):
                if tail and self._at_tail(n, states) and rows.smp.numel():
                    return self._tail_run(n, states[n], rows)
                if not (tail and n in self._to_tail):  # unchanged rows cost less than a prune there
                    states, rows = self._prune(n, states, rows)
        last = len(self.nodes) - 1
        if rows.smp.numel() == 0 or last not in states:
            empty = torch.zeros(0, dtype=torch.int64, device=self.device)
            return _RowSet(empty, empty), self.clean[last][:0], None
        return rows, self._materialize(last, states[last], rows), None

    def _at_tail(self, n: int, states: dict[int, Any]) -> bool:
        v = states.get(n)
        return (n in self._tail_plans and len(states) == 1 and isinstance(v, _Sparse)
                and v.vals.dim() == 2 and v.vals.shape[1] == 1)

    def _prune(self, n: int, states: dict[int, Any], rows: _RowSet) -> tuple[dict[int, Any], _RowSet]:
        v = states[n]
        keep = self._changed(n, v, rows)
        if bool(keep.all()):
            return states, rows
        idx = keep.nonzero().squeeze(1)
        v = _Sparse(v.unit[idx], v.vals[idx]) if isinstance(v, _Sparse) else v[idx]
        return {n: v}, _RowSet(rows.cfg[idx], rows.smp[idx])

    # --- dense path (configurations of several faults) --------------------------------------

    def _correction(self, n: int, items: list[tuple[int, _Resolved, int]]) -> Callable[[Tensor, Callable[[int], Tensor]], None]:
        nd = self.nodes[n]

        def fix(v: Tensor, get: Callable[[int], Tensor]) -> None:
            B = self.batch
            for f, r, k in items:
                vf = v.view(-1, B, *v.shape[1:])[f]
                e = int(r.a[k])
                if r.site == "neuron":
                    flat = vf.view(B, -1)
                    fault = r.faults[k]
                    if fault.kind == "bitflip":
                        from hwrel.formats import flip
                        flat[:, e] = flip(_fmt(fault.format or "fp32"), flat[:, e].cpu(), fault.bit).to(self.device)
                    else:
                        flat[:, e] = r.new[k]
                    continue
                xin_all = get(nd.inputs[0])
                xin = xin_all.reshape(-1, B, *xin_all.shape[1:])[f]
                aff = nd.affine
                if r.site == "synapse":
                    recv, send = int(r.b[k]), int(r.c[k])
                    vf.view(B, -1)[:, recv] += r.old[k] * (r.new[k] - xin.reshape(B, -1)[:, send])
                    continue
                d = r.new[k] - r.old[k]
                if r.site == "bias" and aff.kind == "linear":  # at every leading position
                    vf[..., e] += d
                elif r.site == "bias":
                    vf[:, e] += d
                elif aff.kind == "linear":
                    j, i = divmod(e, aff.weight.shape[1])
                    vf[..., j] += d * xin[..., i]
                else:
                    co, ci, ka, kb = np.unravel_index(e, tuple(aff.weight.shape))
                    cin = (co // (aff.weight.shape[0] // aff.groups)) * aff.weight.shape[1] + ci
                    ph, pw = aff.padding
                    xp = F.pad(xin[:, cin], (pw, pw, ph, ph))
                    _, ho, wo = nd.shape
                    h0, w0 = ka * aff.dilation[0], kb * aff.dilation[1]
                    sl = xp[:, h0: h0 + aff.stride[0] * (ho - 1) + 1: aff.stride[0],
                            w0: w0 + aff.stride[1] * (wo - 1) + 1: aff.stride[1]]
                    vf[:, co] += d * sl
        return fix

    # --- batching ----------------------------------------------------------------------------

    def _all_rows(self, n: int) -> _RowSet:
        ar = torch.arange(n, device=self.device)
        return _RowSet(ar.repeat_interleave(self.batch), torch.arange(self.batch, device=self.device).repeat(n))

    def _chunk(self, start: int, chunk: int | None, tail: bool = False) -> int:
        if chunk is not None:
            if int(chunk) < 1:
                raise HwrelError(f"chunk must be a positive number of configurations, got {chunk!r}")
            return int(chunk)
        q = min((t for t in self._tail_plans if t >= start), default=None)
        if tail and q is not None and all(len(self.nodes[n].shape) == 1 for n in range(start, q + 1)):
            # single faults on a flat path stay one value per row up to the tail, and the rows
            # forwarded past it are processed in pieces of the budget
            return int(max(1, min(4096, _BUDGET // (16 * self.batch))))
        size = max(self.nodes[n].size for n in range(start, len(self.nodes)))
        return int(max(1, min(256, _BUDGET // (self.batch * size))))

    def _batches(self, cfgs: list[tuple[Fault, ...]], chunk: int | None, tail: bool = False):
        """Yield ``(positions, rows, outputs (R, n_out), old (F,), new (F,), fast)`` covering every
        config (``fast``: see :meth:`_propagate`)."""
        singles: dict[tuple[int, str], list[int]] = defaultdict(list)
        multis: list[int] = []
        for p, c in enumerate(cfgs):
            if len(c) == 1:
                singles[(self._node_of(c[0]), c[0].site)].append(p)
            else:
                multis.append(p)
        for (node, site), pos in sorted(singles.items()):
            r = self._resolve(node, site, [cfgs[p][0] for p in pos])
            fixed = torch.tensor([f.new_value_is_fixed for f in r.faults], device=self.device)
            yield from self._single_batches(r, np.asarray(pos), fixed, chunk, tail)
        if multis:
            yield from self._multi_batches(cfgs, multis, chunk)

    def _single_batches(self, r: _Resolved, pos: np.ndarray, fixed: Tensor, chunk: int | None, tail: bool):
        """:meth:`_batches` for single faults resolved in ``r`` (configuration positions ``pos``)."""
        node = r.node
        old = r.old if r.site in ("weight", "bias") else torch.full_like(r.new, math.nan)
        new = torch.where(fixed, r.new, torch.full_like(r.new, math.nan))
        step = self._chunk(node, chunk, tail)
        for s in range(0, len(pos), step):
            sel = torch.arange(s, min(s + step, len(pos)), device=self.device)
            st = self._entry(r, sel)
            if tail and node in self._to_tail and st.vals.dim() == 3 and st.vals.shape[2] == 1:
                rows, out, fast = self._grid_tail(node, st.unit, st.vals[:, :, 0])
                yield pos[s: s + step], rows, out, old[sel], new[sel], fast
                continue
            rows = self._all_rows(int(sel.numel()))
            st = _Sparse(st.unit.repeat_interleave(self.batch), st.vals.reshape(-1, *st.vals.shape[2:]))
            rows, out, fast = self._propagate(node, st, rows, tail=tail)
            yield pos[s: s + step], rows, out, old[sel], new[sel], fast

    def _multi_batches(self, cfgs: list[tuple[Fault, ...]], multis: list[int], chunk: int | None):
        groups: dict[tuple[int, str], list[tuple[int, int]]] = defaultdict(list)
        for p in multis:
            seen = set()
            for q, f in enumerate(cfgs[p]):
                key = (f.site, f.layer, f.index, f.source)
                if key in seen:
                    raise HwrelError(f"configuration {p}: two {f.site} faults at layer {f.layer} index {f.index}; "
                                     "give several bits of one word as one fault (bits=...)")
                seen.add(key)
                groups[(self._node_of(f), f.site)].append((p, q))
        where: dict[tuple[int, int], tuple[_Resolved, int]] = {}
        for (node, site), items in groups.items():
            r = self._resolve(node, site, [cfgs[p][q] for p, q in items])
            for k, it in enumerate(items):
                where[it] = (r, k)
        by_start: dict[int, list[int]] = defaultdict(list)
        for p in multis:
            by_start[min(where[(p, q)][0].node for q in range(len(cfgs[p])))].append(p)
        nan = torch.full((1,), math.nan, device=self.device)
        for start, pos in sorted(by_start.items()):
            step = self._chunk(start, chunk)
            for s in range(0, len(pos), step):
                part = pos[s: s + step]
                per_node: dict[int, list[tuple[int, _Resolved, int]]] = defaultdict(list)
                for f, p in enumerate(part):
                    for q in range(len(cfgs[p])):
                        r, k = where[(p, q)]
                        per_node[r.node].append((f, r, k))
                fixes = {n: self._correction(n, items) for n, items in per_node.items()}
                rows, out, _ = self._propagate(start, None, self._all_rows(len(part)), fixes)
                yield np.asarray(part), rows, out, nan.expand(len(part)), nan.expand(len(part)), None

    # --- public API --------------------------------------------------------------------------

    @torch.no_grad()
    def outputs(self, config: FaultConfig) -> Tensor:
        """Exact faulty output ``(B, n_out)`` of one configuration (faults applied together)."""
        cfg = as_config(config)
        out = self.clean[-1].clone()
        for _, rows, o, _, _, _ in self._batches([cfg], 1):
            out[rows.smp] = o
        return out

    @torch.no_grad()
    def run(self, configs: Sequence[FaultConfig], chunk: int | None = None) -> dict[str, np.ndarray]:
        """Metrics of every configuration, in order (arrays of ``len(configs)``).

        ``old_value``/``new_value`` (float32): the stored word's value before/after (weight, bias) or
        the transmitted value (neuron crash/stuck/byzantine, synapse: ``new_value`` only); NaN where it
        varies per sample or the configuration has several faults. ``max_abs_delta``: max over samples
        and outputs of ``|faulty - clean|`` (inf when an output is NaN/Inf). ``mismatch_rate``: fraction
        of samples whose top-1 class changes; ``accuracy``: fraction correct (with labels); a sample
        with a NaN/Inf output counts as changed and wrong. ``nonfinite``: any NaN/Inf output.
        ``chunk``: configurations per stacked forward (default: sized to ~32 MiB per tensor).
        """
        cfgs = [as_config(c) for c in configs]
        return self._collect(len(cfgs), self._batches(cfgs, chunk, tail=True))

    @torch.no_grad()
    def run_words(self, layer: Sequence[str], site: str, index: np.ndarray, bits: np.ndarray,
                  kind: str = "bitflip", chunk: int | None = None) -> dict[str, np.ndarray]:
        """:meth:`run` for single bit faults given as arrays, without building :class:`Fault`
        objects: fault ``k`` hits bit ``bits[k]`` of word ``index[k]`` of the ``site`` (weight or
        bias) of affine layer ``layer[k]`` with ``kind`` (bitflip, stuck0, stuck1). Same results,
        row for row, as :meth:`run` on the equivalent faults (exact, see :class:`Injector`), plus
        ``certified``: the fault was settled without a forward (its weight multiplies only exact
        zeros and its new value is finite: the outputs are exactly the clean ones)."""
        if site not in ("weight", "bias") or kind not in ("bitflip", "stuck0", "stuck1"):
            raise HwrelError(f"run_words takes weight or bias bit faults, got site {site!r} kind {kind!r}")
        index, bits = np.asarray(index, dtype=np.int64), np.asarray(bits, dtype=np.int64)
        layer = np.asarray(layer)
        if not (len(layer) == len(index) == len(bits)):
            raise HwrelError(f"layer, index and bits differ in length: {len(layer)}, {len(index)}, {len(bits)}")
        level = {"bitflip": 0, "stuck1": 1, "stuck0": 2}[kind]

        def batches():  # noqa: ANN202
            for name in sorted(set(layer.tolist()), key=lambda nm: self._affine.get(nm, -1)):
                node = self._node_of(Fault(site, name, 0, kind, bit=0))
                pos = np.nonzero(layer == name)[0]
                fmt = self.storage[node].wfmt if site == "weight" else self.storage[node].bfmt
                tensor = self.nodes[node].affine.weight if site == "weight" else self.nodes[node].affine.bias
                if tensor is None:
                    raise HwrelError(f"bias fault at layer {name}: the layer has no bias")
                idx, b = index[pos], bits[pos]
                bad = (idx < 0) | (idx >= tensor.numel())
                if bad.any():
                    raise HwrelError(f"{site} fault at layer {name}: index {int(idx[bad][0])} outside its "
                                     f"{tensor.numel()} {site}s (shape {tuple(tensor.shape)})")
                bad = (b < 0) | (b >= fmt.bits)
                if bad.any():
                    k = int(np.nonzero(bad)[0][0])
                    raise HwrelError(f"{site} fault at layer {name} index {int(idx[k])}: bit {int(b[k])} beyond "
                                     f"{fmt.name} (bits 0..{fmt.bits - 1})")
                r = self._resolve_words(node, site, None, torch.from_numpy(idx),
                                        torch.from_numpy(np.left_shift(1, b)), torch.full((len(idx),), level))
                if site == "weight":  # zero inputs: the outputs stay exactly clean, no forward
                    skip = (self._zero_inputs(node)[r.a] & torch.isfinite(r.new)).cpu().numpy()
                    if skip.any():
                        certified[pos[skip]] = True
                        olds[pos[skip]], news[pos[skip]] = r.old.cpu().numpy()[skip], r.new.cpu().numpy()[skip]
                        keep = torch.from_numpy(~skip).to(self.device)
                        r = _Resolved(node, site, None, r.a[keep], r.old[keep], r.new[keep])
                        pos = pos[~skip]
                if len(pos):
                    fixed = torch.ones(len(pos), dtype=torch.bool, device=self.device)
                    yield from self._single_batches(r, pos, fixed, chunk, True)

        n = len(index)
        certified = np.zeros(n, dtype=bool)
        olds, news = np.full(n, np.nan, np.float32), np.full(n, np.nan, np.float32)
        res = self._collect(n, batches())
        res["old_value"][certified], res["new_value"][certified] = olds[certified], news[certified]
        res["certified"] = certified
        return res

    def _zero_inputs(self, node: int) -> Tensor:
        """Flat bool per weight of affine ``node``: every input value it multiplies (every input,
        every position) is exactly 0 in the clean run, so a finite faulty value there leaves every
        output exactly clean (``w * 0 = 0``: the same sums; see :mod:`hwrel.inject.certify`)."""
        if node not in self._zero_cache:
            from hwrel.inject.windows import zero_input_weights

            nd = self.nodes[node]
            self._zero_cache[node] = zero_input_weights(nd, self.clean[nd.inputs[0]].abs())
        return self._zero_cache[node]

    def _collect(self, n: int, batches) -> dict[str, np.ndarray]:  # noqa: ANN001
        """The metrics of :meth:`run` from the batches of :meth:`_batches`."""
        B = self.batch
        res = {"old_value": np.full(n, np.nan, np.float32), "new_value": np.full(n, np.nan, np.float32),
               "max_abs_delta": np.zeros(n), "mismatch_rate": np.zeros(n), "nonfinite": np.zeros(n, bool)}
        if self.labels is not None:
            clean_ok = (self.clean_top1 == self.labels)
            res["accuracy"] = np.full(n, float(clean_ok.double().mean()))
        clean = self.clean[-1]
        for pos, rows, out, old, new, fast in batches:
            Fn = len(pos)
            res["old_value"][pos] = old.float().cpu().numpy()
            res["new_value"][pos] = new.float().cpu().numpy()
            if fast is not None:  # rows read off the tail tables: finite, top-1 unchanged
                fmx = torch.zeros(Fn, dtype=torch.float64, device=self.device).scatter_reduce_(0, *fast, "amax")
                res["max_abs_delta"][pos] = fmx.cpu().numpy()
            if out.shape[0] == 0:
                continue
            lo, hi = torch.aminmax(out - clean.index_select(0, rows.smp), dim=1)
            d = torch.maximum(-lo, hi).double()  # NaN when a NaN output, inf when an Inf one (or an overflow)
            bad = ~torch.isfinite(d)
            if bool(bad.any()):  # exact check of the few suspicious rows
                sus = bad.nonzero().squeeze(1)
                o = out[sus]
                bad[sus] = ~torch.isfinite(o).all(1)
                d[sus] = torch.where(bad[sus], math.inf, (o.double() - clean[rows.smp[sus]].double()).abs().amax(1))
            mx = (torch.zeros(Fn, dtype=torch.float64, device=self.device) if fast is None else fmx
                  ).scatter_reduce_(0, rows.cfg, d, "amax")
            top = out.argmax(1)
            changed = (top != self.clean_top1[rows.smp]) | bad
            res["max_abs_delta"][pos] = mx.cpu().numpy()
            res["nonfinite"][pos] = torch.bincount(rows.cfg, bad.double(), minlength=Fn).cpu().numpy() > 0
            res["mismatch_rate"][pos] = (torch.bincount(rows.cfg, changed.double(), minlength=Fn) / B).cpu().numpy()
            if self.labels is not None:
                ok = ((top == self.labels[rows.smp]) & ~bad).double() - clean_ok[rows.smp].double()
                res["accuracy"][pos] += (torch.bincount(rows.cfg, ok, minlength=Fn) / B).cpu().numpy()
        return res

    def storage_format(self, layer: str) -> Format:
        """The format weight faults of affine layer ``layer`` flip (Brevitas codes or the float format)."""
        if layer not in self._affine:
            raise HwrelError(f"unknown layer {layer!r}; valid affine layers: {', '.join(self._affine)}")
        return self.storage[self._affine[layer]].wfmt

    def random_faults(self, n: int, *, site: str = "weight", kind: str = "bitflip", seed: int = 0,
                      layers: Sequence[str] | None = None) -> list[Fault]:
        """``n`` random single faults, uniform over every (weight or neuron, bit) site of ``layers``
        (default all affine layers for weight/bias/synapse faults, all hidden layers for neuron
        faults). Bits are uniform over the storage width (fp32 for neurons). Reproducible from ``seed``."""
        rng = np.random.default_rng(seed)
        table = self._hidden if site == "neuron" else self._affine
        names = list(layers) if layers is not None else list(table)
        for nm in names:
            if nm not in table:
                raise HwrelError(f"unknown layer {nm!r}; valid: {', '.join(table)}")
        def count(nm: str) -> int:
            nd = self.nodes[table[nm]]
            if site == "neuron":
                return nd.size
            t = nd.affine.weight if site in ("weight", "synapse") else nd.affine.bias
            return 0 if t is None else t.numel()
        sizes = np.array([count(nm) for nm in names])
        if sizes.sum() == 0:
            raise HwrelError(f"no {site} sites in layers {names}")
        flat = rng.integers(0, int(sizes.sum()), n)
        which = np.searchsorted(np.cumsum(sizes), flat, side="right")
        local = flat - np.concatenate([[0], np.cumsum(sizes)])[which]
        widths = [32 if site == "neuron" else (self.storage[table[nm]].wfmt if site == "weight"
                  else self.storage[table[nm]].bfmt).bits for nm in names]
        u = rng.random(n)
        out = []
        for k in range(n):
            nm, idx = names[which[k]], int(local[k])
            if kind in ("bitflip", "stuck0", "stuck1"):
                out.append(Fault(site, nm, idx, kind, bit=int(u[k] * widths[which[k]])))
            elif kind == "crash":
                nd = self.nodes[table[nm]]
                if site == "synapse" and (nd.affine.kind != "linear" or len(self.nodes[nd.inputs[0]].shape) > 1):
                    raise HwrelError("random synapse faults cover Linear layers on flat inputs; give source= "
                                     "explicitly for convolutions and Linear layers over rows")
                out.append(Fault(site, nm, idx, kind))
            else:
                raise HwrelError(f"random_faults supports bitflip, stuck0, stuck1 and crash, got {kind!r}")
        return out


def campaign_chunk(net: Network, batch: int, configs: int) -> int:
    """Configurations per campaign chunk (the unit a campaign samples, measures, writes and
    resumes by) for ``configs`` configurations on ``batch`` inputs: a power of two, large enough
    that a chunk's fixed costs (sampling, a Parquet part, the engine's per-call set-up) stay small
    beside its forwards (about 2^33 activation floats of work: ``batch`` x the largest node per
    configuration), small enough for at least 8 chunks (progress, shards), within 64..65536. The
    engine still stacks configurations in its own, memory-sized batches inside a chunk."""
    size = max(n.size for n in net.nodes)
    work = 1 << max(6, min(16, int(math.log2(max(1.0, (1 << 33) / (max(1, batch) * size))))))
    spread = 1 << max(6, int(math.log2(max(1.0, int(configs) / 8))))
    return int(min(work, spread))


def inject(model: nn.Module | Network, faults: Sequence[FaultConfig] | int, inputs: Tensor,
           labels: Tensor | None = None, *, format: str | Format = "fp32", seed: int = 0,
           range_limit: float | None = None, input_domain: tuple[float, float] = (0.0, 1.0),
           input_shape: Sequence[int] | None = None, device: str | torch.device = "cpu",
           chunk: int | None = None) -> "pd.DataFrame":
    """Inject every fault configuration into ``model`` on ``inputs``; one row per configuration.

    ``faults``: a sequence of configurations (a :class:`Fault` or a list of faults applied together),
    or an int ``n`` for ``n`` random single weight bit flips drawn from ``seed`` (uniform over all
    weight bits). Columns: ``config``, ``n_faults``, ``layer``, ``site``, ``kind``, ``index``, ``bit``
    (first bit, -1 if none), ``bits``, ``source`` (-1 if none), ``value``, then the metrics of
    :meth:`Injector.run`. A configuration of several faults lists its layers/sites/kinds joined by
    ``;`` and the first fault's index and bit. Exact (see :class:`Injector`).
    """
    import pandas as pd

    inj = Injector(model, inputs, labels, format=format, range_limit=range_limit, input_domain=input_domain,
                   input_shape=input_shape, device=device)
    if isinstance(faults, (int, np.integer)) and not isinstance(faults, bool):
        faults = inj.random_faults(int(faults), seed=seed)
    cfgs = [as_config(c) for c in faults]
    res = inj.run(cfgs, chunk=chunk)
    first = [c[0] for c in cfgs]
    df = pd.DataFrame({
        "config": np.arange(len(cfgs)),
        "n_faults": [len(c) for c in cfgs],
        "layer": [";".join(f.layer for f in c) for c in cfgs],
        "site": [";".join(f.site for f in c) for c in cfgs],
        "kind": [";".join(f.kind for f in c) for c in cfgs],
        "index": [f.index for f in first],
        "bit": [-1 if f.bit is None else f.bit for f in first],
        "bits": [" ".join(map(str, f.bits)) for f in first],
        "source": [-1 if f.source is None else f.source for f in first],
        "value": [math.nan if f.value is None else f.value for f in first],
    })
    for k, v in res.items():
        df[k] = v
    return df
