"""Predicted quantization error: rounding as a bounded Byzantine perturbation (theory 3.1, 4, 5).

Rounding moves each weight (and activation) by at most the radius of :mod:`hwrel.quantize.rounding`.
Every such change is a Byzantine perturbation of a synapse (or neuron output) of bounded size, so
the weight-perturbation bounds of :mod:`hwrel.bounds.perturb` bound the output change over the
domain, and per test input the smaller of the interval bound and the linearized bound
(:mod:`hwrel.bounds.linearized`, radii refined by :mod:`hwrel.bounds.refine`) bounds it and every
logit margin's change. Activation scales are max-calibrated on the Brevitas model
(:mod:`hwrel.quantize.brevitas_ptq`).

:class:`Predictor` caches what every bit width shares (float64 network, nominal values of the test
inputs and their linearization, calibrated activation ranges) so a sweep over 2..16 bits costs
little more than one bound pass per width and input.
"""
from __future__ import annotations

import sys
from typing import Callable, Mapping, Sequence

import torch
from torch import Tensor

from hwrel.bounds.certify import certified_from_margin_bounds, check_data
from hwrel.bounds.linearized import LinearizedBound, linearize
from hwrel.bounds.refine import NeuronRefiner
from hwrel.bounds.ibp import interval_bounds, point_rounding, sup_abs
from hwrel.bounds.interval import FAULTY
from hwrel.bounds.perturb import WeightPerturbation, paper_perturbation, perturbation_radii
from hwrel.device import resolve_device
from hwrel.errors import HwrelError, check
from hwrel.quantize.estimate import JacobianSums
from hwrel.quantize.rounding import QuantSpec, act_radius, check_bits, weight_radius
from hwrel.network import Network

_CHUNK = 1024
REFINE_SHARE = 0.5  # refine an input's radii only if its first-order change is below this share of its margin
# least growth of a refined load one bit down (between linear and quadratic in the radii); on all
# 1,000 test inputs, 2 -> 3 cost one certificate at 10 bits on mnist-lenet and none on mnist-resnet,
# 4 cost twelve (see certified_flags)
LOAD_GROWTH = 3.0


def _progress(chunks: range, desc: str):
    """A progress bar on a terminal's stderr for work of several chunks (CNNs take minutes)."""
    from tqdm.auto import tqdm

    return tqdm(chunks, desc=desc, unit="chunk", file=sys.stderr, leave=False, dynamic_ncols=True,
                disable=len(chunks) < 4 or not sys.stderr.isatty())


def _chunk_size(net: Network, budget_bytes: float = 2.0 ** 28) -> int:
    """Inputs per chunk so that a chunk's linearization (gradients of every output at every node,
    twice: outputs and margins) stays within ``budget_bytes``."""
    n_out = net.nodes[-1].size
    per_input = sum(n.size for n in net.nodes if n.op in ("affine", "act", "pool"))
    # convolutions and Linear layers on rows keep a per-input weight gradient (a flat Linear does not)
    per_input += sum(n.affine.weight.numel() for n in net.nodes if n.op == "affine"
                     and (n.affine.kind != "linear" or len(net.nodes[n.inputs[0]].shape) > 1))
    return int(max(8, min(_CHUNK, budget_bytes // (per_input * n_out * 2 * 8 * 2))))


class Predictor:
    """Bounds, certificates and per-layer radii for one network, test set and quantization spec.

    ``act_quant(layer_bits)`` gives, for weight widths per synapse node, the calibrated activation
    quantizers ``(scale, clip_lo, clip_hi)`` of each hidden activation in order (read from the
    Brevitas model that :func:`hwrel.quantize.ptq` calibrates, so prediction and deployment share
    their scales). ``linearized``: also use the linearized per-input bound (tighter, mostly on
    convolutions; off only to compare with the interval bound alone). ``refine``: refine its
    radii at unstable neurons for inputs it leaves undecided (tighter, slower on CNNs). ``device``:
    where it computes (``"cuda"`` for a GPU; default: where ``net`` lies); every tensor it holds or
    returns lies there.
    """

    def __init__(self, net: Network, spec: QuantSpec, x: Tensor | None = None, y: Tensor | None = None,
                 act_quant: Callable[[dict[int, int]], list[tuple[float, float, float]]] | None = None,
                 linearized: bool = True, refine: bool = True, device: "torch.device | str | None" = None):
        self.device = resolve_device(device) if device is not None else net.input_lo.device
        self.net = net.to(torch.float64, self.device)
        self.linearized = linearized
        gpu = self.device.type == "cuda"  # bigger batches: a GPU is fed by width, not by cache locality
        self.refiner = NeuronRefiner(self.net, chunk=8192 if gpu else 512) if linearized and refine else None
        self.chunk = _chunk_size(self.net, 2.0 ** 31 if gpu else 2.0 ** 28)
        self._lin_cache: dict = {}
        self._cache_lin = x is not None and len(x) <= 4 * self.chunk  # small enough to keep in memory
        self._squares: dict = {}
        self._wr: dict[tuple[int, int], Tensor] = {}
        self._jac: JacobianSums | None = None
        self.spec = spec
        self.layers = tuple(self.net.synapse_layers)
        self.acts = tuple(self.net.layers)
        self.x = self.y = None
        if x is not None:
            check_data(net, x, y)
            x64 = x.to(torch.float64).to(self.device)
            y = None if y is None else y.to(self.device)
            if bool(((x64 < self.net.input_lo - 1e-12) | (x64 > self.net.input_hi + 1e-12)).any()):
                raise HwrelError("some inputs lie outside the model's input_domain; widen input_domain")
            self.x, self.y = x64, y
            with torch.no_grad():
                values = [self.net.forward_all(x64[i:i + _CHUNK]) for i in range(0, len(x64), _CHUNK)]
            # nominal (exact) value of every node for every test input; the per-input bounds are
            # about the quantized float32 forward against these exact values
            self.all_values = [torch.cat([v[k] for v in values]) for k in range(len(self.net.nodes))]
            # how far the clean float32 forward's outputs may be from them (a domain-wide bound,
            # about two float32 forwards, caps a per-input one only with this added)
            self.out_rho = torch.cat([point_rounding(self.net, x64[i:i + _CHUNK])[-1]
                                      for i in range(0, len(x64), _CHUNK)])
            self.logits = self.all_values[-1]
            self.pred = self.logits.argmax(1)
            self.correct = self.pred == y if y is not None else None
        self.domain = interval_bounds(self.net, self.net.input_lo[None], self.net.input_hi[None])
        self._act_quant = act_quant
        self._sups: list[Tensor] | None = None
        self._scales: dict[tuple, dict[int, tuple[float, float, float]]] = {}
        check(spec.act_bits is None or act_quant is not None,
              "activation quantization needs the calibrated quantizers (act_quant)")

    # ------------------------------------------------------------------------- perturbations

    def layer_bits(self, bits: int | Mapping[int, int]) -> dict[int, int]:
        if isinstance(bits, Mapping):
            return {i: check_bits(int(bits[i])) for i in self.layers}
        return {i: check_bits(bits) for i in self.layers}

    def act_scales(self, bits: int | Mapping[int, int]) -> dict[int, tuple[float, float, float]]:
        """Per quantized activation node: ``(scale, clip_lo, clip_hi)`` of the calibrated quantizer."""
        if self.spec.act_bits is None:
            return {}
        key = tuple(sorted(self.layer_bits(bits).items()))
        if key not in self._scales:
            quants = self._act_quant(dict(key))
            check(len(quants) == len(self.acts), f"the quantized model has {len(quants)} activation quantizers "
                                                 f"for {len(self.acts)} hidden activations")
            self._scales[key] = dict(zip(self.acts, quants))
        return self._scales[key]

    def perturbation(self, bits: int | Mapping[int, int], nominal: tuple[list[Tensor], list[Tensor]]
                     ) -> WeightPerturbation:
        """The rounding perturbation at ``bits`` (an int, or per synapse-layer node index)."""
        lb = self.layer_bits(bits)
        for i, b in lb.items():  # the same radii for every chunk of inputs
            if (i, b) not in self._wr:
                self._wr[i, b] = weight_radius(self.net.nodes[i].affine.weight, b, self.spec)
        wr = {i: self._wr[i, b] for i, b in lb.items()}
        ar = {i: act_radius(nominal[0][i], nominal[1][i], s, c_lo, c_hi)
              for i, (s, c_lo, c_hi) in self.act_scales(bits).items()}
        return WeightPerturbation(weight_radius=wr, act_radius=ar)

    # ------------------------------------------------------------------------------- bounds

    def domain_bounds(self, bits: int | Mapping[int, int]) -> dict[str, float]:
        """Sound bounds on ``max_o sup_{x in domain} |F~_o(x) - F_o(x)|`` by every method.

        The same computation as :func:`hwrel.bounds.perturb.perturbation_bound` over the domain,
        reusing the domain's nominal intervals (computed once) instead of recomputing them per call.
        """
        p = self.perturbation(bits, self.domain)
        lo, hi = self.net.input_lo[None], self.net.input_hi[None]
        if self._sups is None:
            self._sups = [sup_abs(a, b).max() for a, b in zip(*self.domain)]
        out = {"paper": float(paper_perturbation(self.net, p, self._sups))}
        for m in ("weights", "interval"):
            out[m] = float(perturbation_radii(self.net, p, lo, hi, m, self.domain)[-1].max())
        return out

    def sample_bounds(self, bits: int | Mapping[int, int], cap: float = float("inf"),
                      idx: Tensor | None = None) -> Tensor:
        """Sound per-test-input, per-output bounds ``(N, n_out)`` on ``|F~_o(x) - F_o(x)|``.

        The smaller of the interval bound at the point and the linearized bound
        (:mod:`hwrel.bounds.linearized`), capped at ``cap`` (a domain-wide bound). ``idx``: only
        these test inputs (rows in that order); an input's bound does not depend on the others (up to
        float64 rounding of batched products, which the bounds' relative slack absorbs).
        """
        return self.sample_certificates([bits], [cap], idx)[0][0]

    def sample_certificates(self, widths: Sequence[int | Mapping[int, int]], caps: Sequence[float],
                            idx: Tensor | None = None, refine: bool = True) -> list[tuple[Tensor, Tensor]]:
        """Per width: sound per-input bounds on every output's change and every margin's change.

        Returns, for each entry of ``widths``, ``(out, margin)``, both ``(N, n_out)``: ``out[n, o]``
        bounds ``|dF_o(x_n)|`` and ``margin[n, o]`` bounds ``|d(F_p - F_o)(x_n)|`` (``p`` the
        predicted class; 0 at ``o = p``), the change from the exact clean network to the quantized
        model's float32 forward. Each input is linearized once for all widths.
        """
        if self.x is None:
            raise HwrelError("per-input certificates need data")
        idx = torch.arange(len(self.x), device=self.device) if idx is None else idx.to(self.device)
        parts: list[list[tuple[Tensor, Tensor]]] = [[] for _ in widths]
        for s in _progress(range(0, len(idx), self.chunk), "bounding inputs"):
            ib = idx[s:s + self.chunk]
            for k, (out, mb) in enumerate(self._chunk_certificates(ib, widths, caps, refine)):
                parts[k].append((out, mb))
        n_out = self.logits.shape[1]
        empty = torch.zeros(0, n_out, dtype=self.logits.dtype, device=self.device)
        res = [(torch.cat([a for a, _ in ps]) if ps else empty, torch.cat([b for _, b in ps]) if ps else empty)
               for ps in parts]
        if self.spec.act_bits is None:
            # the rounding boxes nest (a wider width has an elementwise smaller radius), so a bound
            # proven at a narrower width holds at every wider one
            order = sorted((w, k) for k, w in enumerate(widths) if isinstance(w, int))
            for (_, lo), (_, hi) in zip(order, order[1:]):
                res[hi] = (torch.minimum(res[hi][0], res[lo][0]), torch.minimum(res[hi][1], res[lo][1]))
        return res

    def _linearization(self, ib: Tensor) -> LinearizedBound | None:
        """The linearized bound of the inputs ``ib`` (kept for reuse when all inputs fit in memory).

        Also records the chunk's squared Jacobian sums for the estimate (:meth:`jacobian_sums`)."""
        if not self.linearized or len(ib) == 0:
            return None
        # cached per contiguous range only: (start, length) names the inputs only for a range
        contiguous = bool((ib == torch.arange(int(ib[0]), int(ib[0]) + len(ib), device=ib.device)).all())
        key = (int(ib[0]), len(ib))
        if contiguous and key in self._lin_cache:
            return self._lin_cache[key]
        lin = LinearizedBound(linearize(self.net, self.x[ib]))
        if contiguous:
            self._squares.setdefault(key, lin.squares)
            if self._cache_lin:
                self._lin_cache[key] = lin
        return lin

    def jacobian_sums(self) -> JacobianSums:
        """Squared Jacobian sums of every test input (shared with the linearized certificates)."""
        if self._jac is None:
            keys = [(s, min(self.chunk, len(self.x) - s)) for s in range(0, len(self.x), self.chunk)]
            for k in keys:
                if k not in self._squares:
                    if self.linearized:
                        self._linearization(torch.arange(k[0], k[0] + k[1], device=self.device))
                    else:
                        ib = torch.arange(k[0], k[0] + k[1], device=self.device)
                        self._squares[k] = LinearizedBound(linearize(self.net, self.x[ib])).squares
            parts = [self._squares[k] for k in keys]
            cat = {kind: {i: torch.cat([p[kind][i] for p in parts]) for i in parts[0][kind]} for kind in parts[0]}
            self._jac = JacobianSums(cat["out"], cat["margin"], self.layers, self.acts)
            self._squares = {}
        return self._jac

    def _evaluate(self, ib: Tensor, lin: LinearizedBound | None, bits, cap: float,
                  refine: bool = True) -> tuple[Tensor, Tensor]:
        """Per-output and per-margin bounds of the inputs ``ib`` at ``bits`` (see
        :meth:`sample_certificates`). Inputs that the bounds leave undecided although the exact
        first-order change alone would keep their class are bounded again with refined radii
        (:class:`hwrel.bounds.refine.NeuronRefiner`)."""
        xb = self.x[ib]
        vals = [v[ib] for v in self.all_values]
        p = self.perturbation(bits, (vals, vals))
        cap = cap + self.out_rho[ib][:, None]
        out, mb = self._bounds(xb, vals, lin, p, cap)
        if lin is None or self.refiner is None or not refine:
            return out, mb
        margin = self.logits[ib].gather(1, self.pred[ib][:, None]) - self.logits[ib]
        undecided = ~certified_from_margin_bounds(self.logits[ib], mb)
        # refine only where the exact first-order change leaves half the margin: elsewhere the
        # remainder does not fit either (measured on the reference CNNs), and refining costs a
        # backward pass per unstable neuron
        first = lin.first_order(p)["margin"]
        hopeful = (margin * REFINE_SHARE > first).scatter(1, self.pred[ib][:, None], True).all(1)
        rows = torch.nonzero(undecided & hopeful)[:, 0]
        if len(rows):
            sub_vals = [v[rows] for v in vals]
            sub = lin.subset(rows)
            p2 = WeightPerturbation(p.weight_radius, p.bias_radius,
                                    {k: (v[rows] if isinstance(v, Tensor) and v.dim() > 0 else v)
                                     for k, v in p.act_radius.items()})
            o2, m2 = self._bounds(xb[rows], sub_vals, sub, p2, cap[rows], refine=sub)
            out[rows], mb[rows] = torch.minimum(out[rows], o2), torch.minimum(mb[rows], m2)
        return out, mb

    def _bounds(self, xb, vals, lin, p, cap, refine: LinearizedBound | None = None) -> tuple[Tensor, Tensor]:
        """Bounds of the inputs ``xb`` (exact nominal ``vals``); ``refine``: their linearization, to
        refine the radii too. The bounds hold for the quantized model's float32 forward against the
        exact clean network; ``cap`` ``(B, 1)``: a sound cap of the same."""
        def weight(a):  # how much each neuron's residual at activation ``a`` can move any margin
            return refine.abs_g["margin"][a].amax(1)

        def tighten(i, e, radii):
            return self.refiner.refine(xb, vals, refine.lin.pool_idx, p, i, e, radii, weight, float32=True)
        radii = perturbation_radii(self.net, p, xb, xb, "interval", (vals, vals),
                                   tighten=None if refine is None else tighten, rounding=FAULTY)
        out = radii[-1].flatten(1)
        lb = {} if lin is None else lin.bounds(p, radii, float32=True)
        if "out" in lb:
            out = torch.minimum(out, lb["out"])
        out = torch.minimum(out, cap)
        pred = vals[-1].argmax(1)[:, None]
        mb = out.gather(1, pred) + out  # a margin moves by at most the sum of its two outputs' moves
        if "margin" in lb:
            mb = torch.minimum(mb, lb["margin"])
        return out, mb.scatter(1, pred, 0.0)

    def _chunk_certificates(self, ib: Tensor, widths, caps, refine: bool = True) -> list[tuple[Tensor, Tensor]]:
        lin = self._linearization(ib)
        return [self._evaluate(ib, lin, bits, cap, refine) for bits, cap in zip(widths, caps)]

    def certified_flags(self, widths: Sequence[int], caps: Mapping[int, float],
                        progress: Callable[[float, str], None] | None = None) -> dict[int, Tensor]:
        """Per width, the certified flag of every test input, each input evaluated at few widths.
        ``progress(fraction, message)`` is called after every evaluation (fraction of the inputs
        done, 0..1, an estimate within a chunk).

        Sound because the rounding boxes nest (weights only): a wider width has an elementwise
        smaller radius, so a certificate at ``b`` covers every ``b' > b``; a width left unevaluated
        counts as not certified. Two passes per chunk of inputs:

        1. without refined radii, divide and conquer over the sorted widths (an input not certified
           at ``b`` is taken as not certified below ``b``: the bounds only grow with the radius), so
           each input is evaluated at ~log2(len(widths)) widths;
        2. with refined radii (:meth:`_evaluate`), which cost a backward pass per unstable neuron,
           walking down from the narrowest width the first pass certified, one width at a time,
           while the predicted load one width down stays below 1. The load is the largest ratio of
           margin bound to margin (certified below 1); one bit down the radii double, so the load
           at least doubles, and it grows as fast as it last grew or faster (the remainder is
           superlinear in the radii): predicted ``load * max(LOAD_GROWTH, load / previous load)``.

        The prediction only decides where to spend refinement (a heuristic; soundness never depends
        on it). It certifies what refining at every width does on the 64 mnist-lenet inputs of
        ``tests/test_quantize.py``; on all 1,000, ``LOAD_GROWTH`` 3 instead of 2 lost one input at
        10 bits. It spares refinements that would fail: on ``mnist-resnet`` the refined bound
        certifies 20 inputs at 10 bits, and walking down from every input certified at 11 tried 686.
        """
        ws = sorted(widths)
        flags = {b: torch.zeros(len(self.x), dtype=torch.bool, device=self.device) for b in ws}
        n = len(self.x)
        calls = [0]

        def said(s: int, e: int, b: int, refined: bool) -> None:
            if progress is not None:
                calls[0] += 1  # within a chunk: an estimate that approaches, never reaches, its end
                within = calls[0] / (calls[0] + 2 * len(ws))
                progress((s + within * (e - s)) / n, f"per-input certificates: inputs {s + 1}-{e} of {n}, "
                         f"{b} bits{' (refined)' if refined else ''}")

        for s in _progress(range(0, n, self.chunk), "certifying inputs"):
            e = min(s + self.chunk, n)
            calls[0] = 0
            ib = torch.arange(s, e, device=self.device)
            whole = self._linearization(ib)
            # per input: index of the narrowest certified width, and the load there
            lowest = torch.full((len(ib),), len(ws), dtype=torch.long, device=self.device)
            load = torch.ones(len(ib), dtype=torch.float64, device=self.device)

            def mark(rows: Tensor, k: int, mb: Tensor) -> None:
                lower = k < lowest[rows]
                lowest[rows[lower]] = k
                load[rows[lower]] = self._load(mb[lower], ib[rows[lower]])

            def solve(lo: int, hi: int, rows: Tensor) -> None:
                if lo > hi or len(rows) == 0:
                    return
                mid = (lo + hi) // 2
                ok, mb = self._certified_at(ib, whole, rows, ws[mid], caps[ws[mid]], refine=False)
                said(s, e, ws[mid], False)
                mark(rows[ok], mid, mb[ok])
                solve(mid + 1, hi, rows[~ok])
                solve(lo, mid - 1, rows[ok])

            solve(0, len(ws) - 1, torch.arange(len(ib), device=self.device))
            if self.refiner is not None and whole is not None:
                rows = torch.nonzero(lowest > 0)[:, 0]
                while len(rows):
                    k = lowest[rows] - 1  # one width below the narrowest certified one
                    nxt = []
                    for kk in torch.unique(k).tolist():
                        sel = rows[k == kk]
                        before = load[sel]
                        ok, mb = self._certified_at(ib, whole, sel, ws[kk], caps[ws[kk]], refine=True)
                        said(s, e, ws[kk], True)
                        mark(sel[ok], kk, mb[ok])
                        now = load[sel]
                        again = ok & (now * torch.clamp(now / before, min=LOAD_GROWTH) < 1) & (kk > 0)
                        nxt.append(sel[again])
                    rows = torch.cat(nxt)
            for k, b in enumerate(ws):
                flags[b][ib[lowest <= k]] = True
        return flags

    def certified_among(self, bits: int | Mapping[int, int], cap: float, candidates: Tensor,
                        max_misses: int | None = None) -> Tensor | None:
        """Certified flags at ``bits`` of the inputs in the mask ``candidates`` (the others: False),
        or ``None`` as soon as more than ``max_misses`` correctly classified candidates are not
        certified (the rest is then not evaluated). Sound; for searches that only ask whether a
        budget holds, e.g. the per-layer assignment, where an input not certified in a smaller
        rounding box need not be tried in a larger one."""
        flags = torch.zeros(len(self.x), dtype=torch.bool, device=self.device)
        misses = 0
        for s in range(0, len(self.x), self.chunk):
            ib = torch.arange(s, min(s + self.chunk, len(self.x)), device=self.device)
            rows = torch.nonzero(candidates[ib])[:, 0]
            if len(rows) == 0:
                continue
            ok = self._certified_at(ib, self._linearization(ib), rows, bits, cap, refine=True)[0]
            flags[ib[rows[ok]]] = True
            misses += int((self.correct[ib[rows]] & ~ok).sum())
            if max_misses is not None and misses > max_misses:
                return None
        return flags

    def _certified_at(self, ib: Tensor, whole: LinearizedBound | None, rows: Tensor, bits: int, cap: float,
                      refine: bool) -> tuple[Tensor, Tensor]:
        """Certified flags and margin bounds of the inputs ``ib[rows]`` at ``bits``."""
        # certificates need the margins only; a small subset is cheaper to copy than to skip
        lin = None if whole is None else whole.subset(rows, ("margin",))
        mb = self._evaluate(ib[rows], lin, bits, cap, refine)[1]
        return self.certify_subset(mb, ib[rows]), mb

    def _load(self, margin_bound: Tensor, idx: Tensor) -> Tensor:
        """Per input, the largest ratio of a margin's bound to the margin (below 1: certified)."""
        logits, pred = self.logits[idx], self.pred[idx][:, None]
        margin = logits.gather(1, pred) - logits
        ratio = torch.where(margin > 0, margin_bound / margin, torch.full_like(margin, float("inf")))
        return ratio.scatter(1, pred, 0.0).amax(1)

    def certify_subset(self, margin_bound: Tensor, idx: Tensor) -> Tensor:
        """Certified flags (prediction provably kept) of the inputs ``idx`` given their margin bounds."""
        return certified_from_margin_bounds(self.logits[idx], margin_bound)

    def certify(self, margin_bound: Tensor) -> tuple[float, Tensor]:
        """Certified accuracy (correct and provably kept) and the certified flags."""
        cert = certified_from_margin_bounds(self.logits, margin_bound)
        return float((self.correct & cert).double().mean()), cert

    @property
    def clean_accuracy(self) -> float:
        return float(self.correct.double().mean())

    def stored_bits(self, bits: int | Mapping[int, int]) -> int:
        """Bits to store the weight codes plus their float32 scales (and zero points)."""
        total = 0
        for i, b in self.layer_bits(bits).items():
            w = self.net.nodes[i].affine.weight
            n_scale = w.shape[0] if self.spec.per_channel else 1
            total += w.numel() * b + n_scale * (32 + (0 if self.spec.symmetric else b))
        return total

    @property
    def float_bits(self) -> int:
        return sum(self.net.nodes[i].affine.weight.numel() * 32 for i in self.layers)
