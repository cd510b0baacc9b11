"""Writers of the reliability report: one self-contained HTML page, Markdown with PNG files, CSV.

A report is a tree of plain blocks (:class:`Text`, :class:`Facts`, :class:`Table`, :class:`Fig`)
in :class:`Section` objects. :func:`write_report` writes, into an existing (empty) folder:

- ``index.html``: figures embedded as base64 SVG (vector) data URIs at their natural size, inline
  CSS, no script, no external link, font or image (it opens offline and can be mailed as one file);
- ``report.md`` with ``figures/<name>.svg`` beside it;
- ``tables/<name>.csv``: every table in full (the HTML/Markdown may show a subset of columns).
"""
from __future__ import annotations

import base64
import html
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd


@dataclass(frozen=True)
class Text:
    """A paragraph. ``kind``: "p", "ok" (green), "alert" (red, loud) or "note" (grey)."""

    text: str
    kind: str = "p"


@dataclass(frozen=True)
class Facts:
    """A two-column key/value list."""

    items: tuple[tuple[str, str], ...]


@dataclass(frozen=True, eq=False)
class Table:
    """A table; ``columns`` is the subset shown in HTML/Markdown (all of them in the CSV)."""

    name: str
    title: str
    df: pd.DataFrame
    columns: tuple[str, ...] | None = None
    note: str = ""
    max_rows: int | None = None  # rows shown in HTML/Markdown (all of them in the CSV)


@dataclass(frozen=True, eq=False)
class Fig:
    """A figure: ``svg`` bytes (:func:`hwrel.report.figures.svg_bytes`) and what it shows."""

    name: str
    title: str
    svg: bytes
    caption: str = ""


Block = Text | Facts | Table | Fig


@dataclass(frozen=True, eq=False)
class Section:
    id: str
    title: str
    blocks: tuple[Block, ...] = field(default=())


@dataclass(frozen=True, eq=False)
class Report:
    title: str
    subtitle: str
    sections: tuple[Section, ...]
    banner: Text | None = None  # shown above everything (the verdict on bound violations)
    extra_tables: tuple[Table, ...] = ()  # written to tables/*.csv only (e.g. the summary's figures)

    def tables(self) -> list[Table]:
        return [b for s in self.sections for b in s.blocks if isinstance(b, Table)] + list(self.extra_tables)

    def figures(self) -> list[Fig]:
        return [b for s in self.sections for b in s.blocks if isinstance(b, Fig)]


# ------------------------------------------------------------------------------- cells

def fmt_cell(v: object) -> str:
    """Short human form of a table cell (full precision lives in the CSV)."""
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if math.isnan(v):
            return "-"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        if v != 0 and (abs(v) >= 1e5 or abs(v) < 1e-3):
            return f"{v:.3e}"
        return f"{v:.4g}"
    if hasattr(v, "item"):
        try:
            return fmt_cell(v.item())
        except (ValueError, AttributeError):
            pass
    return str(v)


def _shown(t: Table) -> pd.DataFrame:
    df = t.df if t.columns is None else t.df[[c for c in t.columns if c in t.df.columns]]
    if t.max_rows is not None:
        df = df.head(t.max_rows)
    return df.astype(object).map(fmt_cell) if len(df) else df


def _numeric(t: Table) -> set[str]:
    types = pd.api.types
    return {c for c in t.df.columns if types.is_numeric_dtype(t.df[c]) and not types.is_bool_dtype(t.df[c])}


def _html_table(t: Table) -> str:
    df, num = _shown(t), _numeric(t)
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in df.columns)
    body = "".join("<tr>" + "".join(f'<td class="{"n" if c in num else "t"}">{html.escape(str(v))}</td>'
                                    for c, v in zip(df.columns, r)) + "</tr>" for r in df.itertuples(index=False))
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _inline(text: str) -> str:
    """HTML-escaped text with `code` spans and **bold**."""
    out = html.escape(text)
    out = re.sub(r"`([^`]+)`", r"<code>\1</code>", out)
    return re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", out)


# ------------------------------------------------------------------------------- HTML

_CSS = """
body{font-family:-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;font-size:14px;
line-height:1.45;color:#1d1d1f;margin:0;background:#f6f6f4}
main{max-width:1120px;margin:0 auto;padding:18px 28px 40px;background:#fff}
h1{font-size:22px;margin:8px 0 2px}h2{font-size:18px;border-bottom:2px solid #ddd;
padding-bottom:3px;margin-top:30px}h3{font-size:14.5px;margin:18px 0 6px}
.sub{color:#555;margin:0 0 12px}
nav{font-size:13px;background:#f0f0ec;padding:6px 10px;border-radius:4px}
nav a{margin-right:14px;color:#24527a;text-decoration:none}
.ok,.alert,.note{padding:8px 12px;border-radius:4px;margin:10px 0}
.ok{background:#e5f4e7;border-left:5px solid #2e7d32}
.alert{background:#fde8e8;border-left:6px solid #c62828;font-weight:600;font-size:15px}
.note{background:#f2f2f2;color:#444;font-size:13px}
.scroll{overflow-x:auto;margin:4px 0 10px}
table{border-collapse:collapse;font-size:12px;font-variant-numeric:tabular-nums}
th,td{border:1px solid #d8d8d8;padding:3px 7px;white-space:nowrap}
th{background:#eef1f4;text-align:center}td.n{text-align:right}td.t{text-align:left}
.src{font-size:11.5px;color:#666;margin:0 0 8px}
table.facts td{text-align:left;white-space:normal}table.facts td:first-child{font-weight:600;
background:#f7f7f7;white-space:nowrap}
figure{margin:10px 0}figure img{max-width:100%;height:auto;border:1px solid #e2e2e2}
figcaption{font-size:12.5px;color:#444}
code{background:#f0f0f0;padding:0 3px;border-radius:3px;font-size:12.5px}
"""


def _html_block(b: Block) -> str:
    if isinstance(b, Text):
        tag = "p" if b.kind == "p" else f'div class="{b.kind}"'
        end = "p" if b.kind == "p" else "div"
        return f"<{tag}>{_inline(b.text)}</{end}>"
    if isinstance(b, Facts):
        rows = "".join(f"<tr><td>{_inline(k)}</td><td>{_inline(v)}</td></tr>" for k, v in b.items)
        return f'<table class="facts">{rows}</table>'
    if isinstance(b, Table):
        body = _html_table(b) if len(b.df) else "<p>(empty)</p>"
        note = f'<div class="note">{_inline(b.note)}</div>' if b.note else ""
        more = f"first {b.max_rows} of {len(b.df)} rows; " if b.max_rows is not None and len(b.df) > b.max_rows else ""
        return (f"<h3>{_inline(b.title)}</h3>{note}<div class=\"scroll\">{body}</div>"
                f'<p class="src">{more}all rows and columns: <code>tables/{html.escape(b.name)}.csv</code></p>')
    if isinstance(b, Fig):
        from hwrel.report.figures import svg_size

        data = base64.b64encode(b.svg).decode("ascii")
        w, h = svg_size(b.svg)
        cap = f"<figcaption>{_inline(b.caption)}</figcaption>" if b.caption else ""
        return (f"<h3>{_inline(b.title)}</h3><figure id=\"fig-{html.escape(b.name)}\">"
                f'<img alt="{html.escape(b.title)}" width="{w:.0f}" height="{h:.0f}" '
                f'src="data:image/svg+xml;base64,{data}">{cap}</figure>')
    raise TypeError(f"unknown block {type(b).__name__}")


def to_html(report: Report) -> str:
    nav = "".join(f'<a href="#{s.id}">{html.escape(s.title)}</a>' for s in report.sections)
    parts = [f"<h1>{html.escape(report.title)}</h1>", f'<p class="sub">{_inline(report.subtitle)}</p>']
    if report.banner is not None:
        parts.append(_html_block(report.banner))
    parts.append(f"<nav>{nav}</nav>")
    for s in report.sections:
        parts.append(f'<section id="{s.id}"><h2>{html.escape(s.title)}</h2>')
        parts.extend(_html_block(b) for b in s.blocks)
        parts.append("</section>")
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>{html.escape(report.title)}</title><style>{_CSS}</style></head>"
            f"<body><main>{''.join(parts)}</main></body></html>\n")


# ------------------------------------------------------------------------------- Markdown

def _md_escape(s: str) -> str:
    return s.replace("|", "\\|").replace("\n", " ")


def _md_table(df: pd.DataFrame) -> str:
    if not len(df):
        return "(empty)"
    head = "| " + " | ".join(_md_escape(str(c)) for c in df.columns) + " |"
    sep = "|" + "|".join("---" for _ in df.columns) + "|"
    rows = ["| " + " | ".join(_md_escape(str(v)) for v in r) + " |" for r in df.itertuples(index=False)]
    return "\n".join([head, sep, *rows])


def _md_block(b: Block) -> str:
    if isinstance(b, Text):
        prefix = {"p": "", "ok": "> **OK:** ", "alert": "> **WARNING:** ", "note": "> "}[b.kind]
        return prefix + b.text
    if isinstance(b, Facts):
        return _md_table(pd.DataFrame(list(b.items), columns=["", " "]))
    if isinstance(b, Table):
        note = f"\n{b.note}\n" if b.note else ""
        more = f"first {b.max_rows} of {len(b.df)} rows; " if b.max_rows is not None and len(b.df) > b.max_rows else ""
        return f"### {b.title}\n{note}\n{_md_table(_shown(b))}\n\n{more}all rows and columns: `tables/{b.name}.csv`"
    if isinstance(b, Fig):
        cap = f"\n\n*{b.caption}*" if b.caption else ""
        return f"### {b.title}\n\n![{b.title}](figures/{b.name}.svg){cap}"
    raise TypeError(f"unknown block {type(b).__name__}")


def to_markdown(report: Report) -> str:
    parts = [f"# {report.title}", report.subtitle]
    if report.banner is not None:
        parts.append(_md_block(report.banner))
    parts.append("Contents: " + " | ".join(f"[{s.title}](#{s.id})" for s in report.sections))
    for s in report.sections:
        parts.append(f'<a id="{s.id}"></a>\n\n## {s.title}')
        parts.extend(_md_block(b) for b in s.blocks)
    return "\n\n".join(parts) + "\n"


# ------------------------------------------------------------------------------- files

def write_report(report: Report, folder: Path) -> None:
    """Write every file of ``report`` into ``folder`` (which must exist)."""
    (folder / "figures").mkdir()
    (folder / "tables").mkdir()
    for f in report.figures():
        (folder / "figures" / f"{f.name}.svg").write_bytes(f.svg)
    for t in report.tables():
        t.df.to_csv(folder / "tables" / f"{t.name}.csv", index=False, float_format="%.10g")
    (folder / "report.md").write_text(to_markdown(report), encoding="utf-8")
    (folder / "index.html").write_text(to_html(report), encoding="utf-8")
