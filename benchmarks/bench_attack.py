"""Fewest bit flips that break an accuracy budget: hwrel's search vs the progressive bit search.

Baseline: the progressive bit search of Rakin et al., *Bit-Flip Attack: Crushing Neural Network
with Progressive Bit Search* (ICCV 2019; 13 flips take 8-bit ResNet-18 on ImageNet to chance),
implemented in :func:`hwrel.seu.attack.progressive_bit_search` (per iteration: gradient rank of
every bit within each tensor, the best bit of the tensor whose flip raises the loss most). hwrel:
:func:`hwrel.seu.attack.adversarial_flips`. Same run, same model, same storage, same inputs, same
goal: every reference model stored in int8 (symmetric per-tensor weight codes, int32 biases, as
:mod:`hwrel.seu.mapping` stores them), 256 seeded test inputs, measured accuracy drop above the
budget (1 % and 50 %). Two fault spaces: every stored bit, and weight bits only (biases protected,
Rakin's setting). Target: hwrel needs no more flips than the baseline in every row.
Writes benchmarks/results/attack.json and .md.

    python benchmarks/bench_attack.py [MODEL ...]      # all four reference models, ~3-6 min
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch


def run(names: list[str], drops=(0.01, 0.5), samples: int = 256, max_flips: int = 64) -> list[dict]:
    from hwrel import models
    from hwrel.formats import IntFormat
    from hwrel.network import Network
    from hwrel.seu.attack import adversarial_flips, progressive_bit_search
    from hwrel.seu.mapping import ModelMapping, store_parameters

    rows = []
    for name in names:
        rm = models.load(name)
        net = Network.from_module(rm.module, rm.input_domain, rm.input_shape)
        stored = store_parameters(net, IntFormat(8))
        net64 = ModelMapping(None, IntFormat(8), tuple(stored)).deployed(net.to())  # type: ignore[arg-type]
        g = torch.Generator().manual_seed(0)
        keep = torch.randperm(rm.x_test.shape[0], generator=g)[:samples].sort().values
        x, y = rm.x_test[keep].to(torch.float64), rm.y_test[keep]
        for space, tensors in (("all stored bits", stored),
                               ("weight bits only", [t for t in stored if t.part == "weight"])):
            for drop in drops:
                row = {"model": name, "fault_space": space, "bits": sum(t.bits for t in tensors),
                       "max_accuracy_drop": drop, "inputs": int(x.shape[0])}
                for key, fn in (("pbs", progressive_bit_search), ("hwrel", adversarial_flips)):
                    t0 = time.perf_counter()
                    r = fn(net64, tensors, x, y, max_accuracy_drop=drop, max_flips=max_flips)
                    row.update({f"{key}_flips": r.flips_needed, f"{key}_accuracy": r.accuracy,
                                f"{key}_forwards": r.forwards, f"{key}_s": time.perf_counter() - t0,
                                f"{key}_found": r.describe(3)})
                    row["clean_accuracy"] = r.clean_accuracy
                p, h = row["pbs_flips"], row["hwrel_flips"]
                row["hwrel_no_more"] = h is not None and (p is None or h <= p)
                rows.append(row)
                print(f"{name:20s} {space:17s} drop {drop:>4g}: PBS {p} flips ({row['pbs_s']:.1f} s), "
                      f"hwrel {h} flips ({row['hwrel_s']:.1f} s)", flush=True)
    return rows


def write(rows: list[dict], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "attack.json").write_text(json.dumps({"torch": torch.__version__, "threads": torch.get_num_threads(),
                                                 "rows": rows}, indent=1))
    lines = ["# Fewest bit flips breaking the accuracy budget (int8 storage, 256 inputs)", "",
             "Baseline: progressive bit search (Rakin et al., ICCV 2019); hwrel: `hwrel.seu.attack."
             "adversarial_flips`. Same run, model, storage, inputs and goal (measured accuracy drop > budget).",
             "", "| model | fault space | bits | clean acc | budget | PBS flips | hwrel flips | hwrel <= PBS "
             "| PBS s | hwrel s | hwrel's flips |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['fault_space']} | {r['bits']:,} | {r['clean_accuracy']:.2%} | "
                     f"{r['max_accuracy_drop']:.0%} | {r['pbs_flips']} | {r['hwrel_flips']} | "
                     f"{'yes' if r['hwrel_no_more'] else '**NO**'} | {r['pbs_s']:.1f} | {r['hwrel_s']:.1f} | "
                     f"{r['hwrel_found']} |")
    met = all(r["hwrel_no_more"] for r in rows)
    lines += ["", f"Target (hwrel needs no more flips than the baseline in every row): {'met' if met else 'NOT met'}."]
    (out / "attack.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    from hwrel import models

    torch.set_num_threads(1)
    names = sys.argv[1:] or list(models.names())
    rows = run(names)
    write(rows, Path(__file__).resolve().parent / "results")
    sys.exit(0 if all(r["hwrel_no_more"] for r in rows) else 1)
