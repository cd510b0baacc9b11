"""Soft errors: accelerator descriptions (TOML) and the FIT / Poisson / ECC arithmetic."""
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
    "TARGETS", "Target", "accelerators_dir", "accelerators_table", "altitude_factor",
    "bit_rate_per_hour", "combine_windows", "expected_upsets", "fit_to_rate_per_hour",
    "list_accelerators", "load_accelerator", "memories_table", "mission_failure_probability",
    "model_fit", "parity_residual_fit", "parse_target", "poisson_at_least",
    "secded_residual_fit", "secded_uncorrectable_fit",
])
