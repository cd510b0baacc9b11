"""Shared pieces of the subcommands: loading a model argument and printing results."""
from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from typing import Any

from torch import nn

from hwrel.errors import HwrelError


@dataclass
class LoadedModel:
    module: nn.Module
    reference: Any  # hwrel.models.ReferenceModel or None
    input_shape: tuple[int, ...] | None
    input_domain: tuple[float, float]
    name: str


def add_model_args(p: argparse.ArgumentParser, optional: bool = False) -> None:
    """MODEL (a built-in name or a file) plus the options needed to load and analyse it."""
    if optional:
        p.add_argument("model", nargs="?", default=None, metavar="MODEL",
                       help="built-in reference model name (see `hwrel models`) or a model file")
    else:
        p.add_argument("model", metavar="MODEL",
                       help="built-in reference model name (see `hwrel models`) or a model file "
                            "(.pt2 torch.export program, or a state dict with --architecture)")
    p.add_argument("--architecture", default=None, help="built-in architecture a state-dict file belongs to")
    p.add_argument("--trust-pickle", action="store_true",
                   help="allow loading a fully pickled nn.Module (runs code from the file: only for files you trust)")
    p.add_argument("--input-shape", default=None, help="per-sample input shape for a model file, e.g. 1,28,28")
    p.add_argument("--input-domain", default=None, help="input box lo,hi for a model file (default 0,1)")


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


def load_model(args: argparse.Namespace) -> LoadedModel:
    from hwrel import models

    module, ref = models.resolve_model(args.model, trust_pickle=args.trust_pickle, architecture=args.architecture)
    if ref is not None:
        return LoadedModel(module, ref, tuple(ref.input_shape), tuple(ref.input_domain), ref.name)
    shape = _ints(args.input_shape, "--input-shape") if args.input_shape else None
    domain = (0.0, 1.0)
    if args.input_domain:
        try:
            lo, hi = (float(v) for v in args.input_domain.split(","))
        except ValueError:
            raise HwrelError(f"--input-domain must be lo,hi, got {args.input_domain!r}") from None
        domain = (lo, hi)
    return LoadedModel(module, None, shape, domain, str(args.model))


def load_network(args: argparse.Namespace):
    from hwrel.network import Network

    lm = load_model(args)
    return lm, Network.from_module(lm.module, lm.input_domain, lm.input_shape)


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
