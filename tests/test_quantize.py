"""Quantization as bounded perturbation: soundness against Brevitas PTQ, search and exact rounding."""
from __future__ import annotations

import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import hwrel
from hwrel import models
from hwrel.errors import HwrelError, UnsupportedLayerError
from hwrel.quantize import (BITS, Predictor, QuantSpec, predict_quantization_error, ptq, qat, safe_bitwidth,
                            weight_radius)
from hwrel.quantize.brevitas_ptq import forward
from hwrel.quantize.search import perturbed_forward

warnings.filterwarnings("ignore")
SPECS = [QuantSpec(), QuantSpec(per_channel=True, symmetric=False)]


@pytest.fixture(scope="module")
def sig():
    return models.load("digits-mlp-sigmoid")


@pytest.fixture(scope="module")
def mlp():
    return models.load("digits-mlp")


def _net(ref):
    return hwrel.Network.from_module(ref.module, ref.input_domain, ref.input_shape)


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.label)
def test_ptq_matches_prediction_radius_and_extraction(sig, spec):
    q = ptq(sig.module, sig.x_train[:256], 5, per_channel=spec.per_channel, symmetric=spec.symmetric)
    net, qnet = _net(sig), hwrel.Network.from_module(q, sig.input_domain, sig.input_shape)
    assert torch.equal(qnet.forward(sig.x_test), forward(q, sig.x_test))
    for i, j in zip(net.synapse_layers, qnet.synapse_layers):
        w = net.nodes[i].affine.weight
        err = (qnet.nodes[j].affine.weight.double() - w.double()).abs()
        r = weight_radius(w, 5, spec)
        assert bool((err <= r).all())
        assert float((err / r.clamp(min=1e-30)).max()) > 0.9  # the radius is not loose: rounding reaches it
        assert qnet.nodes[j].affine.bit_width == 5
    assert all(p.requires_grad for p in sig.module.parameters())  # user's model untouched


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.label)
def test_sound_against_measurement_and_search(sig, spec):
    t = predict_quantization_error(sig.module, (3, 7, 11, 16), sig, per_channel=spec.per_channel,
                                   symmetric=spec.symmetric, adversarial=True, verify=True)
    assert (t["bound_violations"] == 0).all()  # per input and output: |F_q - F| <= certified bound
    assert (t["certified_but_broken"] == 0).all()  # nothing certified is broken by a real perturbation
    for m in ("paper", "weights", "interval"):
        assert (t[f"bound_{m}"] >= t["measured_error"]).all()
        assert (t[f"bound_{m}"] >= t["adversarial_error"]).all()
    assert (t["certified_error"] >= t["measured_error"]).all()
    assert (t["certified_accuracy"] <= t["measured_accuracy"] + 1e-12).all()
    assert (t["certified_accuracy"] <= t["adversarial_accuracy"] + 1e-12).all()
    assert (t["bound_paper"] >= t["bound_weights"]).all()
    assert t["certified_accuracy"].is_monotonic_increasing
    assert t["certified_error"].is_monotonic_decreasing


def test_activation_quantization_sound(sig):
    t = predict_quantization_error(sig.module, (4, 9), sig, act_bits="same", adversarial=True, verify=True)
    assert (t["bound_violations"] == 0).all()
    assert (t["certified_but_broken"] == 0).all()
    assert (t["certified_accuracy"] <= t["measured_accuracy"]).all()
    assert (t["bound_interval"] >= t["measured_error"]).all()
    weights_only = predict_quantization_error(sig.module, (4, 9), sig)
    assert (t["certified_error"].values > weights_only["certified_error"].values).all()


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), bits=st.integers(2, 12), per_channel=st.booleans(), symmetric=st.booleans())
def test_bound_holds_for_exact_rounding_and_sign_attacks(seed, bits, per_channel, symmetric):
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 6), nn.Tanh(), nn.Linear(6, 3))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    spec = QuantSpec(per_channel, symmetric)
    net = hwrel.Network.from_module(model, (-1.0, 1.0)).to()
    x = torch.rand(64, 5, generator=g, dtype=torch.float64) * 2 - 1
    y = torch.zeros(64, dtype=torch.long)
    pr = Predictor(net, spec, x, y)
    bound = pr.sample_bounds(bits)
    dom = pr.domain_bounds(bits)
    wr = {i: weight_radius(net.nodes[i].affine.weight, bits, spec) for i in net.synapse_layers}
    from hwrel.quantize.rounding import weight_storage
    exact = {i: weight_storage(net.nodes[i].affine.weight, bits, spec).dequantize().double()
             - net.nodes[i].affine.weight for i in net.synapse_layers}
    trials = [exact] + [{i: r * torch.sign(torch.randn(r.shape, generator=g, dtype=r.dtype)) for i, r in wr.items()}
                        for _ in range(4)]
    clean = net.forward(x)
    for dw in trials:
        dev = (perturbed_forward(net, x, dw, {}) - clean).abs()
        assert bool((dev <= bound * (1 + 1e-9)).all())
        assert float(dev.max()) <= min(dom.values()) * (1 + 1e-9)


@pytest.mark.slow
def test_safe_bitwidth_answers_and_per_layer(mlp):
    r = safe_bitwidth(mlp.module, mlp, 0.01, per_layer=True, bits=range(4, 14))
    t = r.table
    assert r.certified_bits is not None and r.measured_bits is not None
    assert r.measured_bits <= r.certified_bits  # the certificate never asks for less than the data needs
    assert r.adversarial_bits <= r.certified_bits <= r.adversarial_bits + 1
    assert abs(r.estimated_bits - r.measured_bits) <= 1
    row = t[t["bits"] == r.certified_bits].iloc[0]
    assert row["clean_accuracy"] - row["certified_accuracy"] <= 0.01
    below = t[t["bits"] == r.certified_bits - 1].iloc[0]
    assert below["clean_accuracy"] - below["certified_accuracy"] > 0.01
    # per layer: fewer stored bits than the uniform certified width, same budget, verified by measurement
    assert r.per_layer_stored_bits < r.uniform_stored_bits
    chk = r.per_layer_check
    assert chk["certified_accuracy"] >= row["clean_accuracy"] - 0.01
    assert chk["bound_violations"] == 0 and chk["measured_accuracy"] >= chk["certified_accuracy"]
    d = r.to_dict()
    assert {"certified_bits", "adversarial_bits", "estimated_bits", "measured_bits", "table"} <= set(d)
    assert 0 < r.memory_saved_percent < 100
    fig = r.plot()
    labels = [t.get_text() for ax in fig.axes for t in ax.get_legend().get_texts()]
    assert any("certified" in s for s in labels) and any("measured" in s for s in labels)
    assert any("adversarial" in s for s in labels) and any("estimated" in s for s in labels)


def test_epsilon_budget(sig):
    r = safe_bitwidth(sig.module, sig, epsilon=0.5, bits=range(8, 17), adversarial=False)
    t = r.table.set_index("bits")
    assert t.loc[r.certified_bits, "certified_error"] <= 0.5
    assert r.measured_bits <= r.certified_bits


def test_unmet_budget_says_best_achievable(sig):
    r = safe_bitwidth(sig.module, sig, 0.0, bits=(2, 3), adversarial=False, verify=False)
    assert r.certified_bits is None and "best achievable" in r.message and "3 bits" in r.message


def test_bad_input(sig):
    with pytest.raises(HwrelError, match="empty"):
        safe_bitwidth(sig.module, (sig.x_test[:0], sig.y_test[:0]))
    with pytest.raises(HwrelError, match="labels"):
        safe_bitwidth(sig.module, (sig.x_test[:10], sig.y_test[:9]))
    with pytest.raises(HwrelError, match=r"labels must lie in \[0, 9\]"):
        safe_bitwidth(sig.module, (sig.x_test[:10], sig.y_test[:10] + 10))
    bad = nn.Sequential(nn.Linear(64, 8), nn.ELU(), nn.Linear(8, 10))
    with pytest.raises(UnsupportedLayerError, match=r"layer 1 \(.*ELU\)"):
        ptq(bad, None, 8)
    with pytest.raises(HwrelError, match="bit width"):
        ptq(sig.module, None, 1)


def test_qat_tiny(sig):
    q = ptq(sig.module, None, 3)
    before = float((forward(q, sig.x_test).argmax(1) == sig.y_test).double().mean())
    q2 = qat(q, sig.x_train, sig.y_train, epochs=1, lr=1e-3)
    after = float((forward(q2, sig.x_test).argmax(1) == sig.y_test).double().mean())
    assert after >= before - 0.02
    qn = hwrel.Network.from_module(q2, sig.input_domain, sig.input_shape)
    assert torch.allclose(qn.forward(sig.x_test), forward(q2, sig.x_test))


def test_ptq_resnet_folds_batchnorm():
    ref = models.load("mnist-resnet")
    q = ptq(ref.module, ref.x_train[:64], 8, per_channel=True)
    qnet = hwrel.Network.from_module(q, ref.input_domain, ref.input_shape)
    x = ref.x_test[:64]
    assert torch.allclose(qnet.forward(x), forward(q, x), atol=1e-5)
    acc = float((forward(q, x).argmax(1) == ref.y_test[:64]).double().mean())
    assert acc >= float((forward(ref.module, x).argmax(1) == ref.y_test[:64]).double().mean()) - 0.05


def test_fast_certified_flags_and_domain_bounds_match_full_evaluation(sig):
    from hwrel.bounds.perturb import perturbation_bound
    from hwrel.quantize.safe import _inputs, sweep

    module, net, x, y, calib = _inputs(sig.module, sig, None, None)
    bits = (3, 5, 6, 7, 8, 9, 10, 12)
    full, sw, _ = sweep(module, net, x, y, calib, QuantSpec(), bits, adversarial=False, verify=False)
    fast, _, _ = sweep(module, net, x, y, calib, QuantSpec(), bits, adversarial=False, verify=True, full_table=False)
    assert list(full["certified_accuracy"]) == list(fast["certified_accuracy"])
    assert full["certified_accuracy"].nunique() > 3  # the widths straddle the certification threshold
    # verification's per-input bounds (without refined radii) fill in the largest bound
    assert (fast["certified_error"] >= full["certified_error"]).all() and (fast["bound_violations"] == 0).all()
    for b in (4, 11):
        dom = sw.p.domain_bounds(b)
        pert = sw.p.perturbation(b, sw.p.domain)
        for m in ("paper", "weights", "interval"):
            assert dom[m] == float(perturbation_bound(sw.p.net, pert, m).max())


def test_adversarial_breaks_are_real(mlp):
    from hwrel.quantize.search import per_input_attack, shared_attack

    net = _net(mlp).to()
    x, c = mlp.x_test[:40].double(), net.forward(mlp.x_test[:40].double()).argmax(1)
    wr = {i: weight_radius(net.nodes[i].affine.weight, 6, QuantSpec()) for i in net.synapse_layers}
    m, dev = per_input_attack(net, x, c, wr, {}, steps=10)
    assert bool((m < 0).any()) and bool((dev > 0).all())
    ms, dw = shared_attack(net, x, c, wr, steps=10)
    assert all(bool((dw[i].abs() <= wr[i]).all()) for i in wr)  # inside the box
    out = perturbed_forward(net, x, dw, {})  # the float64 verdict: broken means the prediction moved
    assert torch.equal(out.argmax(1) != c, ms < 0)
    assert bool((ms < 0).any())


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mnist-lenet", "mnist-resnet"])
def test_cnn_certificates_sound_against_brevitas_and_search(name):
    """On the reference CNNs (linearized bound, refined radii): nothing certified is broken by the
    search, no measured Brevitas deviation exceeds its per-input bound, and the certificate is
    tighter than the interval bound alone."""
    from hwrel.quantize.safe import _inputs

    ref = models.load(name)
    data = (ref.x_test[:48], ref.y_test[:48], ref.x_train[:256])
    bits = (10, 11, 12, 14)
    t = predict_quantization_error(ref.module, bits, data, input_domain=ref.input_domain,
                                   input_shape=ref.input_shape, adversarial=True, verify=True)
    assert (t["bound_violations"] == 0).all()
    assert (t["certified_but_broken"] == 0).all()
    assert (t["certified_accuracy"] <= t["measured_accuracy"] + 1e-12).all()
    assert (t["certified_accuracy"] <= t["adversarial_accuracy"] + 1e-12).all()
    assert (t["certified_error"] >= t["measured_error"]).all()
    _, net, x, y, _ = _inputs(ref.module, data, ref.input_domain, ref.input_shape)
    plain = Predictor(net, QuantSpec(), x, y, linearized=False)
    for b, acc in zip(bits, t["certified_accuracy"]):
        cap = min(plain.domain_bounds(b).values())
        assert acc >= plain.certify(plain.sample_certificates([b], [cap])[0][1])[0]
    assert t["certified_accuracy"].iloc[2] > 0.8  # 12 bits: certified on most inputs


@pytest.mark.slow
def test_certificate_within_one_bit_of_the_search_on_lenet():
    """The tightness claim on a CNN, on its first 500 test inputs: the certified width is at most one
    bit above the width at which the gradient search stops breaking the budget (and never below it)."""
    ref = models.load("mnist-lenet")
    data = (ref.x_test[:500], ref.y_test[:500], ref.x_train[:512])
    r = safe_bitwidth(ref.module, data, max_accuracy_drop=0.01, bits=range(9, 17), verify=False,
                      input_domain=(0.0, 1.0), input_shape=ref.input_shape)
    assert r.certified_bits is not None and r.adversarial_bits is not None
    assert r.adversarial_bits <= r.certified_bits <= r.adversarial_bits + 1
    assert (r.table["certified_accuracy"] <= r.table["adversarial_accuracy"] + 1e-12).all()


@pytest.mark.slow
@pytest.mark.parametrize("name, n, levels", [("mnist-lenet", 64, 4), ("mnist-resnet", 48, 3)])
def test_fast_certified_flags_lose_nothing_on_cnns(name, n, levels):
    """The sweep's schedule (divide and conquer without refinement, then refinement walking down
    one width at a time while the predicted load stays below 1) certifies what the full evaluation
    (refined bounds at every width) certifies, on the first test inputs of each reference CNN,
    whose certified widths spread over several widths: never more, and at most one input fewer at
    any width (the load prediction is a heuristic; on mnist-lenet's first 64 inputs it misses one
    input at 10 bits whose load there is 0.91)."""
    from hwrel.quantize.safe import _inputs

    ref = models.load(name)
    _, net, x, y, _ = _inputs(ref.module, ref, None, None)
    p = Predictor(net, QuantSpec(), x[:n], y[:n])
    caps = {b: min(p.domain_bounds(b).values()) for b in BITS}
    flags = p.certified_flags(BITS, caps)
    full = p.sample_certificates(BITS, [caps[b] for b in BITS])
    counts = []
    for b, (_, mb) in zip(BITS, full):
        every = p.certify_subset(mb, torch.arange(n))
        assert not bool((flags[b] & ~every).any()), b
        assert int((every & ~flags[b]).sum()) <= 1, b
        counts.append(int(flags[b].sum()))
    assert len(set(counts)) >= levels  # the widths straddle the threshold: the schedule had work to do


def test_certified_among_is_the_full_certificate_restricted_and_stops_early(mlp):
    """The per-layer search's budget check: over all inputs it certifies exactly what the full
    evaluation does; restricted to a mask it certifies only inside it; past ``max_misses``
    correctly classified misses it gives up (``None``), and not before."""
    from hwrel.quantize.safe import _inputs

    _, net, x, y, _ = _inputs(mlp.module, mlp, None, None)
    p = Predictor(net, QuantSpec(), x, y)
    lb = {i: b for i, b in zip(p.layers, (10, 9, 11))}
    cap = min(p.domain_bounds(lb).values())
    full = p.certify_subset(p.sample_certificates([lb], [cap])[0][1], torch.arange(len(x)))
    every = torch.ones(len(x), dtype=torch.bool)
    assert torch.equal(p.certified_among(lb, cap, every), full)
    misses = int((p.correct & ~full).sum())
    assert 0 < misses < int(p.correct.sum())  # the width is undecided for some inputs
    assert torch.equal(p.certified_among(lb, cap, every, max_misses=misses), full)
    assert p.certified_among(lb, cap, every, max_misses=misses - 1) is None
    half = torch.arange(len(x)) % 2 == 0
    assert torch.equal(p.certified_among(lb, cap, half), full & half)


@pytest.mark.slow
def test_per_layer_assignment_on_lenet_saves_bits_and_is_verified():
    """On a CNN (its first 500 test inputs, refined certificates): the mixed-precision assignment
    stores fewer bits than the certified uniform width, its own full certificate meets the budget,
    and Brevitas at that assignment measures no deviation above its bounds and an accuracy at least
    the certified one."""
    ref = models.load("mnist-lenet")
    data = (ref.x_test[:500], ref.y_test[:500], ref.x_train[:512])
    r = safe_bitwidth(ref.module, data, max_accuracy_drop=0.01, per_layer=True, adversarial=False,
                      bits=range(10, 17), input_domain=(0.0, 1.0), input_shape=ref.input_shape)
    assert r.per_layer is not None and r.per_layer_stored_bits < r.uniform_stored_bits
    assert min(r.per_layer.values()) < r.certified_bits
    c = r.per_layer_check
    clean = float(r.table["clean_accuracy"].iloc[0])
    assert clean - c["certified_accuracy"] <= 0.01 + 1e-12
    assert c["bound_violations"] == 0 and c["measured_accuracy"] >= c["certified_accuracy"]


def test_bounds_of_chosen_inputs_are_those_inputs_bounds(mlp):
    """``idx`` in any order (here a permutation starting at 0, the same start and length as a cached
    range) gives those inputs' rows of the full evaluation (up to float64 rounding: batched matrix
    products round differently in other batches, far inside the bounds' 2^-20 slack)."""
    from hwrel.quantize.safe import _inputs

    _, net, x, y, _ = _inputs(mlp.module, mlp, None, None)
    p = Predictor(net, QuantSpec(), x, y)
    full = p.sample_bounds(8)
    perm = torch.cat([torch.tensor([0]), torch.randperm(len(x) - 1, generator=torch.Generator().manual_seed(0)) + 1])
    assert torch.allclose(p.sample_bounds(8, idx=perm), full[perm], rtol=1e-10, atol=0)
    assert torch.allclose(p.sample_bounds(8, idx=perm[:17]), full[perm[:17]], rtol=1e-10, atol=0)


def test_sweep_skips_the_shared_attack_only_below_a_width_over_budget_and_reports_progress(sig):
    """Below a width whose attacks already broke the budget the shared attack is skipped (NaN), which
    cannot change the answer (broken inputs stay broken as the width falls); progress rises to 1."""
    from hwrel.quantize.safe import _inputs, smallest_meeting, sweep

    module, net, x, y, calib = _inputs(sig.module, sig, None, None)
    bits, drop, seen = (3, 5, 7, 9, 12), 0.01, []
    full, _, _ = sweep(module, net, x, y, calib, QuantSpec(), bits, verify=False, full_table=False)
    fast, _, _ = sweep(module, net, x, y, calib, QuantSpec(), bits, verify=False, full_table=False,
                       max_accuracy_drop=drop, progress=lambda f, m: seen.append(f))
    over = full["clean_accuracy"] - full["adversarial_accuracy"] > drop
    assert over.any() and not over.all()
    first_over = int(full.loc[over, "bits"].max())
    assert fast.loc[fast["bits"] < first_over, "adversarial_shared_accuracy"].isna().all()
    assert fast.loc[fast["bits"] >= first_over, "adversarial_shared_accuracy"].notna().all()
    ok = lambda t: list(t["clean_accuracy"] - t["adversarial_accuracy"] <= drop + 1e-12)  # noqa: E731
    assert smallest_meeting(list(full["bits"]), ok(full)) == smallest_meeting(list(fast["bits"]), ok(fast))
    assert (fast["certified_but_broken"] == 0).all()
    assert seen == sorted(seen) and 0 < seen[0] and abs(seen[-1] - 1) < 1e-9


def test_output_error_budget_without_verification_is_certified(mlp):
    """``--epsilon`` with ``--no-verify``: the sweep computes every width's largest per-input bound
    itself (it used to leave it NaN and answer "best achievable: certified output error nan"); the
    certified width is what the same budget gets with verification, or narrower (the refined
    bounds), and every certified error is finite."""
    x, y = mlp.x_test[:32], mlp.y_test[:32]
    kw = dict(epsilon=100.0, bits=range(10, 17), adversarial=False, input_domain=(0.0, 1.0),
              input_shape=mlp.input_shape)
    fast = safe_bitwidth(mlp.module, (x, y, mlp.x_train[:64]), verify=False, **kw)
    full = safe_bitwidth(mlp.module, (x, y, mlp.x_train[:64]), verify=True, **kw)
    assert fast.certified_bits is not None and not fast.message
    assert fast.table["certified_error"].notna().all()
    assert full.certified_bits is not None and fast.certified_bits <= full.certified_bits
    errs = fast.table.set_index("bits")["certified_error"]
    assert (errs.loc[fast.certified_bits:] <= 100.0).all()
