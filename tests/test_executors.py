"""Executors: a campaign's shards on a local process pool and on Ray equal a single-process run,
also when a worker is killed mid-shard or the driver is killed and run again."""
from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from hwrel import models
from hwrel.errors import HwrelError
from hwrel.inject.campaign import merge_shards, run_campaign
from hwrel.inject.executors import (LocalExecutor, RayExecutor, add_executor_args, get_executor,
                                    plan_tasks, run_with_executor, shard_chunks)
from hwrel.network import Network

SPEC = dict(count=1200, chunk_size=20)  # 60 chunks
SEED = 7


@pytest.fixture(scope="module")
def mlp():
    ref = models.load("digits-mlp")
    net = Network.from_module(ref.module, input_domain=(0.0, 1.0), input_shape=ref.input_shape)
    return net, ref.x_test[:32], ref.y_test[:32]


@pytest.fixture(scope="module")
def reference(mlp):
    net, x, y = mlp
    return run_campaign(net, SPEC, x, y, seed=SEED, progress=False)


@pytest.fixture(scope="module")
def ray_local():
    ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'hwrel[ray]')")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    yield ray
    ray.shutdown()


def _descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                ppid = int(Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(p))
    out, stack = [], [root]
    while stack:
        for c in children.get(stack.pop(), []):
            out.append(c)
            stack.append(c)
    return out


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


class Killer(threading.Thread):
    """Once ``folder`` holds a finished chunk, SIGKILLs one of this process's descendants whose
    command line contains ``marker`` (a worker busy with a task), then stops."""

    def __init__(self, folder: Path, marker: bytes):
        super().__init__(daemon=True)
        self.folder, self.marker = folder, marker
        self.killed: int | None = None
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            if self.folder.is_dir() and any(p.name.startswith("part-") for p in self.folder.iterdir()):
                for pid in _descendants(os.getpid()):
                    if self.marker in _cmdline(pid):
                        os.kill(pid, signal.SIGKILL)
                        self.killed = pid
                        return
            time.sleep(0.01)


# ------------------------------------------------------------------------------ planning

@pytest.mark.parametrize("n_chunks", [1, 7, 60])
@pytest.mark.parametrize("shard", [None, (0, 1), (1, 3), (0, 7)])
def test_plan_partitions_the_shard_exactly(n_chunks, shard):
    if shard is not None and shard[1] > n_chunks:
        with pytest.raises(HwrelError, match="does not divide the campaign"):
            plan_tasks(n_chunks, shard, None, 2)
        return
    want = shard_chunks(n_chunks, shard)
    for k in [None, 1, len(want)]:
        tasks = plan_tasks(n_chunks, shard, k, 2)
        got = [c for t in tasks for c in shard_chunks(n_chunks, t)]
        assert sorted(got) == want  # disjoint and complete
        assert all(shard_chunks(n_chunks, t) for t in tasks)  # none empty
        if k is not None:
            assert len(tasks) == k


def test_plan_default_bounds_task_size():
    tasks = plan_tasks(1000, None, None, 2)
    assert len(tasks) == 63  # ceil(1000 / 16) tasks of at most 16 chunks
    assert max(len(shard_chunks(1000, t)) for t in tasks) <= 16


def test_shard_specification_that_does_not_divide(mlp):
    net, x, y = mlp
    with pytest.raises(HwrelError, match="does not divide the campaign: 61 shards but only 60"):
        LocalExecutor(2).run(net, SPEC, x, y, shard="0/61", progress=False)
    with pytest.raises(HwrelError, match="shards=61 does not divide"):
        LocalExecutor(2).run(net, SPEC, x, y, shards=61, progress=False)
    with pytest.raises(HwrelError, match=r"choose 1\.\.30 .* in shard 1/2"):
        LocalExecutor(2).run(net, SPEC, x, y, shard="1/2", shards=31, progress=False)
    with pytest.raises(HwrelError, match="shards=0"):
        LocalExecutor(2).run(net, SPEC, x, y, shards=0, progress=False)
    with pytest.raises(HwrelError, match="workers must be an integer >= 1"):
        LocalExecutor(0)
    with pytest.raises(HwrelError, match="unknown executor 'dask'"):
        get_executor("dask")


def test_cuda_without_gpu_is_a_clear_error(mlp, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    net, x, y = mlp
    for ex in (LocalExecutor(1), LocalExecutor(2)):
        with pytest.raises(HwrelError, match="CUDA requested but no GPU is available"):
            ex.run(net, SPEC, x, y, out=tmp_path / "r", device="cuda", progress=False)
    assert not (tmp_path / "r").exists()  # failed before any output


# ------------------------------------------------------------------------------ local pool

def test_local_pool_equals_single_process(mlp, reference, tmp_path):
    net, x, y = mlp
    df = LocalExecutor(2).run(net, SPEC, x, y, out=tmp_path / "r", seed=SEED, progress=False)
    pd.testing.assert_frame_equal(df, reference)
    pd.testing.assert_frame_equal(merge_shards([tmp_path / "r"]), reference)
    # a shard of the campaign, split further into tasks, into one results file
    part = LocalExecutor(2).run(net, SPEC, x, y, out=tmp_path / "s.parquet", seed=SEED,
                                shard="1/3", shards=5, progress=False)
    want = reference[(reference["config_id"] // 20) % 3 == 1].reset_index(drop=True)
    pd.testing.assert_frame_equal(part, want)
    assert not (tmp_path / "s.parquet.parts").exists()
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "s.parquet"), want)


def test_local_worker_killed_mid_shard_is_retried(mlp, reference, tmp_path):
    net, x, y = mlp
    killer = Killer(tmp_path / "r", b"multiprocessing.spawn")
    killer.start()
    try:
        df = LocalExecutor(2).run(net, SPEC, x, y, out=tmp_path / "r", seed=SEED, shards=12,
                                  progress=False)
    finally:
        killer.stop.set()
    assert killer.killed is not None, "no worker was killed: the campaign ended too early"
    pd.testing.assert_frame_equal(df, reference)
    pd.testing.assert_frame_equal(merge_shards([tmp_path / "r"]), reference)


def test_killed_driver_resumes(mlp, reference, tmp_path):
    """SIGKILL the driver and its workers mid-campaign; the same call again completes it with
    the chunks already written kept as they are."""
    out = tmp_path / "r"
    script = textwrap.dedent(f"""
        from hwrel import models
        from hwrel.network import Network
        from hwrel.inject.executors import LocalExecutor
        if __name__ == "__main__":
            ref = models.load("digits-mlp")
            net = Network.from_module(ref.module, input_domain=(0.0, 1.0), input_shape=ref.input_shape)
            LocalExecutor(2).run(net, {SPEC!r}, ref.x_test[:32], ref.y_test[:32], out={str(out)!r},
                                 seed={SEED}, shards=30, progress=False)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], start_new_session=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            if out.is_dir() and len(list(out.glob("part-*.parquet"))) >= 4:
                break
            time.sleep(0.01)
        assert proc.poll() is None, "the campaign ended before it could be interrupted"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and its workers (its own session)
        proc.wait()
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("part-*.parquet")}
    assert 4 <= len(before) < 60
    net, x, y = mlp
    df = LocalExecutor(2).run(net, SPEC, x, y, out=out, seed=SEED, progress=False)
    pd.testing.assert_frame_equal(df, reference)
    assert all(p.stat().st_mtime_ns == before[p.name] for p in out.glob("part-*.parquet")
               if p.name in before)


def test_cli_options(mlp, reference, tmp_path):
    net, x, y = mlp
    p = argparse.ArgumentParser()
    p.add_argument("--out")
    p.add_argument("--shard")
    add_executor_args(p)
    args = p.parse_args(["--workers", "1", "--shards", "4", "--out", str(tmp_path / "r")])
    df = run_with_executor(args, net, SPEC, x, y, seed=SEED, progress=False)
    pd.testing.assert_frame_equal(df, reference)
    for bad, msg in ([["--workers", "x"], "--workers must be an integer"],
                     [["--ray-timeout", "0"], "--ray-timeout must be > 0"],
                     [["--address", "auto"], "--address applies to the ray executor only"],
                     [["--shards", "0"], "--shards must be >= 1"]):
        with pytest.raises(HwrelError, match=msg):
            run_with_executor(p.parse_args(bad), net, SPEC, x, y, progress=False)


# ------------------------------------------------------------------------------ Ray

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_ray_address_fails_fast():
    pytest.importorskip("ray")
    t = time.time()
    with pytest.raises(HwrelError, match=r"Ray address '127\.0\.0\.1:\d+' is unreachable"):
        RayExecutor(f"127.0.0.1:{_free_port()}", timeout_s=5).connect()
    with pytest.raises(HwrelError, match="expected 'auto', 'host:port'"):
        RayExecutor("nowhere", timeout_s=5).connect()
    assert time.time() - t < 5


def test_silent_ray_address_times_out(tmp_path):
    """A port that accepts connections but never speaks Ray: the timeout, not a hang. In a
    subprocess, so Ray's connection attempts left behind cannot touch this one."""
    pytest.importorskip("ray")
    script = textwrap.dedent("""
        import socket, sys
        from hwrel.errors import HwrelError
        from hwrel.inject.executors import RayExecutor
        srv = socket.socket(); srv.bind(("127.0.0.1", 0)); srv.listen(8)
        try:
            RayExecutor(f"127.0.0.1:{srv.getsockname()[1]}", timeout_s=2).connect()
        except HwrelError as exc:
            print(exc); sys.exit(2)
    """)
    t = time.time()
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "within 2 s" in r.stdout, r.stdout
    assert time.time() - t < 40


def test_ray_worker_killed_mid_shard(ray_local, mlp, reference, tmp_path):
    net, x, y = mlp
    killer = Killer(tmp_path / "r", b"ray::_ray_task")
    killer.start()
    try:
        df = RayExecutor(max_retries=3).run(net, SPEC, x, y, out=tmp_path / "r", seed=SEED,
                                            shards=12, progress=False)
    finally:
        killer.stop.set()
    assert killer.killed is not None, "no Ray worker was killed: the campaign ended too early"
    pd.testing.assert_frame_equal(df, reference)
    pd.testing.assert_frame_equal(merge_shards([tmp_path / "r"]), reference)
    # run again: nothing left to do, same rows
    again = RayExecutor().run(net, SPEC, x, y, out=tmp_path / "r", seed=SEED, progress=False)
    pd.testing.assert_frame_equal(again, reference)


def test_ray_errors(ray_local, mlp, tmp_path):
    net, x, y = mlp
    if not ray_local.cluster_resources().get("GPU"):
        with pytest.raises(HwrelError, match="CUDA requested but the Ray cluster has no GPU"):
            RayExecutor().run(net, SPEC, x, y, out=tmp_path / "g", device="cuda", progress=False)
    # an error raised by hwrel inside a task comes back as one line, not retried
    run_campaign(net, dict(SPEC, count=40), x, y, out=tmp_path / "other", seed=1, progress=False)
    with pytest.raises(HwrelError, match="results of another campaign") as info:
        RayExecutor().run(net, SPEC, x, y, out=tmp_path / "other", seed=SEED, progress=False)
    assert "\n" not in str(info.value)
