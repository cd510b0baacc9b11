"""``hwrel seu``: JSON keys, text output, plots, and one-line errors with exit code 2."""
from __future__ import annotations

import json

import pytest

from hwrel.cli import main


def test_seu_json_and_plots(capsys, tmp_path):
    rc = main(["seu", "digits-mlp-sigmoid", "--accelerator", "eyeriss-v1", "--mission-hours",
               "87600", "--altitude-m", "0", "--target", "asil-d", "--campaign-size", "100",
               "--plot", str(tmp_path), "--json"])
    assert rc == 0
    d = json.loads(capsys.readouterr().out)
    for key in ("certified_flips", "vulnerable_fraction_certified", "vulnerable_fraction_measured",
                "fit", "fit_with_ecc", "mission_failure_probability", "meets_target",
                "certified_flips_weights_only", "certified_flips_with_plan", "plan_protected_bits"):
        assert key in d
    assert d["certified_flips_with_plan"] >= d["certified_flips"]
    assert d["accelerator"] == "eyeriss-v1" and d["format"] == "int16"
    assert d["fit_with_ecc"] < d["fit"] <= d["fit_raw"]
    assert d["meets_target"] == (d["fit"] < 10)
    assert (tmp_path / "critical_bits.png").stat().st_size > 0
    assert (tmp_path / "mission.png").stat().st_size > 0


def test_seu_text(capsys):
    assert main(["seu", "digits-mlp-sigmoid", "--accelerator", "gemmini", "--mission-hours",
                 "1000", "--epsilon", "5", "--campaign-size", "20"]) == 0
    out = capsys.readouterr().out
    assert "certified tolerated flips" in out and "FIT" in out


def test_seu_text_explains_zero_flips(capsys):
    assert main(["seu", "digits-mlp", "--accelerator", "eyeriss-v1", "--mission-hours", "1000",
                 "--campaign-size", "10"]) == 0
    out = capsys.readouterr().out
    assert "certified tolerated flips: 0; biases protected: " in out
    why = [ln for ln in out.splitlines() if ln.strip().startswith("why 0:")]
    assert len(why) == 1 and "bit 31 (sign) of " in why[0] and ".bias (int32)" in why[0]


@pytest.mark.parametrize("args,msg", [
    (["--accelerator", "nope", "--mission-hours", "1"], "unknown accelerator 'nope' (known: "),
    (["--accelerator", "eyeriss-v1", "--mission-hours", "-5"], "mission_hours"),
    (["--accelerator", "eyeriss-v1", "--mission-hours", "5", "--altitude-m", "-1"],
     "altitude_m"),
    (["--accelerator", "eyeriss-v1", "--mission-hours", "5", "--format", "bf16"],
     "eyeriss-v1 does not support bf16 (supported: int16)"),
    (["--accelerator", "eyeriss-v1", "--mission-hours", "5", "--memory", "pe_ifmap_spad"],
     "does not hold weights"),
])
def test_seu_bad_input(capsys, args, msg):
    assert main(["seu", "digits-mlp", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("hwrel: error: ") and msg in err and err.count("\n") == 1


def test_seu_model_larger_than_memory(capsys):
    assert main(["seu", "mnist-lenet", "--accelerator", "eyeriss-v1", "--mission-hours", "5",
                 "--memory", "pe_filter_spad"]) == 2
    assert "holds 75264 bytes" in capsys.readouterr().err
