"""Valley-shaped activations (GELU erf/tanh, SiLU, Mish, Hardswish): sound interval rules and bounds.

Oracles: dense sampling (100k points, float64) of each interval for the image and ``sup |phi'|``;
``bound_oracle.faulty_forward`` (hooks on a plain nn.Sequential) for neuron failures; corner
enumeration / attacks of :mod:`test_linearized` for weight perturbations; every single flip for SEU.
"""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import hwrel
from bound_oracle import faulty_forward, probe_inputs
from hwrel import activations as A
from hwrel.valleys import VALLEYS
from test_bounds import assert_sound, measure_neuron
from test_linearized import _assert_sound, _attack, _bounds, _net, _radii, _seeded

MODS = {"gelu": nn.GELU, "gelu_tanh": lambda: nn.GELU(approximate="tanh"), "silu": nn.SiLU,
        "mish": nn.Mish, "hardswish": nn.Hardswish}
MAKE = {"gelu": A.gelu, "gelu_tanh": lambda: A.gelu("tanh"), "silu": A.silu, "mish": A.mish,
        "hardswish": A.hardswish}


def _dense(act, lo, hi, n=100_000):
    x = torch.linspace(lo, hi, n, dtype=torch.float64)
    y = act(x)
    xd = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(act(xd).sum(), xd)
    return y, g.abs()


def _intervals(kind, seed):
    g = torch.Generator().manual_seed(seed)
    v = VALLEYS[kind]
    pts = [v.x_min] + [c for c, _ in v.crit]
    out = [(p - 0.3, p + 0.2) for p in pts] + [(p - 1e-3, p + 1e-3) for p in pts]
    for _ in range(20):
        a, b = sorted((torch.randn(2, generator=g, dtype=torch.float64) * 4).tolist())
        out.append((a, b + 1e-6))
    return out + [(-30.0, -20.0), (5.0, 12.0), (-8.0, 8.0)]


@pytest.mark.parametrize("kind", sorted(MAKE))
def test_image_and_slope_cover_dense_sampling(kind):
    act = MAKE[kind]()
    assert not act.monotone
    for lo, hi in _intervals(kind, 1):
        y, k = _dense(act, lo, hi)
        t_lo, t_hi = torch.tensor([lo], dtype=torch.float64), torch.tensor([hi], dtype=torch.float64)
        i_lo, i_hi = act.image(t_lo, t_hi)
        assert float(i_lo) <= float(y.min()) and float(i_hi) >= float(y.max()), (kind, lo, hi)
        assert float(i_hi) - float(i_lo) <= float(y.max() - y.min()) + 1e-6  # and tight
        s = float(act.slope_sup(t_lo, t_hi))
        assert s >= float(k.max()), (kind, lo, hi, s, float(k.max()))
        assert s <= float(k.max()) + 1e-3
        assert s <= act.lipschitz and float(y.min()) >= act.lo
    # the global constants against the whole line
    y, k = _dense(act, -20.0, 20.0, 400_001)
    assert act.lipschitz >= float(k.max()) and act.lipschitz <= float(k.max()) + 1e-6
    assert act.lo <= float(y.min()) <= act.lo + 1e-6


def test_known_constants():
    g = A.gelu()
    assert abs(VALLEYS["gelu"].x_min + 0.7518) < 1e-4 and abs(g.lo + 0.16997) < 1e-4
    assert abs(g.lipschitz - 1.1289) < 1e-4 and abs(VALLEYS["gelu"].crit[1][0] - math.sqrt(2)) < 1e-9
    assert abs(A.silu().lipschitz - 1.0998) < 1e-4
    h = A.hardswish()
    assert abs(h.lipschitz - 1.5) < 1e-6 and abs(h.slope_lo + 0.5) < 1e-6 and abs(h.lo + 0.375) < 1e-6


@pytest.mark.parametrize("kind", sorted(MAKE))
def test_monotone_rule_would_be_unsound(kind):
    """The rule the monotone activations use, [phi(lo), phi(hi)] and phi'(nearest 0), is violated
    on an interval around the minimum / the slope peak; the valley rule is not."""
    act = MAKE[kind]()
    v = VALLEYS[kind]
    lo, hi = v.x_min - 0.5, v.x_min + 0.4
    y, k = _dense(act, lo, hi)
    t_lo, t_hi = torch.tensor([lo], dtype=torch.float64), torch.tensor([hi], dtype=torch.float64)
    assert float(act(t_lo)) > float(y.min()) and float(act(t_hi)) > float(y.min())  # naive misses it
    assert float(act.image(t_lo, t_hi)[0]) <= float(y.min())
    # slope: the peak of phi' sits at a critical point away from 0; |phi'| exceeds 1 there
    c, kc = max(v.crit, key=lambda t: t[1])
    lo, hi = c - 0.5, c + 0.5
    naive = float(v.d1(torch.tensor([max(lo, min(0.0, hi))], dtype=torch.float64)).abs())
    _, k = _dense(act, lo, hi)
    assert naive < float(k.max()) and float(k.max()) > 1.0
    assert float(act.slope_sup(torch.tensor([lo], dtype=torch.float64), torch.tensor([hi], dtype=torch.float64))) >= float(k.max())


def _mlp(sizes, kind, seed, scale=1.0):
    torch.manual_seed(seed)
    layers = []
    for k, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        lin = nn.Linear(a, b)
        with torch.no_grad():
            lin.weight.mul_(scale * math.sqrt(a))
            lin.bias.mul_(math.sqrt(a))
        layers.append(lin)
        if k < len(sizes) - 2:
            layers.append(MODS[kind]())
    return nn.Sequential(*layers).eval()


@pytest.mark.parametrize("kind", ["gelu", "silu", "hardswish"])
@pytest.mark.parametrize("fault", ["crash", "byzantine"])
def test_exhaustive_neuron_failures_never_exceed_any_bound(kind, fault):
    sizes = [3, 4, 3, 2]
    model = _mlp(sizes, kind, seed=5)
    net = hwrel.Network.from_module(model, (-1.0, 1.0))
    x = probe_inputs(-1.0, 1.0, 3, 100, seed=1)
    cap = 1.5
    values = [0.0] if fault == "crash" else [-cap, 0.0, cap]
    for f in ([1, 0], [0, 1], [1, 1], [2, 1]):
        res = hwrel.fep(net, f, fault, capacity=cap if fault == "byzantine" else None)
        worst, _ = measure_neuron(model, x, sizes[1:3], f, values)
        assert_sound(res, worst, f"{kind} {fault} f={f}")


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10_000), kind=st.sampled_from(sorted(MODS)), depth=st.integers(1, 3),
       fault=st.sampled_from(["crash", "byzantine"]))
def test_property_random_networks_random_failures(seed, kind, depth, fault):
    g = torch.Generator().manual_seed(seed)
    sizes = [int(v) for v in torch.randint(2, 7, (depth + 2,), generator=g)]
    model = _mlp(sizes, kind, seed, scale=float(torch.rand(1, generator=g)) * 2 + 0.1)
    net = hwrel.Network.from_module(model, (-2.0, 2.0))
    hidden = sizes[1:-1]
    f = [int(torch.randint(0, n + 1, (1,), generator=g)) for n in hidden]
    cap = 2.0
    res = hwrel.fep(net, f, fault, capacity=cap if fault == "byzantine" else None)
    x = probe_inputs(-2.0, 2.0, sizes[0], 64, seed)
    clean = faulty_forward(model, x)
    worst = 0.0
    for _ in range(15):
        faults = []
        for n, k in zip(hidden, f):
            idx = torch.randperm(n, generator=g)[:k].tolist()
            vals = ((torch.randint(0, 2, (k,), generator=g) * 2 - 1).float() * cap if fault == "byzantine"
                    else torch.zeros(k))
            faults.append(dict(zip(idx, vals.tolist())))
        worst = max(worst, float((faulty_forward(model, x, faults) - clean).abs().max()))
    assert_sound(res, worst, f"seed={seed} {kind} {sizes} f={f}")


@pytest.mark.parametrize("kind", sorted(MODS))
def test_linearized_weight_perturbation_sound(kind):
    net = _net(_seeded(nn.Sequential(nn.Linear(2, 4), MODS[kind](), nn.Linear(4, 4), MODS[kind](),
                                     nn.Linear(4, 2)), 7), (2,))
    for scale in (0.05, 0.5):
        wr = _radii(net, scale, 8)
        x = torch.tensor([[0.3, -0.7], [0.0, 0.0], [1.0, -1.0], [-0.75, 0.9]], dtype=torch.float64)
        b_out, b_m, _ = _bounds(net, x, wr)
        seen_o, seen_m = _attack(net, x, wr, steps=6)
        _assert_sound(b_out, seen_o)
        _assert_sound(b_m, seen_m)


def test_extraction_from_modules_functionals_and_export():
    class Fn(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(3, 4), nn.Linear(4, 2)

        def forward(self, x):
            return self.b(torch.nn.functional.gelu(torch.nn.functional.silu(self.a(x)), approximate="tanh"))

    x = torch.rand(7, 3) * 2 - 1
    for m in [_mlp([3, 4, 2], k, 0) for k in MODS] + [Fn().eval()]:
        for src in (m, torch.export.export(m, (x[:1],)).module()):
            net = hwrel.Network.from_module(src, (-1.0, 1.0), (3,))
            assert all(not n.act.monotone for n in net.nodes if n.op == "act")
            torch.testing.assert_close(net.forward(x), m(x), rtol=0, atol=1e-6)
    bad = nn.Sequential(nn.Linear(3, 4), nn.GELU(), nn.Linear(4, 2)).eval()
    bad[1].approximate = "sigmoid"
    with pytest.raises(hwrel.HwrelError, match="layer 1 .GELU.: approximate='sigmoid'"):
        hwrel.Network.from_module(bad, (-1.0, 1.0), (3,))


def test_cnn_crash_bound_sound():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.GELU(), nn.AvgPool2d(2), nn.Conv2d(3, 4, 2), nn.Hardswish(),
                          nn.Flatten(), nn.Linear(4, 3), nn.SiLU(), nn.Linear(3, 2)).eval()
    net = hwrel.Network.from_module(model, (0.0, 1.0), (1, 7, 7))
    x = torch.rand(64, 1, 7, 7, generator=torch.Generator().manual_seed(1))
    res = hwrel.fep(net, [1] + [0] * (net.num_layers - 1), "crash")
    clean = model(x)
    worst = 0.0
    for c in range(3):
        def hook(mod, inp, out, c=c):
            out = out.clone()
            out[:, c, 0, 0] = 0.0
            return out
        h = model[1].register_forward_hook(hook)
        with torch.no_grad():
            worst = max(worst, float((model(x) - clean).abs().max()))
        h.remove()
    assert res.bound >= worst > 0


def test_seu_single_flips_within_certificates_on_a_gelu_mlp():
    from hwrel.seu import load_accelerator
    from hwrel.seu.flips import FlipModel, flip_bounds
    from hwrel.seu.mapping import map_model

    model = _mlp([3, 6, 2], "gelu", seed=2)
    net = hwrel.Network.from_module(model, (-2.0, 2.0))
    mapping = map_model(net, load_accelerator("gemmini"), "int8")
    net64 = mapping.deployed(net.to())
    fb = flip_bounds(net64, mapping.tensors, False)
    x = torch.rand(128, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 4 - 2
    fm = FlipModel(net64, mapping.tensors, [s.limit for s in fb.sites], x)
    lo, hi = net64.input_lo[None], net64.input_hi[None]
    dmg = fb.single(fb.inputs_sup(lo, hi, 1))
    tol = 1e-9 * (1 + float(fm.output.abs().max()))
    checked = 0
    for ti, t in enumerate(mapping.tensors):
        for e in range(t.numel):
            for bit in range(t.fmt.bits):
                out = fm.run([(ti, e, bit)])
                measured = float((out - fm.output).abs().max()) if bool(torch.isfinite(out).all()) else math.inf
                assert measured <= float(dmg[ti][e, bit]) + tol, (ti, e, bit)
                checked += 1
    assert checked > 100
