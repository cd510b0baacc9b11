"""``hwrel models``: list the built-in reference models (never trains, unless ``--retrain``)."""
from __future__ import annotations

import argparse
import json
import math
import sys
from typing import Any


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list the built-in reference models",
                       description="List the built-in reference models with the test accuracy "
                       "of their weights, which ship with hwrel (hwrel/weights/*.safetensors). "
                       "--retrain trains them again from their recipes and rewrites those files.")
    p.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    p.add_argument("--cache-dir", default=None,
                   help="model cache root, used only where shipped weights are missing "
                        "(default: $HWREL_CACHE or ~/.cache/hwrel)")
    p.add_argument("--retrain", nargs="*", default=None, metavar="NAME",
                   help="train these built-in models (default: all) and rewrite their shipped "
                        "weights files")
    p.add_argument("--weights-dir", default=None, metavar="DIR",
                   help="with --retrain: write the weights files here instead of the package's "
                        "hwrel/weights/")
    p.set_defaults(func=run)


def _retrain(args: argparse.Namespace) -> int:
    from hwrel import models

    for name in args.retrain:
        models.weights_path(name)  # an unknown name fails before any training
    table = models.retrain(args.retrain or None, weights_dir=args.weights_dir)
    if args.json:
        print(table.to_json(orient="records", indent=2))
        return 0
    for r in table.itertuples():
        what = "unchanged" if not r.changed else (
            "new" if math.isnan(r.test_accuracy_before)
            else f"changed (test accuracy was {r.test_accuracy_before:.4f})")
        print(f"{r.name}: test accuracy {r.test_accuracy:.4f}, {r.bytes:,} bytes, {what}: {r.path}")
    return 0


def run(args: argparse.Namespace) -> int:
    if args.weights_dir is not None and args.retrain is None:
        from hwrel.errors import HwrelError

        raise HwrelError("--weights-dir only goes with --retrain")
    if args.retrain is not None:
        return _retrain(args)
    rows = None
    if "hwrel.models" not in sys.modules:  # the shipped files answer without torch (or pandas)
        from hwrel.catalog import shipped_table

        rows = shipped_table()
    if rows is None:
        from hwrel import models

        rows = models.describe(cache_dir=args.cache_dir).to_dict(orient="records")
    records = []
    for row in rows:
        acc = row["test_accuracy"]
        records.append({
            "name": row["name"], "task": row["task"], "description": row["description"], "dataset": row["dataset"],
            "parameters": int(row["parameters"]), "input_shape": list(row["input_shape"]),
            "input_domain": list(row["input_domain"]), "weights": row["weights"],
            "test_accuracy": None if math.isnan(acc) else float(acc),
        })
    if args.json:
        print(json.dumps(records, indent=2))
        return 0
    shown = [{**r, "input_shape": " x ".join(map(str, r["input_shape"])),
              "input_domain": f"[{r['input_domain'][0]:g}, {r['input_domain'][1]:g}]",
              "test_accuracy": "-" if r["test_accuracy"] is None else f"{r['test_accuracy']:.4f}"}
             for r in records]
    print(_table(shown, ["name", "task", "description", "dataset", "parameters", "input_shape", "input_domain",
                         "weights", "test_accuracy"]))
    return 0


def _table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    """Right-aligned columns separated by one space, numbers one wider (as pandas'
    ``to_string(index=False)`` prints them)."""
    cells = [[str(c) for c in columns]] + [[str(r[c]) for c in columns] for r in rows]
    num = [all(isinstance(r[c], int) for r in rows) for c in columns]
    widths = [max(len(row[i]) for row in cells) + num[i] for i in range(len(columns))]
    return "\n".join(" ".join(v.rjust(w) for v, w in zip(row, widths)) for row in cells)
