"""Figures of the reliability report, and their conversion to reproducible SVG (vector) bytes.

Every figure is a :class:`matplotlib.figure.Figure` built without pyplot's global state (no window
is ever opened). :func:`svg_bytes` writes vector SVG with text kept as text (legible and
searchable at any zoom, small files), no date and fixed element ids, so the same figure gives the
same bytes on one machine. Print rules every figure follows: fonts of at least 9 pt at the size
shown, a colour *and* a line style, marker or hatch per series (readable in greyscale), captions
that name what is drawn, and a log axis never silently drops a zero (zeros are drawn at the axis
floor with their own marker and legend entry).
"""
from __future__ import annotations

import io
import math
import re

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

FONT = 10  # pt: tick labels; axis labels and titles one point larger
_RC = {"svg.fonttype": "none", "svg.hashsalt": "hwrel", "font.size": FONT, "axes.labelsize": FONT + 1,
       "axes.titlesize": FONT + 1, "xtick.labelsize": FONT, "ytick.labelsize": FONT, "legend.fontsize": FONT - 1}
# One colour, line style and marker per series, colour-blind safe (Okabe-Ito) and distinct in greyscale.
COLORS = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000", "#F0E442")
LINES = ("-", "--", "-.", ":", (0, (5, 1, 1, 1, 1, 1)), (0, (1, 1)), (0, (8, 2)), (0, (3, 1, 3, 3)))
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
HATCHES = ("", "//", "..", "xx", "\\\\", "++")
_METHOD_STYLE = {"paper": ("paper (closed form)", 0), "weights": ("weight-aware", 1), "interval": ("interval", 2)}


def style(k: int) -> dict:
    """Colour, line style and marker of the ``k``-th series."""
    return {"color": COLORS[k % len(COLORS)], "linestyle": LINES[k % len(LINES)], "marker": MARKERS[k % len(MARKERS)]}


def styled(fn):
    """Build the figure with the report's fonts (rcParams apply to text as it is created)."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with matplotlib.rc_context(_RC):
            return fn(*args, **kwargs)
    return wrapper


def new_figure(width: float, height: float) -> Figure:
    return Figure(figsize=(width, height))


def svg_bytes(fig: Figure) -> bytes:
    """SVG bytes of ``fig`` (vector, text as text, no date, fixed ids: stable bytes for equal figures)."""
    buf = io.BytesIO()
    with matplotlib.rc_context(_RC):
        fig.savefig(buf, format="svg", metadata={"Date": None, "Creator": None})
    try:  # figures made through pyplot must be released
        import matplotlib.pyplot as plt

        plt.close(fig)
    except Exception:  # pragma: no cover - pyplot unavailable: nothing was registered
        pass
    return re.sub(rb"<!-- Created with [^>]*-->\n?", b"", buf.getvalue())


def svg_size(svg: bytes) -> tuple[float, float]:
    """(width, height) in CSS pixels (96 per inch) of an SVG written by :func:`svg_bytes`."""
    m = re.search(rb'<svg[^>]*width="([0-9.]+)pt"[^>]*height="([0-9.]+)pt"', svg)
    return (float(m.group(1)) * 4 / 3, float(m.group(2)) * 4 / 3) if m else (0.0, 0.0)


def _positive(v: np.ndarray) -> np.ndarray:
    v = np.asarray(v, dtype=float)
    return np.where(v > 0, v, np.nan)


def log_with_zeros(ax, x, y, label: str, k: int, floor: float | None = None, **kw) -> float | None:
    """Plot ``y`` against ``x`` on a log y axis; zeros (which a log axis cannot show) are drawn as
    open markers at ``floor`` (default: a decade below the smallest positive value) with a legend
    entry saying so. Returns the floor used (None when there was no zero)."""
    y = np.asarray(y, dtype=float)
    x = np.asarray(x, dtype=float)
    st = {**style(k), **kw}
    ax.plot(x, _positive(y), label=label, ms=4, lw=1.6, **st)
    zero = (y == 0)
    if not zero.any():
        return None
    pos = y[y > 0]
    if floor is None:
        floor = 10 ** math.floor(math.log10(pos.min())) / 10 if pos.size else 1e-12
    ax.plot(x[zero], np.full(int(zero.sum()), floor), linestyle="none", marker=st["marker"], ms=7,
            mfc="none", mec=st["color"], mew=1.5, label=f"{label}: 0 (drawn at {floor:.0e})")
    return floor


@styled
def fep_bounds_figure(bounds: pd.DataFrame, measured: pd.DataFrame | None, title: str) -> Figure:
    """One panel per fault kind: certified bound per method and the measured worst output change
    (log scale) for each (layer, failures) configuration.

    ``bounds``: columns fault, layer_name, failures, paper, weights, interval. ``measured``:
    columns fault, layer_name, failures, measured_worst (or None)."""
    faults = list(dict.fromkeys(bounds["fault"]))
    fig = new_figure(9.5, 4.4)
    axes = np.atleast_1d(fig.subplots(1, len(faults), squeeze=False)[0])
    for ax, fault in zip(axes, faults):
        b = bounds[bounds["fault"] == fault].reset_index(drop=True)
        labels = [f"{r.layer_name}\nf={r.failures}" for r in b.itertuples()]
        xs = np.arange(len(b))
        width = 0.8 / (len(_METHOD_STYLE) + 1)
        for col, (label, k) in _METHOD_STYLE.items():
            ax.bar(xs + (k - 1.5) * width, _positive(b[col]), width, label=f"bound: {label}", color=COLORS[k],
                   hatch=HATCHES[k], edgecolor="white" if not HATCHES[k] else "black", linewidth=0.4)
        if measured is not None and len(measured):
            m = measured[measured["fault"] == fault].merge(b[["layer_name", "failures"]].reset_index(),
                                                           on=["layer_name", "failures"])
            ax.bar(m["index"] + 1.5 * width, _positive(m["measured_worst"]), width,
                   label="measured worst (injection)", color="0.75", hatch="xx", edgecolor="black", linewidth=0.4)
        ax.set_yscale("log")
        ax.set_xticks(xs, labels)
        ax.set_ylabel("max |output change| (logits)")
        ax.set_title(fault)
        ax.grid(axis="y", which="major", alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), frameon=False)
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    return fig


@styled
def validation_figure(checks: pd.DataFrame) -> Figure:
    """Every (prediction, measurement) pair: measured against certified, log-log, with the
    diagonal; a point above the diagonal is a violated bound (drawn as a red cross)."""
    fig = new_figure(6.4, 5.0)
    ax = fig.subplots()
    if "must_hold" in checks:
        checks = checks[checks["must_hold"] == "measured <= bound"]
    c = checks[np.isfinite(checks["bound"].astype(float)) & (checks["bound"].astype(float) > 0)
               & (checks["measured"].astype(float) > 0)]
    lo, hi = math.inf, 0.0
    for k, (what, grp) in enumerate(c.groupby("analysis", sort=False)):
        ok = grp[~grp["violated"].astype(bool)]
        ax.scatter(ok["bound"].astype(float), ok["measured"].astype(float), s=26, label=what,
                   color=COLORS[k % len(COLORS)], marker=MARKERS[k % len(MARKERS)], alpha=0.85,
                   edgecolors="black", linewidths=0.3)
        lo = min(lo, float(grp[["bound", "measured"]].astype(float).min().min()))
        hi = max(hi, float(grp[["bound", "measured"]].astype(float).max().max()))
    bad = c[c["violated"].astype(bool)]
    if len(bad):
        ax.scatter(bad["bound"].astype(float), bad["measured"].astype(float), s=60, marker="x",
                   color="red", label="VIOLATED BOUND", zorder=5)
    if hi > 0:
        ax.plot([lo / 2, hi * 2], [lo / 2, hi * 2], "k--", lw=1.0, label="measured = bound")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("certified bound")
    ax.set_ylabel("measured by fault injection")
    ax.legend(loc="upper left", framealpha=0.9)
    ax.set_title("every point must lie on or below the diagonal")
    fig.tight_layout()
    return fig


@styled
def tolerance_figure(curve: pd.DataFrame, clean: float, drop: float) -> Figure:
    """Certified accuracy (sound lower bound) against failed neurons in one layer, per fault kind,
    with the budget ``clean - drop`` drawn dashed."""
    fig = new_figure(7.5, 4.0)
    ax = fig.subplots()
    styles = {"crash": "-", "byzantine": "--"}
    names = list(dict.fromkeys(curve["layer_name"]))
    for j, ((fault, name), grp) in enumerate(curve.groupby(["fault", "layer_name"], sort=False)):
        k = names.index(name)  # marker per layer, line style per fault, colour per curve
        c = COLORS[j % len(COLORS)]
        ax.plot(grp["failures"].clip(lower=0.5), grp["certified_accuracy"], linestyle=styles.get(fault, ":"),
                marker=MARKERS[k % len(MARKERS)], ms=5, lw=1.6, color=c,
                mfc="white" if fault != "crash" else c, label=f"{name} {fault}")
    ax.axhline(clean - drop, color="k", lw=1.2, ls=":", label=f"budget ({clean:.2%} - {drop:.2%})")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("failed neurons in the layer (0 drawn at 0.5)")
    ax.set_ylabel("certified accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(ncol=2, framealpha=0.9)
    fig.tight_layout()
    return fig


@styled
def bitwidth_figure(t: pd.DataFrame, spec: str) -> Figure:
    """Left: output change per bit width (log): certified bounds over the domain, certified per
    test input, adversarial, estimated and measured; zeros drawn at the floor. Right: accuracies."""
    fig = new_figure(11.0, 5.6)
    a1, a2 = fig.subplots(1, 2)
    series = (("bound_paper", "certified, paper (any input)"), ("bound_weights", "certified, weight-aware (any input)"),
              ("bound_interval", "certified, interval (any input)"),
              ("certified_error", "certified, per test input (max)"), ("adversarial_error", "adversarial search (max)"),
              ("estimated_error", "estimated (3 sigma, max)"), ("measured_error", "measured, Brevitas PTQ (max)"))
    shown = [(c, lab) for c, lab in series if c in t]
    vals = np.concatenate([t[c].to_numpy(float) for c, _ in shown]) if shown else np.zeros(0)
    pos = vals[vals > 0]
    floor = 10 ** math.floor(math.log10(pos.min())) / 10 if pos.size else 1e-12
    for k, (col, label) in enumerate(shown):
        log_with_zeros(a1, t["bits"], t[col], label, k, floor=floor)
    a1.set_yscale("log")
    a1.set_xlabel("weight bit width")
    a1.set_ylabel("largest output change (logits)")
    a1.grid(alpha=0.3)
    a1.legend(loc="upper left", bbox_to_anchor=(0, -0.16), ncol=2, frameon=False)
    for k, (col, label) in enumerate((("certified_accuracy", "certified (lower bound)"),
                                      ("adversarial_accuracy", "adversarial"),
                                      ("estimated_accuracy", "estimated"), ("measured_accuracy", "measured (PTQ)"))):
        if col in t:
            a2.plot(t["bits"], t[col], ms=4, lw=1.6, label=label, **style(k + 3))
    a2.axhline(t["clean_accuracy"].iloc[0], color="0.4", lw=1.2, ls=(0, (1, 1)), label="float model")
    a2.set_xlabel("weight bit width")
    a2.set_ylabel("test accuracy")
    a2.set_ylim(-0.02, 1.02)
    a2.grid(alpha=0.3)
    a2.legend(loc="upper left", bbox_to_anchor=(0, -0.16), ncol=2, frameon=False)
    fig.suptitle(f"quantization as a bounded perturbation ({spec})")
    fig.tight_layout()
    return fig
