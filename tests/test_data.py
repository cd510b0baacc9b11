"""hwrel.data: every data format reads the same inputs and labels; data is fitted to the model;
the input domain and where it comes from; one-line errors naming the data file."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from hwrel.data import load_data, parse_domain, prepare
from hwrel.errors import HwrelError
from hwrel.loading import load_model

from own_models import OwnModels, build

FORMATS = ["test.npz", "test.pt", "test.safetensors", "test.csv", "test.parquet"]


@pytest.fixture(scope="module")
def own(tmp_path_factory: pytest.TempPathFactory) -> OwnModels:
    return build(tmp_path_factory.mktemp("own-data"))


def _one_line(exc: pytest.ExceptionInfo, *words: str) -> None:
    msg = str(exc.value)
    assert "\n" not in msg, msg
    for w in words:
        assert w in msg, (w, msg)


@pytest.mark.parametrize("name", FORMATS)
def test_every_format_reads_the_same_data(own: OwnModels, name: str) -> None:
    ds = load_data(own.root / name, label_column="digit" if name.endswith(".parquet") else None)
    assert ds.x.dtype == torch.float32 and ds.y.dtype == torch.int64
    assert torch.equal(ds.x, own.x_test) and torch.equal(ds.y, own.y_test)
    calib = load_data(own.root / name, labels=False, label_column="digit" if name.endswith(".parquet") else None)
    assert calib.y is None and torch.equal(calib.x, own.x_test)


def test_default_domain_is_the_data_range_and_says_so(own: OwnModels) -> None:
    md = prepare(load_model(own.root / "tanh.pt2"), load_data(own.root / "test.csv"))
    lo, hi = float(own.x_test.min()), float(own.x_test.max())
    assert md.input_domain == (lo, hi) and "range of the test inputs" in md.domain_note
    assert str(own.root / "test.csv") in md.domain_note
    assert md.outputs == 10 and md.input_shape == (64,)
    assert torch.equal(md.calibration, md.x)  # calibration defaults to the test data
    net = md.network()
    assert float(net.input_lo.min()) == lo and float(net.input_hi.max()) == hi
    md = prepare(load_model(own.root / "tanh.pt2"), load_data(own.root / "test.npz"),
                 input_domain="-1,1", calibration=load_data(own.root / "calib.npz", labels=False))
    assert md.input_domain == (-1.0, 1.0) and "--input-domain" in md.domain_note
    assert md.calibration.shape == (64, 64)
    md = prepare(load_model(own.root / "tanh.pt2"))
    assert md.x is None and md.input_domain == (0.0, 1.0) and "no data" in md.domain_note
    with pytest.raises(HwrelError) as info:
        md.labelled("hwrel bitwidth")
    _one_line(info, "hwrel bitwidth", "--data")


def test_flat_rows_are_reshaped_for_an_image_model(own: OwnModels) -> None:
    md = prepare(load_model(own.root / "cnn.pt2"), load_data(own.root / "test.parquet", label_column="digit"))
    assert md.input_shape == (1, 8, 8) and tuple(md.x.shape) == (len(own.y_test), 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(md.module(md.x), own.cnn(own.x_test.reshape(-1, 1, 8, 8)))


def test_builtin_model_with_own_data_keeps_its_domain(own: OwnModels) -> None:
    lm = load_model("digits-mlp")
    md = prepare(lm, load_data(own.root / "test.npz"))
    assert md.input_domain == (0.0, 1.0) and "built-in" in md.domain_note
    assert md.data_source == str(own.root / "test.npz") and torch.equal(md.x, own.x_test)
    md = prepare(lm)
    assert torch.equal(md.x, lm.reference.x_test) and md.train is not None


def _write(path: Path, x, y=None, **extra) -> Path:
    arrays = {"x": np.asarray(x)}
    if y is not None:
        arrays["y"] = np.asarray(y)
    arrays.update(extra)
    np.savez(path, **arrays)
    return path


def test_bad_data_is_one_line_naming_the_file(own: OwnModels, tmp_path: Path) -> None:
    tanh = load_model(own.root / "tanh.pt2")
    x, y = own.x_test.numpy(), own.y_test.numpy()
    cases = [
        (_write(tmp_path / "wide.npz", np.zeros((4, 65), np.float32), [0, 1, 2, 3]),
         ["wide.npz", "(65,) per sample do not fit model tanh", "(64,)"]),
        (_write(tmp_path / "labels.npz", x, np.where(y == 3, 12, y)),
         ["labels.npz", "label 12", "not a class", "0..9"]),
        (_write(tmp_path / "neg.npz", x, -np.ones_like(y)), ["neg.npz", "label -1"]),
        (_write(tmp_path / "count.npz", x, y[:-1]), ["count.npz", f"{len(y)} inputs but {len(y) - 1} labels"]),
        (_write(tmp_path / "frac.npz", x, y + 0.5), ["frac.npz", "class indices"]),
        (_write(tmp_path / "nan.npz", np.where(np.arange(64) == 5, np.nan, x).astype(np.float32), y),
         ["nan.npz", "input 0 holds NaN"]),
        (_write(tmp_path / "nolabels.npz", x), ["nolabels.npz", "no labels array", "--label-column"]),
    ]
    for path, words in cases:
        with pytest.raises(HwrelError) as info:
            prepare(tanh, load_data(path))
        _one_line(info, *words)
    df = pd.read_csv(own.root / "test.csv")
    df.drop(columns=["label"]).to_csv(tmp_path / "nolabel.csv", index=False)
    with pytest.raises(HwrelError) as info:
        load_data(tmp_path / "nolabel.csv")
    _one_line(info, "nolabel.csv", "no label column", "--label-column", "px0")
    with pytest.raises(HwrelError) as info:
        load_data(own.root / "test.csv", label_column="klass")
    _one_line(info, "test.csv", "no label column 'klass'")
    with pytest.raises(HwrelError) as info:
        load_data(own.root / "test.parquet")
    _one_line(info, "test.parquet", "no label column", "digit")
    assert torch.equal(load_data(own.root / "test.parquet", label_column="digit").y, own.y_test)
    with pytest.raises(HwrelError) as info:
        prepare(tanh, load_data(own.root / "test.npz"), input_domain="0,0.5")
    _one_line(info, "test.npz", "outside the input domain [0, 0.5]")
    (tmp_path / "x.txt").write_text("1,2\n")
    with pytest.raises(HwrelError) as info:
        load_data(tmp_path / "x.txt")
    _one_line(info, "x.txt", "unknown format")
    torch.save({"x": torch.zeros(2, 64), "y": torch.zeros(2), "meta": object()}, tmp_path / "obj.pt")
    with pytest.raises(HwrelError) as info:
        load_data(tmp_path / "obj.pt")
    _one_line(info, "obj.pt", "pickled Python objects")


@pytest.mark.parametrize("text,ok", [("0,1", (0.0, 1.0)), ("-1,1", (-1.0, 1.0)), ("1,0", None),
                                     ("0", None), ("a,b", None), ("0,inf", None)])
def test_parse_domain(text: str, ok) -> None:
    if ok is None:
        with pytest.raises(HwrelError, match="--input-domain"):
            parse_domain(text)
    else:
        assert parse_domain(text) == ok
