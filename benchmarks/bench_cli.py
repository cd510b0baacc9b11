"""Benchmark: ``hwrel inject`` as a user runs it (whole processes), beside the engine in-process
and pytorchfi, in one run.

Per model, single fp32 weight (and bias) bit flips, uniform over the stored bits:

* ``cli``: ``hwrel inject MODEL --count N --inputs B --out tmp.parquet --no-progress`` timed as a
  whole process (Python start-up, imports, model loading, the clean run, sampling, injection,
  the Parquet file, the summary): ``N / wall time``;
* ``engine``: :meth:`hwrel.inject.engine.Injector.run_words` on N random weight flips in this
  process (set-up timed apart);
* ``pytorchfi``: pytorchfi 0.6.0 ``declare_weight_fi`` with the flip's new value, then a forward
  of the corrupted copy, on the first ``baseline`` flips, in this process (its start-up not
  counted: that favours pytorchfi).

Models: ``digits-mlp`` and ``mnist-lenet`` (256 inputs, 200,000 flips), and the ResNet-18-shaped
CNN (``hwrel.models.ResNet18Like``, 11.2 M parameters, 32x32x3 inputs, batch 64, 200 flips) given
to the command line as a ``.safetensors`` state dict with ``--architecture``. Start-up: ``hwrel
--help``, ``hwrel models``, ``python -c "import torch"`` and ``hwrel inject digits-mlp --count 1``
(best of 3). Every process (and this one) runs with ``OMP_WAIT_POLICY=PASSIVE``, as ``hwrel
inject`` sets it on busy cores (fixed here, so runs compare whatever the load). Writes ``benchmarks/results/cli.json`` and ``.md``.

    python benchmarks/bench_cli.py [--faults 200000] [--resnet-faults 200] [--quick]
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: as `hwrel inject` runs on busy cores

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402
from _results import write_atomic  # noqa: E402  (benchmarks/ is on sys.path when run as a script)

OUT = Path(__file__).parent / "results"
HWREL = [sys.executable, "-m", "hwrel.cli"]


def _wall(cmd: list[str], repeat: int = 1) -> tuple[float, str]:
    best, out = float("inf"), ""
    for _ in range(repeat):
        t = time.perf_counter()
        res = subprocess.run(cmd, capture_output=True, text=True)
        dt = time.perf_counter() - t
        if res.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed: {res.stderr[-2000:]}")
        best, out = min(best, dt), res.stdout
    return best, out


def _pytorchfi_rate(model: nn.Module, x: torch.Tensor, faults, news, input_shape, layers) -> float:  # noqa: ANN001
    core = __import__("pytorchfi.core", fromlist=["fault_injection"])
    pfi = core.fault_injection(model, len(x), input_shape=list(input_shape),
                               layer_types=[nn.Linear, nn.Conv2d], use_cuda=False)
    mods = dict(model.named_modules())
    t = time.perf_counter()
    with torch.no_grad():
        for f, v in zip(faults, news):
            shape = tuple(mods[f.layer].weight.shape)
            pos = [int(p) for p in np.unravel_index(f.index, shape)] + [None, None]
            m = pfi.declare_weight_fi(layer_num=[layers.index(f.layer)], k=[pos[0]], dim1=[pos[1]],
                                      dim2=[pos[2]], dim3=[pos[3]], value=[float(v)])
            m(x)
    return len(faults) / (time.perf_counter() - t)


def _engine(model: nn.Module, x: torch.Tensor, n: int, input_shape) -> dict:  # noqa: ANN001
    from hwrel.inject.engine import Injector

    t = time.perf_counter()
    inj = Injector(model, x, input_shape=input_shape)
    setup = time.perf_counter() - t
    faults = inj.random_faults(n, seed=0)
    t = time.perf_counter()
    res = inj.run_words([f.layer for f in faults], "weight", np.array([f.index for f in faults]),
                        np.array([f.bit for f in faults]))
    rate = n / (time.perf_counter() - t)
    return {"inj": inj, "faults": faults, "res": res, "setup_s": setup, "rate": rate,
            "certified": int(res["certified"].sum())}


def case(name: str, cli_model: list[str], model: nn.Module, x: torch.Tensor, input_shape, n: int,
         n_base: int, tmp: Path) -> dict:
    out = tmp / f"{name}.parquet"
    cmd = HWREL + ["inject"] + cli_model + ["--count", str(n), "--inputs", str(len(x)), "--out", str(out),
                                            "--no-progress", "--json"]
    wall, text = _wall(cmd)
    info = json.loads(text)
    import pandas as pd

    rows = pd.read_parquet(out)
    assert len(rows) == n
    certified = int(rows["certified"].sum())
    out.unlink()
    eng = _engine(model, x, n, input_shape)
    layers = list(eng["inj"]._affine)
    r_pfi = _pytorchfi_rate(model, x, eng["faults"][:n_base], eng["res"]["new_value"][:n_base], input_shape,
                            layers)
    return {"model": name, "inputs": len(x), "faults": n, "pytorchfi_faults": n_base,
            "cli_wall_s": wall, "cli_faults_per_s": n / wall, "cli_certified_without_forward": certified,
            "cli_sdc": int(info["summary"][-1]["sdc"]), "cli_chunk_size": info["spec"]["chunk_size"],
            "engine_setup_s": eng["setup_s"], "engine_faults_per_s": eng["rate"],
            "engine_certified_without_forward": eng["certified"], "pytorchfi_faults_per_s": r_pfi,
            "cli_vs_pytorchfi": n / wall / r_pfi, "engine_vs_pytorchfi": eng["rate"] / r_pfi}


def startup() -> dict:
    t_help, _ = _wall(HWREL + ["--help"], 3)
    t_models, _ = _wall(HWREL + ["models"], 3)
    t_torch, _ = _wall([sys.executable, "-c", "import torch"], 3)
    t_one, _ = _wall(HWREL + ["inject", "digits-mlp", "--count", "1", "--no-progress"], 3)
    return {"help_s": t_help, "models_s": t_models, "import_torch_s": t_torch, "inject_one_fault_s": t_one,
            "inject_overhead_beyond_torch_s": t_one - t_torch}


_write = write_atomic  # results files appear whole or not at all


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--faults", type=int, default=200_000)
    ap.add_argument("--resnet-faults", type=int, default=200)
    ap.add_argument("--quick", action="store_true", help="20,000 flips, 100 on the ResNet (a smoke run)")
    args = ap.parse_args()
    if args.quick:
        args.faults, args.resnet_faults = 20_000, 100
    import hwrel.models as M
    from safetensors.torch import save_file

    tmp = Path(tempfile.mkdtemp(prefix="hwrel-bench-cli-"))
    try:
        cases = []
        for name, base in (("digits-mlp", 300), ("mnist-lenet", 150)):
            ref = M.load(name)
            cases.append(case(name, [name], ref.module, ref.x_test[:256], ref.input_shape, args.faults, base, tmp))
        r18 = M.resnet18_like()
        weights = tmp / "resnet18.safetensors"
        save_file({k: v.contiguous() for k, v in r18.state_dict().items()}, str(weights))
        g = torch.Generator().manual_seed(0)
        x = torch.rand(64, 3, 32, 32, generator=g)  # what the CLI draws without --data
        cases.append(case("resnet18-like (11.2 M, 32x32x3)",
                          [str(weights), "--architecture", "hwrel.models:ResNet18Like", "--input-shape", "3,32,32"],
                          r18, x, (3, 32, 32), args.resnet_faults, 10, tmp))
        st = startup()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    result = {"cases": cases, "startup": st, "threads": torch.get_num_threads(), "machine": platform.machine(),
              "torch": torch.__version__, "load_average": os.getloadavg(),
              "targets": {"digits-mlp cli vs pytorchfi": 50, "mnist-lenet cli vs pytorchfi": 20,
                          "resnet18-like cli vs pytorchfi": 50, "help_s": 1.0, "models_s": 1.0,
                          "inject_overhead_beyond_torch_s": 1.0}}
    OUT.mkdir(exist_ok=True)
    _write(OUT / "cli.json", json.dumps(result, indent=2) + "\n")
    lines = ["# `hwrel inject` from the shell (whole processes) vs the engine in-process vs pytorchfi", "",
             f"{torch.get_num_threads()} threads, OMP_WAIT_POLICY=PASSIVE, torch {torch.__version__}, load "
             f"average at the end {', '.join(f'{v:.1f}' for v in result['load_average'])} (a shared machine)", "",
             "| model | inputs | flips | `hwrel inject` wall s | CLI flips/s | settled without a forward | "
             "engine flips/s | pytorchfi flips/s | CLI / pytorchfi | engine / pytorchfi |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for c in cases:
        lines.append(f"| {c['model']} | {c['inputs']} | {c['faults']:,} | {c['cli_wall_s']:.1f} | "
                     f"{c['cli_faults_per_s']:,.0f} | {c['cli_certified_without_forward']:,} | "
                     f"{c['engine_faults_per_s']:,.0f} | {c['pytorchfi_faults_per_s']:,.2f} | "
                     f"{c['cli_vs_pytorchfi']:.0f}x | {c['engine_vs_pytorchfi']:.0f}x |")
    lines += ["", "| start-up | seconds |", "|---|---|",
              f"| `hwrel --help` | {st['help_s']:.2f} |", f"| `hwrel models` | {st['models_s']:.2f} |",
              f"| `python -c 'import torch'` | {st['import_torch_s']:.2f} |",
              f"| `hwrel inject digits-mlp --count 1` | {st['inject_one_fault_s']:.2f} |",
              f"| its own overhead beyond importing torch | {st['inject_overhead_beyond_torch_s']:.2f} |"]
    text = "\n".join(lines) + "\n"
    _write(OUT / "cli.md", text)
    print(text)


if __name__ == "__main__":
    main()
