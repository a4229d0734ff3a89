"""Where jobs run: this process, local worker processes, or a Ray cluster.

All executors run the same function, :func:`kfacbound.batch.execute.execute_job`, which returns a
record and never raises for a job's own failure; the driver alone appends records, so a killed
driver can never leave a record of a job that a rerun repeats.

- ``inline``: jobs run one after another in the driver process (debugging, tiny batches).
- ``local``: ``workers`` processes of a ``concurrent.futures.ProcessPoolExecutor`` started with
  *spawn* (no forked torch/OpenMP state). Each worker sets torch's threads to ``threads``
  (default max(1, cores // workers): the cores are not oversubscribed) and exits by itself when
  the driver dies (a watchdog thread polls the parent pid), so ``kill -9`` of the driver leaves
  no orphan that could finish a job behind a rerun's back.
- ``ray``: the same function as a Ray task. The cluster address comes from ``ray_address`` or
  ``RAY_ADDRESS``; without one a local Ray instance is started with ``num_cpus = workers`` (and
  shut down at the end). A Ray instance already initialised in this process is used as is. Ray
  is an optional dependency (``pip install 'kfacbound[ray]'``). On a multi-machine cluster the
  output directory must be on a filesystem every node sees (checkpoints travel through it).
"""

from __future__ import annotations

import multiprocessing
import os
import sys
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor
from concurrent.futures import wait as wait_futures
from concurrent.futures.process import BrokenProcessPool
from typing import Any, Protocol

import torch

from ..errors import KfacboundError
from .execute import THREAD_VARS, execute_job, failure_record, set_threads
from .records import Job

EXECUTORS = ("inline", "local", "ray")


class Executor(Protocol):
    """Runs jobs; ``slots`` jobs may be in flight at once."""

    slots: int

    def submit(self, job: Job, out_dir: str) -> None: ...

    def wait(self) -> list[tuple[Job, dict[str, Any]]]:
        """Block until at least one submitted job finished; return (job, record) pairs."""
        ...

    def close(self, abort: bool = False) -> None: ...


def make_executor(name: str, workers: int = 1, threads: int | None = None,
                  ray_address: str | None = None) -> Executor:
    """The executor called ``name`` (one of :data:`EXECUTORS`)."""
    if workers < 1:
        raise KfacboundError("--workers must be at least 1")
    if name == "inline":
        return InlineExecutor(threads)
    if name == "local":
        return LocalExecutor(workers, threads)
    if name == "ray":
        return RayExecutor(workers, threads, ray_address)
    raise KfacboundError(f"unknown executor {name!r}; choose from {', '.join(EXECUTORS)}")


def _paths() -> list[str]:
    """The driver's import path, forwarded so plug-in job modules import in workers."""
    return [p for p in sys.path if p]


class InlineExecutor:
    """Runs each job in the driver when :meth:`wait` is called."""

    slots = 1

    def __init__(self, threads: int | None = None):
        self.threads = threads
        self._queue: list[tuple[Job, str]] = []

    def submit(self, job: Job, out_dir: str) -> None:
        self._queue.append((job, out_dir))

    def wait(self) -> list[tuple[Job, dict[str, Any]]]:
        """Run the next job here; the driver's thread settings are restored afterwards."""
        job, out_dir = self._queue.pop(0)
        saved_env = {v: os.environ.get(v) for v in THREAD_VARS}
        saved = torch.get_num_threads()
        try:
            return [(job, execute_job(job.config, job.key, out_dir, self.threads))]
        finally:
            torch.set_num_threads(saved)
            for var, value in saved_env.items():
                if value is None:
                    os.environ.pop(var, None)
                else:
                    os.environ[var] = value

    def close(self, abort: bool = False) -> None:
        self._queue.clear()


def _watch_parent(parent: int) -> None:
    while True:
        if os.getppid() != parent:
            os._exit(3)
        time.sleep(0.5)


def _init_worker(threads: int | None, parent: int, paths: list[str]) -> None:
    for entry in paths:
        if entry not in sys.path:
            sys.path.append(entry)
    set_threads(threads)
    threading.Thread(target=_watch_parent, args=(parent,), daemon=True).start()


def _worker_died(job: Job) -> dict[str, Any]:
    return failure_record(
        job, "WorkerDied", "the worker process running this job died (crash, os._exit or out "
        "of memory)")


class LocalExecutor:
    """``workers`` spawned processes. When a worker dies, the jobs in flight with it run again
    one at a time in a fresh process, so only the job that kills its worker alone fails; the
    pool is rebuilt for the rest."""

    def __init__(self, workers: int, threads: int | None):
        self.slots = workers
        self.threads = threads
        self._pool: ProcessPoolExecutor | None = None
        self._futures: dict[Future, Job] = {}
        self._deferred: list[tuple[Job, str]] = []  # submitted while the pool was broken

    def _get_pool(self) -> ProcessPoolExecutor:
        if self._pool is None:
            self._pool = ProcessPoolExecutor(
                max_workers=self.slots, mp_context=multiprocessing.get_context("spawn"),
                initializer=_init_worker, initargs=(self.threads, os.getpid(), _paths()))
        return self._pool

    def submit(self, job: Job, out_dir: str) -> None:
        try:
            future = self._get_pool().submit(execute_job, job.config, job.key, out_dir,
                                             self.threads)
        except BrokenProcessPool:  # a worker died; wait() sorts that out, then submits this
            self._deferred.append((job, out_dir))
            return
        future.out_dir = out_dir  # type: ignore[attr-defined]
        self._futures[future] = job

    def wait(self) -> list[tuple[Job, dict[str, Any]]]:
        if not self._futures and self._deferred:  # nothing in flight: start a fresh pool
            if self._pool is not None:
                self._pool.shutdown(wait=False, cancel_futures=True)
                self._pool = None
            deferred, self._deferred = self._deferred, []
            for job, out_dir in deferred:
                self.submit(job, out_dir)
        done, _ = wait_futures(list(self._futures), return_when=FIRST_COMPLETED)
        out = []
        suspects: list[tuple[Job, str]] = []
        for future in done:
            job = self._futures.pop(future)
            try:
                out.append((job, future.result()))
            except BrokenProcessPool:
                suspects.append((job, future.out_dir))  # type: ignore[attr-defined]
            except Exception as exc:  # noqa: BLE001 - e.g. an unpicklable record
                out.append((job, failure_record(job, type(exc).__name__, str(exc))))
        if suspects:
            # A worker died: every job still in flight is lost with the pool. Run each of them
            # again alone, so only the job that kills its worker by itself is recorded as such.
            suspects += [(job, f.out_dir) for f, job in self._futures.items()]  # type: ignore
            self._futures.clear()
            if self._pool is not None:
                self._pool.shutdown(wait=False, cancel_futures=True)
                self._pool = None
            if len(suspects) == 1:
                out.append((suspects[0][0], _worker_died(suspects[0][0])))
            else:
                out += self._run_alone(suspects)
        if self._deferred and self._pool is None:
            deferred, self._deferred = self._deferred, []
            for job, out_dir in deferred:
                self.submit(job, out_dir)
        return out

    def _run_alone(self, suspects: list[tuple[Job, str]]) -> list[tuple[Job, dict[str, Any]]]:
        """Run each job by itself in a one-worker pool (rebuilt after each death)."""
        out = []
        pool = None
        try:
            for job, out_dir in suspects:
                if pool is None:
                    pool = ProcessPoolExecutor(
                        max_workers=1, mp_context=multiprocessing.get_context("spawn"),
                        initializer=_init_worker,
                        initargs=(self.threads, os.getpid(), _paths()))
                try:
                    record = pool.submit(execute_job, job.config, job.key, out_dir,
                                         self.threads).result()
                except BrokenProcessPool:
                    record = _worker_died(job)
                    pool.shutdown(wait=False, cancel_futures=True)
                    pool = None
                out.append((job, record))
        finally:
            if pool is not None:
                pool.shutdown(wait=True)
        return out

    def close(self, abort: bool = False) -> None:
        """Shut the pool down; ``abort`` (an exception or Ctrl-C in the driver) terminates
        the workers instead of waiting for the jobs in flight (they have no record yet, so a
        rerun runs them again)."""
        if self._pool is not None:
            if abort:
                for proc in list(getattr(self._pool, "_processes", {}).values()):
                    proc.terminate()
            self._pool.shutdown(wait=not abort, cancel_futures=True)
            self._pool = None


def import_ray():
    """``ray``, or a clear error saying how to install it (imported only here: an optional, heavy
    dependency that the inline and local executors do without)."""
    try:
        import ray
    except ImportError:
        raise KfacboundError(
            "--executor ray needs the optional dependency ray: pip install 'kfacbound[ray]'"
        ) from None
    return ray


class RayExecutor:
    """Each job a Ray task running :func:`execute_job`."""

    def __init__(self, workers: int, threads: int | None, address: str | None = None):
        ray = import_ray()
        self._ray = ray
        self.slots = workers
        self.threads = threads
        self._started = False
        address = address or os.environ.get("RAY_ADDRESS") or None
        if not ray.is_initialized():
            try:
                if address:
                    ray.init(address=address, log_to_driver=False)
                else:
                    ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False)
            except Exception as exc:  # noqa: BLE001 - report any start-up failure clearly
                where = f"at {address}" if address else "locally"
                raise KfacboundError(f"cannot start or reach Ray {where}: {exc}") from None
            self._started = True
        cpus = 1 if not address else max(1, threads or 1)
        self._remote = ray.remote(num_cpus=cpus, max_retries=0)(execute_job)
        self._refs: dict[Any, Job] = {}

    def submit(self, job: Job, out_dir: str) -> None:
        ref = self._remote.remote(job.config, job.key, out_dir, self.threads, _paths())
        self._refs[ref] = job

    def wait(self) -> list[tuple[Job, dict[str, Any]]]:
        ray = self._ray
        ready, _ = ray.wait(list(self._refs), num_returns=1)
        rest = [r for r in self._refs if r not in ready]
        more = ray.wait(rest, num_returns=len(rest), timeout=0)[0] if rest else []
        out = []
        for ref in list(ready) + list(more):
            job = self._refs.pop(ref)
            try:
                out.append((job, ray.get(ref)))
            except Exception as exc:  # noqa: BLE001 - worker crash, node loss
                out.append((job, failure_record(job, "RayTaskError", str(exc)[:2000])))
        return out

    def close(self, abort: bool = False) -> None:
        for ref in list(self._refs):
            try:
                self._ray.cancel(ref, force=True)
            except Exception:  # noqa: BLE001, S110 - best effort
                pass
        self._refs.clear()
        if self._started:
            self._ray.shutdown()
