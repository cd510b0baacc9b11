"""Where a model's parameters live on an accelerator, and in which bits.

:func:`map_model` stores every affine layer's weight and bias in one of the accelerator's
weight-holding memories, in a storage format the accelerator supports, and returns the exact
stored representation (codes and scale, or rounded floats) that soft errors hit. The deployed
model computes with exactly these values (:meth:`ModelMapping.deployed`), so flip arithmetic
(:mod:`hwrel.formats`) and injection agree bit for bit.

Storage rules (documented choices, not measurements):

- Integer formats: weights as symmetric per-tensor codes (the model's own Brevitas codes and scale
  when it has some that fit the width), biases as int32 with scale ``s_w * s_x`` where ``s_x`` is
  the scale of the layer's input quantized to the same width over its interval-propagated range
  (the TFLite/NVDLA convention; widened when a bias would overflow int32).
- Float formats: weights and biases rounded to the format (round to nearest even).
- Placement: each layer (weight and bias together) goes whole into the first weight memory, on-chip
  memories first in file order, with room left; ``memory=`` forces one memory for all layers or a
  ``{layer name: memory}`` table. Capacity is checked against data bits (ECC bits excluded); the
  memory is assumed free for weights (activations that share it are not subtracted).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Mapping

import pandas as pd
import torch
from torch import Tensor

from hwrel.bounds.ibp import interval_bounds, sup_abs
from hwrel.errors import HwrelError
from hwrel.formats import FloatFormat, Format, IntFormat, IntStorage, parse_format
from hwrel.network import Network
from hwrel.seu.accelerator import Accelerator, Memory

BIAS_INT = IntFormat(32)


@dataclass(frozen=True, eq=False)
class StoredTensor:
    """One parameter tensor as stored: ``values`` (float64) are what the deployed model computes.

    Integer formats: ``values = scale * (codes - zero_point)``; ``codes`` int64, ``scale`` and
    ``zero_point`` broadcastable to ``codes``. Float formats: ``codes`` is None and ``values`` are
    the format's own (rounded) values; ``scale`` is 1.
    """

    layer: str
    node: int
    part: str  # "weight" | "bias"
    fmt: Format
    values: Tensor
    codes: Tensor | None
    scale: Tensor
    zero_point: Tensor
    memory: str

    @property
    def name(self) -> str:
        return f"{self.layer}.{self.part}"

    @property
    def numel(self) -> int:
        return int(self.values.numel())

    @property
    def bits(self) -> int:
        return self.numel * self.fmt.bits


@dataclass(frozen=True, eq=False)
class ModelMapping:
    """A network's parameters placed on an accelerator (see the module docstring)."""

    accelerator: Accelerator
    fmt: Format
    tensors: tuple[StoredTensor, ...]

    def memory_bits(self) -> dict[str, int]:
        """Data bits of model parameters resident in each memory."""
        out: dict[str, int] = {}
        for t in self.tensors:
            out[t.memory] = out.get(t.memory, 0) + t.bits
        return out

    @property
    def total_bits(self) -> int:
        return sum(t.bits for t in self.tensors)

    def table(self) -> pd.DataFrame:
        """One row per stored tensor: layer, part, format, elements, bits, memory and its SER."""
        rows = []
        for t in self.tensors:
            m = self.accelerator.memory(t.memory)
            rows.append({"tensor": t.name, "layer": t.layer, "part": t.part, "format": t.fmt.name,
                         "elements": t.numel, "bits": t.bits, "memory": t.memory,
                         "off_chip": m.off_chip, "protection": m.protection.describe(),
                         "ser_fit_per_mbit": m.ser_fit_per_mbit})
        return pd.DataFrame(rows)

    def deployed(self, net: Network) -> Network:
        """``net`` (float64) computing with the stored values instead of its own weights."""
        nodes = list(net.nodes)
        for t in self.tensors:
            node = nodes[t.node]
            field = "weight" if t.part == "weight" else "bias"
            aff = replace(node.affine, **{field: t.values.to(torch.float64)})
            nodes[t.node] = replace(node, affine=aff)
        return replace(net, nodes=tuple(nodes))


def check_format(acc: Accelerator, fmt: str | Format | None) -> Format:
    """The storage format: ``fmt`` if ``acc`` supports it, else its first listed format."""
    if fmt is None:
        return parse_format(acc.formats[0])
    f = fmt if isinstance(fmt, (IntFormat, FloatFormat)) else parse_format(fmt)
    if f.name not in acc.formats:
        raise HwrelError(f"format: {acc.name} does not support {f.name} "
                         f"(supported: {', '.join(acc.formats)})")
    return f


def _weight_storage(aff, fmt: Format) -> tuple[Tensor, Tensor | None, Tensor, Tensor]:
    w = aff.weight.detach().to(torch.float64)
    if isinstance(fmt, FloatFormat):
        v = w.to(fmt.torch_dtype).to(torch.float64)
        return v, None, torch.ones((), dtype=torch.float64), torch.zeros((), dtype=torch.int64)
    fits = aff.bit_width is not None and (
        (fmt.signed and (aff.signed and aff.bit_width <= fmt.bits or aff.bit_width < fmt.bits))
        or (not fmt.signed and not aff.signed and aff.bit_width <= fmt.bits))
    if aff.codes is not None and fits:
        codes = aff.codes.to(torch.int64)
        shape = (-1, *([1] * (codes.dim() - 1)))
        scale = aff.scale.detach().to(torch.float64)
        zp = aff.zero_point.detach().round().to(torch.int64)
        scale = scale.reshape(shape) if scale.numel() > 1 else scale.reshape(())
        zp = zp.reshape(shape) if zp.numel() > 1 else zp.reshape(())
        return scale * (codes - zp).to(torch.float64), codes, scale, zp
    st = IntStorage.from_float(w, fmt)
    scale = st.scale.to(torch.float64)
    return st.dequantize().to(torch.float64), st.codes, scale, st.zero_point


def _bias_storage(bias: Tensor, fmt: Format, w_scale: Tensor, in_sup: float
                  ) -> tuple[Tensor, Tensor | None, Tensor, Tensor]:
    b = bias.detach().to(torch.float64)
    if isinstance(fmt, FloatFormat):
        v = b.to(fmt.torch_dtype).to(torch.float64)
        return v, None, torch.ones((), dtype=torch.float64), torch.zeros((), dtype=torch.int64)
    s_x = in_sup / fmt.qmax if in_sup > 0 else 1.0 / fmt.qmax
    s_b = w_scale.reshape(-1).to(torch.float64) * s_x
    if s_b.numel() not in (1, b.numel()):
        s_b = s_b.max().reshape(())
    s_b = s_b.reshape(()) if s_b.numel() == 1 else s_b
    # Widen the scale where a bias would not fit int32 (tiny weight scales, big biases).
    need = b.abs() / BIAS_INT.qmax
    s_b = torch.maximum(s_b, need) if s_b.dim() else torch.maximum(s_b, need.max())
    codes = torch.round(b / s_b).clamp(BIAS_INT.qmin, BIAS_INT.qmax).to(torch.int64)
    return s_b * codes.to(torch.float64), codes, s_b, torch.zeros((), dtype=torch.int64)


def _place(acc: Accelerator, layers: list[tuple[str, int]],
           memory: str | Mapping[str, str] | None) -> dict[str, str]:
    """Layer name -> memory name, checking capacities (``layers``: name and bits)."""
    weight_mems = [m for m in acc.memories if "weights" in m.holds]
    if not weight_mems:
        raise HwrelError(f"{acc.name}: no memory holds weights")
    ordered = [m for m in weight_mems if not m.off_chip] + [m for m in weight_mems if m.off_chip]
    by_name = {m.name: m for m in acc.memories}
    names = {n for n, _ in layers}

    def check_mem(name: str, layer: str) -> Memory:
        if name not in by_name:
            raise HwrelError(f"memory: {acc.name} has no memory {name!r} "
                             f"(weight memories: {', '.join(m.name for m in weight_mems)})")
        if "weights" not in by_name[name].holds:
            raise HwrelError(f"memory: {acc.name}.{name} does not hold weights (layer {layer})")
        return by_name[name]

    if isinstance(memory, Mapping):
        for key in memory:
            if key not in names:
                raise HwrelError(f"memory: no layer {key!r} in the model "
                                 f"(layers: {', '.join(n for n, _ in layers)})")
    used: dict[str, int] = {}
    out: dict[str, str] = {}
    for name, bits in layers:
        forced = memory.get(name) if isinstance(memory, Mapping) else memory
        if forced is not None:
            m = check_mem(forced, name)
            used[m.name] = used.get(m.name, 0) + bits
            if used[m.name] > m.bits:
                raise HwrelError(f"memory: model parameters mapped to {acc.name}.{m.name} need "
                                 f"{math.ceil(used[m.name] / 8)} bytes (up to layer {name}); it "
                                 f"holds {m.size_bytes} bytes")
            out[name] = m.name
            continue
        for m in ordered:
            if used.get(m.name, 0) + bits <= m.bits:
                used[m.name] = used.get(m.name, 0) + bits
                out[name] = m.name
                break
        else:
            total = sum(b for _, b in layers)
            cap = sum(m.size_bytes for m in weight_mems)
            raise HwrelError(f"memory: layer {name} ({math.ceil(bits / 8)} bytes) fits in no "
                             f"weight memory of {acc.name}; the model needs "
                             f"{math.ceil(total / 8)} bytes, weight memories hold {cap} bytes")
    return out


def store_parameters(net: Network, fmt: Format) -> list[StoredTensor]:
    """Every affine layer's weight and bias stored in ``fmt`` (biases int32 for integer formats),
    with no memory assigned (``memory == ""``). Exact representation, no analysis."""
    n64 = net.to()
    los, his = interval_bounds(n64, n64.input_lo[None], n64.input_hi[None], float32=False)
    out = []
    for idx in net.synapse_layers:
        node = net.nodes[idx]
        aff = node.affine
        values, codes, scale, zp = _weight_storage(aff, fmt)
        out.append(StoredTensor(node.name, idx, "weight", fmt, values, codes, scale, zp, ""))
        if aff.bias is not None:
            in_sup = float(sup_abs(los[node.inputs[0]], his[node.inputs[0]]).max())
            bf = BIAS_INT if isinstance(fmt, IntFormat) else fmt
            bv, bc, bs, bz = _bias_storage(aff.bias, fmt, scale, in_sup)
            out.append(StoredTensor(node.name, idx, "bias", bf, bv, bc, bs, bz, ""))
    return out


def map_model(net: Network, acc: Accelerator, fmt: str | Format | None = None,
              memory: str | Mapping[str, str] | None = None) -> ModelMapping:
    """Store ``net``'s parameters on ``acc`` (rules in the module docstring). Exact, no analysis.

    Raises :class:`HwrelError` for an unsupported format, an unknown memory or one that holds no
    weights, and a model larger than the memory (or memories) it is mapped to.
    """
    f = check_format(acc, fmt)
    stored = store_parameters(net, f)
    layer_bits: dict[str, int] = {}
    for t in stored:
        layer_bits[t.layer] = layer_bits.get(t.layer, 0) + t.bits
    placed = _place(acc, list(layer_bits.items()), memory)
    return ModelMapping(acc, f, tuple(replace(t, memory=placed[t.layer]) for t in stored))
