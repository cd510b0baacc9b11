"""Replay of a module's torch.fx trace from cached clean values: only what a fault reaches runs.

:class:`GraphReplay` traces a module once (``torch.fx.symbolic_trace``; torch's own modules stay
leaves, so each runs its own forward), runs the trace on the inputs keeping the value of every
node, and checks that the output equals the module's plain forward bit for bit. A faulty run then
starts from the *seed* nodes (those that read a faulty parameter, or the leaf-module call whose
forward hook replaces a faulty activation) and recomputes only the nodes downstream of them, in
graph order; every other node keeps its cached clean value.

Exact: a recomputed node runs the same operation on the same values as in a full forward (the
clean ones from the cache, which equal what a full forward computes: CPU kernels are
deterministic), so the faulty output equals a full faulty forward bit for bit (tested against a
deep copy). Refused (``build`` returns None, the caller then forwards whole): models fx cannot
trace, graphs with in-place operations (they would overwrite cached values), outputs that differ
from the plain forward, and caches above ``budget_bytes``.
"""
from __future__ import annotations

import operator
from typing import Any, Callable

import torch
from torch import Tensor, fx, nn

_INPLACE_FUNCS = {operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv,
                  operator.imod, operator.ipow, operator.iand, operator.ior, operator.ixor,
                  operator.ilshift, operator.irshift, operator.imatmul, operator.setitem}


def _inplace(node: fx.Node, gm: fx.GraphModule) -> bool:
    if node.op == "call_function":
        name = getattr(node.target, "__name__", "")
        return node.target in _INPLACE_FUNCS or (name.endswith("_") and not name.endswith("__")) \
            or bool(node.kwargs.get("inplace")) or "out" in node.kwargs
    if node.op == "call_method":
        return node.target.endswith("_") and not node.target.endswith("__")
    if node.op == "call_module":
        return any(getattr(m, "inplace", False) is True for m in gm.get_submodule(node.target).modules())
    return False


def _nbytes(v: Any) -> int:
    if isinstance(v, Tensor):
        return v.numel() * v.element_size()
    if isinstance(v, (tuple, list)):
        return sum(_nbytes(x) for x in v)
    return 0


class GraphReplay:
    """A traced module with every node's clean value cached (see the module docstring)."""

    max_compiled = 512

    def __init__(self, gm: fx.GraphModule, inputs: Tensor):
        self.gm = gm
        self.nodes = list(gm.graph.nodes)
        self.pos = {n: i for i, n in enumerate(self.nodes)}
        self.args = [[self.pos[a] for a in n.all_input_nodes] for n in self.nodes]
        self.inputs = inputs
        self.clean: list[Any] = []
        env = self.clean
        for n in self.nodes:
            env.append(self._exec(n, lambda a: env[self.pos[a]]))
        self.out_node = next(i for i, n in enumerate(self.nodes) if n.op == "output")

    @staticmethod
    def build(model: nn.Module, inputs: Tensor, expected: Tensor, output: Callable[[Any], Tensor],
              budget_bytes: int = 1 << 30) -> "GraphReplay | None":
        """The replay of ``model`` (traced with its parameters and submodules shared, not
        copied), or None where it is refused (see the module docstring)."""
        try:
            gm = fx.symbolic_trace(model)
        except Exception:  # noqa: BLE001 - dynamic control flow and the like: no replay
            return None
        nodes = list(gm.graph.nodes)
        extra = [n for n in nodes[1:] if n.op == "placeholder"]
        if not nodes or nodes[0].op != "placeholder" or any(not n.args for n in extra) \
                or any(_inplace(n, gm) for n in nodes):
            return None
        try:
            rep = GraphReplay(gm, inputs)
            got = output(rep.clean[rep.out_node])
        except Exception:  # noqa: BLE001
            return None
        if sum(_nbytes(v) for v in rep.clean) > budget_bytes:
            return None
        same = got.shape == expected.shape and got.dtype == expected.dtype and torch.equal(
            got.contiguous().view(torch.uint8), expected.contiguous().view(torch.uint8))
        return rep if same else None

    def _exec(self, n: fx.Node, get: Callable[[fx.Node], Any]) -> Any:
        if n.op == "placeholder":  # the input, then arguments left at their defaults
            return self.inputs if n is self.nodes[0] else n.args[0]
        args = fx.node.map_arg(n.args, get)
        kwargs = fx.node.map_arg(n.kwargs, get)
        if n.op == "get_attr":
            obj: Any = self.gm
            for part in n.target.split("."):
                obj = getattr(obj, part)
            return obj
        if n.op == "call_module":
            return self.gm.get_submodule(n.target)(*args, **kwargs)
        if n.op == "call_function":
            return n.target(*args, **kwargs)
        if n.op == "call_method":
            return getattr(args[0], n.target)(*args[1:], **kwargs)
        return args[0]  # output

    # --- seeds ---------------------------------------------------------------------------------

    def _covering_calls(self, path: str) -> list[int]:
        """Leaf-module calls whose module is ``path`` or contains it."""
        return [i for i, n in enumerate(self.nodes) if n.op == "call_module"
                and (path == n.target or path.startswith(n.target + "."))]

    def param_seeds(self, name: str) -> list[int]:
        """Nodes that read parameter ``name`` (directly, or inside a leaf module's forward)."""
        owner = name.rsplit(".", 1)[0] if "." in name else ""
        gets = [i for i, n in enumerate(self.nodes) if n.op == "get_attr"
                and (n.target == name or name.startswith(n.target + "."))]
        return gets + (self._covering_calls(owner) if owner else [])

    def module_seed(self, path: str) -> int | None:
        """The one leaf-module call inside which module ``path`` runs, or None (inlined by the
        trace, or called several times)."""
        calls = self._covering_calls(path)
        return calls[0] if len(calls) == 1 else None

    # --- faulty run ----------------------------------------------------------------------------

    def _dirty(self, seeds: frozenset[int]) -> list[int]:
        """The seeds and every node downstream of them, in graph order."""
        dirty: set[int] = set()
        for i in range(min(seeds), len(self.nodes)):
            if i in seeds or any(k in dirty for k in self.args[i]):
                dirty.add(i)
        return sorted(dirty)

    def _suffix(self, seeds: frozenset[int], patched: tuple[int, ...]) -> tuple[Callable[..., Any], list[int]]:
        """Generated code for the dirty nodes (the same calls, no per-node interpretation): a
        function of the clean values it reads (their node indices returned) and of one patch
        function per patched node, applied to that node's value."""
        dirty = self._dirty(seeds)
        if self.out_node not in dirty:
            return (lambda *_: self.clean[self.out_node]), []
        inside = set(dirty)
        ext = sorted({k for i in dirty for k in self.args[i] if k not in inside})
        g = fx.Graph()
        remap = {self.nodes[k]: g.placeholder(f"clean_{k}") for k in ext}
        fns = {i: g.placeholder(f"patch_{i}") for i in patched}
        for i in dirty:
            n = self.nodes[i]
            if n.op == "output":
                g.output(fx.node.map_arg(n.args[0], lambda a: remap[a]))
            else:
                remap[n] = g.node_copy(n, lambda a: remap[a])
                if i in fns:
                    remap[n] = g.call_function(_call, (fns[i], remap[n]))
        return fx.GraphModule(self.gm, g), ext

    def run(self, seeds: set[int], patches: dict[int, Callable[[Any], Any]] | None = None) -> Any:
        """The output with the seed nodes and everything downstream of them recomputed (by code
        generated once per seed set, up to ``max_compiled`` sets; interpreted beyond), the value
        of each node in ``patches`` replaced by ``patches[node](value)``."""
        patches = patches or {}
        seeds = set(seeds) | set(patches)
        if not seeds:
            return self.clean[self.out_node]
        patched = tuple(sorted(patches))
        key = (frozenset(seeds), patched)
        cache = self.__dict__.setdefault("_compiled", {})
        if key in cache or len(cache) < self.max_compiled:
            if key not in cache:
                cache[key] = self._suffix(key[0], patched)
            fn, ext = cache[key]
            return fn(*[self.clean[k] for k in ext], *[patches[i] for i in patched])
        env: dict[int, Any] = {}
        clean, pos = self.clean, self.pos

        def get(a: fx.Node) -> Any:
            k = pos[a]
            return env[k] if k in env else clean[k]

        for i in range(min(seeds), len(self.nodes)):
            if i in seeds or any(k in env for k in self.args[i]):
                env[i] = self._exec(self.nodes[i], get)
                if i in patches:
                    env[i] = patches[i](env[i])
        return env.get(self.out_node, clean[self.out_node])

    def node_shapes(self, inputs: Tensor) -> dict[int, tuple[int, ...]]:
        """Shapes of the tensor node values for other ``inputs`` (nothing cached)."""
        env: list[Any] = []
        keep, self.inputs = self.inputs, inputs
        try:
            for n in self.nodes:
                env.append(self._exec(n, lambda a: env[self.pos[a]]))
        finally:
            self.inputs = keep
        return {i: tuple(v.shape) for i, v in enumerate(env) if isinstance(v, Tensor)}

    def tensor_nodes(self) -> dict[int, Tensor]:
        """The operation nodes (functions and methods, not modules) whose clean value is a
        non-empty floating tensor: activations that no module returns (softmax outputs,
        attention scores, residual sums, products of two activations...)."""
        return {i: v for i, (n, v) in enumerate(zip(self.nodes, self.clean))
                if n.op in ("call_function", "call_method") and isinstance(v, Tensor)
                and v.is_floating_point() and v.numel() > 0}


def _call(fn: Callable[[Any], Any], value: Any) -> Any:
    return fn(value)
