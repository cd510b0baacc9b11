"""Speed of the bit-width prediction sweep (2..16 bits) per reference model; verification separately.

Target: the whole prediction sweep (bounds by every method, per-input certificates, estimate) under
a second per reference model. The adversarial search and Brevitas verification are timed apart.
Baseline in the same run: one float forward pass of the model over the test set, x15 widths.
Writes benchmarks/results/bitwidth.json and .md.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

warnings.filterwarnings("ignore")


def main(names: list[str]) -> None:
    from hwrel import models
    from hwrel.quantize import BITS
    from hwrel.quantize.safe import _inputs, sweep

    rows = []
    for name in names:
        ref = models.load(name)
        module, net, x, y, calib = _inputs(ref.module, ref, None, None)
        t0 = time.perf_counter()
        with torch.no_grad():
            for _ in BITS:
                ref.module(ref.x_test)
        base = time.perf_counter() - t0
        t0 = time.perf_counter()
        _, _, t = sweep(module, net, x, y, calib, __import__("hwrel.quantize", fromlist=["QuantSpec"]).QuantSpec(),
                        BITS, adversarial=True, verify=True)
        total = time.perf_counter() - t0
        rows.append({"model": name, "predict_s": t["predict_s"], "adversarial_s": t["adversarial_s"],
                     "verify_s": t["verify_s"], "total_s": total, "baseline_forward_x15_s": base,
                     "predict_over_baseline": t["predict_s"] / base, "meets_1s_target": t["predict_s"] < 1.0})
        print(rows[-1], flush=True)
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    for suffix, text in (("json", json.dumps(rows, indent=2)),
                         ("md", "| model | predict s | adversarial s | verify s | predict / baseline |\n|---|---|---|---|---|\n"
                          + "".join(f"| {r['model']} | {r['predict_s']:.2f} | {r['adversarial_s']:.2f} | "
                                    f"{r['verify_s']:.2f} | {r['predict_over_baseline']:.1f} |\n" for r in rows))):
        fd, tmp = tempfile.mkstemp(dir=out, suffix="." + suffix)
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, out / f"bitwidth.{suffix}")


if __name__ == "__main__":
    main(sys.argv[1:] or ["digits-mlp-sigmoid", "digits-mlp", "mnist-lenet", "mnist-resnet"])
