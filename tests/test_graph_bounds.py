"""Soundness of the general-graph bounds (hwrel.bounds.graph, hwrel.bounds.graph_rules).

Per rule: random boxes and errors, clean and faulty points drawn inside them (corners included),
the operation run in float32 and float64; the rule's interval must hold the exact clean value and
its error the float32 faulty value's distance from it. Each rule's harness is shown to have power:
with the rule's error halved it finds a violation. Per model: random crashes injected by an
independent torch.fx reference (the failed elements set to 0) never exceed the bound.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from hwrel.bounds import graph_rules as R
from hwrel.bounds.graph import _layer_name, graph_bound, graph_layers, trace
from hwrel.errors import UnsupportedLayerError


def _box(g: torch.Generator, shape, spread: float, width: float, err: float, offset: float = 0.0):
    c = torch.randn(*shape, generator=g, dtype=torch.float64) * spread + offset
    r = torch.rand(*shape, generator=g, dtype=torch.float64) * width
    e = torch.rand(*shape, generator=g, dtype=torch.float64) * err
    return R.Val((c - r).float().double(), (c + r).float().double(), e)  # float32 corners


def _points(g: torch.Generator, v: R.Val, n: int = 24):
    """Clean points in the box (float32-representable) and faulty ones within e of them; half at
    the corners, where the rules are tightest."""
    out = []
    for k in range(n):
        t = torch.rand(v.lo.shape, generator=g, dtype=torch.float64)
        if k % 2:
            t = (t > 0.5).double()
        x = torch.minimum(torch.maximum((v.lo + t * (v.hi - v.lo)).float(), v.lo.float()), v.hi.float())
        s = torch.rand(v.lo.shape, generator=g, dtype=torch.float64) * 2 - 1
        if k % 3 == 0:
            s = s.sign()
        xf = (x.double() + s * v.e * 0.999).float()
        for _ in range(2):  # rounding to float32 may land beyond e of x (e below an ulp): step back
            xf = torch.where((xf.double() - x.double()).abs() > v.e, torch.nextafter(xf, x), xf)
        out.append((x, xf))
    return out


def _check(rule, vals: list[R.Val], fn32, fn64, g: torch.Generator, shrink: float = 1.0) -> int:
    """Violations of ``rule``'s bounds (its error times ``shrink``) over random points."""
    out = rule(*vals)
    bad = 0
    samples = [_points(g, v) for v in vals]
    for k in range(len(samples[0])):
        xs = [s[k][0] for s in samples]
        xfs = [s[k][1] for s in samples]
        exact = fn64(*[x.double() for x in xs])
        faulty = fn32(*xfs).double()
        tol = 1e-12 * (1 + exact.abs())
        bad += int(((exact < out.lo - tol) | (exact > out.hi + tol)).sum())
        bad += int(((faulty - exact).abs() > out.e * shrink + tol).sum())
        if out.l2 is not None and exact.dim() > 0:  # the row (last dimension) norm bound
            bad += int(((faulty - exact).norm(dim=-1, keepdim=True) > out.l2 * shrink + tol).sum())
    return bad


def _ln(w, b, eps):
    return (lambda x: F.layer_norm(x, x.shape[-1:], w.float(), b.float(), eps),
            lambda x: F.layer_norm(x, x.shape[-1:], w.double(), b.double(), eps))


@settings(max_examples=50, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(2, 40), spread=st.sampled_from([1e-3, 0.1, 1.0, 10.0]),
       offset=st.sampled_from([0.0, 5.0, 300.0]), err=st.sampled_from([0.0, 1e-4, 0.05, 1.0]))
def test_layer_norm_rule_is_sound(seed, n, spread, offset, err):
    g = torch.Generator().manual_seed(seed)
    v = _box(g, (3, 2, n), spread, spread * 0.1, err * spread, offset)
    w, b = torch.randn(n, generator=g, dtype=torch.float64), torch.randn(n, generator=g, dtype=torch.float64)
    f32, f64 = _ln(w, b, 1e-5)
    assert _check(lambda a: R.layer_norm(a, w, b, 1e-5), [v], f32, f64, g) == 0


@settings(max_examples=50, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(2, 40), spread=st.sampled_from([1e-3, 0.1, 1.0, 10.0]),
       err=st.sampled_from([0.0, 1e-4, 0.05, 1.0]))
def test_rms_norm_rule_is_sound(seed, n, spread, err):
    g = torch.Generator().manual_seed(seed)
    v = _box(g, (3, 2, n), spread, spread * 0.1, err * spread)
    w = torch.randn(n, generator=g, dtype=torch.float64)

    def rms(x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w.to(x.dtype)

    assert _check(lambda a: R.rms_norm(a, w, 1e-6), [v], rms, rms, g) == 0


@settings(max_examples=50, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(1, 24), spread=st.sampled_from([0.1, 1.0, 5.0, 30.0]),
       err=st.sampled_from([0.0, 1e-3, 0.3, 3.0]), causal=st.booleans())
def test_softmax_rule_is_sound(seed, n, spread, err, causal):
    g = torch.Generator().manual_seed(seed)
    v = _box(g, (2, n, n), spread, spread * 0.2, err)
    masked = torch.ones(n, n, dtype=torch.bool).tril().logical_not() if causal else None

    def sm(x):
        return torch.softmax(x if masked is None else x.masked_fill(masked, -math.inf), -1)

    assert _check(lambda a: R.softmax(a, masked), [v], sm, sm, g) == 0


@settings(max_examples=50, deadline=None)
@given(seed=st.integers(0, 10_000), m=st.integers(1, 8), k=st.integers(1, 24), err=st.sampled_from([0.0, 1e-3, 0.5]))
def test_matmul_and_mul_rules_are_sound(seed, m, k, err):
    g = torch.Generator().manual_seed(seed)
    a, b = _box(g, (2, m, k), 1.0, 0.2, err), _box(g, (2, k, m), 1.0, 0.2, err)
    assert _check(R.matmul, [a, b], torch.matmul, torch.matmul, g) == 0
    c = _box(g, (2, m, k), 1.0, 0.2, err)
    assert _check(R.mul, [a, c], torch.mul, torch.mul, g) == 0


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10_000), t=st.integers(1, 20), d=st.sampled_from([4, 8, 16]),
       err=st.sampled_from([0.0, 1e-3, 0.3]), causal=st.booleans())
def test_attention_rule_is_sound(seed, t, d, err, causal):
    """Against torch's own fused kernel (``F.scaled_dot_product_attention`` in float32)."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = (_box(g, (2, 2, t, d), 1.5, 0.1, err) for _ in range(3))
    masked = torch.ones(t, t, dtype=torch.bool).tril().logical_not() if causal else None
    scale = 1 / math.sqrt(d)

    def att(a, b, c):
        return F.scaled_dot_product_attention(a, b, c, is_causal=causal)

    assert _check(lambda a, b, c: R.attention(a, b, c, scale, masked), [q, k, v], att, att, g) == 0


@settings(max_examples=50, deadline=None)
@given(seed=st.integers(0, 10_000), spread=st.sampled_from([1e-3, 0.1, 1.0, 10.0]),
       offset=st.sampled_from([0.0, -2.0, 3.0]), err=st.sampled_from([0.0, 1e-4, 0.05, 1.0]))
def test_power_rules_are_sound(seed, spread, offset, err):
    """``x ** 2`` and ``x ** 3`` (GPT-2's tanh GELU written out), through 0 and away from it."""
    g = torch.Generator().manual_seed(seed)
    v = _box(g, (3, 2, 8), spread, spread * 0.3, err * spread, offset)
    assert _check(R.power2, [v], lambda x: x.pow(2), lambda x: x.pow(2), g) == 0
    assert _check(R.power3, [v], lambda x: x.pow(3.0), lambda x: x.pow(3.0), g) == 0
    assert _check(R.power3, [v], lambda x: x * x * x, lambda x: x.pow(3), g) == 0


def test_rule_harness_finds_a_weakened_rule():
    """With each rule's error bound halved the same harness finds violations: it has power."""
    g = torch.Generator().manual_seed(0)
    n = 16
    w, b = torch.ones(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)
    f32, f64 = _ln(w, b, 1e-5)
    cases = [
        (lambda a: R.layer_norm(a, w, b, 1e-5), [_box(g, (4, n), 1.0, 0.0, 0.3)], f32, f64),
        (lambda a: R.rms_norm(a, w, 1e-6), [_box(g, (4, n), 1.0, 0.0, 0.3)],
         lambda x: x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6), lambda x: x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)),
        (lambda a: R.softmax(a), [_box(g, (4, 3), 0.3, 0.0, 2.0)], lambda x: x.softmax(-1), lambda x: x.softmax(-1)),
        (R.mul, [_box(g, (4, n), 1.0, 0.0, 0.5), _box(g, (4, n), 1.0, 0.0, 0.5)], torch.mul, torch.mul),
        (R.power3, [_box(g, (4, n), 1.0, 0.3, 0.5)], lambda x: x.pow(3.0), lambda x: x.pow(3)),
    ]
    for rule, vals, fn32, fn64 in cases:
        assert _check(rule, vals, fn32, fn64, torch.Generator().manual_seed(1)) == 0
        assert _check(rule, vals, fn32, fn64, torch.Generator().manual_seed(1), shrink=0.5) > 0


def test_layer_norm_rounding_on_ill_conditioned_rows():
    """No fault (e = 0): the float32 LayerNorm of rows with a large mean and a tiny spread (the
    moments' worst case) stays within the rule's rounding of the exact value."""
    g = torch.Generator().manual_seed(3)
    for offset, spread in [(1e3, 1e-2), (1e4, 1.0), (0.0, 1e-4), (30.0, 1e-3)]:
        x = (torch.randn(64, 48, generator=g, dtype=torch.float64) * spread + offset).float().double()
        v = R.Val(x, x, torch.zeros_like(x))
        w, b = torch.randn(48, generator=g, dtype=torch.float64), torch.randn(48, generator=g, dtype=torch.float64)
        out = R.layer_norm(v, w, b, 1e-5)
        got = F.layer_norm(x.float(), (48,), w.float(), b.float(), 1e-5).double()
        exact = F.layer_norm(x, (48,), w, b, 1e-5)
        assert ((got - exact).abs() <= out.e).all()
        # the bounds' own float64 arithmetic (far below the float32 rounding bounded) on rows
        # whose mean is 1e5 times their spread
        assert ((exact >= out.lo - 1e-9) & (exact <= out.hi + 1e-9)).all()


# --- whole models -------------------------------------------------------------------------------

class _Crash(fx.Interpreter):
    """Independent reference: the named layers' chosen flat elements (per sample) set to 0."""

    def __init__(self, gm: fx.GraphModule, at: dict[str, torch.Tensor]):
        super().__init__(gm)
        self.at = at

    def run_node(self, n):
        out = super().run_node(n)
        if _layer_name(n) in self.at:
            out = out.clone()
            out.view(out.shape[0], -1)[:, self.at[_layer_name(n)]] = 0
        return out


def _sizes(gm: fx.GraphModule, x: torch.Tensor, layers: list[str]) -> dict[str, int]:
    sizes: dict[str, int] = {}

    class Probe(fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            if _layer_name(n) in layers:
                sizes[_layer_name(n)] = out[0].numel()
            return out

    Probe(gm).run(x[:1])
    return sizes


def _measured_vs_bound(model: nn.Module, x: torch.Tensor, failures: list[int], trials: int, seed: int = 0,
                       box: float = 0.0, first: int = 0):
    """Worst measured output change over random crash sets (every other trial within the first
    ``first`` elements of each layer, e.g. the class token's row) and the bound."""
    gm = trace(model)
    layers = graph_layers(model)
    if box:
        lo, hi = x - box, x + box
    else:
        lo, hi = x, None
    gb = graph_bound(model, failures, lo=lo, hi=hi)
    g = torch.Generator().manual_seed(seed)
    sizes = _sizes(gm, x, layers)
    worst = torch.zeros_like(gb.bound)
    with torch.no_grad():
        for trial in range(trials):
            xi = x if not box else (lo + torch.rand(x.shape, generator=g) * 2 * box).float()
            clean = _Crash(gm, {}).run(xi)
            at = {name: torch.randperm(first if first and trial % 2 else sizes[name], generator=g)[:f]
                  for name, f in zip(layers, failures) if f}
            worst = torch.maximum(worst, (_Crash(gm, at).run(xi) - clean).abs().flatten(1).double())
    return gb.bound, worst


@pytest.fixture(scope="module")
def vit():
    from hwrel.models import load

    return load("mnist-vit")


@pytest.mark.parametrize("failures", [[0, 1], [0, 4], [2, 0], [1, 1]])
def test_vit_bound_holds_on_random_crashes(vit, failures):
    bound, worst = _measured_vs_bound(vit.module, vit.x_test[:32], failures, trials=12, first=64)
    assert (worst <= bound).all()
    assert bool(worst.max() > 0)  # the crashes did change outputs


def test_vit_bound_on_boxes_and_tight_enough_on_the_last_block(vit):
    x = vit.x_test[:16]
    bound, worst = _measured_vs_bound(vit.module, x, [0, 2], trials=10, box=0.002, first=64)
    assert (worst <= bound).all()
    bound, worst = _measured_vs_bound(vit.module, x, [0, 1], trials=10, first=64)
    assert float(bound.max()) < 100 * float(worst.max())  # finite and within two orders


def test_gpt_bound_holds_on_random_crashes():
    from hwrel.models import load

    gpt = load("text-gpt")
    for failures in ([0, 1], [1, 0]):
        bound, worst = _measured_vs_bound(gpt.module, gpt.x_test[:8], failures, trials=6)
        assert (worst <= bound).all()
        assert bool(worst.max() > 0)


def test_no_failures_means_no_error_on_points(vit):
    gb = graph_bound(vit.module, [0, 0], lo=vit.x_test[:4], hi=vit.x_test[:4])
    assert float(gb.bound.max()) == 0.0


def test_unsupported_operation_is_one_line_naming_the_node():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return torch.cumsum(self.fc(x), -1)

    with pytest.raises(UnsupportedLayerError) as err:
        graph_bound(Odd(), [], lo=torch.zeros(1, 4), hi=torch.ones(1, 4))
    msg = str(err.value)
    assert "\n" not in msg and "operation cumsum (cumsum)" in msg


def test_failure_counts_are_checked(vit):
    with pytest.raises(Exception, match="2 failure layers"):
        graph_bound(vit.module, [1], lo=vit.x_test[:1])
    with pytest.raises(Exception, match="not a layer"):
        graph_bound(vit.module, {"head": 1}, lo=vit.x_test[:1])


def test_tiny_gpt_and_byzantine_faults():
    """A second LLaMA-style LM (token and position embeddings, tests/general_models.py) with random
    weights, and Byzantine faults (any value up to C) on the ViT: never above the bound."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from general_models import TinyGPT

    torch.manual_seed(0)
    gpt = TinyGPT().eval()
    x = torch.randint(0, 32, (6, 12), generator=torch.Generator().manual_seed(1))
    for failures in ([1, 0], [0, 3]):
        bound, worst = _measured_vs_bound(gpt, x, failures, trials=8)
        assert (worst <= bound).all() and bool(worst.max() > 0)


def test_byzantine_bound_holds(vit):
    gm = trace(vit.module)
    x = vit.x_test[:8]
    cap = 3.0
    gb = graph_bound(vit.module, [0, 2], "byzantine", lo=x, hi=x, capacity=cap)
    crash = graph_bound(vit.module, [0, 2], lo=x, hi=x)
    assert (gb.bound >= crash.bound).all()

    class Byz(fx.Interpreter):
        def __init__(self, gm, idx, value):
            super().__init__(gm)
            self.idx, self.value = idx, value

        def run_node(self, n):
            out = super().run_node(n)
            if _layer_name(n) == "blocks.1.act":
                out = out.clone()
                out.view(out.shape[0], -1)[:, self.idx] = self.value
            return out

    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        clean = Byz(gm, torch.tensor([], dtype=torch.long), 0.0).run(x)
        for trial in range(10):
            idx = torch.randperm(64, generator=g)[:2]  # the class token's row reaches the output
            value = float(torch.rand((), generator=g) * 2 - 1) * cap
            change = (Byz(gm, idx, value).run(x) - clean).abs().flatten(1).double()
            assert (change <= gb.bound).all()


def test_bound_grows_with_the_failures(vit):
    """What ``--at-most`` relies on: more failures never give a smaller bound."""
    x = vit.x_test[:8]
    prev = None
    for failures in ([0, 0], [0, 1], [0, 3], [1, 3], [2, 3]):
        b = graph_bound(vit.module, failures, lo=x).bound
        if prev is not None:
            assert (b >= prev).all(), failures
        prev = b


def test_maps_that_copy_entries_resolve_a_failing_layer_and_attributes_are_refused():
    """A failed neuron copied by ``expand`` could reach a receiver several times: its top-f form is
    dropped there (sound, elementwise); an attribute such as ``.T`` is not a constant: refused."""

    class Copy(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.act, self.fc2 = nn.Linear(3, 4), nn.ReLU(), nn.Linear(8, 2)

        def forward(self, x):
            h = self.act(self.fc1(x))
            return self.fc2(h.unsqueeze(1).expand(-1, 2, -1).reshape(x.shape[0], 8))

    torch.manual_seed(0)
    m = Copy().eval()
    x = torch.rand(64, 3)
    bound, worst = _measured_vs_bound(m, x, [1], trials=8)
    assert (worst <= bound).all() and bool(worst.max() > 0)

    class Attr(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 3)

        def forward(self, x):
            return self.fc(x).T

    with pytest.raises(UnsupportedLayerError, match=r"attribute \.T"):
        graph_bound(Attr(), [], lo=torch.zeros(2, 3), hi=torch.ones(2, 3))


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(2, 32), err=st.sampled_from([1e-3, 0.1, 1.0]),
       frac=st.sampled_from([0.05, 0.3, 1.0]), rms=st.booleans())
def test_norm_rules_with_a_row_norm_bound(seed, n, err, frac, rms):
    """An input whose error rows are bounded in l2 (as after one failed neuron through a linear
    layer) far below the box's norm: the faulty points respect it, the outputs their bounds."""
    g = torch.Generator().manual_seed(seed)
    v = _box(g, (3, n), 1.0, 0.05, err)
    v.l2 = v.e.norm(dim=-1, keepdim=True) * frac
    w, b = torch.randn(n, generator=g, dtype=torch.float64), torch.randn(n, generator=g, dtype=torch.float64)
    pts = []
    for x, xf in _points(g, v):
        d = xf.double() - x.double()
        scale = torch.clamp(v.l2 * 0.999 / d.norm(dim=-1, keepdim=True).clamp_min(1e-300), max=1.0)
        pts.append((x, (x.double() + d * scale).float()))
    out = R.rms_norm(v, w, 1e-6) if rms else R.layer_norm(v, w, b, 1e-5)
    for x, xf in pts:
        if rms:
            exact = x.double() * torch.rsqrt(x.double().pow(2).mean(-1, keepdim=True) + 1e-6) * w
            faulty = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6) * w.float()).double()
        else:
            exact = F.layer_norm(x.double(), (n,), w, b, 1e-5)
            faulty = F.layer_norm(xf, (n,), w.float(), b.float(), 1e-5).double()
        assert ((faulty - exact).abs() <= out.e + 1e-12).all()
        assert ((faulty - exact).norm(dim=-1, keepdim=True) <= out.l2 + 1e-12).all()


class _WrittenOutGelu(nn.Module):
    """GPT-2's ``gelu_new`` written out between two Linear layers: the failure layer is ``tanh``, and
    a constant is added to it (both orders, and subtracted) before the product with ``0.5 x``."""

    def __init__(self, n: int = 8) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, n), nn.Linear(n, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        t = torch.tanh(0.7978845608 * (h + 0.044715 * torch.pow(h, 3.0)))
        return self.fc2(0.5 * h * (1.0 + t)) + self.fc2((t - 0.25) * h)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_failing_layer_plus_a_constant_keeps_its_top_f_form_and_stays_sound(seed):
    """Every set of f crashed tanh elements (exhaustive, f = 1, 2, 3 of 8), injected exactly, against
    the bound; the bound grows with f (the failing layer is not resolved elementwise at the add, where
    any f would read as every element failing)."""
    from itertools import combinations

    from hwrel.bounds.graph import crash_outputs

    torch.manual_seed(seed)
    model = _WrittenOutGelu().eval()
    x = torch.randn(16, 6) * 2
    assert graph_layers(model) == ["tanh"]
    clean = crash_outputs(model, x, {})
    bounds = []
    for f in (1, 2, 3):
        b = graph_bound(model, {"tanh": f}, lo=x).bound
        bounds.append(float(b.max()))
        worst = torch.zeros_like(b)
        for idx in combinations(range(8), f):
            d = (crash_outputs(model, x, {"tanh": torch.tensor(idx)}) - clean).abs().flatten(1).double()
            assert bool((d <= b).all()), (f, idx)
            worst = torch.maximum(worst, d)
        assert float(worst.max()) > 0
    assert bounds[0] < bounds[1] < bounds[2]
