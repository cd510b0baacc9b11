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

from hwrel.errors import HwrelError, UnsupportedLayerError

# Everything else loads on first use (``import hwrel`` and the ``hwrel`` command stay free of
# torch until an analysis needs it). ``hwrel.inject`` and ``hwrel.boosting`` name both a function
# and a module: those modules are callable (they forward to the function), so whichever the
# attribute holds, ``hwrel.inject(...)`` and ``hwrel.boosting(...)`` work.
_LAZY = {
    "BoundResult": ("hwrel.bounds", "BoundResult"),
    "FaultModel": ("hwrel.bounds", "FaultModel"),
    "fep": ("hwrel.bounds", "fep"),
    "fep_table": ("hwrel.bounds", "fep_table"),
    "CertifiedResult": ("hwrel.bounds.certify", "CertifiedResult"),
    "certified_accuracy": ("hwrel.bounds.certify", "certified_accuracy"),
    "ToleranceResult": ("hwrel.bounds.tolerance", "ToleranceResult"),
    "tolerance": ("hwrel.bounds.tolerance", "tolerance"),
    "Network": ("hwrel.network", "Network"),
    "boosting": ("hwrel.boosting", "boosting"),
    "expected_error": ("hwrel.expected", "expected_error"),
    "inject": ("hwrel.inject", "inject"),
    "safe_bitwidth": ("hwrel.quantize", "safe_bitwidth"),
    "seu_analysis": ("hwrel.seu.analysis", "seu_analysis"),
    "build_report": ("hwrel.report", "build_report"),
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(module), attr)
        if name in ("inject", "boosting"):  # the import just bound the (callable) module here
            return globals()[name]
        globals()[name] = value
        return value
    if name in ("models", "seu", "formats", "quantize", "report", "bounds", "network", "expected"):
        return importlib.import_module(f"hwrel.{name}")
    raise AttributeError(f"module 'hwrel' has no attribute {name!r}")


__all__ = sorted([
    "BoundResult", "CertifiedResult", "FaultModel", "HwrelError", "Network", "ToleranceResult",
    "UnsupportedLayerError", "__version__", "boosting", "build_report", "certified_accuracy", "expected_error", "fep",
    "fep_table", "inject", "safe_bitwidth", "tolerance",
])
