"""Benchmark: fault injection throughput, hwrel's engine against pytorchfi and plain baselines.

One run, same model, same faults (random single fp32 / int8 weight bit flips, uniform over all
weights and bits), same inputs (batch 256) for every method:

* ``pytorchfi``: pytorchfi 0.6.0 ``declare_weight_fi`` (what ``random_weight_inj`` calls) with the
  fault's new value, then a forward of the corrupted copy;
* ``inplace``: write the new weight into the model, forward, restore;
* ``brevitas_hook``: Brevitas 8-bit MLP, a forward hook on ``weight_quant`` replaces the code with
  the scale fixed, then a forward;
* ``hwrel``: ``Injector.run`` on the whole list (setup, the one clean forward, timed apart).

Baselines run the first ``--baseline-faults`` faults of the list, hwrel all ``--faults`` of them;
rates are faults per second. hwrel's metrics are checked against the in-place baseline on the
faults both ran. Writes ``benchmarks/results/inject.json`` and ``.md``.

    python benchmarks/bench_inject.py [--faults 20000] [--baseline-faults 300] [--threads 1]
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

import hwrel.models as M
from hwrel.inject import Injector
from _results import write_atomic  # noqa: E402  (benchmarks/ is on sys.path when run as a script)

OUT = Path(__file__).parent / "results"
BATCH = 256


def _rate(n: int, fn) -> float:
    t = time.perf_counter()
    fn()
    return n / (time.perf_counter() - t)


def _weights(model: nn.Module, layers: list[str]) -> dict[str, torch.Tensor]:
    mods = dict(model.named_modules())
    return {nm: mods[nm].weight for nm in layers}


def bench_float(name: str, n_faults: int, n_base: int, seed: int) -> dict:
    ref = M.load(name)
    x = ref.x_test[:BATCH]
    model = copy.deepcopy(ref.module).eval()
    t = time.perf_counter()
    inj = Injector(model, x)
    setup = time.perf_counter() - t
    faults = inj.random_faults(n_faults, seed=seed)
    res = {}
    r_h = _rate(n_faults, lambda: res.update(inj.run(faults)))
    layers = list(inj._affine)
    mods = dict(model.named_modules())
    base = faults[:n_base]
    news = res["new_value"][:n_base]

    def inplace() -> list[float]:
        deltas = []
        with torch.no_grad():
            clean = model(x)
            for f, v in zip(base, news):
                w = mods[f.layer].weight.view(-1)
                old = w[f.index].clone()
                w[f.index] = float(v)
                deltas.append(float((model(x) - clean).abs().max()))
                w[f.index] = old
        return deltas

    deltas: list[float] = []
    r_inplace = _rate(n_base, lambda: deltas.extend(inplace()))
    ok = [a == b or abs(a - b) <= 1e-5 * (1 + abs(b)) or (np.isnan(b) and np.isinf(a))
          for a, b in zip(res["max_abs_delta"][:n_base], deltas)]

    core = __import__("pytorchfi.core", fromlist=["fault_injection"])
    pfi = core.fault_injection(model, BATCH, input_shape=list(ref.input_shape),
                               layer_types=[nn.Linear, nn.Conv2d], use_cuda=False)

    def pytorchfi() -> None:
        with torch.no_grad():
            for f, v in zip(base, news):
                shape = tuple(mods[f.layer].weight.shape)
                pos = [int(p) for p in np.unravel_index(f.index, shape)] + [None, None]
                m = pfi.declare_weight_fi(layer_num=[layers.index(f.layer)], k=[pos[0]], dim1=[pos[1]],
                                          dim2=[pos[2]], dim3=[pos[3]], value=[float(v)])
                m(x)

    r_pfi = _rate(n_base, pytorchfi)
    with torch.no_grad():
        model(x)
        r_clean = _rate(50, lambda: [model(x) for _ in range(50)])
    return {"model": name, "batch": BATCH, "faults_hwrel": n_faults, "faults_baselines": n_base,
            "hwrel_setup_seconds": setup, "clean_forwards_per_s": r_clean,
            "pytorchfi_faults_per_s": r_pfi, "inplace_faults_per_s": r_inplace, "hwrel_faults_per_s": r_h,
            "ratio_vs_pytorchfi": r_h / r_pfi, "ratio_vs_inplace": r_h / r_inplace,
            "agree_with_inplace": f"{sum(ok)}/{len(ok)}"}


def _quant_mlp(src: nn.Module) -> nn.Module:
    import brevitas.nn as qnn

    lin = [m for m in src.modules() if isinstance(m, nn.Linear)]
    layers: list[nn.Module] = []
    for k, l in enumerate(lin):
        q = qnn.QuantLinear(l.in_features, l.out_features, bias=True, weight_bit_width=8)
        with torch.no_grad():
            q.weight.copy_(l.weight)
            q.bias.copy_(l.bias)
        layers.append(q)
        if k < len(lin) - 1:
            layers.append(qnn.QuantReLU(bit_width=8))
    return nn.Sequential(*layers).eval()


def bench_brevitas(n_faults: int, n_base: int, seed: int) -> dict:
    from brevitas.quant_tensor import IntQuantTensor

    ref = M.load("digits-mlp")
    x = ref.x_test[:BATCH]
    model = _quant_mlp(ref.module)
    t = time.perf_counter()
    inj = Injector(model, x, format="int8")
    setup = time.perf_counter() - t
    faults = inj.random_faults(n_faults, seed=seed)
    res = {}
    r_h = _rate(n_faults, lambda: res.update(inj.run(faults)))
    mods = dict(model.named_modules())
    base = faults[:n_base]

    def hook_flip() -> list[float]:
        deltas = []
        with torch.no_grad():
            clean = model(x)
            for f in base:
                def hook(mod, inp, out, f=f):
                    codes = out.int().to(torch.int32).view(-1)
                    c = int(codes[f.index]) & 0xFF
                    c ^= 1 << f.bit
                    c = c - 256 if c >= 128 else c
                    val = out.value.clone()
                    val.view(-1)[f.index] = (torch.tensor(float(c)) - out.zero_point) * out.scale
                    return IntQuantTensor(val, out.scale, out.zero_point, out.bit_width, out.signed, out.training)
                h = mods[f.layer].weight_quant.register_forward_hook(hook)
                deltas.append(float((model(x) - clean).abs().max()))
                h.remove()
        return deltas

    deltas: list[float] = []
    r_hook = _rate(n_base, lambda: deltas.extend(hook_flip()))
    ok = [a == b or abs(a - b) <= 1e-5 * (1 + abs(b)) or (np.isnan(b) and np.isinf(a))
          for a, b in zip(res["max_abs_delta"][:n_base], deltas)]
    with torch.no_grad():
        model(x)
        r_clean = _rate(20, lambda: [model(x) for _ in range(20)])
    return {"model": "digits-mlp as Brevitas QuantLinear int8 + QuantReLU", "batch": BATCH,
            "faults_hwrel": n_faults, "faults_baselines": n_base, "hwrel_setup_seconds": setup,
            "clean_forwards_per_s": r_clean, "brevitas_hook_faults_per_s": r_hook, "hwrel_faults_per_s": r_h,
            "ratio_vs_brevitas_hook": r_h / r_hook, "agree_with_hook": f"{sum(ok)}/{len(ok)}"}


_write = write_atomic  # results files appear whole or not at all


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--faults", type=int, default=20000)
    ap.add_argument("--baseline-faults", type=int, default=300)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cases = [bench_float("digits-mlp", args.faults, args.baseline_faults, args.seed),
             bench_float("mnist-lenet", args.faults // 2, args.baseline_faults // 2, args.seed),
             bench_brevitas(args.faults, args.baseline_faults, args.seed)]
    result = {"cases": cases, "threads": torch.get_num_threads(), "machine": platform.machine(),
              "processor": platform.processor(), "torch": torch.__version__,
              "load_average": os.getloadavg(), "targets": {"digits-mlp vs pytorchfi": 50,
                                                         "mnist-lenet vs pytorchfi": 20,
                                                         "brevitas MLP vs hook": 50}}
    OUT.mkdir(exist_ok=True)
    _write(OUT / "inject.json", json.dumps(result, indent=2) + "\n")
    lines = ["# Fault injection throughput (faults per second, batch 256, one run)", "",
             f"threads {result['threads']}, torch {result['torch']}, load average at the end "
             f"{', '.join(f'{v:.1f}' for v in result['load_average'])}", "",
             "| model | clean fwd/s | pytorchfi | in place | Brevitas hook | hwrel | hwrel / baseline | agree |",
             "|---|---|---|---|---|---|---|---|"]
    for c in cases:
        pf = c.get("pytorchfi_faults_per_s")
        ip = c.get("inplace_faults_per_s")
        hk = c.get("brevitas_hook_faults_per_s")
        ratio = (f"{c['ratio_vs_pytorchfi']:.0f}x pytorchfi, {c['ratio_vs_inplace']:.0f}x in place" if pf
                 else f"{c['ratio_vs_brevitas_hook']:.0f}x hook")
        fmt = lambda v: "-" if v is None else f"{v:,.0f}"  # noqa: E731
        lines.append(f"| {c['model']} | {c['clean_forwards_per_s']:,.0f} | {fmt(pf)} | {fmt(ip)} | {fmt(hk)} | "
                     f"{c['hwrel_faults_per_s']:,.0f} | {ratio} | {c.get('agree_with_inplace', c.get('agree_with_hook'))} |")
    text = "\n".join(lines) + "\n"
    _write(OUT / "inject.md", text)
    print(text)


if __name__ == "__main__":
    main()
