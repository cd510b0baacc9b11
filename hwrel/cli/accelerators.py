"""``hwrel accelerators``: list and validate the accelerator descriptions (TOML)."""
from __future__ import annotations

import argparse
import json
from typing import Any

from hwrel.seu import accelerator as acc_mod


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("accelerators", help="list and validate accelerator descriptions",
                       description="Load and validate every accelerator description in "
                       "accelerator_models/ (or $HWREL_ACCELERATORS), or the given files, and "
                       "list them with on-chip memory, formats, protection and raw soft-error "
                       "rates with their confidence.")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--memories", action="store_true", help="one row per memory instead of "
                   "one per accelerator")
    p.add_argument("--validate", nargs="+", metavar="PATH", default=None,
                   help="validate these TOML files (or names) instead of the shipped ones")
    p.set_defaults(func=run)


def _record(acc: acc_mod.Accelerator) -> dict[str, Any]:
    return {
        "name": acc.name, "title": acc.title, "vendor": acc.vendor, "path": str(acc.path),
        "technology_node_nm": acc.technology_node_nm, "clock_mhz": acc.clock_mhz,
        "confidence": dict(acc.confidence), "formats": list(acc.formats),
        "on_chip_bytes": acc.on_chip_bytes, "sources": list(acc.sources),
        "memories": [{
            "name": m.name, "off_chip": m.off_chip, "size_bytes": m.size_bytes,
            "bits": m.bits, "stored_bits": m.stored_bits, "holds": list(m.holds),
            "word_bits": m.word_bits, "protection": m.protection.kind,
            "ecc_data_bits": m.protection.data_bits, "ecc_check_bits": m.protection.check_bits,
            "interleave": m.protection.interleave, "ser_fit_per_mbit": m.ser_fit_per_mbit,
            "mbu_fraction": m.mbu_fraction, "ser_source": m.ser_source, "source": m.source,
            "confidence": dict(m.confidence),
        } for m in acc.memories],
    }


def run(args: argparse.Namespace) -> int:
    names = args.validate if args.validate is not None else acc_mod.list_accelerators()
    # Load everything first: a bad file raises before anything is printed.
    loaded = [acc_mod.load_accelerator(n) for n in names]
    if args.json:
        print(json.dumps([_record(a) for a in loaded], indent=2))
        return 0
    if not loaded:
        print(f"no accelerator descriptions in {acc_mod.accelerators_dir()}")
        return 0
    paths = [str(a.path) for a in loaded]
    table = acc_mod.memories_table(paths) if args.memories else acc_mod.accelerators_table(paths)
    if args.memories:
        table = table.drop(columns=["ser_source"])
    print(table.to_string(index=False))
    if args.validate is not None:
        print(f"{len(loaded)} description(s) valid")
    return 0
