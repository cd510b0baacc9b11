"""``hwrel seu`` and ``hwrel bitwidth`` on models the bounds do not support (mnist-vit, text-gpt):
measured figures from the exact general path, "not applicable: <reason>" where a certified one
would be, and a one-line error for options that only the certified analysis has."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from hwrel import models
from hwrel.cli import main
from hwrel.inject.stats import wilson_interval
from hwrel.report.general import accuracy, round_weights


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.fixture(scope="module")
def vit_data(tmp_path_factory):
    """The first 24 mnist-vit test inputs as a user's data file."""
    ref = models.load("mnist-vit")
    path = tmp_path_factory.mktemp("data") / "vit.npz"
    np.savez(path, x=ref.x_test[:24].numpy(), y=ref.y_test[:24].numpy())
    return path


def test_seu_on_a_vit_measures_and_says_not_applicable(capsys, vit_data):
    rc, out, _ = _run(capsys, "seu", "mnist-vit", "--data", str(vit_data), "--accelerator", "eyeriss-v1",
                      "--mission-hours", "8760", "--target", "asil-b", "--campaign-size", "40", "--json")
    assert rc == 0
    r = json.loads(out)
    assert r["certified"].startswith("not applicable: the bounds do not support operation permute")
    assert r["path"] == "general" and r["samples"] == 24 and r["campaign_size"] == 40
    assert sum(t["flips"] for t in r["per_tensor"]) == 40
    assert sum(t["vulnerable"] for t in r["per_tensor"]) == r["vulnerable"]
    frac = r["vulnerable"] / 40
    assert r["vulnerable_fraction_measured"] == pytest.approx(frac)
    assert r["vulnerable_fraction_measured_ci"] == pytest.approx(list(wilson_interval(r["vulnerable"], 40, 0.95)))
    # no certified flip count: the FIT estimate is the raw rate times the measured fraction, per memory
    raw = sum(m["fit_raw"] for m in r["memories"])
    assert r["fit_measured"] == pytest.approx(raw * frac, rel=1e-9)
    assert r["fit_measured_hi"] == pytest.approx(raw * r["vulnerable_fraction_measured_ci"][1], rel=1e-9)
    assert r["total_bits"] == sum(m["bits"] for m in r["memories"])
    assert r["meets_target_estimate"] == (r["fit_measured_hi"] < r["target_max_fit"])
    # the same command twice gives the same numbers (seeded)
    rc, again, _ = _run(capsys, "seu", "mnist-vit", "--data", str(vit_data), "--accelerator", "eyeriss-v1",
                        "--mission-hours", "8760", "--target", "asil-b", "--campaign-size", "40", "--json")
    assert json.loads(again) == r


def test_seu_text_on_a_vit_names_estimates(capsys, vit_data):
    rc, out, _ = _run(capsys, "seu", "mnist-vit", "--data", str(vit_data), "--accelerator", "eyeriss-v1",
                      "--mission-hours", "100", "--campaign-size", "10", "--altitude-m", "2000")
    assert rc == 0
    assert "certified figures: not applicable: the bounds do not support operation permute" in out
    assert "FIT estimate" in out and "an estimate, not a bound" in out
    assert "certified tolerated flips" not in out  # no certified number printed


@pytest.mark.parametrize("flag", [["--epsilon", "0.5"], ["--range-restriction"]])
def test_seu_certified_only_options_are_one_line_errors(capsys, vit_data, flag):
    rc, out, err = _run(capsys, "seu", "mnist-vit", "--data", str(vit_data), "--accelerator", "eyeriss-v1",
                        "--mission-hours", "100", *flag)
    assert rc != 0 and out == ""
    line = err.strip()
    assert "\n" not in line and flag[0] in line and "not applicable to model mnist-vit" in line
    assert "permute" in line


def test_bitwidth_on_a_language_model_is_measured_per_width(capsys):
    rc, out, err = _run(capsys, "bitwidth", "text-gpt", "--bits", "5..6", "--json")
    assert rc == 0
    r = json.loads(out)
    # certified over the graph (the Network refuses its Embedding); vacuous when every weight is rounded
    assert r["certified"] == "graph" and r["certified_bits"] is None and r["metric"] == "next-token"
    assert all(row["violations"] in (0, None) for row in r["certified_table"])
    assert r["method"].startswith("weight rounding")  # Brevitas cannot quantize an Embedding model
    # each row is the accuracy of the rounded copy, recomputed here
    ref = models.load("text-gpt")
    x, y = ref.x_test, ref.y_test
    with torch.no_grad():
        acc0 = accuracy(ref.module(x), y)
    assert r["float_accuracy"] == pytest.approx(acc0, abs=1e-12)
    for row in r["table"]:
        with torch.no_grad():
            acc = accuracy(round_weights(ref.module, row["bits"])(x), y)
        assert row["measured_accuracy"] == pytest.approx(acc, abs=1e-12)
        assert row["meets_budget_measured"] == (acc0 - acc <= 0.01 + 1e-12)
    rows = sorted(r["table"], key=lambda row: row["bits"])
    # the smallest width from which every wider swept width meets the budget
    good = [row["bits"] for i, row in enumerate(rows) if all(w["meets_budget_measured"] for w in rows[i:])]
    assert r["measured_bits"] == (good[0] if good else None)


def test_bitwidth_certified_only_option_is_a_one_line_error(capsys):
    rc, out, err = _run(capsys, "bitwidth", "text-gpt", "--per-layer")
    assert rc != 0 and out == ""
    assert "\n" not in err.strip() and "--per-layer" in err and "Embedding" in err


CUMSUM = """
import torch
from torch import nn


class Cum(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 3)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)).cumsum(1))
"""


def test_bounds_refusal_points_to_the_measuring_commands(capsys, tmp_path):
    """An operation neither the Network nor the graph bounds cover (cumsum): ``bound`` and
    ``tolerance`` stop in one line naming it and the commands that measure instead."""
    from safetensors.torch import save_file

    (tmp_path / "cum.py").write_text(CUMSUM)
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    from torch import nn

    m = nn.ModuleDict({"a": nn.Linear(4, 8), "b": nn.Linear(8, 3)})
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(tmp_path / "cum.safetensors"))
    np.savez(tmp_path / "d.npz", x=torch.rand(8, 4, generator=g).numpy(), y=np.arange(8) % 3)
    model = [str(tmp_path / "cum.safetensors"), "--architecture", f"{tmp_path / 'cum.py'}:Cum",
             "--data", str(tmp_path / "d.npz")]
    for cmd in (["tolerance", *model, "--epsilon", "1"], ["bound", *model, "--failures", "1"]):
        rc, out, err = _run(capsys, *cmd)
        assert rc != 0 and not out and "\n" not in err.strip(), (cmd, err)
        assert "cumsum" in err and "hwrel inject, seu, bitwidth" in err and "graph bounds" in err, err
    # the language model the Network refuses (its token embedding) has a tolerance on its graph now
    rc, out, err = _run(capsys, "tolerance", "text-gpt", "--epsilon", "1000", "--json")
    assert rc == 0, err
    assert json.loads(out)["path"] == "graph"


def test_bound_runs_on_the_graph_of_a_vit_and_a_language_model(capsys, vit_data):
    """``hwrel bound`` where the Network bounds refuse: the graph bounds, per input and over the
    domain (a ViT), per input only (token ids are not a box), the paper's Fep not applicable."""
    from hwrel.bounds.certify import certified_from_bounds
    from hwrel.bounds.graph import graph_bound

    rc, out, _ = _run(capsys, "bound", "mnist-vit", "--data", str(vit_data), "--failures", "0,1", "--json")
    assert rc == 0
    r = json.loads(out)
    assert r["path"] == "graph" and r["layers"] == ["blocks.0.act", "blocks.1.act"] and r["failures"] == [0, 1]
    assert r["paper"].startswith("not applicable") and r["inputs"] == 24 and r["bound"] >= r["per_input_max"] > 0
    ref = models.load("mnist-vit")
    x = ref.x_test[:24]
    gb = graph_bound(ref.module, [0, 1], lo=x)
    assert r["per_input_max"] == pytest.approx(float(gb.bound.amax(1).max()))
    flags = certified_from_bounds(ref.module(x).double(), gb.bound)[1]
    assert r["certified_fraction"] == pytest.approx(float(flags.double().mean()))
    rc, out, _ = _run(capsys, "bound", "text-gpt", "--failures", "0,1")
    assert rc == 0
    assert "graph     not applicable: token inputs are not a box" in out and "test inputs (sound per input)" in out
