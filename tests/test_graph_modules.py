"""Graph bounds through ``nn.MultiheadAttention`` and ``nn.TransformerEncoderLayer``
(hwrel.bounds.graph_modules: traced as the operations they compute).

- fidelity: the traced graph computes bit for bit what the module computes (fast path off, as
  hwrel's injection runs it), over a grid of configurations;
- per rule (the style of tests/test_graph_bounds.py): random input boxes with errors, through the
  traced attention module in exact mode, against the module itself in float32 (faulty) and float64
  (exact clean); the harness finds a violation when the error bound is halved; the same for the
  ``baddbmm`` rule (an additive mask with 0, finite and -inf entries);
- per model: random crash sets in the encoder layers' activations, injected into a deep copy of
  the model (its ``activation`` attribute wrapped, the model's own forward), never exceed the bound.
"""
from __future__ import annotations

import copy
import math
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from general_models import TinyViT  # noqa: E402
from test_graph_bounds import _box, _check  # noqa: E402

from hwrel.bounds import graph_rules as R  # noqa: E402
from hwrel.bounds.faults import as_fault  # noqa: E402
from hwrel.bounds.graph import _Interpreter, graph_bound, graph_layers, layer_sizes, trace, validate  # noqa: E402
from hwrel.errors import UnsupportedLayerError  # noqa: E402
from hwrel.inject.general_sites import plain_forward  # noqa: E402


def _batch_of(pad: torch.Tensor, batch: int) -> torch.Tensor:
    """A key padding mask for every sample (one node of the trace, a constant)."""
    return pad.unsqueeze(0).expand(batch, -1)


torch.fx.wrap("_batch_of")


class Attn(nn.Module):
    """One ``nn.MultiheadAttention`` call, as models make it (``[0]`` of the output tuple)."""

    def __init__(self, dim: int = 8, heads: int = 2, *, batch_first: bool = True, need_weights: bool = True,
                 mask: str = "none", padding: bool = False, causal: bool = False, t: int = 5, cross: bool = False,
                 **mha):
        super().__init__()
        self.mha = nn.MultiheadAttention(dim, heads, batch_first=batch_first, **mha)
        self.need_weights, self.causal, self.cross, self.batch_first = need_weights, causal, cross, batch_first
        g = torch.Generator().manual_seed(t)
        keys = t + 2 if cross else t
        if mask == "bool" or causal:
            m = torch.ones(t, keys, dtype=torch.bool).triu(1)
        elif mask == "float":
            m = torch.zeros(t, keys).masked_fill(torch.rand(t, keys, generator=g) < 0.3, -math.inf)
            m[:, 0] = 0.0  # no row fully masked
        else:
            m = None
        self.register_buffer("mask", m)
        self.register_buffer("pad", torch.tensor([False] * (keys - 1) + [True]) if padding else None)
        self.kv = nn.Linear(dim, mha.get("kdim") or dim) if cross else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mask = None if self.mask is None else self.mask if self.mask.dtype == torch.bool else self.mask.to(x.dtype)
        pad = None if self.pad is None else _batch_of(self.pad, x.shape[0])
        q = x if self.batch_first else x.transpose(0, 1)
        if self.cross:  # keys and values: a second sequence derived from x (2 more positions)
            kv = self.kv(torch.cat([x, x[:, :2]], dim=1))
            kv = kv if self.batch_first else kv.transpose(0, 1)
            out = self.mha(q, kv, kv, key_padding_mask=pad, need_weights=self.need_weights, attn_mask=mask)[0]
        else:
            out = self.mha(q, q, q, key_padding_mask=pad, need_weights=self.need_weights, attn_mask=mask,
                           is_causal=self.causal)[0]
        return out if self.batch_first else out.transpose(0, 1)


CONFIGS = [
    {},
    {"batch_first": False},
    {"need_weights": False},
    {"need_weights": False, "batch_first": False, "mask": "bool"},
    {"mask": "bool", "padding": True},
    {"mask": "float", "need_weights": False, "padding": True},
    {"mask": "float", "bias": False},
    {"causal": True, "need_weights": False},
    {"padding": True, "need_weights": False},
    {"add_bias_kv": True, "add_zero_attn": True, "padding": True, "mask": "bool"},
    {"cross": True, "mask": "bool", "need_weights": False},
    {"cross": True, "kdim": 6, "vdim": 6, "batch_first": False},
]


def _attn(cfg: dict, seed: int = 0) -> Attn:
    torch.manual_seed(seed)
    m = Attn(**cfg).eval()
    with torch.no_grad():  # weights large enough for the softmax to be far from uniform
        for p in m.parameters():
            p.mul_(2.0)
    return m


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()) or "default")
def test_traced_attention_computes_what_the_module_computes(cfg):
    m = _attn(cfg)
    x = torch.randn(3, 5, 8, generator=torch.Generator().manual_seed(1))
    gm = trace(m)
    assert not any(n.op == "call_module" and "mha" in str(n.target) for n in gm.graph.nodes)  # decomposed
    with plain_forward():
        assert torch.equal(gm(x), m(x)), cfg


def test_traced_encoder_layers_compute_what_the_modules_compute():
    for norm_first in (True, False):
        for act in ("relu", "gelu", nn.GELU(approximate="tanh")):
            for batch_first in (True, False):
                torch.manual_seed(0)
                layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, activation=act, batch_first=batch_first,
                                                   norm_first=norm_first).eval()
                x = torch.randn(3, 5, 8, generator=torch.Generator().manual_seed(1))
                gm = trace(layer)
                with plain_forward():
                    assert torch.equal(gm(x), layer(x)), (norm_first, act, batch_first)
                assert graph_layers(layer) == ["activation"]
    enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval()  # a root encoder
    with plain_forward():
        assert torch.equal(trace(enc)(x), enc(x))
    assert graph_layers(enc) == ["layers.0.activation", "layers.1.activation"]


class Encoder(nn.Module):
    """``nn.TransformerEncoder`` (2 layers, final norm) on embedded inputs, with masks."""

    def __init__(self, batch_first: bool, causal: str, padding: bool, t: int = 6):
        super().__init__()
        self.embed = nn.Linear(3, 8)
        layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=batch_first)
        self.enc = nn.TransformerEncoder(layer, 2, norm=nn.LayerNorm(8), enable_nested_tensor=False)
        self.batch_first, self.causal = batch_first, causal
        mask = None
        if causal in ("bool", "detected"):  # "detected": a float causal mask the encoder recognizes
            mask = torch.ones(t, t, dtype=torch.bool).triu(1)
            if causal == "detected":
                mask = nn.Transformer.generate_square_subsequent_mask(t)
        self.register_buffer("mask", mask)
        self.register_buffer("pad", torch.tensor([False] * (t - 1) + [True]) if padding else None)
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        h = h if self.batch_first else h.transpose(0, 1)
        pad = None if self.pad is None else _batch_of(self.pad, x.shape[0])
        h = self.enc(h, mask=self.mask, src_key_padding_mask=pad)
        h = h if self.batch_first else h.transpose(0, 1)
        return self.head(h[:, 0])


ENCODERS = [(bf, c, p) for bf in (True, False) for c in ("none", "bool", "detected") for p in (False, True)]


@pytest.mark.parametrize("cfg", ENCODERS)
def test_traced_transformer_encoder_computes_what_the_module_computes(cfg):
    torch.manual_seed(0)
    model = Encoder(*cfg).eval()
    x = torch.randn(4, 6, 3, generator=torch.Generator().manual_seed(1))
    with plain_forward():
        assert torch.equal(trace(model)(x), model(x)), cfg
    assert graph_layers(model) == ["enc.layers.0.activation", "enc.layers.1.activation"]


@pytest.mark.parametrize("cfg", [(True, "detected", True), (False, "bool", False)])
def test_transformer_encoder_bound_holds_on_random_crashes(cfg):
    torch.manual_seed(1)
    model = Encoder(*cfg).eval()
    x = torch.randn(10, 6, 3, generator=torch.Generator().manual_seed(2))
    for failures in ({"enc.layers.1.activation": 1}, {"enc.layers.0.activation": 2, "enc.layers.1.activation": 1}):
        bound, worst = _crash_check(model, x, failures, trials=8, first=16)  # every other set: token 0's row
        assert (worst <= bound).all() and bool(worst.max() > 0)


def _attention_rule(m: nn.Module):
    gm = trace(m)
    crash = as_fault("crash")

    def rule(v: R.Val) -> R.Val:
        return _Interpreter(gm, crash, {}).run(v.lo, v.hi, v.e)

    m64 = copy.deepcopy(m).double()

    def f32(x):
        with plain_forward():
            return m(x)

    def f64(x):
        with plain_forward():
            return m64(x)

    return rule, f32, f64


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), cfg=st.sampled_from(CONFIGS), err=st.sampled_from([0.0, 1e-3, 0.1]),
       width=st.sampled_from([0.0, 0.05]))
def test_attention_module_is_sound(seed, cfg, err, width):
    """The traced ``nn.MultiheadAttention`` (every rule it is made of) on random boxes with errors:
    the exact clean output in the interval, the float32 faulty one within e of it."""
    g = torch.Generator().manual_seed(seed)
    rule, f32, f64 = _attention_rule(_attn(cfg, seed % 7))
    v = _box(g, (2, 5, 8), 1.0, width, err)
    assert _check(rule, [v], f32, f64, g) == 0


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), m=st.integers(1, 8), k=st.integers(1, 24), err=st.sampled_from([0.0, 1e-3, 0.5]),
       kind=st.sampled_from(["zero", "inf", "finite"]))
def test_baddbmm_rule_is_sound(seed, m, k, err, kind):
    g = torch.Generator().manual_seed(seed)
    a, b = _box(g, (2, m, k), 1.0, 0.2, err), _box(g, (2, k, m), 1.0, 0.2, err)
    c = torch.zeros(1, m, m, dtype=torch.float64)
    if kind != "zero":
        c = torch.randn(1, m, m, generator=g, dtype=torch.float64) * 3
        if kind == "inf":
            c = c.masked_fill(torch.rand(1, m, m, generator=g) < 0.4, -math.inf)
    c = c.float().double()

    def bmm(x, y):
        return torch.baddbmm(c.to(x.dtype), x, y)

    assert _check(lambda x, y: R.masked_matmul(x, y, c), [a, b], bmm, bmm, g) == 0


def test_attention_harness_finds_a_weakened_rule():
    """With the error bound halved the same harnesses find violations: they have power. The whole
    attention module at width 2, one head, 2-3 tokens (there the composed bound is within 2x of
    what points reach; at width 8 and 5 tokens within about 10x)."""
    g = torch.Generator().manual_seed(0)
    for cfg in ({}, {"need_weights": False}, {"mask": "bool", "padding": True, "t": 3},
                {"mask": "bool", "padding": True, "t": 3, "need_weights": False, "batch_first": False}):
        torch.manual_seed(0)
        rule, f32, f64 = _attention_rule(Attn(dim=2, heads=1, **{"t": 2, **cfg}).eval())
        v = _box(g, (4, cfg.get("t", 2), 2), 1.0, 0.0, 0.1)
        assert _check(rule, [v], f32, f64, torch.Generator().manual_seed(1)) == 0, cfg
        assert _check(rule, [v], f32, f64, torch.Generator().manual_seed(1), shrink=0.5) > 0, cfg
    a, b = _box(g, (2, 4, 16), 1.0, 0.0, 0.5), _box(g, (2, 16, 4), 1.0, 0.0, 0.5)
    c = torch.randn(1, 4, 4, generator=g, dtype=torch.float64).float().double()

    def bmm(x, y):
        return torch.baddbmm(c.to(x.dtype), x, y)

    rule2 = lambda x, y: R.masked_matmul(x, y, c)  # noqa: E731
    assert _check(rule2, [a, b], bmm, bmm, torch.Generator().manual_seed(1)) == 0
    assert _check(rule2, [a, b], bmm, bmm, torch.Generator().manual_seed(1), shrink=0.5) > 0


# --- whole models: crashes injected into a deep copy, the model's own forward -------------------

class EncoderClassifier(nn.Module):
    """Post-norm ReLU ``nn.TransformerEncoderLayer`` (not batch_first: ``(T, B, D)`` inside), a
    causal source mask and a key padding mask, then a bare ``nn.MultiheadAttention`` with its
    weights asked for, a GELU module, mean over tokens."""

    def __init__(self, dim: int = 16, t: int = 6):
        super().__init__()
        self.embed = nn.Linear(3, dim)
        self.enc = nn.TransformerEncoderLayer(dim, 4, 2 * dim, dropout=0.0, activation="relu", norm_first=False)
        self.mha = nn.MultiheadAttention(dim, 2, batch_first=True)
        self.act = nn.GELU()
        self.head = nn.Linear(dim, 4)
        self.register_buffer("causal", torch.ones(t, t, dtype=torch.bool).triu(1))
        self.register_buffer("pad", torch.tensor([False] * (t - 1) + [True]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x).transpose(0, 1)
        pad = _batch_of(self.pad, x.shape[0])
        h = self.enc(h, src_mask=self.causal, src_key_padding_mask=pad).transpose(0, 1)
        a, _ = self.mha(h, h, h)
        return self.head(self.act(h + a).mean(1))


def _reference(model: nn.Module, x: torch.Tensor, at: dict[str, torch.Tensor]) -> torch.Tensor:
    """Independent exact injection: a deep copy, each named activation's flat elements (per
    sample) set to 0 by wrapping it; the copy's own forward, fast path off."""
    model = copy.deepcopy(model)
    for name, idx in at.items():
        owner, attr = (model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model), name.rsplit(".", 1)[-1]
        act = getattr(owner, attr)
        sample_dim = 1 if isinstance(owner, nn.TransformerEncoderLayer) and not owner.self_attn.batch_first else 0

        def crashed(t, act=act, idx=idx, d=sample_dim):
            per = act(t).movedim(d, 0).contiguous()  # a copy, samples first
            flat = per.view(per.shape[0], -1)
            flat[:, idx] = 0
            return per.movedim(0, d).contiguous()  # the layout the layer computed it in

        if isinstance(act, nn.Module):
            setattr(owner, attr, _Wrap(crashed))
        else:
            setattr(owner, attr, crashed)
    with plain_forward():
        return model(x)


class _Wrap(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, t):
        return self.fn(t)


def _crash_check(model: nn.Module, x: torch.Tensor, failures: dict[str, int], trials: int, seed: int = 0,
                 first: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gb = graph_bound(model, failures, lo=x)
    sizes = layer_sizes(model, x)
    g = torch.Generator().manual_seed(seed)
    clean = _reference(model, x, {})
    worst = torch.zeros_like(gb.bound)
    for trial in range(trials):
        at = {k: torch.randperm(first if first and trial % 2 else sizes[k], generator=g)[:f]
              for k, f in failures.items() if f}
        worst = torch.maximum(worst, (_reference(model, x, at) - clean).abs().flatten(1).double())
    return gb.bound, worst


def _tiny_vit(seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(seed)
    model = TinyViT(image=8, patch=4, dim=16, heads=2, depth=2).eval()
    return model, torch.rand(16, 1, 8, 8, generator=torch.Generator().manual_seed(seed + 1))


def test_tiny_vit_failure_layers_and_clean_forward():
    model, x = _tiny_vit()
    assert graph_layers(model) == ["blocks.0.activation", "blocks.1.activation"]
    assert layer_sizes(model, x) == {"blocks.0.activation": 5 * 32, "blocks.1.activation": 5 * 32}
    with plain_forward():
        assert torch.equal(trace(model)(x), model(x))
    assert torch.equal(_reference(model, x, {}), trace(model)(x))
    assert float(graph_bound(model, [0, 0], lo=x).bound.max()) == 0.0


@pytest.mark.parametrize("failures", [{"blocks.1.activation": 1}, {"blocks.1.activation": 3},
                                      {"blocks.0.activation": 1}, {"blocks.0.activation": 1, "blocks.1.activation": 2}])
def test_tiny_vit_bound_holds_on_random_crashes(failures):
    model, x = _tiny_vit()
    bound, worst = _crash_check(model, x, failures, trials=10, first=32)  # every other set: the class token's row
    assert (worst <= bound).all() and bool(worst.max() > 0)
    assert bool(torch.isfinite(bound).all())


def test_tiny_vit_last_layer_bound_is_within_two_orders_and_validate_agrees():
    model, x = _tiny_vit(1)
    bound, worst = _crash_check(model, x, {"blocks.1.activation": 1}, trials=12, first=32)
    assert (worst <= bound).all() and float(bound.max()) < 100 * float(worst.max())
    check = validate(model, x, "blocks.1.activation", bound, sets=8)
    assert check["violations"] == 0 and check["measured_max"] > 0


@pytest.mark.parametrize("failures", [{"enc.activation": 1}, {"enc.activation": 2, "act": 1}, {"act": 2}])
def test_masked_post_norm_model_bound_holds_on_random_crashes(failures):
    torch.manual_seed(3)
    model = EncoderClassifier().eval()
    x = torch.randn(12, 6, 3, generator=torch.Generator().manual_seed(4))
    assert graph_layers(model) == ["enc.activation", "act"]
    with plain_forward():
        assert torch.equal(trace(model)(x), model(x))
    bound, worst = _crash_check(model, x, failures, trials=10)
    assert (worst <= bound).all() and bool(worst.max() > 0)
    # the library's own injection (crash_outputs, sample dimension 1 inside enc) agrees with the copy
    check = validate(model, x, next(iter(failures)), graph_bound(model, {next(iter(failures)): 1}, lo=x).bound, sets=6)
    assert check["violations"] == 0


def test_training_mode_dropout_and_odd_float_masks_are_refused():
    m = Attn(dropout=0.1).train()
    with pytest.raises(UnsupportedLayerError, match="training mode"):
        trace(m)
    m = _attn({"mask": "float", "need_weights": False})
    with torch.no_grad():
        m.mask[m.mask == 0] = 0.5  # an additive bias, not a mask: SDPA's fused rounding has no rule here
    with pytest.raises(UnsupportedLayerError, match="other than 0 and -inf"):
        graph_bound(m, [], lo=torch.zeros(1, 5, 8))
