"""Speed of the bit-width prediction sweep (2..16 bits) per reference model; verification separately.

Target: the whole prediction sweep (bounds by every method, per-input certified accuracy, estimate)
under a second per reference model, building the predictor included. The adversarial search and
Brevitas verification are timed apart; the full table (largest per-input bound at every width) too.
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


def _widths(t, drop: float = 0.01) -> dict:
    from hwrel.quantize.safe import smallest_meeting

    out = {}
    for kind in ("certified", "adversarial", "estimated", "measured"):
        if f"{kind}_accuracy" not in t:
            out[f"{kind}_bits"] = None
            continue
        ok = list(t["clean_accuracy"] - t[f"{kind}_accuracy"] <= drop + 1e-12)
        out[f"{kind}_bits"] = smallest_meeting(list(t["bits"]), ok)
    return out


def main(names: list[str]) -> None:
    from hwrel import models
    from hwrel.quantize import BITS, QuantSpec
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
        # the prediction sweep: domain bounds, certified accuracy, estimate at every width
        # the gradient search is slow on the CNNs (minutes); it is timed on the MLPs only
        adversarial = name.startswith("digits")
        table, _, t = sweep(module, net, x, y, calib, QuantSpec(), BITS, adversarial=adversarial, verify=True,
                            full_table=False)
        t0 = time.perf_counter()
        sweep(module, net, x, y, calib, QuantSpec(), BITS, adversarial=False, verify=False, full_table=True)
        full = time.perf_counter() - t0
        rows.append({"model": name, "n_test": len(x), "threads": torch.get_num_threads(),
                     "predict_s": t["predict_s"], "predict_full_table_s": full,
                     "adversarial_s": t.get("adversarial_s", float("nan")), "verify_s": t["verify_s"],
                     "baseline_forward_x15_s": base, "predict_over_baseline": t["predict_s"] / base,
                     "meets_1s_target": t["predict_s"] < 1.0, **_widths(table)})
        print(rows[-1], flush=True)
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    md = ("Prediction sweep over 2..16 bits (domain bounds by every method, certified accuracy per test input, "
          "estimate), verification and adversarial search timed apart. 'full table' also computes the largest "
          "per-input bound (certified_error) at every width. Widths: 1% accuracy-drop budget.\n\n"
          "| model | predict s | full table s | adversarial s | verify s | predict / baseline | "
          "certified / adversarial / estimated / measured bits |\n|---|---|---|---|---|---|---|\n"
          + "".join(f"| {r['model']} | {r['predict_s']:.2f} | {r['predict_full_table_s']:.2f} | "
                    f"{r['adversarial_s']:.1f} | {r['verify_s']:.2f} | {r['predict_over_baseline']:.1f} | "
                    f"{r['certified_bits']} / {r['adversarial_bits']} / {r['estimated_bits']} / "
                    f"{r['measured_bits']} |\n" for r in rows))
    for suffix, text in (("json", json.dumps(rows, indent=2)), ("md", md)):
        fd, tmp = tempfile.mkstemp(dir=out, suffix="." + suffix)
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, out / f"bitwidth.{suffix}")


if __name__ == "__main__":
    main(sys.argv[1:] or ["digits-mlp-sigmoid", "digits-mlp", "mnist-lenet", "mnist-resnet"])
