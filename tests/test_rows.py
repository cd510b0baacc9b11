"""The command line's result rows (:mod:`hwrel.inject.rows`) hold exactly what the public API
returns: the same DataFrame, the same summary records, a Parquet file that reads back as the
same frame, and text columns byte for byte those of the fault objects' JSON."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import hwrel.inject.campaign as C
from hwrel import models
from hwrel.inject.rows import Rows, Text
from hwrel.network import Network


@pytest.fixture(scope="module")
def net_data():  # noqa: ANN201
    ref = models.load("digits-mlp")
    return Network.from_module(ref.module, input_shape=ref.input_shape), ref.x_test[:24], ref.y_test[:24]


SPECS = [dict(fault="bitflip", count=700, chunk_size=128),
         dict(fault="stuck1", count=200, chunk_size=64, sites=("bias",)),
         dict(fault="bitflip", exhaustive=True, bit=23, sites=("bias",), chunk_size=64)]


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("labels", [True, False])
def test_rows_equal_the_dataframe_and_its_summary(net_data, spec, labels: bool) -> None:  # noqa: ANN001
    net, x, y = net_data
    y = y if labels else None
    rows = C.campaign_rows(net, spec, x, y, seed=5, progress=False)
    assert rows.parts and rows._df is None  # the numpy path, no DataFrame inside
    df = C.run_campaign(net, spec, x, y, seed=5, progress=False)
    pd.testing.assert_frame_equal(rows.frame(), df, check_exact=True)
    assert rows.frame().attrs == df.attrs and len(rows) == len(df)
    for k in ("certified", "max_abs_delta", "bit", "config_id"):
        np.testing.assert_array_equal(rows[k], df[k].to_numpy())
    assert rows.summary(0.9) == C.summary_records(C.summarize(df, confidence=0.9))
    assert ("accuracy" in rows) == labels and "agreement" not in rows


def test_rows_summary_groups_sort_by_name_not_by_order(net_data) -> None:  # noqa: ANN001
    """Layer names sort as strings ("10" before "2"), as pandas' groupby sorts them."""
    net, x, y = net_data
    rows = C.campaign_rows(net, dict(fault="bitflip", count=300, chunk_size=64), x, y, seed=1, progress=False)
    for p in rows.parts:  # rename the layers so that name order and group order differ
        codes, vals = p["layer"].choices()
        p["layer"] = Text.choice(codes, [{"0": "10", "2": "2", "4": "03"}.get(v, v) for v in vals])
    assert [r["layer"] for r in rows.summary()][:1] == ["03"]
    assert rows.summary() == C.summary_records(C.summarize(rows.frame()))


@pytest.mark.parametrize("out", ["res.parquet", "folder"])
def test_results_written_without_pandas_read_back_equal(net_data, tmp_path: Path, out: str) -> None:  # noqa: ANN001
    net, x, y = net_data
    spec = dict(fault="bitflip", count=500, chunk_size=128)
    ref = C.run_campaign(net, spec, x, y, seed=2, progress=False)
    rows = C.campaign_rows(net, spec, x, y, seed=2, progress=False, out=tmp_path / out)
    assert rows._df is None
    back = (pd.read_parquet(tmp_path / out) if out.endswith(".parquet")
            else C.merge_shards([tmp_path / out]))
    pd.testing.assert_frame_equal(back, ref, check_exact=True)
    # run again: read back (and resumed from parts) by the pandas path, the same rows
    again = C.run_campaign(net, spec, x, y, seed=2, progress=False, out=tmp_path / out)
    pd.testing.assert_frame_equal(again, ref, check_exact=True)


def test_resume_mixes_written_and_new_chunks(net_data, tmp_path: Path) -> None:  # noqa: ANN001
    net, x, y = net_data
    spec = dict(fault="bitflip", count=512, chunk_size=128)
    ref = C.run_campaign(net, spec, x, y, seed=4, progress=False)
    C.campaign_rows(net, spec, x, y, seed=4, progress=False, out=tmp_path / "r", shard=(0, 2))
    rows = C.campaign_rows(net, spec, x, y, seed=4, progress=False, out=tmp_path / "r")
    assert rows._df is not None  # chunks read back: the DataFrame path
    pd.testing.assert_frame_equal(rows.frame(), ref, check_exact=True)


@pytest.mark.parametrize("values", [["fc1", "features.0.conv", ""], ["é", "日本", "a\x00b"]])
def test_text_bytes_equal_python_concatenation(values: list[str]) -> None:
    rng = np.random.default_rng(0)
    n = 500
    codes = rng.integers(0, len(values), n)
    ints = rng.integers(0, 10 ** rng.integers(1, 12, n))
    ints[:3] = [0, 9, 10]
    t = Text(n, [(codes, [v.encode() for v in values]), b"<", ints, b">", (codes, [b"x", b"", b"yz"])])
    expect = [f"{values[c]}<{i}>{['x', '', 'yz'][c]}" for c, i in zip(codes, ints)]
    assert t.tolist() == expect
    assert t.arrow().to_pylist() == expect
    assert Text.choice(codes, values).choices()[1] == values and t.choices() is None
    assert Text(0, [b"a", np.zeros(0, np.int64)]).tolist() == []


def test_cli_summary_text_and_json_equal_pandas() -> None:
    """:mod:`hwrel.cli.tables` prints and encodes records as pandas' ``to_string(index=False)``
    and ``to_json(orient="records")`` do (random tables of str, int and float, NaN and inf)."""
    from hwrel.cli.tables import _json_float, json_records, to_text

    rng = np.random.default_rng(0)
    ff = lambda v: f"{v:.4g}"  # noqa: E731
    for _ in range(200):
        recs = [{"layer": str(rng.choice(["fc1", "all", "features.0.conv", "x" * int(rng.integers(1, 20)), "é"])),
                 "bit": int(rng.integers(-1, 32)), "big": int(rng.integers(-10 ** 9, 10 ** 9)),
                 "rate": float(rng.choice([np.nan, np.inf, -np.inf, 0.0, 1.0, rng.random(), 1e-7, 12345.678])),
                 "m": float(rng.random() * 10.0 ** int(rng.integers(-20, 20))), "neg": -float(rng.random()),
                 "nan": float("nan")} for _ in range(int(rng.integers(1, 6)))]
        df = pd.DataFrame(recs)
        assert to_text(recs, ff) == df.to_string(index=False, float_format=ff)
        assert json.dumps(json_records(recs)) == json.dumps(json.loads(df.to_json(orient="records")))
    values = np.concatenate([rng.random(3000) * 10.0 ** rng.integers(-20, 20, 3000), -rng.random(500),
                             np.round(rng.random(500), 11), [0.0, -0.0, 1e-15, 1e16, 1e16 - 1, 0.5, 5e-11, 1.5e-10]])
    ref = json.loads(pd.DataFrame({"v": values}).to_json(orient="records"))
    assert [_json_float(float(v)) for v in values] == [r["v"] for r in ref]


def test_inject_command_imports_no_pandas(tmp_path: Path) -> None:
    """``hwrel inject`` on the engine's single-bit-fault path: no pandas (nor pyarrow without
    ``--out``), and the same output as the DataFrame path."""
    import subprocess

    code = ("import sys; from hwrel.cli import main; rc = main(sys.argv[1:]); "
            "print('HEAVY', rc, sorted(m for m in ('pandas', 'pyarrow', 'pyarrow.compute') if m in sys.modules))")
    base = [sys.executable, "-c", code, "inject", "digits-mlp", "--count", "300", "--inputs", "32", "--no-progress"]
    plain = subprocess.run(base, capture_output=True, text=True, check=True).stdout
    assert plain.splitlines()[-1] == "HEAVY 0 []", plain[-500:]
    out = subprocess.run(base + ["--out", str(tmp_path / "r.parquet"), "--json"], capture_output=True, text=True,
                         check=True).stdout
    assert out.splitlines()[-1] == "HEAVY 0 ['pyarrow']", out[-500:]
    info = json.loads(out[: out.rindex("HEAVY")])
    df = pd.read_parquet(tmp_path / "r.parquet")
    assert info["summary"] == json.loads(C.summarize(df).to_json(orient="records"))
    from hwrel.cli.tables import to_text

    text = C.summarize(df).to_string(index=False, float_format=lambda v: f"{v:.4g}")
    assert to_text(C.summary_records(C.summarize(df)), lambda v: f"{v:.4g}") == text
    assert text in plain
