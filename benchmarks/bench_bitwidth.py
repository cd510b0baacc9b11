"""Speed of the bit-width prediction sweep (2..16 bits) per reference model; verification separately.

Target: the whole prediction sweep (bounds by every method, per-input certified accuracy, estimate)
under a second per reference model, building the predictor included. The adversarial search and
Brevitas verification (with the largest per-input bound at every width) are timed apart.
Baseline in the same run: one float forward pass of the model over the test set, x15 widths. Also
reports every kind of width, the interval-only certified width, and the paper bound's looseness.
Writes benchmarks/results/bitwidth.json and .md (``--device cuda``: bitwidth-cuda.*, the bounds
and the search on the GPU, Brevitas on the CPU).

    python benchmarks/bench_bitwidth.py [MODEL ...] [--device cuda]
"""
from __future__ import annotations

import json
import os
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


def _ratio(v: float | None) -> str:
    return "-" if v is None else f"{v:.3g}"


def _interval_only_bits(net, x, y, drop: float = 0.01, device: str = "cpu") -> int | None:
    """Certified width with the interval bound alone (the certificate before the linearized bound)."""
    from hwrel.quantize import BITS, QuantSpec
    from hwrel.quantize.predict import Predictor
    from hwrel.quantize.safe import smallest_meeting

    p = Predictor(net, QuantSpec(), x, y, linearized=False, device=device)
    flags = p.certified_flags(BITS, {b: min(p.domain_bounds(b).values()) for b in BITS})
    acc = [float((p.correct & flags[b]).double().mean()) for b in BITS]
    return smallest_meeting(list(BITS), [p.clean_accuracy - a <= drop + 1e-12 for a in acc])


def main(names: list[str], device: str = "cpu") -> None:
    from hwrel import models
    from hwrel.quantize import BITS, QuantSpec
    from hwrel.quantize.safe import _inputs, sweep

    rows = []
    for name in names:
        ref = models.load(name)
        module, net, x, y, calib = _inputs(ref.module, ref, None, None)
        dev = torch.device(device)
        mod, xt = ref.module.to(dev), ref.x_test.to(dev)
        t0 = time.perf_counter()
        with torch.no_grad():
            for _ in BITS:
                mod(xt)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        base = time.perf_counter() - t0
        ref.module.to("cpu")
        # the prediction sweep (domain bounds, certified accuracy, estimate at every width), then
        # the adversarial search and Brevitas verification, each on its own clock
        table, _, t = sweep(module, net, x, y, calib, QuantSpec(), BITS, adversarial=True, verify=True,
                            full_table=False, device=device)
        w = _widths(table)
        at = table.set_index("bits")
        cb = w["certified_bits"]
        paper_ratio = float(at.loc[cb, "bound_paper"] / at.loc[cb, "certified_error"]) if cb else None
        rows.append({"model": name, "n_test": len(x), "threads": torch.get_num_threads(), "device": device,
                     "predict_s": t["predict_s"], "adversarial_s": t["adversarial_s"], "verify_s": t["verify_s"],
                     "baseline_forward_x15_s": base, "predict_over_baseline": t["predict_s"] / base,
                     "meets_1s_target": t["predict_s"] < 1.0, **w,
                     "interval_only_certified_bits": _interval_only_bits(net, x, y, device=device),
                     "certified_minus_measured_bits": None if cb is None or w["measured_bits"] is None
                     else cb - w["measured_bits"],
                     "paper_over_certified_at_certified_bits": paper_ratio,
                     "table": table.astype(object).where(table.notna(), None).to_dict(orient="records")})
        print({k: v for k, v in rows[-1].items() if k != "table"}, flush=True)
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    md = (f"Bit-width sweep over 2..16 bits per reference model on {device} "
          f"({torch.get_num_threads()} CPU threads), 1% accuracy-drop budget, all test inputs. "
          "'predict': domain bounds by every method, certified accuracy per test input (linearized bound "
          "with refined radii), estimate; the adversarial search and Brevitas verification are timed apart. "
          "'interval only': the certified width with the interval bound alone. 'paper / certified': the "
          "paper's bound over the largest per-input certified bound at the certified width.\n\n"
          "| model | predict s | under 1 s | predict / forward x15 | adversarial s | verify s | "
          "certified / adversarial / estimated / measured bits | "
          "interval only | certified - measured | paper / certified |\n|---|---|---|---|---|---|---|---|---|---|\n"
          + "".join(f"| {r['model']} | {r['predict_s']:.2f} | {'yes' if r['meets_1s_target'] else 'no'} | "
                    f"{r['predict_over_baseline']:.0f} | {r['adversarial_s']:.0f} | {r['verify_s']:.1f} | "
                    f"{r['certified_bits']} / {r['adversarial_bits']} / {r['estimated_bits']} / "
                    f"{r['measured_bits']} | {r['interval_only_certified_bits']} | "
                    f"{r['certified_minus_measured_bits']} | "
                    + _ratio(r['paper_over_certified_at_certified_bits']) + " |\n" for r in rows))
    for suffix, text in (("json", json.dumps(rows, indent=2)), ("md", md)):
        fd, tmp = tempfile.mkstemp(dir=out, suffix="." + suffix)
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, out / f"bitwidth{'' if device == 'cpu' else '-' + torch.device(device).type}.{suffix}")


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="*", default=["digits-mlp-sigmoid", "digits-mlp", "mnist-lenet", "mnist-resnet"])
    ap.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N")
    a = ap.parse_args()
    from hwrel.device import resolve_device

    main(a.models, str(resolve_device(a.device)))
