"""Graph bounds through ``nn.Conv1d`` / ``F.conv1d`` and ``nn.MaxPool1d`` (hwrel.bounds.graph).

- per rule (the style of tests/test_graph_bounds.py): random boxes with errors through one traced
  convolution (groups, padding, stride, dilation, bias, module or function) in exact mode, against
  the layer itself in float32 (faulty) and float64 (exact clean); the harness finds a violation
  when the error bound is halved;
- per model: random crash sets in a Conv1d sequence classifier's activations (before a max pool,
  overlapping or not, and before a mean over time), injected into a deep copy of the model (the
  activation module wrapped, the model's own forward), never exceed the bound.
"""
from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from general_models import ConvSeq  # noqa: E402
from test_graph_bounds import _box, _check, _points  # noqa: E402
from test_graph_modules import _crash_check  # noqa: E402

from hwrel.bounds import graph_rules as R  # noqa: E402
from hwrel.bounds.faults import as_fault  # noqa: E402
from hwrel.bounds.graph import _Interpreter, graph_bound, graph_layers, trace, validate  # noqa: E402
from hwrel.errors import UnsupportedLayerError  # noqa: E402


class Functional(nn.Module):
    """``F.conv1d`` with the layer's parameters (a model written without the module)."""

    def __init__(self, conv: nn.Conv1d):
        super().__init__()
        self.weight, self.bias = conv.weight, conv.bias
        self.args = (conv.stride, conv.padding, conv.dilation, conv.groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv1d(x, self.weight, self.bias, *self.args)


def _rule(m: nn.Module):
    gm = trace(m)
    crash = as_fault("crash")
    m64 = copy.deepcopy(m).double()

    def rule(v: R.Val) -> R.Val:
        return _Interpreter(gm, crash, {}).run(v.lo, v.hi, v.e)

    def f32(x):
        with torch.no_grad():
            return m(x)

    def f64(x):
        with torch.no_grad():
            return m64(x)

    return rule, f32, f64


@settings(max_examples=50, deadline=None)
@given(seed=st.integers(0, 10_000), groups=st.sampled_from([1, 2, 4]), per=st.integers(1, 3), k=st.integers(1, 5),
       stride=st.integers(1, 3), padding=st.integers(0, 3), dilation=st.integers(1, 3), bias=st.booleans(),
       functional=st.booleans(), err=st.sampled_from([0.0, 1e-3, 0.3]), width=st.sampled_from([0.0, 0.1]))
def test_conv1d_rule_is_sound(seed, groups, per, k, stride, padding, dilation, bias, functional, err, width):
    torch.manual_seed(seed)
    t = dilation * (k - 1) + 1 + 6
    conv = nn.Conv1d(groups * per, groups * 2, k, stride, padding, dilation, groups, bias=bias)
    rule, f32, f64 = _rule(Functional(conv) if functional else nn.Sequential(conv))
    g = torch.Generator().manual_seed(seed)
    v = _box(g, (3, groups * per, t), 1.0, width, err)
    assert _check(rule, [v], f32, f64, g) == 0


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), k=st.integers(1, 4), stride=st.integers(1, 3), dilation=st.integers(1, 2),
       ceil=st.booleans(), err=st.sampled_from([0.0, 1e-3, 0.3]))
def test_max_pool1d_rule_is_sound(seed, k, stride, dilation, ceil, err):
    """A max rounds nothing, so here the faulty inputs must respect their bound exactly: points
    whose float32 rounding took them past ``e`` are moved back to the clean point."""
    pool = nn.MaxPool1d(k, stride, k // 2, dilation, ceil_mode=ceil)
    rule, f32, f64 = _rule(nn.Sequential(pool) if seed % 2 else pool)  # the module, or F.max_pool1d
    g = torch.Generator().manual_seed(seed)
    v = _box(g, (3, 2, 11), 1.0, 0.2, err)
    out = rule(v)
    for x, xf in _points(g, v):
        xf = torch.where((xf.double() - x.double()).abs() <= v.e, xf, x)
        exact, faulty = f64(x.double()), f32(xf).double()
        assert ((exact >= out.lo) & (exact <= out.hi)).all()
        assert ((faulty - exact).abs() <= out.e).all()


def test_conv1d_harness_finds_a_weakened_rule():
    torch.manual_seed(0)
    for conv in (nn.Conv1d(1, 2, 2), nn.Conv1d(2, 2, 3, stride=2, padding=1, dilation=2, groups=2)):
        for m in (nn.Sequential(conv), Functional(conv)):
            rule, f32, f64 = _rule(m)
            v = _box(torch.Generator().manual_seed(0), (4, conv.in_channels, 9), 1.0, 0.0, 0.3)
            assert _check(rule, [v], f32, f64, torch.Generator().manual_seed(1)) == 0
            assert _check(rule, [v], f32, f64, torch.Generator().manual_seed(1), shrink=0.5) > 0


def test_max_pool1d_error_is_attained():
    """The pool's error bound is reached (halved, points exceed it): one window, both errors at
    the same entry."""
    rule, f32, f64 = _rule(nn.Sequential(nn.MaxPool1d(2)))
    x = torch.tensor([[[0.5, -0.25]]])
    e = torch.tensor([[[0.125, 0.0]]], dtype=torch.float64)
    out = rule(R.Val(x.double(), x.double(), e))
    change = (f32(x + torch.tensor([[[0.125, 0.0]]])).double() - f64(x.double())).abs()
    assert bool((change <= out.e).all()) and bool((change > 0.5 * out.e).any())


class ConvNet(nn.Module):
    """Strided, dilated, grouped ``F.conv1d`` and ``nn.Conv1d``, an overlapping max pool, SiLU."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv1d(3, 8, 3, stride=2, padding=2, dilation=2)
        self.act1 = nn.SiLU()
        self.pool = nn.MaxPool1d(3, stride=1, padding=1)
        self.w2 = nn.Parameter(torch.randn(8, 2, 3) * 0.4)
        self.act2 = nn.ReLU()
        self.head = nn.Linear(8 * 8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.pool(self.act1(self.conv1(x)))
        h = self.act2(F.conv1d(h, self.w2, None, 1, 1, 1, 4))
        return self.head(h.flatten(1))


@pytest.mark.parametrize("failures", [{"act1": 1}, {"act2": 1}, {"act1": 2, "act2": 3}])
def test_conv_seq_bound_holds_on_random_crashes(failures):
    torch.manual_seed(0)
    model = ConvSeq().eval()
    x = torch.rand(16, 2, 24, generator=torch.Generator().manual_seed(1))
    assert graph_layers(model) == ["act1", "act2"]
    bound, worst = _crash_check(model, x, failures, trials=12)
    assert (worst <= bound).all() and bool(worst.max() > 0)
    if failures == {"act2": 1}:  # a mean over time keeps the failures' top-f form: within 10x
        assert float(bound.max()) < 10 * float(worst.max())


@pytest.mark.parametrize("failures", [{"act1": 1}, {"act1": 3}, {"act2": 2}])
def test_strided_grouped_model_bound_holds_on_random_crashes(failures):
    torch.manual_seed(2)
    model = ConvNet().eval()
    x = torch.randn(12, 3, 16, generator=torch.Generator().manual_seed(3))
    bound, worst = _crash_check(model, x, failures, trials=12)
    assert (worst <= bound).all() and bool(worst.max() > 0)
    name = next(iter(failures))
    assert validate(model, x, name, graph_bound(model, {name: 1}, lo=x).bound, sets=6)["violations"] == 0


def test_conv1d_bound_on_boxes():
    torch.manual_seed(0)
    model = ConvSeq().eval()
    x = torch.rand(8, 2, 24, generator=torch.Generator().manual_seed(1))
    gb = graph_bound(model, [1, 1], lo=x - 0.01, hi=x + 0.01)
    g = torch.Generator().manual_seed(2)
    for _ in range(4):  # inputs inside the box: the point bound from the box bound holds there too
        xi = x + (torch.rand(x.shape, generator=g) * 2 - 1) * 0.01
        _, worst = _crash_check(model, xi, {"act1": 1, "act2": 1}, trials=3)
        assert (worst <= gb.bound).all()


def test_unsupported_convolutions_are_one_line_errors():
    for conv, match in ((nn.Conv1d(2, 2, 3, padding=1, padding_mode="reflect"), "padding_mode 'reflect'"),
                        (nn.Conv1d(2, 2, 2, padding="same"), "padding 'same'")):
        with pytest.raises(UnsupportedLayerError, match=match) as err:
            graph_bound(nn.Sequential(conv), [], lo=torch.zeros(1, 2, 8), hi=torch.ones(1, 2, 8))
        assert "\n" not in str(err.value)
    gb = graph_bound(nn.Sequential(nn.Conv1d(2, 2, 3, padding="same")), [], lo=torch.zeros(1, 2, 8),
                     hi=torch.ones(1, 2, 8))
    assert bool(torch.isfinite(gb.bound).all())
