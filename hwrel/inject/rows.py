"""A campaign's result rows as plain columns, for the command line: no pandas.

:func:`hwrel.inject.campaign.run_campaign` returns a pandas DataFrame; ``hwrel inject`` needs only
counts, the summary and (with ``--out``) a Parquet file, and importing pandas costs it about as much
as the rest of its own start-up. :class:`Rows` holds the rows of the single-bit-fault path
(:func:`hwrel.inject.campaign.single_words`) chunk by chunk as numpy arrays, with the string
columns as :class:`Text`: built (in numpy, byte for byte the text the DataFrame holds) only when
a Parquet file is written or the DataFrame is asked for. :meth:`Rows.frame` is exactly the
DataFrame ``run_campaign`` returns; rows of any other path wrap that DataFrame
(:meth:`Rows.of_frame`). Exact: nothing here computes a result, it only holds and converts them.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np


def _digits(v: np.ndarray) -> np.ndarray:
    """Decimal digits of each non-negative integer (1 for 0)."""
    n = np.ones(len(v), dtype=np.int64)
    t = v // 10
    while len(t) and bool((t > 0).any()):
        n += t > 0
        t //= 10
    return n


class Text:
    """A string column of ``n`` rows, row ``r`` the concatenation of its segments' pieces: a
    literal (``bytes``), one of a few values chosen per row (``(codes, [bytes, ...])``) or the
    decimal digits of a non-negative ``int64`` per row (an array). UTF-8."""

    def __init__(self, n: int, segments: Sequence[Any]):
        self.n = int(n)
        self.segments = list(segments)
        self._arrow: Any = None  # built once: a chunk's part file and the results file share it

    @classmethod
    def choice(cls, codes: np.ndarray, values: Sequence[str]) -> "Text":
        """Row ``r`` is ``values[codes[r]]``."""
        return cls(len(codes), [(np.asarray(codes, dtype=np.int64), [v.encode() for v in values])])

    def choices(self) -> tuple[np.ndarray, list[str]] | None:
        """``(codes, values)`` when the column is one choice per row, else None."""
        if len(self.segments) == 1 and isinstance(self.segments[0], tuple):
            codes, values = self.segments[0]
            return codes, [v.decode() for v in values]
        return None

    def buffers(self) -> tuple[np.ndarray, np.ndarray]:
        """Arrow's string layout: ``n + 1`` offsets (int64) and the UTF-8 bytes (uint8).

        Each segment gets fixed columns of an ``(n, width)`` byte grid (a choice padded, digits
        right-aligned), the unused cells hold 0 and are dropped row by row: the same bytes as
        concatenating the pieces (no piece contains a 0 byte; :meth:`_buffers_by_row` if one does)."""
        n, lens, width = self.n, [], 0
        for seg in self.segments:
            if isinstance(seg, bytes):
                lens.append(np.full(n, len(seg), dtype=np.int64))
                width += len(seg)
            elif isinstance(seg, tuple):
                codes, values = seg
                lens.append(np.array([len(v) for v in values], dtype=np.int64)[codes] if n else
                            np.zeros(0, dtype=np.int64))
                width += max((len(v) for v in values), default=0)
            else:
                check_nonnegative(seg)
                lens.append(_digits(seg))
                width += int(lens[-1].max()) if n else 0
        offsets = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(sum(lens, np.zeros(n, dtype=np.int64)), out=offsets[1:])
        if any(b"\0" in (seg if isinstance(seg, bytes) else b"".join(seg[1])) for seg in self.segments
               if not isinstance(seg, np.ndarray)):
            return offsets, self._buffers_by_row(offsets, lens)
        grid = np.zeros((n, width), dtype=np.uint8)
        col = 0
        for seg, length in zip(self.segments, lens):
            if isinstance(seg, bytes):
                grid[:, col: col + len(seg)] = np.frombuffer(seg, dtype=np.uint8)
                col += len(seg)
            elif isinstance(seg, tuple):
                codes, values = seg
                w = max((len(v) for v in values), default=0)
                table = np.zeros((len(values), w), dtype=np.uint8)
                for i, v in enumerate(values):
                    table[i, : len(v)] = np.frombuffer(v, dtype=np.uint8)
                grid[:, col: col + w] = table[codes]
                col += w
            else:
                w = int(length.max()) if n else 0
                v = seg.astype(np.int64)
                for d in range(w):  # digit d (units first) in column col + w - 1 - d
                    grid[:, col + w - 1 - d] = np.where(length > d, 48 + (v // 10 ** d) % 10, 0)
                col += w
        flat = grid.reshape(-1)
        return offsets, flat[flat != 0]

    def _buffers_by_row(self, offsets: np.ndarray, lens: list[np.ndarray]) -> np.ndarray:
        """:meth:`buffers`' bytes written piece by piece at each row's offset (any bytes)."""
        data = np.empty(int(offsets[-1]), dtype=np.uint8)
        pos = offsets[:-1].copy()
        for seg, length in zip(self.segments, lens):
            if isinstance(seg, bytes):
                if seg:
                    data[pos[:, None] + np.arange(len(seg))] = np.frombuffer(seg, dtype=np.uint8)
            elif isinstance(seg, tuple):
                codes, values = seg
                for g in np.unique(codes):
                    if values[g]:
                        rows = np.nonzero(codes == g)[0]
                        data[pos[rows, None] + np.arange(len(values[g]))] = np.frombuffer(values[g], dtype=np.uint8)
            else:
                v = seg.astype(np.int64)
                for d in range(int(length.max()) if self.n else 0):
                    has = np.nonzero(length > d)[0]
                    data[pos[has] + length[has] - 1 - d] = 48 + (v[has] // 10 ** d) % 10
            pos += length
        return data

    def arrow(self) -> Any:
        """A ``pyarrow.StringArray`` (``large_string`` beyond 2 GiB of text)."""
        if self._arrow is None:
            import pyarrow as pa

            offsets, data = self.buffers()
            if offsets[-1] < 2 ** 31:
                self._arrow = pa.StringArray.from_buffers(self.n, pa.py_buffer(offsets.astype(np.int32)),
                                                          pa.py_buffer(data))
            else:
                self._arrow = pa.LargeStringArray.from_buffers(self.n, pa.py_buffer(offsets), pa.py_buffer(data))
        return self._arrow

    def tolist(self) -> list[str]:
        offsets, data = self.buffers()
        raw = data.tobytes()
        return [raw[a:b].decode() for a, b in zip(offsets[:-1].tolist(), offsets[1:].tolist())]


def check_nonnegative(v: np.ndarray) -> None:
    if len(v) and int(v.min()) < 0:
        raise ValueError("Text: integer segments must be non-negative")


def _arrow_column(col: Any) -> Any:
    """A numpy column (int64, float64, bool) or :class:`Text` as a pyarrow Array, without the
    pandas-aware conversions of ``pyarrow.array`` (which import pandas)."""
    import pyarrow as pa

    if isinstance(col, Text):
        return col.arrow()
    arr = np.ascontiguousarray(col)
    if arr.dtype == np.bool_:
        bits = np.packbits(arr.astype(np.uint8), bitorder="little")
        return pa.Array.from_buffers(pa.bool_(), len(arr), [None, pa.py_buffer(bits)])
    kinds = {np.dtype(np.int64): pa.int64(), np.dtype(np.float64): pa.float64(),
             np.dtype(np.float32): pa.float32(), np.dtype(np.int32): pa.int32()}
    if arr.dtype not in kinds:
        raise TypeError(f"Rows: no Arrow type for a column of dtype {arr.dtype}")
    return pa.Array.from_buffers(kinds[arr.dtype], len(arr), [None, pa.py_buffer(arr)])


def _str_dtype() -> Any:
    import pandas as pd

    return pd.Series(["a"]).dtype  # pandas' default string dtype: what a column of str objects gets


def part_frame(part: dict[str, Any]) -> Any:
    """One chunk's columns as the DataFrame :func:`hwrel.inject.campaign.word_rows` returns."""
    import pandas as pd

    st = _str_dtype()
    return pd.DataFrame({k: (pd.array(v.arrow(), dtype=st) if isinstance(v, Text) else v) for k, v in part.items()})


class Rows:
    """Result rows, in ``config_id`` order: chunks of columns (``parts``), or a DataFrame.

    ``len(rows)``, ``name in rows``, ``rows[name]`` (a numpy array of a numeric column),
    :meth:`frame` (the DataFrame ``run_campaign`` returns), :meth:`table` (a pyarrow Table of the
    same columns, for a Parquet file), :meth:`summary` (the records of
    :func:`hwrel.inject.campaign.summarize`)."""

    def __init__(self, parts: Sequence[dict[str, Any]], attrs: dict[str, Any] | None = None):
        self.parts = list(parts)
        self.attrs = dict(attrs or {})
        self._df = None

    @classmethod
    def of_frame(cls, df: Any) -> "Rows":
        rows = cls([], dict(df.attrs))
        rows._df = df
        return rows

    def __len__(self) -> int:
        if self._df is not None:
            return len(self._df)
        return sum(len(p["config_id"]) for p in self.parts)

    def __contains__(self, name: str) -> bool:
        if self._df is not None:
            return name in self._df
        return bool(self.parts) and name in self.parts[0]

    def __getitem__(self, name: str) -> np.ndarray:
        if self._df is not None:
            return self._df[name].to_numpy()
        cols = [p[name] for p in self.parts]
        if any(isinstance(c, Text) for c in cols):
            return np.array([s for c in cols for s in c.tolist()], dtype=object)
        return np.concatenate(cols) if cols else np.zeros(0)

    def frame(self) -> Any:
        """The rows as the DataFrame :func:`~hwrel.inject.campaign.run_campaign` returns (the
        chunks' frames concatenated, as it has always built them)."""
        if self._df is not None:
            return self._df
        import pandas as pd

        df = pd.concat([part_frame(p) for p in self.parts], ignore_index=True) if self.parts else pd.DataFrame()
        df.attrs.update(self.attrs)
        return df

    def table(self) -> Any:
        """The rows as a ``pyarrow.Table`` (one record batch per chunk; no pandas metadata: read
        back, :func:`pandas.read_parquet` gives the same frame)."""
        import pyarrow as pa

        if self._df is not None:
            return pa.Table.from_pandas(self._df, preserve_index=False)
        names = list(self.parts[0]) if self.parts else []
        batches = [pa.RecordBatch.from_arrays([_arrow_column(p[k]) for k in names], names=names) for p in self.parts]
        return pa.Table.from_batches(batches)

    def summary(self, confidence: float = 0.95) -> list[dict[str, Any]]:
        """:func:`~hwrel.inject.campaign.summarize` per layer and bit, as records (the same
        values, in the same order: groups sorted by layer name, then bit)."""
        from hwrel.inject.campaign import summary_records, summarize

        if self._df is not None or not self.parts or (self.parts[0]["layer"].choices() is None):
            return summary_records(summarize(self.frame(), confidence=confidence))
        cols = {k: self[k] for k in ("mismatch_rate", "nonfinite", "max_abs_delta", "bit")}
        for extra in ("accuracy", "agreement", "cross_entropy_delta"):
            if extra in self:
                cols[extra] = self[extra]
        names = sorted({v for p in self.parts for v in p["layer"].choices()[1]})
        rank = {v: i for i, v in enumerate(names)}
        layer = np.concatenate([np.array([rank[v] for v in vals], dtype=np.int64)[codes] if len(codes) else
                                np.zeros(0, np.int64) for codes, vals in (p["layer"].choices() for p in self.parts)])
        bit = cols["bit"].astype(np.int64)
        order = np.lexsort((bit, layer))  # stable: each group's rows keep their (ascending) order
        ls, bs = layer[order], bit[order]
        cut = np.nonzero((ls[1:] != ls[:-1]) | (bs[1:] != bs[:-1]))[0] + 1
        groups = [((names[int(ls[a])], int(bs[a])), order[a:b])
                  for a, b in zip(np.r_[0, cut].tolist(), np.r_[cut, len(order)].tolist()) if b > a]
        from hwrel.inject.campaign import _summary

        return _summary(cols, ("layer", "bit"), groups, {"layer": "all", "bit": -1}, confidence)
