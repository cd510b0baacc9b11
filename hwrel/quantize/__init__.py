"""Quantization as a bounded Byzantine perturbation, predicted and verified.

- :func:`predict_quantization_error`: per bit width, sound bounds on the output change by every
  method (paper, weight-aware, interval), certified accuracy, estimates, optionally search and
  Brevitas measurements.
- :func:`safe_bitwidth`: the smallest width meeting an accuracy-drop or output-error budget, by
  certified / adversarial / estimated / measured reasoning, with a per-layer mixed-precision option.
- :func:`ptq`: Brevitas post-training quantization (used for verification and by ``hwrel inject``).
"""
from __future__ import annotations

from hwrel.quantize.bitwidth import BitwidthResult, safe_bitwidth
from hwrel.quantize.brevitas_ptq import ptq, qat
from hwrel.quantize.predict import Predictor
from hwrel.quantize.rounding import BITS, QuantSpec, weight_radius, weight_storage
from hwrel.quantize.safe import predict_quantization_error

__all__ = ["BITS", "BitwidthResult", "Predictor", "QuantSpec", "predict_quantization_error", "ptq", "qat",
           "safe_bitwidth", "weight_radius", "weight_storage"]
