"""Figures for the SEU analysis: critical-bit heat map, mission reliability, per-format bit profile.

Each function returns a matplotlib Figure (Agg-safe, nothing shown or saved).
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from hwrel.seu.analysis import SEUResult


def _log10(v: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore"):
        out = np.log10(np.where(v > 0, v, np.nan))
    return out


def critical_bits_heatmap(result: SEUResult) -> Figure:
    """Tensor x bit position: log10 of the certified damage of one flip (output units, domain-wide
    worst case); hatched white where it is infinite (Inf/NaN reachable); the vulnerable fraction
    (certified) is written in each cell above 0."""
    df = result.critical_bits
    tensors = list(dict.fromkeys(df.tensor))
    width = int(df.bit.max()) + 1
    grid = np.full((len(tensors), width), np.nan)
    frac = np.zeros_like(grid)
    inf = np.zeros_like(grid, dtype=bool)
    for r in df.itertuples():
        i = tensors.index(r.tensor)
        inf[i, r.bit] = math.isinf(r.certified_damage)
        grid[i, r.bit] = r.certified_damage
        frac[i, r.bit] = r.vulnerable_fraction
    fig = Figure(figsize=(max(7, 0.25 * width + 2.8), 0.5 * len(tensors) + 2.2))
    ax = fig.subplots()
    im = ax.imshow(_log10(np.where(inf, np.nan, grid)), aspect="auto", cmap="magma_r")
    for i, j in zip(*np.nonzero(inf)):
        ax.text(j, i, "inf", ha="center", va="center", fontsize=8, color="red")
    for i, j in zip(*np.nonzero(frac > 0)):
        ax.text(j, i, f"{frac[i, j]:.0%}", ha="center", va="center", fontsize=7, color="#00E5FF",
                fontweight="bold")
    ax.set_yticks(range(len(tensors)), tensors)
    ax.set_xticks(range(width), [str(b) for b in range(width)], fontsize=8)
    ax.set_xlabel("bit position (0 = LSB)")
    ax.set_title(f"{result.model} on {result.accelerator} ({result.format}): certified damage "
                 "of one flip")
    fig.colorbar(im, ax=ax, label="log10 max |output change|")
    fig.tight_layout()
    return fig


def mission_title(result: SEUResult) -> str:
    """``'<model> on <accelerator>: mission reliability (...)'`` with the reload policy in words."""
    scrub = (f"weights reloaded every {result.scrub_hours:g} h" if result.scrub_hours
             else "weights never reloaded during the mission")
    return f"{result.model} on {result.accelerator}: mission reliability ({scrub})"


def mission_plot(result: SEUResult) -> Figure:
    """Probabilities over mission time (log-log): at least one upset, more upsets than the
    certified tolerance, failure (budget exceeded) with and without ECC, and the FIT-only
    estimate; the target's allowance ``max_fit * t`` is drawn when a target was given. Each
    series has its own colour, line style and marker; a probability of 0 is not drawn (log axis)
    and the legend says so."""
    c = result.mission_curve
    fig = Figure(figsize=(8, 5.8))
    ax = fig.subplots()
    colors = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00")
    lines = ("-", "--", "-.", ":", (0, (5, 1, 1, 1, 1, 1)))
    markers = ("o", "s", "^", "D", "v")
    for k, (col, label) in enumerate((
            ("p_at_least_1_upset", "P(>= 1 upset)"),
            ("p_exceed_certified_flips", f"P(> {result.certified_flips} certified flips / window)"),
            ("p_failure", "P(failure), no ECC"), ("p_failure_with_ecc", "P(failure), SECDED ECC"),
            ("p_failure_fit_only", "1 - exp(-FIT t), no ECC"))):
        y = c[col].to_numpy()
        zeros = int((y <= 0).sum())
        lab = label + (f" (0 at {zeros} of {len(y)} times, not drawn)" if zeros else "")
        ax.plot(c.hours, np.where(y > 0, y, np.nan), label=lab, color=colors[k], linestyle=lines[k],
                marker=markers[k], markevery=6, ms=4, lw=1.6)
    if result.target_max_fit is not None:
        ax.plot(c.hours, result.target_max_fit * 1e-9 * c.hours, color="k", lw=1.2, linestyle=(0, (1, 1)),
                label=f"{result.target} allowance ({result.target_max_fit:g} FIT x t)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("mission time (hours)")
    ax.set_ylabel("probability")
    ax.grid(alpha=0.3)
    ax.set_title(mission_title(result))
    ax.legend(loc="upper left", bbox_to_anchor=(0, -0.14), ncol=2, frameon=False)
    fig.tight_layout()
    return fig


def bit_profile_plot(profile: pd.DataFrame) -> Figure:
    """One panel per format: measured SDC rate per bit position (bars, with and without range
    restriction) and log10 certified worst damage (lines; 'x' marks infinite bounds)."""
    fmts = list(dict.fromkeys(profile.format))
    fig = Figure(figsize=(10, 2.6 * len(fmts)))
    axes = np.atleast_1d(fig.subplots(len(fmts), 1))
    for ax, f in zip(axes, fmts):
        sub = profile[profile.format == f]
        ax2 = ax.twinx()
        for k, (rr, grp) in enumerate(sub.groupby("range_restriction")):
            off = -0.2 if not rr else 0.2
            label = "range-restricted" if rr else "plain"
            ax.bar(grp.bit + off, grp.measured_sdc, width=0.4, alpha=0.6, label=f"SDC {label}")
            dmg = grp.certified_damage.to_numpy()
            ax2.plot(grp.bit, _log10(np.where(np.isinf(dmg), np.nan, dmg)), marker=".",
                     lw=1, color=f"C{k + 2}", label=f"bound {label}")
            infs = grp[np.isinf(dmg)]
            top = np.nanmax(_log10(np.where(np.isinf(dmg), np.nan, dmg))) if len(grp) else 0
            ax2.plot(infs.bit, np.full(len(infs), top + 1), "x", color=f"C{k + 2}")
        ax.set_ylabel(f"{f}\nSDC rate")
        ax2.set_ylabel("log10 bound")
        ax.set_ylim(0, 1.05)
        ax.legend(fontsize=6, loc="upper left")
        ax2.legend(fontsize=6, loc="upper center")
    axes[-1].set_xlabel("bit position (0 = LSB)")
    fig.suptitle("Bit-position SDC: exponent MSBs of wide floats dominate; int8 and "
                 "range-restricted floats stay bounded", fontsize=9)
    fig.tight_layout()
    return fig
