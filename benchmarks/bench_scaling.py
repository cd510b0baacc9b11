"""Benchmark: campaign throughput (faults per second) on 1 and 2 workers, Ray and local pool.

One campaign (single bit flips in the weights and biases of ``mnist-resnet``, measured on its
test inputs) is run, in the same process and run:

* as the baseline: ``run_campaign`` in this process, 1 torch thread;
* on a local Ray instance with 1 CPU, then with 2 CPUs (1 thread per task), its workers warmed
  up by a small campaign first (start-up and warm-up reported as ``startup_seconds``);
* on the local process pool with 1 worker (in process) and 2 worker processes (1 thread each),
  pool start-up (spawning, importing torch) included.

Every run's rows are checked to equal the baseline's; each figure is the best of two runs.
Throughput counts configurations per second of the executor's ``run`` (tasks, transfers, writing
the chunks); the scaling ratio is 2-worker over 1-worker throughput. Writes
``benchmarks/results/scaling.json`` and ``.md``.

    python benchmarks/bench_scaling.py [--count 24576] [--inputs 64] [--chunk-size 256]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch

from hwrel import models
from hwrel.inject.campaign import run_campaign
from hwrel.inject.executors import LocalExecutor, RayExecutor
from hwrel.network import Network

OUT = Path(__file__).parent / "results"
REPEATS = 2


def timed(fn):  # noqa: ANN001, ANN201
    t = time.perf_counter()
    res = fn()
    return res, time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--count", type=int, default=24576)
    ap.add_argument("--inputs", type=int, default=64)
    ap.add_argument("--chunk-size", type=int, default=256)
    ap.add_argument("--no-ray", action="store_true")
    a = ap.parse_args()
    ref = models.load("mnist-resnet")
    net = Network.from_module(ref.module, input_domain=(0.0, 1.0), input_shape=ref.input_shape)
    x, y = ref.x_test[: a.inputs], ref.y_test[: a.inputs]
    spec = dict(fault="bitflip", count=a.count, chunk_size=a.chunk_size)
    tmp = Path(tempfile.mkdtemp(prefix="hwrel-bench-"))
    rows: list[dict] = []
    try:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        t = math.inf
        for _ in range(REPEATS):
            base, tk = timed(lambda: run_campaign(net, spec, x, y, seed=0, progress=False))
            t = min(t, tk)
        torch.set_num_threads(threads)
        rows.append({"executor": "in-process (baseline)", "workers": 1, "seconds": t})

        def record(name: str, workers: int, run, startup: float | None = None) -> None:  # noqa: ANN001
            # Best of REPEATS (the machine may be shared); run(k) writes to a fresh folder.
            best = math.inf
            for k in range(REPEATS):
                df, t = timed(lambda: run(k))
                pd.testing.assert_frame_equal(df, base)  # same rows as the single-process run
                best = min(best, t)
            rows.append({"executor": name, "workers": workers, "seconds": best,
                         "startup_seconds": startup})

        if not a.no_ray:
            import ray

            for w in (1, 2):
                _, st = timed(lambda: ray.init(num_cpus=w, include_dashboard=False,
                                               log_to_driver=False, logging_level="ERROR"))
                # Warm-up: every worker imports torch and hwrel once (a few seconds each).
                warm = dict(spec, count=a.chunk_size * 2 * w)
                _, wt = timed(lambda: RayExecutor().run(net, warm, x, y, out=tmp / f"warm{w}",
                                                        shards=2 * w, progress=False, load=False))
                record("ray (local)", w, lambda k: RayExecutor().run(
                    net, spec, x, y, out=tmp / f"ray{w}-{k}", seed=0, progress=False), st + wt)
                ray.shutdown()
        record("local pool", 1, lambda k: LocalExecutor(1, threads=1).run(
            net, spec, x, y, out=tmp / f"local1-{k}", seed=0, progress=False), 0.0)
        # A pool starts afresh in every run (included in its time); the time of a two-task
        # campaign shows how much of it that start-up is.
        tiny = dict(spec, count=a.chunk_size * 2)
        _, st = timed(lambda: LocalExecutor(2, threads=1).run(
            net, tiny, x, y, out=tmp / "tiny", shards=2, progress=False, load=False))
        record("local pool", 2, lambda k: LocalExecutor(2, threads=1).run(
            net, spec, x, y, out=tmp / f"local2-{k}", seed=0, progress=False), st)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for r in rows:
        r["faults_per_second"] = a.count / r["seconds"]
        r["faults_per_second_per_worker"] = r["faults_per_second"] / r["workers"]
        r["ratio_to_baseline"] = r["faults_per_second"] * rows[0]["seconds"] / a.count
    scaling = {}
    for name in ("ray (local)", "local pool"):
        fps = {r["workers"]: r["faults_per_second"] for r in rows if r["executor"] == name}
        if 1 in fps and 2 in fps:
            scaling[name] = fps[2] / fps[1]
    result = {
        "model": "mnist-resnet", "campaign": spec, "inputs": a.inputs, "rows": rows,
        "scaling_2_over_1": scaling, "cpu_count": os.cpu_count(),
        "load_average_after": os.getloadavg(), "machine": platform.machine(),
        "torch": torch.__version__,
    }
    OUT.mkdir(exist_ok=True)
    (OUT / "scaling.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"# Campaign throughput: {a.count} bit flips on mnist-resnet, {a.inputs} inputs, "
             f"chunks of {a.chunk_size}", "",
             f"{os.cpu_count()} cores; load average after the run {os.getloadavg()[0]:.1f} "
             "(other work on the machine lowers every figure)", "",
             "| executor | workers | seconds | faults/s | faults/s per worker | vs baseline |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['executor']} | {r['workers']} | {r['seconds']:.1f} | "
                     f"{r['faults_per_second']:.0f} | {r['faults_per_second_per_worker']:.0f} | "
                     f"{r['ratio_to_baseline']:.2f} |")
    lines += ["", "Scaling (2 workers / 1 worker): " + ", ".join(
        f"{k} {v:.2f}x" for k, v in scaling.items()), ""]
    for r in rows:
        if r.get("startup_seconds"):
            extra = (" (included in its seconds)" if r["executor"] == "local pool"
                     else " (excluded: workers warmed up)")
            lines.append(f"- {r['executor']}, {r['workers']} worker(s): start-up "
                         f"{r['startup_seconds']:.1f} s{extra}")
    (OUT / "scaling.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
