"""Predicted quantization error: rounding as a bounded Byzantine perturbation (theory 3.1, 4, 5).

Round-to-nearest integer quantization of a weight ``w`` with scale ``s`` (per tensor or per output
channel, symmetric or with an integer zero point) changes it by at most ``s / 2``; quantizing an
activation with scale ``s`` and clip range ``[s*qmin, s*qmax]`` changes it by at most
``s / 2 + (distance of the nominal value beyond the clip range)``. Every such change is a
Byzantine perturbation of a synapse (or neuron output) of bounded size, so the weight-perturbation
bounds of :mod:`hwrel.bounds.perturb` bound the output change. The scales are computed exactly as
Brevitas computes them (:class:`hwrel.formats.IntStorage` reproduces Brevitas' weight quantizers
to one float32 ulp; activation scales are max-calibrated, see :mod:`hwrel.quantize.brevitas_ptq`).

:class:`Predictor` caches what every bit width shares (float64 network, nominal values of the test
inputs, calibrated activation ranges) so a sweep over 2..16 bits costs one bound pass per width.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping

import torch
from torch import Tensor

from hwrel.bounds.certify import certified_from_bounds, check_data
from hwrel.bounds.ibp import interval_bounds, sup_abs
from hwrel.bounds.perturb import WeightPerturbation, paper_perturbation, perturbation_radii
from hwrel.errors import HwrelError, check
from hwrel.formats import IntFormat, IntStorage
from hwrel.network import Network

BITS = tuple(range(2, 17))
_PAD_REL = 2.0 ** -20  # the dequantized value is computed in float32: absorb its rounding
_CHUNK = 1024


@dataclass(frozen=True)
class QuantSpec:
    """How weights (and optionally activations) are quantized.

    ``per_channel``: one scale per output channel (else per tensor). ``symmetric``: signed codes
    with zero point 0 and ``scale = max|w| / (2^(b-1) - 1)``; else unsigned codes over
    ``[min(w, 0), max(w, 0)]`` with an integer zero point (Brevitas' ``ShiftedUint8`` quantizers).
    ``act_bits``: ``None`` (float activations), an int (fixed width) or ``"same"`` (the weight width)
    for the outputs of the hidden activations; max-calibrated per-tensor scales, unsigned when the
    activation is non-negative.
    """

    per_channel: bool = False
    symmetric: bool = True
    act_bits: int | str | None = None

    def __post_init__(self) -> None:
        a = self.act_bits
        check(a is None or a == "same" or (isinstance(a, int) and not isinstance(a, bool) and 2 <= a <= 16),
              f"act_bits must be None, 'same' or an integer in 2..16, got {a!r}")

    def act_width(self, bits: int) -> int | None:
        return bits if self.act_bits == "same" else self.act_bits  # type: ignore[return-value]

    @property
    def label(self) -> str:
        w = f"{'per-channel' if self.per_channel else 'per-tensor'} {'symmetric' if self.symmetric else 'asymmetric'}"
        return w + ("" if self.act_bits is None else f", activations {self.act_bits}")


def check_bits(bits: int) -> int:
    check(isinstance(bits, int) and not isinstance(bits, bool) and 2 <= bits <= 16,
          f"bit width {bits!r} not supported: use 2..16")
    return bits


def weight_storage(w: Tensor, bits: int, spec: QuantSpec) -> IntStorage:
    """The integer storage Brevitas produces for ``w`` at ``bits`` (round to nearest)."""
    return IntStorage.from_float(w, IntFormat(check_bits(bits), signed=spec.symmetric),
                                 per_channel=spec.per_channel, symmetric=spec.symmetric)


def weight_radius(w: Tensor, bits: int, spec: QuantSpec) -> Tensor:
    """Sound elementwise bound ``R >= |Q(w) - w|`` (float64): half a step, zero for zero weights."""
    st = weight_storage(w, bits, spec)
    s = st._bcast(st.scale).to(torch.float64).expand_as(w)
    w64 = w.to(torch.float64)
    r = s / 2 * (1 + _PAD_REL) + _PAD_REL * (w64.abs() + s)
    return torch.where(w64 == 0, torch.zeros_like(r), r)  # 0 maps to code 0 (or the zero point) exactly


def act_radius(lo: Tensor, hi: Tensor, scale: float, clip_lo: float, clip_hi: float) -> Tensor:
    """``s/2`` plus how far the nominal range ``[lo, hi]`` reaches beyond the clip range.

    Sound: ``|Q(y~) - y| <= |Q(z) - z| + |clamp(y~) - clamp(y)| + |clamp(y) - y|`` with
    ``z = clamp(y~)``; the first term is at most ``s/2``, the second at most ``|y~ - y|`` (already
    propagated), the third the excess of ``y`` beyond the clip range.
    """
    excess = torch.clamp(hi - clip_hi, min=0) + torch.clamp(clip_lo - lo, min=0)
    return (scale / 2 + excess) * (1 + _PAD_REL)


class Predictor:
    """Bounds, certificates and per-layer radii for one network, test set and quantization spec.

    ``act_quant(layer_bits)`` gives, for weight widths per synapse node, the calibrated activation
    quantizers ``(scale, clip_lo, clip_hi)`` of each hidden activation in order (read from the
    Brevitas model that :func:`hwrel.quantize.ptq` calibrates, so prediction and deployment share
    their scales).
    """

    def __init__(self, net: Network, spec: QuantSpec, x: Tensor | None = None, y: Tensor | None = None,
                 act_quant: Callable[[dict[int, int]], list[tuple[float, float, float]]] | None = None):
        self.net = net.to(torch.float64)
        self.spec = spec
        self.layers = tuple(self.net.synapse_layers)
        self.acts = tuple(self.net.layers)
        self.x = self.y = None
        if x is not None:
            check_data(net, x, y)
            x64 = x.to(torch.float64)
            if bool(((x64 < self.net.input_lo - 1e-12) | (x64 > self.net.input_hi + 1e-12)).any()):
                raise HwrelError("some inputs lie outside the model's input_domain; widen input_domain")
            self.x, self.y = x64, y
            with torch.no_grad():
                values = [self.net.forward_all(x64[i:i + _CHUNK]) for i in range(0, len(x64), _CHUNK)]
            # nominal value of every node for every test input
            self.all_values = [torch.cat([v[k] for v in values]) for k in range(len(self.net.nodes))]
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
        wr = {i: weight_radius(self.net.nodes[i].affine.weight, b, self.spec) for i, b in lb.items()}
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
        """Sound per-test-input, per-output bounds ``(N, n_out)`` (interval at the point, capped).

        ``idx``: only these test inputs (rows in that order); the bound of an input does not depend
        on which others are evaluated with it.
        """
        if self.x is None:
            raise HwrelError("per-input certificates need data")
        if idx is None:
            idx = torch.arange(len(self.x))
        out = []
        for s in range(0, len(idx), _CHUNK):
            ib = idx[s:s + _CHUNK]
            xb = self.x[ib]
            vals = [v[ib] for v in self.all_values]
            nominal = (vals, vals)
            p = self.perturbation(bits, nominal)
            e = perturbation_radii(self.net, p, xb, xb, "interval", nominal)[-1].flatten(1)
            out.append(torch.clamp(e, max=cap))
        if not out:
            return torch.zeros(0, self.logits.shape[1], dtype=self.logits.dtype)
        return torch.cat(out)

    def certify_subset(self, bound: Tensor, idx: Tensor) -> Tensor:
        """Certified flags (prediction provably kept) of the inputs ``idx`` given their bounds."""
        return certified_from_bounds(self.logits[idx], bound)[1]

    def certify(self, bound: Tensor) -> tuple[float, Tensor]:
        """Certified accuracy (correct and provably kept) and the certified flags."""
        _, cert = certified_from_bounds(self.logits, bound)
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
