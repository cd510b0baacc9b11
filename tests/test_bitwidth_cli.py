"""``hwrel bitwidth``: JSON fields, human output, exit codes for bad input and unmet budgets."""
from __future__ import annotations

import json
import warnings

from hwrel.cli import main

warnings.filterwarnings("ignore")


def test_json_has_every_kind_and_the_table(capsys, tmp_path):
    fig = tmp_path / "bw.png"
    rc = main(["bitwidth", "digits-mlp-sigmoid", "--max-accuracy-drop", "2%", "--bits", "8..12", "--json",
               "--plot", str(fig)])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0
    for k in ("certified_bits", "adversarial_bits", "estimated_bits", "measured_bits"):
        assert isinstance(out[k], int) and 8 <= out[k] <= 12
    assert out["budget"] == {"max_accuracy_drop": 0.02}
    assert [row["bits"] for row in out["table"]] == list(range(8, 13))
    assert all(row["bound_violations"] == 0 for row in out["table"])
    assert out["measured_bits"] <= out["certified_bits"]
    assert fig.stat().st_size > 0


def test_text_output_and_unmet_budget(capsys):
    rc = main(["bitwidth", "digits-mlp-sigmoid", "--max-accuracy-drop", "0", "--bits", "2..3", "--no-verify",
               "--no-adversarial"])
    cap = capsys.readouterr()
    assert rc == 1
    assert "certified" in cap.out and "best achievable" in cap.err


def test_bad_arguments_exit_2(capsys):
    assert main(["bitwidth", "no-such-model"]) == 2
    assert "neither a built-in model" in capsys.readouterr().err
    assert main(["bitwidth", "digits-mlp-sigmoid", "--act-bits", "x"]) == 2
    assert "--act-bits" in capsys.readouterr().err
    for bad in (["--bits", "1..40"], ["--max-accuracy-drop", "150%"]):
        assert main(["bitwidth", "digits-mlp-sigmoid", *bad]) == 2, "argparse should reject " + " ".join(bad)
