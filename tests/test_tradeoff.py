"""Robustness vs learning cost: a tiny grid (bounds vs measured crashes, determinism, plot, CLI)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import hwrel
from hwrel.cli import main
from hwrel.errors import HwrelError
from hwrel.tradeoff import _data, measured_error, plot, tradeoff, train

GRID = dict(widths=(8, 24), weight_decays=(0.0, 1e-3), max_epochs=4, search=20, epsilon=3.0)


@pytest.fixture(scope="module")
def result():
    return tradeoff("digits", **GRID)


def test_table_is_consistent_and_bounds_cover_measurements(result) -> None:
    t = result.table
    assert len(t) == 4 and set(t["width"]) == {8, 24}
    assert (t["epochs"] >= 1).all() and (t["epochs"] <= 4).all() and (t["seconds"] > 0).all()
    assert (t["converged"] | (t["epochs"] == 4)).all()  # stopping early means the target was reached
    assert (t["measured"] > 0).all()
    assert (t["measured"] <= t["fep"]).all() and (t["fep"] <= t["fep_paper"] * (1 + 1e-12)).all()
    assert (((t["eps_prime"] + t["fep"] <= result.epsilon) & (t["test_accuracy"] >= result.min_accuracy))
            == t["meets"]).all()
    assert (t["below_min_accuracy"] == (t["test_accuracy"] < result.min_accuracy)).all()
    assert ((t["eps_prime"] >= 0) & (t["eps_prime"] <= 2)).all()


def test_training_is_deterministic_and_regularisation_shrinks_weights() -> None:
    x, y, _, _ = _data("digits")
    a, ea, _, _ = train(16, 2, 0.0, x, y, max_epochs=3)
    b, eb, _, _ = train(16, 2, 0.0, x, y, max_epochs=3)
    assert ea == eb and all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    c, _, _, _ = train(16, 2, 0.05, x, y, max_epochs=3)

    def norm(m: torch.nn.Module) -> float:
        return sum(float((p.detach() ** 2).sum()) for n, p in m.named_parameters() if n.endswith("weight"))

    assert norm(c) < norm(a)


def test_measured_error_is_exact_crash_injection() -> None:
    x, y, xt, _ = _data("digits")
    module, _, _, _ = train(8, 2, 0.0, x, y, max_epochs=2)
    net = hwrel.Network.from_module(module, (0.0, 1.0), (64,))
    got = measured_error(net, xt[:30], 8, 1, 0)  # crashing every neuron: one possible set
    with torch.no_grad():
        ref = module(xt[:30]).double()
    out = module[-1].bias.detach().double().expand_as(ref)  # last hidden layer all zero: outputs are the bias
    assert got == pytest.approx(float((out - ref).abs().max()), rel=1e-5)


def test_plot_writes_a_png(result, tmp_path: Path) -> None:
    path = tmp_path / "t.png"
    plot(result, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tradeoff")]


def test_bad_input() -> None:
    with pytest.raises(HwrelError, match="dataset"):
        tradeoff("cifar", **GRID)
    with pytest.raises(HwrelError, match="failures"):
        tradeoff("digits", widths=(4,), weight_decays=(0.0,), failures=5)
    with pytest.raises(HwrelError, match="weight_decays"):
        tradeoff("digits", widths=(4,), weight_decays=(-1.0,))
    with pytest.raises(HwrelError, match="quantile"):
        tradeoff("digits", widths=(4,), weight_decays=(0.0,), quantile=0.0)
    with pytest.raises(HwrelError, match="epsilon"):
        tradeoff("digits", widths=(4,), weight_decays=(0.0,), epsilon=-1.0)


def test_cli(tmp_path: Path, capsys) -> None:
    out = tmp_path / "fig.png"
    assert main(["tradeoff", "--dataset", "digits", "--widths", "8", "--weight-decays", "0", "--max-epochs", "2",
                 "--search", "5", "--out", str(out), "--json"]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert len(payload["networks"]) == 1 and out.exists()
    assert payload["networks"][0]["measured"] <= payload["networks"][0]["fep"]
    assert main(["tradeoff", "--widths", "8,x"]) == 2
    assert "--widths" in capsys.readouterr().err


def test_network_below_min_accuracy_never_meets(capsys) -> None:
    """A strongly regularised MLP is near chance (10 %) yet has a tiny Fep: eps' + Fep <= eps holds,
    but it must not count as meeting the target below the minimum clean accuracy."""
    grid = dict(widths=(8,), weight_decays=(1.0,), max_epochs=2, search=5, epsilon=3.0)
    low = tradeoff("digits", **grid)
    r = low.table.iloc[0]
    assert r["test_accuracy"] < 0.2 and r["eps_prime"] + r["fep"] <= 3.0
    assert bool(r["below_min_accuracy"]) and not bool(r["meets"]) and low.min_accuracy == 0.8
    anyone = tradeoff("digits", **grid, min_accuracy=0.0)
    assert bool(anyone.table.iloc[0]["meets"]) and not bool(anyone.table.iloc[0]["below_min_accuracy"])
    with pytest.raises(HwrelError, match="min_accuracy"):
        tradeoff("digits", **grid, min_accuracy=1.5)
    assert main(["tradeoff", "--widths", "8", "--weight-decays", "1", "--max-epochs", "2", "--search", "5",
                 "--epsilon", "3", "--min-accuracy", "0.5"]) == 0
    out = capsys.readouterr().out
    assert "with test accuracy >= 50%: 0 of 1" in out and "1 below 50% clean accuracy never count" in out
