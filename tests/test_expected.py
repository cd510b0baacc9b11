"""Expected error under random crashes: exact enumeration on tiny nets, Monte Carlo on reference models."""
from __future__ import annotations

import copy
import itertools
import json

import pytest
import torch
from torch import nn

import hwrel
from hwrel import models
from hwrel.cli import main
from hwrel.errors import HwrelError
from hwrel.expected import _forward, expected_error, first_order, interval_bound, paper_bound


def _tiny(act: type[nn.Module], seed: int) -> tuple[nn.Module, hwrel.Network]:
    g = torch.Generator().manual_seed(seed)
    mod = nn.Sequential(nn.Linear(3, 4), act(), nn.Linear(4, 3), act(), nn.Linear(3, 2)).double()
    with torch.no_grad():
        for m in mod:
            if isinstance(m, nn.Linear):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g, dtype=torch.float64) * 1.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g, dtype=torch.float64))
    return mod, hwrel.Network.from_module(mod, (-1.0, 1.0), (3,)).to(torch.float64)


def _exact(net: hwrel.Network, probs: dict[int, float], x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """E|dF|, E[dF], Var[dF] per input and output by enumerating every crash pattern."""
    layers = list(net.layers)
    sizes = [net.nodes[i].size for i in layers]
    ref = _forward(net, x)
    e_abs = torch.zeros_like(ref)
    e1 = torch.zeros_like(ref)
    e2 = torch.zeros_like(ref)
    for bits in itertools.product([0, 1], repeat=sum(sizes)):
        prob, masks, k = 1.0, {}, 0
        for i, n in zip(layers, sizes):
            crash = torch.tensor(bits[k:k + n], dtype=torch.float64)
            k += n
            p = probs.get(i, 0.0)
            prob *= float(torch.prod(crash * p + (1 - crash) * (1 - p)))  # float64 throughout
            masks[i] = (1 - crash).expand(x.shape[0], n)
        if prob == 0:
            continue
        d = _forward(net, x, masks) - ref
        e_abs += prob * d.abs()
        e1 += prob * d
        e2 += prob * d ** 2
    return e_abs, e1, e2 - e1 ** 2


@pytest.mark.parametrize("act", [nn.Sigmoid, nn.Tanh, nn.ReLU])
@pytest.mark.parametrize("p", [(0.1, 0.0), (0.0, 0.2), (0.05, 0.3), (0.5, 0.5)])
def test_bounds_cover_the_exact_expectation(act: type[nn.Module], p: tuple[float, float]) -> None:
    _, net = _tiny(act, 0)
    probs = dict(zip(net.layers, p))
    g = torch.Generator().manual_seed(1)
    x = torch.cat([torch.tensor(list(itertools.product([-1.0, 1.0], repeat=3)), dtype=torch.float64),
                   torch.rand(30, 3, generator=g, dtype=torch.float64) * 2 - 1])
    e_abs, _, _ = _exact(net, probs, x)
    per_point = interval_bound(net, probs, x, x)
    domain = interval_bound(net, probs, net.input_lo[None], net.input_hi[None])[0]
    assert (e_abs <= per_point).all()
    assert (e_abs <= domain).all()
    assert float(e_abs.max()) <= paper_bound(net, probs)
    assert float(e_abs.max()) > 0


@pytest.mark.parametrize("p", [0.02, 0.3])
def test_first_order_is_exact_for_the_last_hidden_layer(p: float) -> None:
    _, net = _tiny(nn.Tanh, 2)
    probs = {net.layers[-1]: p}
    x = torch.rand(20, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 2 - 1
    _, mean, var = _exact(net, probs, x)
    fo_m, fo_v = first_order(net, probs, x)
    torch.testing.assert_close(fo_m, mean, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(fo_v, var, rtol=1e-10, atol=1e-12)


def test_paper_bound_is_the_theory_recursion() -> None:
    _, net = _tiny(nn.Sigmoid, 3)
    p1, p2 = 0.1, 0.2
    w = [net.nodes[i].affine.weight for i in net.synapse_layers]
    rho = [float(m.abs().sum(1).max()) for m in w]
    b1 = rho[1] * (p1 * 1.0 + (1 - p1) * 0.25 * 0.0)
    b2 = rho[2] * (p2 * 1.0 + (1 - p2) * 0.25 * b1)
    got = paper_bound(net, dict(zip(net.layers, (p1, p2))))
    assert b2 <= got <= b2 * (1 + 1e-4)  # the recursion plus float32 rounding of both forwards


def test_crash_injection_equals_a_hooked_copy_of_the_module() -> None:
    mod, _ = _tiny(nn.Sigmoid, 4)
    mod = mod.float()  # the model's own precision
    net = hwrel.Network.from_module(mod, (-1.0, 1.0), (3,))
    x = torch.rand(5, 3, generator=torch.Generator().manual_seed(0))
    crashed = torch.tensor([[1.0, 0.0, 1.0, 0.0]]).expand(5, 4)
    ref = copy.deepcopy(mod)
    ref[1].register_forward_hook(lambda m, i, o: o * crashed)
    assert torch.equal(_forward(net, x, {net.layers[0]: crashed}), ref(x))


@pytest.fixture(scope="module")
def sigmoid_ref():
    r = models.load("digits-mlp-sigmoid")
    return r, hwrel.Network.from_module(r.module, r.input_domain, r.input_shape)


def test_reference_model_bounds_and_first_order(sigmoid_ref) -> None:
    r, net = sigmoid_ref
    res = expected_error(net, [0.01, 0.01], inputs=r.x_test[:150], trials=400, seed=0)
    t = res.table.set_index(res.table["scenario"].str.split(" ").str[:2].str.join(" "))
    assert list(t.index) == ["layer 1", "layer 2", "all"]
    for _, row in t.iterrows():
        assert row["bound_ok"] and row["point_bound_ok"]
        assert row["bound_paper"] >= row["bound"] >= row["mc_abs_lo"]
        assert row["bound_data"] >= row["mc_abs_lo"] and row["mc_abs_lo"] <= row["mc_abs"] <= row["mc_abs_hi"]
    # exact for the last hidden layer: only Monte Carlo noise remains
    assert t.loc["layer 2", "fo_rms_rel_err"] < 0.10
    assert t.loc["layer 1", "fo_rms_rel_err"] < 0.5  # an estimate elsewhere: reported, loosely checked


def test_bad_input(sigmoid_ref) -> None:
    _, net = sigmoid_ref
    for p, msg in (([0.1, 1.5], r"p\[1\] = 1.5"), ([-0.1, 0.0], r"p\[0\]"), ([0.1], "2 hidden layers"),
                   ([float("nan"), 0.1], r"p\[0\]"), ([True, 0.1], r"p\[0\]"), (0.1, "list")):
        with pytest.raises(HwrelError, match=msg):
            expected_error(net, p)
    with pytest.raises(HwrelError, match="trials"):
        expected_error(net, [0.1, 0.1], trials=1)
    with pytest.raises(HwrelError, match="outside"):
        expected_error(net, [0.1, 0.1], inputs=torch.full((2, 64), 2.0))
    with pytest.raises(HwrelError, match="shape"):
        expected_error(net, [0.1, 0.1], inputs=torch.zeros(2, 8))
    with pytest.raises(HwrelError, match="confidence"):
        expected_error(net, [0.1, 0.1], confidence=1.5)


def test_cli(capsys) -> None:
    assert main(["expected", "digits-mlp-sigmoid", "-p", "0,0.02", "--trials", "50", "--samples", "20",
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["scenarios"]) == 1 and out["scenarios"][0]["bound_ok"]
    assert main(["expected", "digits-mlp-sigmoid", "-p", "0.1,2"]) == 2
    assert "p[1] = 2.0" in capsys.readouterr().err
