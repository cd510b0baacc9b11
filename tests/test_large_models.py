"""ResNet-style CNNs (batch norm, residual connections) through extraction, bounds, safe bit
width and a campaign streamed to disk. ``mnist-resnet`` for the end-to-end path (fast);
``resnet18_like`` (11 M parameters) only for extraction and bounds."""
from __future__ import annotations

import copy
import json
import math

import pandas as pd
import pytest
import torch

from hwrel import models
from hwrel.bounds.api import fep
from hwrel.formats import flip, parse_format
from hwrel.inject.campaign import merge_shards, run_campaign
from hwrel.inject.executors import LocalExecutor
from hwrel.network import Network


@pytest.fixture(scope="module")
def resnet():
    ref = models.load("mnist-resnet")
    net = Network.from_module(ref.module, input_domain=(0.0, 1.0), input_shape=ref.input_shape)
    return ref, net, ref.x_test[:32], ref.y_test[:32]


def test_extraction_keeps_residuals_and_folds_batch_norm(resnet):
    ref, net, x, _ = resnet
    with torch.no_grad():
        torch.testing.assert_close(net.forward(x), ref.module(x), rtol=1e-5, atol=1e-5)
    assert sum(n.op == "add" for n in net.nodes) == 2  # one residual sum per block
    folded = [n.affine.folded_bn for n in net.nodes if n.affine is not None and n.affine.folded_bn]
    assert len(folded) == 5  # stem + 2 convs in each of 2 blocks (identity skips have no BN)
    assert not any("bn" in n.name and n.op == "affine" for n in net.nodes)


def test_crash_bound_covers_injected_crashes(resnet):
    """Every single-neuron crash measured on the test inputs stays within the certified bound
    for at most one crash per hidden layer (sound: the bound holds for any input)."""
    _, net, x, y = resnet
    df = run_campaign(net, dict(fault="crash", count=96, chunk_size=32), x, y, seed=5,
                      progress=False)
    assert set(df["layer"]) <= {net.nodes[i].name for i in net.layers}
    assert df["max_abs_delta"].max() > 0
    bound = fep(net, [1] * len(net.layers), "crash", method="best", at_most=True)
    assert math.isfinite(bound.bound)
    assert df["max_abs_delta"].max() <= bound.bound


def test_safe_bitwidth_is_sound_on_resnet(resnet):
    from hwrel.quantize import safe_bitwidth

    ref, _, x, y = resnet
    res = safe_bitwidth(ref.module, (x, y), max_accuracy_drop=0.05, bits=(8, 16), verify=True,
                        adversarial=False, input_shape=ref.input_shape, input_domain=(0.0, 1.0))
    t = res.table
    assert list(t["bits"]) == [8, 16]
    # Brevitas-quantized models measured on the test inputs never beat the certificate.
    assert (t["measured_error"] <= t["certified_error"]).all()
    assert (t["measured_accuracy"] >= t["certified_accuracy"]).all()
    assert int(t["bound_violations"].sum()) == 0
    assert res.certified_bits is None or res.certified_bits in (8, 16)
    json.dumps(res.to_dict())


def test_campaign_streams_to_disk_and_is_exact(resnet, tmp_path):
    """Rows go to disk chunk by chunk (``load=False`` returns nothing and holds nothing); they
    equal an in-memory run, and a bit flip re-applied by hand gives the same output change."""
    _, net, x, y = resnet
    spec = dict(fault="bitflip", count=90, chunk_size=32)
    out = tmp_path / "r"
    assert LocalExecutor(1).run(net, spec, x, y, out=out, seed=11, progress=False, load=False) is None
    parts = sorted(out.glob("part-*.parquet"))
    assert len(parts) == 3 and [len(pd.read_parquet(p)) for p in parts] == [32, 32, 26]
    df = merge_shards([out])
    pd.testing.assert_frame_equal(df, run_campaign(net, spec, x, y, seed=11, progress=False))
    fp32 = parse_format("fp32")
    clean = net.forward(x)
    for row in df.head(8).itertuples():
        i = next(k for k, n in enumerate(net.nodes) if n.name == row.layer)
        faulty = copy.deepcopy(net)
        a = faulty.nodes[i].affine
        t = a.weight if row.site == "weight" else a.bias
        t.view(-1)[row.index] = flip(fp32, t.view(-1)[row.index], row.bit)
        with torch.no_grad():
            d = (faulty.forward(x) - clean).abs().max().item()
        if math.isfinite(d):
            assert row.max_abs_delta == pytest.approx(d, rel=1e-4, abs=1e-6)
        else:
            assert not math.isfinite(row.max_abs_delta)


def test_resnet18_like_extraction_and_bounds():
    module = models.resnet18_like()
    net = Network.from_module(module, input_domain=(0.0, 1.0), input_shape=(3, 32, 32))
    assert net.num_parameters > 11_000_000
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(net.forward(x), module(x), rtol=1e-4, atol=1e-4)
    assert sum(n.op == "add" for n in net.nodes) == 8  # 4 stages x 2 BasicBlocks
    f = [0] * len(net.layers)
    f[0] = 1
    paper = fep(net, f, "crash", method="paper")
    weights = fep(net, f, "crash", method="weights")
    assert 0 < weights.bound <= paper.bound and math.isfinite(paper.bound)
