"""Print a small table of records as pandas would, without importing pandas.

``hwrel inject`` prints its summary (a few dozen records of str, int and float values) as
``DataFrame(records).to_string(index=False, float_format=...)`` and, with ``--json``, as the
values ``DataFrame(records).to_json(orient="records")`` holds. Importing pandas for that costs
the command about as much as the rest of its own start-up, so :func:`to_text` and
:func:`json_records` produce the same text and the same values directly (tests compare them with
pandas). Records with other value types are handed to pandas.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Sequence


def _kind(values: list[Any]) -> str | None:
    """``"int"``, ``"float"`` or ``"str"``: the dtype pandas gives the column (None: other)."""
    if all(isinstance(v, str) for v in values):
        return "str"
    if any(isinstance(v, bool) for v in values):
        return None
    if all(isinstance(v, int) for v in values):
        return "int"
    if all(isinstance(v, (int, float)) for v in values):
        return "float"
    return None


def _columns(records: Sequence[dict[str, Any]]) -> list[tuple[str, str, list[Any]]] | None:
    names = list(records[0]) if records else []
    if not records or any(list(r) != names for r in records):
        return None
    cols = []
    for name in names:
        values = [r[name] for r in records]
        kind = _kind(values)
        if kind is None:
            return None
        cols.append((name, kind, values))
    return cols


def to_text(records: Sequence[dict[str, Any]], float_format: Callable[[float], str]) -> str:
    """``pandas.DataFrame(records).to_string(index=False, float_format=float_format)``."""
    cols = _columns(records)
    if cols is None:
        import pandas as pd

        return pd.DataFrame(list(records)).to_string(index=False, float_format=float_format)
    strcols = []
    for name, kind, values in cols:
        if kind == "str":
            cells, head = [str(v) for v in values], name
        elif kind == "int":
            cells, head = [f"{v:d}" for v in values], f" {name}"
        else:
            cells = [float_format(float(v)) if not math.isnan(v) else "NaN" for v in values]
            head = f" {name}"
        width = max(len(head), *(len(c) for c in cells))
        strcols.append([head.rjust(width)] + [c.rjust(width) for c in cells])
    return "\n".join(" ".join(col[i] for col in strcols) for i in range(len(records) + 1))


def _json_float(v: float) -> float | None:
    """The float pandas' ``to_json`` writes for ``v`` (its encoder: 10 decimal places; ``%.10g``
    beyond 1e16 and below 1e-15; NaN and infinities as null), read back."""
    if not math.isfinite(v):
        return None
    neg = v < 0
    a = -v if neg else v
    if a > 1e16 - 1 or (a != 0.0 and a < 1e-15):
        return float("%.10g" % v)
    pow10 = 1e10
    whole = int(a)
    tmp = (a - whole) * pow10
    frac = int(tmp)
    diff = tmp - frac
    if diff > 0.5:
        frac += 1
    elif diff == 0.5 and (frac == 0 or frac & 1):
        frac += 1
    if frac >= pow10:
        frac, whole = 0, whole + 1
    text = f"{whole}.{str(frac).rjust(10, '0').rstrip('0') or '0'}" if frac else f"{whole}.0"
    return float(("-" if neg else "") + text)


def json_records(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """``json.loads(pandas.DataFrame(records).to_json(orient="records"))``."""
    cols = _columns(records)
    if cols is None:
        import json

        import pandas as pd

        return json.loads(pd.DataFrame(list(records)).to_json(orient="records"))
    out: list[dict[str, Any]] = [{} for _ in records]
    for name, kind, values in cols:
        for row, v in zip(out, values):
            row[name] = _json_float(float(v)) if kind == "float" else v
    return out
