"""Start-up of the command line: listing commands and models imports no torch (so each takes a
fraction of a second); the torch-free tables equal what the modules they stand for say."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import pytest

from hwrel import catalog, models
from hwrel.cli import HELP, build_parser


@pytest.mark.parametrize("argv", [["--help"], ["models"], ["models", "--json"], []])
def test_listing_imports_no_torch(argv: list[str]) -> None:
    code = ("import sys; from hwrel.cli import main; rc = main(%r); "
            "heavy = sorted(m for m in ('torch', 'pandas', 'numpy', 'scipy', 'sklearn', 'brevitas') "
            "if m in sys.modules); print(); print(rc, heavy)" % argv)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    rc, heavy = out.strip().splitlines()[-1].split(" ", 1)
    assert rc == "0" and heavy == "[]", out[-500:]
    if argv[:1] == ["models"]:
        assert all(name in out for name in models.names())


def test_models_fast_path_equals_the_full_table(capsys: pytest.CaptureFixture[str]) -> None:
    """The header-only listing (:mod:`hwrel.catalog`) says what :func:`hwrel.models.describe`
    says, for every field."""
    rows = catalog.shipped_table()
    assert rows is not None
    full = models.describe().to_dict(orient="records")
    assert [r["name"] for r in rows] == models.names()
    for fast, ref in zip(rows, full):
        for key in ("name", "task", "description", "dataset", "parameters", "input_domain", "weights", "test_accuracy"):
            assert fast[key] == ref[key], key
        assert tuple(fast["input_shape"]) == tuple(ref["input_shape"])
    for name in models.names():
        assert catalog.RECIPE_KEYS[name] == models._key(models._recipe(name), with_torch=False)
    # the command prints the same table either way (here hwrel.models is imported: the full path)
    from hwrel.cli import main

    assert main(["models", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert [r["parameters"] for r in printed] == [r["parameters"] for r in rows]


def test_stub_help_equals_each_commands_own() -> None:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert {a.dest: a.help for a in sub._choices_actions} == HELP
    lazy = build_parser(only="")
    assert lazy.format_help() == parser.format_help()


@pytest.mark.parametrize("command,load,given,want", [
    ("report", 0.0, None, None),  # idle cores: OpenMP's own short spin (passive waits cost 1.5-1.9x)
    ("report", 1.7, None, "PASSIVE"),  # shared cores: spinning threads cost up to 30x
    ("inject", 0.6, None, "PASSIVE"),
    ("bound", 3.0, None, None),  # no injection campaign: left alone
    ("report", 3.0, "ACTIVE", "ACTIVE"),  # the user's own setting wins
])
def test_openmp_waits_passively_only_on_busy_cores(command: str, load: float, given: str | None,
                                                    want: str | None) -> None:
    """The policy is set before torch loads, from how busy the cores are when the command starts."""
    code = ("import os, sys; import hwrel.cli as cli; cli._cores_in_use = lambda: {load}\n"
            "cli._omp_environment({command!r}); assert 'torch' not in sys.modules\n"
            "print(os.environ.get('OMP_WAIT_POLICY'))").format(load=load, command=command)
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if given:
        env["OMP_WAIT_POLICY"] = given
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env).stdout
    assert out.strip() == str(want)


def test_cores_in_use_sees_a_busy_core() -> None:
    """One spinning process beside an otherwise quiet machine reads as about a core in use."""
    from hwrel.cli import _cores_in_use

    if not os.path.exists("/proc/stat"):
        pytest.skip("no /proc/stat")
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        import time
        time.sleep(0.3)
        assert _cores_in_use(0.3) >= 0.7
    finally:
        hog.kill()
