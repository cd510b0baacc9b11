"""Start-up of the command line: listing commands and models imports no torch (so each takes a
fraction of a second); the torch-free tables equal what the modules they stand for say."""
from __future__ import annotations

import argparse
import json
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
