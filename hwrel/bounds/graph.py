"""Sound neuron-failure bounds on general graphs: ViTs, LLaMA-style LMs, anything ``torch.fx`` traces
into the operations of :mod:`hwrel.bounds.graph_rules`.

:class:`hwrel.network.Network` covers MLPs and CNNs; the models people deploy add LayerNorm,
RMSNorm, softmax, attention, embeddings, products of two activations and index shuffles
(reshape, permute, slicing, ``cat``). This module interprets the model's ``torch.fx`` graph on
bounds instead of tensors: every node gets a :class:`~hwrel.bounds.graph_rules.Val` (the clean
interval over the input box, and how far the faulty forward can be from the clean one). Values
that do not depend on the input (position tables, masks, shapes, token embeddings of fixed ids)
are computed by running the operation itself.

Convolutions: ``nn.Conv2d`` and ``nn.Conv1d`` / ``F.conv1d`` (the 1-D one as the 2-D one on
``(B, C, 1, T)``: the same dot products, so the same interval, ``|W|`` error map and rounding),
``nn.MaxPool1d`` / ``F.max_pool1d``.

Fault model (the paper's, on this graph): the *layers* are the activation nodes (GELU, ReLU, SiLU,
... modules or functions), in graph order; ``failures[l]`` elements of layer ``l``'s output (any of
them, per sample) crash to 0 or turn Byzantine (``|value| <= capacity``). ``nn.MultiheadAttention``,
``nn.TransformerEncoderLayer`` and ``nn.TransformerEncoder`` are traced as the operations they compute
(:mod:`hwrel.bounds.graph_modules`); an encoder layer's activation is the layer
``<path>.activation``. The bound on each output
coordinate is **sound**: it holds for every input in the box, every choice of the failed elements
and in the model's float32 forward (see :mod:`hwrel.bounds.graph_rules` for each rule's argument and
the rounding assumptions). Checked against exact injection in ``tests/test_graph_bounds.py``.

The paper's Fep itself does not apply to these graphs: a LayerNorm has no Lipschitz constant
independent of its input's spread, and a product of two activations none on an unbounded domain;
the bounds here are domain-aware instead.
"""
from __future__ import annotations

import math
import operator
import weakref
from dataclasses import dataclass, replace
from typing import Any, Callable, Sequence

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn

from hwrel import activations as A
from hwrel.bounds import graph_modules as M
from hwrel.bounds import graph_rules as R
from hwrel.bounds.faults import FaultModel, as_fault
from hwrel.bounds.fp32 import _abs_map, local_rounding
from hwrel.bounds.ibp import affine_interval
from hwrel.bounds.interval import affine_topsum
from hwrel.errors import HwrelError, UnsupportedLayerError
from hwrel.network import Affine, Node

_PASS = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d)
_INDEX_METHODS = {"reshape", "view", "permute", "transpose", "flatten", "unsqueeze", "squeeze", "contiguous",
                  "expand", "unflatten", "chunk", "split", "unbind", "movedim", "clone", "detach", "float"}
_INDEX_FUNCTIONS = {torch.reshape, torch.permute, torch.transpose, torch.flatten, torch.unsqueeze,
                    torch.squeeze, torch.chunk, torch.split, torch.unbind, torch.movedim}
_ACT_FUNCTIONS: dict[Any, Callable[..., A.Activation]] = {
    F.relu: A.relu, torch.relu: A.relu, F.silu: A.silu, F.hardswish: A.hardswish, F.mish: A.mish,
    torch.sigmoid: A.sigmoid, F.sigmoid: A.sigmoid, torch.tanh: A.tanh, F.tanh: A.tanh, F.relu6: A.relu6,
}
_ACT_METHODS = {"relu": A.relu, "sigmoid": A.sigmoid, "tanh": A.tanh}


def _label(n: fx.Node) -> str:
    t = n.target
    return t if isinstance(t, str) else getattr(t, "__name__", str(t))


_TRANSLATED: "weakref.WeakKeyDictionary[fx.GraphModule, fx.GraphModule]" = weakref.WeakKeyDictionary()


def trace(model: nn.Module) -> fx.GraphModule:
    """The model's ``torch.fx`` graph (standard leaves: torch.nn modules). One-line error if it
    does not trace (data-dependent control flow, ...)."""
    if isinstance(model, fx.GraphModule):
        from hwrel.bounds.graph_aten import from_aten, is_aten

        if is_aten(model) and not getattr(model, "_hwrel_translated", False):  # torch.export's ATen graphs
            # kept per module object, not as an attribute: a deep copy (with other weights) translates anew
            cached = _TRANSLATED.get(model)
            if cached is None:
                cached = _TRANSLATED[model] = from_aten(model)
            return cached
        return model
    try:
        # checked before tracing: the tracer intercepts module calls made while it runs
        tracer = _Tracer({id(m) for m in model.modules() if _rms_params(m) is not None})
        if type(model) in (nn.TransformerEncoderLayer, nn.TransformerEncoder):  # a root is traced, not called
            tracer.whole = model
            model = _WholeLayer(model)
        graph = tracer.trace(model)
        return fx.GraphModule(tracer.root, graph, type(model).__name__)
    except Exception as exc:  # fx raises many types for dynamic code
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UnsupportedLayerError(f"cannot trace {type(model).__name__} with torch.fx: {first}") from None


class _Tracer(fx.Tracer):
    """torch.nn modules are leaves, and so are RMSNorm modules written out by hand (LLaMA's,
    Hugging Face's ``LlamaRMSNorm``) once checked to compute exactly that (:func:`_rms_params`);
    ``nn.MultiheadAttention``, ``nn.TransformerEncoderLayer`` and ``nn.TransformerEncoder`` are
    traced as the operations they compute (:mod:`hwrel.bounds.graph_modules`)."""

    def __init__(self, rms: set[int]):
        super().__init__()
        self.rms = rms
        self.whole: nn.Module | None = None  # the model itself, where it is one decomposed module

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return id(m) in self.rms or super().is_leaf_module(m, qualname)

    def call_module(self, m: nn.Module, forward: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
        decompose = M.DECOMPOSITIONS.get(type(m))  # exact types: a subclass may compute something else
        if decompose is not None:
            path = self.path_of_module(m)
            if self.whole is not None:  # names relative to the model, not to its wrapper
                path = "" if m is self.whole else path.removeprefix("layer.")
            return decompose(self, m, path, *args, **kwargs)
        return super().call_module(m, forward, args, kwargs)


class _WholeLayer(nn.Module):
    """A model that is one encoder (layer), called (so decomposed) from a root."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, src: Tensor) -> Tensor:
        return self.layer(src)


def _rms_params(m: nn.Module) -> tuple[Tensor, float] | None:
    """``(weight, eps)`` of a module that computes ``x / sqrt(mean(x^2) + eps) * weight`` over the
    last dimension (checked on random inputs, to 1e-5 relative), else None."""
    if hasattr(nn, "RMSNorm") and isinstance(m, nn.RMSNorm):
        return None  # handled as a torch.nn module
    if "rmsnorm" not in type(m).__name__.lower():
        return None
    w = getattr(m, "weight", None)
    eps = getattr(m, "eps", getattr(m, "variance_epsilon", None))
    if not isinstance(w, Tensor) or w.dim() != 1 or not isinstance(eps, (int, float)):
        return None
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, w.numel(), generator=g) * torch.tensor([1e-3, 1.0, 30.0]).reshape(1, 3, 1)
    with torch.no_grad():
        try:
            got = m(x)
        except Exception:  # noqa: BLE001 - not the module we look for
            return None
        want = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + float(eps)) * w
    if not isinstance(got, Tensor) or got.shape != want.shape or not torch.allclose(got, want, rtol=1e-5, atol=1e-6):
        return None
    return w.detach(), float(eps)


def _activation_of(gm: fx.GraphModule, n: fx.Node) -> A.Activation | None:
    from hwrel.extract import _activation_from

    if n.op == "call_module":
        return _activation_from(str(n.target), gm.get_submodule(str(n.target)))
    if n.op == "call_function":
        if n.target is F.gelu:
            approx = n.kwargs.get("approximate", "none")
            return A.gelu(approx) if approx in ("none", "tanh") else None
        if n.target in _ACT_FUNCTIONS and not n.kwargs.get("inplace", False):
            return _ACT_FUNCTIONS[n.target]()
    if n.op == "call_method" and n.target in _ACT_METHODS:
        return _ACT_METHODS[n.target]()
    return None


def _layer_name(n: fx.Node) -> str:
    named = n.meta.get(M.LAYER)
    return named if named else str(n.target) if n.op == "call_module" else n.name


def _samples(n: fx.Node, t: Tensor) -> Tensor:
    """A failure layer's output with its sample dimension first (``(T, B, F)`` inside a
    ``TransformerEncoderLayer`` that is not batch_first)."""
    d = n.meta.get(M.BATCH_DIM, 0)
    return t if d == 0 else t.movedim(d, 0)


def graph_layers(model: nn.Module) -> list[str]:
    """Names of the failure layers, in graph order: activation module paths (``blocks.0.act``), the
    fx node name of a functional activation (``silu``), or ``<layer>.activation`` inside an
    ``nn.TransformerEncoderLayer`` (``blocks.0.activation``, also where it is ``F.gelu``)."""
    gm = trace(model)
    return [_layer_name(n) for n in gm.graph.nodes if _activation_of(gm, n) is not None]


def check_supported(model: nn.Module, x: Tensor | None = None) -> list[str]:
    """The failure layers, once the model traces and (given inputs ``x``) every operation has a rule,
    checked on ``x[:1]`` before any costly work; else :class:`UnsupportedLayerError` naming the node."""
    layers = graph_layers(model)
    if x is not None:
        # with a failure: token inputs leave every operation constant (run as the model runs it) until a
        # bounded value reaches it, so a dry run without one would check no rule
        graph_bound(model, {layers[0]: 1} if layers else {}, lo=x[:1])
    return layers


@dataclass
class GraphBound:
    """Result of :func:`graph_bound`: ``bound[b, j]`` bounds ``|faulty - clean|`` of output
    coordinate ``j`` for every input in box ``b`` (sound), ``layers`` the failure layers."""

    bound: Tensor
    layers: list[str]
    failures: dict[str, int]


def _counts(layers: list[str], failures: Sequence[int] | dict[str, int]) -> dict[str, int]:
    if isinstance(failures, dict):
        unknown = [k for k in failures if k not in layers]
        if unknown:
            raise HwrelError(f"failures name {unknown[0]!r}, which is not a layer; layers: {', '.join(layers)}")
        out = {k: int(v) for k, v in failures.items()}
    else:
        failures = list(failures)
        if len(failures) != len(layers):
            raise HwrelError(f"failures has {len(failures)} entries but the model has {len(layers)} failure "
                             f"layers ({', '.join(layers) or 'none'})")
        out = dict(zip(layers, (int(f) for f in failures)))
    bad = [k for k, v in out.items() if v < 0]
    if bad:
        raise HwrelError(f"failure count for layer {bad[0]} must be >= 0, got {out[bad[0]]}")
    return out


@torch.no_grad()
def graph_bound(model: nn.Module, failures: Sequence[int] | dict[str, int], fault: str | FaultModel = "crash",
                *, lo: Tensor, hi: Tensor | None = None, capacity: float | None = None,
                weight_radius: dict[str, Tensor] | None = None) -> GraphBound:
    """Sound bound on every output coordinate's error when ``failures[l]`` elements of layer ``l``
    fail, for every input in the box ``[lo, hi]`` (batched, ``(B, *input_shape)``; ``hi=None``: the
    points ``lo``, e.g. token ids). Units: those of the model's output. Raises
    :class:`UnsupportedLayerError` naming the first node no rule covers.

    ``weight_radius``: parameter name (``"blocks.0.fc1.weight"``) -> ``R`` of the weight's shape: the
    faulty model's weights may also each be off by up to ``R`` (quantization, :func:`hwrel.quantize.
    weight_radius`), against the clean model's exact weights. Linear and Conv2d weights only; a name
    no rule consumes is refused (:class:`UnsupportedLayerError`), never ignored."""
    fault = as_fault(fault, capacity)
    if fault.synapse:
        raise HwrelError(f"fault {fault.kind!r}: the graph bounds cover neuron faults (crash, byzantine)")
    gm = trace(model)
    layers = [_layer_name(n) for n in gm.graph.nodes if _activation_of(gm, n) is not None]
    counts = _counts(layers, failures)
    points = hi is None or bool((lo == hi).all())
    hi = lo if hi is None else hi
    radius = _resolve_radii(model, gm, weight_radius or {})
    if points:  # the clean float32 forward recorded; rounding counted only where a fault reaches
        record = _record(gm, lo)
        with R.rounding_mode(R.RECORDED):
            it = _Interpreter(gm, fault, counts, record, radius)
            out = it.run(lo, hi)
        bound = _output(out).resolved()
    else:  # exact intervals; the faulty and the clean float32 forward each within e of exact
        it = _Interpreter(gm, fault, counts, radius=radius)
        bound = _output(it.run(lo, hi)).resolved()
        perturbed = any(counts.values()) or bool(radius)
        bound = bound + (_output(_Interpreter(gm, fault, {}).run(lo, hi)).resolved() if perturbed else bound)
    unused = sorted(name for key, (name, _) in radius.items() if key not in it.used)
    if unused:
        raise UnsupportedLayerError(f"weight perturbation of {unused[0]}: no rule reads this parameter as the "
                                    "weight of a Linear or Conv2d (the graph bounds cannot account for it)")
    return GraphBound(bound.flatten(1), layers, counts)


def _resolve_radii(model: nn.Module, gm: fx.GraphModule, radius: dict[str, Tensor]) -> dict[int, tuple[str, Tensor]]:
    """The radii keyed by the identity of the parameter tensor they perturb: a weight tied to another
    name (an embedding table shared with the output layer) or read twice is the same tensor."""
    out: dict[int, tuple[str, Tensor]] = {}
    for name, r in radius.items():
        # the graph's own tensor first: an exported program is translated on a copy of its weights
        t = next((t for t in (_lookup(gm, name), _lookup(model, name)) if isinstance(t, Tensor)), None)
        if t is None:
            raise UnsupportedLayerError(f"weight perturbation of {name}: the model has no such parameter")
        out[id(t)] = (name, r)
    return out


def _lookup(root: Any, name: str) -> Any:
    obj = root
    for part in name.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def _output(out: Any) -> R.Val:
    while isinstance(out, (tuple, list)) and len(out) == 1:  # an exported program's one-leaf output
        out = out[0]
    if isinstance(out, Tensor) and out.is_floating_point():  # no fault reaches it: exactly the clean output
        return R.Val.const(out)
    if not isinstance(out, R.Val):
        raise UnsupportedLayerError("model output is not one tensor that depends on the input")
    return out


def _record(gm: fx.GraphModule, x: Tensor) -> dict[str, Any]:
    """Every node's value in the model's own float32 forward of ``x`` (no gradients)."""
    values: dict[str, Any] = {}

    class Recorder(fx.Interpreter):
        def run_node(self, n: fx.Node) -> Any:
            out = super().run_node(n)
            # a copy: an in-place operation later (ReLU(inplace=True)) must not change the record
            values[n.name] = out.clone() if isinstance(out, Tensor) else out
            return out

    from hwrel.inject.general_sites import plain_forward

    with plain_forward():
        Recorder(gm).run(x)
    return values


class _Interpreter:
    def __init__(self, gm: fx.GraphModule, fault: FaultModel, counts: dict[str, int],
                 record: dict[str, Any] | None = None, radius: dict[str, Tensor] | None = None):
        self.gm, self.fault, self.counts, self.record = gm, fault, counts, record
        self.affines: dict[str, Node] = {}
        self.radius = radius or {}  # id(parameter tensor) -> (name, R)
        self.used: set[int] = set()  # the weight radii a rule has accounted for
        self.weights: dict[int, tuple[Tensor, Tensor]] = {}  # id(Val of a perturbed weight) -> (W, R)

    def _perturbed(self, n: fx.Node) -> bool:
        """Whether node ``n`` reads a perturbed weight: a module owning one, or ``F.linear`` / ``addmm`` of one."""
        if not self.radius:
            return False
        if n.op == "call_module":
            return any(id(p) in self.radius for p in self.gm.get_submodule(str(n.target)).parameters())
        if n.target is F.linear:
            w = n.args[1] if len(n.args) > 1 else n.kwargs.get("weight")
        elif n.target is torch.addmm and len(n.args) > 2:
            w = n.args[2]
        else:
            return False
        return isinstance(w, fx.Node) and w.op == "get_attr" and id(_lookup(self.gm, str(w.target))) in self.radius

    def _radius(self, t: Tensor) -> Tensor | None:
        if id(t) not in self.radius:
            return None
        self.used.add(id(t))
        return self.radius[id(t)][1].double()

    def _check_reads(self, n: fx.Node, m: nn.Module) -> None:
        """A module may read a perturbed parameter only as the weight of a plain Linear/Conv (the rule
        that bounds it); any other read (a tied embedding table, a norm's weight) is refused."""
        ok = isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d)) and not type(m).__name__.startswith("Quant")
        for pn, p in m.named_parameters():
            if id(p) in self.radius and not (ok and pn == "weight"):
                raise UnsupportedLayerError(f"layer {n.target} ({type(m).__name__}) reads the perturbed parameter "
                                            f"{self.radius[id(p)][0]} as {pn}: no rule bounds that read")

    def run(self, lo: Tensor, hi: Tensor, e: Tensor | None = None) -> Any:
        """The output's bounds for inputs in ``[lo, hi]`` (``e``: their own error bound, default 0)."""
        env: dict[fx.Node, Any] = {}
        for n in self.gm.graph.nodes:
            if n.op == "placeholder":
                if not lo.is_floating_point():
                    env[n] = lo  # token ids: a fixed input, not a box
                else:
                    if (hi < lo).any():
                        raise HwrelError("input box has lo > hi")
                    env[n] = R.Val(lo.double(), hi.double(),
                                   torch.zeros_like(lo, dtype=torch.float64) if e is None else e.double())
                continue
            if n.op == "output":
                return fx.node.map_arg(n.args[0], lambda a: env[a])
            args = fx.node.map_arg(n.args, lambda a: env[a])
            kwargs = fx.node.map_arg(n.kwargs, lambda a: env[a])
            try:
                out = self._eval(n, args, kwargs)
            except (HwrelError, UnsupportedLayerError):
                raise
            except Exception as exc:  # a rule's shape assumption broken by an unusual call
                detail = str(exc).splitlines()[0] if str(exc) else ""
                raise UnsupportedLayerError(f"operation {n.name} ({_label(n)}) with these arguments "
                                            f"({type(exc).__name__}: {detail}) is not supported") from None
            out = _no_nan(out)
            if self.record is not None and n.op != "get_attr":  # a perturbed weight keeps its identity
                out = _recorded(out, self.record.get(n.name))
            act = _activation_of(self.gm, n)
            if act is not None and isinstance(out, (R.Val, Tensor)):
                f = self.counts.get(_layer_name(n), 0)
                if f:
                    out = _val(out)
                    d = self.fault.delta(out.mag())
                    out = R.Val(out.lo, out.hi, out.e, torch.relu(d - out.e), f)
            env[n] = out
        raise HwrelError("graph has no output")  # pragma: no cover

    # --- dispatch ----------------------------------------------------------------------------

    def _eval(self, n: fx.Node, args: tuple, kwargs: dict) -> Any:
        if n.op == "get_attr":
            raw = _lookup(self.gm, str(n.target))
            if self.radius and id(raw) in self.radius:  # a perturbed weight read directly: a bounded value
                r = self._radius(raw)
                w = raw.detach().double()
                v = R.Val(w, w, r.expand_as(w).clone())
                self.weights[id(v)] = (raw.detach(), r)
                return v
            return _attr(self.gm, str(n.target))
        if self.radius and n.op == "call_module":
            self._check_reads(n, self.gm.get_submodule(str(n.target)))
        has_val = any(isinstance(a, R.Val) for a in _flat(args, kwargs))
        k = 1 if n.target is torch.addmm else 0  # the input: addmm(bias, x, W)
        if not has_val and self._perturbed(n) and len(args) > k and isinstance(args[k], Tensor) \
                and args[k].is_floating_point():
            args = (*args[:k], R.Val.const(args[k].double()), *args[k + 1:])  # a constant input, perturbed weights
            has_val = True
        if not has_val:  # depends on constants only: the model's own computation
            return self._concrete(n, args, kwargs)
        act = _activation_of(self.gm, n)
        if act is not None:
            return _act(act, _val(args[0]))
        if n.op == "call_module":
            return self._module(n, self.gm.get_submodule(str(n.target)), args, kwargs)
        t, label = n.target, _label(n)
        if n.op == "call_method" and t in _INDEX_METHODS or n.op == "call_function" and t in _INDEX_FUNCTIONS:
            return _index(n, args, kwargs)
        if t is operator.getitem:
            return _index(n, args, kwargs)
        if t is getattr:
            if args[1] not in ("shape", "ndim", "dtype", "device"):  # x.T, x.mT, ...: no rule (not a constant)
                raise UnsupportedLayerError(f"operation {n.name} (attribute .{args[1]}) is not supported")
            return getattr(args[0].lo, args[1])
        if n.op == "call_method" and t in ("size", "dim"):
            return getattr(args[0].lo, t)(*args[1:], **kwargs)
        if t in (operator.add, torch.add, operator.iadd) or t == "add":
            if kwargs.get("alpha", 1) != 1:
                raise UnsupportedLayerError(f"operation {n.name} ({label}): add with alpha")
            return R.add(_val(args[0]), _val(args[1]))
        if t in (operator.sub, torch.sub) or t == "sub":
            if kwargs.get("alpha", 1) != 1:
                raise UnsupportedLayerError(f"operation {n.name} ({label}): subtraction with alpha is not supported")
            return R.add(_val(args[0]), _val(args[1]), -1.0)
        if t in (operator.neg, torch.neg) or t == "neg":
            return R.scale(_val(args[0]), -1.0)
        if t in (operator.mul, torch.mul) or t == "mul":
            return _mul(args[0], args[1])
        if t in (operator.truediv, torch.div) or t == "div":
            if isinstance(args[1], R.Val) or kwargs.get("rounding_mode") is not None:
                raise UnsupportedLayerError(f"operation {n.name} ({label}): division by a bounded tensor has no rule")
            c = args[1]
            return R.scale(_val(args[0]), 1.0 / (c.double() if isinstance(c, Tensor) else float(c)))
        if t in (operator.matmul, torch.matmul, torch.bmm, torch.mm) or t in ("matmul", "bmm", "mm"):
            return R.matmul(_val(args[0]), _val(args[1]))
        if t is torch.baddbmm:
            if isinstance(args[0], R.Val) or kwargs.get("beta", 1) != 1 or kwargs.get("alpha", 1) != 1 or len(args) > 3:
                raise UnsupportedLayerError(f"operation {n.name} (baddbmm): only a constant added term, "
                                            "beta = alpha = 1, has a rule")
            return R.masked_matmul(_val(args[1]), _val(args[2]), args[0])
        if t is F.linear:
            w = args[1] if len(args) > 1 else kwargs["weight"]
            b = args[2] if len(args) > 2 else kwargs.get("bias")
            radius = None
            if isinstance(w, R.Val) and id(w) in self.weights:  # a perturbed weight, read as it is stored
                w, radius = self.weights[id(w)]
            if isinstance(w, R.Val) or isinstance(b, R.Val):
                raise UnsupportedLayerError(f"operation {n.name} (linear): a bounded weight has no rule")
            return self._affine(n.name, Affine("linear", w.detach().float(), None if b is None else b.detach().float()),
                                args[0], radius)
        if t is torch.addmm:  # bias + x @ W with W stored (in, out): the linear map of W^T
            b, x, w = args[:3]
            radius = None
            if isinstance(w, R.Val) and id(w) in self.weights:
                w, radius = self.weights[id(w)]
                radius = radius.expand_as(w).t()
            if (len(args) > 3 or kwargs.get("beta", 1) != 1 or kwargs.get("alpha", 1) != 1 or isinstance(w, R.Val)
                    or isinstance(b, R.Val) or not isinstance(b, Tensor) or b.dim() != 1):
                raise UnsupportedLayerError(f"operation {n.name} (addmm): only bias + x @ W with a constant or "
                                            "perturbed W and a constant 1-d bias, beta = alpha = 1, has a rule")
            return self._affine(n.name, Affine("linear", w.detach().float().t().contiguous(), b.detach().float()),
                                x, radius)
        if t in (F.conv1d, torch.conv1d):
            names = ["input", "weight", "bias", "stride", "padding", "dilation", "groups"]
            p = dict(zip(names, args))
            p.update(kwargs)
            if isinstance(p["weight"], R.Val) or isinstance(p.get("bias"), R.Val):
                raise UnsupportedLayerError(f"operation {n.name} (conv1d): a bounded weight has no rule")

            def one(v: Any) -> Any:
                return v[0] if isinstance(v, (tuple, list)) and len(v) == 1 else v

            a = _conv1d_affine(n.name, p["weight"], p.get("bias"), one(p.get("stride", 1)), one(p.get("padding", 0)),
                               one(p.get("dilation", 1)), int(p.get("groups", 1)))
            return self._conv1d(n.name, a, p["input"])
        if t in (F.max_pool1d, torch.max_pool1d):
            names = ["input", "kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices"]
            p = dict(zip(names, args))
            p.update(kwargs)
            if p.get("return_indices", False):
                raise UnsupportedLayerError(f"operation {n.name} (max_pool1d): return_indices has no rule")
            k = p["kernel_size"]
            return _max_pool1d(_val(p["input"]), k, p.get("stride") or k, p.get("padding", 0), p.get("dilation", 1),
                               bool(p.get("ceil_mode", False)))
        if t in (torch.cat, torch.concat, torch.stack):
            return _cat(t, args, kwargs)
        if t in (F.softmax, torch.softmax) or t == "softmax":
            dim = args[1] if len(args) > 1 else kwargs.get("dim")
            return _softmax(_val(args[0]), dim)
        if t is F.layer_norm:
            return _layer_norm(n, args, kwargs)
        if t is F.scaled_dot_product_attention:
            return _sdpa(n, args, kwargs)
        if t in (torch.mean,) or t == "mean":
            return _mean(n, args, kwargs)
        if t in (operator.pow, torch.pow) or t == "pow":
            if isinstance(args[1], R.Val) or args[1] not in (2, 3):
                raise UnsupportedLayerError(f"operation {n.name} (pow): only the square and the cube have a rule, "
                                            f"got exponent {args[1]}")
            return R.power2(_val(args[0])) if args[1] == 2 else R.power3(_val(args[0]))
        if t in (torch.square,) or t == "square":
            return R.power2(_val(args[0]))
        if t in (torch.rsqrt,) or t == "rsqrt":
            return R.rsqrt(_val(args[0]))
        raise UnsupportedLayerError(f"operation {n.name} ({label}) is not supported")

    def _concrete(self, n: fx.Node, args: tuple, kwargs: dict) -> Any:
        if n.op == "call_module":
            return self.gm.get_submodule(str(n.target))(*args, **kwargs)
        if n.op == "call_method":
            return getattr(args[0], str(n.target))(*args[1:], **kwargs)
        return n.target(*args, **kwargs)

    def _module(self, n: fx.Node, m: nn.Module, args: tuple, kwargs: dict) -> Any:
        name = str(n.target)
        if isinstance(m, _PASS):
            return args[0]
        if isinstance(m, (nn.Linear, nn.Conv2d)) or type(m).__name__ in ("QuantLinear", "QuantConv2d"):
            if name not in self.affines:
                from hwrel.extract import _affine_from

                self.affines[name] = _affine_from(name, m)
            radius = self._radius(m.weight) if isinstance(m, (nn.Linear, nn.Conv2d)) else None
            return self._affine(name, self.affines[name], args[0], radius)
        if isinstance(m, nn.Conv1d):
            if type(m) is not nn.Conv1d:  # a quantized subclass computes with other weights
                raise UnsupportedLayerError(f"layer {name} ({type(m).__module__}.{type(m).__name__}) is not supported")
            if m.padding_mode != "zeros":
                raise UnsupportedLayerError(f"layer {name} (Conv1d): padding_mode {m.padding_mode!r} has no rule; "
                                            "use zero padding")
            if name not in self.affines:
                self.affines[name] = _conv1d_affine(name, m.weight, m.bias, m.stride[0], m.padding, m.dilation[0],
                                                    m.groups)
            radius = self._radius(m.weight)  # (C_out, C_in, k) -> the (1, k) kernels of the 2-D rule
            return self._conv1d(name, self.affines[name], args[0], None if radius is None else radius.unsqueeze(2))
        if type(m) is nn.MaxPool1d:
            if m.return_indices:
                raise UnsupportedLayerError(f"layer {name} (MaxPool1d): return_indices has no rule")
            return _max_pool1d(_val(args[0]), m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode)
        if isinstance(m, nn.LayerNorm):
            if len(m.normalized_shape) != 1:
                raise UnsupportedLayerError(f"layer {name} (LayerNorm): only normalization over the last "
                                            f"dimension has a rule, got {tuple(m.normalized_shape)}")
            return R.layer_norm(_val(args[0]), m.weight, m.bias, float(m.eps))
        if hasattr(nn, "RMSNorm") and isinstance(m, nn.RMSNorm):
            if len(m.normalized_shape) != 1:
                raise UnsupportedLayerError(f"layer {name} (RMSNorm): only the last dimension has a rule")
            eps = torch.finfo(torch.float32).eps if m.eps is None else float(m.eps)
            return R.rms_norm(_val(args[0]), m.weight, eps)
        rms = _rms_params(m) if "rmsnorm" in type(m).__name__.lower() else None
        if rms is not None:
            return R.rms_norm(_val(args[0]), rms[0], rms[1])
        if isinstance(m, nn.Softmax):
            return _softmax(_val(args[0]), m.dim)
        if isinstance(m, nn.Flatten):
            return _val(args[0]).map(lambda t: t.flatten(m.start_dim, m.end_dim))
        raise UnsupportedLayerError(f"layer {name} ({type(m).__module__}.{type(m).__name__}) is not supported")

    def _conv1d(self, name: str, a: Affine, x: Any, radius: Tensor | None = None) -> R.Val:
        """A 1-D convolution as the 2-D one on ``(B, C, 1, T)`` with ``(1, k)`` kernels: the same
        dot products (so the same rounding), the rules of :meth:`_affine`."""
        x = _val(x)
        if len(x.shape) != 3:
            raise UnsupportedLayerError(f"operation {name} (conv1d): the input must be (batch, channels, time), "
                                        f"got {len(x.shape)} dimensions")
        return self._affine(name, a, x.map(lambda t: t.unsqueeze(2)), radius).map(lambda t: t.squeeze(2))

    def _affine(self, name: str, a: Affine, x: Any, radius: Tensor | None = None) -> R.Val:
        x = _val(x)
        a64 = replace(a, weight=a.weight.double(), bias=None if a.bias is None else a.bias.double(),
                      scale=None, zero_point=None, codes=None, fold_magnitude=None)
        node = Node(name, "affine", (0,), tuple(x.shape[1:]), affine=a64)
        lo, hi = affine_interval(node, x.lo, x.hi)
        if radius is not None:
            # perturbed weights W' = W + D, |D| <= R: |W'x' - Wx| <= |W'| |x' - x| + |D| |x|
            #   <= (|W| + R) e + R |x|, with |x| over the clean interval; no row (l2) bound here
            wide = replace(a64, weight=a64.abs_weight + radius)
            e = _abs_map(a64, wide.weight, x.e) + _abs_map(a64, radius, x.mag())
            if x.extra is not None:
                e = e + affine_topsum(Node(name, "affine", (0,), tuple(x.shape[1:]), affine=wide), x.extra, x.f)
            return R.finish(lo, hi, e, local_rounding(node, [x.fmag()], weight_radius=radius))
        e = a64.abs_map(x.e)
        if x.extra is not None:
            e = e + affine_topsum(node, x.extra, x.f)
        if a64.kind != "linear":
            return R.finish(lo, hi, e, local_rounding(node, [x.fmag()]))
        # rows (the last dimension): |W_k (x' - x)| <= ||W_k||_2 ||x' - x||_2, and the row error's
        # l2 norm is at most ||W||_2 times the base part's plus the worst f failed columns' norms
        w = a64.weight
        spectral = torch.linalg.matrix_norm(w, 2)
        e = torch.minimum(e, w.norm(dim=1) * x.row_l2())
        base = x.e.norm(dim=-1, keepdim=True)
        if x.l2 is not None and x.extra is None:
            base = torch.minimum(base, x.l2)
        l2 = spectral * base
        if x.extra is not None:
            l2 = l2 + _row_topsum(x.extra * w.norm(dim=0), x.f)
        out = R.finish(lo, hi, e, local_rounding(node, [x.fmag()]))
        return R.with_l2(out, e, torch.minimum(l2, spectral * x.row_l2()))


# --- helpers ----------------------------------------------------------------------------------

def _max_pool1d(x: R.Val, kernel: Any, stride: Any, padding: Any, dilation: Any, ceil_mode: bool) -> R.Val:
    k, st, d = (v[0] if isinstance(v, (tuple, list)) else v for v in (kernel, stride, dilation))
    reach = min(k, (k - 1) * d // st + 1)  # the windows that hold any one input
    return R.max_pool(x, lambda t: F.max_pool1d(t, kernel, stride, padding, dilation, ceil_mode), reach)


def _conv1d_affine(name: str, w: Tensor, b: Tensor | None, stride: Any, padding: Any, dilation: Any,
                   groups: int) -> Affine:
    """The 2-D convolution that computes a 1-D one on ``(B, C, 1, T)`` (zero padding)."""
    k = w.shape[-1]
    if isinstance(padding, (tuple, list)):
        padding = padding[0]
    if padding == "valid":
        padding = 0
    elif padding == "same":
        total = int(dilation) * (k - 1)
        if int(stride) != 1 or total % 2:
            raise UnsupportedLayerError(f"layer {name} (conv1d): padding 'same' with stride {stride} or an odd total "
                                        f"padding ({total}) has no rule; give integer padding")
        padding = total // 2
    if not all(isinstance(v, int) for v in (stride, padding, dilation)):
        raise UnsupportedLayerError(f"layer {name} (conv1d): stride, padding and dilation must be integers, got "
                                    f"{stride!r}, {padding!r}, {dilation!r}")
    weight = w.detach().float().unsqueeze(2)
    bias = None if b is None else b.detach().float()
    if not bool(torch.isfinite(weight).all()) or (bias is not None and not bool(torch.isfinite(bias).all())):
        raise HwrelError(f"layer {name} (conv1d): weight or bias is not finite")
    return Affine("conv2d", weight, bias, (1, stride), (0, padding), (1, dilation), int(groups))


def _row_topsum(v: Tensor, f: int) -> Tensor:
    """Sum of the ``f`` largest entries of each row (last dimension), ``(..., 1)``."""
    from hwrel.bounds.interval import topsum

    return topsum(v, f, dim=-1).unsqueeze(-1)

def _no_nan(out: Any) -> Any:
    """A rule's error bounds with NaN (``inf * 0`` once a bound has overflowed) read as ``inf``: a NaN
    compares false and could otherwise be dropped by a later rule, turning a vacuous bound finite."""
    if isinstance(out, tuple):
        return tuple(_no_nan(o) for o in out)
    if not isinstance(out, R.Val):
        return out
    fix = [t for t in (out.e, out.extra, out.l2) if t is not None and bool(torch.isnan(t).any())]
    if not fix:
        return out
    def inf(t: Tensor | None) -> Tensor | None:
        return None if t is None else torch.nan_to_num(t, nan=math.inf, posinf=math.inf, neginf=-math.inf)

    return R.Val(out.lo, out.hi, inf(out.e), inf(out.extra), out.f, inf(out.l2))


def _recorded(out: Any, rec: Any) -> Any:
    """The rule's bounds with the clean value replaced by the recorded float32 one."""
    if isinstance(out, R.Val) and isinstance(rec, Tensor) and rec.shape == out.shape:
        v = rec.double()
        return R.Val(v, v, out.e, out.extra, out.f, out.l2)
    if isinstance(out, tuple) and isinstance(rec, (tuple, list)) and len(rec) == len(out):
        return tuple(_recorded(o, r) for o, r in zip(out, rec))
    return out


def _attr(gm: fx.GraphModule, target: str) -> Any:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj.detach() if isinstance(obj, Tensor) else obj


def _flat(args: tuple, kwargs: dict) -> list[Any]:
    out: list[Any] = []

    def walk(a: Any) -> None:
        if isinstance(a, (tuple, list)):
            for b in a:
                walk(b)
        elif isinstance(a, dict):
            for b in a.values():
                walk(b)
        else:
            out.append(a)

    walk(args)
    walk(kwargs)
    return out


def _val(x: Any) -> R.Val:
    if isinstance(x, R.Val):
        return x
    if isinstance(x, Tensor):
        return R.Val.const(x)
    if isinstance(x, (int, float)):
        return R.Val.const(torch.tensor(float(x)))
    raise UnsupportedLayerError(f"expected a tensor, got {type(x).__name__}")


def _act(act: A.Activation, x: R.Val) -> R.Val:
    node = Node("act", "act", (0,), tuple(x.shape[1:]), act=act)

    def rounding(in_mag: Tensor, out_mag: Tensor) -> Tensor | float:
        return local_rounding(node, [in_mag], out_mag)

    return R.activation(act, x, rounding)


def _mul(a: Any, b: Any) -> R.Val:
    if isinstance(a, R.Val) and isinstance(b, R.Val) and not (a.exact or b.exact):
        return R.mul(a, b)
    if not isinstance(a, R.Val) or a.exact and isinstance(b, R.Val):
        a, b = b, a
    c = b.lo if isinstance(b, R.Val) else b
    return R.scale(a, c.double() if isinstance(c, Tensor) else float(c))


def _index(n: fx.Node, args: tuple, kwargs: dict) -> Any:
    """Index maps (reshape, permute, slicing, chunk, ...) apply alike to every part of a Val."""
    x = args[0]
    if not isinstance(x, R.Val):  # e.g. indexing a shape tuple
        return operator.getitem(*args) if n.target is operator.getitem else None
    if n.op == "call_method":
        method = str(n.target)
        if method in ("float", "contiguous", "clone", "detach"):
            return x
        if method == "view" and all(isinstance(a, int) for a in args[1:]) and not kwargs:
            method = "reshape"  # the bounds' parts need not share the tensor's strides: same values
        fn = lambda t: getattr(t, method)(*args[1:], **kwargs)  # noqa: E731
    elif n.target is operator.getitem:
        idx = args[1]
        fn = lambda t: t[idx]  # noqa: E731
    else:
        fn = lambda t: n.target(t, *args[1:], **kwargs)  # noqa: E731
    if x.extra is not None and not _one_to_one(n, args):
        x = x.plain()  # a map that may copy an entry (expand, advanced indexing) would multiply failures
    parts = [fn(t) for t in (x.lo, x.hi, x.e)] + ([fn(x.extra)] if x.extra is not None else [None])
    l2 = None
    if n.target is operator.getitem and x.l2 is not None and _keeps_rows(args[1], len(x.shape)):
        l2 = x.l2[args[1]]
    if isinstance(parts[0], (tuple, list)):
        k = len(parts[0])
        return tuple(R.Val(parts[0][i], parts[1][i], parts[2][i],
                           None if parts[3] is None else parts[3][i], x.f) for i in range(k))
    return R.Val(parts[0], parts[1], parts[2], parts[3], x.f, l2)


def _keeps_rows(idx: Any, ndim: int) -> bool:
    """Basic indexing of leading dimensions only (each row of the last dimension kept whole)."""
    idx = idx if isinstance(idx, tuple) else (idx,)
    return len(idx) < ndim and all(isinstance(i, (int, slice)) for i in idx)


_ONE_TO_ONE = {"reshape", "view", "permute", "transpose", "flatten", "unsqueeze", "squeeze", "contiguous",
               "unflatten", "chunk", "split", "unbind", "movedim", "clone", "detach", "float"}


def _one_to_one(n: fx.Node, args: tuple) -> bool:
    """Whether an index map sends each entry to at most one place (so at most ``f`` entries still
    carry a failure): reshapes, permutations, splits and basic slicing; not ``expand``."""
    if n.target is operator.getitem:
        idx = args[1] if isinstance(args[1], tuple) else (args[1],)
        return all(isinstance(i, (int, slice)) or i is None or i is Ellipsis for i in idx)
    name = n.target if isinstance(n.target, str) else getattr(n.target, "__name__", "")
    return name in _ONE_TO_ONE


def _cat(t: Any, args: tuple, kwargs: dict) -> R.Val:
    vals = [_val(v).plain() for v in args[0]]
    dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
    join = torch.stack if t is torch.stack else torch.cat
    return R.Val(join([v.lo for v in vals], dim), join([v.hi for v in vals], dim), join([v.e for v in vals], dim))


def _last(x: R.Val, dim: int, rule: Callable[[R.Val], R.Val]) -> R.Val:
    """Apply a last-dimension rule along ``dim``."""
    nd = len(x.shape)
    dim = dim % nd
    if dim == nd - 1:
        return rule(x)
    return rule(x.map(lambda t: t.movedim(dim, -1))).map(lambda t: t.movedim(-1, dim))


def _softmax(x: R.Val, dim: Any) -> R.Val:
    if dim is None:
        raise UnsupportedLayerError("softmax without dim has no rule")
    return _last(x, int(dim), R.softmax)


def _layer_norm(n: fx.Node, args: tuple, kwargs: dict) -> R.Val:
    shape = args[1] if len(args) > 1 else kwargs["normalized_shape"]
    w = args[2] if len(args) > 2 else kwargs.get("weight")
    b = args[3] if len(args) > 3 else kwargs.get("bias")
    eps = args[4] if len(args) > 4 else kwargs.get("eps", 1e-5)
    if len(shape) != 1 or isinstance(w, R.Val) or isinstance(b, R.Val):
        raise UnsupportedLayerError(f"operation {n.name} (layer_norm): only the last dimension with constant "
                                    "weight and bias has a rule")
    return R.layer_norm(_val(args[0]), w, b, float(eps))


def _mean(n: fx.Node, args: tuple, kwargs: dict) -> R.Val:
    dim = args[1] if len(args) > 1 else kwargs.get("dim")
    keep = args[2] if len(args) > 2 else kwargs.get("keepdim", False)
    if dim is None:
        raise UnsupportedLayerError(f"operation {n.name} (mean): a mean over all dimensions mixes the batch")
    x = _val(args[0])
    dims = [dim] if isinstance(dim, int) else list(dim)
    if len(dims) != 1:
        raise UnsupportedLayerError(f"operation {n.name} (mean): only a mean over one dimension has a rule")
    d = dims[0] % len(x.shape)
    if d == 0:
        raise UnsupportedLayerError(f"operation {n.name} (mean): a mean over the batch dimension has no rule")
    return R.mean(x, d, bool(keep))


def _sdpa(n: fx.Node, args: tuple, kwargs: dict) -> R.Val:
    names = ["query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale"]
    p = dict(zip(names, args))
    p.update(kwargs)
    if p.get("dropout_p", 0.0) or p.get("enable_gqa", False):
        raise UnsupportedLayerError(f"operation {n.name} (scaled_dot_product_attention): dropout or GQA has no rule")
    q, k, v = (_val(p[key]) for key in ("query", "key", "value"))
    L, S = q.shape[-2], k.shape[-2]
    scale = p.get("scale") or 1.0 / math.sqrt(q.shape[-1])
    masked = None
    if p.get("is_causal", False):
        masked = torch.ones(L, S, dtype=torch.bool).tril().logical_not()
    mask = p.get("attn_mask")
    if mask is not None:
        if isinstance(mask, R.Val):
            raise UnsupportedLayerError(f"operation {n.name} (scaled_dot_product_attention): an input-dependent mask")
        if mask.dtype != torch.bool:  # additive: 0 leaves a score exactly as it is, -inf removes it
            if not bool(((mask == 0) | torch.isneginf(mask)).all()):
                raise UnsupportedLayerError(f"operation {n.name} (scaled_dot_product_attention): a float mask with "
                                            "values other than 0 and -inf has no rule")
            mask = ~torch.isneginf(mask)
        masked = ~mask if masked is None else masked | ~mask
        if bool(masked.all(-1).any()):
            raise UnsupportedLayerError(f"operation {n.name} (scaled_dot_product_attention): a fully masked row "
                                        "(its output is NaN)")
    return R.attention(q, k, v, float(scale), masked)


def layer_sizes(model: nn.Module, x: Tensor) -> dict[str, int]:
    """Elements per sample of each failure layer's output, from one forward of ``x[:1]``."""
    gm = trace(model)
    values = _record(gm, x[:1])
    return {_layer_name(n): int(_samples(n, values[n.name])[0].numel()) for n in gm.graph.nodes
            if _activation_of(gm, n) is not None and isinstance(values.get(n.name), Tensor)}


@dataclass
class GraphCertificate:
    """:func:`graph_certificate`'s result. ``domain_bound``: max over outputs of the bound over the
    whole input box (None for token inputs, which are not a box); ``per_input``: ``(N,)`` the max
    over outputs for each test input; ``certified``: ``(N,)`` whether the input's top-1 class provably
    stays the same (None for sequence outputs)."""

    layers: list[str]
    sizes: dict[str, int]
    failures: dict[str, int]
    domain_bound: float | None
    per_input: Tensor
    certified: Tensor | None
    bound: Tensor | None = None  # (N, n_out): each input's bound on each output


@torch.no_grad()
def graph_certificate(model: nn.Module, failures: Sequence[int] | dict[str, int], fault: str | FaultModel = "crash",
                      *, inputs: Tensor, domain: tuple[float, float] | None = None, capacity: float | None = None,
                      batch: int = 64, progress: Callable[[int, int], None] | None = None) -> GraphCertificate:
    """Sound bounds for a model :class:`hwrel.network.Network` does not cover: over the input box
    ``domain`` (per element, for float inputs) and on each of ``inputs``, with the certified top-1
    flags of a classifier (:func:`hwrel.bounds.certify.certified_from_bounds`). ``progress(done, total)``
    is called after every batch of inputs."""
    from hwrel.bounds.certify import certified_from_bounds

    fault = as_fault(fault, capacity)
    model = trace(model)
    sizes = layer_sizes(model, inputs)
    dom = None
    if domain is not None and inputs.is_floating_point():
        lo = torch.full_like(inputs[:1], float(domain[0]))
        dom = float(graph_bound(model, failures, fault, lo=lo, hi=torch.full_like(lo, float(domain[1]))).bound.max())
    from hwrel.inject.general_sites import plain_forward

    gm = trace(model)
    per, flags, full = [], [], []
    layers: list[str] = []
    counts: dict[str, int] = {}
    for start in range(0, inputs.shape[0], batch):
        xb = inputs[start:start + batch]
        gb = graph_bound(gm, failures, fault, lo=xb)
        layers, counts = gb.layers, gb.failures
        per.append(gb.bound.amax(1))
        full.append(gb.bound)
        with plain_forward():
            out = gm(xb)
        if out.dim() == 2:
            flags.append(certified_from_bounds(out.double(), gb.bound)[1])
        if progress is not None:
            progress(min(start + batch, inputs.shape[0]), inputs.shape[0])
    return GraphCertificate(layers, sizes, counts, dom, torch.cat(per), torch.cat(flags) if flags else None,
                            torch.cat(full))


@torch.no_grad()
def crash_outputs(model: nn.Module, x: Tensor, at: dict[str, Tensor]) -> Tensor:
    """The exact faulty forward: the flat elements ``at[layer]`` (per sample) of each named failure
    layer's output set to 0, everything else as the model computes it (the reference the graph
    bounds are validated against)."""
    from hwrel.inject.general_sites import plain_forward

    gm = trace(model)

    class Crash(fx.Interpreter):
        def run_node(self, n: fx.Node) -> Any:
            out = super().run_node(n)
            idx = at.get(_layer_name(n))
            if idx is not None and isinstance(out, Tensor):
                out = out.clone()
                per = _samples(n, out)  # a view of the clone: writes reach it
                where = torch.unravel_index(torch.as_tensor(idx, dtype=torch.long), per.shape[1:])
                per[(slice(None), *where)] = 0
            return out

    with plain_forward():
        return Crash(gm).run(x)


def validate(model: nn.Module, x: Tensor, layer: str, bound: Tensor, *, sets: int, seed: int = 0) -> dict[str, Any]:
    """Random single crashes in ``layer`` (``sets`` of them, seeded), injected exactly by
    :func:`crash_outputs`, against the per-input bound ``bound`` (``(N, n_out)``): the largest measured
    change and the number of (input, output) pairs where it exceeds the bound (must be 0)."""
    sizes = layer_sizes(model, x)
    g = torch.Generator().manual_seed(seed)
    clean = crash_outputs(model, x, {})
    salient = _salient(model, x, layer, max(1, sets // 2))
    worst = torch.zeros_like(bound)
    for k in range(sets):
        # every other set: the elements whose crash changes the output most to first order (a ViT's
        # class-token row, say), else uniformly at random
        idx = salient[k // 2 % len(salient)].reshape(1) if k % 2 else torch.randint(0, sizes[layer], (1,), generator=g)
        worst = torch.maximum(worst, (crash_outputs(model, x, {layer: idx}) - clean).abs().flatten(1).double())
    return {"measured_max": float(worst.max()), "violations": int((worst > bound).sum())}


def _salient(model: nn.Module, x: Tensor, layer: str, k: int) -> Tensor:
    """The ``k`` elements of ``layer`` with the largest first-order crash effect on the outputs,
    ``sum over inputs of |v_i * d(sum |out|)/dv_i|`` (a search heuristic, not a bound)."""
    gm = trace(model)
    kept: list[Tensor] = []

    class Grad(fx.Interpreter):
        def run_node(self, n: fx.Node) -> Any:
            out = super().run_node(n)
            if _layer_name(n) == layer and isinstance(out, Tensor) and out.is_floating_point():
                out = out.detach().requires_grad_(True)
                kept.append((n, out))
            return out

    with torch.enable_grad():
        y = Grad(gm).run(x)
        if not kept or not isinstance(y, Tensor) or not y.requires_grad:
            return torch.zeros(1, dtype=torch.long)
        node, v = kept[0]
        (grad,) = torch.autograd.grad(y.abs().sum(), v)
    score = _samples(node, v.detach() * grad).abs().flatten(1).sum(0)
    return torch.topk(score, min(k, score.numel())).indices
