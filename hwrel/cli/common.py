"""Shared pieces of the subcommands: the parser, the model and data options (the same on every
command), value parsing, output paths checked before the work, and printing results."""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import tempfile
from pathlib import Path
from typing import Any, NoReturn

from hwrel.errors import HwrelError

# argparse takes "-1,0" or "-0.5,1" for an option: give the value to the option before it, so
# the value check answers (argparse only treats "-1" and "-.5" alike as values).
_NEGATIVE = re.compile(r"^-(\d|\.\d|inf\b|nan\b)", re.IGNORECASE)


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (plus a pointer to --help) and negative values after an
    option (``--failures -1,0`` reaches the value check instead of "expected one argument")."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._negative_number_matcher = _NEGATIVE

    def error(self, message: str) -> NoReturn:
        print(f"hwrel: error: {message.splitlines()[0] if message else message} "
              f"(see '{self.prog} --help')", file=sys.stderr)
        sys.exit(2)


# ----------------------------------------------------------------------------- value parsing

def fraction(text: str) -> float:
    """argparse type: ``1%`` or ``0.01`` -> 0.01, a fraction in [0, 1)."""
    t = str(text).strip()
    try:
        v = float(t[:-1]) / 100 if t.endswith("%") else float(t)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a fraction like 0.01 or a percentage like 1%, got {text!r}") from None
    if not (math.isfinite(v) and 0 <= v < 1):
        raise argparse.ArgumentTypeError(f"must lie in [0, 1) (or 0%..100%), got {text!r}")
    return v


def percent(text: str, what: str) -> float:
    """``1%`` or ``0.01`` as a number (the analysis checks its range and names the entry)."""
    t = str(text).strip()
    try:
        return float(t[:-1]) / 100 if t.endswith("%") else float(t)
    except ValueError:
        raise HwrelError(f"{what} must be numbers like 0.01 or 1%, got {text!r}") from None


def _ints(text: str, what: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise HwrelError(f"{what} must be comma-separated integers, got {text!r}") from None


def parse_counts(text: str, what: str = "--failures") -> list[int]:
    vals = _ints(text, what)
    if any(v < 0 for v in vals):
        raise HwrelError(f"{what} must be non-negative, got {text!r}")
    return list(vals)


# ----------------------------------------------------------------------------- model and data

MODEL_HELP = ("a built-in model (see `hwrel models`), a torch.export program (.pt2), a state dict "
              "(.pt, read weights_only) or .safetensors file with --architecture, or a Hugging "
              "Face model folder (config.json + model.safetensors)")


def add_model_args(p: argparse.ArgumentParser, default: str | None = None) -> None:
    """MODEL plus the model and data options every analysing command takes."""
    if default is not None:
        p.add_argument("model", nargs="?", default=default, metavar="MODEL",
                       help=f"{MODEL_HELP} (default {default})")
    else:
        p.add_argument("model", metavar="MODEL", help=MODEL_HELP)
    g = p.add_argument_group("model and data (the same on every command)")
    g.add_argument("--architecture", default=None, metavar="ARCH",
                   help="architecture of a state-dict or .safetensors MODEL: a built-in one "
                        "(e.g. digits-mlp) or your nn.Module class as package.module:ClassName "
                        "(or path/to/file.py:ClassName)")
    g.add_argument("--architecture-args", default=None, metavar="JSON",
                   help="arguments of your class, a JSON object of keyword arguments (or a list "
                        "of positional ones), e.g. '{\"hidden\": 16}'")
    g.add_argument("--trust-pickle", action="store_true",
                   help="allow loading a fully pickled nn.Module (runs code from the file: only "
                        "for files you trust)")
    g.add_argument("--data", default=None, metavar="FILE",
                   help="test inputs and labels: .npz, .pt, .safetensors (arrays x and y), .csv "
                        "or .parquet (one row per input; see --label-column); default: a "
                        "built-in model's test split")
    g.add_argument("--label-column", default=None, metavar="NAME",
                   help="the labels' column (.csv/.parquet) or array name in --data (default: "
                        "label, y, target, ...)")
    g.add_argument("--calibration", default=None, metavar="FILE",
                   help="inputs that calibrate quantization (default: the test data)")
    g.add_argument("--input-domain", default=None, metavar="LO,HI",
                   help="the input box every certified number holds over (default: a built-in "
                        "model's own, else the range of --data, else 0,1)")
    g.add_argument("--input-shape", default=None, metavar="SHAPE",
                   help="per-sample input shape, e.g. 1,28,28 (default: the model's or the "
                        "data's)")


def load(args: argparse.Namespace):
    """The :class:`hwrel.data.ModelData` the options describe (model, data, input domain)."""
    from hwrel.data import load_data, prepare
    from hwrel.loading import load_model

    model = load_model(args.model, architecture=args.architecture,
                       architecture_args=args.architecture_args, trust_pickle=args.trust_pickle)
    data = load_data(args.data, label_column=args.label_column) if args.data else None
    if args.label_column is not None and data is None and args.calibration is None:
        raise HwrelError("--label-column names a column of --data; give --data FILE")
    calibration = (load_data(args.calibration, label_column=args.label_column, labels=False)
                   if args.calibration else None)
    shape = _ints(args.input_shape, "--input-shape") if args.input_shape else None
    return prepare(model, data, calibration=calibration, input_domain=args.input_domain,
                   input_shape=shape)


def load_network(args: argparse.Namespace):
    """``(model data, network)``."""
    md = load(args)
    return md, md.network()


def model_options(args: argparse.Namespace) -> list[str]:
    """The model and data options as given (``--name=value``, so a value may start with '-'),
    for a command line that reproduces the run."""
    out = [f"--{opt.replace('_', '-')}={getattr(args, opt)}"
           for opt in ("architecture", "architecture_args", "data", "label_column", "calibration",
                       "input_domain", "input_shape") if getattr(args, opt, None) is not None]
    return out + (["--trust-pickle"] if getattr(args, "trust_pickle", False) else [])


# ----------------------------------------------------------------------------- output paths

def check_writable(path: str, what: str, *, folder: bool = False) -> None:
    """Fail now, in one line, if ``path`` (a file, or with ``folder`` a folder that may not exist
    yet) cannot be written: before the work, not after it."""
    p = Path(path)
    if folder and p.exists() and not p.is_dir():
        raise HwrelError(f"{what} {p}: exists and is not a folder")
    if not folder and p.is_dir():
        raise HwrelError(f"{what} {p}: is a folder, expected a file name")
    probe = p if folder and p.is_dir() else p.parent
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent  # the folder will be created below its nearest existing ancestor
    if not probe.is_dir():
        raise HwrelError(f"{what} {p}: {probe} is not a folder")
    try:
        fd, tmp = tempfile.mkstemp(dir=probe, prefix=".hwrel-write-check-")
    except OSError as exc:
        raise HwrelError(f"{what} {p}: cannot write there ({exc.strerror or exc})") from None
    os.close(fd)
    os.unlink(tmp)


# ----------------------------------------------------------------------------- output

def _clean(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None if math.isnan(obj) else ("inf" if obj > 0 else "-inf")
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if hasattr(obj, "item") and callable(obj.item):
        try:
            return _clean(obj.item())
        except (ValueError, RuntimeError):
            pass
    return obj


def print_json(payload: Any) -> None:
    """Strict JSON (NaN -> null, inf -> "inf") on stdout."""
    print(json.dumps(_clean(payload), indent=2))


def model_info(md: Any) -> dict[str, Any]:
    """What every command's JSON says about the model and its data."""
    return {"model": md.name, "model_kind": md.model.kind,
            "input_shape": list(md.input_shape) if md.input_shape is not None else None,
            "input_domain": list(md.input_domain), "input_domain_source": md.domain_source,
            "data": md.data_source, "inputs": None if md.x is None else int(md.x.shape[0]),
            "test_accuracy": md.accuracy}
