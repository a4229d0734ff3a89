"""The worker side of a batch: run one job and turn what happened into its record.

:func:`execute_job` is what every executor (:mod:`kfacbound.batch.executors`) runs, in the
driver, a spawned process or a Ray task. It never raises for a job's own failure: a job that
raises is recorded with ``status = "error"``, the exception type, message and a traceback
summary. :func:`failure_record` is the record of a job that never ran to completion in a worker
(a dependency failed, the worker died).

Reproducibility: a record stores the torch thread count its job ran with. Training is bitwise
reproducible for a given seed *and* thread count, so a job rerun with another ``--workers`` (and
hence another default thread count) may differ in the last bits; pass ``--threads`` to pin it.
"""

from __future__ import annotations

import os
import platform
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch

from ..errors import KfacboundError
from ..io import to_jsonable
from ..software import versions
from .jobs import job_function
from .records import Job, utc_now

THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")

def set_threads(threads: int | None) -> None:
    """Limit torch's intra-op threads (and OpenMP/MKL for libraries imported later)."""
    if not threads:
        return
    for var in THREAD_VARS:
        os.environ[var] = str(threads)
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


def _error_info(exc: BaseException) -> dict[str, Any]:
    frames = traceback.extract_tb(exc.__traceback__)[-6:]
    return {
        "type": type(exc).__name__,
        "message": str(exc) or repr(exc),
        "user_error": isinstance(exc, KfacboundError),
        "traceback": "".join(traceback.format_list(frames))[-4000:],
    }


def execute_job(config: dict[str, Any], key: str, out_dir: str, threads: int | None = None,
                sys_path: list[str] | None = None) -> dict[str, Any]:
    """Run one job in this process and return its record; never raises for a job's failure.

    Record fields: ``key``, ``kind``, ``config``, ``status`` ("ok"/"error"), ``result`` (the job
    function's dict, strict JSON) or ``error`` {type, message, user_error, traceback},
    ``timing`` {started, finished, wall_s, cpu_s}, ``versions``, ``host``, ``pid``, ``threads``.
    """
    for entry in sys_path or []:
        if entry not in sys.path:
            sys.path.append(entry)
    started, t0, c0 = utc_now(), time.perf_counter(), time.process_time()
    record: dict[str, Any] = {"key": key, "kind": config.get("kind"), "config": config}
    try:
        set_threads(threads)
        fn = job_function(config)
        result = fn(config, Path(out_dir))
        if not isinstance(result, dict):
            raise TypeError(f"job function of kind {config.get('kind')!r} returned "
                            f"{type(result).__name__}, not a dict")
        record.update(status="ok", result=to_jsonable(result), error=None)
    except Exception as exc:  # noqa: BLE001 - failure isolation is the point
        record.update(status="error", result=None, error=_error_info(exc))
    record["timing"] = {"started": started, "finished": utc_now(),
                        "wall_s": round(time.perf_counter() - t0, 4),
                        "cpu_s": round(time.process_time() - c0, 4)}
    record.update(versions=versions(), host=platform.node(), pid=os.getpid(),
                  threads=threads)
    return record


def failure_record(job: Job, error_type: str, message: str) -> dict[str, Any]:
    """A record for a job that did not run to completion in a worker (dependency failed,
    worker died)."""
    now = utc_now()
    return {"key": job.key, "kind": job.kind, "config": job.config, "status": "error",
            "result": None,
            "error": {"type": error_type, "message": message, "user_error": False,
                      "traceback": ""},
            "timing": {"started": now, "finished": now, "wall_s": 0.0, "cpu_s": 0.0},
            "versions": versions(), "host": platform.node(), "pid": os.getpid(),
            "threads": None}
