"""The user's data: test inputs and labels from a file, fitted to a model, and the input domain.

:func:`load_data` reads ``.npz``, ``.pt`` (``weights_only``), ``.safetensors``, ``.csv`` and
``.parquet`` files. Array files hold two arrays, inputs and labels, found by name (``x`` /
``inputs`` / ``X`` / ``data`` / ``features`` / ``images`` and ``y`` / ``labels`` / ``label`` /
``targets`` / ``target``; ``label_column`` names the labels explicitly); a ``.pt`` file may also
hold an ``(inputs, labels)`` pair. Tables (``.csv``, ``.parquet``) have one row per input: the
label column (``label_column``, else one named ``label``, ``labels``, ``y``, ``target`` or
``class``) and numeric feature columns.

:func:`prepare` fits data to a loaded model (:mod:`hwrel.loading`): per-sample shape (a flat row
is reshaped to the model's input shape), a forward pass that must accept it, labels that must be
class indices of the model's outputs, and the input domain every certified number is proven over:
the given one, a built-in model's own, or by default the range of the test inputs, and the result
says which (:attr:`ModelData.domain_note`).
"""
from __future__ import annotations

import math
import os
import pickle
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from hwrel.errors import HwrelError, UnsupportedLayerError
from hwrel.loading import LoadedModel, _first_line

INPUT_KEYS = ("x", "inputs", "input", "X", "data", "features", "images")
LABEL_KEYS = ("y", "labels", "label", "targets", "target", "Y")
LABEL_COLUMNS = ("label", "labels", "y", "target", "class")
FORMATS = (".npz", ".pt", ".pth", ".safetensors", ".csv", ".parquet")


@dataclass(frozen=True, eq=False)
class Dataset:
    """Inputs (float32, one row per sample) and labels (int64 class indices, or None) read from
    ``path`` (None for tensors given directly)."""

    x: Tensor
    y: Tensor | None
    path: Path | None = None

    @property
    def where(self) -> str:
        return f"data file {self.path}" if self.path is not None else "data"


def load_data(path: str | os.PathLike[str], *, label_column: str | None = None,
              labels: bool = True) -> Dataset:
    """Read inputs and labels from ``path``. ``labels=False`` (calibration data) reads inputs
    only and leaves out a label column or array if there is one (``label_column`` or a usual
    name)."""
    p = Path(path)
    if not p.is_file():
        raise HwrelError(f"data file {p}: not found")
    suffix = p.suffix.lower()
    if suffix in (".csv", ".parquet"):
        x, y = _table(p, label_column, labels)
    elif suffix in (".npz", ".pt", ".pth", ".safetensors"):
        x, y = _arrays(p, _read_arrays(p, suffix), label_column, labels)
    else:
        raise HwrelError(f"data file {p}: unknown format '{p.suffix}' (use {', '.join(FORMATS)})")
    return Dataset(_inputs(x, p), _labels(y, p) if y is not None else None, p)


def _read_arrays(p: Path, suffix: str) -> Any:
    try:
        if suffix == ".npz":
            with np.load(p, allow_pickle=False) as f:
                return {k: f[k] for k in f.files}
        if suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(p), device="cpu")
        return torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise HwrelError(f"data file {p}: holds pickled Python objects or is corrupt; save "
                         "tensors (a dict of tensors) instead") from None
    except Exception as exc:
        raise HwrelError(f"data file {p}: unreadable ({_first_line(exc)})") from None


def _pick(keys: list[str], wanted: tuple[str, ...]) -> str | None:
    return next((k for k in wanted if k in keys), None)


def _arrays(p: Path, obj: Any, label_column: str | None, labels: bool) -> tuple[Any, Any]:
    if isinstance(obj, (tuple, list)) and len(obj) in (1, 2):
        if label_column is not None:
            raise HwrelError(f"data file {p}: holds an (inputs, labels) pair, not named arrays; "
                             "--label-column does not apply")
        if labels and len(obj) == 1:
            raise HwrelError(f"data file {p}: holds inputs only, no labels")
        return obj[0], (obj[1] if labels and len(obj) == 2 else None)
    if isinstance(obj, (Tensor, np.ndarray)):
        if labels:
            raise HwrelError(f"data file {p}: holds one array (inputs only); save inputs and "
                             "labels, e.g. as {'x': inputs, 'y': labels}")
        return obj, None
    if not isinstance(obj, Mapping) or not obj:
        raise HwrelError(f"data file {p}: expected named arrays (inputs and labels), got "
                         f"{type(obj).__name__}")
    keys = [str(k) for k in obj]
    if labels and label_column is not None and label_column not in keys:
        raise HwrelError(f"data file {p}: no array '{label_column}' (--label-column); it holds "
                         f"{', '.join(keys)}")
    ykey = label_column if label_column in keys else _pick(keys, LABEL_KEYS)
    rest = [k for k in keys if k != ykey]
    xkey = _pick(rest, INPUT_KEYS) or (rest[0] if len(rest) == 1 else None)
    if xkey is None:
        raise HwrelError(f"data file {p}: which array holds the inputs? name it one of "
                         f"{', '.join(INPUT_KEYS)} (it holds {', '.join(keys)})")
    if labels and ykey is None:
        raise HwrelError(f"data file {p}: no labels array (named one of {', '.join(LABEL_KEYS)},"
                         f" or say which with --label-column); it holds {', '.join(keys)}")
    return obj[xkey], (obj[ykey] if labels else None)


def _table(p: Path, label_column: str | None, labels: bool) -> tuple[Any, Any]:
    import pandas as pd

    try:
        df = pd.read_csv(p) if p.suffix.lower() == ".csv" else pd.read_parquet(p)
    except Exception as exc:
        raise HwrelError(f"data file {p}: unreadable ({_first_line(exc)})") from None
    cols = [str(c) for c in df.columns]
    df.columns = cols
    shown = ", ".join(cols) if len(cols) <= 8 else \
        f"{', '.join(cols[:4])}, ..., {', '.join(cols[-3:])} ({len(cols)} columns)"
    if labels and label_column is not None and label_column not in cols:
        raise HwrelError(f"data file {p}: no label column '{label_column}' (--label-column); "
                         f"columns: {shown}")
    ycol = label_column if label_column in cols else _pick(cols, LABEL_COLUMNS)
    if labels and ycol is None:
        raise HwrelError(f"data file {p}: no label column (looked for "
                         f"{', '.join(LABEL_COLUMNS)}); name it with --label-column; "
                         f"columns: {shown}")
    features = df.drop(columns=[ycol]) if ycol is not None else df
    if features.shape[1] == 0:
        raise HwrelError(f"data file {p}: no input columns besides the label column '{ycol}'")
    bad = [c for c in features.columns if not pd.api.types.is_numeric_dtype(features[c])
           or pd.api.types.is_bool_dtype(features[c])]
    if bad:
        raise HwrelError(f"data file {p}: input column '{bad[0]}' is not numeric")
    return features.to_numpy(dtype=np.float64), (df[ycol].to_numpy() if labels else None)


def _inputs(x: Any, p: Path | None) -> Tensor:
    where = f"data file {p}" if p is not None else "data"
    try:
        t = torch.as_tensor(np.array(x) if not isinstance(x, Tensor) else x)
    except Exception as exc:
        raise HwrelError(f"{where}: inputs are not a numeric array ({_first_line(exc)})") from None
    if t.dtype == torch.bool or t.is_complex():
        raise HwrelError(f"{where}: inputs must be real numbers, got {t.dtype}")
    if t.dim() < 2 or t.shape[0] == 0:
        raise HwrelError(f"{where}: inputs must be a non-empty batch, one row per sample "
                         f"(got shape {tuple(t.shape)})")
    if not t.is_floating_point() and t.dim() == 2:
        return t.to(torch.int64).contiguous()  # (B, T) token ids of a language model
    t = t.to(torch.float32)
    if not bool(torch.isfinite(t).all()):
        row = int((~torch.isfinite(t.flatten(1))).any(1).nonzero()[0])
        raise HwrelError(f"{where}: input {row} holds NaN or infinity")
    return t.contiguous()


def _labels(y: Any, p: Path | None) -> Tensor:
    where = f"data file {p}" if p is not None else "data"
    try:
        t = torch.as_tensor(np.array(y) if not isinstance(y, Tensor) else y)
    except Exception as exc:
        raise HwrelError(f"{where}: labels are not a numeric array ({_first_line(exc)})") from None
    if t.dim() == 2 and t.shape[1] == 1:
        t = t[:, 0]
    if t.dim() not in (1, 2):
        raise HwrelError(f"{where}: labels must be one class index per input (or, for a language "
                         f"model, (B, T - 1) next tokens), got shape {tuple(t.shape)}")
    if t.dtype == torch.bool or t.is_complex():
        raise HwrelError(f"{where}: labels must be class indices (integers), got {t.dtype}")
    if t.is_floating_point():
        bad = ~torch.isfinite(t) | (t != t.round())
        if bool(bad.any()):
            row = int(bad.nonzero()[0])
            raise HwrelError(f"{where}: labels must be class indices (integers); label {row} is "
                             f"{t[row].item():g}")
    return t.to(torch.int64)


# ------------------------------------------------------------------------------ model and data

@dataclass(frozen=True, eq=False)
class ModelData:
    """A model with the data it is analysed on.

    ``x``, ``y``: test inputs (of ``input_shape``) and labels, or None without data.
    ``calibration``: inputs that calibrate quantization (default: the test inputs; a built-in
    model's training split when it brings its own data). ``train``: ``(x, y)`` for fine-tuning
    (a built-in model's training split), else None. ``input_domain``: the box ``[lo, hi]`` of
    every input (all certified numbers hold over it); ``domain_source`` says where it came from.
    ``outputs``: the model's number of outputs (classes).
    """

    model: LoadedModel
    module: nn.Module
    input_shape: tuple[int, ...] | None
    input_domain: tuple[float, float]
    domain_source: str
    x: Tensor | None = None
    y: Tensor | None = None
    data_source: str | None = None
    calibration: Tensor | None = None
    train: tuple[Tensor, Tensor] | None = None
    outputs: int | None = None
    _net: dict = field(default_factory=dict, repr=False)

    @property
    def name(self) -> str:
        return self.model.name

    @property
    def domain_note(self) -> str:
        lo, hi = self.input_domain
        return f"input domain [{lo:.6g}, {hi:.6g}]: {self.domain_source}"

    @property
    def accuracy(self) -> float | None:
        """Measured top-1 accuracy of the model on the test data (a fraction), None without labels."""
        if self.y is None:
            return None
        if "accuracy" not in self._net:
            with torch.no_grad():
                outs = [self.module(xb) for xb in self.x.split(1024)]
            # a language model's: next-token top-1 at every position that has a next token
            pred = torch.cat([o[:, :-1].argmax(-1) if o.dim() == 3 else o.argmax(1) for o in outs])
            self._net["accuracy"] = float((pred == self.y).double().mean())
        return self._net["accuracy"]

    def labelled(self, what: str) -> tuple[Tensor, Tensor]:
        """``(x, y)``, or a one-line error saying that ``what`` needs labelled test data."""
        if self.x is None or self.y is None:
            raise HwrelError(f"{what} needs labelled test data for model {self.name}: give "
                             "--data FILE (inputs and labels; .npz, .pt, .safetensors, .csv, "
                             ".parquet) or, from Python, data=(inputs, labels)")
        return self.x, self.y

    def network(self):
        """The analysable :class:`hwrel.network.Network` over :attr:`input_domain` (built once)."""
        if "net" not in self._net:
            from hwrel.network import Network

            try:
                net = Network.from_module(self.module, self.input_domain, self.input_shape)
            except UnsupportedLayerError as exc:
                raise HwrelError(unsupported_message(self.name, str(exc))) from None
            except HwrelError as exc:
                msg = str(exc)
                if "input_shape is required" in msg:
                    msg += " (CLI: --input-shape, or --data whose inputs have the shape)"
                raise HwrelError(f"model {self.name} cannot be analysed: {msg}") from None
            except Exception as exc:  # tracing arbitrary user code: one line, no traceback
                raise HwrelError(f"model {self.name} cannot be analysed: "
                                 f"{_first_line(exc)}") from None
            self._net["net"] = net
        return self._net["net"]


def unsupported_message(name: str, msg: str) -> str:
    """One line for an operation the bounds have no rule for (injection still runs on it)."""
    first = msg.strip().splitlines()[0] if msg.strip() else msg
    tail = " is not supported"
    what = (f"the bounds do not support {first[: -len(tail)]} yet" if first.endswith(tail)
            else f"the bounds do not support it yet ({first})")
    return (f"model {name} cannot be analysed: {what}; hwrel inject, seu, bitwidth and report measure it "
            "through the exact general injection path")


def parse_domain(text: str | tuple | None) -> tuple[float, float] | None:
    """``"lo,hi"`` (or a pair) as two finite floats with lo < hi."""
    if text is None:
        return None
    try:
        lo, hi = (float(v) for v in (text.split(",") if isinstance(text, str) else text))
    except (ValueError, TypeError):
        raise HwrelError(f"--input-domain must be lo,hi, e.g. 0,1 or -1,1; got {text!r}") from None
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise HwrelError(f"--input-domain must be finite with lo < hi, got {text!r}")
    return lo, hi


def _as_dataset(data: Any, what: str, labels: bool) -> Dataset | None:
    if data is None or isinstance(data, Dataset):
        return data
    if isinstance(data, (str, os.PathLike)):
        return load_data(data, labels=labels)
    if isinstance(data, (tuple, list)) and labels and len(data) == 2:
        return Dataset(_inputs(data[0], None), _labels(data[1], None))
    if not labels and not isinstance(data, (tuple, list)):
        return Dataset(_inputs(data, None), None)
    raise HwrelError(f"{what}: expected a file, a Dataset or "
                     f"{'(inputs, labels)' if labels else 'an inputs tensor'}")


def _fit_shape(x: Tensor, shape: tuple[int, ...] | None, where: str, name: str) -> Tensor:
    if shape is None or tuple(x.shape[1:]) == tuple(shape):
        return x
    if x[0].numel() == math.prod(shape):
        return x.reshape(x.shape[0], *shape)  # e.g. a flat CSV row for an image model
    raise HwrelError(f"{where}: inputs of shape {tuple(x.shape[1:])} per sample do not fit model "
                     f"{name}, which takes {tuple(shape)}")


def _outputs(module: nn.Module, x: Tensor, where: str, name: str) -> int:
    try:
        with torch.no_grad():
            out = module(x[:2])
    except Exception as exc:
        raise HwrelError(f"{where}: inputs of shape {tuple(x.shape[1:])} per sample do not fit "
                         f"model {name} ({_first_line(exc)})") from None
    if is_language_model(x, out):
        return int(out.shape[2])
    if not isinstance(out, Tensor) or out.dim() != 2 or out.shape[0] != min(2, x.shape[0]):
        got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise HwrelError(f"model {name}: output {got} is not one row of scores per input, nor "
                         "(B, T, vocab) next-token logits of (B, T) integer tokens")
    return int(out.shape[1])


def is_language_model(x: Tensor, out: Any) -> bool:
    """Whether ``out = model(x)`` reads as a causal language model's: ``(B, T)`` integer tokens in,
    ``(B, T, vocab)`` logits out (harm is then measured by next-token agreement)."""
    return (isinstance(out, Tensor) and out.dim() == 3 and x.dim() == 2 and not x.is_floating_point()
            and tuple(out.shape[:2]) == (min(2, x.shape[0]), x.shape[1]))


def prepare(model: LoadedModel, data: Any = None, *, calibration: Any = None,
            input_domain: str | tuple[float, float] | None = None,
            input_shape: tuple[int, ...] | None = None) -> ModelData:
    """Fit ``data`` (a file, a :class:`Dataset` or ``(inputs, labels)``) and ``calibration``
    (a file or inputs) to ``model`` and fix the input domain (see the module docstring).

    Raises a one-line :class:`HwrelError` naming the data file when the inputs do not fit the
    model, labels are not class indices of its outputs, or inputs leave the input domain.
    """
    ds = _as_dataset(data, "data", True)
    cal = _as_dataset(calibration, "calibration", False)
    ref = model.reference
    shape = tuple(int(d) for d in input_shape) if input_shape is not None else model.input_shape
    if ref is not None and input_shape is not None and tuple(shape) != tuple(ref.input_shape):
        raise HwrelError(f"--input-shape {tuple(shape)}: the built-in model {model.name} takes "
                         f"{tuple(ref.input_shape)}")
    x = y = None
    source = None
    if ds is not None:
        x = _fit_shape(ds.x, shape, ds.where, model.name)
        shape = tuple(x.shape[1:])
        y, source = ds.y, str(ds.path) if ds.path is not None else "data"
    elif ref is not None:
        x, y, source = ref.x_test, ref.y_test, f"the built-in {model.name} test split"
    # token ids in the data: an integer export; no data: the model's own input type
    dtype = None if x is None else (x.dtype if not x.is_floating_point() else torch.float32)
    module = model.module_for(shape, dtype) if shape is not None else model.module
    outputs = None
    where = ds.where if ds is not None else "data"
    if x is not None:
        outputs = _outputs(module, x, where, model.name)
        if y is not None:
            if len(y) != len(x):
                raise HwrelError(f"{where}: {len(x)} inputs but {len(y)} labels")
            lm = x.dim() == 2 and not x.is_floating_point() and y.dim() == 2
            if lm and tuple(y.shape) != (x.shape[0], x.shape[1] - 1):
                raise HwrelError(f"{where}: next-token labels must be (B, T - 1) = "
                                 f"{(x.shape[0], x.shape[1] - 1)}, got {tuple(y.shape)}")
            bad = (y < 0) | (y >= outputs)
            if bool(bad.any()):
                first = bad.nonzero()[0]
                row = int(first[0])
                if lm:
                    raise HwrelError(f"{where}: label {int(y[tuple(first)])} (input {row}) is not a token "
                                     f"of model {model.name}, whose vocabulary is 0..{outputs - 1}")
                raise HwrelError(f"{where}: label {int(y[row])} (input {row}) is not a class of "
                                 f"model {model.name}, whose {outputs} outputs are classes "
                                 f"0..{outputs - 1}")
    calib = None
    if cal is not None:
        calib = _fit_shape(cal.x, shape, cal.where, model.name)
        _outputs(module, calib, cal.where, model.name)
    elif ds is None and ref is not None:
        calib = ref.x_train[:512]
    else:
        calib = x
    given = parse_domain(input_domain)
    if given is not None:
        domain, why = given, "given by --input-domain"
    elif ref is not None:
        domain, why = tuple(ref.input_domain), f"the input domain of the built-in model {model.name}"
    elif x is not None:
        domain = (float(x.min()), float(x.max()))
        if domain[0] == domain[1]:
            raise HwrelError(f"{where}: every input value is {domain[0]:g}; give the input domain "
                             "with --input-domain")
        why = f"the range of the test inputs in {source} (set another with --input-domain)"
    else:
        domain, why = (0.0, 1.0), "the default, no data given (set it with --input-domain)"
    if x is not None:
        lo, hi = float(x.min()), float(x.max())
        if lo < domain[0] - 1e-6 or hi > domain[1] + 1e-6:
            raise HwrelError(f"{where}: inputs range over [{lo:.6g}, {hi:.6g}], outside the input "
                             f"domain [{domain[0]:g}, {domain[1]:g}] ({why.split(' (')[0]})")
    train = (ref.x_train, ref.y_train) if ref is not None and ds is None else None
    return ModelData(model, module, shape, (float(domain[0]), float(domain[1])), why, x, y,
                     source, calib, train, outputs)


__all__ = ["Dataset", "FORMATS", "ModelData", "load_data", "parse_domain", "prepare"]
