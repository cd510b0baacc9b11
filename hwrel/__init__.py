"""hwrel: hardware reliability and quantization analysis for neural networks."""
from __future__ import annotations

__version__ = "0.1.0"

from hwrel.errors import HwrelError, UnsupportedLayerError
from hwrel.network import Network

__all__ = ["HwrelError", "Network", "UnsupportedLayerError", "__version__"]
