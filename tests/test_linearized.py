"""The linearized weight-perturbation bound: exact where the network is linear, sound everywhere.

Soundness is checked against perturbations that injection realizes (every corner of the box on
tiny networks, random corners and gradient-sign attacks on larger ones, hypothesis over random
networks), on every activation kind, max-pooling (ties included), convolutions and residual adds.
"""
from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import hwrel
from hwrel.bounds.linearized import LinearizedBound, linearize
from hwrel.bounds.perturb import WeightPerturbation, perturbation_radii
from hwrel.quantize.search import perturbed_forward

ACTS = {"relu": nn.ReLU, "leaky_relu": lambda: nn.LeakyReLU(0.1), "relu6": nn.ReLU6, "hardtanh": nn.Hardtanh,
        "hardsigmoid": nn.Hardsigmoid, "sigmoid": nn.Sigmoid, "tanh": nn.Tanh}


def _net(module: nn.Module, shape, lo=-1.0, hi=1.0) -> hwrel.Network:
    return hwrel.Network.from_module(module.eval(), (lo, hi), shape).to(torch.float64)


def _seeded(module: nn.Module, seed: int, scale: float = 1.0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale)
    return module


def _radii(net: hwrel.Network, scale: float, seed: int, layers=None) -> dict[int, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    layers = net.synapse_layers if layers is None else layers
    return {i: scale * torch.rand(net.nodes[i].affine.weight.shape, generator=g, dtype=torch.float64)
            for i in layers}


def _bounds(net, x, wr):
    """(per-output, per-margin) linearized bounds and the interval bound, at the points ``x``."""
    p = WeightPerturbation(weight_radius=wr)
    vals = net.forward_all(x)
    radii = perturbation_radii(net, p, x, x, "interval", (vals, vals), rounding=None)  # float64 forwards
    b = LinearizedBound(linearize(net, x)).bounds(p, radii)
    return b["out"], b["margin"], radii[-1].flatten(1)


def _changes(net, x, dw):
    """Realized ``|dF|`` and ``|d(F_p - F_o)|`` of one weight perturbation (float64 forward)."""
    clean = net.forward(x)
    out = perturbed_forward(net, x, dw, {})
    pred = clean.argmax(1, keepdim=True)
    d = out - clean
    return d.abs(), (d.gather(1, pred) - d).abs()


def _attack(net, x, wr, steps: int = 15):
    """Sign-gradient ascent on every output's and every margin's change, per input (a strong
    search inside the box; every perturbation it returns is real)."""
    clean = net.forward(x)
    pred = clean.argmax(1, keepdim=True)
    best_o = torch.zeros_like(clean)
    best_m = torch.zeros_like(clean)
    for o in range(clean.shape[1]):
        for kind in ("out", "margin"):
            for sign in (1.0, -1.0):
                for n in range(len(x)):
                    xn = x[n:n + 1]
                    dw = {i: torch.zeros_like(r, requires_grad=True) for i, r in wr.items()}
                    for t in range(steps):
                        f = perturbed_forward(net, xn, dw, {}) - clean[n:n + 1]
                        obj = f[0, o] if kind == "out" else f[0, pred[n, 0]] - f[0, o]
                        gs = torch.autograd.grad(sign * obj, list(dw.values()))
                        with torch.no_grad():
                            for (i, v), g in zip(dw.items(), gs):
                                step = 1.0 if t == 0 else 0.5 ** (t / 3)
                                v.copy_(torch.clamp(v + step * wr[i] * torch.sign(g), -wr[i], wr[i]))
                    with torch.no_grad():
                        a_o, a_m = _changes(net, xn, {i: v.detach() for i, v in dw.items()})
                    best_o[n] = torch.maximum(best_o[n], a_o[0])
                    best_m[n] = torch.maximum(best_m[n], a_m[0])
    return best_o, best_m


def _assert_sound(bound, seen, rel=1e-9):
    assert bool((seen <= bound * (1 + rel) + 1e-12).all()), float((seen - bound).max())


# --------------------------------------------------------------------------------- exactness

def test_exact_on_a_linear_convolution_where_interval_overcounts():
    """Conv -> flatten -> dense, no activation, only the (shared) kernel perturbed: the output change
    is linear in the kernel, so the bound equals the change at the sign corner, to float tolerance,
    while the interval bound (each position its own rounding) is several times larger."""
    torch.manual_seed(0)
    net = _net(_seeded(nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(2 * 4 * 4, 3)), 1),
               (1, 6, 6), 0.0, 1.0)
    conv = net.synapse_layers[0]
    wr = _radii(net, 0.05, 2, [conv])
    x = torch.rand(4, 1, 6, 6, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    b_out, b_m, b_int = _bounds(net, x, wr)
    for n in range(len(x)):
        for o in range(3):
            w = net.nodes[conv].affine.weight.clone().requires_grad_(True)
            f = perturbed_forward(net, x[n:n + 1], {conv: w - net.nodes[conv].affine.weight}, {})
            g, = torch.autograd.grad(f[0, o], w)
            d_out, _ = _changes(net, x[n:n + 1], {conv: wr[conv] * torch.sign(g)})
            # equal up to the bound's stated 2^-20 float-rounding slack
            assert float(d_out[0, o]) == pytest.approx(float(b_out[n, o]) / (1 + 2 ** -20), rel=1e-9)
    assert bool((b_int > 2 * b_out).all())  # the sharing the interval bound cannot see


def test_first_order_is_exact_worst_case_of_the_linear_term():
    net = _net(_seeded(nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)), 4), (5,))
    wr = _radii(net, 1e-7, 5)
    x = torch.rand(6, 5, generator=torch.Generator().manual_seed(6), dtype=torch.float64) * 2 - 1
    lb = LinearizedBound(linearize(net, x))
    first = lb.first_order(WeightPerturbation(weight_radius=wr))["out"]
    b_out, _, _ = _bounds(net, x, wr)
    assert bool((b_out >= first).all())
    assert float(((b_out - first) / first).max()) < 1e-5  # tiny radii: the remainder is second order
    seen, _ = _attack(net, x, wr, steps=3)
    assert float((seen / first).min()) > 1 - 1e-4  # the first-order worst case is reached


# --------------------------------------------------------------------------------- soundness

@pytest.mark.parametrize("act", sorted(ACTS))
def test_every_corner_of_the_box_on_tiny_networks(act):
    """2-3-2 networks: all 2^12 corners of the radius box, radii large enough that activations
    leave their linear pieces, at inputs including ones on a kink."""
    net = _net(_seeded(nn.Sequential(nn.Linear(2, 3), ACTS[act](), nn.Linear(3, 2)), 7), (2,))
    wr = _radii(net, 0.4, 8)
    x = torch.tensor([[0.3, -0.7], [0.0, 0.0], [1.0, -1.0], [-0.2, 0.9]], dtype=torch.float64)
    b_out, b_m, _ = _bounds(net, x, wr)
    sites = [(i, j) for i in wr for j in itertools.product(*map(range, wr[i].shape))]
    assert len(sites) == 12
    signs = torch.tensor(list(itertools.product((-1.0, 1.0), repeat=len(sites))), dtype=torch.float64)
    worst_o = torch.zeros_like(b_out)
    worst_m = torch.zeros_like(b_m)
    for s in signs:
        dw = {i: torch.zeros_like(r) for i, r in wr.items()}
        for (i, j), v in zip(sites, s):
            dw[i][j] = v * wr[i][j]
        d_o, d_m = _changes(net, x, dw)
        worst_o, worst_m = torch.maximum(worst_o, d_o), torch.maximum(worst_m, d_m)
    _assert_sound(b_out, worst_o)
    _assert_sound(b_m, worst_m)
    assert float(worst_o.max()) > 0.05  # the perturbations are not negligible


def _lenet_like(act: str) -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 2, 3), ACTS[act](), nn.MaxPool2d(2), nn.Conv2d(2, 3, 2), ACTS[act](),
                         nn.Flatten(), nn.Linear(3 * 2 * 2, 3))


class _Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.r1 = nn.Conv2d(2, 2, 3, padding=1), nn.ReLU()
        self.c2, self.r2 = nn.Conv2d(2, 2, 3, padding=1), nn.ReLU()
        self.stem, self.pool, self.fc = nn.Conv2d(1, 2, 3, padding=1), nn.MaxPool2d(2), nn.Linear(2 * 3 * 3, 3)

    def forward(self, x):
        x = self.pool(torch.relu(self.stem(x)))
        return self.fc(torch.flatten(self.r2(self.c2(self.r1(self.c1(x))) + x), 1))


@pytest.mark.parametrize("kind", ["relu", "tanh", "hardtanh", "residual", "overlapping-pool"])
def test_convolutions_pools_and_residuals_against_search(kind):
    if kind == "residual":
        module, shape = _Residual(), (1, 6, 6)
    elif kind == "overlapping-pool":
        module = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.MaxPool2d(3, stride=2, padding=1), nn.Flatten(),
                               nn.Linear(2 * 3 * 3, 3))
        shape = (1, 8, 8)
    else:
        module, shape = _lenet_like(kind), (1, 8, 8)
    net = _net(_seeded(module, 9, 0.7), shape, 0.0, 1.0)
    g = torch.Generator().manual_seed(10)
    x = torch.rand(3, *shape, generator=g, dtype=torch.float64)
    x[0, :, :4] = 0.0  # a dead region: pool windows tie at zero
    for scale in (0.02, 0.2):
        wr = _radii(net, scale, 11)
        b_out, b_m, _ = _bounds(net, x, wr)
        seen_o, seen_m = _attack(net, x, wr, steps=8)
        for k in range(40):  # random corners too
            dw = {i: r * torch.sign(torch.rand(r.shape, generator=g, dtype=torch.float64) - 0.5) for i, r in wr.items()}
            d_o, d_m = _changes(net, x, dw)
            seen_o, seen_m = torch.maximum(seen_o, d_o), torch.maximum(seen_m, d_m)
        _assert_sound(b_out, seen_o)
        _assert_sound(b_m, seen_m)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), depth=st.integers(1, 3), width=st.integers(2, 6),
       act=st.sampled_from(sorted(ACTS)), log_scale=st.floats(-4, 0))
def test_random_dense_networks(seed, depth, width, act, log_scale):
    layers: list[nn.Module] = []
    n_in = 3
    for _ in range(depth):
        layers += [nn.Linear(n_in, width), ACTS[act]()]
        n_in = width
    net = _net(_seeded(nn.Sequential(*layers, nn.Linear(n_in, 3)), seed), (3,))
    wr = _radii(net, 10 ** log_scale, seed + 1)
    x = torch.rand(2, 3, generator=torch.Generator().manual_seed(seed + 2), dtype=torch.float64) * 2 - 1
    b_out, b_m, _ = _bounds(net, x, wr)
    seen_o, seen_m = _attack(net, x, wr, steps=6)
    _assert_sound(b_out, seen_o)
    _assert_sound(b_m, seen_m)


def test_bias_and_activation_radii_are_covered():
    net = _net(_seeded(nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)), 12), (3,))
    a = net.synapse_layers[0]
    act = net.layers[0]
    x = torch.rand(3, 3, generator=torch.Generator().manual_seed(13), dtype=torch.float64)
    p = WeightPerturbation(weight_radius={a: torch.full_like(net.nodes[a].affine.weight, 0.01)},
                           bias_radius={a: torch.full((4,), 0.05, dtype=torch.float64)},
                           act_radius={act: torch.full((3, 4), 0.03, dtype=torch.float64)})
    vals = net.forward_all(x)
    radii = perturbation_radii(net, p, x, x, "interval", (vals, vals))
    b = LinearizedBound(linearize(net, x)).bounds(p, radii)["out"]
    g = torch.Generator().manual_seed(14)
    clean = net.forward(x)
    for _ in range(300):
        sgn = lambda t: torch.sign(torch.rand(t.shape, generator=g, dtype=torch.float64) - 0.5)  # noqa: E731
        dw = 0.01 * sgn(net.nodes[a].affine.weight)
        db = 0.05 * sgn(torch.zeros(4))
        da = 0.03 * sgn(torch.zeros(3, 4))
        h = torch.relu(x @ (net.nodes[a].affine.weight + dw).T + net.nodes[a].affine.bias + db) + da
        out = net.nodes[-1].affine(h)
        _assert_sound(b, (out - clean).abs())


def test_maxpool_arg_max_switch_is_covered():
    """A window whose maximum changes hands under the perturbation: the tangent through the nominal
    arg-max sees almost nothing, so the bound must come from the max-pool residual."""
    conv, fc = nn.Conv2d(2, 1, 1), nn.Linear(1, 2)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([1.0, 0.01]).reshape(1, 2, 1, 1))
        conv.bias.zero_()
        fc.weight.copy_(torch.tensor([[1.0], [-2.0]]))
        fc.bias.zero_()
    net = _net(nn.Sequential(conv, nn.MaxPool2d(2), nn.Flatten(), fc), (2, 2, 2), 0.0, 1.0)
    x = torch.tensor([[[[0.5, 0.49], [0.0, 0.0]], [[0.0, 0.3], [0.0, 0.0]]]], dtype=torch.float64)
    c = net.synapse_layers[0]
    wr = {c: torch.tensor([1e-6, 0.05], dtype=torch.float64).reshape(1, 2, 1, 1)}
    b_out, b_m, _ = _bounds(net, x, wr)
    first = LinearizedBound(linearize(net, x)).first_order(WeightPerturbation(weight_radius=wr))["out"]
    worst = torch.zeros_like(b_out)
    for sa, sb in itertools.product((-1.0, 1.0), repeat=2):
        d_o, _ = _changes(net, x, {c: wr[c] * torch.tensor([sa, sb], dtype=torch.float64).reshape(1, 2, 1, 1)})
        worst = torch.maximum(worst, d_o)
    assert float(worst.min()) > 100 * float(first.max())  # the switch, not the tangent, moves the output
    _assert_sound(b_out, worst)


def _all_values(net, x, dw):
    vals = []
    for i, node in enumerate(net.nodes):
        if node.op == "input":
            vals.append(x)
        elif node.op == "affine" and i in dw:
            vals.append(node.affine(vals[node.inputs[0]], weight=node.affine.weight + dw[i]))
        else:
            vals.append(node.apply([vals[j] for j in node.inputs]))
    return vals


@pytest.mark.parametrize("kind", ["lenet", "residual"])
def test_refined_radii_are_sound_and_tighter(kind):
    """The refiner's per-neuron radii bound every node's realized change (attacks aimed at single
    refined neurons, random corners), and beat the interval radii where they are used."""
    from hwrel.bounds.refine import NeuronRefiner

    module, shape = (_Residual(), (1, 6, 6)) if kind == "residual" else (_lenet_like("relu"), (1, 8, 8))
    seed, scale = (15, 0.03) if kind == "residual" else (21, 0.05)  # nets with unstable neurons to refine
    net = _net(_seeded(module, seed, 0.7), shape, 0.0, 1.0)
    g = torch.Generator().manual_seed(16)
    x = torch.rand(3, *shape, generator=g, dtype=torch.float64)
    wr = _radii(net, scale, 17)
    p = WeightPerturbation(weight_radius=wr)
    lin = linearize(net, x)
    vals = lin.values
    ref = NeuronRefiner(net)
    assert ref.targets
    plain = perturbation_radii(net, p, x, x, "interval", (vals, vals))
    radii = perturbation_radii(net, p, x, x, "interval", (vals, vals),
                               tighten=lambda i, e, r: ref.refine(x, vals, lin.pool_idx, p, i, e, r))
    gained = [i for i in ref.targets if bool((radii[i] < plain[i] * 0.999).any())]
    assert gained, "the refinement never tightened a radius"
    seen = [torch.zeros_like(v) for v in vals]

    def record(dw):
        for k, v in enumerate(_all_values(net, x, dw)):
            seen[k] = torch.maximum(seen[k], (v - vals[k]).abs())

    for _ in range(60):
        record({i: r * torch.sign(torch.rand(r.shape, generator=g, dtype=torch.float64) - 0.5) for i, r in wr.items()})
    for i in gained:  # aim at the neurons whose radius the refinement shrank most
        ratio = (radii[i] / plain[i].clamp(min=1e-300)).flatten()
        for flat in ratio.argsort()[:6].tolist():
            n, j = divmod(flat, radii[i][0].numel())
            for sign in (1.0, -1.0):
                dw = {k: torch.zeros_like(r, requires_grad=True) for k, r in wr.items()}
                for t in range(10):
                    obj = sign * _all_values(net, x[n:n + 1], dw)[i].flatten()[j]
                    gs = torch.autograd.grad(obj, list(dw.values()), allow_unused=True)
                    with torch.no_grad():
                        for (k, v), gk in zip(dw.items(), gs):
                            if gk is not None:
                                v.copy_(torch.clamp(v + wr[k] * torch.sign(gk) * (1.0 if t == 0 else 0.5),
                                                    -wr[k], wr[k]))
                record({k: v.detach() for k, v in dw.items()})
    for k in range(len(vals)):
        _assert_sound(radii[k], seen[k])


def test_refined_radii_every_corner_with_large_radii():
    """3-layer ReLU net, radii large enough that the second-order and residual terms of the refined
    neuron itself matter: every corner of the box (2^10) stays inside the refined radii."""
    from hwrel.bounds.refine import NeuronRefiner

    net = _net(_seeded(nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 2)), 18),
               (2,))
    wr = _radii(net, 0.5, 19, net.synapse_layers[:2])
    x = torch.tensor([[0.4, -0.3], [0.9, 0.8], [-0.6, 0.1]], dtype=torch.float64)
    p = WeightPerturbation(weight_radius=wr)
    lin = linearize(net, x)
    vals = lin.values
    ref = NeuronRefiner(net)
    radii = perturbation_radii(net, p, x, x, "interval", (vals, vals),
                               tighten=lambda i, e, r: ref.refine(x, vals, lin.pool_idx, p, i, e, r))
    sites = [(i, j) for i in wr for j in itertools.product(*map(range, wr[i].shape))]
    assert len(sites) == 10
    seen = [torch.zeros_like(v) for v in vals]
    for s in itertools.product((-1.0, 1.0), repeat=len(sites)):
        dw = {i: torch.zeros_like(r) for i, r in wr.items()}
        for (i, j), v in zip(sites, s):
            dw[i][j] = v * wr[i][j]
        for k, v in enumerate(_all_values(net, x, dw)):
            seen[k] = torch.maximum(seen[k], (v - vals[k]).abs())
    for k in range(len(vals)):
        _assert_sound(radii[k], seen[k])
