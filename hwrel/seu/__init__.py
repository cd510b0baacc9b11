"""Soft errors: accelerator descriptions (TOML), the FIT / Poisson / ECC arithmetic, and the SEU
tolerance analysis of a model mapped onto an accelerator (:func:`seu_analysis`) with its figures."""
from __future__ import annotations

from hwrel.seu.accelerator import (
    Accelerator,
    Memory,
    Protection,
    accelerators_dir,
    accelerators_table,
    list_accelerators,
    load_accelerator,
    memories_table,
)
from hwrel.seu.analysis import SEUResult, bit_profile, seu_analysis
from hwrel.seu.plots import bit_profile_plot, critical_bits_heatmap, mission_plot
from hwrel.seu.rates import (
    ALTITUDE_ANCHORS,
    HOURS_PER_YEAR,
    TARGETS,
    ResidualFit,
    Target,
    altitude_factor,
    bit_rate_per_hour,
    combine_windows,
    expected_upsets,
    fit_to_rate_per_hour,
    mission_failure_probability,
    model_fit,
    parity_residual_fit,
    parse_target,
    poisson_at_least,
    secded_residual_fit,
    secded_uncorrectable_fit,
)

__all__ = sorted([
    "ALTITUDE_ANCHORS", "Accelerator", "HOURS_PER_YEAR", "Memory", "Protection", "ResidualFit",
    "SEUResult", "TARGETS", "Target", "accelerators_dir", "accelerators_table", "altitude_factor",
    "bit_profile", "bit_profile_plot", "bit_rate_per_hour", "combine_windows",
    "critical_bits_heatmap", "expected_upsets", "fit_to_rate_per_hour", "list_accelerators",
    "load_accelerator", "memories_table", "mission_failure_probability", "mission_plot",
    "model_fit", "parity_residual_fit", "parse_target", "poisson_at_least",
    "secded_residual_fit", "secded_uncorrectable_fit", "seu_analysis",
])
