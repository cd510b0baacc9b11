"""Exhaustive bit maps equal brute-force injection (deep-copied model, value written, forward):
on every injected site and on a random sample of 10,000 certified-masked sites, on two models
(an MLP whose first Linear runs over rows, and a CNN whose last convolution runs at 1x1, so 8 of
its 9 kernel taps only ever multiply padding). Certified sites settled as ``unchanged`` give the
clean outputs bit for bit."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from hwrel.inject import certify as C
from hwrel.inject.bitmap import bit_map
from hwrel.inject.engine import Injector
from hwrel.network import Network


def _mlp_rows() -> tuple[nn.Module, tuple[int, ...]]:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Flatten(), nn.Linear(32, 24), nn.ReLU(),
                         nn.Linear(24, 4)).eval(), (4, 6)


def _cnn() -> tuple[nn.Module, tuple[int, ...]]:
    torch.manual_seed(1)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(4, 6, 3, padding=1), nn.ReLU(), nn.MaxPool2d(3),
                         nn.Conv2d(6, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8, 5)).eval(), (1, 6, 6)


def _brute(model: nn.Module, x: torch.Tensor, rows, clean_top1: torch.Tensor):  # noqa: ANN001
    """Per site ``(layer, site, index, new_value)``: (top-1 changed on any input, output == clean)."""
    m = copy.deepcopy(model)
    params = dict(m.named_parameters())
    clean = m(x)
    sdc, same = [], []
    with torch.no_grad():
        for layer, site, index, new in rows:
            p = params[f"{layer}.{site}"].view(-1)
            old = p[index].clone()
            p[index] = torch.tensor(new, dtype=torch.float32)
            out = m(x)
            p[index] = old
            bad = ~torch.isfinite(out).all(1)
            sdc.append(bool(((out.argmax(1) != clean_top1) | bad).any()))
            same.append(bool(torch.equal(out, clean)))
    return np.array(sdc), np.array(same)


@pytest.fixture(scope="module", params=["mlp-rows", "cnn"])
def mapped(request):  # noqa: ANN001, ANN201
    model, shape = _mlp_rows() if request.param == "mlp-rows" else _cnn()
    x = torch.rand(32, *shape, generator=torch.Generator().manual_seed(2))
    net = Network.from_module(model, input_shape=shape)
    inj = Injector(net, x)
    with torch.no_grad():  # the brute force's clean run is the engine's, bit for bit
        assert torch.equal(model(x), inj.clean[-1])
    return request.param, model, x, inj, bit_map(inj)


def test_map_equals_brute_force(mapped) -> None:  # noqa: ANN001
    name, model, x, inj, bm = mapped
    df = bm.sites
    assert len(df) == sum(p.numel() for p in model.parameters()) * 32
    injected = df[~df["method"].isin(["unchanged", "bound"])]
    certified = df[df["method"].isin(["unchanged", "bound"])]
    assert len(injected) > 100 and len(certified) >= 10_000, (len(injected), len(certified))
    assert injected["sdc"].any() and not certified["sdc"].any()
    sample = certified.sample(10_000, random_state=0)
    for part, check_same in ((injected, False), (sample, True)):
        rows = zip(part["layer"].astype(str), part["site"].astype(str), part["index"], part["new_value"])
        sdc, same = _brute(model, x, rows, inj.clean_top1)
        np.testing.assert_array_equal(part["sdc"].to_numpy(), sdc)
        if check_same:  # value-exact where the map says the outputs cannot move
            assert same[(part["method"] == "unchanged").to_numpy()].all()
    if name == "cnn":  # the 1x1 convolution: 8 of 9 taps see only padding, for every bit
        last = df[(df["layer"] == "6") & (df["site"] == "weight")]
        tap = last["index"] % 9
        assert (last[tap != 4]["method"] == "unchanged").all()
        assert bm.totals["unchanged"] >= (tap != 4).sum()


def test_map_without_certificates_is_the_same_map(mapped) -> None:  # noqa: ANN001
    """Certification changes how a site is settled, never its class."""
    _, _, _, inj, bm = mapped
    plain = bit_map(inj, certify=False, layers=[bm.sites["layer"].iloc[-1]])
    got = bm.sites[bm.sites["layer"] == plain.sites["layer"].iloc[0]].reset_index(drop=True)
    np.testing.assert_array_equal(got["sdc"].to_numpy(), plain.sites["sdc"].to_numpy())
    assert (plain.sites["method"] == "injected").all()


def test_certificate_is_monotone_in_tau(mapped) -> None:  # noqa: ANN001
    """The bisection's premise, checked: a radius that certifies, halved, still certifies."""
    _, _, _, inj, _ = mapped
    nom = C.nominal(inj)
    node = next(iter(inj._affine.values()))
    cert = C.certificate(nom, node)
    nd = nom.net.nodes[node]
    rows = nd.affine.kind == "linear" and len(nom.net.nodes[nd.inputs[0]].shape) > 1
    J = cert.tau.shape[0]
    units = torch.arange(J)
    for scale in (1.0, 0.5, 0.25):
        e = C._unit_box(tuple(nd.shape), rows, J, cert.tau * scale, units)
        ok = C.top1_kept(nom, C.propagate(nom, node, e))
        assert ok[cert.tau > 0].all()
    e = C._unit_box(tuple(nd.shape), rows, J, cert.tau * 4 + 1e-3, units)
    assert not C.top1_kept(nom, C.propagate(nom, node, e)).all()  # and it is not vacuous


def test_cli_exhaustive_bitflip_writes_the_map(tmp_path, capsys) -> None:  # noqa: ANN001
    import json

    import pandas as pd

    from hwrel import models
    from hwrel.cli import main

    out = tmp_path / "map.csv"
    assert main(["inject", "digits-mlp-sigmoid", "--exhaustive", "--layer", "4", "--inputs", "16",
                 "--out", str(out), "--json", "--no-progress"]) == 0
    info = json.loads(capsys.readouterr().out)
    df = pd.read_csv(out)
    ref = models.load("digits-mlp-sigmoid").module
    assert len(df) == info["totals"]["sites"] == (ref[4].weight.numel() + ref[4].bias.numel()) * 32
    t = info["totals"]
    assert t["certified_masked"] + t["injected"] + t["bound_then_injected_on_few_inputs"] == len(df)
    assert t["sdc"] == int(df["sdc"].sum()) and t["certified_masked"] > 0
    assert not df[df["method"].isin(["unchanged", "bound"])]["sdc"].any()
    assert main(["inject", "digits-mlp-sigmoid", "--exhaustive", "--out", str(tmp_path / "m")]) == 2
    assert ".parquet or .csv" in capsys.readouterr().err
