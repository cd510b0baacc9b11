"""Declarative accelerator descriptions: which memories hold which data, and how soft they are.

An accelerator is a TOML file in ``accelerator_models/`` (schema: ``accelerator_models/README.md``).
This module reads and validates those files into frozen dataclasses; it does no neural-network
analysis. Every validation problem is a one-line :class:`~hwrel.errors.HwrelError` that names the
file, the field and the problem.
"""
from __future__ import annotations

import math
import os
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from hwrel.errors import HwrelError
from hwrel.formats import parse_format

CONFIDENCES = ("measured", "verified", "secondary", "assumed")
PROTECTIONS = ("none", "parity", "secded")
HOLDS = ("weights", "activations", "accumulators")
_SLUG = re.compile(r"[a-z0-9]+(-[a-z0-9]+)*")
ENV_DIR = "HWREL_ACCELERATORS"

_TOP_NUMBERS = ("technology_node_nm", "clock_mhz")
_MEMORY_NUMBERS = ("size_bytes", "word_bits", "ser_fit_per_mbit", "ecc_data_bits",
                   "ecc_check_bits", "interleave", "mbu_fraction")
_TOP_KEYS = {"name", "title", "vendor", "technology_node_nm", "clock_mhz", "formats", "sources",
             "confidence", "memory", "notes"}
_MEMORY_KEYS = {"name", "size_bytes", "holds", "word_bits", "protection", "ecc_data_bits",
                "ecc_check_bits", "interleave", "ser_fit_per_mbit", "ser_source", "source",
                "off_chip", "mbu_fraction", "confidence", "notes"}


@dataclass(frozen=True)
class Protection:
    """Error protection of one memory: ``kind`` is "none", "parity" or "secded".

    ``data_bits``/``check_bits`` describe one protected word ((64, 8) for SECDED (72,64); for parity
    ``check_bits`` is 1). ``interleave`` is the physical bit-interleaving degree: adjacent cells
    belong to ``interleave`` different words (1 = no interleaving).
    """

    kind: str
    data_bits: int = 0
    check_bits: int = 0
    interleave: int = 1

    @property
    def word_bits(self) -> int:
        """Stored bits per protected word, data plus check bits."""
        return self.data_bits + self.check_bits

    def describe(self) -> str:
        if self.kind == "secded":
            return f"secded({self.word_bits},{self.data_bits})x{self.interleave}"
        if self.kind == "parity":
            return f"parity/{self.data_bits}b"
        return "none"


@dataclass(frozen=True)
class Memory:
    """One storage structure. ``ser_fit_per_mbit`` is the raw sea-level rate (NYC flux, JESD89A).

    ``confidence`` maps every numeric field present (and optionally ``protection``/``holds``) to
    "verified", "secondary" or "assumed".
    """

    name: str
    size_bytes: int
    holds: tuple[str, ...]
    word_bits: int
    protection: Protection
    ser_fit_per_mbit: float
    ser_source: str
    source: str
    off_chip: bool
    mbu_fraction: float
    confidence: tuple[tuple[str, str], ...]

    @property
    def bits(self) -> int:
        """Data bits stored (ECC check bits not included)."""
        return self.size_bytes * 8

    @property
    def stored_bits(self) -> int:
        """Physical bits including check bits (every one of them can be upset)."""
        p = self.protection
        if p.kind == "none":
            return self.bits
        return math.ceil(self.bits / p.data_bits) * p.word_bits

    def confidence_of(self, field: str) -> str:
        return dict(self.confidence).get(field, "verified")


@dataclass(frozen=True)
class Accelerator:
    """A validated accelerator description; ``path`` is the TOML file it came from."""

    name: str
    title: str
    vendor: str
    technology_node_nm: float
    clock_mhz: float | None
    formats: tuple[str, ...]
    sources: tuple[str, ...]
    memories: tuple[Memory, ...]
    confidence: tuple[tuple[str, str], ...]
    path: Path

    def memory(self, name: str) -> Memory:
        for m in self.memories:
            if m.name == name:
                return m
        known = ", ".join(m.name for m in self.memories)
        raise HwrelError(f"{self.name}: no memory {name!r} (known: {known})")

    def memories_holding(self, kind: str) -> tuple[Memory, ...]:
        if kind not in HOLDS:
            raise HwrelError(f"holds: unknown kind {kind!r} (valid: {', '.join(HOLDS)})")
        return tuple(m for m in self.memories if kind in m.holds)

    @property
    def on_chip_bytes(self) -> int:
        return sum(m.size_bytes for m in self.memories if not m.off_chip)

    def confidence_of(self, field: str) -> str:
        return dict(self.confidence).get(field, "verified")


def accelerators_dir() -> Path:
    """The description folder: ``$HWREL_ACCELERATORS`` if set, else the repository's
    ``accelerator_models/`` (found next to the package, which works for an editable install)."""
    env = os.environ.get(ENV_DIR)
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / "accelerator_models"


def list_accelerators() -> list[str]:
    """Names (file stems) of the descriptions in :func:`accelerators_dir`, sorted."""
    folder = accelerators_dir()
    if not folder.is_dir():
        return []
    return sorted(p.stem for p in folder.glob("*.toml"))


def load_accelerator(name_or_path: str | os.PathLike[str]) -> Accelerator:
    """Load and validate one description, by name (file stem) or by path to a ``.toml`` file."""
    text = os.fspath(name_or_path)
    path = Path(text)
    if not (text.endswith(".toml") or os.sep in text or path.is_file()):
        path = accelerators_dir() / f"{text}.toml"
        if not path.is_file():
            known = ", ".join(list_accelerators()) or "none"
            raise HwrelError(f"unknown accelerator {text!r} (known: {known})")
    if not path.is_file():
        raise HwrelError(f"{path}: no such file")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise HwrelError(f"{path}: malformed TOML: {_one_line(str(exc))}") from None
    return _parse(data, path)


def accelerators_table(names: list[str] | None = None) -> pd.DataFrame:
    """One row per accelerator: node, on/off-chip bytes, formats, protections, raw SER range."""
    rows = []
    for name in names if names is not None else list_accelerators():
        acc = load_accelerator(name)
        on = [m for m in acc.memories if not m.off_chip]
        sers = sorted({(m.ser_fit_per_mbit, m.confidence_of("ser_fit_per_mbit")) for m in on})
        rows.append({
            "name": acc.name,
            "title": acc.title,
            "vendor": acc.vendor,
            "node_nm": acc.technology_node_nm,
            "node_confidence": acc.confidence_of("technology_node_nm"),
            "on_chip_bytes": acc.on_chip_bytes,
            "off_chip_bytes": sum(m.size_bytes for m in acc.memories if m.off_chip),
            "formats": ",".join(acc.formats),
            "protection": ",".join(sorted({m.protection.describe() for m in on})),
            "on_chip_ser_fit_per_mbit": "; ".join(f"{s:g} ({c})" for s, c in sers),
        })
    return pd.DataFrame(rows)


def memories_table(names: list[str] | None = None) -> pd.DataFrame:
    """One row per memory of each accelerator, with each numeric field's confidence."""
    rows = []
    for name in names if names is not None else list_accelerators():
        acc = load_accelerator(name)
        for m in acc.memories:
            rows.append({
                "accelerator": acc.name, "memory": m.name, "off_chip": m.off_chip,
                "size_bytes": m.size_bytes, "size_confidence": m.confidence_of("size_bytes"),
                "holds": ",".join(m.holds), "word_bits": m.word_bits,
                "protection": m.protection.describe(),
                "protection_confidence": m.confidence_of("protection"),
                "ser_fit_per_mbit": m.ser_fit_per_mbit,
                "ser_confidence": m.confidence_of("ser_fit_per_mbit"),
                "mbu_fraction": m.mbu_fraction, "ser_source": m.ser_source,
            })
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------- validation

def _one_line(text: str) -> str:
    return " ".join(text.split())


def _fail(path: Path, field: str, problem: str) -> HwrelError:
    return HwrelError(f"{path}: {field}: {problem}")


def _get(d: dict[str, Any], key: str, kind: type | tuple[type, ...], path: Path, where: str,
         required: bool = True, default: Any = None) -> Any:
    field = f"{where}{key}"
    if key not in d:
        if required:
            raise _fail(path, field, "missing required field")
        return default
    value = d[key]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    # bool is an int in Python; a TOML `true` is never a valid number here.
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        names = " or ".join(k.__name__ for k in kinds)
        raise _fail(path, field, f"expected {names}, got {type(value).__name__} {value!r}")
    return value


def _number(d: dict[str, Any], key: str, path: Path, where: str, *, integer: bool = False,
            required: bool = True, positive: bool = True, default: Any = None) -> Any:
    value = _get(d, key, int if integer else (int, float), path, where, required, default)
    if key not in d:
        return value
    if not math.isfinite(value):
        raise _fail(path, f"{where}{key}", f"must be finite, got {value!r}")
    if value < 0 or (positive and value == 0):
        need = "> 0" if positive else ">= 0"
        raise _fail(path, f"{where}{key}", f"must be {need}, got {value!r}")
    return value


def _strings(d: dict[str, Any], key: str, path: Path, where: str) -> tuple[str, ...]:
    value = _get(d, key, list, path, where)
    if not value or not all(isinstance(v, str) and v for v in value):
        raise _fail(path, f"{where}{key}", "expected a non-empty list of non-empty strings")
    return tuple(value)


def _unknown_keys(d: dict[str, Any], allowed: set[str], path: Path, where: str) -> None:
    extra = sorted(set(d) - allowed)
    if extra:
        valid = ", ".join(sorted(allowed))
        raise _fail(path, f"{where}{extra[0]}", f"unknown field (valid: {valid})")


def _confidence(d: dict[str, Any], numbers: tuple[str, ...], extra: tuple[str, ...], path: Path,
                where: str) -> tuple[tuple[str, str], ...]:
    table = _get(d, "confidence", dict, path, where, required=False, default={})
    present = [k for k in numbers if k in d]
    for key, level in table.items():
        if key not in present and key not in extra:
            raise _fail(path, f"{where}confidence.{key}", "names no numeric field of this entry")
        if level not in CONFIDENCES:
            raise _fail(path, f"{where}confidence.{key}",
                        f"unknown level {level!r} (valid: {', '.join(CONFIDENCES)})")
    # Every number must say how well it is known; silence must not read as "verified".
    for key in present:
        if key not in table:
            raise _fail(path, f"{where}confidence.{key}",
                        f"missing: every number needs a level ({', '.join(CONFIDENCES)})")
    return tuple(sorted(table.items()))


def _check_format(name: str, path: Path) -> None:
    # One vocabulary with the flip arithmetic: names must be hwrel.formats' canonical ones.
    try:
        canonical = parse_format(name).name
    except HwrelError as exc:
        raise _fail(path, "formats", _one_line(str(exc))) from None
    if canonical != name:
        raise _fail(path, "formats", f"write {name!r} as its canonical name {canonical!r}")


def _protection(m: dict[str, Any], word_bits: int, path: Path, where: str) -> Protection:
    kind = _get(m, "protection", str, path, where)
    if kind not in PROTECTIONS:
        raise _fail(path, f"{where}protection",
                    f"unknown protection {kind!r} (valid: {', '.join(PROTECTIONS)})")
    ecc_keys = [k for k in ("ecc_data_bits", "ecc_check_bits", "interleave") if k in m]
    if kind != "secded":
        if ecc_keys:
            raise _fail(path, f"{where}{ecc_keys[0]}", 'only valid with protection = "secded"')
        return Protection(kind, word_bits, 1) if kind == "parity" else Protection("none")
    for key in ("ecc_data_bits", "ecc_check_bits"):
        if key not in m:
            raise _fail(path, f"{where}{key}", "required for protection = \"secded\"")
    d = _number(m, "ecc_data_bits", path, where, integer=True)
    c = _number(m, "ecc_check_bits", path, where, integer=True)
    i = _number(m, "interleave", path, where, integer=True, required=False, default=1)
    # Extended Hamming: r check bits with 2**r >= d + r + 1, plus one overall parity bit.
    r = 1
    while 2 ** r < d + r + 1:
        r += 1
    if c < r + 1:
        raise _fail(path, f"{where}ecc_check_bits",
                    f"{c} check bits cannot give SECDED over {d} data bits (need >= {r + 1})")
    return Protection("secded", d, c, i)


def _memory(m: Any, index: int, path: Path) -> Memory:
    if not isinstance(m, dict):
        raise _fail(path, f"memory[{index}]", "expected a [[memory]] table")
    name = _get(m, "name", str, path, f"memory[{index}].")
    where = f"memory[{name}]."
    _unknown_keys(m, _MEMORY_KEYS, path, where)
    size = _number(m, "size_bytes", path, where, integer=True)
    holds = _get(m, "holds", list, path, where)
    if not holds:
        raise _fail(path, f"{where}holds", f"empty (valid entries: {', '.join(HOLDS)})")
    for h in holds:
        if h not in HOLDS:
            raise _fail(path, f"{where}holds", f"unknown entry {h!r} (valid: {', '.join(HOLDS)})")
    if len(set(holds)) != len(holds):
        raise _fail(path, f"{where}holds", "duplicate entry")
    word_bits = _number(m, "word_bits", path, where, integer=True)
    protection = _protection(m, word_bits, path, where)
    ser = float(_number(m, "ser_fit_per_mbit", path, where, positive=False))
    ser_source = _get(m, "ser_source", str, path, where)
    source = _get(m, "source", str, path, where)
    for key, text in (("ser_source", ser_source), ("source", source)):
        if not text.strip():
            raise _fail(path, f"{where}{key}", "empty: every number needs its source")
    off_chip = _get(m, "off_chip", bool, path, where, required=False, default=False)
    mbu = float(_number(m, "mbu_fraction", path, where, positive=False, required=False,
                        default=0.0))
    if mbu > 1:
        raise _fail(path, f"{where}mbu_fraction", f"must be in [0, 1], got {mbu!r}")
    confidence = _confidence(m, _MEMORY_NUMBERS, ("protection", "holds"), path, where)
    return Memory(name, size, tuple(holds), word_bits, protection, ser, ser_source, source,
                  off_chip, mbu, confidence)


def _parse(data: dict[str, Any], path: Path) -> Accelerator:
    _unknown_keys(data, _TOP_KEYS, path, "")
    name = _get(data, "name", str, path, "")
    if not _SLUG.fullmatch(name):
        raise _fail(path, "name", f"{name!r} is not a slug (lowercase letters, digits, '-')")
    if name != path.stem:
        raise _fail(path, "name", f"{name!r} differs from the file stem {path.stem!r}")
    title = _get(data, "title", str, path, "")
    vendor = _get(data, "vendor", str, path, "")
    node = float(_number(data, "technology_node_nm", path, ""))
    clock = _number(data, "clock_mhz", path, "", required=False)
    formats = _strings(data, "formats", path, "")
    for f in formats:
        _check_format(f, path)
    sources = _strings(data, "sources", path, "")
    confidence = _confidence(data, _TOP_NUMBERS, (), path, "")
    raw = _get(data, "memory", list, path, "")
    if not raw:
        raise _fail(path, "memory", "at least one [[memory]] entry is required")
    memories = tuple(_memory(m, i, path) for i, m in enumerate(raw))
    seen: set[str] = set()
    for m in memories:
        if m.name in seen:
            raise _fail(path, f"memory[{m.name}].name", "duplicate memory name")
        seen.add(m.name)
    return Accelerator(name, title, vendor, node, None if clock is None else float(clock),
                       formats, sources, memories, confidence, path)
