"""hwrel: hardware reliability and quantization analysis for neural networks.

The Python API is the real interface (the ``hwrel`` command is a thin layer over it):

- :class:`Network` (``Network.from_module``): the analysable form of a PyTorch/Brevitas model.
- :func:`fep`, :func:`tolerance`, :func:`certified_accuracy`: certified bounds under neuron and
  synapse failures (Forward Error Propagation and tighter sound bounds).
- :func:`inject`: exact fault injection (campaigns: :mod:`hwrel.inject`).
- :func:`build_report`: the reliability report.
- :func:`safe_bitwidth`: quantization as a bounded perturbation, predicted and verified.
- :mod:`hwrel.seu`: accelerators, soft errors, FIT and mission reliability.
- :func:`boosting`, :func:`expected_error`: the paper's other applications.
- :mod:`hwrel.models`: built-in reference models.
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

from hwrel.bounds import BoundResult, FaultModel, fep, fep_table
from hwrel.bounds.certify import CertifiedResult, certified_accuracy
from hwrel.bounds.tolerance import ToleranceResult, tolerance
from hwrel.errors import HwrelError, UnsupportedLayerError
from hwrel.network import Network

# Functions named like their modules are imported eagerly: importing the submodule later would
# otherwise replace the attribute `hwrel.boosting` by the module.
from hwrel.boosting import boosting  # noqa: E402
from hwrel.expected import expected_error  # noqa: E402
from hwrel.inject import inject  # noqa: E402

# Heavier parts load on first use: `hwrel.inject(...)` imports hwrel.inject only when called.
_LAZY = {
    "safe_bitwidth": ("hwrel.quantize", "safe_bitwidth"),
    "seu_analysis": ("hwrel.seu.analysis", "seu_analysis"),
    "build_report": ("hwrel.report", "build_report"),
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    if name in ("models", "seu", "formats", "quantize", "report"):
        return importlib.import_module(f"hwrel.{name}")
    raise AttributeError(f"module 'hwrel' has no attribute {name!r}")


__all__ = sorted([
    "BoundResult", "CertifiedResult", "FaultModel", "HwrelError", "Network", "ToleranceResult",
    "UnsupportedLayerError", "__version__", "boosting", "build_report", "certified_accuracy", "expected_error", "fep",
    "fep_table", "inject", "safe_bitwidth", "tolerance",
])
