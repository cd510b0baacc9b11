"""Figures of the reliability report, and their conversion to small, reproducible PNG bytes.

Every figure is a :class:`matplotlib.figure.Figure` built without pyplot's global state (no window
is ever opened). :func:`png_bytes` renders at a modest DPI with the PNG metadata stripped, so the
same figure gives the same bytes on one machine and the committed example stays small.
"""
from __future__ import annotations

import io
import math

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

DPI = 72
_METHOD_STYLE = {"paper": ("paper (closed form)", "C3"), "weights": ("weight-aware", "C1"),
                 "interval": ("interval", "C0")}


def png_bytes(fig: Figure, dpi: int = DPI) -> bytes:
    """PNG bytes of ``fig`` (no timestamps or software tag: stable bytes for equal figures)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, metadata={"Software": None})
    try:  # figures made through pyplot (e.g. BitwidthResult.plot) must be released
        import matplotlib.pyplot as plt

        plt.close(fig)
    except Exception:  # pragma: no cover - pyplot unavailable: nothing was registered
        pass
    return buf.getvalue()


def _positive(v: np.ndarray) -> np.ndarray:
    v = np.asarray(v, dtype=float)
    return np.where(v > 0, v, np.nan)


def fep_bounds_figure(bounds: pd.DataFrame, measured: pd.DataFrame | None, title: str) -> Figure:
    """One panel per fault kind: certified bound per method and the measured worst output change
    (log scale) for each (layer, failures) configuration.

    ``bounds``: columns fault, layer_name, failures, paper, weights, interval. ``measured``:
    columns fault, layer_name, failures, measured_worst (or None)."""
    faults = list(dict.fromkeys(bounds["fault"]))
    fig = Figure(figsize=(9.5, 3.4))
    axes = np.atleast_1d(fig.subplots(1, len(faults), squeeze=False)[0])
    for ax, fault in zip(axes, faults):
        b = bounds[bounds["fault"] == fault].reset_index(drop=True)
        labels = [f"{r.layer_name}\nf={r.failures}" for r in b.itertuples()]
        xs = np.arange(len(b))
        width = 0.8 / (len(_METHOD_STYLE) + 1)
        for k, (col, (label, color)) in enumerate(_METHOD_STYLE.items()):
            ax.bar(xs + (k - 1.5) * width, _positive(b[col]), width, label=f"bound: {label}", color=color)
        if measured is not None and len(measured):
            m = measured[measured["fault"] == fault].merge(b[["layer_name", "failures"]].reset_index(),
                                                           on=["layer_name", "failures"])
            ax.bar(m["index"] + 1.5 * width, _positive(m["measured_worst"]), width,
                   label="measured worst (injection)", color="0.35", hatch="//")
        ax.set_yscale("log")
        ax.set_xticks(xs, labels, fontsize=7)
        ax.set_ylabel("max |output change| (logits)", fontsize=8)
        ax.set_title(fault, fontsize=9)
        ax.tick_params(axis="y", labelsize=7)
    axes[0].legend(fontsize=6.5, loc="upper right")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def validation_figure(checks: pd.DataFrame) -> Figure:
    """Every (prediction, measurement) pair: measured against certified, log-log, with the
    diagonal; a point above the diagonal is a violated bound (drawn as a red cross)."""
    fig = Figure(figsize=(5.2, 4.2))
    ax = fig.subplots()
    if "must_hold" in checks:
        checks = checks[checks["must_hold"] == "measured <= bound"]
    c = checks[np.isfinite(checks["bound"].astype(float)) & (checks["bound"].astype(float) > 0)
               & (checks["measured"].astype(float) > 0)]
    lo, hi = math.inf, 0.0
    for k, (what, grp) in enumerate(c.groupby("analysis", sort=False)):
        ok = grp[~grp["violated"].astype(bool)]
        ax.scatter(ok["bound"].astype(float), ok["measured"].astype(float), s=12, label=what,
                   color=f"C{k}", alpha=0.8)
        lo = min(lo, float(grp[["bound", "measured"]].astype(float).min().min()))
        hi = max(hi, float(grp[["bound", "measured"]].astype(float).max().max()))
    bad = c[c["violated"].astype(bool)]
    if len(bad):
        ax.scatter(bad["bound"].astype(float), bad["measured"].astype(float), s=60, marker="x",
                   color="red", label="VIOLATED BOUND", zorder=5)
    if hi > 0:
        ax.plot([lo / 2, hi * 2], [lo / 2, hi * 2], "k--", lw=0.8, label="measured = bound")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("certified bound", fontsize=8)
    ax.set_ylabel("measured by fault injection", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.legend(fontsize=6.5)
    ax.set_title("every point must lie on or below the diagonal", fontsize=9)
    fig.tight_layout()
    return fig


def tolerance_figure(curve: pd.DataFrame, clean: float, drop: float) -> Figure:
    """Certified accuracy (sound lower bound) against failed neurons in one layer, per fault kind,
    with the budget ``clean - drop`` drawn dashed."""
    fig = Figure(figsize=(6.0, 3.2))
    ax = fig.subplots()
    styles = {"crash": "-", "byzantine": "--"}
    names = list(dict.fromkeys(curve["layer_name"]))
    for (fault, name), grp in curve.groupby(["fault", "layer_name"], sort=False):
        ax.plot(grp["failures"].clip(lower=0.5), grp["certified_accuracy"], styles.get(fault, ":"), marker="o",
                ms=3, color=f"C{names.index(name)}", label=f"{name} {fault}")
    ax.axhline(clean - drop, color="k", lw=0.8, ls=":", label=f"budget ({clean:.2%} - {drop:.2%})")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("failed neurons in the layer (0 drawn at 0.5)", fontsize=8)
    ax.set_ylabel("certified accuracy", fontsize=8)
    ax.set_ylim(-0.02, 1.02)
    ax.tick_params(labelsize=7)
    ax.legend(fontsize=6.5, ncol=2)
    fig.tight_layout()
    return fig
