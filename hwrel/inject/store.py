"""Crash-safe result storage for campaigns: Parquet chunks plus a manifest.

A results *folder* holds ``manifest.json`` (the campaign's identity: spec hash, seed, model and
data fingerprints, hwrel version, number of configurations and chunks) and one
``part-NNNNN.parquet`` per finished chunk. Every file is written to a temp file in the same folder
and ``os.replace``d into place, so a process killed at any moment (SIGKILL included) leaves only
whole chunks; a rerun reads the manifest, checks it is the same campaign and continues with the
missing chunks. Shards may share one folder (the manifest does not depend on the shard).

A results *file* (``--out results.parquet``) is built the same way in ``results.parquet.parts/``
and, once every chunk of the run is there, written atomically as one Parquet file carrying the
manifest in its metadata; the parts folder is then removed.

A folder or file from another campaign is an error (:class:`HwrelError`) and is never touched.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

from hwrel.errors import HwrelError

if TYPE_CHECKING:  # imported where used: pandas and pyarrow cost a command's start-up
    import pandas as pd
    import pyarrow as pa

MANIFEST = "manifest.json"
MAGIC = "hwrel-campaign"
_PART = re.compile(r"part-(\d{5,})\.parquet")
# Fields that make two campaigns the same; anything else in the manifest is informative.
IDENTITY = ("spec_hash", "seed", "model_fingerprint", "data_fingerprint", "hwrel_version",
            "configs", "chunk_size")


def part_name(chunk: int) -> str:
    return f"part-{chunk:05d}.parquet"


def _atomic_write(path: Path, write: Any) -> None:
    """Call ``write(tmp_path)`` then ``os.replace`` the temp file onto ``path``."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_parquet(path: Path, df: pd.DataFrame, manifest: dict[str, Any] | None = None) -> None:
    """Write ``df`` to ``path`` atomically (the manifest, if given, in the file's metadata)."""
    import pyarrow as pa

    write_table(path, pa.Table.from_pandas(df, preserve_index=False), manifest)


def write_table(path: Path, table: pa.Table, manifest: dict[str, Any] | None = None) -> None:
    """:func:`write_parquet` of a ``pyarrow.Table`` (the rows of
    :meth:`hwrel.inject.rows.Rows.table`: no pandas)."""
    import pyarrow.parquet as pq

    if manifest is not None:
        meta = dict(table.schema.metadata or {})
        meta[MAGIC.encode()] = json.dumps(manifest, sort_keys=True).encode()
        table = table.replace_schema_metadata(meta)
    dict_cols = _dictionary_columns(table)
    _atomic_write(path, lambda tmp: pq.write_table(table, tmp, use_dictionary=dict_cols))


# Columns of one value per row: dictionary-encoding them is wasted work (it more than doubled the
# write of a 200,000-row campaign); the encoding changes the file's bytes, never what it reads back.
_UNIQUE_PER_ROW = frozenset({"faults"})


def _dictionary_columns(table: pa.Table) -> list[str]:
    """String columns of few distinct values (layer, site, kind, format names): those worth a
    dictionary encoding; numbers and the per-row ``faults`` text are written plain."""
    import pyarrow as pa

    return [f.name for f in table.schema if f.name not in _UNIQUE_PER_ROW
            and (pa.types.is_string(f.type) or pa.types.is_large_string(f.type))]


def file_manifest(path: Path) -> dict[str, Any] | None:
    """The manifest stored in a results file's metadata, or None if it holds none."""
    import pyarrow.parquet as pq

    try:
        meta = pq.read_schema(path).metadata or {}
    except Exception as exc:
        raise HwrelError(f"results file {path}: not a readable Parquet file ({type(exc).__name__})"
                         ) from exc
    raw = meta.get(MAGIC.encode())
    return None if raw is None else json.loads(raw)


def check_same(found: dict[str, Any], expected: dict[str, Any], where: Path) -> None:
    """Raise unless ``found`` is the manifest of the same campaign as ``expected``."""
    if found.get("format") != MAGIC:
        raise HwrelError(f"{where}: not a hwrel campaign manifest")
    for key in IDENTITY:
        if found.get(key) != expected.get(key):
            raise HwrelError(f"{where}: results of another campaign ({key} {found.get(key)!r} != "
                             f"{expected.get(key)!r}); choose another --out or remove it")


class ChunkStore:
    """A results folder: the manifest and one Parquet part per finished chunk."""

    def __init__(self, folder: str | os.PathLike[str], manifest: dict[str, Any]):
        self.folder = Path(folder)
        self.manifest = dict(manifest, format=MAGIC)
        if self.folder.exists() and not self.folder.is_dir():
            raise HwrelError(f"results folder {self.folder}: exists and is not a folder")
        mpath = self.folder / MANIFEST
        if mpath.is_file():
            try:
                found = json.loads(mpath.read_text())
            except (OSError, ValueError) as exc:
                raise HwrelError(f"{mpath}: unreadable manifest ({type(exc).__name__})") from exc
            check_same(found, self.manifest, mpath)
        elif self.folder.is_dir() and any(not p.name.startswith(".") for p in self.folder.iterdir()):
            raise HwrelError(f"results folder {self.folder}: not empty and holds no {MANIFEST}; "
                             "choose another --out")
        else:
            self.folder.mkdir(parents=True, exist_ok=True)
            text = json.dumps(self.manifest, sort_keys=True, indent=2)
            _atomic_write(mpath, lambda tmp: Path(tmp).write_text(text))

    def done(self) -> set[int]:
        """Chunks whose part file is in place (written whole, by construction)."""
        out = set()
        for p in self.folder.iterdir():
            m = _PART.fullmatch(p.name)
            if m:
                out.add(int(m.group(1)))
        return out

    def write(self, chunk: int, rows: pd.DataFrame | dict[str, Any]) -> None:
        """Write one chunk's rows: a DataFrame, or the columns of
        :func:`hwrel.inject.campaign.word_columns` (written without pandas)."""
        if isinstance(rows, dict):
            from hwrel.inject.rows import Rows

            write_table(self.folder / part_name(chunk), Rows([rows]).table())
        else:
            write_parquet(self.folder / part_name(chunk), rows)

    def read(self, chunks: Iterable[int] | None = None) -> pd.DataFrame:
        """Rows of the given chunks (default: all finished), sorted by ``config_id``."""
        import pandas as pd

        ids = sorted(self.done() if chunks is None else chunks)
        frames = [self.read_chunk(c) for c in ids]
        if not frames:
            return pd.DataFrame()
        return pd.concat(frames, ignore_index=True).sort_values("config_id", kind="stable"
                                                                ).reset_index(drop=True)

    def read_chunk(self, chunk: int) -> pd.DataFrame:
        import pyarrow.parquet as pq

        path = self.folder / part_name(chunk)
        try:
            df = pq.read_table(path).to_pandas()
        except Exception as exc:
            raise HwrelError(f"results part {path}: unreadable ({type(exc).__name__}); remove it "
                             "and run again to recompute that chunk") from exc
        cs, total = int(self.manifest["chunk_size"]), int(self.manifest["configs"])
        expected = list(range(chunk * cs, min((chunk + 1) * cs, total)))
        if df["config_id"].tolist() != expected:
            raise HwrelError(f"results part {path}: does not hold configurations "
                             f"{expected[0]}..{expected[-1]} in order; remove it and run again")
        return df

    def remove(self) -> None:
        shutil.rmtree(self.folder)
