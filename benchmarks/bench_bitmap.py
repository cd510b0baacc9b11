"""Benchmark: exhaustive bit maps (``hwrel inject MODEL --exhaustive``), certified vs injected.

* ``mnist-lenet`` fp32, whole map from the shell (every bit of every stored weight and bias, 256
  inputs), timed as a whole process; then checked in this process: 2,000 random injected sites
  and 2,000 random certified ones re-injected one by one with the engine's general path
  (:meth:`Injector.run` on Fault objects), which must agree (certified: no class change).
  Beside it, the same engine injecting every site (no certificates) is timed on a random
  sample and projected to the whole map: exhaustive injection, BinFI (its paper reports about 5x
  fewer injections than exhaustive) and SCI-FI (up to 70 % less time than exhaustive).
* the ResNet-18-shaped CNN (11.2 M parameters, 32x32x3, 64 inputs) with int8 weight codes
  (per-tensor symmetric, ``hwrel inject --format int8`` on a float file): the map planned in
  full (``inject=False``: what the certificates settle, and how fast), the injection rate of the
  remaining sites measured on a random sample, and the whole map's time projected from both.

Writes ``benchmarks/results/bitmap.json`` and ``.md``.

    python benchmarks/bench_bitmap.py [--inputs 256] [--skip-resnet]
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: as `hwrel inject` runs on busy cores

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

OUT = Path(__file__).parent / "results"
SAMPLE = 40  # injected sites timed per ResNet layer


def _check(inj, df: pd.DataFrame, n: int, seed: int = 0) -> dict:  # noqa: ANN001
    """Re-inject ``n`` random injected and ``n`` random certified sites through the general path."""
    from hwrel.inject.faults import Fault

    out = {}
    for what, part in (("injected", df[df["method"] == "injected"]),
                       ("certified", df[df["method"].isin(["unchanged", "bound"])])):
        s = part.sample(min(n, len(part)), random_state=seed)
        faults = [Fault(site, str(layer), int(i), "bitflip", bit=int(b))
                  for layer, site, i, b in zip(s["layer"], s["site"].astype(str), s["index"], s["bit"])]
        got = inj.run(faults)
        out[what] = {"checked": len(s), "agree": int(((got["mismatch_rate"] > 0) == s["sdc"].to_numpy()).sum())}
    return out


def _inject_rate(inj, df: pd.DataFrame, n: int, seed: int = 1) -> float:  # noqa: ANN001
    """Sites per second of exact injection (no certificate) on ``n`` random sites of ``df``."""
    s = df.sample(min(n, len(df)), random_state=seed).sort_values(["layer", "site"])
    t = time.perf_counter()
    for site in ("weight", "bias"):
        p = s[s["site"] == site]
        if len(p):
            inj.run_words(p["layer"].astype(str).to_numpy(), site, p["index"].to_numpy(), p["bit"].to_numpy())
    return len(s) / (time.perf_counter() - t)


def lenet(inputs: int, tmp: Path) -> dict:
    from hwrel import models
    from hwrel.inject.engine import Injector

    out = tmp / "lenet-map.parquet"
    cmd = [sys.executable, "-m", "hwrel.cli", "inject", "mnist-lenet", "--exhaustive", "--inputs", str(inputs),
           "--out", str(out), "--no-progress", "--json"]
    t = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if res.returncode:
        raise RuntimeError(res.stderr[-2000:])
    totals = json.loads(res.stdout)["totals"]
    df = pd.read_parquet(out)
    ref = models.load("mnist-lenet")
    inj = Injector(ref.module, ref.x_test[:inputs], ref.y_test[:inputs])
    check = _check(inj, df, 2000)
    rate = _inject_rate(inj, df, 20_000)
    n = len(df)
    exhaustive_s = n / rate
    return {"model": "mnist-lenet", "format": "fp32", "inputs": inputs, "sites": n, "cli_wall_s": wall,
            "totals": totals, "check": check, "exact_injection_sites_per_s": rate,
            "exhaustive_injection_s_projected": exhaustive_s,
            "binfi_s_projected": exhaustive_s / 5, "scifi_s_projected": exhaustive_s * 0.3,
            "injections": totals["injected"] + totals["bound_then_injected_on_few_inputs"],
            "binfi_injections": n / 5}


def resnet(inputs: int) -> dict:
    """Planned layer by layer (a whole int8 map is 90 M rows); the remaining sites' injection rate
    measured per layer on up to ``SAMPLE`` of them, the whole map's time projected from both."""
    from hwrel import models
    from hwrel.cli.inject import quantize_network
    from hwrel.formats import parse_format
    from hwrel.inject.bitmap import bit_map
    from hwrel.inject.engine import Injector
    from hwrel.network import Network

    m = models.resnet18_like()
    x = torch.rand(inputs, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    t = time.perf_counter()
    net = quantize_network(Network.from_module(m, input_shape=(3, 32, 32)), parse_format("int8"))
    inj = Injector(net, x, format="int8")
    setup = time.perf_counter() - t
    n = unchanged = bound = todo_n = 0
    plan_s = inject_s = 0.0
    layers = []
    for nm in inj._affine:
        t = time.perf_counter()
        df = bit_map(inj, layers=[nm], inject=False).sites
        dt = time.perf_counter() - t
        todo = df[df["method"] == "injected"]
        rate = _inject_rate(inj, todo, SAMPLE) if len(todo) else math.inf
        layers.append({"layer": nm, "sites": len(df), "plan_s": dt, "to_inject": len(todo),
                       "unchanged": int((df["method"] == "unchanged").sum()),
                       "bound": int((df["method"] == "bound").sum()), "sites_per_s": rate})
        n += len(df)
        unchanged += layers[-1]["unchanged"]
        bound += layers[-1]["bound"]
        todo_n += len(todo)
        plan_s += dt
        inject_s += len(todo) / rate if len(todo) else 0.0
        del df, todo
    exhaustive_s = sum(r["sites"] / r["sites_per_s"] for r in layers if r["to_inject"])
    return {"model": "resnet18-like (11.2 M, 32x32x3)", "format": "int8", "inputs": inputs, "sites": n,
            "setup_s": setup, "plan_s": plan_s, "certified_masked": n - todo_n, "unchanged": unchanged,
            "bound": bound, "to_inject": todo_n, "exact_injection_sites_per_s": todo_n / inject_s,
            "projected_map_s": plan_s + inject_s, "exhaustive_injection_s_projected": exhaustive_s,
            "binfi_s_projected": exhaustive_s / 5, "scifi_s_projected": exhaustive_s * 0.3, "layers": layers}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--inputs", type=int, default=256)
    ap.add_argument("--skip-resnet", action="store_true")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="hwrel-bench-bitmap-") as tmp:
        cases = [lenet(args.inputs, Path(tmp))]
    if not args.skip_resnet:
        cases.append(resnet(64))
    result = {"cases": cases, "threads": torch.get_num_threads(), "machine": platform.machine(),
              "torch": torch.__version__, "load_average": os.getloadavg(),
              "targets": {"mnist-lenet fp32 map s": 600, "resnet18-like int8 map s": 3600}}
    OUT.mkdir(exist_ok=True)
    (OUT / "bitmap.json").write_text(json.dumps(result, indent=2) + "\n")
    c = cases[0]
    t = c["totals"]
    lines = ["# Exhaustive bit maps: certified vs injected", "",
             f"{result['threads']} threads, OMP_WAIT_POLICY=PASSIVE, torch {result['torch']}, load average at the end "
             f"{', '.join(f'{v:.1f}' for v in result['load_average'])} (a shared machine)", "",
             "| model | format | inputs | bit sites | certified masked (no forward) | injected | SDC | wall s | "
             "exhaustive injection s (projected) | BinFI s (projected, 5x fewer) | SCI-FI s (projected, -70 %) |",
             "|---|---|---|---|---|---|---|---|---|---|---|",
             f"| mnist-lenet (`hwrel inject --exhaustive`) | fp32 | {c['inputs']} | {c['sites']:,} | "
             f"{t['certified_masked']:,} ({t['certified_masked'] / c['sites']:.1%}) | {c['injections']:,} | "
             f"{t['sdc']:,} | {c['cli_wall_s']:.0f} | {c['exhaustive_injection_s_projected']:.0f} | "
             f"{c['binfi_s_projected']:.0f} | {c['scifi_s_projected']:.0f} |"]
    if len(cases) > 1:
        r = cases[1]
        lines.append(f"| {r['model']} (planned in full, injection rate sampled) | int8 | {r['inputs']} | {r['sites']:,} | "
                     f"{r['certified_masked']:,} ({r['certified_masked'] / r['sites']:.1%}) | {r['to_inject']:,} "
                     f"(at {r['exact_injection_sites_per_s']:.0f}/s) | - | {r['projected_map_s']:.0f} (projected; "
                     f"plan {r['plan_s']:.0f}) | {r['exhaustive_injection_s_projected']:.0f} | "
                     f"{r['binfi_s_projected']:.0f} | {r['scifi_s_projected']:.0f} |")
    ch = c["check"]
    lines += ["", f"Check (mnist-lenet): {ch['injected']['agree']}/{ch['injected']['checked']} injected and "
              f"{ch['certified']['agree']}/{ch['certified']['checked']} certified sites agree with the engine's "
              "general path re-injecting them one by one.",
              f"Injections against BinFI: {c['injections']:,} here, ~{c['binfi_injections']:,.0f} for BinFI "
              f"({c['binfi_injections'] / max(1, c['injections']):.1f}x more), {c['sites']:,} exhaustive."]
    text = "\n".join(lines) + "\n"
    (OUT / "bitmap.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
