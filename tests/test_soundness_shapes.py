"""Soundness on networks whose affine layers act on the last dimension of 2-D and 3-D per-sample
inputs, with per-element input domains (issue 17).

Oracle: :mod:`shape_oracle` (hooks on the model's own modules), never hwrel's code. The model runs
in float32 and the certificates are about that model: no tolerance is allowed (the bounds must
cover float32 rounding themselves).
"""
from __future__ import annotations

import copy
import itertools
import math
import zlib

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import hwrel
from hwrel.bounds import Analyzer
from hwrel.bounds.certify import per_sample_bounds
from hwrel.bounds.faults import as_fault
from shape_oracle import (box_points, choose, connections, neuron_faults, per_element_box, row_net,
                          synapse_faults, worst_input)

METHODS = ("paper", "weights", "interval", "best")


_CLEAN: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}


def _clean(model, x) -> tuple[torch.Tensor, torch.Tensor]:
    """The clean outputs in float32 and in float64 (computed once per model and inputs)."""
    key = (id(model), id(x))
    if key not in _CLEAN:
        _CLEAN.clear()
        with torch.no_grad():
            _CLEAN[key] = (model(x).double(), copy.deepcopy(model).double()(x.double()))
    return _CLEAN[key]


def _measure(model, x, run) -> torch.Tensor:
    """``|F~(x) - F(x)|``, both in float32, per input and output, for the faults ``run()`` installs."""
    return _measure_both(model, x, run)[0]


def _measure_both(model, x, run) -> tuple[torch.Tensor, torch.Tensor]:
    """The faulty model in float32 against the clean model in float32 (what a domain-wide bound
    covers) and against the clean model in float64 (what a per-sample certificate covers)."""
    c32, c64 = _clean(model, x)
    with torch.no_grad(), run():
        f = model(x).double()
    return (f - c32).abs(), (f - c64).abs()


def _check(res, per_sample, worst_global, worst_points, context):
    for m in METHODS:
        assert res.by_method[m] >= worst_global, f"{m} bound {res.by_method[m]} < measured {worst_global} ({context})"
    bad = per_sample < worst_points
    assert not bool(bad.any()), (f"per-sample bound exceeded at {int(bad.sum())} of {bad.numel()} (input, output) "
                                 f"pairs, worst {float((worst_points - per_sample).max())} ({context})")


def test_issue17_row_linear_crash_is_not_certified_away():
    """The model of issue 17: a Linear on the rows of a (3, 4) input. Before the fix the interval
    and best methods returned 0 and 44 certified inputs changed class under one crash."""
    class RowLinear(nn.Module):
        def __init__(self):
            super().__init__()
            self.l1 = nn.Linear(4, 3, bias=False)
            self.a1 = nn.Tanh()
            self.l2 = nn.Linear(3, 3)
            self.fc = nn.Linear(9, 2)

        def forward(self, x):
            return self.fc(torch.flatten(self.l2(self.a1(self.l1(x))), 1))

    torch.manual_seed(0)
    m = RowLinear().eval()
    with torch.no_grad():
        m.l1.weight.mul_(3)
        m.fc.weight[:, [0, 3, 4, 5, 6, 7, 8]] = 0.0
        m.fc.weight.mul_(10.0)
    lo, hi = torch.zeros(3, 4), torch.zeros(3, 4)
    lo[0], hi[0] = -2.0, 2.0
    net = hwrel.Network.from_module(m, (lo, hi), input_shape=(3, 4))
    x = box_points(lo, hi, 400, seed=0)
    with torch.no_grad():
        labels = copy.deepcopy(m).double()(x.double()).argmax(1)
    worst, worst_exact = torch.zeros(400, 2, dtype=torch.float64), torch.zeros(400, 2, dtype=torch.float64)
    changed = torch.zeros(400, dtype=torch.bool)
    for i in range(9):
        d, de = _measure_both(m, x, lambda: neuron_faults([m.a1], [{i: 0.0}]))
        worst, worst_exact = torch.maximum(worst, d), torch.maximum(worst_exact, de)
        with torch.no_grad(), neuron_faults([m.a1], [{i: 0.0}]):
            changed |= m(x).argmax(1) != labels
    assert bool(changed.any())  # the crash does change decisions: the test can fail
    res = hwrel.fep(net, [1], "crash")
    an = Analyzer(net)
    per = per_sample_bounds(an, as_fault("crash"), [1], x)
    _check(res, per, float(worst.max()), worst_exact, "issue 17 RowLinear")
    cert = hwrel.certified_accuracy(net, x, labels, [1])
    flags = torch.tensor(cert.per_sample["certified"].to_numpy())
    assert not bool((flags & changed).any()), "a certified input changes class under one crash"


CASES = [((3,), (4, 3, 3), 0), ((2, 2), (3, 2, 2), 0), ((3,), (3, 3), 4)]


@pytest.mark.parametrize("lead, widths, head", CASES)
@pytest.mark.parametrize("act", ["relu", "tanh", "sigmoid", "hardtanh"])
@pytest.mark.parametrize("fault", ["crash", "byzantine"])
def test_exhaustive_neuron_faults_on_row_networks(lead, widths, head, act, fault):
    model = row_net(lead, widths, act, 2, seed=zlib.crc32(repr((lead, act)).encode()) % 997, head_hidden=head)
    shape = (*lead, widths[0])
    lo, hi = per_element_box(shape, seed=len(lead))
    net = hwrel.Network.from_module(model, (lo, hi), input_shape=shape)
    mods = model.hidden_acts()
    sizes = net.layer_sizes()
    assert len(sizes) == len(mods)
    x = box_points(lo, hi, 120, seed=3)
    cap = 1.5
    values = [0.0] if fault == "crash" else [-cap, cap]
    fm = as_fault(fault, cap if fault == "byzantine" else None)
    an = Analyzer(net)
    vectors = [[1] + [0] * (len(sizes) - 1), [0] * (len(sizes) - 1) + [1], [1] * len(sizes), [2] + [0] * (len(sizes) - 1)]
    for f in vectors:
        res = hwrel.fep(net, f, fault, capacity=cap if fault == "byzantine" else None)
        per = per_sample_bounds(an, fm, f, x)
        worst_points = torch.zeros(len(x), 2, dtype=torch.float64)
        worst_set, worst_val = None, -1.0
        for sets in choose([range(n) for n in sizes], f):
            for vals in itertools.product(values, repeat=sum(f)):
                it = iter(vals)
                faults = [{i: next(it) for i in s} for s in sets]
                d, de = _measure_both(model, x, lambda: neuron_faults(mods, faults))
                worst_points = torch.maximum(worst_points, de)
                if float(d.max()) > worst_val:
                    worst_set, worst_val = faults, float(d.max())
        g = worst_input(model, lo, hi, lambda: neuron_faults(mods, worst_set), steps=25, restarts=2)
        _check(res, per, max(worst_val, g), worst_points, f"{lead} {act} {fault} f={f}")


@pytest.mark.parametrize("lead, widths, head", CASES[:2])
@pytest.mark.parametrize("fault", ["synapse-crash", "synapse-byzantine"])
def test_exhaustive_synapse_faults_on_row_networks(lead, widths, head, fault):
    model = row_net(lead, widths, "tanh", 2, seed=5, head_hidden=head)
    shape = (*lead, widths[0])
    lo, hi = per_element_box(shape, seed=7)
    net = hwrel.Network.from_module(model, (lo, hi), input_shape=shape)
    lins = model.linears()
    positions = math.prod(lead)
    pools = [connections(lin, positions if k < len(model.body) else 1) for k, lin in enumerate(lins)]
    x = box_points(lo, hi, 100, seed=4)
    cap = 1.2
    values = [None] if fault == "synapse-crash" else [-cap, cap]
    fm = as_fault(fault, cap if fault == "synapse-byzantine" else None)
    an = Analyzer(net)
    n = len(lins)
    for g in ([1] + [0] * (n - 1), [0, 1] + [0] * (n - 2), [0] * (n - 1) + [2], [1] * n):
        pools_g = [p if k else [] for p, k in zip(pools, g)]
        res = hwrel.fep(net, g, fault, capacity=cap if fault == "synapse-byzantine" else None)
        per = per_sample_bounds(an, fm, g, x)
        worst_points = torch.zeros(len(x), 2, dtype=torch.float64)
        worst_global = 0.0
        sets = list(choose(pools_g, g))
        rng = torch.Generator().manual_seed(0)
        if len(sets) > 400:  # [1, 1, 1]: a seeded sample of the connection sets
            sets = [sets[i] for i in torch.randperm(len(sets), generator=rng)[:400].tolist()]
        for s in sets:
            for vals in itertools.product(values, repeat=sum(g)):
                it = iter(vals)
                faults = [{c: next(it) for c in layer} for layer in s]
                d, de = _measure_both(model, x, lambda: synapse_faults(lins, faults))
                worst_points, worst_global = torch.maximum(worst_points, de), max(worst_global, float(d.max()))
        _check(res, per, worst_global, worst_points, f"{lead} {fault} g={g}")


def test_certified_accuracy_and_tolerance_on_a_row_network():
    model = row_net((3,), (4, 3, 3), "tanh", 3, seed=11, scale=1.5)
    shape = (3, 4)
    lo, hi = per_element_box(shape, seed=2)
    net = hwrel.Network.from_module(model, (lo, hi), input_shape=shape)
    mods = model.hidden_acts()
    x = box_points(lo, hi, 300, seed=9)
    with torch.no_grad():
        labels = copy.deepcopy(model).double()(x.double()).argmax(1)
    for f in ([1, 0], [0, 1], [1, 1]):
        cert = hwrel.certified_accuracy(net, x, labels, f)
        flags = torch.tensor(cert.per_sample["certified"].to_numpy())
        for sets in choose([range(9), range(9)], f):
            faults = [dict.fromkeys(s, 0.0) for s in sets]
            with torch.no_grad(), neuron_faults(mods, faults):
                kept = model(x).argmax(1) == labels
            assert bool(kept[flags].all()), f"certified input changed class, f={f}"
    eps = 0.5
    tol = hwrel.tolerance(net, epsilon=eps)
    worst = 0.0
    for sets in choose([range(9), range(9)], tol.maximal):
        faults = [dict.fromkeys(s, 0.0) for s in sets]
        worst = max(worst, float(_measure(model, x, lambda: neuron_faults(mods, faults)).max()))
    assert worst <= eps, f"tolerated {tol.maximal} but a crash set moves an output by {worst}"


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10_000), lead=st.sampled_from([(2,), (4,), (2, 3), (3, 2)]),
       act=st.sampled_from(["relu", "tanh", "sigmoid", "leaky", "relu6"]), depth=st.integers(1, 2),
       fault=st.sampled_from(["crash", "byzantine", "synapse-crash"]))
def test_property_random_row_networks(seed, lead, act, depth, fault):
    """Random row networks, per-element domains, failure vectors and failure sets: no sampled set
    at any sampled input exceeds any method's bound, nor the per-sample bound at that input."""
    g = torch.Generator().manual_seed(seed)
    widths = [int(v) for v in torch.randint(2, 5, (depth + 1,), generator=g)]
    model = row_net(lead, widths, act, 3, seed, scale=float(torch.rand(1, generator=g)) * 2 + 0.2)
    shape = (*lead, widths[0])
    lo, hi = per_element_box(shape, seed)
    net = hwrel.Network.from_module(model, (lo, hi), input_shape=shape)
    x = box_points(lo, hi, 64, seed)
    cap = 2.0
    fm = as_fault(fault, cap if fault == "byzantine" else None)
    an = Analyzer(net)
    if fm.synapse:
        lins = model.linears()
        positions = math.prod(lead)
        pools = [connections(lin, positions if k < len(model.body) else 1) for k, lin in enumerate(lins)]
        f = [int(torch.randint(0, 3, (1,), generator=g)) for _ in pools]
    else:
        sizes = net.layer_sizes()
        f = [int(torch.randint(0, n + 1, (1,), generator=g)) for n in sizes]
    res = hwrel.fep(net, f, fm)
    per = per_sample_bounds(an, fm, f, x)
    worst = torch.zeros(len(x), 3, dtype=torch.float64)
    worst_exact = torch.zeros(len(x), 3, dtype=torch.float64)
    for _ in range(15):
        if fm.synapse:
            faults = [{p[i]: None for i in torch.randperm(len(p), generator=g)[:k].tolist()} for p, k in zip(pools, f)]
            run = (lambda faults=faults: synapse_faults(lins, faults))
        else:
            faults = []
            for n, k in zip(sizes, f):
                idx = torch.randperm(n, generator=g)[:k].tolist()
                vals = ((torch.randint(0, 2, (k,), generator=g) * 2 - 1).float() * cap if fault == "byzantine"
                        else torch.zeros(k))
                faults.append(dict(zip(idx, vals.tolist())))
            run = (lambda faults=faults: neuron_faults(model.hidden_acts(), faults))
        d, de = _measure_both(model, x, run)
        worst, worst_exact = torch.maximum(worst, d), torch.maximum(worst_exact, de)
    _check(res, per, float(worst.max()), worst_exact, f"seed={seed} {lead} {act} {widths} {fault} f={f}")


# --- the other analyses on Linear layers over rows (issue 17 audit) --------------------------

def test_injection_is_exact_on_row_networks():
    """Weight, bias and neuron faults of every kind in a network with Linear layers over rows
    equal a deep-copied model with the value written (or the activation replaced)."""
    import numpy as np

    from hwrel.inject import Injector
    from test_inject_engine import check_model, random_faults

    model = row_net((3,), (4, 5, 3), "tanh", 4, seed=1, head_hidden=6)
    x = torch.rand(16, 3, 4) * 2 - 1
    inj = Injector(model, x, input_shape=(3, 4))
    faults = [f for f in random_faults(np.random.default_rng(0), inj, model, 400) if f.site != "synapse"]
    assert {"weight", "bias", "neuron"} <= {f.site for f in faults}
    assert check_model(model, copy.deepcopy(model), x, faults, input_shape=(3, 4), multi=40) >= len(faults)


def test_synapse_fault_on_rows_needs_its_position():
    """A weight of a Linear over rows connects one sender to one receiver at every position: a
    synapse fault must say which (``source``, a flat index into the per-sample input), and then
    changes that connection only."""
    from hwrel.inject import Fault, Injector

    model = row_net((3,), (4, 3), "relu", 2, seed=2)
    x = torch.rand(8, 3, 4)
    inj = Injector(model, x, input_shape=(3, 4))
    with pytest.raises(hwrel.HwrelError, match="source"):
        inj.outputs(Fault("synapse", "body.0", 5, "crash"))
    j, i, p = 1, 2, 2  # weight (1, 2), at position 2: sender x[:, 2, 2] -> receiver (2, 1)
    out = inj.outputs(Fault("synapse", "body.0", j * 4 + i, "crash", source=p * 4 + i))
    ref_model = copy.deepcopy(model)
    with torch.no_grad(), synapse_faults([ref_model.body[0]], [{(p, j, i): None}]):
        ref = ref_model(x)
    assert torch.allclose(out, ref, atol=1e-6)


def test_seu_flip_bounds_hold_on_a_row_network():
    """Every single flip of every int8 weight and int32 bias code of a network with Linear layers
    over rows stays within its certified damage."""
    from hwrel.seu import load_accelerator
    from hwrel.seu.flips import FlipModel, flip_bounds
    from hwrel.seu.mapping import map_model

    model = row_net((3,), (4, 3, 3), "relu", 2, seed=3)
    lo, hi = per_element_box((3, 4), seed=1)
    net = hwrel.Network.from_module(model, (lo, hi), input_shape=(3, 4))
    mapping = map_model(net, load_accelerator("gemmini"), "int8")
    net64 = mapping.deployed(net.to())
    fb = flip_bounds(net64, mapping.tensors, False)
    x = box_points(lo, hi, 128, seed=5).double()
    fm = FlipModel(net64, mapping.tensors, [s.limit for s in fb.sites], x)
    dmg = fb.single(fb.inputs_sup(net64.input_lo[None], net64.input_hi[None], 1))
    checked = 0
    tol = 1e-12 * (1 + float(fm.output.abs().max()))  # float64 rounding of the measured forward
    for ti, t in enumerate(mapping.tensors):
        for e in range(t.numel):
            for bit in range(t.fmt.bits):
                d = float((fm.run([(ti, e, bit)]) - fm.output).abs().max())
                assert d <= float(dmg[ti][e, bit]) + tol, (t.name, e, bit, d, float(dmg[ti][e, bit]))
                checked += 1
    assert checked > 400


@pytest.mark.parametrize("act", ["tanh", "relu"])
def test_bit_width_certificates_hold_on_a_row_network(act):
    """Per-input certificates of weight rounding (interval, linearized and, with ReLU, refined
    radii) on a network with Linear layers over rows, against the rounded model itself (the
    weights rounded as the certificate assumes, float32 forward)."""
    from hwrel.quantize.predict import Predictor
    from hwrel.quantize.rounding import QuantSpec

    model = row_net((3,), (4, 5, 3), act, 3, seed=4, head_hidden=5)
    lo, hi = per_element_box((3, 4), seed=3)
    net = hwrel.Network.from_module(model, (lo, hi), input_shape=(3, 4))
    x = box_points(lo, hi, 64, seed=6)
    with torch.no_grad():
        y = model(x).argmax(1)
    spec = QuantSpec(False, True, None)
    p = Predictor(net, spec, x, y)
    for bits in (4, 6, 8):
        out, _ = p.sample_certificates([bits], [float("inf")])[0]
        q = copy_rounded(model, bits, spec)
        with torch.no_grad():
            d = (q(x).double() - copy.deepcopy(model).double()(x.double())).abs()  # float32 vs exact
            d32 = (q(x) - model(x)).abs().double()  # two float32 forwards
        assert bool((d <= out).all()), (bits, float((d - out).max()))
        dom = p.domain_bounds(bits)
        assert all(v >= float(d32.max()) for v in dom.values())


def copy_rounded(model, bits, spec):
    """A copy of ``model`` with every Linear weight rounded to ``bits`` as hwrel's rounding spec
    stores it (the quantized deployment the certificate is about)."""
    from hwrel.quantize.rounding import weight_storage

    q = copy.deepcopy(model)
    with torch.no_grad():
        for m in q.modules():
            if isinstance(m, nn.Linear):
                m.weight.copy_(weight_storage(m.weight.double(), bits, spec).dequantize().float())
    return q


def test_boosting_refuses_linear_layers_over_rows():
    model = row_net((3,), (4, 3), "relu", 2, seed=5)
    net = hwrel.Network.from_module(model, (-1.0, 1.0), input_shape=(3, 4))
    with pytest.raises(hwrel.UnsupportedLayerError, match="rows"):
        hwrel.boosting(net, epsilon=1.0)
