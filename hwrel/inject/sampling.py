"""Fault sites of a network and deterministic sampling of fault configurations.

A *site* is one thing a single fault hits: one stored bit of one weight or bias (bit faults
``bitflip``/``stuck0``/``stuck1``), one neuron of a hidden layer or one synapse (weight element) of
an affine layer (``crash``/``byzantine``). :class:`SiteSpace` numbers the sites of a network
``0..total-1`` (synapse layers in order, weights before biases, element-major, bit-minor).

A campaign is a sequence of *configurations* (sets of faults applied together), produced in
fixed-size chunks. Configuration ``i`` is a pure function of ``(seed, spec, i)``: chunk
``c = i // chunk_size`` draws from its own generator ``PCG64(SeedSequence([seed, c]))``, always a
full chunk (truncated at the end), so any shard can generate its own chunks, and a campaign of
``N`` configurations is a prefix of one of ``N' > N``. No global RNG is touched.

Sampling modes (:class:`CampaignSpec`): ``count`` configurations of ``faults_per_config`` distinct
sites drawn uniformly; bit-error rate ``ber`` (every stored bit flips, or sticks, independently
with probability ``ber``: a binomial count then uniform positions without replacement, so it
scales to millions of bits); ``exhaustive`` (one configuration per site, optionally restricted to
a ``layer`` and/or one ``bit`` position).
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from hwrel.errors import HwrelError, check
from hwrel.formats import FloatFormat, Format, IntFormat, parse_format
from hwrel.network import Network

BIT_KINDS = ("bitflip", "stuck0", "stuck1")
NEURON_KINDS = ("crash", "byzantine")
KINDS = BIT_KINDS + NEURON_KINDS
SITES = ("weight", "bias", "neuron", "synapse")
FP32 = parse_format("fp32")


def _is_int(x: object) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


@dataclass(frozen=True)
class CampaignSpec:
    """What a campaign injects (everything but the model, the inputs and the seed).

    Attributes:
        fault: ``bitflip``, ``stuck0``, ``stuck1`` (stored bits) or ``crash``, ``byzantine``.
        format: storage format of float weights and biases (``fp32``, ``fp16``, ``bf16``,
            ``fp8_e4m3``, ...); integer-coded (Brevitas or quantized) weights use their own codes.
        count: number of configurations (random modes).
        ber: bit-error rate in [0, 1]: each configuration flips each stored bit with this
            probability (``count`` configurations, default 100).
        exhaustive: one configuration per site (``count``/``ber`` must be unset).
        layer: restrict to the layer of this node name (an affine for bit and synapse faults, a
            hidden activation for neuron faults).
        bit: restrict bit faults to this bit position.
        sites: which sites; default ``("weight", "bias")`` for bit faults, ``("neuron",)`` else.
        capacity: Byzantine ``C``: random Byzantine values are uniform in ``[-C, C]``, exhaustive
            ones are ``+C``.
        faults_per_config: distinct random sites per configuration (``count`` mode).
        chunk_size: configurations per chunk (the unit of resuming, sharding and RNG streams).
    """

    fault: str = "bitflip"
    format: str = "fp32"
    count: int | None = None
    ber: float | None = None
    exhaustive: bool = False
    layer: str | None = None
    bit: int | None = None
    sites: tuple[str, ...] | None = None
    capacity: float | None = None
    faults_per_config: int = 1
    chunk_size: int = 256

    def __post_init__(self) -> None:
        check(self.fault in KINDS, f"unknown fault {self.fault!r}: valid are {', '.join(KINDS)}")
        fmt = parse_format(self.format)  # raises on unknown names
        object.__setattr__(self, "format", fmt.name)
        bitwise = self.fault in BIT_KINDS
        sites = self.sites if self.sites is not None else (
            ("weight", "bias") if bitwise else ("neuron",))
        sites = (sites,) if isinstance(sites, str) else tuple(sites)
        allowed = ("weight", "bias") if bitwise else ("neuron", "synapse")
        check(len(sites) > 0 and all(s in allowed for s in sites) and len(set(sites)) == len(sites),
              f"sites {sites!r} do not fit fault {self.fault!r}: choose from {', '.join(allowed)}")
        object.__setattr__(self, "sites", tuple(s for s in SITES if s in sites))
        check(isinstance(self.exhaustive, bool), f"exhaustive must be True or False, got {self.exhaustive!r}")
        if self.ber is not None:
            ok = isinstance(self.ber, (int, float)) and not isinstance(self.ber, bool)
            check(ok and 0.0 <= float(self.ber) <= 1.0, f"bit-error rate must lie in [0, 1], got {self.ber!r}")
            check(bitwise, f"a bit-error rate needs a bit fault (bitflip/stuck0/stuck1), not {self.fault!r}")
            check(not self.exhaustive, "choose either a bit-error rate or exhaustive, not both")
            object.__setattr__(self, "ber", float(self.ber))
            if self.count is None:
                object.__setattr__(self, "count", 100)
        if self.exhaustive:
            check(self.count is None, "exhaustive enumeration takes no count")
        else:
            check(self.count is not None, "give a count, a bit-error rate or exhaustive")
        if self.count is not None:
            check(_is_int(self.count) and self.count > 0, f"count must be a positive integer, got {self.count!r}")
            object.__setattr__(self, "count", int(self.count))
        if self.bit is not None:
            check(bitwise, f"a bit position needs a bit fault, not {self.fault!r}")
            check(_is_int(self.bit) and self.bit >= 0, f"bit must be an integer >= 0, got {self.bit!r}")
            object.__setattr__(self, "bit", int(self.bit))
        check(self.layer is None or isinstance(self.layer, str), f"layer must be a node name, got {self.layer!r}")
        if self.fault == "byzantine":
            c = self.capacity
            ok = isinstance(c, (int, float)) and not isinstance(c, bool) and math.isfinite(c) and c >= 0
            check(ok, f"Byzantine faults need capacity C, a finite number >= 0, got {c!r}")
            object.__setattr__(self, "capacity", float(c))
        else:
            check(self.capacity is None, f"capacity applies to Byzantine faults only, not {self.fault!r}")
        k = self.faults_per_config
        check(_is_int(k) and k >= 1, f"faults_per_config must be an integer >= 1, got {k!r}")
        check(k == 1 or (self.ber is None and not self.exhaustive),
              "faults_per_config > 1 applies to count sampling only")
        # Several bits of one word are one multi-bit flip; stuck-at faults take one bit per word.
        check((k == 1 and self.ber is None) or self.fault in ("bitflip", "crash", "byzantine"),
              f"several faults per configuration (bit-error rate, faults_per_config) need bitflip, "
              f"crash or byzantine, not {self.fault!r}")
        cs = self.chunk_size
        check(_is_int(cs) and 1 <= cs <= 1 << 20, f"chunk_size must be an integer in 1..2^20, got {cs!r}")

    @property
    def storage(self) -> Format:
        return parse_format(self.format)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["sites"] = list(self.sites)
        return d

    @property
    def hash(self) -> str:
        """Stable hash of every field (the identity of a campaign's configurations)."""
        text = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    @staticmethod
    def from_dict(d: dict[str, Any]) -> "CampaignSpec":
        d = dict(d)
        if d.get("sites") is not None:
            d["sites"] = tuple(d["sites"])
        return CampaignSpec(**d)


@dataclass(frozen=True)
class SiteGroup:
    """The sites of one tensor: ``numel`` elements, each with bit positions ``positions``
    (a single pseudo-position ``-1`` for neuron and synapse sites)."""

    layer: str
    site: str
    numel: int
    format: str  # storage format name; "" for neuron/synapse sites
    positions: tuple[int, ...] = field(default=(-1,))

    @property
    def size(self) -> int:
        return self.numel * len(self.positions)


def storage_format(net: Network, node: int, site: str, fmt: Format) -> Format:
    """How a weight or bias of affine node ``node`` is stored under campaign format ``fmt``.

    Integer-coded weights (Brevitas, or quantized by the caller) are stored as their codes. Float
    weights are stored in ``fmt`` when it is a float format. Biases are stored in ``fmt`` when it is
    a float format and in fp32 when the weights are integer-coded (Brevitas keeps float biases).
    """
    aff = net.nodes[node].affine
    if site == "weight" and aff.codes is not None:
        return IntFormat(int(aff.bit_width), signed=bool(aff.signed))
    if isinstance(fmt, FloatFormat):
        return fmt
    if site == "bias":
        return FP32
    raise HwrelError(f"layer {net.nodes[node].name}: float weights cannot be stored as {fmt.name}; "
                     "quantize the model first (hwrel inject does this for intB formats)")


class SiteSpace:
    """Numbering of the fault sites of ``net`` under ``spec`` (see the module docstring)."""

    def __init__(self, net: Network, spec: CampaignSpec):
        check(isinstance(net, Network), f"expected a hwrel Network, got {type(net).__name__}")
        self.net, self.spec = net, spec
        neuron = spec.sites == ("neuron",)
        nodes = net.layers if neuron else net.synapse_layers
        names = [net.nodes[i].name for i in nodes]
        if spec.layer is not None and spec.layer not in names:
            what = "hidden layers" if neuron else "affine layers"
            raise HwrelError(f"layer {spec.layer!r} not found; {what}: {', '.join(names) or 'none'}")
        groups: list[SiteGroup] = []
        self.nodes: list[int] = []
        for i in nodes:
            node = net.nodes[i]
            if spec.layer is not None and node.name != spec.layer:
                continue
            for site in spec.sites:
                if site == "neuron":
                    groups.append(SiteGroup(node.name, site, node.size, ""))
                elif site == "synapse":
                    # A conv weight is shared by many (input, output) pairs: a synapse there needs a
                    # position too, which this numbering does not sample.
                    check(node.affine.kind == "linear", f"synapse campaigns cover dense layers; layer "
                          f"{node.name} is a convolution (pick a dense layer with layer=)")
                    groups.append(SiteGroup(node.name, site, int(node.affine.weight.numel()), ""))
                else:
                    t = node.affine.weight if site == "weight" else node.affine.bias
                    if t is None:
                        continue
                    fmt = storage_format(net, i, site, spec.storage)
                    if spec.bit is not None:
                        check(spec.bit < fmt.bits, f"bit {spec.bit} out of range for the {fmt.name} "
                              f"{site} of layer {node.name}: valid bits are 0..{fmt.bits - 1}")
                        pos: tuple[int, ...] = (spec.bit,)
                    else:
                        pos = tuple(range(fmt.bits))
                    groups.append(SiteGroup(node.name, site, int(t.numel()), fmt.name, pos))
                self.nodes.append(i)
        self._index(groups)

    def _index(self, groups: list) -> None:
        """Keep the non-empty site groups and the tables that map flat site numbers to them."""
        self.groups = tuple(g for g in groups if g.size > 0)
        check(len(self.groups) > 0, "the campaign selects no fault sites")
        self.offsets = np.cumsum([0] + [g.size for g in self.groups]).astype(np.int64)
        self.total = int(self.offsets[-1])
        self._npos = np.array([len(x.positions) for x in self.groups], dtype=np.int64)
        self._pos_start = np.cumsum(np.concatenate([[0], self._npos[:-1]])).astype(np.int64)
        self._pos_table = np.concatenate([np.array(x.positions, dtype=np.int64) for x in self.groups])

    def locate(self, flat: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(group, element, bit)`` of each flat site number (bit ``-1`` for non-bit sites)."""
        flat = np.asarray(flat, dtype=np.int64)
        if flat.size and (flat.min() < 0 or flat.max() >= self.total):
            raise HwrelError(f"site number out of range 0..{self.total - 1}")
        g = np.searchsorted(self.offsets, flat, side="right") - 1
        local = flat - self.offsets[g]
        npos = self._npos[g]
        elem, slot = local // npos, local % npos
        return g.astype(np.int64), elem, self._pos_table[self._pos_start[g] + slot]

    def num_configs(self) -> int:
        spec = self.spec
        if spec.exhaustive:
            return self.total
        if spec.faults_per_config > self.total:
            raise HwrelError(f"faults_per_config={spec.faults_per_config} exceeds the "
                             f"{self.total} fault sites")
        return int(spec.count)

    def num_chunks(self) -> int:
        return -(-self.num_configs() // self.spec.chunk_size)


@dataclass(frozen=True)
class ChunkFaults:
    """The faults of one chunk as flat arrays, one entry per fault (sorted by config, then site).

    ``config_ids`` lists every configuration of the chunk (a bit-error-rate configuration may
    hold no fault at all). ``value`` is NaN except for Byzantine faults.
    """

    chunk: int
    config_ids: np.ndarray
    config: np.ndarray
    group: np.ndarray
    index: np.ndarray
    bit: np.ndarray
    value: np.ndarray


def chunk_generator(seed: int, chunk: int) -> np.random.Generator:
    """The generator of chunk ``chunk``: ``PCG64(SeedSequence([seed, chunk]))``."""
    check(_is_int(seed) and seed >= 0, f"seed must be an integer >= 0, got {seed!r}")
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(seed), int(chunk)])))


def ber_positions(rng: np.random.Generator, total: int, p: float) -> np.ndarray:
    """Sorted positions in ``[0, total)``, each present independently with probability ``p``:
    ``m ~ Binomial(total, p)`` then ``m`` distinct uniform positions (same law, O(m) memory
    for small ``m``)."""
    m = int(rng.binomial(total, p))
    if m == 0:
        return np.zeros(0, dtype=np.int64)
    return np.sort(rng.choice(total, size=m, replace=False).astype(np.int64))


def sample_chunk(space: SiteSpace, seed: int, chunk: int) -> ChunkFaults:
    """The faults of chunk ``chunk`` (a pure function of seed, spec, network and chunk)."""
    spec, n_total = space.spec, space.num_configs()
    cs = spec.chunk_size
    first = chunk * cs
    check(_is_int(chunk) and 0 <= first < n_total, f"chunk {chunk} out of range")
    ids = np.arange(first, min(first + cs, n_total), dtype=np.int64)
    if spec.exhaustive:
        flats = [ids]
        owner = ids
    else:
        rng = chunk_generator(seed, chunk)
        if spec.ber is not None:
            drawn = [ber_positions(rng, space.total, spec.ber) for _ in range(cs)]
        elif spec.faults_per_config == 1:  # one site per configuration: the same draws, as one array
            one = rng.integers(0, space.total, size=(cs, 1), dtype=np.int64)[: len(ids), 0]
            g, elem, bit = space.locate(one)
            return ChunkFaults(chunk, ids, ids.copy(), g, elem, bit, _values(spec, rng, cs, len(one)))
        else:
            drawn = [np.sort(rng.choice(space.total, size=spec.faults_per_config, replace=False))
                     for _ in range(cs)]
        drawn = drawn[: len(ids)]
        flats = drawn
        owner = np.concatenate([np.full(len(d), i, dtype=np.int64) for i, d in zip(ids, drawn)]) \
            if drawn else np.zeros(0, dtype=np.int64)
    flat = np.concatenate(flats).astype(np.int64) if len(flats) else np.zeros(0, dtype=np.int64)
    g, elem, bit = space.locate(flat)
    return ChunkFaults(chunk, ids, owner, g, elem, bit,
                       _values(spec, None if spec.exhaustive else rng, cs, len(flat)))


def _values(spec: CampaignSpec, rng: np.random.Generator | None, cs: int, n: int) -> np.ndarray:
    """Byzantine values of a chunk's ``n`` faults (NaN for other kinds): ``+C`` when exhaustive,
    else drawn after the sites, from the same chunk stream (a function of (seed, chunk))."""
    value = np.full(n, np.nan)
    if spec.fault == "byzantine":
        c = float(spec.capacity)
        if rng is None:
            value[:] = c
        else:
            value = rng.uniform(-c, c, size=cs * spec.faults_per_config)[:n]
    return value


def chunk_table(space: SiteSpace, faults: ChunkFaults) -> list[list[dict[str, Any]]]:
    """Per configuration of the chunk, its faults as plain records (layer, site, index, bit(s),
    value, format, kind). Bits hitting the same word are merged into one record with ``bits`` (and
    ``bit=None``); a single bit has ``bit`` set and ``bits=()``."""
    out: list[list[dict[str, Any]]] = [[] for _ in faults.config_ids]
    base = int(faults.config_ids[0]) if len(faults.config_ids) else 0
    kind = space.spec.fault
    last: dict[tuple, dict[str, Any]] = {}
    for c, g, e, b, v in zip(faults.config.tolist(), faults.group.tolist(), faults.index.tolist(),
                             faults.bit.tolist(), faults.value.tolist()):
        grp = space.groups[g]
        key = (c, g, e)
        if b >= 0 and key in last:  # a second bit of the same word: one multi-bit record
            rec = last[key]
            rec["bits"] = tuple(sorted(set(rec["bits"]) | {rec["bit"]} - {None} | {b}))
            rec["bit"] = None
            continue
        rec = {"layer": grp.layer, "site": grp.site, "index": int(e), "kind": kind,
               "bit": int(b) if b >= 0 else None, "bits": (),
               "value": None if math.isnan(v) else float(v), "format": grp.format or None}
        last[key] = rec
        out[c - base].append(rec)
    return out
