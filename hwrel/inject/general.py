"""Exact general fault injection: any ``nn.Module`` whose plain forward runs.

The fast engine (:mod:`hwrel.inject.engine`) needs the model as a :class:`hwrel.network.Network`;
this path needs nothing but a forward: ViTs (``nn.TransformerEncoderLayer``), MobileNets
(depthwise convolutions, Hardswish), causal LMs (``nn.Embedding``, ``scaled_dot_product_attention``,
RMSNorm, SwiGLU), already-quantized Brevitas models, anything.

Fault sites (:class:`GeneralInjector`):

* ``weight``/``bias``: one element of any parameter (linear and conv weights, biases, embedding
  rows, norm parameters, class tokens, position embeddings...); ``layer`` is the parameter's full
  name (``"blocks.0.self_attn.in_proj_weight"``; a module path with ``site`` also works: layer
  ``"head"`` site ``"bias"`` is ``head.bias``); ``site`` is ``bias`` when the name's last part
  contains "bias", else ``weight``. Tied parameters are one site (a fault hits every use).
* ``neuron``: one element of a submodule's output (``layer`` = module path; ``path[k]`` for the
  k-th tensor of a tuple output, e.g. ``self_attn[1]`` for returned attention weights;
  ``path@n`` for the n-th call of a module called several times). ``index`` is a flat index into
  the per-sample output and the fault hits every sample (outputs without a batch dimension, such
  as a position embedding of ``arange(T)``, are shared by all samples and indexed whole).

Storage (``format``): a Brevitas layer's weight is held as its quantizer's integer codes (scale and
zero point fixed; a fault replaces the quantizer's output value ``(code' - zero_point) * scale`` by a
forward hook, as the fast engine's codes do). Every other floating parameter is held in the format: float formats round it by
torch's cast (the clean model computes with the rounded values); an integer format ``intB``
stores every ``weight`` site as per-tensor symmetric round-to-nearest codes with the scale fixed
(:meth:`hwrel.formats.IntStorage.from_float`) and keeps ``bias`` sites in fp32; a parameter whose
own dtype is fp16/bf16 is stored in that dtype. Bit faults flip (or stick) bits of the stored word
through :mod:`hwrel.formats`, exactly as the fast engine does; ``range_limit`` restricts every
stored value, clean and faulty.

Exactness guarantee (tested on the three model kinds, every site kind, single and multiple faults,
bit for bit): the faulty output of a configuration equals a deep copy of the (stored) model with
the new values written into its parameters, and forward hooks replacing the faulty activations,
run forward on the same batch under :func:`plain_forward`. Forwards run under
:func:`plain_forward` (``torch.no_grad``, torch's fused multi-head-attention fast path off: with it
on, a forward hook would switch the layer to the slow path and so change the clean bits too).

Efficiency: one private copy of the model, made once (the user's model is never touched); a fault
writes its value in place, the whole batch runs forward once, the old words are restored bit for
bit. No deep copy per fault.
"""
from __future__ import annotations

import copy
import math
from collections import defaultdict
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from hwrel.errors import HwrelError, check
from hwrel.formats import (FloatFormat, Format, IntFormat, IntStorage, from_bits, parse_format,
                           range_restrict, to_bits)
from hwrel.inject.faults import Fault, FaultConfig, as_config
from hwrel.inject.metrics import Metric, resolve_metric
from hwrel.inject.general_sites import (_DTYPE_FORMATS, _NO_SITE, ActSite, ParamSite, _act_name,
                                       _brevitas_weights, _code_hook, _eval, _tensors, _Write,
                                       expose_functional_activations, model_output, plain_forward, site_kind)
from hwrel.inject.replay import GraphReplay

FP32 = parse_format("fp32")
__all__ = ["ActSite", "GeneralInjector", "ParamSite", "model_output", "plain_forward", "site_kind"]


class GeneralInjector:
    """Exact fault injection on any module and one batch of inputs (see the module docstring).

    Args:
        model: any ``nn.Module`` (copied once, never modified); its forward takes ``inputs``.
        inputs: the batch (floats, or integer tokens ``(B, T)`` for a language model).
        labels: class labels ``(B,)`` (classifier metric), or next-token targets ``(B, T - 1)``.
        format: storage format of the parameters (see the module docstring).
        range_limit: ``R`` -> every stored value restricted to ``[-R, R]`` (NaN -> 0).
        metric: ``"classifier"``, ``"next-token"``, a metric object, or None (auto:
            :func:`hwrel.inject.metrics.resolve_metric`).
        buffers: also offer floating buffers (batch-norm running statistics...) as sites.
    """

    path = "general"

    def __init__(self, model: nn.Module, inputs: Tensor, labels: Tensor | None = None, *,
                 format: str | Format = "fp32", range_limit: float | None = None, metric: Any = None,
                 buffers: bool = False, replay: bool = True, device: str | torch.device = "cpu") -> None:
        check(isinstance(model, nn.Module), f"expected an nn.Module, got {type(model).__name__}")
        x = torch.as_tensor(inputs)
        check(x.dim() >= 1 and x.shape[0] > 0, f"inputs must be a non-empty batch, got shape {tuple(x.shape)}")
        self.device = torch.device(device)
        self.format = format if isinstance(format, (IntFormat, FloatFormat)) else parse_format(format)
        self.range_limit = None if range_limit is None else float(range_limit)
        if self.range_limit is not None:
            check(math.isfinite(self.range_limit) and self.range_limit > 0,
                  f"range_limit must be a positive finite number, got {range_limit!r}")
        self.model = _eval(copy.deepcopy(model)).to(self.device)
        expose_functional_activations(self.model)  # encoder activations given by name: sites too
        self.inputs = x.to(self.device)
        self.batch = int(x.shape[0])
        self._tensors: dict[str, Tensor] = {}
        self._codes: dict[str, tuple[Tensor, Tensor]] = {}  # int storage: (flat codes, scale)
        self.params: dict[str, ParamSite] = {}
        self._store(buffers)
        try:
            self.acts = self._probe()
            with plain_forward():
                self.clean = model_output(self.model(self.inputs))
        except HwrelError:
            raise
        except Exception as exc:  # the user's forward: one line, no traceback
            lines = str(exc).strip().splitlines()
            raise HwrelError(f"the model's forward fails on inputs of shape {tuple(x.shape)} "
                             f"({type(exc).__name__}: {lines[0] if lines else ''})") from None
        lab = None if labels is None else torch.as_tensor(labels).to(self.device)
        self.metric: Metric = resolve_metric(metric, self.inputs, self.clean, lab)
        self.replay: GraphReplay | None = None
        if replay:
            with plain_forward():
                self.replay = GraphReplay.build(self.model, self.inputs, self.clean, model_output)
        self._seed_cache: dict[str, list[int] | int | None] = {}
        self._nodes: dict[str, int] = {}  # "fx:<node>" activation sites -> replay node
        if self.replay is not None:
            self._node_sites()

    # --- storage -------------------------------------------------------------------------------

    def _param_format(self, name: str, t: Tensor) -> Format:
        if t.dtype in _DTYPE_FORMATS:
            return parse_format(_DTYPE_FORMATS[t.dtype])
        check(t.dtype in (torch.float32, torch.float64),
              f"parameter {name}: dtype {t.dtype} has no storage format")
        if isinstance(self.format, IntFormat) and site_kind(name) == "bias":
            return FP32
        return self.format

    def _restrict(self, t: Tensor) -> Tensor:
        return t if self.range_limit is None else range_restrict(t, self.range_limit)

    def _store(self, buffers: bool) -> None:
        by_id: dict[int, list[str]] = defaultdict(list)
        for name, t in [*self.model.named_parameters(remove_duplicate=False),
                        *self.model.named_buffers(remove_duplicate=False)]:
            by_id[id(t)].append(name)
        self._aliases = {names[0]: names for names in by_id.values()}  # a tied tensor's every name
        self._quant = _brevitas_weights(self.model)
        for name, q in self._quant.items():  # stored as the quantizer's codes, scale fixed
            t = dict(self.model.named_parameters())[name]
            t.requires_grad_(False)
            self._tensors[name] = t
            self.params[name] = ParamSite(name, "weight", tuple(t.shape), q.fmt)
        named = [(n, t) for n, t in self.model.named_parameters() if n not in self._quant]
        if buffers:
            named += [(n, b) for n, b in self.model.named_buffers() if b.is_floating_point()]
        with torch.no_grad():
            for name, t in named:
                if not t.is_floating_point():
                    continue
                if isinstance(t, nn.Parameter):
                    t.requires_grad_(False)
                fmt = self._param_format(name, t)
                if isinstance(fmt, IntFormat):
                    st = IntStorage.from_float(t.detach().cpu(), fmt)
                    self._codes[name] = (st.codes.reshape(-1), st.scale)
                    value = st.dequantize()
                else:
                    value = from_bits(fmt, to_bits(fmt, t.detach().cpu()))
                t.copy_(self._restrict(value.to(self.device)).to(t.dtype))
                self._tensors[name] = t
                self.params[name] = ParamSite(name, site_kind(name), tuple(t.shape), fmt)

    # --- activation sites ----------------------------------------------------------------------

    def _record(self, x: Tensor) -> dict[tuple[str, int, int | None], tuple[int, ...]]:
        seen: dict[tuple[str, int, int | None], tuple[int, ...]] = {}
        calls: dict[str, int] = defaultdict(int)
        handles = []

        def hook(name: str):
            def fn(mod: nn.Module, inp: Any, out: Any) -> None:
                k = calls[name]
                calls[name] += 1
                for slot, t in _tensors(out):
                    if t.is_floating_point() and t.numel():
                        seen[(name, k, None if isinstance(out, Tensor) else slot)] = tuple(t.shape)
            return fn

        for name, mod in self.model.named_modules():
            if name and not isinstance(mod, _NO_SITE):
                handles.append(mod.register_forward_hook(hook(name)))
        try:
            with plain_forward():
                self.model(x)
        finally:
            for h in handles:
                h.remove()
        return seen

    def _probe(self) -> dict[str, ActSite]:
        full = self._record(self.inputs)
        one: dict = {}
        if self.batch > 1:
            try:
                one = self._record(self.inputs[:1])
            except Exception:  # a model that needs its batch size: leading dims equal to B are batch
                one = {}
        acts = {}
        self._calls: dict[str, int] = {}
        for mod, call, _ in full:
            self._calls[mod] = max(self._calls.get(mod, 0), call + 1)
        for (mod, call, slot), shape in full.items():
            small = one.get((mod, call, slot))
            batched = len(shape) >= 1 and shape[0] == self.batch and (
                self.batch == 1 or small is None or (small[0] == 1 and small[1:] == shape[1:]))
            name = _act_name(mod, call, slot)
            acts[name] = ActSite(name, mod, call, slot, shape[1:] if batched else shape, batched)
        return acts

    def _node_sites(self) -> None:
        """Every operation node of the trace with a floating tensor value, as ``fx:<node name>``."""
        vals = self.replay.tensor_nodes()
        one: dict[int, tuple[int, ...]] = {}
        if self.batch > 1:
            try:
                with plain_forward():
                    one = self.replay.node_shapes(self.inputs[:1])
            except Exception:  # noqa: BLE001 - a model that needs its batch size
                one = {}
        for i, v in vals.items():
            shape, small = tuple(v.shape), one.get(i)
            batched = len(shape) >= 1 and shape[0] == self.batch and (
                self.batch == 1 or small is None or (small[0] == 1 and small[1:] == shape[1:]))
            name = "fx:" + self.replay.nodes[i].name
            self.acts[name] = ActSite(name, name, 0, None, shape[1:] if batched else shape, batched)
            self._nodes[name] = i

    # --- faults --------------------------------------------------------------------------------

    def _param_of(self, f: Fault) -> str:
        if f.layer in self.params:
            return f.layer
        joined = f"{f.layer}.{f.site}" if f.layer else f.site
        if joined in self.params:
            return joined
        some = ", ".join(list(self.params)[:8])
        raise HwrelError(f"{f.site} fault: no parameter {f.layer!r} (nor {joined!r}) in the model; "
                         f"parameters: {some}{', ...' if len(self.params) > 8 else ''}")

    def _resolve_param(self, f: Fault) -> _Write:
        name = self._param_of(f)
        ps, t = self.params[name], self._tensors[name]
        where = f"{f.site} fault at {name}"
        check(f.index < ps.numel, f"{where}: index {f.index} outside its {ps.numel} elements "
              f"(shape {ps.shape})")
        fmt = ps.fmt
        if f.format is not None:
            got = f.format if isinstance(f.format, (IntFormat, FloatFormat)) else parse_format(f.format)
            check(got.name == fmt.name, f"{where}: format {got.name} does not match its storage {fmt.name}")
        check(f.bits[-1] < fmt.bits, f"{where} index {f.index}: bit {f.bits[-1]} beyond {fmt.name} "
              f"(bits 0..{fmt.bits - 1})")
        mask = sum(1 << b for b in f.bits)
        if name in self._quant:
            return self._resolve_quant(name, f, mask)
        old = t.reshape(-1)[f.index].clone()
        stored = self._codes[name][0][f.index] if name in self._codes else old.cpu()
        raw = int(to_bits(fmt, stored))
        raw = raw ^ mask if f.kind == "bitflip" else raw | mask if f.kind == "stuck1" else raw & ~mask
        word = from_bits(fmt, torch.tensor(raw))
        if name in self._codes:
            scale = self._codes[name][1]
            value = (word.to(torch.float64) * scale.to(torch.float64)).to(scale.dtype)
        else:
            value = word
        new = self._restrict(value.reshape(())).to(device=t.device, dtype=t.dtype)
        return _Write(name, f.index, old, new)

    def _resolve_quant(self, name: str, f: Fault, mask: int) -> _Write:
        q, fmt = self._quant[name], self.params[name].fmt
        raw = int(to_bits(fmt, q.codes[f.index]))
        raw = raw ^ mask if f.kind == "bitflip" else raw | mask if f.kind == "stuck1" else raw & ~mask
        code = from_bits(fmt, torch.tensor(raw)).to(torch.float32)
        new = self._restrict((code - q.zero_point[f.index]) * q.scale[f.index])
        return _Write(name, f.index, q.value[f.index].clone(), new.to(self.device), q.quantizer)

    def _check_act(self, f: Fault) -> ActSite:
        if f.layer not in self.acts:
            some = ", ".join(list(self.acts)[:8])
            raise HwrelError(f"neuron fault: no module output {f.layer!r} in the model; outputs: "
                             f"{some}{', ...' if len(self.acts) > 8 else ''}")
        a = self.acts[f.layer]
        check(f.index < a.numel, f"neuron fault at {f.layer}: index {f.index} outside its {a.numel} "
              f"values (shape {a.shape})")
        if f.kind == "bitflip":
            fmt = parse_format(f.format) if isinstance(f.format, str) else (f.format or self._act_format())
            check(isinstance(fmt, FloatFormat), f"neuron fault at {f.layer} index {f.index}: bit flips of "
                  f"activations need a float format, got {fmt.name}")
            check(f.bit < fmt.bits, f"neuron fault at {f.layer} index {f.index}: bit {f.bit} beyond "
                  f"{fmt.name} (bits 0..{fmt.bits - 1})")
        return a

    def _act_format(self) -> FloatFormat:
        return self.format if isinstance(self.format, FloatFormat) else FP32

    def _apply_act(self, t: Tensor, a: ActSite, faults: list[Fault]) -> Tensor:
        t = t.clone()  # same strides as the clean value: downstream kernels see the same layout
        for f in faults:
            pos = tuple(int(v) for v in np.unravel_index(f.index, a.shape))
            at = (slice(None), *pos) if a.batched else pos
            if f.kind == "crash":
                t[at] = 0.0
            elif f.kind in ("stuck", "byzantine"):
                t[at] = f.value
            else:
                fmt = parse_format(f.format) if isinstance(f.format, str) else (f.format or self._act_format())
                t[at] = from_bits(fmt, to_bits(fmt, t[at]) ^ (1 << f.bit)).to(t.dtype)
        return t

    def _prepare(self, cfg: tuple[Fault, ...]) -> tuple[list[_Write], dict[str, dict[int, list[Fault]]]]:
        seen = set()
        writes: list[_Write] = []
        acts: dict[str, dict[int, list[Fault]]] = defaultdict(lambda: defaultdict(list))
        for f in cfg:
            check(f.site != "synapse", f"synapse fault at {f.layer}: synapse faults need the fast engine "
                  "(a Network); the general path injects weight, bias and neuron faults")
            if f.site == "neuron":
                a = self._check_act(f)
                key = ("neuron", a.name, f.index)
            else:
                w = self._resolve_param(f)
                key = ("param", w.param, f.index)
                writes.append(w)
            if key in seen:
                raise HwrelError(f"two faults at {f.layer} index {f.index} in one configuration; give "
                                 "several bits of one word as one fault (bits=...)")
            seen.add(key)
            if f.site == "neuron":
                acts[a.module][a.call].append(f)
        return writes, acts

    def _forward(self, writes: list[_Write], acts: dict[str, dict[int, list[Fault]]]) -> Tensor:
        handles = []
        quant: dict[str, list[_Write]] = defaultdict(list)
        for w in writes:
            if w.quant is not None:
                quant[w.quant].append(w)
        writes = [w for w in writes if w.quant is None]
        seeds = self._seeds(writes, acts) if not quant else None
        if seeds is None and any(m in self._nodes for m in acts):
            check(all(m in self._nodes or self._seed_cache.get("m:" + m) is not None for m in acts),
                  "faults at trace nodes (fx:...) cannot be combined with faults at module outputs "
                  "the trace does not call as one module")
            seeds = set(range(len(self.replay.nodes)))  # the whole trace, patched
        mods = dict(self.model.named_modules()) if acts or quant else {}
        patches = {}
        for mod_name, by_call in acts.items():
            if mod_name in self._nodes:
                site = self.acts[mod_name]
                patches[self._nodes[mod_name]] = (lambda t, site=site, fs=by_call[0]: self._apply_act(t, site, fs))
                continue
            calls = [0]

            def hook(mod: nn.Module, inp: Any, out: Any, by_call=by_call, calls=calls, mod_name=mod_name) -> Any:
                k = calls[0]
                calls[0] += 1
                if k not in by_call:
                    return None
                groups: dict[int | None, list[Fault]] = defaultdict(list)
                for f in by_call[k]:
                    groups[self.acts[f.layer].slot].append(f)
                if isinstance(out, Tensor):
                    return self._apply_act(out, self.acts[_act_name(mod_name, k, None)], groups[None])
                out = list(out)
                for slot, fs in groups.items():
                    out[slot] = self._apply_act(out[slot], self.acts[_act_name(mod_name, k, slot)], fs)
                return tuple(out)
            handles.append(mods[mod_name].register_forward_hook(hook))
        for qname, ws in quant.items():
            handles.append(mods[qname].register_forward_hook(_code_hook(ws)))
        done: list[_Write] = []
        try:
            for w in writes:
                self._tensors[w.param].view(-1)[w.index] = w.new
                done.append(w)
            with plain_forward():
                if seeds is not None:
                    return model_output(self.replay.run(seeds, patches))
                return model_output(self.model(self.inputs))
        finally:
            for w in reversed(done):  # restore the stored words bit for bit
                self._tensors[w.param].view(-1)[w.index] = w.old
            for h in handles:
                h.remove()

    def _seeds(self, writes: list[_Write], acts: dict[str, dict[int, list[Fault]]]) -> set[int] | None:
        """The replay's seed nodes of a configuration, or None: forward whole (no replay, or a
        fault the replay cannot place: a parameter it does not see read, an activation of a
        module the trace inlined or that runs several times)."""
        if self.replay is None:
            return None
        seeds: set[int] = set()
        for w in writes:
            key = "p:" + w.param
            if key not in self._seed_cache:
                seen = sorted({k for alias in self._aliases.get(w.param, [w.param])
                               for k in self.replay.param_seeds(alias)})  # tied weights: every use
                self._seed_cache[key] = seen or None
            got = self._seed_cache[key]
            if got is None:
                return None
            seeds.update(got)
        for mod, by_call in acts.items():
            if mod in self._nodes:
                continue  # a patch of the replay, not a seed
            key = "m:" + mod
            if key not in self._seed_cache:
                once = self._calls.get(mod, 0) == 1
                self._seed_cache[key] = self.replay.module_seed(mod) if once else None
            got = self._seed_cache[key]
            if got is None or set(by_call) != {0}:
                return None
            seeds.add(got)
        return seeds

    # --- public API ----------------------------------------------------------------------------

    def outputs(self, config: FaultConfig) -> Tensor:
        """Exact faulty output of one configuration (faults applied together)."""
        return self._forward(*self._prepare(as_config(config)))

    def run(self, configs: Sequence[FaultConfig]) -> dict[str, np.ndarray]:
        """Per configuration, in order: ``old_value``/``new_value`` (float32; the stored value before
        and after for a single weight/bias fault, the transmitted value of a single neuron
        crash/stuck/byzantine fault; NaN otherwise) and the metric's columns
        (:mod:`hwrel.inject.metrics`)."""
        cfgs = [as_config(c) for c in configs]
        n = len(cfgs)
        res = {"old_value": np.full(n, np.nan, np.float32), "new_value": np.full(n, np.nan, np.float32)}
        for key in self.metric.columns:
            res[key] = np.zeros(n, bool if key == "nonfinite" else np.float64)
        for i, cfg in enumerate(cfgs):
            writes, acts = self._prepare(cfg)
            out = self._forward(writes, acts)
            for key, v in self.metric.measure(out, self.clean).items():
                res[key][i] = v
            if len(cfg) == 1:
                f = cfg[0]
                if writes:
                    res["old_value"][i], res["new_value"][i] = float(writes[0].old), float(writes[0].new)
                elif f.kind in ("crash", "stuck", "byzantine"):
                    res["new_value"][i] = 0.0 if f.kind == "crash" else f.value
        return res

    def storage_format(self, layer: str) -> Format:
        """The format bit faults of parameter ``layer`` flip."""
        return self.params[self._param_of(Fault("weight", layer, 0, "bitflip", bit=0))].fmt

    def sites(self, site: str) -> dict[str, int]:
        """Names and sizes of the sites of a kind (``weight``, ``bias``: parameters; ``neuron``:
        module outputs; ``node``: the trace's operation nodes, ``fx:<name>``, injected as neuron
        faults), in model order."""
        if site == "neuron":
            return {k: a.numel for k, a in self.acts.items() if k not in self._nodes}
        if site == "node":
            return {k: self.acts[k].numel for k in self._nodes}
        return {k: p.numel for k, p in self.params.items() if p.site == site}

    def random_faults(self, n: int, *, site: str = "weight", kind: str = "bitflip", seed: int = 0,
                      layers: Sequence[str] | None = None) -> list[Fault]:
        """``n`` random single faults, uniform over every (element, bit) site of ``layers``
        (default all sites of the kind); reproducible from ``seed`` (no global RNG)."""
        rng = np.random.default_rng(seed)
        table = self.sites(site)
        names = list(layers) if layers is not None else list(table)
        for nm in names:
            check(nm in table, f"unknown {site} site {nm!r}")
        sizes = np.array([table[nm] for nm in names], dtype=np.int64)
        check(sizes.sum() > 0, f"no {site} sites")
        flat = rng.integers(0, int(sizes.sum()), n)
        which = np.searchsorted(np.cumsum(sizes), flat, side="right")
        local = flat - np.concatenate([[0], np.cumsum(sizes)])[which]
        widths = [self._act_format().bits if site == "neuron" else self.params[nm].fmt.bits for nm in names]
        u = rng.random(n)
        out = []
        for k in range(n):
            nm, idx = names[which[k]], int(local[k])
            if kind in ("bitflip", "stuck0", "stuck1"):
                out.append(Fault(site, nm, idx, kind, bit=int(u[k] * widths[which[k]])))
            elif kind == "crash":
                out.append(Fault(site, nm, idx, kind))
            else:
                raise HwrelError(f"random_faults supports bitflip, stuck0, stuck1 and crash, got {kind!r}")
        return out
