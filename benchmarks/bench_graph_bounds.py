"""Benchmark: the sound graph bounds (:mod:`hwrel.bounds.graph`) against what they replace,
exhaustive exact injection of every single crash of the layer, on the same inputs, in one run.

Models: the reference ``mnist-vit`` (2 pre-norm blocks, LayerNorm, 4-head attention, GELU MLP) and
``text-gpt`` (LLaMA-style: RMSNorm, rotary positions, causal attention, SwiGLU), shipped weights,
their first test inputs. Failure layer: the last block's activation (``blocks.1.act``, ``silu_1``),
one crash. Timed, each on the same batch:

* ``clean forward``: the model's own forward (fast path off, no autograd), best of several;
* ``graph bound``: :func:`graph_bound` with the graph traced once beforehand (as
  :func:`graph_certificate` does), and once cold (tracing included);
* ``exhaustive``: :meth:`GeneralInjector.run` (the exact general path, prefix replay) on every
  single crash of the layer (one element per sample, all samples at once), setup timed apart. It
  stops after ``--budget`` seconds per model and the rest is extrapolated from its rate (said so
  in the table).

Also the tightness: the largest measured change over the crashes run beside the bound's largest
value. Writes ``benchmarks/results/graph_bounds.json`` and ``.md``.

    python benchmarks/bench_graph_bounds.py [--vit-inputs 64] [--gpt-inputs 16] [--budget 60] [--threads 1]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

from hwrel.bounds.graph import graph_bound, graph_layers, layer_sizes, trace  # noqa: E402
from hwrel.inject.faults import Fault  # noqa: E402
from hwrel.inject.general import GeneralInjector, plain_forward  # noqa: E402
from hwrel.models import load  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import write_atomic  # noqa: E402

OUT = Path(__file__).parent / "results"


def _best(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def bench(name: str, n: int, budget: float) -> dict:
    md = load(name)
    model, x = md.module, md.x_test[:n]
    layer = graph_layers(model)[-1]
    size = layer_sizes(model, x)[layer]
    with plain_forward():
        t_clean = _best(lambda: model(x), 5)
    t = time.perf_counter()
    gb = graph_bound(model, {layer: 1}, lo=x)
    t_cold = time.perf_counter() - t
    gm = trace(model)
    t_bound = _best(lambda: graph_bound(gm, {layer: 1}, lo=x), 3)
    bound = gb.bound
    t = time.perf_counter()
    inj = GeneralInjector(model, x)
    setup = time.perf_counter() - t
    site = layer if layer in inj.sites("neuron") else f"fx:{layer}"
    done, worst, spent, chunk = 0, 0.0, 0.0, 64
    while done < size and spent < budget:
        faults = [Fault("neuron", site, j, "crash") for j in range(done, min(size, done + chunk))]
        t = time.perf_counter()
        res = inj.run(faults)
        spent += time.perf_counter() - t
        worst = max(worst, float(res["max_abs_delta"].max()))
        done += len(faults)
    t_exh = spent * size / done
    return {"model": name, "inputs": n, "layer": layer, "layer_elements": size,
            "clean_forward_s": t_clean, "graph_bound_s": t_bound, "graph_bound_cold_s": t_cold,
            "graph_bound_per_input_s": t_bound / n, "injector_setup_s": setup,
            "exhaustive_s": t_exh, "exhaustive_run": done, "exhaustive_extrapolated": done < size,
            "bound_over_clean_forward": t_bound / t_clean, "exhaustive_over_bound": t_exh / t_bound,
            "bound_max": float(bound.max()), "measured_max": worst,
            "bound_over_measured": float(bound.max()) / worst if worst > 0 else float("inf")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vit-inputs", type=int, default=64)
    ap.add_argument("--gpt-inputs", type=int, default=16)
    ap.add_argument("--budget", type=float, default=60.0, help="seconds of exhaustive injection per model")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cases = [bench("mnist-vit", args.vit_inputs, args.budget), bench("text-gpt", args.gpt_inputs, args.budget)]
    result = {"cases": cases, "threads": torch.get_num_threads(), "machine": platform.machine(),
              "processor": platform.processor(), "torch": torch.__version__, "load_average": os.getloadavg()}
    OUT.mkdir(exist_ok=True)
    write_atomic(OUT / "graph_bounds.json", json.dumps(result, indent=2) + "\n")
    lines = ["# Graph bounds: time against a clean forward and against exhaustive single-crash injection", "",
             f"One run, threads {result['threads']}, torch {result['torch']}, load average at the end "
             f"{', '.join(f'{v:.1f}' for v in result['load_average'])}. One crash in the last block's activation; "
             "the bound is sound for every element, the exhaustive baseline injects each element exactly "
             "(hwrel's general path, prefix replay).", "",
             "| model | inputs | layer (elements) | clean fwd s | graph bound s (per input) | cold, traced too | "
             "exhaustive s | bound / clean fwd | exhaustive / bound | bound max | measured max | bound / measured |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in cases:
        exh = f"{c['exhaustive_s']:.1f}" + (f" (extrapolated from {c['exhaustive_run']})"
                                             if c["exhaustive_extrapolated"] else "")
        lines.append(f"| {c['model']} | {c['inputs']} | {c['layer']} ({c['layer_elements']:,}) | "
                     f"{c['clean_forward_s']:.4f} | {c['graph_bound_s']:.3f} ({c['graph_bound_per_input_s']:.4f}) | "
                     f"{c['graph_bound_cold_s']:.3f} | {exh} | {c['bound_over_clean_forward']:.0f}x | "
                     f"{c['exhaustive_over_bound']:.0f}x | {c['bound_max']:.4g} | {c['measured_max']:.4g} | "
                     f"{c['bound_over_measured']:.1f}x |")
    text = "\n".join(lines) + "\n"
    write_atomic(OUT / "graph_bounds.md", text)
    print(text)


if __name__ == "__main__":
    main()
