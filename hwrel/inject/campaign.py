"""Resumable, shardable fault-injection campaigns.

:func:`run_campaign` samples configurations chunk by chunk (:mod:`hwrel.inject.sampling`),
measures each with the exact injection engine (:class:`hwrel.inject.engine.Injector`) and writes
every finished chunk atomically (:mod:`hwrel.inject.store`). Killed and run again with the same
arguments it continues where it stopped; the rows of the finished campaign equal those of an
uninterrupted run exactly. ``shard=(i, n)`` runs only the chunks ``c`` with ``c % n == i``;
:func:`merge_shards` joins the shards' results and checks that none is missing.

Rows (one per configuration, sorted by ``config_id``): ``config_id``, ``n_faults``, the fault
columns ``layer``, ``site``, ``kind``, ``index``, ``bit``, ``format`` (``"*"`` / ``-1`` when the
faults of a configuration differ), ``faults`` (JSON list of every fault), the engine's
``old_value``, ``new_value``, ``max_abs_delta``, ``mismatch_rate``, ``nonfinite``, with labels
``accuracy``, and ``certified`` (settled without a forward: a weight that multiplies only exact
zeros, so the measured row is exactly the clean run's). :func:`summarize` gives rates with
confidence intervals.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Any, Iterable, Sequence

from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from hwrel.errors import HwrelError, check
from hwrel.inject.sampling import BIT_KINDS, CampaignSpec, ChunkFaults, SiteSpace, chunk_table, sample_chunk
from hwrel.inject.stats import wilson_interval
from hwrel.inject.store import MAGIC, ChunkStore, check_same, file_manifest, write_parquet, write_table
from hwrel.inject.rows import Rows, Text, part_frame
from hwrel.network import Network

if TYPE_CHECKING:
    import pandas as pd

MEASURES = ("old_value", "new_value", "max_abs_delta", "mismatch_rate", "nonfinite", "accuracy")


# ------------------------------------------------------------------------------ identities

def parse_shard(shard: str | Sequence[int] | None) -> tuple[int, int] | None:
    """``"i/n"`` or ``(i, n)`` with ``0 <= i < n``; None means the whole campaign."""
    if shard is None:
        return None
    if isinstance(shard, str):
        m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", shard)
        if not m:
            raise HwrelError(f"shard {shard!r} is not of the form i/n (e.g. 0/4)")
        i, n = int(m.group(1)), int(m.group(2))
    else:
        try:
            i, n = shard
        except (TypeError, ValueError):
            raise HwrelError(f"shard {shard!r} is not a pair (i, n)") from None
        ok = all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in (i, n))
        check(ok, f"shard {shard!r}: i and n must be integers")
    check(n > 0, f"shard {i}/{n}: the number of shards n must be >= 1")
    check(0 <= i < n, f"shard {i}/{n}: the shard index must lie in 0..{n - 1}")
    return int(i), int(n)


def _hash_tensor(h: "hashlib._Hash", t: torch.Tensor | None) -> None:
    if t is None:
        h.update(b"none")
        return
    t = t.detach().cpu().contiguous()
    h.update(f"{t.dtype}{tuple(t.shape)}".encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")


def network_fingerprint(net: Network) -> str:
    """Hash of the structure and every stored tensor of ``net`` (weights, biases, codes, scales,
    input box)."""
    h = hashlib.sha256()
    for node in net.nodes:
        h.update(repr((node.name, node.op, node.inputs, node.shape, node.act, node.pool)).encode())
        a = node.affine
        if a is not None:
            h.update(repr((a.kind, a.stride, a.padding, a.dilation, a.groups, a.bit_width,
                           a.signed)).encode())
            for t in (a.weight, a.bias, a.codes, a.scale, a.zero_point):
                _hash_tensor(h, t)
    _hash_tensor(h, net.input_lo)
    _hash_tensor(h, net.input_hi)
    return h.hexdigest()[:16]


def data_fingerprint(inputs: torch.Tensor, labels: torch.Tensor | None) -> str:
    h = hashlib.sha256()
    _hash_tensor(h, torch.as_tensor(inputs))
    _hash_tensor(h, None if labels is None else torch.as_tensor(labels))
    return h.hexdigest()[:16]


def as_spec(spec: CampaignSpec | dict[str, Any] | None, **kwargs: Any) -> CampaignSpec:
    if isinstance(spec, CampaignSpec):
        check(not kwargs, f"give the spec either as a CampaignSpec or as keywords, not both: {kwargs}")
        return spec
    d = dict(spec or {}, **kwargs)
    unknown = set(d) - set(CampaignSpec.__dataclass_fields__)
    check(not unknown, f"unknown campaign spec fields: {', '.join(sorted(unknown))}")
    return CampaignSpec(**d)


# ------------------------------------------------------------------------------ rows

def _fault_objects(records: list[list[dict[str, Any]]]) -> list[tuple]:
    from hwrel.inject.faults import Fault

    return [tuple(Fault(**r) for r in recs) for recs in records]


def _common(recs: list[dict[str, Any]], key: str, missing: Any) -> Any:
    vals = {r[key] for r in recs}
    if not vals:
        return missing
    if len(vals) == 1:
        v = vals.pop()
        return missing if v is None else v
    return "*" if isinstance(missing, str) else missing


def chunk_rows(faults: ChunkFaults, records: list[list[dict[str, Any]]],
               measured: dict[str, np.ndarray], labels: bool) -> pd.DataFrame:
    """The result rows of one chunk (fixed column order and dtypes)."""
    import pandas as pd

    n = len(faults.config_ids)
    cols: dict[str, Any] = {
        "config_id": faults.config_ids.astype(np.int64),
        "n_faults": np.array([sum(max(1, len(x["bits"])) for x in r) for r in records], dtype=np.int64),
        "layer": [_common(r, "layer", "") for r in records],
        "site": [_common(r, "site", "") for r in records],
        "kind": [_common(r, "kind", "") for r in records],
        "index": np.array([r[0]["index"] if len(r) == 1 else -1 for r in records], dtype=np.int64),
        "bit": np.array([_common(r, "bit", -1) for r in records], dtype=np.int64),
        "format": [_common(r, "format", "") for r in records],
        "faults": [json.dumps([{k: (list(v) if isinstance(v, tuple) else v) for k, v in x.items()}
                               for x in r], separators=(",", ":")) for r in records],
    }
    for key in [*MEASURES, *(k for k in measured if k not in MEASURES)]:  # + a metric's own columns
        if key == "accuracy" and (not labels or key not in measured):  # LM targets: no accuracy
            continue
        arr = np.asarray(measured[key])
        check(arr.shape == (n,), f"engine returned {key} of shape {arr.shape}, expected ({n},)")
        cols[key] = arr.astype(bool if key == "nonfinite" else np.float64)
    cols["certified"] = np.asarray(measured.get("certified", np.zeros(n, dtype=bool)), dtype=bool)
    return pd.DataFrame(cols)


def single_words(spec: CampaignSpec) -> bool:
    """Campaigns of one bit fault per configuration: measured from arrays (no per-fault objects,
    :meth:`Injector.run_words`) and written by :func:`word_rows`."""
    return spec.fault in BIT_KINDS and spec.ber is None and spec.faults_per_config == 1


def word_columns(space: SiteSpace, faults: ChunkFaults, measured: dict[str, np.ndarray],
                 labels: bool) -> dict[str, Any]:
    """The columns of :func:`word_rows` as numpy arrays, the string columns as :class:`Text`
    (the same text, built only when a file is written or a DataFrame is asked for: no pandas)."""
    n = len(faults.config_ids)
    check(len(faults.config) == n and np.array_equal(faults.config, faults.config_ids),
          "word_rows takes one fault per configuration")
    groups = space.groups
    g = faults.group.astype(np.int64)
    kind = space.spec.fault
    # faults: the JSON of chunk_rows, '[{"layer":..,"site":..,"index":I,"kind":..,"bit":B,"bits":[],
    # "value":null,"format":..}]', assembled from per-group pieces and the digits of I and B
    pre = [f'[{{"layer":{json.dumps(x.layer)},"site":{json.dumps(x.site)},"index":'.encode() for x in groups]
    mid = f',"kind":{json.dumps(kind)},"bit":'.encode()
    post = [f',"bits":[],"value":null,"format":{json.dumps(x.format)}}}]'.encode() for x in groups]
    index, bit = faults.index.astype(np.int64), faults.bit.astype(np.int64)
    cols: dict[str, Any] = {
        "config_id": faults.config_ids.astype(np.int64),
        "n_faults": np.ones(n, dtype=np.int64),
        "layer": Text.choice(g, [x.layer for x in groups]), "site": Text.choice(g, [x.site for x in groups]),
        "kind": Text(n, [kind.encode()]),
        "index": index, "bit": bit,
        "format": Text.choice(g, [x.format for x in groups]),
        "faults": Text(n, [(g, pre), index, mid, bit, (g, post)]),
    }
    for key in MEASURES:
        if key == "accuracy" and not labels:
            continue
        arr = np.asarray(measured[key])
        check(arr.shape == (n,), f"engine returned {key} of shape {arr.shape}, expected ({n},)")
        cols[key] = arr.astype(bool if key == "nonfinite" else np.float64)
    cols["certified"] = np.asarray(measured.get("certified", np.zeros(n, dtype=bool)), dtype=bool)
    return cols


def word_rows(space: SiteSpace, faults: ChunkFaults, measured: dict[str, np.ndarray],
              labels: bool) -> pd.DataFrame:
    """:func:`chunk_rows` of a :func:`single_words` chunk, column for column (built from arrays)."""
    return part_frame(word_columns(space, faults, measured, labels))


# ------------------------------------------------------------------------------ campaign

def _progress(total: int, initial: int, enabled: bool, desc: str):  # noqa: ANN202
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, unit="cfg", desc=desc, file=sys.stderr,
                disable=not enabled or not sys.stderr.isatty(), dynamic_ncols=True)


def _as_network(model: nn.Module | Network, input_domain: Any, input_shape: Any) -> Any:
    """The model's Network (fast engine), or a GeneralModel where the engine has no rule
    (:func:`hwrel.inject.target.as_target`: the one place that decides)."""
    from hwrel.inject.target import as_target

    return as_target(model, input_domain, input_shape)


def _path_of(net: Any) -> str:
    from hwrel.inject.target import path_of

    return path_of(net)


def _tag(df: pd.DataFrame, net: Any) -> pd.DataFrame:
    """Say in ``df.attrs`` which path measured the rows (``"engine"`` or ``"general"``), and why
    the engine refused the model when it did."""
    from hwrel.inject.target import path_of

    df.attrs["injection_path"] = path_of(net)
    df.attrs["engine_refused"] = getattr(net, "reason", None)
    return df


class _Measure:
    """Measures configurations with the engine (built on first use: a finished campaign
    needs no engine)."""

    def __init__(self, net: Network, inputs: torch.Tensor, labels: torch.Tensor | None,
                 spec: CampaignSpec, engine_kwargs: dict[str, Any]):
        self.args = (net, inputs, labels, spec, engine_kwargs)
        self.injector = None

    def engine(self):  # noqa: ANN201
        if self.injector is None:
            from hwrel.inject.engine import Injector

            net, inputs, labels, spec, kw = self.args
            self.injector = Injector(net, inputs, labels=labels, format=spec.format, **kw)
        return self.injector

    def words(self, space: SiteSpace, faults: ChunkFaults) -> dict[str, np.ndarray]:
        """Metrics of a :func:`single_words` chunk, one site kind at a time."""
        inj = self.engine()
        n = len(faults.config)
        sites = np.array([x.site for x in space.groups], dtype=object)[faults.group]
        layers = np.array([x.layer for x in space.groups], dtype=object)[faults.group]
        res: dict[str, np.ndarray] | None = None
        for site in ("weight", "bias"):
            sel = np.nonzero(sites == site)[0]
            if not len(sel):
                continue
            got = inj.run_words(layers[sel], site, faults.index[sel], faults.bit[sel], space.spec.fault)
            if res is None:
                res = {k: np.empty(n, dtype=v.dtype) for k, v in got.items()}
            for k, v in got.items():
                res[k][sel] = v
        check(res is not None, "empty chunk")
        return res

    def __call__(self, configs: list[tuple]) -> dict[str, np.ndarray]:
        net, inputs, labels, spec, kw = self.args
        inj = self.engine()
        n = len(configs)
        # A bit-error-rate configuration may flip nothing: the clean model, measured as such.
        res: dict[str, np.ndarray] = {
            "old_value": np.full(n, np.nan, np.float32), "new_value": np.full(n, np.nan, np.float32),
            "max_abs_delta": np.zeros(n), "mismatch_rate": np.zeros(n), "nonfinite": np.zeros(n, bool)}
        if labels is not None:
            res["accuracy"] = np.full(n, float((inj.clean_top1 == inj.labels).double().mean()))
        live = [i for i, c in enumerate(configs) if len(c)]
        if live:
            got = inj.run([configs[i] for i in live])
            for key, arr in res.items():
                arr[live] = got[key]
        return res


def run_campaign(model: nn.Module | Network, spec: CampaignSpec | dict[str, Any] | None,
                 inputs: torch.Tensor, labels: torch.Tensor | None = None, *,
                 out: str | os.PathLike[str] | None = None, seed: int = 0,
                 shard: str | Sequence[int] | None = None, progress: bool = True,
                 input_domain: Any = (0.0, 1.0), input_shape: Sequence[int] | None = None,
                 range_limit: float | None = None, device: str = "cpu", metric: Any = None,
                 **spec_fields: Any) -> pd.DataFrame:
    """Run (or continue) a campaign and return its rows, sorted by ``config_id``.

    Exact: every row is measured by the injection engine, or, for a model the engine has no rule
    for, by the exact general path (:mod:`hwrel.inject.general`; ``df.attrs["injection_path"]``
    says which; ``metric``: its measure of harm, default auto, see
    :func:`hwrel.inject.metrics.resolve_metric`); the configurations are a pure function
    of ``(seed, spec, model)`` (not of the shard, the chunk order or interruptions). ``out`` is a
    results folder, or a path ending in ``.parquet`` for a single results file; without ``out``
    nothing is written. With ``shard=(i, n)`` only that shard's chunks run and are returned.
    A results folder or file of another campaign raises :class:`HwrelError` and is left as it is.
    """
    return campaign_rows(model, spec, inputs, labels, out=out, seed=seed, shard=shard, progress=progress,
                         input_domain=input_domain, input_shape=input_shape, range_limit=range_limit,
                         device=device, metric=metric, **spec_fields).frame()


def campaign_rows(model: nn.Module | Network, spec: CampaignSpec | dict[str, Any] | None,
                  inputs: torch.Tensor, labels: torch.Tensor | None = None, *,
                  out: str | os.PathLike[str] | None = None, seed: int = 0,
                  shard: str | Sequence[int] | None = None, progress: bool = True,
                  input_domain: Any = (0.0, 1.0), input_shape: Sequence[int] | None = None,
                  range_limit: float | None = None, device: str = "cpu", metric: Any = None,
                  **spec_fields: Any) -> Rows:
    """:func:`run_campaign`, its rows as :class:`~hwrel.inject.rows.Rows` (``.frame()`` is the
    DataFrame ``run_campaign`` returns). A campaign of single bit faults on the engine that
    computes all its chunks now imports no pandas (what ``hwrel inject`` runs)."""
    spec = as_spec(spec, **spec_fields)
    sh = parse_shard(shard)
    ok = isinstance(seed, (int, np.integer)) and not isinstance(seed, bool) and seed >= 0
    check(ok, f"seed must be an integer >= 0, got {seed!r}")
    sample_seed = int(seed)
    x = torch.as_tensor(inputs)
    net = _as_network(model, input_domain, input_shape if input_shape is not None or x.dim() < 2
                      else tuple(x.shape[1:]))
    y = None if labels is None else torch.as_tensor(labels)
    check(x.dim() >= 2 and len(x) > 0, f"inputs must be a non-empty batch, got shape {tuple(x.shape)}")
    check(y is None or (y.dim() in (1, 2) and len(y) == len(x)),
          f"labels must be one per input ({len(x)}), got shape {None if y is None else tuple(y.shape)}")
    if isinstance(net, Network):
        space, model_fp = SiteSpace(net, spec), network_fingerprint(net)
        measure = _Measure(net, x, y, spec, {"range_limit": range_limit, "device": device})
    else:
        from hwrel.inject.target import general_parts

        space, model_fp, measure = general_parts(net, spec, x, y, range_limit, device, metric)
    total, n_chunks = space.num_configs(), space.num_chunks()
    mine = [c for c in range(n_chunks) if sh is None or c % sh[1] == sh[0]]
    from hwrel import __version__

    manifest = {
        "format": MAGIC, "spec": spec.to_dict(), "spec_hash": spec.hash, "seed": int(seed),
        "model_fingerprint": model_fp, "data_fingerprint": data_fingerprint(x, y),
        "hwrel_version": __version__, "configs": total, "chunk_size": spec.chunk_size,
        "chunks": n_chunks, "sites": space.total, "range_limit": range_limit,
        "injection_path": "engine" if isinstance(net, Network) else "general",
    }

    words = single_words(spec) and isinstance(net, Network)  # the general path measures fault objects
    attrs = {"injection_path": _path_of(net), "engine_refused": getattr(net, "reason", None)}

    def compute(chunk: int) -> dict[str, Any] | pd.DataFrame:
        """A chunk's rows: numpy columns (:func:`word_columns`) on the words path, else a DataFrame."""
        faults = sample_chunk(space, sample_seed, chunk)
        if words:
            return word_columns(space, faults, measure.words(space, faults), y is not None)
        records = chunk_table(space, faults)
        measured = measure(_fault_objects(records))
        return chunk_rows(faults, records, measured, y is not None)

    def sizes(chunks: Iterable[int]) -> int:
        return sum(min(spec.chunk_size, total - c * spec.chunk_size) for c in chunks)

    def frame(part: dict[str, Any] | pd.DataFrame) -> pd.DataFrame:
        return part_frame(part) if isinstance(part, dict) else part

    def count(part: dict[str, Any] | pd.DataFrame) -> int:
        return len(part["config_id"]) if isinstance(part, dict) else len(part)

    if out is None:
        frames = []
        with _progress(sizes(mine), 0, progress, "inject") as bar:
            for c in mine:
                frames.append(compute(c))
                bar.update(count(frames[-1]))
        if words:
            return Rows(frames, attrs)
        import pandas as pd

        return Rows.of_frame(_tag(pd.concat(frames, ignore_index=True), net))

    path = Path(out)
    single_file = path.suffix == ".parquet"
    if single_file and path.exists():
        found = file_manifest(path)
        if found is None:
            raise HwrelError(f"results file {path}: exists and is not a hwrel campaign file; "
                             "choose another --out")
        check_same(found, manifest, path)
        import pandas as pd

        df = pd.read_parquet(path)
        need = set(mine)
        have = set((df["config_id"] // spec.chunk_size).unique().tolist())
        check(need <= have, f"results file {path}: holds other chunks of this campaign (another "
              "shard?); choose another --out")
        return Rows.of_frame(_tag(df[(df["config_id"] // spec.chunk_size).isin(need)].reset_index(drop=True), net))
    store = ChunkStore(path.with_name(path.name + ".parts") if single_file else path, manifest)
    done = store.done()
    todo = [c for c in mine if c not in done]
    fresh: dict[int, dict[str, Any] | pd.DataFrame] = {}  # computed now: kept, not read back from the parts
    with _progress(sizes(mine), sizes(c for c in mine if c in done), progress, "inject") as bar:
        for c in todo:
            part = compute(c)
            store.write(c, part)
            fresh[c] = part
            bar.update(count(part))
    file_meta = dict(manifest, shard=None if sh is None else list(sh))
    if words and mine and all(c in fresh for c in mine):
        # every chunk computed now, in config_id order (chunk c holds c*chunk_size...): no pandas
        rows = Rows([fresh[c] for c in sorted(mine)], attrs)
        if single_file:
            write_table(path, rows.table(), file_meta)
            shutil.rmtree(store.folder, ignore_errors=True)
        return rows
    import pandas as pd

    frames = [frame(fresh[c]) if c in fresh else store.read_chunk(c) for c in sorted(mine)]
    result = (pd.concat(frames, ignore_index=True).sort_values("config_id", kind="stable").reset_index(drop=True)
              if frames else pd.DataFrame())
    if single_file:
        write_parquet(path, result, file_meta)
        shutil.rmtree(store.folder, ignore_errors=True)
    return Rows.of_frame(_tag(result, net))


# ------------------------------------------------------------------------------ shards

def _load_results(path: Path) -> tuple[dict[str, Any], pd.DataFrame]:
    import pandas as pd

    if path.is_dir():
        mpath = path / "manifest.json"
        if not mpath.is_file():
            raise HwrelError(f"results folder {path}: holds no manifest.json")
        try:
            manifest = json.loads(mpath.read_text())
        except ValueError as exc:
            raise HwrelError(f"{mpath}: unreadable manifest") from exc
        return manifest, ChunkStore(path, manifest).read()
    if not path.is_file():
        raise HwrelError(f"results {path}: not found")
    manifest = file_manifest(path)
    if manifest is None:
        raise HwrelError(f"results file {path}: not a hwrel campaign file")
    return manifest, pd.read_parquet(path)


def merge_shards(paths: Sequence[str | os.PathLike[str]]) -> pd.DataFrame:
    """Rows of a whole campaign from its shards' results (folders or files), sorted by
    ``config_id``. Checks that all are the same campaign and that every configuration is present
    exactly once (a chunk found in two places must hold identical rows)."""
    import pandas as pd

    check(len(paths) > 0, "merge_shards needs at least one results path")
    first: dict[str, Any] | None = None
    frames = []
    for p in map(Path, paths):
        manifest, df = _load_results(p)
        if first is None:
            first = manifest
        else:
            check_same(manifest, first, p)
        frames.append(df)
    frames = [f for f in frames if len(f)]
    df = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame({"config_id": []})
    df = df.drop_duplicates().sort_values("config_id", kind="stable").reset_index(drop=True)
    ids = df["config_id"].to_numpy()
    if len(ids) != len(np.unique(ids)):
        dup = int(ids[np.nonzero(np.diff(ids) == 0)[0][0]])
        raise HwrelError(f"configuration {dup} has different results in different shards")
    total = int(first["configs"])
    if len(ids) != total or (total and not np.array_equal(ids, np.arange(total))):
        missing = sorted(set(range(total)) - set(ids.tolist()))
        raise HwrelError(f"incomplete campaign: {len(missing)} of {total} configurations missing "
                         f"(first {missing[:1]}); run the missing shards")
    return df


# ------------------------------------------------------------------------------ summary

def _mean(v: np.ndarray) -> float:
    """``Series.mean`` of a float64 array (its sum over its count; NaN when empty)."""
    return float(v.sum() / len(v)) if len(v) else float("nan")


def summarize(df: pd.DataFrame, by: Sequence[str] = ("layer", "bit"), confidence: float = 0.95
              ) -> pd.DataFrame:
    """Per group (default per layer and bit position) and in total (``layer == "all"``):
    ``configs``; ``sdc`` (configurations that changed the top-1 class of at least one input) with
    ``sdc_rate`` and its Wilson interval ``sdc_lo``/``sdc_hi`` at ``confidence`` (valid for random
    or exhaustive configurations); the mean ``mismatch_rate`` (fraction of (configuration, input)
    pairs with a changed class); ``nonfinite_rate``; mean and max of ``max_abs_delta``; and the mean
    ``accuracy`` when measured; for a language model (next-token metric) the mean ``agreement``
    (next-token top-1 agreement with the clean model) and the median ``cross_entropy_delta``
    (nats per token, faulty minus clean; ``exp`` of it is the perplexity ratio; the median, as one
    non-finite output makes the mean infinite). Estimates, not bounds."""
    import pandas as pd

    need = {"config_id", "max_abs_delta", "mismatch_rate", "nonfinite"} | set(by)
    missing = need - set(df.columns)
    check(not missing, f"results lack columns {', '.join(sorted(missing))}")
    cols = {k: df[k].to_numpy() for k in ("mismatch_rate", "nonfinite", "max_abs_delta", *_EXTRAS) if k in df}
    groups = []
    if len(df):
        # groupby's groups in its sorted order, each as the positions of its rows (ascending)
        for key, pos in df.groupby(list(by), sort=True).indices.items():
            groups.append((key if isinstance(key, tuple) else (key,), pos))
    total = {b: ("all" if b == "layer" else -1 if df[b].dtype.kind in "iu" else "all") for b in by}
    return pd.DataFrame(_summary(cols, by, groups, total, confidence))


_EXTRAS = ("accuracy", "agreement", "cross_entropy_delta")


def _summary(cols: dict[str, np.ndarray], by: Sequence[str], groups: Iterable[tuple[tuple, Any]],
             total: dict[str, Any], confidence: float) -> list[dict[str, Any]]:
    """The records of :func:`summarize` from the result columns and the groups' keys and row
    positions (ascending within a group), the total last."""
    # Per group from numpy slices (each group's rows in their order): the same sums, in the same
    # order, as pandas' per-group Series.mean and max, without building one DataFrame per group
    # (it dominated a 200,000-row campaign).
    cols = {"mismatch_rate": np.asarray(cols["mismatch_rate"], np.float64),
            "nonfinite": np.asarray(cols["nonfinite"]).astype(bool).astype(np.float64),
            "max_abs_delta": np.asarray(cols["max_abs_delta"], np.float64),
            **{k: np.asarray(cols[k], np.float64) for k in _EXTRAS if k in cols}}

    def agg(sel: Any) -> dict[str, Any]:
        mr, nf, mad = cols["mismatch_rate"][sel], cols["nonfinite"][sel], cols["max_abs_delta"][sel]
        n = len(mr)
        k = int((mr > 0).sum())
        lo, hi = wilson_interval(k, n, confidence)
        row = {"configs": n, "sdc": k, "sdc_rate": k / n if n else float("nan"),
               "sdc_lo": lo, "sdc_hi": hi, "mismatch_rate": _mean(mr), "nonfinite_rate": _mean(nf),
               "mean_max_abs_delta": _mean(mad), "max_max_abs_delta": float(mad.max()) if n else float("nan")}
        if "accuracy" in cols:
            row["accuracy"] = _mean(cols["accuracy"][sel])
        if "agreement" in cols:
            row["agreement"] = _mean(cols["agreement"][sel])
        if "cross_entropy_delta" in cols:
            row["median_cross_entropy_delta"] = float(np.median(cols["cross_entropy_delta"][sel])) if n \
                else float("nan")
        return row

    rows = [{**dict(zip(by, key)), **agg(pos)} for key, pos in groups]
    rows.append({**total, **agg(slice(None))})
    return rows


def summary_records(summary: pd.DataFrame) -> list[dict[str, Any]]:
    """A summary DataFrame as records of Python values (str, int, float)."""
    out = []
    for rec in summary.to_dict(orient="records"):
        out.append({k: (v.item() if isinstance(v, np.generic) else v) for k, v in rec.items()})
    return out
