"""Tolerance on general graphs (``hwrel.bounds.tolerance.graph_tolerance``, ``hwrel tolerance`` on a
ViT and a LLaMA-style LM): every tolerated count is certified on each test input, checked against
exact crash injection; the next count up breaks the budget; bad budgets fail in one line."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from hwrel import models
from hwrel.bounds.certify import certified_from_bounds
from hwrel.bounds.graph import crash_outputs, graph_bound, validate
from hwrel.bounds.tolerance import graph_tolerance
from hwrel.cli import main
from hwrel.errors import HwrelError


@pytest.fixture(scope="module")
def vit():
    ref = models.load("mnist-vit")
    return ref.module, ref.x_test[:48].reshape(-1, *ref.input_shape), ref.y_test[:48]


def test_epsilon_tolerance_is_certified_and_maximal(vit):
    model, x, _ = vit
    res = graph_tolerance(model, x, epsilon=25.0)
    t = res.table.set_index("layer")
    assert list(t.index) == ["blocks.0.act", "blocks.1.act"]
    last = t.loc["blocks.1.act"]
    f = int(last["tolerated"])
    assert f >= 1 and last["bound_max"] <= res.budget == 25.0
    # the tolerated count holds on every input against exact injection (random and salient crash sets)
    b = graph_bound(model, {"blocks.1.act": f}, lo=x).bound
    assert float(b.amax(1).max()) == pytest.approx(last["bound_max"])
    g = torch.Generator().manual_seed(0)
    clean = crash_outputs(model, x, {})
    for _ in range(6):
        idx = torch.randperm(int(last["size"]), generator=g)[:f]
        d = (crash_outputs(model, x, {"blocks.1.act": idx}) - clean).abs().flatten(1).double()
        assert bool((d <= b).all())
    assert validate(model, x, "blocks.1.act", graph_bound(model, {"blocks.1.act": 1}, lo=x).bound, sets=6)[
        "violations"] == 0
    # one more failure breaks the budget on some input: the count is the largest the bounds certify
    over = graph_bound(model, {"blocks.1.act": f + 1}, lo=x).bound
    assert float(over.amax(1).max()) > res.budget
    # the first block's bound is vacuous: nothing tolerated there, and the table says what one crash costs
    assert int(t.loc["blocks.0.act", "tolerated"]) == 0 and t.loc["blocks.0.act", "bound_max_1"] > res.budget


def test_accuracy_tolerance_certifies_the_labels(vit):
    model, x, y = vit
    res = graph_tolerance(model, x, y, max_drop=0.6)
    assert res.criterion == "agreement" and res.clean_accuracy is not None
    last = res.table.set_index("layer").loc["blocks.1.act"]
    f = int(last["tolerated"])
    assert f >= 1
    b = graph_bound(model, {"blocks.1.act": f}, lo=x).bound
    with torch.no_grad():
        logits = model(x).double()
    pred, cert = certified_from_bounds(logits, b)
    good = cert & (pred == y)
    assert float(good.double().mean()) == pytest.approx(last["certified_accuracy"])
    assert res.clean_accuracy - last["certified_accuracy"] <= 0.6 + 1e-12
    # a certified input keeps its class under an injected crash set of the tolerated size
    g = torch.Generator().manual_seed(1)
    for _ in range(4):
        idx = torch.randperm(int(last["size"]), generator=g)[:f]
        faulty = crash_outputs(model, x, {"blocks.1.act": idx})
        assert bool((faulty.argmax(1)[good] == pred[good]).all())
    b2 = graph_bound(model, {"blocks.1.act": f + 1}, lo=x).bound
    p2, c2 = certified_from_bounds(logits, b2)
    assert res.clean_accuracy - float((c2 & (p2 == y)).double().mean()) > 0.6


def test_language_model_tolerance_counts_token_positions():
    ref = models.load("text-gpt")
    x = ref.x_test[:8]
    res = graph_tolerance(ref.module, x, max_drop=0.99)
    t = res.table.set_index("layer")
    assert len(t) == 2 and res.clean_accuracy is None and "certified_accuracy" not in t
    # no label: the share of (sequence, position) pairs whose next-token top-1 provably stays the clean one
    last = t.index[-1]
    b = graph_bound(ref.module, {last: 1}, lo=x).bound
    with torch.no_grad():
        logits = ref.module(x).double()
    _, cert = certified_from_bounds(logits.reshape(-1, logits.shape[-1]), b.reshape(-1, logits.shape[-1]))
    assert cert.numel() == 8 * x.shape[1]
    assert t.loc[last, "certified_fraction_1"] == pytest.approx(float(cert.double().mean()))
    for r in t.itertuples():  # tolerated 0: no failure, the bound is 0 and every position agrees
        assert r.tolerated > 0 or (r.certified_fraction == 1.0 and r.bound_max == 0.0)


def test_bad_budgets_fail_in_one_line(vit):
    model, x, _ = vit
    with pytest.raises(HwrelError, match="exactly one budget"):
        graph_tolerance(model, x, epsilon=1.0, max_drop=0.1)
    with pytest.raises(HwrelError, match="exactly one budget"):
        graph_tolerance(model, x)
    with pytest.raises(HwrelError, match="max_drop must be a fraction"):
        graph_tolerance(model, x, max_drop=1.5)
    with pytest.raises(HwrelError, match="below the model's own error"):
        graph_tolerance(model, x, epsilon=1.0, epsilon_prime=2.0)


def _run(capsys, *argv):
    rc = main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_cli_tolerance_on_a_vit(capsys, tmp_path):
    ref = models.load("mnist-vit")
    data = tmp_path / "vit.npz"
    np.savez(data, x=ref.x_test[:24].numpy(), y=ref.y_test[:24].numpy())
    rc, out, err = _run(capsys, "tolerance", "mnist-vit", "--data", str(data), "--max-accuracy-drop", "60%",
                        "--json")
    assert rc == 0, err
    r = json.loads(out)
    assert r["path"] == "graph" and r["criterion"] == "agreement" and r["over"] == "test inputs"
    assert [row["layer"] for row in r["per_layer"]] == ["blocks.0.act", "blocks.1.act"]
    assert r["per_layer"][1]["tolerated"] >= 1
    rc, out, err = _run(capsys, "tolerance", "mnist-vit", "--data", str(data), "--epsilon", "40")
    assert rc == 0, err
    assert "sound on each of the 24 test inputs" in out and "blocks.1.act" in out and "epsilon' " in out
    # an accuracy budget on a Network model: one line saying what to use instead
    rc, out, err = _run(capsys, "tolerance", "digits-mlp", "--max-accuracy-drop", "1%")
    assert rc == 2 and not out and len(err.strip().splitlines()) == 1 and "give --epsilon" in err
