"""Post-training quantization with Brevitas, for verification (and for ``hwrel inject --format``).

:func:`ptq` rebuilds the model layer by layer: batch norm is folded into the Linear/Conv2d before
it, every Linear/Conv2d becomes a ``QuantLinear``/``QuantConv2d`` with round-to-nearest weights
(float bias, no input/output quantizers, so :meth:`hwrel.Network.from_module` reads it exactly), and
with ``act_bits`` every hidden activation's output is quantized by a max-calibrated per-tensor
quantizer. Weight scales are computed from the weights (Brevitas' ``Int8WeightPer*Float`` and
``ShiftedUint8WeightPer*Float`` with the bit width overridden), activation scales from calibration
batches under ``calibration_mode``. The user's model is deep-copied, never changed. An already-quantized Brevitas
model is first :func:`dequantize`-d: its QuantLinear/QuantConv2d become float layers holding the
weights it computes with, re-quantized at the asked widths; its own activation quantizers stay.
"""
from __future__ import annotations

import copy
import warnings
from typing import Mapping

import torch
import torch.fx as fx
from torch import Tensor, nn

from hwrel.errors import HwrelError, UnsupportedLayerError, check

# Brevitas says on import that an optional CUDA kernel is missing; hwrel never uses it, and the
# line on every bitwidth / report run reads like a fault.
warnings.filterwarnings("ignore", message="fast_hadamard_transform package not found")

_PASS = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Flatten, nn.MaxPool2d, nn.AvgPool2d,
         nn.AdaptiveAvgPool2d)
_ACTS = (nn.ReLU, nn.Sigmoid, nn.Tanh, nn.ReLU6, nn.Hardtanh, nn.Hardsigmoid, nn.LeakyReLU, nn.Hardswish,
         nn.GELU, nn.SiLU, nn.Mish)
# outputs below zero: their activation quantizer is signed
_SIGNED_ACTS = (nn.Tanh, nn.Hardtanh, nn.LeakyReLU, nn.Hardswish, nn.GELU, nn.SiLU, nn.Mish)


def _quantizers(per_channel: bool, symmetric: bool):
    from brevitas.core.stats import StatsOp
    from brevitas.quant.scaled_int import (Int8ActPerTensorFloat, Int8WeightPerChannelFloat,
                                           Int8WeightPerTensorFloat, Uint8ActPerTensorFloat)
    from brevitas.quant.shifted_scaled_int import (ShiftedUint8WeightPerChannelFloat,
                                                   ShiftedUint8WeightPerTensorFloat)

    class UintActMax(Uint8ActPerTensorFloat):
        scaling_stats_op = StatsOp.MAX

    class IntActMax(Int8ActPerTensorFloat):
        scaling_stats_op = StatsOp.MAX

    if symmetric:
        w = Int8WeightPerChannelFloat if per_channel else Int8WeightPerTensorFloat
    else:
        w = ShiftedUint8WeightPerChannelFloat if per_channel else ShiftedUint8WeightPerTensorFloat
    return w, UintActMax, IntActMax


def _fold(aff: nn.Module, bn: nn.Module) -> tuple[Tensor, Tensor]:
    w = aff.weight.detach().double()
    b = aff.bias.detach().double() if aff.bias is not None else torch.zeros(w.shape[0], dtype=torch.float64)
    inv = (bn.weight.detach().double() if bn.affine else 1.0) / torch.sqrt(bn.running_var.double() + bn.eps)
    beta = bn.bias.detach().double() if bn.affine else 0.0
    w = w * inv.reshape(-1, *([1] * (w.dim() - 1)))
    return w.float(), ((b - bn.running_mean.double()) * inv + beta).float()


def _set(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, new)


def _brevitas_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The model's Brevitas QuantLinear/QuantConv2d layers with quantized weights, by name."""
    import sys

    if "brevitas" not in sys.modules:  # a model with Brevitas layers was built with brevitas imported
        return {}
    import brevitas.nn as qnn

    return {n: m for n, m in model.named_modules() if isinstance(m, (qnn.QuantLinear, qnn.QuantConv2d))
            and getattr(m, "is_weight_quant_enabled", True)}


def quantized_widths(model: nn.Module) -> dict[str, str]:
    """Per Brevitas weight-quantized layer of an already-quantized model: its storage (``int4``)."""
    out = {}
    for n, m in _brevitas_layers(model).items():
        with torch.no_grad():
            qw = m.quant_weight()
        out[n] = f"{'int' if bool(qw.signed) else 'uint'}{int(qw.bit_width)}"
    return out


def already_quantized_note(model: nn.Module) -> str | None:
    """One line on what the bit-width sweep does with an already-quantized (Brevitas) model, or None."""
    widths = quantized_widths(model)
    if not widths:
        return None
    own = ", ".join(f"{n} {w}" for n, w in widths.items())
    return (f"the model is already quantized ({own} weights): its float reference is the weights it computes "
            "with (batch norm folded in), re-quantized at each width; its own activation quantizers are kept")


def dequantize(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every Brevitas QuantLinear/QuantConv2d replaced by a float
    Linear/Conv2d holding the weights it computes with (``scale * (code - zero_point)``, exactly);
    Brevitas activation quantizers are kept. The model itself is not changed."""
    q = _brevitas_layers(model)
    if not q:
        return model
    out = copy.deepcopy(model).eval()
    for name, m in q.items():
        with torch.no_grad():
            w = m.quant_weight().value.detach().clone().float()
        if isinstance(m, nn.Linear):
            f: nn.Module = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None)
        else:
            f = nn.Conv2d(m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding, m.dilation,
                          m.groups, bias=m.bias is not None, padding_mode=m.padding_mode)
        with torch.no_grad():
            f.weight.copy_(w)
            if m.bias is not None:
                f.bias.copy_(m.bias.detach().float())
        _set(out, name, f.eval())
    return out


class _Tracer(fx.Tracer):
    """Brevitas modules stay leaves (tracing into them fails on their quantized tensors)."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return type(m).__module__.startswith("brevitas.") or super().is_leaf_module(m, qualname)


def _quant_acts() -> tuple[type, ...]:
    import brevitas.nn as qnn

    return (qnn.QuantReLU, qnn.QuantIdentity)


def _quant_affine(m: nn.Module, weight: Tensor, bias: Tensor | None, wq, bits: int) -> nn.Module:
    import brevitas.nn as qnn

    kw = dict(bias=bias is not None, weight_quant=wq, weight_bit_width=bits, return_quant_tensor=False)
    if isinstance(m, nn.Linear):
        q = qnn.QuantLinear(m.in_features, m.out_features, **kw)
    else:
        q = qnn.QuantConv2d(m.in_channels, m.out_channels, m.kernel_size, stride=m.stride, padding=m.padding,
                            dilation=m.dilation, groups=m.groups, **kw)
    with torch.no_grad():
        q.weight.copy_(weight)
        if bias is not None:
            q.bias.copy_(bias)
    return q


def ptq(model: nn.Module, calib_inputs: Tensor | None, bits: int | Mapping[str, int], *, per_channel: bool = False,
        symmetric: bool = True, act_bits: int | None = None, batch_size: int = 256) -> nn.Module:
    """Brevitas post-training quantization of ``model`` (a new module in eval mode).

    ``bits``: weight width for every Linear/Conv2d, or a mapping from layer name (as in
    ``model.named_modules()``) to width. ``act_bits``: quantize each activation's output (needs
    ``calib_inputs``). Raises :class:`UnsupportedLayerError` naming the first layer it cannot quantize.
    """
    import brevitas.nn as qnn
    from brevitas.graph.calibrate import calibration_mode

    check(isinstance(model, nn.Module), f"expected an nn.Module, got {type(model).__name__}")
    wq, uact, iact = _quantizers(per_channel, symmetric)
    model = dequantize(model)  # an already-quantized model: the weights it computes with, in float
    try:
        root = copy.deepcopy(model).eval()
        gm = fx.GraphModule(root, _Tracer().trace(root))
    except Exception as exc:
        raise HwrelError(f"cannot trace {type(model).__name__} for quantization: {str(exc).splitlines()[0]}") from None
    modules = dict(gm.named_modules())
    affine_names = [n for n, m in modules.items() if isinstance(m, (nn.Linear, nn.Conv2d))]

    def width(name: str) -> int:
        b = bits.get(name) if isinstance(bits, Mapping) else bits
        check(isinstance(b, int) and not isinstance(b, bool) and 2 <= b <= 16,
              f"layer {name}: weight bit width {b!r} not supported (use 2..16)")
        return b

    if isinstance(bits, Mapping):
        unknown = set(bits) - set(affine_names)
        check(not unknown, f"bit widths given for unknown layer(s) {sorted(unknown)}; layers: {affine_names}")
    folded: dict[str, nn.Module] = {}
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        m = modules[node.target]
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            src = node.args[0]
            ok = (isinstance(src, fx.Node) and src.op == "call_module" and len(src.users) == 1
                  and isinstance(modules[src.target], (nn.Linear, nn.Conv2d)) and m.running_mean is not None)
            if not ok:
                raise UnsupportedLayerError(f"layer {node.target} ({type(m).__name__}): batch norm must directly "
                                            "follow a Linear/Conv2d used nowhere else to be folded before quantization")
            folded[src.target] = m
        elif not isinstance(m, (nn.Linear, nn.Conv2d) + _PASS + _ACTS + _quant_acts()):
            raise UnsupportedLayerError(f"layer {node.target} ({type(m).__module__}.{type(m).__name__}) cannot be "
                                        "quantized by hwrel's Brevitas post-training quantization")
    check(bool(affine_names), "model has no Linear or Conv2d layer to quantize")
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        name, m = node.target, modules[node.target]
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            if isinstance(m, nn.Conv2d) and (m.padding_mode != "zeros" or isinstance(m.padding, str)):
                raise UnsupportedLayerError(f"layer {name} (Conv2d): padding {m.padding!r}/{m.padding_mode} "
                                            "cannot be quantized; use integer zero padding")
            if name in folded:
                w, b = _fold(m, folded[name])
            else:
                w, b = m.weight.detach(), None if m.bias is None else m.bias.detach()
            _set(gm, name, _quant_affine(m, w, b, wq, width(name)))
        elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            _set(gm, name, nn.Identity())
        elif isinstance(m, _ACTS) and act_bits is not None:
            check(isinstance(act_bits, int) and 2 <= act_bits <= 16, f"act_bits {act_bits!r} not in 2..16")
            if isinstance(m, nn.ReLU):
                new: nn.Module = qnn.QuantReLU(act_quant=uact, bit_width=act_bits, return_quant_tensor=False)
            else:
                signed = isinstance(m, _SIGNED_ACTS)
                new = nn.Sequential(m, qnn.QuantIdentity(act_quant=iact if signed else uact, bit_width=act_bits,
                                                         return_quant_tensor=False))
            _set(gm, name, new)
    gm.recompile()
    gm.eval()
    if act_bits is not None:
        check(calib_inputs is not None and len(calib_inputs) > 0, "activation quantization needs calibration inputs")
        with torch.no_grad(), calibration_mode(gm), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for i in range(0, len(calib_inputs), batch_size):
                gm(calib_inputs[i:i + batch_size].float())
        gm.eval()
    return gm


def qat(qmodel: nn.Module, x: Tensor, y: Tensor, *, epochs: int = 1, lr: float = 1e-4, batch_size: int = 64,
        seed: int = 0) -> nn.Module:
    """Quantization-aware fine-tuning of a :func:`ptq` model (straight-through estimator), a new module."""
    q = copy.deepcopy(qmodel).train()
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam([p for p in q.parameters() if p.requires_grad], lr=lr)
    loss_fn = nn.CrossEntropyLoss()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(epochs):
            perm = torch.randperm(len(x), generator=g)
            for i in range(0, len(x), batch_size):
                idx = perm[i:i + batch_size]
                opt.zero_grad(set_to_none=True)
                loss_fn(q(x[idx].float()), y[idx]).backward()
                opt.step()
    return q.eval()


@torch.no_grad()
def forward(model: nn.Module, x: Tensor, batch_size: int = 1000) -> Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.cat([model(x[i:i + batch_size].float()) for i in range(0, len(x), batch_size)])
