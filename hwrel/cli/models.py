"""``hwrel models``: list the built-in reference models (never trains anything)."""
from __future__ import annotations

import argparse
import json
import math

from hwrel import models


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list the built-in reference models",
                       description="List the built-in reference models, with the test accuracy "
                       "of their cached weights (they are trained on first use, not here).")
    p.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    p.add_argument("--cache-dir", default=None,
                   help="model cache root (default: $HWREL_CACHE or ~/.cache/hwrel)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    table = models.describe(cache_dir=args.cache_dir)
    records = []
    for row in table.to_dict(orient="records"):
        acc = row["test_accuracy"]
        records.append({
            "name": row["name"], "description": row["description"], "dataset": row["dataset"],
            "parameters": int(row["parameters"]), "input_shape": list(row["input_shape"]),
            "input_domain": list(row["input_domain"]),
            "test_accuracy": None if math.isnan(acc) else float(acc),
        })
    if args.json:
        print(json.dumps(records, indent=2))
        return 0
    shown = table.assign(
        input_shape=[" x ".join(map(str, r["input_shape"])) for r in records],
        input_domain=[f"[{lo:g}, {hi:g}]" for lo, hi in table["input_domain"]],
        test_accuracy=[("not trained yet" if r["test_accuracy"] is None
                        else f"{r['test_accuracy']:.4f}") for r in records],
    )
    print(shown.to_string(index=False))
    return 0
