"""torch.export's ATen graphs (Hugging Face folders, ``.pt2`` files) as module-level fx graphs, so
the rules of :mod:`hwrel.bounds.graph` read them.

Each ATen operation on a bounded value is replaced by the torch function that computes exactly it
(``aten.linear`` -> ``F.linear``, ``aten.addmm`` -> ``torch.addmm``, ``aten.slice.Tensor`` -> basic indexing, ``aten.view`` -> the
``view`` method, ...), so the translated graph's forward equals the exported program's bit for bit
(tested). Metadata assertions and export guards, which compute nothing, are dropped. Operations
outside the table stay as they are: on constants they run as before; on a bounded value the
interpreter refuses them in one line naming the node and the operation.
"""
from __future__ import annotations

import copy
import operator
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F

aten = torch.ops.aten

_FUNCTIONS: dict[Any, Any] = {
    aten.linear.default: F.linear, aten.mul.Tensor: torch.mul, aten.add.Tensor: torch.add,
    aten.sub.Tensor: torch.sub, aten.neg.default: torch.neg, aten.div.Tensor: torch.div,
    aten.unsqueeze.default: torch.unsqueeze, aten.squeeze.dim: torch.squeeze, aten.cat.default: torch.cat,
    aten.transpose.int: torch.transpose, aten.permute.default: torch.permute,
    aten.pow.Tensor_Scalar: torch.pow, aten.rsqrt.default: torch.rsqrt, aten.mean.dim: torch.mean,
    aten.matmul.default: torch.matmul, aten.bmm.default: torch.bmm, aten.mm.default: torch.mm,
    aten.addmm.default: torch.addmm,  # GPT-2's Conv1D: bias + x @ W, W stored (in, out)
    aten.scaled_dot_product_attention.default: F.scaled_dot_product_attention,
    aten.silu.default: F.silu, aten.gelu.default: F.gelu, aten.relu.default: F.relu, aten.tanh.default: torch.tanh,
    aten.sigmoid.default: torch.sigmoid, aten.softmax.int: torch.softmax,
    aten.flatten.using_ints: torch.flatten, aten.split.Tensor: torch.split,
    aten.split_with_sizes.default: torch.split, aten.chunk.default: torch.chunk, aten.unbind.int: torch.unbind,
}
_METHODS = {aten.view.default: "reshape",  # the same values; bounds may not share the layout
             aten.reshape.default: "reshape", aten.expand.default: "expand",
            aten.clone.default: "clone", aten.contiguous.default: "contiguous", aten.alias.default: "detach",
            aten.detach.default: "detach"}
_DROP = {aten._assert_tensor_metadata.default}


def is_aten(gm: fx.GraphModule) -> bool:
    return any(n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload) for n in gm.graph.nodes)


def _slice_index(dim: int, start: Any, end: Any, step: Any) -> tuple:
    s = slice(start, end, step)
    if dim < 0:
        return (Ellipsis, s) + (slice(None),) * (-dim - 1)
    return (slice(None),) * dim + (s,)


def from_aten(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of the exported module with its graph rewritten (see the module doc); ``gm`` unchanged."""
    out = copy.deepcopy(gm)
    g = out.graph
    for n in list(g.nodes):
        t = n.target
        if n.op == "call_module" and str(t).startswith("_guards_fn") and not n.users:
            g.erase_node(n)
            continue
        if n.op != "call_function":
            continue
        if t in _DROP and not n.users:
            g.erase_node(n)
        elif t in _FUNCTIONS:
            n.target = _FUNCTIONS[t]
        elif t in _METHODS:
            n.op, n.target = "call_method", _METHODS[t]
        elif t is aten.slice.Tensor:
            a = list(n.args) + [0, None, None, 1][len(n.args) - 1:]
            x, dim, start, end, step = a[:5]
            n.target, n.args, n.kwargs = operator.getitem, (x, _slice_index(int(dim), start, end, step)), {}
        elif t is aten.select.int:
            x, dim, index = n.args
            n.target, n.args = operator.getitem, (x, (slice(None),) * int(dim) + (int(index),))
        elif t is aten.layer_norm.default:  # (input, shape, weight, bias, eps, cudnn_enable)
            n.target, n.args = F.layer_norm, n.args[:5]
        elif t is aten._softmax.default and not n.args[2]:
            n.target, n.args = torch.softmax, n.args[:2]
        elif t is aten._to_copy.default and set(n.kwargs) <= {"dtype"} and n.kwargs.get("dtype") is torch.float32:
            n.op, n.target, n.kwargs = "call_method", "float", {}
    g.lint()
    out.recompile()
    out._hwrel_translated = True  # already module-level: trace() returns it as it is
    return out
