"""Extraction of ``torch.export`` programs (``.pt2`` files) into a :class:`hwrel.network.Network`.

An exported program's module is an fx graph of aten calls with weights as attributes. Each call is
turned into the equivalent ``nn`` module and handled by the same rules as a traced module
(:mod:`hwrel.extract`), so both paths give the same network.
"""
from __future__ import annotations

import math
import operator
from typing import Any

import torch
import torch.fx as fx
from torch import Tensor, nn

from hwrel.errors import HwrelError, UnsupportedLayerError
from hwrel.extract import _Builder, _finish, _module_node
from hwrel.network import Network


def _fetch(gm: nn.Module, target: str) -> Any:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def guess_exported_shape(gm: fx.GraphModule) -> tuple[int, ...]:
    for n in gm.graph.nodes:
        if n.op == "call_function" and n.target is torch.ops.aten.conv2d.default:
            raise HwrelError("input_shape is required for a convolutional model (e.g. input_shape=(1, 28, 28))")
        if n.op == "call_function" and n.target is torch.ops.aten.linear.default:
            w = n.args[1]
            val = w.meta.get("val") if w.op != "get_attr" else _fetch(gm, w.target)
            return (int(val.shape[1]),)
    raise HwrelError("input_shape is required: the model has no linear layer to infer it from")


class _Shim:
    """The parts of an fx node that the module rules read."""

    def __init__(self, node: fx.Node, src: fx.Node):
        self.target = node.name
        self.args = (src,)


def _aten_module(gm: fx.GraphModule, n: fx.Node, consts: dict[fx.Node, Any]) -> tuple[nn.Module | None, fx.Node]:
    aten = torch.ops.aten
    t = n.target
    a = list(n.args)
    src = a[0]

    def attr(i: int, default: Any = None) -> Any:
        if i >= len(a) or a[i] is None:
            return default
        if isinstance(a[i], fx.Node):
            if a[i] not in consts:
                raise UnsupportedLayerError(f"operation {n.name} ({t}): argument {a[i].name} depends on the input")
            return consts[a[i]]
        return a[i]

    with torch.no_grad():
        if t is aten.linear.default:
            w, b = attr(1), attr(2)
            m = nn.Linear(w.shape[1], w.shape[0], bias=b is not None)
            m.weight.copy_(w)
            if b is not None:
                m.bias.copy_(b)
            return m, src
        if t is aten.conv2d.default:
            w, b = attr(1), attr(2)
            stride, padding, dilation, groups = attr(3, 1), attr(4, 0), attr(5, 1), attr(6, 1)
            m = nn.Conv2d(w.shape[1] * groups, w.shape[0], tuple(w.shape[2:]), stride, padding, dilation, groups,
                          bias=b is not None)
            m.weight.copy_(w)
            if b is not None:
                m.bias.copy_(b)
            return m, src
        if t in (aten.batch_norm.default, aten._native_batch_norm_legit_no_training.default):
            if t is aten.batch_norm.default and attr(5, False):
                raise UnsupportedLayerError(f"operation {n.name} (batch norm) was exported in training mode; "
                                            "export the model after model.eval()")
            if t is aten.batch_norm.default:
                w, b, mean, var, eps = attr(1), attr(2), attr(3), attr(4), attr(7, 1e-5)
            else:
                w, b, mean, var, eps = attr(1), attr(2), attr(3), attr(4), attr(6, 1e-5)
            cls = nn.BatchNorm2d if src.meta.get("val") is not None and src.meta["val"].dim() == 4 else nn.BatchNorm1d
            m = cls(mean.numel(), eps=float(eps), affine=w is not None).eval()
            m.running_mean.copy_(mean)
            m.running_var.copy_(var)
            if w is not None:
                m.weight.copy_(w)
                m.bias.copy_(b)
            return m, src
    if t is aten.dropout.default and attr(2, False) and attr(1, 0.0):
        raise UnsupportedLayerError(f"operation {n.name} (dropout) was exported in training mode; "
                                    "export the model after model.eval()")
    simple = {aten.relu.default: nn.ReLU, aten.sigmoid.default: nn.Sigmoid, aten.tanh.default: nn.Tanh,
              aten.hardsigmoid.default: nn.Hardsigmoid, aten.dropout.default: nn.Identity,
              aten.silu.default: nn.SiLU, aten.hardswish.default: nn.Hardswish, aten.mish.default: nn.Mish,
              aten.clone.default: nn.Identity, aten.alias.default: nn.Identity}
    if t in simple:
        return simple[t](), src
    if t is aten.gelu.default:
        approx = n.kwargs.get("approximate", n.args[1] if len(n.args) > 1 else "none")
        if approx not in ("none", "tanh"):
            raise UnsupportedLayerError(f"operation {n.name} (gelu): approximate={approx!r} is not supported")
        return nn.GELU(approximate=approx), src
    if t is aten.hardtanh.default:
        lo_, hi_ = attr(1, -1.0), attr(2, 1.0)
        return (nn.ReLU6() if (lo_, hi_) == (0.0, 6.0) else nn.Hardtanh(lo_, hi_)), src
    if t is aten.leaky_relu.default:
        return nn.LeakyReLU(attr(1, 0.01)), src
    if t is aten.max_pool2d.default:
        k = attr(1)
        return nn.MaxPool2d(k, attr(2, None) or k, attr(3, 0), attr(4, 1), ceil_mode=bool(attr(5, False))), src
    if t is aten.avg_pool2d.default:
        k = attr(1)
        return nn.AvgPool2d(k, attr(2, None) or k, attr(3, 0), bool(attr(4, False)), bool(attr(5, True)),
                            attr(6, None)), src
    if t is aten.adaptive_avg_pool2d.default:
        return nn.AdaptiveAvgPool2d(tuple(attr(1))), src
    if t is aten.flatten.using_ints:
        return nn.Flatten(attr(1, 0), attr(2, -1)), src
    return None, src


def _exported_view(n: fx.Node, val: Tensor) -> tuple[int, ...]:
    """Per-sample shape of an exported view/reshape whose first dimension must be the batch."""
    dims = list(n.args[1])
    first, rest = dims[0], dims[1:]
    batch = n.args[0].meta.get("val").shape[0] if n.args[0].meta.get("val") is not None else None
    keeps = isinstance(first, torch.SymInt) or (batch is not None and first == batch) or (
        first == -1 and -1 not in rest and math.prod(rest) == val[0].numel())
    if not keeps or any(not isinstance(d, int) for d in rest) or rest.count(-1) > 1:
        raise UnsupportedLayerError(f"operation {n.name} (view/reshape to {tuple(dims)}) does not keep the batch "
                                    "as its first dimension")
    try:
        return tuple(val.reshape(1, *rest).shape[1:])
    except RuntimeError:
        raise UnsupportedLayerError(f"operation {n.name}: cannot view a {tuple(val.shape[1:])} sample as "
                                    f"{tuple(rest)}") from None


def constants(gm: fx.GraphModule) -> dict[fx.Node, Any]:
    """Values of the nodes that do not depend on the input: weights (``get_attr``) and what the
    program computes from them alone, e.g. a Brevitas layer's weight quantization (``abs``, ``round``,
    ``clamp``, ``slice``, ``detach``...), evaluated once, exactly as the program would."""
    consts: dict[fx.Node, Any] = {}

    def val(a: Any) -> Any:
        return consts[a] if isinstance(a, fx.Node) else a

    for n in gm.graph.nodes:
        if n.op == "get_attr":
            consts[n] = _fetch(gm, n.target)
        elif n.op == "call_function" and n.all_input_nodes and all(a in consts for a in n.all_input_nodes):
            try:
                with torch.no_grad():
                    consts[n] = n.target(*fx.node.map_aggregate(n.args, val),
                                         **fx.node.map_aggregate(n.kwargs, val))
            except Exception:
                continue  # left to the rules below, which name it if the input needs it
    return consts


def identities() -> tuple[Any, ...]:
    """aten ops that return their input's values unchanged."""
    aten = torch.ops.aten
    return (aten.detach.default, aten.alias.default, aten.clone.default, aten.contiguous.default,
            aten.lift_fresh_copy.default)


def check_noop_slice(n: fx.Node, val: Tensor) -> None:
    if not _is_noop_slice(n, val):
        raise UnsupportedLayerError(f"operation {n.name} (aten.slice.Tensor{tuple(n.args[1:])}) drops part of "
                                    "its input; only slices that keep the whole tensor are supported")


def _is_noop_slice(n: fx.Node, val: Tensor) -> bool:
    """``aten.slice.Tensor(x, dim, start, end, step)`` that keeps all of its dimension (the batch
    dimension: any size, so ``end`` must be open)."""
    a = list(n.args) + [None] * (5 - len(n.args))
    dim, start, end, step = (0 if a[1] is None else a[1]), a[2], a[3], (1 if a[4] is None else a[4])
    if not isinstance(dim, int) or step != 1 or start not in (None, 0):
        return False
    dim %= val.dim()
    size = 2 ** 62 if dim == 0 else val.shape[dim]
    return end is None or (isinstance(end, int) and end >= size)


def extract_exported(gm: fx.GraphModule, shape: tuple[int, ...], lo: Tensor, hi: Tensor) -> Network:
    """Network of an exported program over the box ``[lo, hi]`` (already of ``shape``)."""
    aten = torch.ops.aten
    b = _Builder(shape)
    index: dict[fx.Node, int] = {}
    out = None
    consts = constants(gm)
    # shape queries give integers, not values: skipped, so that a refusal names the operation that
    # uses them (a Hugging Face model reads its input's length before its embedding)
    shape_queries = {aten.sym_size.int, aten.sym_numel.default, aten.sym_stride.int}
    skipped: set[fx.Node] = set()
    with torch.no_grad():
        for n in gm.graph.nodes:
            if n in consts:
                continue  # weights and computations on weights alone (read by their users)
            if n.op == "call_function" and n.target in shape_queries:
                skipped.add(n)
                continue
            if skipped and any(a in skipped for a in n.all_input_nodes):
                raise UnsupportedLayerError(f"operation {n.name} ({n.target}) on a dynamic size is not supported")
            if n.op == "placeholder":
                if any(v.op == "input" for v in b.nodes):
                    raise UnsupportedLayerError(f"model has several inputs ({n.name}); hwrel analyses one input")
                index[n] = b.add("input", "input", ())
            elif n.op in ("get_attr", "call_module"):
                continue  # weights (read by their users) and export's input guards
            elif n.op == "output":
                arg = n.args[0]
                arg = arg[0] if isinstance(arg, (tuple, list)) else arg
                out = index[arg]
            elif n.target in (aten.add.Tensor,):
                ins = tuple(index[x] for x in n.args if isinstance(x, fx.Node))
                if len(ins) != 2 or n.kwargs.get("alpha", 1) != 1:
                    raise UnsupportedLayerError(f"operation {n.name} (aten.add): only the sum of two tensors")
                index[n] = b.add(n.name, "add", ins)
            elif n.target in (aten.view.default, aten.reshape.default):
                src = index[n.args[0]]
                index[n] = b.reshape(n.name, src, _exported_view(n, b.values[src]))
            elif n.target in identities():
                index[n] = index[n.args[0]]  # the identity on values
            elif n.target is aten.slice.Tensor:
                check_noop_slice(n, b.values[index[n.args[0]]])
                index[n] = index[n.args[0]]
            elif n.target is operator.getitem:
                if n.args[1] != 0 or n.args[0].target is not aten._native_batch_norm_legit_no_training.default:
                    raise UnsupportedLayerError(f"operation {n.name} (getitem {n.args[1]!r}) is not supported")
                index[n] = index[n.args[0]]  # first output of batch norm variants
            else:
                module, src = _aten_module(gm, n, consts)
                if module is None:
                    raise UnsupportedLayerError(f"operation {n.name} ({n.target}) is not supported")
                index[n] = _module_node(b, _Shim(n, src), module, index)  # type: ignore[arg-type]
    if out is None:
        raise UnsupportedLayerError("exported program has no output")
    return _finish(b.nodes[: out + 1], shape, lo, hi)
