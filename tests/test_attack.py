"""Adversarial bit-flip searches: the flips found really break the budget (checked on a deep copy of
the model with the flipped values written), hwrel's search never needs more flips than the
progressive bit search baseline, and no search beats a certified tolerance."""
from __future__ import annotations

import copy

import pytest
import torch

from hwrel import models
from hwrel.errors import HwrelError
from hwrel.formats import IntFormat
from hwrel.network import Network
from hwrel.seu.attack import adversarial_flips, attack_on_accelerator, progressive_bit_search
from hwrel.seu.flips import stored_after_flips
from hwrel.seu.mapping import ModelMapping, store_parameters


@pytest.fixture(scope="module")
def setup():
    rm = models.load("digits-mlp-sigmoid")
    net = Network.from_module(rm.module, rm.input_domain, rm.input_shape)
    stored = store_parameters(net, IntFormat(8))
    net64 = ModelMapping(None, IntFormat(8), tuple(stored)).deployed(net.to())
    x, y = rm.x_test[:128].to(torch.float64), rm.y_test[:128]
    return rm, net, stored, net64, x, y


def _accuracy_of_copy(rm, stored, flips, x, y) -> float:
    """Accuracy of a deep copy of the module holding the stored values with the flips written."""
    m = copy.deepcopy(rm.module).double()
    by_word: dict = {}
    for ti, e, b in flips:
        by_word.setdefault((ti, e), []).append(b)
    with torch.no_grad():
        for ti, t in enumerate(stored):
            p = getattr(m.get_submodule(t.layer), t.part)
            v = t.values.to(torch.float64).clone().reshape(-1)
            for (tj, e), bits in by_word.items():
                if tj == ti:
                    v[e] = stored_after_flips(t, e, bits)
            p.copy_(v.reshape(p.shape))
        out = m(x)
    return float(((out.argmax(1) == y) & torch.isfinite(out).all(1)).double().mean())


@pytest.mark.parametrize("weights_only", [False, True])
def test_flips_found_break_the_budget_and_hwrel_needs_no_more(setup, weights_only):
    rm, net, stored, net64, x, y = setup
    space = [t for t in stored if t.part == "weight"] if weights_only else stored
    base = progressive_bit_search(net64, space, x, y, max_accuracy_drop=0.01, max_flips=16)
    ours = adversarial_flips(net64, space, x, y, max_accuracy_drop=0.01, max_flips=16)
    for r in (base, ours):
        assert r.broke and r.clean_accuracy - r.accuracy > 0.01
        names = [space[t].name for t, _, _ in r.flips]
        assert all(n.endswith(".weight") for n in names) or not weights_only
        idx = [([t.name for t in stored].index(space[t].name), e, b) for t, e, b in r.flips]
        assert _accuracy_of_copy(rm, stored, idx, x, y) == pytest.approx(r.accuracy, abs=1e-12)
        assert len(r.history) == len(r.flips)
    assert ours.flips_needed <= base.flips_needed
    if len(ours.flips) > 1:  # pruned: every flip is needed
        for f in ours.flips:
            rest = [g for g in ours.flips if g != f]
            idx = [([t.name for t in stored].index(space[t].name), e, b) for t, e, b in rest]
            assert ours.clean_accuracy - _accuracy_of_copy(rm, stored, idx, x, y) <= 0.01 + 1e-12


def test_search_gives_up_honestly(setup):
    _, _, stored, net64, x, y = setup
    weights = [t for t in stored if t.part == "weight"]
    r = progressive_bit_search(net64, weights, x, y, max_accuracy_drop=0.9, max_flips=1)
    assert not r.broke and r.flips_needed is None and len(r.flips) == 1
    with pytest.raises(HwrelError, match="max_accuracy_drop"):
        adversarial_flips(net64, stored, x, y, max_accuracy_drop=1.5)
    with pytest.raises(HwrelError, match="labels"):
        adversarial_flips(net64, stored, x, y[:3], max_accuracy_drop=0.01)


def test_no_search_beats_the_certified_tolerance():
    """Certified k flips keep the budget on the evaluated inputs, so breaking it takes > k flips."""
    from hwrel.seu.analysis import seu_analysis

    rm = models.load("digits-mlp-sigmoid")
    net = Network.from_module(rm.module, rm.input_domain, rm.input_shape)
    x, y = rm.x_test[:96], rm.y_test[:96]
    seu = seu_analysis(net, "eyeriss-v1", data=(x, y), mission_hours=1000, max_accuracy_drop=0.2,
                       campaign_size=0, max_samples=64, seed=1)
    ours, base = attack_on_accelerator(net, "eyeriss-v1", x, y, max_accuracy_drop=0.2, seed=1, max_samples=64,
                                       max_flips=32)
    for r in (ours, base):
        assert r.broke and r.flips_needed >= seu.certified_flips + 1
    assert ours.clean_accuracy == pytest.approx(seu.clean_accuracy)  # the same inputs as the SEU analysis
