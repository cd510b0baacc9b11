"""Soundness and exactness of the Fep bounds (issue 2).

Oracle: ``bound_oracle.faulty_forward`` (hooks on a plain nn.Sequential), never hwrel's own code.
No float tolerance: the model runs in float32 and the bounds cover the float32 rounding of both
forwards (:mod:`hwrel.bounds.fp32`), so a measured error never exceeds them.
"""
from __future__ import annotations

import itertools
import math
import zlib

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import hwrel
from bound_oracle import failure_sets, faulty_forward, gradient_worst_input, probe_inputs
from hwrel.bounds import Analyzer

ACTS = {
    "relu": nn.ReLU, "relu6": nn.ReLU6, "leaky": lambda: nn.LeakyReLU(0.1), "sigmoid": nn.Sigmoid,
    "hardsigmoid": nn.Hardsigmoid, "tanh": nn.Tanh, "hardtanh": lambda: nn.Hardtanh(-0.5, 0.8),
}
METHODS = ("paper", "weights", "interval", "best")


def mlp(sizes, act, seed, scale=1.0, bias_scale=1.0):
    torch.manual_seed(seed)
    layers = []
    for k, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        lin = nn.Linear(a, b)
        with torch.no_grad():
            lin.weight.mul_(scale * math.sqrt(a))
            lin.bias.mul_(bias_scale * math.sqrt(a))
        layers.append(lin)
        if k < len(sizes) - 2:
            layers.append(ACTS[act]())
    return nn.Sequential(*layers).eval()


def assert_sound(res, measured, context):
    for m in METHODS:
        b = res.by_method[m]
        assert b >= measured, f"{m} bound {b} < measured {measured} ({context})"


def measure_neuron(model, x, sizes, f, values):
    """Worst output change over every failure set of sizes f and every value pattern in `values`."""
    clean = faulty_forward(model, x)
    worst, worst_faults = 0.0, None
    for sets in failure_sets(sizes, f):
        for vals in itertools.product(values, repeat=sum(f)):
            it = iter(vals)
            faults = [{i: next(it) for i in s} for s in sets]
            d = float((faulty_forward(model, x, faults) - clean).abs().max())
            if d > worst or worst_faults is None:  # (a set even where none moves the probes: dead ReLUs)
                worst, worst_faults = max(d, worst), faults
    return worst, worst_faults


@pytest.mark.parametrize("act", list(ACTS))
@pytest.mark.parametrize("fault", ["crash", "byzantine"])
def test_exhaustive_neuron_failures_never_exceed_any_bound(act, fault):
    sizes = [3, 4, 3, 2]
    model = mlp(sizes, act, seed=zlib.crc32(act.encode()) % 1000)  # hash() of a str differs per process
    net = hwrel.Network.from_module(model, (0.0, 1.0))
    x = probe_inputs(0.0, 1.0, 3, 150, seed=1)
    cap = 1.5
    values = [0.0] if fault == "crash" else [-cap, 0.0, cap]
    for f in ([1, 0], [0, 1], [1, 1], [2, 1], [4, 3]):
        res = hwrel.fep(net, f, fault, capacity=cap if fault == "byzantine" else None)
        worst, faults = measure_neuron(model, x, sizes[1:3], f, values)
        # a gradient search on the input for the worst failure set found
        worst = max(worst, gradient_worst_input(model, 0.0, 1.0, 3, faults, steps=25, restarts=2))
        assert_sound(res, worst, f"{act} {fault} f={f}")


@pytest.mark.parametrize("act", ["sigmoid", "hardsigmoid"])
def test_paper_mode_byzantine_sound_when_values_share_the_range(act):
    """Paper-mode delta = C is sound when correct and Byzantine values lie in [0, C]."""
    sizes = [3, 4, 3, 2]
    model = mlp(sizes, act, seed=7)
    net = hwrel.Network.from_module(model, (0.0, 1.0))
    x = probe_inputs(0.0, 1.0, 3, 150, seed=2)
    for f in ([1, 0], [1, 1], [2, 2]):
        res = hwrel.fep(net, f, "byzantine", capacity=1.0, mode="paper")
        worst, _ = measure_neuron(model, x, sizes[1:3], f, [0.0, 1.0])
        assert_sound(res, worst, f"paper-mode f={f}")


@pytest.mark.parametrize("fault", ["synapse-crash", "synapse-byzantine"])
@pytest.mark.parametrize("act", ["relu", "sigmoid", "tanh"])
def test_exhaustive_synapse_failures_never_exceed_any_bound(fault, act):
    sizes = [3, 3, 2, 2]
    model = mlp(sizes, act, seed=11)
    net = hwrel.Network.from_module(model, (0.0, 1.0))
    x = probe_inputs(0.0, 1.0, 3, 100, seed=3)
    clean = faulty_forward(model, x)
    syn = [[(j, i) for j in range(b) for i in range(a)] for a, b in zip(sizes[:-1], sizes[1:])]
    cap = 1.2
    values = [None] if fault == "synapse-crash" else [-cap, cap]
    for g in ([1, 0, 0], [0, 1, 0], [0, 0, 2], [1, 1, 1]):
        res = hwrel.fep(net, g, fault, capacity=cap if fault == "synapse-byzantine" else None)
        worst = 0.0
        for sets in itertools.product(*[itertools.combinations(s, k) for s, k in zip(syn, g)]):
            for vals in itertools.product(values, repeat=sum(g)):
                it = iter(vals)
                faults = [{pair: next(it) for pair in s} for s in sets]
                d = float((faulty_forward(model, x, synapse_faults=faults) - clean).abs().max())
                worst = max(worst, d)
        assert_sound(res, worst, f"{fault} {act} g={g}")


def closed_form(sizes, w_m, K, delta, f):
    """The paper's closed form, written out literally (theory section 2)."""
    L = len(sizes)
    total = 0.0
    for l in range(L):
        term = f[l] * K ** (L - 1 - l) * w_m[L]
        for lp in range(l + 1, L):
            term *= (sizes[lp] - f[lp]) * w_m[lp]
        total += term
    return delta * total


@pytest.mark.parametrize("seed", range(5))
def test_paper_method_reproduces_the_closed_form(seed):
    g = torch.Generator().manual_seed(seed)
    depth = int(torch.randint(1, 4, (1,), generator=g))
    sizes = [int(v) for v in torch.randint(2, 9, (depth + 2,), generator=g)]
    model = mlp(sizes, "sigmoid", seed)
    net = hwrel.Network.from_module(model, (0.0, 1.0))
    hidden = sizes[1:-1]
    f = [int(torch.randint(0, n + 1, (1,), generator=g)) for n in hidden]
    w_m = [float(m.weight.abs().max()) for m in model if isinstance(m, nn.Linear)]
    expect = closed_form(hidden, w_m, 0.25, 1.0, f)
    got = hwrel.fep(net, f, "crash", method="paper").bound
    # the closed form in exact arithmetic, plus the float32 rounding of the two forwards (~1e-5 here)
    assert expect <= got <= expect * (1 + 1e-4) + 1e-12


def test_paper_bound_is_reached_by_a_constructed_network():
    """Hardsigmoid (slope K=1/6 on (-3, 3), range [0, 1]): equal positive weights, failed neurons
    saturated at 1, correct ones in the linear region: a crash pattern reaches Fep exactly."""
    w = 0.5
    N1, N2, f1, f2 = 4, 5, 2, 2
    l1, l2, l3 = nn.Linear(1, N1), nn.Linear(N1, N2), nn.Linear(N2, 1)
    with torch.no_grad():
        l1.weight.fill_(w)
        l1.bias.fill_(10.0)  # layer 1 saturated at 1 for x in [0, 1]
        l2.weight.fill_(w)
        l2.bias.copy_(torch.tensor([0.9, 0.9, 0.9, 20.0, 20.0]))  # 3 linear, 2 saturated (to fail)
        l3.weight.fill_(w)
        l3.bias.zero_()
    model = nn.Sequential(l1, nn.Hardsigmoid(), l2, nn.Hardsigmoid(), l3).eval()
    net = hwrel.Network.from_module(model, (0.0, 1.0))
    fep = hwrel.fep(net, [f1, f2], "crash", method="paper").bound
    x = torch.tensor([[0.5]])
    clean = faulty_forward(model, x)
    faulty = faulty_forward(model, x, [{0: 0.0, 1: 0.0}, {3: 0.0, 4: 0.0}])
    measured = float((faulty - clean).abs().max())
    assert measured == pytest.approx(fep, rel=0.01)
    exact = closed_form([N1, N2], [w, w, w], 1 / 6, 1.0, [f1, f2])
    assert exact <= fep <= exact * (1 + 1e-4)  # plus float32 rounding


def test_at_most_semantics_dominates_every_smaller_failure_vector():
    model = mlp([3, 5, 4, 3, 2], "sigmoid", seed=3, scale=2.0)
    net = hwrel.Network.from_module(model, (0.0, 1.0))
    an = Analyzer(net)
    from hwrel.bounds.faults import FaultModel

    fm = FaultModel("crash")
    f = [5, 4, 3]
    top = an.all_methods(fm, f, at_most=True)
    for fp in itertools.product(*[range(k + 1) for k in f]):
        exact = an.all_methods(fm, list(fp), at_most=False)
        for m in METHODS:
            assert top[m] >= exact[m] - 1e-12, (m, fp)
    # and the paper's exact-f value is not monotone here (why at_most exists)
    vals = [an.paper(fm, [5, 4, k], False) for k in range(4)]
    assert any(a > b for a, b in zip(vals, vals[1:])) or top["paper"] >= max(vals)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10_000), act=st.sampled_from(list(ACTS)), depth=st.integers(1, 3),
       fault=st.sampled_from(["crash", "byzantine"]))
def test_property_random_networks_random_failures(seed, act, depth, fault):
    """For random MLPs, activations and failure vectors, sampled failure sets and inputs never
    exceed any method's bound."""
    g = torch.Generator().manual_seed(seed)
    sizes = [int(v) for v in torch.randint(2, 7, (depth + 2,), generator=g)]
    model = mlp(sizes, act, seed, scale=float(torch.rand(1, generator=g)) * 2 + 0.1)
    net = hwrel.Network.from_module(model, (-1.0, 1.0))
    hidden = sizes[1:-1]
    f = [int(torch.randint(0, n + 1, (1,), generator=g)) for n in hidden]
    cap = 2.0
    res = hwrel.fep(net, f, fault, capacity=cap if fault == "byzantine" else None)
    x = probe_inputs(-1.0, 1.0, sizes[0], 64, seed)
    clean = faulty_forward(model, x)
    worst = 0.0
    for _ in range(20):
        faults = []
        for n, k in zip(hidden, f):
            idx = torch.randperm(n, generator=g)[:k].tolist()
            vals = (torch.randint(0, 2, (k,), generator=g) * 2 - 1).float() * cap if fault == "byzantine" else torch.zeros(k)
            faults.append(dict(zip(idx, vals.tolist())))
        worst = max(worst, float((faulty_forward(model, x, faults) - clean).abs().max()))
    assert_sound(res, worst, f"seed={seed} {act} {sizes} f={f}")


def test_weights_never_above_paper_on_random_networks():
    for seed in range(10):
        model = mlp([4, 6, 5, 3], ["relu", "sigmoid", "tanh"][seed % 3], seed)
        net = hwrel.Network.from_module(model, (0.0, 1.0))
        for f in ([1, 0], [0, 2], [3, 3], [6, 5]):
            r = hwrel.fep(net, f).by_method
            assert r["weights"] <= r["paper"] * (1 + 1e-12)
            assert r["best"] == min(r["paper"], r["weights"], r["interval"])


def test_reference_model_weights_far_below_paper():
    rm = hwrel.models.load("digits-mlp-sigmoid")
    net = hwrel.Network.from_module(rm.module, rm.input_domain, rm.input_shape)
    table = hwrel.fep_table(net, "crash")
    assert (table["weights"] <= table["paper"]).all()
    # each single failure in the first hidden layer: weight-aware is far below the paper's bound
    assert table["weights_over_paper"].iloc[0] < 0.5


def test_cnn_with_residual_and_pools_is_sound_under_random_crashes():
    class Res(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1 = nn.Conv2d(1, 3, 3, padding=1)
            self.bn = nn.BatchNorm2d(3)
            self.a1 = nn.ReLU()
            self.c2 = nn.Conv2d(3, 3, 3, padding=1)
            self.a2 = nn.Tanh()
            self.pool = nn.MaxPool2d(2)
            self.avg = nn.AvgPool2d(2)
            self.fc = nn.Linear(3 * 2 * 2, 2)
            self.a3 = nn.Sigmoid()
            self.out = nn.Linear(2, 2)

        def forward(self, x):
            y = self.a1(self.bn(self.c1(x)))
            y = self.a2(self.c2(y) + y)
            y = self.avg(self.pool(y))
            return self.out(self.a3(self.fc(torch.flatten(y, 1))))

    torch.manual_seed(0)
    model = Res().eval()
    with torch.no_grad():
        model.bn.running_mean.uniform_(-0.2, 0.2)
        model.bn.running_var.uniform_(0.5, 2)
    net = hwrel.Network.from_module(model, (0.0, 1.0), (1, 8, 8))
    x = torch.rand(64, 1, 8, 8)
    assert torch.allclose(net.forward(x), model(x), atol=1e-5)
    acts = [model.a1, model.a2, model.a3]
    assert net.layer_sizes() == [192, 192, 2]
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        clean = model(x)
    for f in ([2, 0, 0], [0, 3, 0], [0, 0, 1], [1, 1, 1]):
        res = hwrel.fep(net, f, "crash")
        worst = 0.0
        for _ in range(30):
            hooks = []
            for mod, k, n in zip(acts, f, net.layer_sizes()):
                idx = torch.randperm(n, generator=g)[:k]

                def hook(m, i, o, idx=idx):
                    o = o.clone().flatten(1)
                    o[:, idx] = 0
                    return o.reshape(i[0].shape)
                hooks.append(mod.register_forward_hook(hook))
            with torch.no_grad():
                worst = max(worst, float((model(x) - clean).abs().max()))
            for h in hooks:
                h.remove()
        assert_sound(res, worst, f"cnn f={f}")


def test_certified_accuracy_never_above_measured_accuracy_under_failures():
    rm = hwrel.models.load("digits-mlp-sigmoid")
    net = hwrel.Network.from_module(rm.module, rm.input_domain, rm.input_shape)
    x, y = rm.x_test, rm.y_test
    f = [2, 1]
    cert = hwrel.certified_accuracy(net, x, y, f)
    assert 0 < cert.certified_accuracy <= cert.clean_accuracy
    g = torch.Generator().manual_seed(0)
    certified = torch.tensor(cert.per_sample["certified"].to_numpy())
    with torch.no_grad():
        pred = rm.module(x).argmax(1)
    for _ in range(40):
        faults = [dict.fromkeys(torch.randperm(n, generator=g)[:k].tolist(), 0.0) for n, k in zip(net.layer_sizes(), f)]
        out = faulty_forward(rm.module, x, faults)
        acc = float((out.argmax(1) == y).float().mean())
        assert cert.certified_accuracy <= acc + 1e-12
        # no certified sample ever changes its class
        assert bool((out.argmax(1)[certified] == pred[certified]).all())


def test_tolerance_is_maximal_and_within_budget():
    rm = hwrel.models.load("digits-mlp-sigmoid")
    net = hwrel.Network.from_module(rm.module, rm.input_domain, rm.input_shape)
    eps = 6.0
    tol = hwrel.tolerance(net, epsilon=eps, epsilon_prime=1.0)
    budget = eps - 1.0
    an = Analyzer(net)
    from hwrel.bounds.faults import FaultModel

    fm = FaultModel("crash")
    sizes = net.layer_sizes()
    assert an.all_methods(fm, list(tol.maximal), True)["best"] <= budget
    for k in range(len(sizes)):
        if tol.maximal[k] < sizes[k]:
            bumped = list(tol.maximal)
            bumped[k] += 1
            assert an.all_methods(fm, bumped, True)["best"] > budget
        alone = [0] * len(sizes)
        alone[k] = tol.per_layer[k]
        assert an.all_methods(fm, alone, True)["best"] <= budget
    assert any(v > 0 for v in tol.per_layer)
    # epsilon' measured on data: logits against one-hot labels
    measured = hwrel.tolerance(net, epsilon=100.0, data=(rm.x_test, rm.y_test))
    assert measured.epsilon_prime > 0


@pytest.mark.parametrize("bad, match", [
    (dict(failures=[1]), "entries"),
    (dict(failures=[1, 0, 0]), "entries"),
    (dict(failures=[65, 0]), "exceeds"),
    (dict(failures=[-1, 0]), "non-negative"),
    (dict(failures=[0.5, 0]), "non-negative"),
    (dict(failures=[1, 0], fault="melt"), "unknown fault"),
    (dict(failures=[1, 0], fault="byzantine"), "capacity"),
    (dict(failures=[1, 0], method="magic"), "unknown method"),
])
def test_bad_fep_input_gives_one_line_errors(bad, match):
    model = mlp([3, 64, 4, 2], "relu", 0)
    net = hwrel.Network.from_module(model, (0.0, 1.0))
    kwargs = dict(bad)
    failures = kwargs.pop("failures")
    with pytest.raises(hwrel.HwrelError, match=match) as exc:
        hwrel.fep(net, failures, **kwargs)
    assert "\n" not in str(exc.value)


@pytest.mark.parametrize("eps", [float("nan"), -1.0])
def test_bad_epsilon(eps):
    net = hwrel.Network.from_module(mlp([3, 4, 2], "relu", 0), (0.0, 1.0))
    with pytest.raises(hwrel.HwrelError, match="epsilon"):
        hwrel.tolerance(net, epsilon=eps)


@pytest.mark.parametrize("fault", ["crash", "byzantine"])
def test_brevitas_quantized_activations_are_sound_under_failures(fault):
    """QuantReLU rounds: an input error can grow by one quantization step. Every method must cover
    that slack; the oracle replaces QuantReLU outputs of the Brevitas model itself through hooks."""
    import brevitas.nn as qnn

    torch.manual_seed(5)
    model = nn.Sequential(
        qnn.QuantLinear(4, 6, bias=True, weight_bit_width=4), qnn.QuantReLU(bit_width=3),
        qnn.QuantLinear(6, 5, bias=True, weight_bit_width=4), qnn.QuantReLU(bit_width=3),
        qnn.QuantLinear(5, 2, bias=True, weight_bit_width=4)).eval()
    net = hwrel.Network.from_module(model, (0.0, 1.0))
    assert net.num_layers == 2 and all(net.nodes[i].act.quant_step > 0 for i in net.layers)
    x = probe_inputs(0.0, 1.0, 4, 300, seed=4)
    cap = 1.0
    values = [0.0] if fault == "crash" else [-cap, cap]
    acts = [model[1], model[3]]
    with torch.no_grad():
        clean = model(x)
    for f in ([1, 0], [0, 1], [1, 1], [2, 2]):
        res = hwrel.fep(net, f, fault, capacity=cap if fault == "byzantine" else None)
        worst = 0.0
        for sets in failure_sets([6, 5], f):
            for vals in itertools.product(values, repeat=sum(f)):
                it = iter(vals)
                hooks = []
                for mod, s in zip(acts, sets):
                    faults = {i: next(it) for i in s}

                    def hook(m, inp, out, faults=faults):
                        out = out.clone()
                        for i, v in faults.items():
                            out[:, i] = v
                        return out
                    hooks.append(mod.register_forward_hook(hook))
                with torch.no_grad():
                    worst = max(worst, float((model(x) - clean).abs().max()))
                for h in hooks:
                    h.remove()
        assert_sound(res, worst, f"brevitas {fault} f={f}")


@pytest.mark.parametrize("exported", [False, True])
def test_sum_pool_divisor_override_is_modelled_not_averaged(exported):
    """Issue 17: AvgPool2d(divisor_override=1) (a sum pool) was modelled as a plain average, so
    Network.forward differed from the module and the crash bound was 4x too small."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2, divisor_override=1),
                          nn.Flatten(), nn.Linear(8, 2)).eval()
    src = torch.export.export(model, (torch.rand(2, 1, 4, 4),)).module() if exported else model
    net = hwrel.Network.from_module(src, (-1.0, 2.0), (1, 4, 4))
    x = torch.rand(200, 1, 4, 4) * 3 - 1
    with torch.no_grad():
        clean = model(x)
        assert torch.allclose(net.forward(x), clean, atol=1e-5)
        worst = 0.0
        for i in range(32):
            h = model[1].register_forward_hook(lambda m, inp, out, i=i: out.flatten(1).index_fill(1, torch.tensor([i]), 0.0)
                                               .reshape(out.shape))
            worst = max(worst, float((model(x) - clean).abs().max()))
            h.remove()
    res = hwrel.fep(net, [1], "crash")
    assert worst > 0
    for m in METHODS:
        assert res.by_method[m] >= worst, (m, res.by_method[m], worst)


@pytest.mark.parametrize("make, match", [
    (lambda: nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Flatten(0), nn.Linear(6, 2)), "batch"),
    (lambda: nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Flatten(), nn.Linear(9, 2)), "normalizes"),
    (lambda: _View(lambda x: x.view(3, -1)), "batch"),
    (lambda: _View(lambda x: x.view(x.size(0), x.size(1), -1)), "size"),
    (lambda: _View(lambda x: x.view(x.size(1), -1)), "size"),
])
def test_operations_that_would_be_reinterpreted_are_refused(make, match):
    """An operation hwrel cannot model exactly is refused with one line naming it, never silently
    reinterpreted (issue 17): flattening into the batch, batch norm after a Linear over rows, views
    that do not keep the batch as their first dimension."""
    model = make().eval()
    with pytest.raises(hwrel.HwrelError, match=match) as exc:
        hwrel.Network.from_module(model, (0.0, 1.0), (3, 4))
    assert "\n" not in str(exc.value)


class _View(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn, self.fc = fn, nn.Linear(12, 2)

    def forward(self, x):
        return self.fc(torch.flatten(self.fn(x), 1))


def test_views_that_keep_the_batch_are_accepted():
    class V(nn.Module):
        def __init__(self):
            super().__init__()
            self.l1, self.fc = nn.Linear(4, 3), nn.Linear(9, 2)

        def forward(self, x):
            y = self.l1(x.view(x.size(0), 3, 4))
            return self.fc(y.view(-1, 9))

    model = V().eval()
    net = hwrel.Network.from_module(model, (0.0, 1.0), (12,))
    x = torch.rand(5, 12)
    assert torch.allclose(net.forward(x), model(x), atol=1e-6)
