"""Boosting: certified quorum bounds against exhaustive, adversarial and simulated missing signals."""
from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
import torch
from torch import nn

import hwrel
from hwrel import models
from hwrel.boosting import _Boost, boosting, parse_latency, simulate
from hwrel.cli import main
from hwrel.errors import HwrelError, UnsupportedLayerError


def _tiny(act: type[nn.Module], seed: int, widths=(3, 3, 3, 2)) -> hwrel.Network:
    g = torch.Generator().manual_seed(seed)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        lin = nn.Linear(a, b)
        with torch.no_grad():
            lin.weight.copy_(torch.randn(b, a, generator=g) * 1.5)
            lin.bias.copy_(torch.randn(b, generator=g))
        layers.append(lin)
        if i < len(widths) - 2:
            layers.append(act())
    return hwrel.Network.from_module(nn.Sequential(*layers), (-1.0, 1.0), (widths[0],))


def _patterns(n_recv: int, n_in: int, q: int) -> torch.Tensor:
    """Every choice, independently per receiver, of which ``q`` of its ``n_in`` inputs arrive."""
    subsets = []
    for c in itertools.combinations(range(n_in), q):
        m = torch.zeros(n_in, dtype=torch.bool)
        m[list(c)] = True
        subsets.append(m)
    return torch.stack([torch.stack(p) for p in itertools.product(subsets, repeat=n_recv)])


def _exhaustive_max_error(net: hwrel.Network, plan, x: torch.Tensor) -> float:
    """Worst |dF| over every missing pattern (each receiver its own) and the inputs ``x``."""
    b = _Boost(net, plan.substitute)
    y = x.to(torch.float64)[None]  # (patterns so far, B, n)
    for k, st in enumerate(b.stages):
        a = st.affine.affine
        n_out, n_in = a.weight.shape
        pats = _patterns(n_out, n_in, plan.quorum[k]).to(torch.float64)  # (P, n_out, n_in)
        m = torch.from_numpy(plan.substitutes[k])
        # value seen by receiver j from sender i: y_i if received else m_i
        vals = pats[None, :, None] * y[:, None, :, None, :] + (1 - pats[None, :, None]) * m
        s = (vals * a.weight).sum(-1) + a.bias  # (prev, P, B, n_out)
        s = s.reshape(-1, x.shape[0], n_out)
        y = st.act.act(s) if st.act is not None else s
    ref = b.an.net.forward(x.to(torch.float64))
    return float((y - ref[None]).abs().max())


@pytest.mark.parametrize("act", [nn.Sigmoid, nn.Tanh, nn.ReLU])
@pytest.mark.parametrize("seed", [0, 1])
def test_bounds_cover_every_missing_pattern_on_tiny_nets(act: type[nn.Module], seed: int) -> None:
    net = _tiny(act, seed)
    g = torch.Generator().manual_seed(seed + 10)
    corners = torch.tensor(list(itertools.product([-1.0, 1.0], repeat=3)))
    x = torch.cat([corners, torch.rand(40, 3, generator=g) * 2 - 1])
    for sub in ("neuron", "layer"):
        plan = boosting(net, quorum=[2, 2, 2], substitute=sub)
        worst = _exhaustive_max_error(net, plan, x)
        assert worst > 0
        assert worst <= plan.certified <= plan.certified_paper * (1 + 1e-9)
        # the simulation only realises some of those patterns
        sim = simulate(net, plan, x, "exp:1", seed=seed, repeats=5)
        assert sim.per_sample["error"].max() <= worst + 1e-12


@pytest.fixture(scope="module")
def refs() -> dict[str, tuple[models.ReferenceModel, hwrel.Network]]:
    out = {}
    for name in ("digits-mlp-sigmoid", "digits-mlp"):
        r = models.load(name)
        out[name] = (r, hwrel.Network.from_module(r.module, r.input_domain, r.input_shape))
    return out


EPS = {"digits-mlp-sigmoid": 5.0, "digits-mlp": 30.0}


@pytest.mark.parametrize("name", list(EPS))
def test_heavy_tail_p99_drops_and_error_stays_certified(refs, name: str) -> None:
    r, net = refs[name]
    plan = boosting(net, EPS[name])
    assert sum(plan.relaxed) > 0 and plan.certified <= EPS[name]
    sim = simulate(net, plan, r.x_test, "pareto:1.5", seed=0)
    s = sim.summary()
    assert s["runs"] == len(r.x_test)
    assert s["p99_quorum"] < 0.8 * s["p99_full"] and s["p50_quorum"] < s["p50_full"]
    assert (sim.per_sample["latency_quorum"] <= sim.per_sample["latency_full"]).all()
    assert 0 < s["max_error"] <= plan.certified <= plan.certified_paper
    assert s["within_certified"]


@pytest.mark.parametrize("name", list(EPS))
def test_adversarial_last_layer_patterns_stay_within_bound(refs, name: str) -> None:
    # Only the outputs miss signals: the worst pattern per output is exact (top-f of signed terms).
    r, net = refs[name]
    fan = [net.nodes[i].affine.weight.shape[1] for i in net.synapse_layers]
    f = 6
    plan = boosting(net, quorum=fan[:-1] + [fan[-1] - f])
    an = _Boost(net, "neuron")
    y = an.an.net.forward_all(r.x_test.to(torch.float64))[net.layers[-1]]
    w = an.stages[-1].affine.affine.weight
    terms = w[None] * (torch.from_numpy(plan.substitutes[-1])[None, None] - y[:, None, :])  # (B, out, in)
    worst = torch.maximum(torch.relu(terms).topk(f, -1).values.sum(-1),
                          torch.relu(-terms).topk(f, -1).values.sum(-1)).max()
    assert 0 < float(worst) <= plan.certified <= plan.certified_paper


def test_simulation_matches_a_naive_message_passing_reference() -> None:
    net = _tiny(nn.Sigmoid, 3, widths=(4, 5, 3, 2))
    plan = boosting(net, quorum=[3, 4, 2])
    x = torch.rand(6, 4, generator=torch.Generator().manual_seed(0)) * 2 - 1
    sim = simulate(net, plan, x, "lognormal:0,1", seed=7)
    rng = np.random.default_rng(7)
    stages = _Boost(net, "neuron").stages
    lat = [rng.lognormal(0, 1, (6, st.affine.affine.weight.shape[0], st.affine.affine.weight.shape[1]))
           for st in stages]
    for b in range(6):
        y = x[b].double().tolist()
        t = [0.0] * len(y)
        tf = [0.0] * len(y)
        yr = list(y)
        for k, st in enumerate(stages):
            w, bias = st.affine.affine.weight, st.affine.affine.bias
            ny, nt, ntf, nyr = [], [], [], []
            for j in range(w.shape[0]):
                arr = [t[i] + lat[k][b, j, i] for i in range(len(y))]
                first = sorted(range(len(y)), key=lambda i: arr[i])[:plan.quorum[k]]
                v = [y[i] if i in first else plan.substitutes[k][i] for i in range(len(y))]
                s = float(bias[j]) + sum(float(w[j, i]) * v[i] for i in range(len(y)))
                sr = float(bias[j]) + sum(float(w[j, i]) * yr[i] for i in range(len(y)))
                if st.act is not None:
                    s, sr = 1 / (1 + math.exp(-s)), 1 / (1 + math.exp(-sr))
                ny.append(s)
                nyr.append(sr)
                nt.append(max(arr[i] for i in first))
                ntf.append(max(tf[i] + lat[k][b, j, i] for i in range(len(y))))
            y, t, tf, yr = ny, nt, ntf, nyr
        row = sim.per_sample.iloc[b]
        assert row["latency_quorum"] == pytest.approx(max(t), rel=1e-12)
        assert row["latency_full"] == pytest.approx(max(tf), rel=1e-12)
        assert row["error"] == pytest.approx(max(abs(p - q) for p, q in zip(y, yr)), rel=1e-9, abs=1e-12)


def test_full_quorum_is_the_plain_network_exactly(refs) -> None:
    r, net = refs["digits-mlp-sigmoid"]
    fan = [net.nodes[i].affine.weight.shape[1] for i in net.synapse_layers]
    plan = boosting(net, quorum=fan)
    assert plan.certified == 0 and plan.certified_paper == 0
    sim = simulate(net, plan, r.x_test[:50], "exp:2", seed=1)
    assert (sim.per_sample["error"] == 0).all()
    assert (sim.per_sample["latency_full"] == sim.per_sample["latency_quorum"]).all()


def test_selection_is_maximal_within_budget(refs) -> None:
    _, net = refs["digits-mlp-sigmoid"]
    plan = boosting(net, 5.0)
    b = _Boost(net, "neuron")
    f = list(plan.relaxed)
    assert b.interval(f) <= 5.0
    for k in range(len(f)):
        if f[k] + 1 < plan.fan_in[k]:
            g = list(f)
            g[k] += 1
            assert b.interval(g) > 5.0
    tight = boosting(net, 1e-9)
    assert tight.relaxed == (0, 0, 0) and tight.certified == 0


def test_top_level_name_stays_the_function(refs) -> None:
    import importlib

    _, net = refs["digits-mlp-sigmoid"]
    first = hwrel.boosting(net, 5.0)
    module = importlib.import_module("hwrel.boosting")  # importing the submodule must not shadow it
    second = hwrel.boosting(net, 5.0)
    assert first.quorum == second.quorum and callable(module.simulate)


def test_latency_specs() -> None:
    assert parse_latency("pareto:1.5").params == (1.5, 1.0)
    assert parse_latency("exponential:2").params == (2.0,)
    assert parse_latency("lognormal:-1,0.5").params == (-1.0, 0.5)
    rng = np.random.default_rng(0)
    p = parse_latency("pareto:2.5,3").sample(rng, (20000,))
    assert p.min() >= 3 and np.mean(p) == pytest.approx(2.5 * 3 / 1.5, rel=0.05)
    assert np.mean(parse_latency("exp:2").sample(rng, (20000,))) == pytest.approx(2.0, rel=0.05)
    for bad in ("pareto:-1", "weibull:1", "exp:0", "lognormal:0,x", "exp:1,2", "pareto:nan"):
        with pytest.raises(HwrelError):
            parse_latency(bad)


def test_bad_input() -> None:
    net = _tiny(nn.Sigmoid, 0)
    with pytest.raises(HwrelError, match="quorum\\[1\\] = 4"):
        boosting(net, quorum=[3, 4, 3])
    with pytest.raises(HwrelError, match="must lie in"):
        boosting(net, quorum=[0, 3, 3])
    with pytest.raises(HwrelError, match="3 receiving"):
        boosting(net, quorum=[3, 3])
    with pytest.raises(HwrelError, match="no quorum can meet"):
        boosting(net, 0.1, epsilon_prime=0.5)
    with pytest.raises(HwrelError, match="above"):
        boosting(net, 1e-6, quorum=[1, 1, 1])
    with pytest.raises(HwrelError):
        boosting(net, -1.0)
    with pytest.raises(HwrelError):
        boosting(net)
    with pytest.raises(HwrelError, match="substitute"):
        boosting(net, 1.0, substitute="mean")
    conv = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8, 2))
    cnet = hwrel.Network.from_module(conv, (0.0, 1.0), (1, 4, 4))
    with pytest.raises(UnsupportedLayerError, match="dense"):
        boosting(cnet, 1.0)


def test_cli(capsys, refs) -> None:
    assert main(["boost", "digits-mlp-sigmoid", "--epsilon", "5", "--latency", "pareto:1.5", "--samples", "100",
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["plan"]["quorum"][-1] < 64 and out["simulation"]["runs"] == 100
    assert out["simulation"]["max_error"] <= out["plan"]["certified"]
    assert main(["boost", "digits-mlp-sigmoid", "--quorum", "64,64,80"]) == 2
    assert "quorum[2] = 80" in capsys.readouterr().err
    assert main(["boost", "digits-mlp-sigmoid", "--epsilon", "1", "--latency", "pareto:0"]) == 2
