"""The user's own model and data from the shell: every model format and every data format end to
end through the `hwrel` command, on models that are not built in (a tanh MLP and a small CNN in the
user's own module, a transformers folder); bad input as one line, exit 2, nothing written; the same
option parsing on every command; the report's "how to reproduce" command, run."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from hwrel.cli import build_parser, main

from own_models import OwnModels, build, build_hf_folder

ARCH = {"tanh": ["--architecture", "usernets:TanhMLP", "--architecture-args", '{"hidden": 16}'],
        "cnn": ["--architecture", "usernets:SmallCNN", "--input-shape", "1,8,8"]}


@pytest.fixture(scope="module")
def own(tmp_path_factory: pytest.TempPathFactory) -> OwnModels:
    return build(tmp_path_factory.mktemp("own-cli"))


def hwrel_command() -> list[str]:
    exe = Path(sys.executable).with_name("hwrel")
    return [str(exe)] if exe.is_file() else [sys.executable, "-m", "hwrel.cli"]


def sh(own: OwnModels, *args: str, code: int = 0) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([*hwrel_command(), *args], cwd=own.root, capture_output=True, text=True,
                          env=env, timeout=600)
    assert proc.returncode == code, (args, proc.stdout[-2000:], proc.stderr[-2000:])
    return proc


def _domain(x: torch.Tensor) -> list[float]:
    return [float(x.min()), float(x.max())]


# ------------------------------------------------------------------------- every model format

MODEL_FORMATS = [
    ("tanh.pt2", []), ("cnn.pt2", []),
    ("tanh_sd.pt", ARCH["tanh"]), ("tanh.safetensors", ARCH["tanh"]),
    ("cnn_sd.pt", ARCH["cnn"]), ("cnn.safetensors", ARCH["cnn"]),
    ("tanh_pickled.pt", ["--trust-pickle"]),
]


@pytest.mark.parametrize("model,opts", MODEL_FORMATS, ids=[m for m, _ in MODEL_FORMATS])
def test_every_model_format_from_the_shell(own: OwnModels, model: str, opts: list[str]) -> None:
    out = json.loads(sh(own, "tolerance", model, *opts, "--data", "test.npz", "--epsilon", "100",
                        "--json").stdout)
    module = own.cnn if model.startswith("cnn") else own.tanh
    x = own.x_test.reshape(-1, 1, 8, 8) if model.startswith("cnn") else own.x_test
    assert out["model"] == Path(model).stem and out["inputs"] == len(own.y_test)
    assert out["test_accuracy"] == pytest.approx(own.accuracy(module, x), abs=1e-12)
    assert out["input_domain"] == _domain(own.x_test)
    assert "range of the test inputs" in out["input_domain_source"]
    assert len(out["per_layer"]) == 1
    assert out["epsilon_prime"] > 0  # measured on the data, not assumed 0


def test_transformers_folder_from_the_shell(own: OwnModels) -> None:
    pytest.importorskip("transformers")
    original = build_hf_folder(own.root / "hf-resnet")
    out = json.loads(sh(own, "tolerance", "hf-resnet", "--input-shape", "1,8,8", "--data", "test.npz",
                        "--epsilon", "1000", "--json").stdout)
    with torch.no_grad():
        pred = original(pixel_values=own.x_test.reshape(-1, 1, 8, 8)).logits.argmax(1)
    assert out["model_kind"] == "Hugging Face" and out["inputs"] == len(own.y_test)
    assert out["test_accuracy"] == pytest.approx(float((pred == own.y_test).double().mean()), abs=1e-12)
    assert len(out["per_layer"]) >= 3


# ------------------------------------------------------------------------- every data format

@pytest.mark.parametrize("data", ["test.npz", "test.pt", "test.safetensors", "test.csv", "test.parquet"])
def test_every_data_format_from_the_shell(own: OwnModels, data: str) -> None:
    """`expected` (which used random box points before) runs on the data: accuracy columns."""
    label = ["--label-column", "digit"] if data.endswith(".parquet") else []
    out = json.loads(sh(own, "expected", "cnn.pt2", "--data", data, *label, "-p", "5%", "--trials", "8",
                        "--json").stdout)
    acc = own.accuracy(own.cnn, own.x_test.reshape(-1, 1, 8, 8))
    assert out["inputs"] == len(own.y_test) and out["input_domain"] == _domain(own.x_test)
    (row,) = out["scenarios"]
    assert row["clean_accuracy"] == pytest.approx(acc, abs=1e-12)
    assert 0 <= row["mc_accuracy"] <= 1 and row["p"] == [0.05]


def test_inject_and_boost_use_the_data(own: OwnModels) -> None:
    out = json.loads(sh(own, "inject", "tanh.pt2", "--data", "test.parquet", "--label-column", "digit",
                        "--fault", "bitflip", "--count", "40", "--inputs", "120", "--json").stdout)
    assert "accuracy" in out["summary"][0]
    assert out["input_domain"] == _domain(own.x_test) and out["inputs"] == 120
    out = json.loads(sh(own, "boost", "tanh.pt2", "--data", "test.csv", "--epsilon", "5",
                        "--json").stdout)
    sim = out["simulation"]
    assert sim["runs"] == len(own.y_test)
    assert sim["accuracy_full"] == pytest.approx(own.accuracy(own.tanh), abs=1e-12)
    assert 0 <= sim["accuracy_quorum"] <= 1


# ------------------------------------------------------------------------- bad input

def _bad(own: OwnModels, tmp: Path) -> list[tuple[list[str], list[str]]]:
    x, y = own.x_test.numpy(), own.y_test.numpy()
    np.savez(tmp / "wide.npz", x=np.zeros((3, 65), np.float32), y=[0, 1, 2])
    np.savez(tmp / "bad_labels.npz", x=x, y=np.where(y == 7, 10, y))
    df = pd.read_csv(own.root / "test.csv").drop(columns=["label"])
    df.to_csv(tmp / "unlabelled.csv", index=False)
    (tmp / "notamodel").mkdir(exist_ok=True)
    (tmp / "notamodel" / "weights.bin").write_bytes(b"\0")
    r = str(own.root)
    return [
        (["--data", str(tmp / "wide.npz")], ["wide.npz", "do not fit model tanh"]),
        (["--data", str(tmp / "bad_labels.npz")], ["bad_labels.npz", "label 10", "0..9"]),
        (["--data", str(tmp / "unlabelled.csv")], ["unlabelled.csv", "no label column", "--label-column"]),
        (["--data", f"{r}/test.parquet", "--label-column", "target"], ["test.parquet", "no label column 'target'"]),
        (["--model", f"{r}/tanh_sd.pt", "--architecture", "usernets:Missing"], ["usernets", "no class 'Missing'"]),
        (["--model", f"{r}/tanh_sd.pt", "--architecture", "usernets:SmallCNN"],
         ["tanh_sd.pt", "does not fit architecture 'usernets:SmallCNN'"]),
        (["--model", str(tmp / "notamodel")], ["notamodel", "not a Hugging Face model folder"]),
        (["--model", f"{r}/tanh_sd.pt"], ["tanh_sd.pt", "--architecture"]),
    ]


COMMANDS = {  # a command line per analysing command, MODEL first
    "report": ["report", "MODEL", "--out", "OUT", "--quiet"],
    "bound": ["bound", "MODEL", "--failures", "1"],
    "tolerance": ["tolerance", "MODEL", "--epsilon", "5"],
    "inject": ["inject", "MODEL", "--count", "4", "--out", "OUT", "--no-progress"],
    "bitwidth": ["bitwidth", "MODEL", "--plot", "OUT.png"],
    "seu": ["seu", "MODEL", "--accelerator", "eyeriss-v1", "--mission-hours", "1000", "--plot", "OUT"],
    "boost": ["boost", "MODEL", "--epsilon", "5"],
    "expected": ["expected", "MODEL", "-p", "0.01"],
}


def _argv(cmd: str, model: str, out: Path, extra: list[str]) -> list[str]:
    argv = [model if a == "MODEL" else str(out) if a == "OUT" else f"{out}.png" if a == "OUT.png" else a
            for a in COMMANDS[cmd]]
    return argv + extra


@pytest.mark.parametrize("cmd", list(COMMANDS))
def test_bad_input_is_one_line_exit_2_nothing_written(own: OwnModels, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str], cmd: str) -> None:
    monkeypatch.chdir(own.root)
    out = tmp_path / "out"
    if cmd == "seu":
        out.mkdir()  # seu --plot takes an existing folder
    for extra, words in _bad(own, tmp_path):
        model = f"{own.root}/tanh.pt2"
        if extra[0] == "--model":
            model, extra = extra[1], extra[2:]
        assert main(_argv(cmd, model, out, extra)) == 2, (cmd, extra)
        err = capsys.readouterr().err.strip()
        assert err.startswith("hwrel: error: ") and "\n" not in err, (cmd, err)
        for w in words:
            assert w in err, (cmd, w, err)
        assert (list(out.iterdir()) == [] if cmd == "seu" else not out.exists()), cmd
        assert not Path(f"{out}.png").exists(), cmd


@pytest.mark.parametrize("cmd", ["report", "bitwidth", "seu"])
def test_commands_that_need_labels_say_so(own: OwnModels, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                          cmd: str) -> None:
    out = tmp_path / "out"
    if cmd == "seu":
        out.mkdir()
    assert main(_argv(cmd, f"{own.root}/tanh.pt2", out, [])) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("hwrel: error: ") and "\n" not in err and "needs labelled test data" in err
    assert "--data FILE" in err and "tanh" in err


@pytest.mark.parametrize("cmd,path", [("inject", "/proc/hwrel-x"), ("bitwidth", "/proc/hwrel-x.png"),
                                      ("seu", "/proc/hwrel-x"), ("report", "/proc/hwrel-x")])
def test_unwritable_output_fails_before_the_work(own: OwnModels, monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str], cmd: str, path: str) -> None:
    import importlib

    def no_work(*a, **k):
        raise AssertionError("the work started before the output path was checked")

    for module, fn in (("hwrel.quantize", "safe_bitwidth"), ("hwrel.seu.analysis", "seu_analysis"),
                       ("hwrel.inject.executors", "run_with_executor"), ("hwrel.report", "_analyse")):
        monkeypatch.setattr(importlib.import_module(module), fn, no_work)
    argv = [a if a not in ("OUT", "OUT.png") else path for a in COMMANDS[cmd]]
    argv = [f"{own.root}/tanh.pt2" if a == "MODEL" else a for a in argv] + ["--data", f"{own.root}/test.npz"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("hwrel: error: ") and "\n" not in err and "/proc/hwrel-x" in err, err


# ------------------------------------------------------------------------- option parsing

@pytest.mark.parametrize("cmd", ["report", "bitwidth", "seu"])
def test_every_budget_option_takes_percent_and_fraction(cmd: str) -> None:
    parser = build_parser()
    base = [a for a in COMMANDS[cmd] if a not in ("--plot", "OUT", "OUT.png", "--out")]
    base = ["digits-mlp" if a == "MODEL" else a for a in base]
    a = parser.parse_args([*base, "--max-accuracy-drop", "1%"])
    b = parser.parse_args([*base, "--max-accuracy-drop", "0.01"])
    assert a.max_accuracy_drop == b.max_accuracy_drop == pytest.approx(0.01)


def test_negative_values_reach_the_value_check(own: OwnModels, capsys: pytest.CaptureFixture[str],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(own.root)
    assert main(["bound", "tanh.pt2", "--failures", "-1,0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "hwrel: error: --failures must be non-negative, got '-1,0'"
    assert main(["bound", "tanh.pt2", "--input-domain", "-1,1", "--failures", "1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["input_domain"] == [-1.0, 1.0]


@pytest.mark.parametrize("argv,words", [
    (["bound", "tanh.pt2"], ["the following arguments are required: --failures", "hwrel bound --help"]),
    (["bitwidth", "digits-mlp", "--max-accuracy-drop", "lots"], ["--max-accuracy-drop", "'lots'",
                                                                 "hwrel bitwidth --help"]),
    (["nosuchcommand"], ["invalid choice", "hwrel --help"]),
])
def test_argparse_errors_are_one_line_with_a_pointer_to_help(own: OwnModels, argv: list[str],
                                                             words: list[str]) -> None:
    err = sh(own, *argv, code=2).stderr.strip()
    assert err.startswith("hwrel: error: ") and "\n" not in err, err
    for w in words:
        assert w in err, (w, err)


# ------------------------------------------------------------------------- the report

def _reproduce_command(report_md: str) -> str:
    section = report_md[report_md.index("## How to reproduce"):]
    return re.search(r"`(hwrel report [^`]*)`", section).group(1)


@pytest.mark.slow
def test_report_on_a_pt2_with_data_and_its_reproduce_command(own: OwnModels) -> None:
    """`hwrel report my.pt2 --data test.npz --accelerator eyeriss-v1` writes the full report, and
    the command in its "how to reproduce" section regenerates exactly the same tables."""
    from test_report import check_html

    sh(own, "report", "tanh.pt2", "--data", "test.npz", "--accelerator", "eyeriss-v1", "--out", "rep", "--quiet")
    check_html(own.root / "rep")
    md = (own.root / "rep" / "report.md").read_text()
    assert "range of the test inputs in test.npz" in md
    cmd = _reproduce_command(md)
    assert "--data=test.npz" in cmd and "--out rep" in cmd
    first = {p.name: p.read_text() for p in (own.root / "rep" / "tables").glob("*.csv")}
    shutil.copytree(own.root / "rep", own.root / "rep-first")
    proc = subprocess.run(cmd + " --quiet", shell=True, cwd=own.root, capture_output=True, text=True,
                          env={**os.environ, "PATH": f"{Path(hwrel_command()[0]).parent}:{os.environ['PATH']}"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    again = {p.name: p.read_text() for p in (own.root / "rep" / "tables").glob("*.csv")}
    assert again == first and len(first) >= 10
    assert _reproduce_command((own.root / "rep" / "report.md").read_text()) == cmd
