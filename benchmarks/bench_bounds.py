"""Benchmark: all Fep bounds on a ResNet-18-sized CNN (random weights, ~11 M parameters).

Compares the time to compute every bound method (paper, weight-aware, interval, i.e. what
``hwrel.fep(..., method="best")`` does) with the time of one forward pass of the same model, in
the same run. Writes ``benchmarks/results/bounds.json`` and ``.md``.

    python benchmarks/bench_bounds.py
"""
from __future__ import annotations

import json
import platform
import time
from pathlib import Path

import torch

import hwrel
from hwrel.models import resnet18_like

OUT = Path(__file__).parent / "results"


def best_of(fn, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    torch.manual_seed(0)
    model = resnet18_like(num_classes=10, in_channels=3, seed=0)
    t = time.perf_counter()
    net = hwrel.Network.from_module(model, (0.0, 1.0), (3, 32, 32))
    t_extract = time.perf_counter() - t
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        model(x)
        t_forward = best_of(lambda: model(x), 5)
    failures = [1] * net.num_layers
    t_bounds = best_of(lambda: hwrel.fep(net, failures, "crash"))
    res = hwrel.fep(net, failures, "crash")
    t_paper = best_of(lambda: hwrel.fep(net, failures, "crash", method="paper"))
    result = {
        "model": "resnet18_like (random weights, input 3x32x32)",
        "parameters": net.num_parameters,
        "hidden_layers": net.num_layers,
        "extract_seconds": t_extract,
        "forward_seconds_batch1": t_forward,
        "all_bounds_seconds": t_bounds,
        "ratio_all_bounds_to_forward": t_bounds / t_forward,
        "by_method": res.by_method,
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "torch": torch.__version__,
    }
    # Tightness on the reference models: each bound method relative to the paper's, one crash per layer
    rows = []
    for name in hwrel.models.names():
        rm = hwrel.models.load(name)
        rnet = hwrel.Network.from_module(rm.module, rm.input_domain, rm.input_shape)
        table = hwrel.fep_table(rnet, "crash")
        for r in table.to_dict(orient="records"):
            rows.append({"model": name, "layer": r["layer"], "paper": r["paper"], "weights": r["weights"],
                         "interval": r["interval"], "weights_over_paper": r["weights"] / r["paper"],
                         "best_over_paper": r["best"] / r["paper"]})
    result["reference_models"] = rows
    OUT.mkdir(exist_ok=True)
    (OUT / "bounds.json").write_text(json.dumps(result, indent=2))
    md = (f"# Bounds benchmark\n\n{result['model']}, {result['parameters']:,} parameters, "
          f"{result['hidden_layers']} hidden layers, {result['threads']} threads, torch {result['torch']}.\n\n"
          f"| step | seconds |\n|---|---|\n"
          f"| extract the Network (once) | {t_extract:.3f} |\n"
          f"| one forward pass (batch 1) | {t_forward:.4f} |\n"
          f"| all bounds (paper, weights, interval; `method='best'`) | {t_bounds:.3f} |\n"
          f"| paper only | {t_paper:.3f} |\n\n"
          f"All bounds take {t_bounds / t_forward:.0f} forward passes' time.\n\n"
          "## Weight-aware vs the paper's bound on the reference models\n\n"
          "One crashed neuron in one layer (the others intact), certified bound on the logits over "
          "the whole input box [0, 1]^d.\n\n"
          "| model | layer | paper | weights | interval | weights / paper | best / paper |\n|---|---|---|---|---|---|---|\n"
          + "".join(f"| {r['model']} | {r['layer']} | {r['paper']:.4g} | {r['weights']:.4g} | {r['interval']:.4g} | "
                    f"{r['weights_over_paper']:.3g} | {r['best_over_paper']:.3g} |\n" for r in rows))
    (OUT / "bounds.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
