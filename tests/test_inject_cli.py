"""``hwrel inject``: summaries, JSON, one-line errors, and resuming after SIGKILL."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from hwrel.cli import main
from hwrel.inject.campaign import merge_shards

BASE = ["inject", "digits-mlp", "--inputs", "32", "--no-progress"]


def test_summary_and_json(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(BASE + ["--count", "40", "--chunk-size", "16", "--out", str(tmp_path / "a")]) == 0
    text = capsys.readouterr().out
    assert "40 configurations" in text and "margin of error" in text and "sdc_rate" in text
    assert main(BASE + ["--count", "40", "--chunk-size", "16", "--out", str(tmp_path / "a"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["configs"] == 40 and info["summary"][-1]["layer"] == "all"
    total = info["summary"][-1]
    assert total["sdc_lo"] <= total["sdc_rate"] <= total["sdc_hi"]
    rows = merge_shards([tmp_path / "a"])
    assert total["sdc"] == int((rows["mismatch_rate"] > 0).sum())


def test_int_format_quantizes_float_model(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(BASE + ["--count", "30", "--format", "int8", "--bit", "7", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["storage"] in ("brevitas-ptq", "int-codes") and info["spec"]["format"] == "int8"
    # Only weights are int8 (biases stay fp32), and bit 7 of an int8 code is its sign.
    assert {r["bit"] for r in info["summary"]} == {7, -1}


def test_fallback_quantization_codes() -> None:
    from hwrel import models
    from hwrel.cli.inject import quantize_network
    from hwrel.formats import IntFormat
    from hwrel.network import Network

    ref = models.load("digits-mlp")
    net = quantize_network(Network.from_module(ref.module, input_shape=ref.input_shape), IntFormat(4))
    for i in net.synapse_layers:
        a = net.nodes[i].affine
        assert a.bit_width == 4 and int(a.codes.abs().max()) <= 7
        assert bool((a.weight == a.scale * a.codes.float()).all())


def test_exhaustive_neuron_crash(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(BASE + ["--fault", "crash", "--exhaustive", "--layer", "1", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["configs"] == 128 and info["sites"] == 128 and info["margin_of_error"] is None


@pytest.mark.parametrize("extra, needle", [
    (["--ber", "1.5"], "bit-error rate"),
    (["--ber", "-0.1"], "bit-error rate"),
    (["--count", "0"], "count"),
    (["--count", "x"], "--count"),
    (["--count", "5", "--format", "int99"], "unknown storage format"),
    (["--count", "5", "--bit", "32"], "bit 32 out of range"),
    (["--count", "5", "--format", "fp16", "--bit", "16"], "bit 16 out of range"),
    (["--count", "5", "--shard", "2/2"], "shard"),
    (["--count", "5", "--shard", "a/b"], "shard"),
    (["--count", "5", "--layer", "nope"], "layer"),
    (["--fault", "byzantine", "--count", "5"], "capacity"),
    (["--fault", "laser", "--count", "5"], "unknown fault"),
])
def test_bad_input_exits_2_with_one_line(capsys: pytest.CaptureFixture[str], extra: list[str],
                                         needle: str) -> None:
    assert main(BASE + extra) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("hwrel: error: ") and needle in err


def test_other_campaign_folder_exits_2(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    out = str(tmp_path / "c")
    assert main(BASE + ["--count", "20", "--out", out]) == 0
    before = sorted(os.listdir(out))
    capsys.readouterr()
    assert main(BASE + ["--count", "20", "--out", out, "--seed", "3"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "another campaign" in err
    assert sorted(os.listdir(out)) == before


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "hwrel.cli", *args]


def test_resume_after_sigkill(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["inject", "digits-mlp", "--count", "400", "--chunk-size", "10", "--inputs", "32",
            "--no-progress", "--seed", "4"]
    killed, whole = tmp_path / "killed", tmp_path / "whole"
    proc = subprocess.Popen(_cli(*args, "--out", str(killed)), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    parts: list[str] = []
    while time.monotonic() < deadline and proc.poll() is None:
        parts = [p for p in os.listdir(killed) if p.startswith("part-")] if killed.exists() else []
        if len(parts) >= 2:
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    done = [p for p in os.listdir(killed) if p.startswith("part-")]
    assert 2 <= len(done) < 40, "the campaign must be killed part-way"
    # Rerun continues; an uninterrupted run gives exactly the same rows.
    subprocess.run(_cli(*args, "--out", str(killed)), check=True, stdout=subprocess.DEVNULL)
    assert main(args + ["--out", str(whole)]) == 0  # in-process: saves a start-up
    a, b = merge_shards([killed]), merge_shards([whole])
    assert len(a) == 400 and a["config_id"].tolist() == list(range(400))
    pd.testing.assert_frame_equal(a, b)
