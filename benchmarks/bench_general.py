"""Benchmark: the exact general injection path on models the fast engine refuses, against
pytorchfi 0.6.0, the in-place baseline and a naive deep-copy baseline.

One run, same model, same faults, same inputs for every method. Models (random weights, seeded,
defined in ``tests/general_models.py``): a ViT-style classifier (``nn.TransformerEncoderLayer``),
a MobileNetV2-style CNN (depthwise convolutions, Hardswish, BatchNorm, residuals) and a causal
GPT-style LM (``nn.Embedding``, ``scaled_dot_product_attention``, RMSNorm, SwiGLU). Faults: random
single fp32 bit flips, uniform over the weights of the ``nn.Linear``/``nn.Conv2d`` modules that
pytorchfi enumerates (pytorchfi injects only there), then:

* ``hwrel general``: :meth:`GeneralInjector.run` on the whole list (setup timed apart);
* ``pytorchfi``: ``declare_weight_fi`` (deep copy + write) with the fault's new value, forward;
* ``in place``: write the new weight into the model, forward, restore;
* ``deep copy``: deep-copy the model, write, forward (the exactness reference, naively).

Every method computes the same measures of each faulty output (the injector's metric: top-1
changes and max |delta| for the classifiers; next-token agreement and cross-entropy for the LM).

Also ``hwrel general, all sites``: random bit flips over every parameter (norms, embeddings,
attention projections...), which pytorchfi cannot inject. ``agree`` counts faults where hwrel's
``max_abs_delta`` equals the deep-copy baseline's bit for bit. Writes
``benchmarks/results/general.json`` and ``.md``.

    python benchmarks/bench_general.py [--faults 300] [--baseline-faults 100] [--threads 1]
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from general_models import TinyGPT, TinyMobileNet, TinyViT  # noqa: E402

from hwrel.inject.general import GeneralInjector, plain_forward  # noqa: E402
from hwrel.inject.faults import Fault  # noqa: E402
from _results import write_atomic  # noqa: E402  (benchmarks/ is on sys.path when run as a script)

OUT = Path(__file__).parent / "results"


class FloatTokens(nn.Module):
    """pytorchfi profiles a model with a float ``randn`` batch: token ids arrive as floats."""

    def __init__(self, lm: nn.Module, vocab: int):
        super().__init__()
        self.lm, self.vocab = lm, vocab

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lm(x.long().clamp(0, self.vocab - 1))


def _case(kind: str, seed: int) -> tuple[nn.Module, torch.Tensor, str]:
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    if kind == "vit":
        return (TinyViT(image=16, patch=4, dim=32, heads=4, depth=2).eval(), torch.rand(64, 1, 16, 16, generator=g),
                "ViT 16x16, patch 4, dim 32, 2 TransformerEncoderLayers, batch 64")
    if kind == "mobilenet":
        return (TinyMobileNet().eval(), torch.rand(64, 1, 16, 16, generator=g),
                "MobileNetV2-style, 3 inverted residuals, 16x16, batch 64")
    return (TinyGPT(vocab=64, dim=32, heads=4, depth=2, context=32).eval(),
            torch.randint(0, 64, (16, 32), generator=g), "GPT vocab 64, dim 32, 2 blocks, 16 x 32 tokens")


def _rate(n: int, fn) -> float:
    t = time.perf_counter()
    fn()
    return n / (time.perf_counter() - t)


def _max_delta(out: torch.Tensor, clean: torch.Tensor) -> float:
    if not bool(torch.isfinite(out).all()):
        return float("inf")
    return float((out.double() - clean.double()).abs().max())


def bench(kind: str, n_faults: int, n_base: int, seed: int) -> dict:
    model, x, label = _case(kind, seed)
    t = time.perf_counter()
    inj = GeneralInjector(model, x)
    setup = time.perf_counter() - t
    clean = inj.clean
    mods = dict(model.named_modules())
    fi_layers = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    faults = inj.random_faults(n_faults, seed=seed, layers=[f"{n}.weight" for n in fi_layers])
    res: dict = {}
    r_gen = _rate(n_faults, lambda: res.update(inj.run(faults)))
    everything = inj.random_faults(n_faults, seed=seed + 1)
    r_all = _rate(n_faults, lambda: inj.run(everything))
    base = faults[:n_base]
    news = res["new_value"][:n_base]
    measure = inj.metric.measure  # every method delivers the same measures per fault

    def write(m: nn.Module, f: Fault, v: float) -> None:
        dict(m.named_modules())[f.layer[: -len(".weight")]].weight.view(-1)[f.index] = float(v)

    def inplace() -> None:
        with plain_forward():
            for f, v in zip(base, news):
                w = mods[f.layer[: -len(".weight")]].weight.view(-1)
                old = w[f.index].clone()
                w[f.index] = float(v)
                measure(model(x), clean)
                w[f.index] = old

    deltas: list[float] = []

    def deep() -> None:
        with plain_forward():
            for f, v in zip(base, news):
                m = copy.deepcopy(model)
                write(m, f, v)
                out = m(x)
                measure(out, clean)
                deltas.append(_max_delta(out, clean))

    for p in model.parameters():
        p.requires_grad_(False)
    r_inplace = _rate(n_base, inplace)
    r_deep = _rate(n_base, deep)
    agree = sum(a == b for a, b in zip(res["max_abs_delta"][:n_base], deltas))

    core = __import__("pytorchfi.core", fromlist=["fault_injection"])
    lm = kind == "gpt"
    target = FloatTokens(model, 64) if lm else model
    xin = x.float() if lm else x
    pfi = core.fault_injection(target, int(x.shape[0]), input_shape=list(xin.shape[1:]),
                               layer_types=[nn.Linear, nn.Conv2d], use_cuda=False)
    order = [n for n, m in target.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    prefix = "lm." if lm else ""

    def pytorchfi() -> None:
        with plain_forward():
            for f, v in zip(base, news):
                name = prefix + f.layer[: -len(".weight")]
                shape = tuple(dict(target.named_modules())[name].weight.shape)
                pos = [int(p) for p in np.unravel_index(f.index, shape)] + [None, None]
                m = pfi.declare_weight_fi(layer_num=[order.index(name)], k=[pos[0]], dim1=[pos[1]],
                                          dim2=[pos[2]], dim3=[pos[3]], value=[float(v)])
                measure(m(xin), clean)

    r_pfi = _rate(n_base, pytorchfi)
    with plain_forward():
        r_clean = _rate(30, lambda: [model(x) for _ in range(30)])
    return {"model": kind, "description": label, "faults_hwrel": n_faults, "faults_baselines": n_base,
            "hwrel_setup_seconds": setup, "clean_forwards_per_s": r_clean,
            "pytorchfi_faults_per_s": r_pfi, "inplace_faults_per_s": r_inplace,
            "deepcopy_faults_per_s": r_deep, "hwrel_general_faults_per_s": r_gen,
            "hwrel_general_all_sites_faults_per_s": r_all,
            "ratio_vs_pytorchfi": r_gen / r_pfi, "ratio_vs_inplace": r_gen / r_inplace,
            "ratio_vs_deepcopy": r_gen / r_deep, "agree_with_deepcopy": f"{agree}/{n_base}"}


_write = write_atomic  # results files appear whole or not at all


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--faults", type=int, default=300)
    ap.add_argument("--baseline-faults", type=int, default=100)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cases = [bench(k, args.faults, args.baseline_faults, args.seed) for k in ("vit", "mobilenet", "gpt")]
    result = {"cases": cases, "threads": torch.get_num_threads(), "machine": platform.machine(),
              "processor": platform.processor(), "torch": torch.__version__,
              "load_average": os.getloadavg()}
    OUT.mkdir(exist_ok=True)
    _write(OUT / "general.json", json.dumps(result, indent=2) + "\n")
    lines = ["# General injection path: faults per second (one run, fp32 weight bit flips)", "",
             f"threads {result['threads']}, torch {result['torch']}, load average at the end "
             f"{', '.join(f'{v:.1f}' for v in result['load_average'])}. Faults on the Linear/Conv2d "
             "weights pytorchfi injects; 'all sites': every parameter.", "",
             "| model | clean fwd/s | pytorchfi | deep copy | in place | hwrel general | hwrel / pytorchfi | "
             "hwrel / deep copy | hwrel / in place | hwrel all sites | agree |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in cases:
        lines.append(f"| {c['description']} | {c['clean_forwards_per_s']:,.0f} | {c['pytorchfi_faults_per_s']:,.0f} | "
                     f"{c['deepcopy_faults_per_s']:,.0f} | {c['inplace_faults_per_s']:,.0f} | "
                     f"{c['hwrel_general_faults_per_s']:,.0f} | {c['ratio_vs_pytorchfi']:.1f}x | "
                     f"{c['ratio_vs_deepcopy']:.1f}x | {c['ratio_vs_inplace']:.2f}x | "
                     f"{c['hwrel_general_all_sites_faults_per_s']:,.0f} | {c['agree_with_deepcopy']} |")
    text = "\n".join(lines) + "\n"
    _write(OUT / "general.md", text)
    print(text)


if __name__ == "__main__":
    main()
