"""Fault models for the bounds: what a failed neuron or synapse transmits (theory section 1)."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from hwrel.errors import HwrelError

KINDS = ("crash", "byzantine", "synapse-crash", "synapse-byzantine")
MODES = ("safe", "paper")


@dataclass(frozen=True)
class FaultModel:
    """A failure mode.

    Attributes:
        kind: ``"crash"`` (a neuron transmits 0), ``"byzantine"`` (any value ``|v| <= capacity``),
            ``"synapse-crash"`` / ``"synapse-byzantine"`` (the same, per synapse).
        capacity: the synaptic transmission capacity ``C`` for Byzantine faults.
        mode: per-failure error of a Byzantine fault: ``"safe"`` uses ``C + sup|y|`` (always
            sound); ``"paper"`` uses ``C`` as the paper does, sound only when correct values and
            Byzantine values both lie in ``[0, C]``.
    """

    kind: str = "crash"
    capacity: float | None = None
    mode: str = "safe"

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise HwrelError(f"unknown fault {self.kind!r}; expected one of {', '.join(KINDS)}")
        if self.mode not in MODES:
            raise HwrelError(f"unknown Byzantine mode {self.mode!r}; expected 'safe' or 'paper'")
        if self.byzantine:
            if self.capacity is None:
                raise HwrelError(f"fault {self.kind!r} needs capacity=C (the largest |value| it may send)")
            if not (isinstance(self.capacity, (int, float)) and math.isfinite(self.capacity) and self.capacity >= 0):
                raise HwrelError(f"capacity must be a finite number >= 0, got {self.capacity!r}")

    @property
    def synapse(self) -> bool:
        return self.kind.startswith("synapse")

    @property
    def byzantine(self) -> bool:
        return self.kind.endswith("byzantine")

    def delta(self, sup_abs: Tensor) -> Tensor:
        """Per-failure error bound given ``sup |y|`` of the correct value (same shape)."""
        if not self.byzantine:
            return sup_abs
        if self.mode == "paper":
            return torch.full_like(sup_abs, float(self.capacity))
        return sup_abs + float(self.capacity)

    def describe(self) -> str:
        if not self.byzantine:
            return self.kind
        return f"{self.kind} (C={self.capacity}, {self.mode} per-failure error)"


def as_fault(fault: "str | FaultModel", capacity: float | None = None, mode: str = "safe") -> FaultModel:
    if isinstance(fault, FaultModel):
        return fault
    if not isinstance(fault, str):
        raise HwrelError(f"fault must be a string or FaultModel, got {type(fault).__name__}")
    return FaultModel(fault, capacity, mode)
