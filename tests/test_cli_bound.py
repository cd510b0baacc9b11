"""`hwrel bound` / `hwrel tolerance` from the shell: JSON output, exit code 2 on bad input."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from torch import nn

import hwrel
from hwrel.cli import main


def run_cli(*args):
    proc = subprocess.run([sys.executable, "-m", "hwrel.cli", *args], capture_output=True, text=True, timeout=300)
    return proc.returncode, proc.stdout, proc.stderr


def test_bound_json_matches_the_api(capsys):
    assert main(["bound", "digits-mlp-sigmoid", "--failures", "2,1", "--json"]) == 0
    payload = json.loads(capsys.readouterr().out)
    rm = hwrel.models.load("digits-mlp-sigmoid")
    net = hwrel.Network.from_module(rm.module, rm.input_domain, rm.input_shape)
    expect = hwrel.fep(net, [2, 1])
    assert payload["bound"] == pytest.approx(expect.bound)
    assert payload["by_method"]["paper"] >= payload["by_method"]["weights"]
    assert payload["kind"] == "certified"


def test_tolerance_json(capsys):
    assert main(["tolerance", "digits-mlp-sigmoid", "--epsilon", "8", "--epsilon-prime", "1", "--json"]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload["budget"] == pytest.approx(7.0)
    assert len(payload["maximal"]) == 2


@pytest.mark.parametrize("args, needle", [
    (["bound", "digits-mlp", "--failures", "2,1,3"], "3 entries"),
    (["bound", "digits-mlp", "--failures", "999,0"], "exceeds"),
    (["bound", "digits-mlp", "--failures", "a,b"], "comma-separated"),
    (["bound", "no-such-model", "--failures", "1"], "no-such-model"),
    (["tolerance", "digits-mlp", "--epsilon", "nan", "--epsilon-prime", "0"], "epsilon"),
    (["tolerance", "digits-mlp", "--epsilon", "-1", "--epsilon-prime", "0"], "epsilon"),
])
def test_bad_input_exits_2_with_one_line(args, needle, capsys):
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("hwrel: error:") and needle in err and "\n" not in err


def test_model_files_safe_loading(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 2)).eval()
    pickled = tmp_path / "model.pt"
    torch.save(model, pickled)
    code, out, err = run_cli("bound", str(pickled), "--failures", "1")
    assert code == 2 and "trust" in err.lower()
    code, out, err = run_cli("bound", str(pickled), "--failures", "1", "--trust-pickle", "--json")
    assert code == 0, err
    assert json.loads(out)["bound"] > 0
    exported = tmp_path / "model.pt2"
    torch.export.save(torch.export.export(model, (torch.rand(1, 4),)), exported)
    code, out, err = run_cli("bound", str(exported), "--failures", "1", "--json")
    assert code == 0, err
    assert json.loads(out)["bound"] == pytest.approx(
        hwrel.fep(hwrel.Network.from_module(model, (0.0, 1.0)), [1]).bound, rel=1e-6)
    garbage = tmp_path / "broken.pt"
    garbage.write_bytes(b"not a model")
    code, out, err = run_cli("bound", str(garbage), "--failures", "1")
    assert code == 2 and "broken.pt" in err
