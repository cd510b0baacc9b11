"""Errors hwrel raises for bad input.

Every user-facing problem is a :class:`HwrelError` whose message is one line that names the
offending thing (file, layer, field or value). The CLI prints it and exits with status 2.
"""
from __future__ import annotations


class HwrelError(ValueError):
    """Bad input to hwrel: one-line message naming the problem."""


class UnsupportedLayerError(HwrelError):
    """A module in the model has no analysis rule."""


def check(condition: bool, message: str) -> None:
    """Raise :class:`HwrelError` with ``message`` unless ``condition`` (never stripped by -O)."""
    if not condition:
        raise HwrelError(message)
