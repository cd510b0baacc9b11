"""Executors: a campaign's deterministic shards run in parallel, on one machine or on Ray.

A campaign (:func:`hwrel.inject.campaign.run_campaign`) is a fixed list of chunks whose rows are a
pure function of ``(seed, spec, model, inputs)``. An executor splits the chunks into *tasks*, each
the public ``run_campaign(..., out=folder, shard=(i, n))`` of one shard, and runs them in worker
processes that write every finished chunk atomically into the same results folder (or the parts
folder of a ``.parquet`` results file). Hence:

* the rows equal those of a single-process run with the same seed (not a statistical claim: the
  same chunks, measured by the same engine; tested, with a worker killed mid-shard);
* a worker that dies mid-shard has its task retried (``max_retries``); the retry skips the chunks
  that worker had already written, and a half-written chunk was never in place;
* an interrupted driver resumes when run again: tasks whose chunks are all written are skipped.

:class:`LocalExecutor` (the default) uses a process pool on this machine (``workers=1`` runs in the
calling process). :class:`RayExecutor` runs the tasks on a Ray cluster (``address="auto"``,
``"host:6379"`` or ``"ray://host:10001"``) or on a local Ray instance started for the run (Ray is
an optional extra, imported only here). On several machines the results folder must be a path
every node sees (a shared filesystem); the driver checks every chunk arrived. See
``docs/distributed.md``.
"""
from __future__ import annotations

import argparse
import math
import os
import pickle
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch
from torch import nn

from hwrel.device import exact_float32, parse_device, resolve_device
from hwrel.errors import HwrelError, check
from hwrel.network import Network

if TYPE_CHECKING:
    import pandas as pd

    from hwrel.inject.rows import Rows

EXECUTORS = ("local", "ray")
_MAX_CHUNKS_PER_TASK = 16  # bounds a worker's memory and the work a killed worker loses
_MANIFEST = "manifest.json"


# ------------------------------------------------------------------------------ planning

def shard_chunks(n_chunks: int, shard: tuple[int, int] | None) -> list[int]:
    """Chunks of ``shard=(i, n)`` (those ``c`` with ``c % n == i``); all chunks for None."""
    i, n = shard or (0, 1)
    return list(range(i, n_chunks, n))


def plan_tasks(n_chunks: int, shard: tuple[int, int] | None, tasks: int | None,
               workers: int) -> list[tuple[int, int]]:
    """The ``run_campaign`` shards that together cover exactly the chunks of ``shard``.

    Sub-shards of ``(i, n)`` are ``(i + n*j, n*k)`` for ``j < k``: disjoint, their union is
    ``(i, n)``, and none is empty when ``k`` is at most the shard's number of chunks. Default
    ``k``: at least 4 tasks per worker and at most 16 chunks per task (but never more tasks than
    chunks). Raises :class:`HwrelError` when a shard specification does not divide the campaign
    (more shards than chunks, so some would be empty) or ``tasks`` is out of range."""
    i, n = shard or (0, 1)
    if n > n_chunks:
        raise HwrelError(f"shard {i}/{n} does not divide the campaign: {n} shards but only "
                         f"{n_chunks} chunk(s); use at most {n_chunks} shards or a smaller chunk size")
    m = len(shard_chunks(n_chunks, shard))
    if tasks is None:
        k = min(m, max(4 * max(1, workers), math.ceil(m / _MAX_CHUNKS_PER_TASK)))
    else:
        ok = isinstance(tasks, int) and not isinstance(tasks, bool)
        check(ok and 1 <= tasks <= m, f"shards={tasks!r} does not divide the campaign: choose "
              f"1..{m} (the number of chunks{'' if shard is None else f' in shard {i}/{n}'})")
        k = tasks
    return [(i + n * j, n * k) for j in range(k)]


def _as_network(model: nn.Module | Network, input_domain: Any, input_shape: Any) -> Any:
    """Network or, where the engine has no rule, GeneralModel (:func:`hwrel.inject.target.as_target`)."""
    from hwrel.inject.target import as_target

    return as_target(model, input_domain, input_shape)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


class _Job:
    """One campaign to execute: what the driver knows before any task runs."""

    def __init__(self, net: Network, spec: Any, inputs: torch.Tensor, labels: torch.Tensor | None,
                 out: Path, folder: Path, seed: int, shard: tuple[int, int] | None,
                 tasks: list[tuple[int, int]], n_chunks: int, total: int,
                 range_limit: float | None, device: str):
        self.net, self.spec, self.inputs, self.labels = net, spec, inputs, labels
        self.out, self.folder, self.seed, self.shard = out, folder, seed, shard
        self.tasks, self.n_chunks, self.total = tasks, n_chunks, total
        self.range_limit, self.device = range_limit, device

    def chunk_rows(self, c: int) -> int:
        cs = self.spec.chunk_size
        return min(cs, self.total - c * cs)

    def written(self) -> set[int]:
        from hwrel.inject.store import part_name

        if not self.folder.is_dir():
            return set()
        names = {p.name for p in self.folder.iterdir()}
        return {c for c in range(self.n_chunks) if part_name(c) in names}

    def task_chunks(self, t: tuple[int, int]) -> list[int]:
        return shard_chunks(self.n_chunks, t)

    def task_args(self, t: tuple[int, int]) -> tuple:
        return (self.spec.to_dict(), self.seed, t, str(self.folder), self.range_limit, self.device)

    def manifest_ready(self) -> bool:
        return (self.folder / _MANIFEST).is_file()


def _run_task(payload: tuple[Network, torch.Tensor, torch.Tensor | None], spec: dict[str, Any],
              seed: int, shard: tuple[int, int], folder: str, range_limit: float | None,
              device: str, threads: int | None = None) -> dict[str, Any]:
    """Worker side of one task: the public ``run_campaign`` of one shard into ``folder``."""
    from hwrel.inject.campaign import campaign_rows
    from hwrel.inject.sampling import CampaignSpec

    if threads:
        torch.set_num_threads(threads)
    net, x, y = payload
    with exact_float32():
        df = campaign_rows(net, CampaignSpec.from_dict(spec), x, y, out=folder, seed=seed,
                          shard=shard, progress=False, range_limit=range_limit,
                          device=str(resolve_device(device)))
    return {"shard": tuple(shard), "rows": len(df), "host": socket.gethostname(), "pid": os.getpid()}


# ------------------------------------------------------------------------------ base

class Executor:
    """Runs a campaign's shards; subclasses say where (:meth:`_execute`)."""

    name = "base"

    def _workers(self) -> int:
        return 1

    def _check_device(self, device: str) -> str:
        return str(resolve_device(device))

    def _in_process(self) -> bool:
        return False

    def _open(self, device: str) -> None:
        """Acquire the workers' resources (called after the campaign is validated)."""

    def _close(self) -> None:
        """Release what :meth:`_open` acquired."""

    def _execute(self, job: _Job, todo: list[tuple[int, int]],
                 done: Callable[[dict[str, Any]], None]) -> None:
        raise NotImplementedError

    def run(self, model: nn.Module | Network, spec: Any, inputs: torch.Tensor,
            labels: torch.Tensor | None = None, *, out: str | os.PathLike[str] | None = None,
            seed: int = 0, shard: str | Sequence[int] | None = None, shards: int | None = None,
            progress: bool = True, input_domain: Any = (0.0, 1.0),
            input_shape: Sequence[int] | None = None, range_limit: float | None = None,
            device: str = "cpu", load: bool = True, as_rows: bool = False,
            **spec_fields: Any) -> pd.DataFrame | Rows | None:
        """Run (or continue) the campaign, as :func:`~hwrel.inject.campaign.run_campaign` with
        the same arguments would, and return the same rows (``load=False``: return None and leave
        the rows on disk only, for campaigns too large to hold in memory; ``as_rows=True``: the
        same rows as :class:`~hwrel.inject.rows.Rows`, what ``hwrel inject`` uses, without pandas
        where the campaign needs none).

        ``shards``: number of tasks the campaign (or its ``shard``) is split into (default: see
        :func:`plan_tasks`). Without ``out`` the tasks write into a temporary folder, removed at
        the end. Exact: the rows equal a single-process run's (same chunks, same engine).
        """
        from hwrel.inject.campaign import as_spec, campaign_rows, parse_shard
        from hwrel.inject.target import site_space

        spec = as_spec(spec, **spec_fields)
        sh = parse_shard(shard)
        ok = isinstance(seed, int) and not isinstance(seed, bool) and seed >= 0
        check(ok, f"seed must be an integer >= 0, got {seed!r}")
        dev = self._check_device(device)
        x = torch.as_tensor(inputs)
        net = _as_network(model, input_domain, input_shape if input_shape is not None or x.dim() < 2
                          else tuple(x.shape[1:]))
        y = None if labels is None else torch.as_tensor(labels)
        if not self._in_process():
            from hwrel.inject.target import check_sendable

            check_sendable(net)  # the general path sends the module itself to the workers
        space = site_space(net, spec, x)  # validates layer, bit and sites before any worker starts
        n_chunks, total = space.num_chunks(), space.num_configs()
        plan_tasks(n_chunks, sh, shards, 1)  # a shard spec that does not divide: fail now

        def final(target: Any) -> pd.DataFrame | Rows:
            # Every chunk is in place, so this computes nothing: it reads (and, for a .parquet
            # target, writes the single file) with the campaign's own code.
            rows = campaign_rows(net, spec, x, y, out=target, seed=seed, shard=sh, progress=False,
                                 range_limit=range_limit, device="cpu")
            return rows if as_rows else rows.frame()

        if self._in_process():
            threads = torch.get_num_threads()
            torch.set_num_threads(getattr(self, "_threads_given", None) or threads)
            try:
                with exact_float32():
                    rows = campaign_rows(net, spec, x, y, out=out, seed=seed, shard=sh,
                                         progress=progress, range_limit=range_limit, device=dev)
            finally:
                torch.set_num_threads(threads)
            return (rows if as_rows else rows.frame()) if load else None
        tmp = None
        if out is None:
            tmp = Path(tempfile.mkdtemp(prefix="hwrel-campaign-"))
            path = tmp / "results"
        else:
            path = Path(out).absolute()
        single = path.suffix == ".parquet"
        if single and path.exists():  # finished before: validated and read by the campaign code
            return final(path) if load else None
        folder = path.with_name(path.name + ".parts") if single else path
        try:
            self._open(dev)
            tasks = plan_tasks(n_chunks, sh, shards, self._workers())
            job = _Job(net, spec, x, y, path, folder, int(seed), sh, tasks, n_chunks, total,
                       range_limit, dev)
            self._drive(job, progress)
            self._close()
            missing = [c for c in shard_chunks(n_chunks, sh) if c not in job.written()]
            if missing:
                hosts = ", ".join(sorted(self._hosts)) or "the workers"
                raise HwrelError(f"results folder {folder}: {len(missing)} chunk(s) (first {missing[0]}) "
                                 f"reported done by {hosts} are not there; on several machines --out "
                                 "must be a shared filesystem path that every node sees")
            if not load and not single:
                return None
            df = final(path)
            return df if load else None
        finally:
            self._close()
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)

    def _drive(self, job: _Job, progress: bool) -> None:
        from tqdm.auto import tqdm

        have = job.written()
        mine = shard_chunks(job.n_chunks, job.shard)
        todo = [t for t in job.tasks if any(c not in have for c in job.task_chunks(t))]
        self._hosts: set[str] = set()
        with tqdm(total=sum(job.chunk_rows(c) for c in mine),
                  initial=sum(job.chunk_rows(c) for c in mine if c in have), unit="cfg",
                  desc=f"inject ({self.name})", file=sys.stderr, dynamic_ncols=True,
                  disable=not progress or not sys.stderr.isatty()) as bar:
            def done(info: dict[str, Any]) -> None:
                self._hosts.add(str(info.get("host")))
                bar.update(sum(job.chunk_rows(c) for c in job.task_chunks(info["shard"])
                               if c not in have))

            if todo:
                self._execute(job, todo, done)


def _wait_for_manifest(job: _Job, first_done: Callable[[], bool]) -> None:
    """Block until the first task has created the results folder's manifest (or has ended):
    the other tasks then find it, so no two workers create it at once."""
    while not job.manifest_ready() and not first_done():
        time.sleep(0.02)


# ------------------------------------------------------------------------------ local pool

_PAYLOAD: Any = None
_THREADS: int | None = None


def _init_worker(payload: str, threads: int) -> None:
    global _PAYLOAD, _THREADS
    # Read from a file the driver wrote (not sent through the spawn pipe: a large payload there
    # blocks the driver if a worker dies while starting).
    with open(payload, "rb") as fh:
        _PAYLOAD = pickle.load(fh)
    _THREADS = threads
    torch.set_num_threads(threads)


def _pool_task(args: tuple) -> dict[str, Any]:
    return _run_task(_PAYLOAD, *args, threads=_THREADS)


class LocalExecutor(Executor):
    """A process pool on this machine (``spawn`` processes; ``workers=1``: the calling process).

    ``threads``: torch threads per worker (default: the cores divided among the workers).
    A worker that dies (killed, out of memory) breaks the pool; the pool is rebuilt and the
    unfinished tasks rerun, at most ``max_retries`` times."""

    name = "local"

    def __init__(self, workers: int | None = None, *, threads: int | None = None,
                 max_retries: int = 3):
        cores = os.cpu_count() or 1
        w = cores if workers is None else workers
        check(isinstance(w, int) and not isinstance(w, bool) and w >= 1,
              f"workers must be an integer >= 1, got {workers!r}")
        check(isinstance(max_retries, int) and max_retries >= 0,
              f"max_retries must be an integer >= 0, got {max_retries!r}")
        check(threads is None or (isinstance(threads, int) and threads >= 1),
              f"threads must be an integer >= 1, got {threads!r}")
        self.workers, self.max_retries = w, max_retries
        self.threads = threads if threads is not None else max(1, cores // w)
        self._threads_given = threads  # in process: keep the caller's thread count unless given

    def _workers(self) -> int:
        return self.workers

    def _in_process(self) -> bool:
        return self.workers == 1

    def _execute(self, job: _Job, todo: list[tuple[int, int]],
                 done: Callable[[dict[str, Any]], None]) -> None:
        fd, payload = tempfile.mkstemp(prefix="hwrel-payload-", suffix=".pkl")
        with os.fdopen(fd, "wb") as fh:
            pickle.dump((job.net, job.inputs, job.labels), fh)
        try:
            self._rounds(job, todo, done, payload)
        finally:
            os.unlink(payload)

    def _rounds(self, job: _Job, todo: list[tuple[int, int]],
                done: Callable[[dict[str, Any]], None], payload: str) -> None:
        import multiprocessing as mp
        from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
        from concurrent.futures.process import BrokenProcessPool

        pending = list(todo)
        failures = 0
        while pending:
            pool = ProcessPoolExecutor(max_workers=min(self.workers, len(pending)),
                                       mp_context=mp.get_context("spawn"), initializer=_init_worker,
                                       initargs=(payload, self.threads))
            broken: BaseException | None = None
            futs: dict[Any, tuple[int, int]] = {}
            try:
                try:
                    futs[pool.submit(_pool_task, job.task_args(pending[0]))] = pending[0]
                    if not job.manifest_ready():
                        _wait_for_manifest(job, lambda: next(iter(futs)).done())
                    for t in pending[1:]:
                        futs[pool.submit(_pool_task, job.task_args(t))] = t
                except BrokenProcessPool as exc:  # a worker died while tasks were submitted
                    broken = exc
                waiting = set(futs)
                while waiting:
                    ready, waiting = wait(waiting, return_when=FIRST_COMPLETED)
                    for f in ready:
                        try:
                            info = f.result()
                        except BrokenProcessPool as exc:
                            broken = exc
                            continue
                        pending.remove(futs[f])
                        done(info)
            except BaseException:
                _terminate(pool)
                raise
            finally:
                pool.shutdown(wait=True, cancel_futures=True)
            if broken is not None:
                failures += 1
                if failures > self.max_retries:
                    raise HwrelError(f"local workers died {failures} times ({_first_line(broken)}); "
                                     f"{len(pending)} task(s) unfinished; run again to resume (a "
                                     "script needs `if __name__ == '__main__':` around its work)")


def _terminate(pool: Any) -> None:
    # On an interrupt, stop workers mid-chunk: their written chunks are kept, the rest reruns.
    for p in list((getattr(pool, "_processes", None) or {}).values()):
        try:
            p.terminate()
        except (OSError, AttributeError):
            pass


# ------------------------------------------------------------------------------ Ray

def _import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise HwrelError("the ray executor needs Ray: pip install 'hwrel[ray]'") from None
    return ray


def _split_address(address: str) -> tuple[str, int] | None:
    """``(host, port)`` of ``host:port`` or ``ray://host:port``; None for other forms."""
    rest = address.split("://", 1)[1] if "://" in address else address
    host, sep, port = rest.rstrip("/").rpartition(":")
    if not sep or not port.isdigit() or not host:
        return None
    return host.strip("[]"), int(port)


def _probe(address: str, timeout_s: float) -> None:
    """Fail fast (within ``timeout_s``) if nothing listens at ``address``."""
    hp = _split_address(address)
    if hp is None:
        raise HwrelError(f"Ray address {address!r}: expected 'auto', 'host:port' or 'ray://host:port'")
    try:
        with socket.create_connection(hp, timeout=timeout_s):
            pass
    except OSError as exc:
        why = "timed out" if isinstance(exc, (TimeoutError, socket.timeout)) else (exc.strerror or str(exc))
        raise HwrelError(f"Ray address {address!r} is unreachable ({why} after at most "
                         f"{timeout_s:g} s); check the head node and its port") from None


_CHECK = """
import sys, ray
ray.init(address=sys.argv[1], include_dashboard=False, log_to_driver=False, logging_level="ERROR")
ray.shutdown()
"""


def _check_cluster(address: str, timeout_s: float) -> None:
    """Connect to ``address`` once in a child process, killed after ``timeout_s``: Ray's own
    connection retries can outlast any patience and cannot be abandoned inside this process."""
    try:
        r = subprocess.run([sys.executable, "-c", _CHECK, address], capture_output=True,
                           text=True, timeout=timeout_s, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise HwrelError(f"no Ray cluster answered at {address!r} within {timeout_s:g} s "
                         "(check the address, or raise --ray-timeout)") from None
    if r.returncode != 0:
        lines = [ln.strip() for ln in r.stderr.splitlines() if ln.strip()]
        why = next((ln for ln in reversed(lines) if "Error" in ln), lines[-1] if lines else
                   f"exit status {r.returncode}")
        raise HwrelError(f"could not connect to Ray at {address!r}: {why}")


class RayExecutor(Executor):
    """Tasks on a Ray cluster: ``address="auto"`` (the cluster this machine belongs to),
    ``"host:6379"``, ``"ray://host:10001"`` (Ray Client), or None for a local Ray instance
    started for the run (``num_cpus`` CPUs, default all) and stopped after it. If Ray is already
    initialised in this process, that connection is used.

    Connecting is bounded by ``timeout_s``: an unreachable address raises :class:`HwrelError`
    instead of hanging. Each task takes ``cpus_per_task`` CPUs (its torch threads) and, with a
    CUDA device, ``gpus_per_task`` GPUs (default 1); a task whose worker dies is retried up to
    ``max_retries`` times (errors raised by hwrel itself are not retried). ``runtime_env`` is
    passed to ``ray.init`` (e.g. ``{"pip": ["hwrel"]}`` for nodes without hwrel)."""

    name = "ray"

    def __init__(self, address: str | None = None, *, timeout_s: float = 60.0,
                 num_cpus: int | None = None, cpus_per_task: float = 1,
                 gpus_per_task: float | None = None, max_retries: int = 3,
                 runtime_env: dict[str, Any] | None = None):
        check(address is None or (isinstance(address, str) and address.strip() != ""),
              f"Ray address must be 'auto', 'host:port' or 'ray://host:port', got {address!r}")
        check(isinstance(timeout_s, (int, float)) and timeout_s > 0,
              f"timeout_s must be a positive number of seconds, got {timeout_s!r}")
        check(isinstance(max_retries, int) and max_retries >= 0,
              f"max_retries must be an integer >= 0, got {max_retries!r}")
        check(num_cpus is None or (isinstance(num_cpus, int) and num_cpus >= 1),
              f"num_cpus must be an integer >= 1, got {num_cpus!r}")
        self.address = None if address is None else address.strip()
        self.timeout_s, self.num_cpus, self.max_retries = float(timeout_s), num_cpus, max_retries
        self.cpus_per_task, self.gpus_per_task, self.runtime_env = cpus_per_task, gpus_per_task, runtime_env
        self._cpus = num_cpus or os.cpu_count() or 1

    def _workers(self) -> int:
        return max(1, int(self._cpus // max(self.cpus_per_task, 1e-9)))

    def _check_device(self, device: str) -> str:
        # The GPUs that count are the cluster's, checked once connected (the driver may have none).
        return str(parse_device(device))

    def connect(self) -> tuple[Any, bool]:
        """``(ray, started)``: Ray initialised within ``timeout_s``; ``started`` if by us."""
        ray = _import_ray()
        addr = self.address
        if addr is not None and addr != "auto":
            _probe(addr, min(self.timeout_s, 10.0))
        if ray.is_initialized():
            return ray, False
        kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False,
                                  "logging_level": "ERROR", "runtime_env": self.runtime_env}
        if addr is None:
            # A local instance: no network to wait for. (Its processes die with the thread that
            # starts them, so this cannot be moved into a helper thread.)
            try:
                ray.init(num_cpus=self.num_cpus, **kwargs)
            except Exception as exc:
                raise HwrelError(f"could not start a local Ray instance: {_first_line(exc)}") from None
            return ray, True
        _check_cluster(addr, self.timeout_s)
        try:
            ray.init(address=addr, **kwargs)
        except Exception as exc:
            raise HwrelError(f"could not connect to Ray at {addr!r}: {_first_line(exc)}") from None
        return ray, True

    def _open(self, device: str) -> None:
        self._ray, self._started = self.connect()
        res = self._ray.cluster_resources()
        self._cpus = int(res.get("CPU", self._cpus))
        cuda = device.startswith("cuda")
        self._gpus = self.gpus_per_task if self.gpus_per_task is not None else (1 if cuda else 0)
        if cuda and res.get("GPU", 0) < max(self._gpus, 1e-9):
            raise HwrelError("CUDA requested but the Ray cluster has no GPU "
                             f"(resources: {res.get('CPU', 0):g} CPU, {res.get('GPU', 0):g} GPU)")

    def _close(self) -> None:
        ray, self._ray = getattr(self, "_ray", None), None
        if ray is not None and self._started:
            ray.shutdown()

    def _execute(self, job: _Job, todo: list[tuple[int, int]],
                 done: Callable[[dict[str, Any]], None]) -> None:
        ray = self._ray
        fn = ray.remote(_ray_task).options(
            num_cpus=self.cpus_per_task, num_gpus=self._gpus, max_retries=self.max_retries,
            retry_exceptions=False)
        payload = ray.put((job.net, job.inputs, job.labels))
        threads = max(1, int(self.cpus_per_task))

        def submit(t: tuple[int, int]) -> Any:
            return fn.remote(payload, *job.task_args(t), threads)

        refs = {submit(todo[0]): todo[0]}
        if not job.manifest_ready():
            first = next(iter(refs))
            _wait_for_manifest(job, lambda: bool(ray.wait([first], timeout=0)[0]))
        for t in todo[1:]:
            refs[submit(t)] = t
        waiting = list(refs)
        try:
            while waiting:
                ready, waiting = ray.wait(waiting, num_returns=1)
                for r in ready:
                    done(self._result(ray, r, refs[r]))
        except BaseException:
            for r in waiting:
                ray.cancel(r, force=True)
            raise

    def _result(self, ray: Any, ref: Any, task: tuple[int, int]) -> dict[str, Any]:
        try:
            return ray.get(ref)
        except ray.exceptions.RayTaskError as exc:
            cause = getattr(exc, "cause", None)
            if isinstance(cause, HwrelError):
                raise HwrelError(str(cause)) from None
            raise
        except ray.exceptions.RayError as exc:  # worker or node lost more often than retried
            raise HwrelError(f"task shard {task[0]}/{task[1]} failed after {self.max_retries} "
                             f"retries ({_first_line(exc)}); run again to resume") from None


def _ray_task(payload: Any, *args: Any) -> dict[str, Any]:
    *rest, threads = args
    return _run_task(payload, *rest, threads=threads)


# ------------------------------------------------------------------------------ selection, CLI

def get_executor(executor: str | Executor | None = "local", *, workers: int | None = None,
                 address: str | None = None, timeout_s: float = 60.0,
                 max_retries: int = 3) -> Executor:
    """An executor by name (``"local"``, ``"ray"``) or the given instance."""
    if isinstance(executor, Executor):
        return executor
    if executor is None or executor == "local":
        check(address is None, "--address applies to the ray executor only")
        return LocalExecutor(1 if workers is None else workers, max_retries=max_retries)
    if executor == "ray":
        return RayExecutor(address, timeout_s=timeout_s, num_cpus=workers, max_retries=max_retries)
    raise HwrelError(f"unknown executor {executor!r}: valid are {', '.join(EXECUTORS)}")


def add_executor_args(parser: argparse.ArgumentParser) -> None:
    """``--executor``, ``--workers``, ``--address``, ``--ray-timeout``, ``--shards``, ``--device``
    for a command that runs campaigns (see :func:`run_with_executor`)."""
    g = parser.add_argument_group("execution")
    g.add_argument("--executor", default="local", choices=EXECUTORS,
                   help="local: a process pool on this machine (default); ray: Ray tasks")
    g.add_argument("--workers", default=None, metavar="N", help="local: worker processes (default "
                   "1, in this process); ray without --address: CPUs of the local Ray instance")
    g.add_argument("--address", default=None, metavar="ADDR", help="Ray cluster: auto, host:port "
                   "or ray://host:port (default: start a local Ray instance for the run)")
    g.add_argument("--ray-timeout", default="60", metavar="S", help="seconds to connect to Ray "
                   "before giving up (default 60)")
    g.add_argument("--shards", default=None, metavar="K", help="tasks to split the campaign into "
                   "(default: 4 per worker, at most 16 chunks each)")
    g.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")


def _int_arg(text: str | None, what: str, lo: int = 1) -> int | None:
    if text is None:
        return None
    try:
        v = int(text)
    except (TypeError, ValueError):
        raise HwrelError(f"{what} must be an integer, got {text!r}") from None
    check(v >= lo, f"{what} must be >= {lo}, got {text!r}")
    return v


def executor_from_args(args: argparse.Namespace) -> Executor:
    try:
        timeout = float(args.ray_timeout)
    except (TypeError, ValueError):
        raise HwrelError(f"--ray-timeout must be a number of seconds, got {args.ray_timeout!r}") from None
    check(math.isfinite(timeout) and timeout > 0, f"--ray-timeout must be > 0, got {args.ray_timeout!r}")
    return get_executor(args.executor, workers=_int_arg(args.workers, "--workers"),
                        address=args.address, timeout_s=timeout)


def run_with_executor(args: argparse.Namespace, model: nn.Module | Network, spec: Any,
                      inputs: torch.Tensor, labels: torch.Tensor | None = None,
                      **kwargs: Any) -> pd.DataFrame | Rows:
    """What ``hwrel inject`` calls instead of ``run_campaign``: the executor, shards and device
    from :func:`add_executor_args`' options, ``out``/``shard`` from ``--out``/``--shard``;
    ``kwargs`` (seed, progress, range_limit, ...) go to :meth:`Executor.run`."""
    ex = executor_from_args(args)
    kwargs.setdefault("out", getattr(args, "out", None))
    kwargs.setdefault("shard", getattr(args, "shard", None))
    return ex.run(model, spec, inputs, labels, shards=_int_arg(args.shards, "--shards"),
                  device=args.device, **kwargs)
