"""Turn a PyTorch or Brevitas module into a :class:`hwrel.network.Network`.

The model is traced with ``torch.fx`` (supported layers are leaves), so plain ``nn.Sequential``
models and custom modules with residual additions both work. Each traced op maps to one node by an
explicit rule table keyed by module type; anything else is an :class:`UnsupportedLayerError` that
names the module's path and type. Inference batch norm (running statistics) is folded into a float
Linear/Conv2d directly before it; anywhere else (after a quantized layer, an activation, ...) it is
its own per-channel affine node. The user's model is deep-copied and put in eval mode, never changed.
"""
from __future__ import annotations

import copy
import math
import operator
import sys
from typing import Any, Sequence

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn

from hwrel import activations as A
from hwrel.errors import HwrelError, UnsupportedLayerError
from hwrel.network import Affine, Network, Node, Pool

def _brevitas():  # noqa: ANN202
    """``brevitas.nn``, or None. A model holding Brevitas layers was built (or unpickled) with
    brevitas imported, so where it is not imported yet there is none to find and its import
    (most of a second) is skipped; kept usable if the import breaks."""
    if "brevitas" not in sys.modules:
        return None
    try:
        import brevitas.nn as qnn
    except Exception:  # pragma: no cover
        return None
    return qnn

_SKIP = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.AlphaDropout)
_LEAVES: tuple[type, ...] = (
    nn.Linear, nn.Conv2d, nn.BatchNorm1d, nn.BatchNorm2d, nn.ReLU, nn.ReLU6, nn.LeakyReLU,
    nn.Sigmoid, nn.Hardsigmoid, nn.Tanh, nn.Hardtanh, nn.GELU, nn.SiLU, nn.Hardswish, nn.Mish, nn.Flatten, nn.MaxPool2d, nn.AvgPool2d,
    nn.AdaptiveAvgPool2d,
) + _SKIP


def _quant_leaves() -> tuple[type, ...]:
    qnn = _brevitas()
    return () if qnn is None else (qnn.QuantLinear, qnn.QuantConv2d, qnn.QuantReLU, qnn.QuantIdentity)


class _Tracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if isinstance(m, _LEAVES + _quant_leaves()):
            return True
        return super().is_leaf_module(m, qualname)


def _pair(v: Any) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)  # type: ignore[return-value]


def _value(x: Any) -> Tensor:
    return x.value if hasattr(x, "value") and not isinstance(x, Tensor) else x


def _check_finite(name: str, t: Tensor | None, what: str) -> None:
    if t is not None and not torch.isfinite(t).all():
        raise HwrelError(f"layer {name}: {what} contains NaN or Inf")


def _affine_from(name: str, m: nn.Module) -> Affine:
    qnn = _brevitas()
    quant = qnn is not None and isinstance(m, (qnn.QuantLinear, qnn.QuantConv2d))
    fields: dict[str, Any] = {}
    if quant:
        for flag in ("is_input_quant_enabled", "is_output_quant_enabled", "is_bias_quant_enabled"):
            if getattr(m, flag, False):
                raise UnsupportedLayerError(
                    f"layer {name} ({type(m).__name__}): {flag.split('_')[1]} quantization inside the layer "
                    "is not supported; quantize activations with QuantReLU/QuantIdentity instead")
        with torch.no_grad():
            qw = m.quant_weight()
        weight = qw.value.detach().clone().float()
        fields = dict(codes=qw.int().detach().to(torch.int64), scale=qw.scale.detach().clone().float(),
                      zero_point=qw.zero_point.detach().clone().float(), bit_width=int(qw.bit_width),
                      signed=bool(qw.signed))
    else:
        weight = m.weight.detach().clone().float()
    bias = None if m.bias is None else m.bias.detach().clone().float()
    _check_finite(name, weight, "weight")
    _check_finite(name, bias, "bias")
    if isinstance(m, nn.Linear):
        return Affine("linear", weight, bias, **fields)
    if m.padding_mode != "zeros" or isinstance(m.padding, str):
        raise UnsupportedLayerError(f"layer {name} (Conv2d): padding {m.padding!r}/{m.padding_mode!r} not supported; "
                                    "use integer zero padding")
    return Affine("conv2d", weight, bias, _pair(m.stride), _pair(m.padding), _pair(m.dilation), m.groups, **fields)


def _fold_bn(name: str, aff: Affine, bn: nn.Module) -> Affine:
    """Fold inference batch norm into the affine before it: exact up to float rounding."""
    if aff.codes is not None:
        raise UnsupportedLayerError(f"layer {name} ({type(bn).__name__}): batch norm after a quantized layer "
                                    "cannot be folded without changing its integer codes")
    if bn.running_mean is None:
        raise UnsupportedLayerError(f"layer {name} ({type(bn).__name__}): batch norm without running statistics")
    gamma = bn.weight.detach().float() if bn.affine else torch.ones_like(bn.running_mean)
    beta = bn.bias.detach().float() if bn.affine else torch.zeros_like(bn.running_mean)
    inv = gamma / torch.sqrt(bn.running_var.float() + bn.eps)
    shape = (-1,) + (1,) * (aff.weight.dim() - 1)
    weight = aff.weight * inv.reshape(shape)
    bias = aff.bias if aff.bias is not None else torch.zeros_like(inv)
    # the model computes batch norm after the layer: its rounding is at the scale of these values
    magnitude = bias.abs() * inv.abs() + bn.running_mean.float().abs() * inv.abs() + beta.abs()
    bias = (bias - bn.running_mean.float()) * inv + beta
    _check_finite(name, weight, "folded weight")
    return Affine(aff.kind, weight, bias, aff.stride, aff.padding, aff.dilation, aff.groups, folded_bn=name,
                  fold_magnitude=magnitude)


def _batch_norm_node(b: "_Builder", n: fx.Node, m: nn.Module, name: str, src: int) -> int:
    """Inference batch norm: folded into the float Linear/Conv2d directly before it (used nowhere
    else), otherwise its own per-channel affine node (:func:`_bn_affine`): after a quantized layer
    (folding would change its integer codes), after an activation, pooling or an addition."""
    prev = b.nodes[src]
    val = b.values[src]
    two_d = isinstance(m, nn.BatchNorm2d)
    if two_d and val.dim() != 4:
        raise UnsupportedLayerError(f"layer {name} (BatchNorm2d) needs a (C, H, W) input, got {tuple(val.shape[1:])}")
    if not two_d and val.dim() != 2:
        raise UnsupportedLayerError(f"layer {name} (BatchNorm1d): normalizes dimension 1 of its input; only a "
                                    f"flat (C,) input is supported, got {tuple(val.shape[1:])}")
    if val.shape[1] != m.num_features:
        raise UnsupportedLayerError(f"layer {name} ({type(m).__name__}): {m.num_features} features but its input "
                                    f"has {val.shape[1]} channels")
    if _no_running_stats(m):
        raise UnsupportedLayerError(f"layer {name} ({type(m).__name__}): batch norm without running statistics")
    users = list(n.args[0].users)  # type: ignore[union-attr]
    if prev.op == "affine" and len(users) == 1 and not prev.affine.folded_bn and not prev.affine.batch_norm \
            and prev.affine.codes is None:
        b.replace_affine(src, _fold_bn(name, prev.affine, m))
        return src
    aff = _bn_affine(name, m)
    if two_d:
        return b.add(name, "affine", (src,), affine=aff)
    c = int(m.num_features)
    r = b.reshape(f"{name}.as_channels", src, (c, 1, 1))
    a = b.add(name, "affine", (r,), affine=aff)
    return b.reshape(f"{name}.flat", a, (c,))


def _no_running_stats(bn: nn.Module) -> bool:
    return bn.running_mean is None or bn.running_var is None


def _bn_affine(name: str, bn: nn.Module) -> Affine:
    """Inference batch norm as its own node: ``y_c = s_c x_c + t_c``, a depthwise 1x1 convolution
    (``groups = C``, weight ``(C, 1, 1, 1)``), so every bound rule, the injector and the soft-error
    analysis treat it as the affine layer it is (its ``C`` scales are its synapses, stored as
    float32). ``fold_magnitude`` carries the model's own rounding of ``(x - mean) / sqrt(var + eps)
    * gamma + beta`` (see :mod:`hwrel.bounds.fp32`)."""
    mean = bn.running_mean.detach().float()
    gamma = bn.weight.detach().float() if bn.affine else torch.ones_like(mean)
    beta = bn.bias.detach().float() if bn.affine else torch.zeros_like(mean)
    inv = gamma / torch.sqrt(bn.running_var.detach().float() + bn.eps)
    shift = beta - mean * inv
    _check_finite(name, inv, "batch norm scale")
    _check_finite(name, shift, "batch norm shift")
    magnitude = mean.abs() * inv.abs() + beta.abs()
    c = mean.numel()
    return Affine("conv2d", inv.reshape(c, 1, 1, 1).clone(), shift.clone(), groups=c, batch_norm=name,
                  fold_magnitude=magnitude)


def _activation_from(name: str, m: nn.Module) -> A.Activation | None:
    if isinstance(m, nn.ReLU):
        return A.relu()
    if isinstance(m, nn.ReLU6):
        return A.relu6()
    if isinstance(m, nn.LeakyReLU):
        if m.negative_slope < 0:
            raise UnsupportedLayerError(f"layer {name} (LeakyReLU): negative slope {m.negative_slope} "
                                        "makes it non-monotone")
        return A.leaky_relu(float(m.negative_slope))
    if isinstance(m, nn.Sigmoid):
        return A.sigmoid()
    if isinstance(m, nn.Hardsigmoid):
        return A.hardsigmoid()
    if isinstance(m, nn.Tanh):
        return A.tanh()
    if isinstance(m, nn.GELU):
        if m.approximate not in ("none", "tanh"):
            raise UnsupportedLayerError(f"layer {name} (GELU): approximate={m.approximate!r} is not supported")
        return A.gelu(m.approximate)
    if isinstance(m, nn.SiLU):
        return A.silu()
    if isinstance(m, nn.Hardswish):
        return A.hardswish()
    if isinstance(m, nn.Mish):
        return A.mish()
    if isinstance(m, nn.Hardtanh):  # also ReLU6's base, but ReLU6 matched first
        return A.hardtanh(float(m.min_val), float(m.max_val))
    qnn = _brevitas()
    if qnn is not None and isinstance(m, (qnn.QuantReLU, qnn.QuantIdentity)):
        return _quant_activation(name, m)
    return None


def _quant_activation(name: str, m: nn.Module) -> A.Activation:
    def fn(x: Tensor) -> Tensor:
        return _value(m(x))

    with torch.no_grad():
        big = torch.tensor([-1e30, 1e30])
        lo, hi = (float(v) for v in fn(big))
        try:
            step = float(m.act_quant.scale()) if hasattr(m, "act_quant") else float(m.quant_act_scale())
        except Exception:
            step = float(m.quant_act_scale())
    lip = 1.0
    return A.quantized(fn, lip, lo, hi, step)


def _function_rule(target: Any) -> str | None:
    if target in (operator.add, torch.add, operator.iadd):
        return "add"
    if target in (torch.flatten,):
        return "flatten"
    if target in (torch.relu, F.relu):
        return "relu"
    if target in (torch.sigmoid, F.sigmoid):
        return "sigmoid"
    if target in (torch.tanh, F.tanh):
        return "tanh"
    return None


class _Builder:
    def __init__(self, input_shape: tuple[int, ...]):
        self.nodes: list[Node] = []
        self.values: list[Tensor] = []  # a probe value per node, to know shapes
        self.probe = torch.zeros(1, *input_shape)

    def add(self, name: str, op: str, inputs: Sequence[int], **kw: Any) -> int:
        node = Node(name, op, tuple(inputs), (), **kw)
        if op == "input":
            val = self.probe
        else:
            if op == "add" and len({tuple(self.values[j].shape) for j in inputs}) != 1:
                shapes = " + ".join(str(tuple(self.values[j].shape[1:])) for j in inputs)
                raise UnsupportedLayerError(f"operation {name}: broadcasting addition {shapes} is not supported")
            val = node.apply([self.values[j] for j in inputs])
        return self._push(node, val)

    def reshape(self, name: str, src: int, shape: tuple[int, ...]) -> int:
        val = self.values[src].reshape(1, *shape)
        return self._push(Node(name, "reshape", (src,), tuple(val.shape[1:])), val)

    def _push(self, node: Node, val: Tensor) -> int:
        node = Node(node.name, node.op, node.inputs, tuple(val.shape[1:]), node.affine, node.act, node.pool)
        self.nodes.append(node)
        self.values.append(val)
        return len(self.nodes) - 1

    def replace_affine(self, idx: int, aff: Affine) -> None:
        node = self.nodes[idx]
        self.nodes[idx] = Node(node.name, node.op, node.inputs, node.shape, affine=aff)
        self.values[idx] = aff(self.values[node.inputs[0]])


def _guess_input_shape(model: nn.Module) -> tuple[int, ...]:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            raise HwrelError("input_shape is required for a convolutional model (e.g. input_shape=(1, 28, 28))")
        if isinstance(m, nn.Linear):
            return (m.in_features,)
    raise HwrelError("input_shape is required: the model has no Linear layer to infer it from")


def extract(model: nn.Module, input_domain: tuple[Any, Any] = (0.0, 1.0),
            input_shape: Sequence[int] | None = None) -> Network:
    """Extract the analysable network of ``model`` over the input box ``input_domain``.

    Guarantees: ``Network.forward`` equals ``model(x)`` (up to float rounding where batch norm
    was folded); the model is not modified. Raises :class:`UnsupportedLayerError` naming the
    module path and type of the first unsupported op.
    """
    if not isinstance(model, nn.Module):
        raise HwrelError(f"expected an nn.Module, got {type(model).__name__}")
    if input_shape is None and _is_exported(model):
        from hwrel.extract_export import guess_exported_shape

        input_shape = guess_exported_shape(model)
    shape = tuple(int(d) for d in input_shape) if input_shape is not None else _guess_input_shape(model)
    lo, hi = (torch.as_tensor(v, dtype=torch.float32) for v in input_domain)
    lo, hi = lo.expand(shape).clone(), hi.expand(shape).clone()
    if not (torch.isfinite(lo).all() and torch.isfinite(hi).all()) or bool((lo > hi).any()):
        raise HwrelError(f"input_domain must be finite with lo <= hi, got {input_domain}")
    if _is_exported(model):
        from hwrel.extract_export import extract_exported

        return extract_exported(model, shape, lo, hi)
    model = copy.deepcopy(model).eval()
    try:
        graph = _Tracer().trace(model)
    except Exception as exc:  # fx raises many types for dynamic control flow
        raise HwrelError(f"cannot trace {type(model).__name__} with torch.fx: {str(exc).splitlines()[0]}") from None
    modules = dict(model.named_modules())
    b = _Builder(shape)
    index: dict[fx.Node, int] = {}
    with torch.no_grad():
        for n in graph.nodes:
            if n.op == "placeholder":
                if any(v.op == "input" for v in b.nodes):
                    raise UnsupportedLayerError(f"model has several inputs ({n.name}); hwrel analyses one input")
                index[n] = b.add("input", "input", ())
            elif n.op == "output":
                arg = n.args[0]
                if not isinstance(arg, fx.Node):
                    raise UnsupportedLayerError("model output must be a single tensor")
                out = index[arg]
            elif n.op == "call_module":
                index[n] = _module_node(b, n, modules[n.target], index)
            elif n.op in ("call_function", "call_method"):
                index[n] = _function_node(b, n, index)
            else:
                raise UnsupportedLayerError(f"op {n.op} {n.target} at {n.name} is not supported")
    nodes = b.nodes[: out + 1]
    if out != len(b.nodes) - 1:
        raise UnsupportedLayerError("model output is not its last operation")
    return _finish(nodes, shape, lo, hi)


def _src(n: fx.Node, index: dict[fx.Node, int], name: str) -> int:
    args = [a for a in n.args if isinstance(a, fx.Node)]
    if len(args) != 1:
        raise UnsupportedLayerError(f"layer {name}: expected one tensor input, got {len(args)}")
    return index[args[0]]


def _module_node(b: _Builder, n: fx.Node, m: nn.Module, index: dict[fx.Node, int]) -> int:
    name = str(n.target)
    src = _src(n, index, name)
    if isinstance(m, _SKIP):
        return src
    if isinstance(m, (nn.Linear, nn.Conv2d)):
        return b.add(name, "affine", (src,), affine=_affine_from(name, m))
    if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
        return _batch_norm_node(b, n, m, name, src)
    act = _activation_from(name, m)
    if act is not None:
        return b.add(name, "act", (src,), act=act)
    if isinstance(m, nn.Flatten):
        return b.reshape(name, src, _flat_shape(name, b.values[src], m.start_dim, m.end_dim))
    if isinstance(m, (nn.MaxPool2d, nn.AvgPool2d)):
        kind = "max" if isinstance(m, nn.MaxPool2d) else "avg"
        if kind == "max" and _pair(m.dilation) != (1, 1):
            raise UnsupportedLayerError(f"layer {name} (MaxPool2d): dilation not supported")
        if kind == "max" and getattr(m, "return_indices", False):
            raise UnsupportedLayerError(f"layer {name} (MaxPool2d): return_indices=True gives two outputs")
        divisor = getattr(m, "divisor_override", None)
        if divisor is not None and (not isinstance(divisor, int) or divisor <= 0):
            raise UnsupportedLayerError(f"layer {name} (AvgPool2d): divisor_override {divisor!r} must be a "
                                        "positive integer")
        pool = Pool(kind, _pair(m.kernel_size), _pair(m.stride or m.kernel_size), _pair(m.padding),
                    bool(m.ceil_mode), bool(getattr(m, "count_include_pad", True)), divisor)
        return b.add(name, "pool", (src,), pool=pool)
    if isinstance(m, nn.AdaptiveAvgPool2d):
        h, w = b.values[src].shape[-2:]
        oh, ow = _pair(m.output_size)
        oh, ow = oh or h, ow or w
        if h % oh or w % ow:
            raise UnsupportedLayerError(f"layer {name} (AdaptiveAvgPool2d): input {h}x{w} is not a multiple "
                                        f"of the output {oh}x{ow}")
        k = (h // oh, w // ow)
        return b.add(name, "pool", (src,), pool=Pool("avg", k, k))
    raise UnsupportedLayerError(f"layer {name} ({type(m).__module__}.{type(m).__name__}) is not supported")


def _flat_shape(name: str, val: Tensor, start: Any, end: Any = -1) -> tuple[int, ...]:
    """Per-sample shape after ``flatten(start, end)``; flattening into the batch is refused."""
    if not isinstance(start, int) or not isinstance(end, int):
        raise UnsupportedLayerError(f"operation {name} (flatten): dimensions must be integers")
    if start % val.dim() == 0:
        raise UnsupportedLayerError(f"operation {name} (flatten from dimension {start}) merges the batch "
                                    "dimension; flatten from dimension 1")
    return tuple(torch.flatten(val, start, end).shape[1:])


def _view_shape(name: str, val: Tensor, dims: Sequence[Any]) -> tuple[int, ...]:
    """Per-sample shape of ``x.view(*dims)``: the first dimension must keep the batch (``x.size(0)``,
    ``x.shape[0]`` or ``-1`` with the rest covering one sample exactly); anything else is refused."""
    if not dims:
        raise UnsupportedLayerError(f"operation {name} (view/reshape) without a shape")
    first, rest = dims[0], list(dims[1:])
    if any(isinstance(d, fx.Node) or not isinstance(d, int) for d in rest):
        raise UnsupportedLayerError(f"operation {name} (view/reshape): only the batch dimension may be "
                                    "computed at run time")
    per_sample = val[0].numel()
    if isinstance(first, fx.Node):
        if not _is_batch_size(first):
            raise UnsupportedLayerError(f"operation {name} (view/reshape): first dimension {first.name} is not "
                                        "the batch size x.size(0)")
    elif first != -1 or (-1 not in rest and math.prod(rest) != per_sample):
        raise UnsupportedLayerError(f"operation {name} (view/reshape to {tuple(dims)}) does not keep the batch "
                                    "as its first dimension")
    if rest.count(-1) > 1 or (first == -1 and -1 in rest):
        raise UnsupportedLayerError(f"operation {name} (view/reshape to {tuple(dims)}): ambiguous -1")
    try:
        return tuple(val.reshape(1, *rest).shape[1:])
    except RuntimeError:
        raise UnsupportedLayerError(f"operation {name}: cannot view a {tuple(val.shape[1:])} sample as "
                                    f"{tuple(rest)}") from None


def _is_batch_size(n: fx.Node) -> bool:
    """``x.size(0)`` or ``x.shape[0]`` (or ``x.size()[0]``) of some tensor."""
    if n.op == "call_method" and n.target == "size":
        dim = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim")
        return dim == 0
    if n.op == "call_function" and n.target is operator.getitem and n.args[1] == 0:
        src = n.args[0]
        return isinstance(src, fx.Node) and (
            (src.op == "call_function" and src.target is getattr and src.args[1] == "shape")
            or (src.op == "call_method" and src.target == "size" and len(src.args) == 1))
    return False


def _function_node(b: _Builder, n: fx.Node, index: dict[fx.Node, int]) -> int:
    target = n.target
    label = getattr(target, "__name__", str(target))
    name = n.name
    if n.op == "call_method":
        tensor_args = [a for a in n.args if isinstance(a, fx.Node)]
        src = index[tensor_args[0]]
        if target in ("view", "reshape", "flatten"):
            val = b.values[src]
            if target == "flatten":
                start = n.args[1] if len(n.args) > 1 else n.kwargs.get("start_dim", 0)
                end = n.args[2] if len(n.args) > 2 else n.kwargs.get("end_dim", -1)
                return b.reshape(name, src, _flat_shape(name, val, start, end))
            dims = n.args[1:] if not isinstance(n.args[1], (tuple, list)) else n.args[1]
            return b.reshape(name, src, _view_shape(name, val, list(dims)))
        if target in ("relu", "sigmoid", "tanh") and len(tensor_args) == 1:
            return b.add(name, "act", (src,), act=getattr(A, target)())
        if target == "size" and _is_batch_size(n):
            return src  # only used as the batch dimension of a view (checked there)
        raise UnsupportedLayerError(f"operation {name} (tensor method .{target}) is not supported")
    rule = _function_rule(target)
    tensor_args = [a for a in n.args if isinstance(a, fx.Node)]
    if rule == "add":
        if len(tensor_args) != 2 or n.kwargs.get("alpha", 1) != 1:
            raise UnsupportedLayerError(f"operation {name} ({label}): only the sum of two tensors is supported")
        ins = tuple(index[a] for a in tensor_args)
        if b.values[ins[0]].shape != b.values[ins[1]].shape:
            raise UnsupportedLayerError(f"operation {name} ({label}): broadcasting addition is not supported")
        return b.add(name, "add", ins)
    if rule == "flatten":
        src = index[tensor_args[0]]
        start = n.args[1] if len(n.args) > 1 else n.kwargs.get("start_dim", 0)
        end = n.args[2] if len(n.args) > 2 else n.kwargs.get("end_dim", -1)
        return b.reshape(name, src, _flat_shape(name, b.values[src], start, end))
    if rule in ("relu", "sigmoid", "tanh") and len(tensor_args) == 1:
        return b.add(name, "act", (index[tensor_args[0]],), act=getattr(A, rule)())
    gated = {F.silu: A.silu, F.hardswish: A.hardswish, F.mish: A.mish}
    if target in gated and len(tensor_args) == 1 and not n.kwargs.get("inplace", False):
        return b.add(name, "act", (index[tensor_args[0]],), act=gated[target]())
    if target is F.gelu and len(tensor_args) == 1:
        approx = n.kwargs.get("approximate", "none")
        if approx not in ("none", "tanh"):
            raise UnsupportedLayerError(f"operation {name} (gelu): approximate={approx!r} is not supported")
        return b.add(name, "act", (index[tensor_args[0]],), act=A.gelu(approx))
    if target is getattr and n.args[1] == "shape" and all(_is_batch_size(u) for u in n.users):
        return index[tensor_args[0]]  # x.shape[0] as a view's batch dimension (checked there)
    if target is operator.getitem and _is_batch_size(n):
        return index[tensor_args[0]]
    raise UnsupportedLayerError(f"operation {name} ({label}) is not supported")


def _is_exported(model: nn.Module) -> bool:
    """An fx graph of aten calls: what ``torch.export.load(path).module()`` returns."""
    if not isinstance(model, fx.GraphModule):
        return False
    return any(n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload) for n in model.graph.nodes)


def _finish(nodes: list[Node], shape: tuple[int, ...], lo: Tensor, hi: Tensor) -> Network:
    if nodes[0].op != "input":
        raise UnsupportedLayerError("model does not start from its input")
    n = len(nodes)
    after_affine = [False] * n
    for i, node in enumerate(nodes):
        after_affine[i] = node.op == "affine" or any(after_affine[j] or nodes[j].op == "affine" for j in node.inputs)
    before_affine = [False] * n
    for i in range(n - 1, -1, -1):
        for j in nodes[i].inputs:
            if nodes[i].op == "affine" or before_affine[i]:
                before_affine[j] = True
    layers = tuple(i for i, node in enumerate(nodes)
                   if node.op == "act" and after_affine[i] and before_affine[i])
    synapses = tuple(i for i, node in enumerate(nodes) if node.op == "affine")
    if not synapses:
        raise UnsupportedLayerError("model has no Linear or Conv2d layer")
    return Network(tuple(nodes), shape, lo, hi, layers, synapses)

