"""The built-in language model (text-gpt) from the shell: injection runs on the exact general path
with the next-token metric, every row equal to a deep-copy reference computed here; token data
files; one-line errors for bad next-token labels."""
from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from hwrel import models
from hwrel.cli import main


def _flip32(value: float, bit: int) -> float:
    return float(np.array(np.array([value], np.float32).view(np.uint32) ^ np.uint32(1 << bit)).view(np.float32)[0])


def _reference_row(module: torch.nn.Module, x: torch.Tensor, name: str, index: int, bit: int) -> dict[str, float]:
    """Deep copy, one fp32 bit flipped, forward; agreement and cross-entropy by our own code."""
    clean_out = module(x)
    m = copy.deepcopy(module)
    with torch.no_grad():
        p = dict(m.named_parameters())[name].view(-1)
        p[index] = _flip32(float(p[index]), bit)
        out = m(x)
    finite = bool(torch.isfinite(out).all())
    agree = ((out.argmax(-1) == clean_out.argmax(-1)) & torch.isfinite(out).all(-1)).double().mean()

    def ce(z: torch.Tensor) -> float:
        lp = torch.log_softmax(z[:, :-1].double(), -1)
        return float(-lp.gather(-1, x[:, 1:].unsqueeze(-1)).mean())

    ce_f = ce(out) if bool(torch.isfinite(out[:, :-1]).all()) else math.inf
    return {"agreement": float(agree), "cross_entropy_delta": ce_f - ce(clean_out),
            "max_abs_delta": float((out.double() - clean_out.double()).abs().max()) if finite else math.inf}


def test_inject_text_gpt_rows_equal_the_deep_copy_reference(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inject", "text-gpt", "--count", "8", "--seed", "3", "--json", "--no-progress",
                 "--out", str(tmp_path / "r")]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["injection_path"] == "general" and info["metric"] == "next-token"
    assert "Embedding" in info["engine_refused"]
    total = info["summary"][-1]
    assert total["layer"] == "all" and 0.0 <= total["agreement"] <= 1.0
    df = pd.concat(pd.read_parquet(p) for p in sorted((tmp_path / "r").glob("part-*.parquet")))
    assert len(df) == 8
    ref = models.load("text-gpt")
    with torch.no_grad():
        for _, row in df.iterrows():
            (rec,) = json.loads(row["faults"])
            want = _reference_row(ref.module, ref.x_test, rec["layer"], rec["index"], rec["bit"])
            assert row["agreement"] == pytest.approx(want["agreement"], abs=1e-15)  # 1 - rate in hwrel
            assert row["mismatch_rate"] == pytest.approx(1.0 - want["agreement"], abs=1e-15)
            assert row["max_abs_delta"] == want["max_abs_delta"]
            if math.isfinite(want["cross_entropy_delta"]):
                assert row["cross_entropy_delta"] == pytest.approx(want["cross_entropy_delta"], rel=1e-9, abs=1e-12)
            else:
                assert row["cross_entropy_delta"] == math.inf


def test_token_data_file_from_the_shell_and_bad_labels(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ref = models.load("text-gpt")
    x = ref.x_test[:10].numpy()
    np.savez(tmp_path / "tok.npz", x=x, y=x[:, 1:])
    assert main(["inject", "text-gpt", "--data", str(tmp_path / "tok.npz"), "--count", "4", "--json",
                 "--no-progress"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["inputs"] == 10 and info["metric"] == "next-token"
    np.savez(tmp_path / "bad.npz", x=x, y=x[:, 2:])
    assert main(["inject", "text-gpt", "--data", str(tmp_path / "bad.npz"), "--count", "4"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "bad.npz" in err and "(B, T - 1)" in err
    np.savez(tmp_path / "vocab.npz", x=x, y=np.full_like(x[:, 1:], 200))
    assert main(["inject", "text-gpt", "--data", str(tmp_path / "vocab.npz"), "--count", "4"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "label 200" in err
