"""Fault descriptions for exact injection: one frozen :class:`Fault` per faulty site.

A *fault configuration* is a list or tuple of faults applied simultaneously (a single ``Fault`` is
a configuration of one). Faults name layers by the node names of :class:`hwrel.network.Network`
(module paths, e.g. ``"0"`` or ``"block1.conv2"``); they are checked against a network by
:class:`hwrel.inject.engine.Injector`, which raises :class:`hwrel.errors.HwrelError` with one line
naming the layer, index or bit of the first bad fault.

Sites and kinds:

* ``neuron``: ``layer`` is a hidden-layer activation node, ``index`` a flat index into its
  per-sample output. ``crash`` transmits 0; ``stuck``/``byzantine`` transmit ``value``; ``bitflip``
  flips bit ``bit`` of the activation stored in ``format`` (a float format, default ``fp32``):
  a transient fault, a different old value per sample.
* ``synapse``: ``layer`` is an affine node, ``index`` a flat index into its weight tensor (the
  synapse's weight ``W_ji``), ``source`` the flat index of the sending neuron in the layer's
  per-sample *input*. The receiver gets ``W_ji * v`` instead of ``W_ji * y_i`` (``crash``: v = 0,
  ``stuck``/``byzantine``: v = ``value``); nothing else changes. Dense layers: ``index = j * n_in +
  i`` and ``source`` (optional) must equal ``i``. Convolutions share a weight over positions, so a
  synapse is a (weight, input position) pair: weight ``(co, ci, a, b)`` and source ``(c, h, w)``
  with ``c`` the input channel of ``ci`` (``groups`` accounted for) connect exactly one receiver,
  ``(co, (h + pad_h - a*dil_h) / stride_h, (w + pad_w - b*dil_w) / stride_w)``, which must be an
  integer position inside the output (else the fault is rejected).
* ``weight``/``bias``: ``index`` is a flat index into the weight or bias tensor; ``bitflip`` inverts
  the bits ``bits`` (or ``bit``) of the stored word, ``stuck0``/``stuck1`` force bit ``bit``. The
  storage format is the layer's (Brevitas layers: their integer codes, scale held fixed; float
  layers: the injector's float format); ``format``, if given, must name the same format.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence, Union

from hwrel.errors import HwrelError
from hwrel.formats import Format

SITES = ("neuron", "synapse", "weight", "bias")
KINDS = {
    "neuron": ("crash", "stuck", "byzantine", "bitflip"),
    "synapse": ("crash", "stuck", "byzantine"),
    "weight": ("bitflip", "stuck0", "stuck1"),
    "bias": ("bitflip", "stuck0", "stuck1"),
}


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) or type(x).__name__ in ("int64", "int32")


@dataclass(frozen=True)
class Fault:
    """One faulty site (see the module docstring for the semantics of each site and kind).

    ``bit`` and ``bits`` are normalised: after construction ``bits`` lists every affected bit
    position (sorted, distinct) and ``bit`` is its first element (or ``None``).
    """

    site: str
    layer: str
    index: int
    kind: str
    bit: int | None = None
    bits: tuple[int, ...] = ()
    value: float | None = None
    source: int | None = None
    format: Union[str, Format, None] = None

    def __post_init__(self) -> None:
        where = f"fault at layer {self.layer!r} index {self.index!r}"
        if self.site not in SITES:
            raise HwrelError(f"{where}: unknown site {self.site!r}; valid sites are {', '.join(SITES)}")
        if self.kind not in KINDS[self.site]:
            raise HwrelError(f"{where}: kind {self.kind!r} is not valid for a {self.site} fault; "
                             f"valid kinds are {', '.join(KINDS[self.site])}")
        if not _is_int(self.index) or int(self.index) < 0:
            raise HwrelError(f"{where}: index must be a non-negative integer")
        object.__setattr__(self, "index", int(self.index))
        bits = tuple(self.bits) + (() if self.bit is None else (self.bit,))
        if any(not _is_int(b) for b in bits):
            raise HwrelError(f"{where}: bit positions must be integers, got {bits!r}")
        bits = tuple(sorted({int(b) for b in bits}))
        needs_bits = self.kind in ("bitflip", "stuck0", "stuck1")
        if needs_bits and not bits:
            raise HwrelError(f"{where}: a {self.kind} fault needs bit= (or bits=)")
        if self.kind in ("stuck0", "stuck1", ) and len(bits) != 1:
            raise HwrelError(f"{where}: a {self.kind} fault takes exactly one bit, got {bits}")
        if self.site == "neuron" and self.kind == "bitflip" and len(bits) != 1:
            raise HwrelError(f"{where}: a neuron bitflip takes exactly one bit, got {bits}")
        if not needs_bits and bits:
            raise HwrelError(f"{where}: a {self.kind} fault takes no bit")
        if any(b < 0 for b in bits):
            raise HwrelError(f"{where}: bit {min(bits)} is negative")
        object.__setattr__(self, "bits", bits)
        object.__setattr__(self, "bit", bits[0] if bits else None)
        if self.kind in ("stuck", "byzantine"):
            try:
                v = float(self.value)  # type: ignore[arg-type]
            except (TypeError, ValueError):
                raise HwrelError(f"{where}: a {self.kind} fault needs a numeric value=, got {self.value!r}") from None
            object.__setattr__(self, "value", v)
        elif self.value is not None:
            raise HwrelError(f"{where}: a {self.kind} fault takes no value")
        if self.source is not None:
            if self.site != "synapse":
                raise HwrelError(f"{where}: source= is only for synapse faults")
            if not _is_int(self.source) or int(self.source) < 0:
                raise HwrelError(f"{where}: source must be a non-negative integer, got {self.source!r}")
            object.__setattr__(self, "source", int(self.source))
        if self.format is not None and not (self.kind == "bitflip" or self.site in ("weight", "bias")):
            raise HwrelError(f"{where}: format= only applies to bit faults")

    @property
    def new_value_is_fixed(self) -> bool:
        """True when every sample sees the same new value (all faults but neuron bit flips)."""
        return not (self.site == "neuron" and self.kind == "bitflip")


FaultConfig = Union[Fault, Sequence[Fault]]


def as_config(config: FaultConfig) -> tuple[Fault, ...]:
    """A configuration as a tuple of faults (a single fault is a configuration of one)."""
    if type(config) is Fault or isinstance(config, Fault):
        return (config,)
    if isinstance(config, (list, tuple)):
        for f in config:
            if not isinstance(f, Fault):
                raise HwrelError(f"a fault configuration holds Fault objects, got {type(f).__name__}")
        if not config:
            raise HwrelError("empty fault configuration")
        return tuple(config)
    raise HwrelError(f"expected a Fault or a list of faults, got {type(config).__name__}")


def finite_or_nan(x: float | None) -> float:
    return math.nan if x is None else float(x)
