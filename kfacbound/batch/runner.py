"""Run a batch: resumable, failure-isolated, one atomic JSON record per finished job.

Layout of an output directory ``<out>``:

- ``results.jsonl``: one JSON record per finished job (see :func:`execute_job`), appended with
  :func:`append_record`: the whole line in one ``write`` on an ``O_APPEND`` descriptor, under an
  exclusive ``flock``, then ``fsync``. A process killed at any moment leaves either the full line
  or none of it (at worst, on a crash of the machine, a truncated *last* line, which
  :func:`read_records` skips and the next append terminates first).
- ``checkpoints/<key>.kfb``: the train jobs' checkpoints, written to a temporary name and renamed.
- ``artifacts/<key>.*``: other files jobs write (factors, certificates).
- ``batch.json``: the spec text, the command and the job keys of the latest run (for reports).
- ``summary.csv``, ``report.md``: regenerated from ``results.jsonl`` after every run.
- ``.batch.lock``: held (``flock``) while a batch runs, so two runs never share a directory.

Resume rule: a job whose key has an ``ok`` record is skipped (a train job only while its
checkpoint exists). A job whose latest record is an ``error`` is kept as failed, or run again with
``retry_failed=True``. Jobs that were running when the process was killed have no record and run
again. So a key gets a second ``ok`` record only when its checkpoint was deleted and it ran
again, and the latest record of a key is its status.

Reproducibility: a record stores the torch thread count its job ran with. Training is bitwise
reproducible for a given seed *and* thread count, so a job rerun with another ``--workers`` (and
hence another default thread count) may differ in the last bits; pass ``--threads`` to pin it.

Failure isolation: a job that raises is recorded with ``status = "error"``, the exception type,
message and a traceback summary; jobs that need it are recorded as failed without running; every
other job still runs. A worker process that dies (segfault, out of memory) fails the jobs it may
have been running, and a fresh pool continues.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import math
import os
import platform
import sys
import time
import traceback
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import KfacboundError
from .spec import BatchSpec, Job, canonical_json

RESULTS = "results.jsonl"
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
BATCH_INFO = "batch.json"
LOCK = ".batch.lock"

try:  # POSIX file locks; the batch runner needs them
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]


# --------------------------------------------------------------------------------------------
# records


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="milliseconds")


def to_jsonable(obj: Any) -> Any:
    """``obj`` as strict JSON data: numpy/torch scalars and arrays become numbers and lists,
    paths become strings, non-finite floats become ``None`` (JSON has no NaN)."""
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, bool) or obj is None or isinstance(obj, int | str):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "tolist"):  # numpy and torch
        return to_jsonable(obj.tolist())
    if hasattr(obj, "item"):
        return to_jsonable(obj.item())
    raise TypeError(f"result value of type {type(obj).__name__} is not JSON-able: {obj!r}")


def append_record(path: str | Path, record: dict[str, Any]) -> None:
    """Append ``record`` as one line of ``path``, atomically (see the module docstring)."""
    line = canonical_json(to_jsonable(record)).encode() + b"\n"
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            size = os.fstat(fd).st_size
            if size and os.pread(fd, 1, size - 1) != b"\n":
                line = b"\n" + line  # terminate a truncated last line left by a crash
            view = memoryview(line)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            os.fsync(fd)
        finally:
            if fcntl is not None:
                fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """Every complete record of a results file, in order; lines that do not parse (a line cut
    short by a crash) are skipped."""
    path = Path(path)
    if not path.exists():
        return []
    records = []
    for raw in path.read_bytes().split(b"\n"):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue
        if isinstance(record, dict) and "key" in record and "status" in record:
            records.append(record)
    return records


def latest_records(path: str | Path) -> dict[str, dict[str, Any]]:
    """key → the key's latest record (its current status)."""
    return {r["key"]: r for r in read_records(path)}


# --------------------------------------------------------------------------------------------
# the worker side


_VERSIONS: dict[str, str] | None = None


def versions() -> dict[str, str]:
    """Versions of the software a record was produced with."""
    global _VERSIONS
    if _VERSIONS is None:
        from importlib import metadata

        out = {"python": platform.python_version(), "platform": platform.platform()}
        for dist in ("kfacbound", "torch", "backpack-for-pytorch", "numpy", "scipy"):
            try:
                out[dist] = metadata.version(dist)
            except metadata.PackageNotFoundError:
                out[dist] = "missing"
        _VERSIONS = out
    return dict(_VERSIONS)


def set_threads(threads: int | None) -> None:
    """Limit torch's intra-op threads (and OpenMP/MKL for libraries imported later)."""
    if not threads:
        return
    for var in THREAD_VARS:
        os.environ[var] = str(threads)
    import torch

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
    started, t0, c0 = _now(), time.perf_counter(), time.process_time()
    record: dict[str, Any] = {"key": key, "kind": config.get("kind"), "config": config}
    try:
        set_threads(threads)
        from .jobs import job_function

        fn = job_function(config)
        result = fn(config, Path(out_dir))
        if not isinstance(result, dict):
            raise TypeError(f"job function of kind {config.get('kind')!r} returned "
                            f"{type(result).__name__}, not a dict")
        record.update(status="ok", result=to_jsonable(result), error=None)
    except Exception as exc:  # noqa: BLE001 - failure isolation is the point
        record.update(status="error", result=None, error=_error_info(exc))
    record["timing"] = {"started": started, "finished": _now(),
                        "wall_s": round(time.perf_counter() - t0, 4),
                        "cpu_s": round(time.process_time() - c0, 4)}
    record.update(versions=versions(), host=platform.node(), pid=os.getpid(),
                  threads=threads)
    return record


def failure_record(job: Job, error_type: str, message: str) -> dict[str, Any]:
    """A record for a job that did not run to completion in a worker (dependency failed,
    worker died)."""
    now = _now()
    return {"key": job.key, "kind": job.kind, "config": job.config, "status": "error",
            "result": None,
            "error": {"type": error_type, "message": message, "user_error": False,
                      "traceback": ""},
            "timing": {"started": now, "finished": now, "wall_s": 0.0, "cpu_s": 0.0},
            "versions": versions(), "host": platform.node(), "pid": os.getpid(),
            "threads": None}


# --------------------------------------------------------------------------------------------
# the driver side


@contextlib.contextmanager
def batch_lock(out_dir: Path) -> Iterator[None]:
    """Hold ``<out>/.batch.lock`` exclusively; a second run on the same directory is refused."""
    fd = os.open(out_dir / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise KfacboundError(
                    f"another batch is running in {out_dir} (lock {out_dir / LOCK}); wait for it "
                    "or use another --out") from None
        yield
    finally:
        os.close(fd)  # closing releases the flock


def _clean_temporaries(out_dir: Path) -> None:
    """Remove partial checkpoint files left by a killed run (only called under the lock)."""
    for sub in ("checkpoints", "artifacts"):
        directory = out_dir / sub
        if directory.is_dir():
            for tmp in directory.glob(".*.tmp*"):
                with contextlib.suppress(OSError):
                    tmp.unlink()


def _atomic_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


@dataclass
class BatchOutcome:
    """What a run did: keys by final status, and the counts shown to the user."""

    out_dir: Path
    ok: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # already ok before this run
    kept_failed: list[str] = field(default_factory=list)  # failed before, not retried
    ran: int = 0
    report: Path | None = None

    @property
    def all_failed(self) -> list[str]:
        return self.failed + self.kept_failed

    def summary(self) -> str:
        return (f"{len(self.ok)} ok ({len(self.skipped)} from earlier runs), "
                f"{len(self.all_failed)} failed ({len(self.kept_failed)} kept from earlier "
                f"runs), {self.ran} run now")


def run_batch(
    spec: BatchSpec | Iterable[Job],
    out_dir: str | Path,
    *,
    executor: str = "local",
    workers: int = 1,
    threads: int | None = None,
    ray_address: str | None = None,
    retry_failed: bool = False,
    progress: bool = True,
    command: str | None = None,
    report: bool = True,
) -> BatchOutcome:
    """Run the jobs of ``spec`` not yet finished in ``out_dir`` and record each one.

    ``executor``: "inline" (this process, ``workers`` ignored), "local" (``workers`` spawned
    processes) or "ray". ``threads``: torch threads per job, default max(1, cores // workers).
    Jobs start only after the jobs they need finished ok; jobs whose needs failed are recorded as
    failed. Returns a :class:`BatchOutcome`; the caller decides the exit code.
    """
    from .executors import make_executor

    jobs = list(spec.jobs if isinstance(spec, BatchSpec) else spec)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    results = out / RESULTS
    outcome = BatchOutcome(out)
    with batch_lock(out):
        _clean_temporaries(out)
        info = {
            "name": spec.name if isinstance(spec, BatchSpec) else "batch",
            "description": spec.description if isinstance(spec, BatchSpec) else "",
            "spec_path": spec.path if isinstance(spec, BatchSpec) else None,
            "spec_text": spec.text if isinstance(spec, BatchSpec) else "",
            "command": command or " ".join(sys.argv),
            "started": _now(),
            "executor": executor,
            "workers": workers,
            "keys": [job.key for job in jobs],
        }
        _atomic_json(out / BATCH_INFO, info)
        previous = latest_records(results)
        state: dict[str, str] = {}  # key -> "ok" | "error"
        errors: dict[str, str] = {}
        todo: list[Job] = []
        for job in jobs:
            rec = previous.get(job.key)
            done = rec is not None and rec["status"] == "ok"
            produced = (rec.get("result") or {}).get("checkpoint") if done else None
            if produced and not (out / produced).is_file():
                done = False  # the checkpoint it produced was deleted: run it again
            if done:
                state[job.key] = "ok"
                outcome.skipped.append(job.key)
                outcome.ok.append(job.key)
            elif rec is not None and rec["status"] == "error" and not retry_failed:
                state[job.key] = "error"
                errors[job.key] = rec["error"]["message"] if rec.get("error") else "failed"
                outcome.kept_failed.append(job.key)
            else:
                todo.append(job)
        for key in (k for job in jobs for k in job.needs):
            if key not in state and key not in {j.key for j in todo}:
                raise KfacboundError(f"job dependency {key[:12]} is not part of this batch")

        def finish(job: Job, record: dict[str, Any]) -> None:
            append_record(results, record)
            state[job.key] = record["status"]
            if record["status"] == "ok":
                outcome.ok.append(job.key)
            else:
                outcome.failed.append(job.key)
                errors[job.key] = record["error"]["message"]

        from ..progress import progress_bar

        bar = progress_bar(len(todo), "batch", progress, "job")
        pending = list(todo)
        running: set[str] = set()
        if threads is None:
            threads = max(1, _cores() // max(1, workers))
        ex = make_executor(executor, workers=workers, threads=threads,
                           ray_address=ray_address) if pending else None
        try:
            while pending or running:
                progressed = True
                while progressed:  # resolve blocked jobs and fill free slots
                    progressed = False
                    for job in list(pending):
                        failed_needs = [k for k in job.needs if state.get(k) == "error"]
                        if failed_needs:
                            pending.remove(job)
                            msg = "; ".join(f"{k[:12]}: {errors.get(k, 'failed')}"
                                            for k in failed_needs)
                            finish(job, failure_record(
                                job, "DependencyFailed", f"a job it needs failed ({msg})"))
                            bar.update(1)
                            progressed = True
                        elif all(state.get(k) == "ok" for k in job.needs) and \
                                len(running) < ex.slots:
                            pending.remove(job)
                            ex.submit(job, str(out))
                            running.add(job.key)
                            progressed = True
                if not running:
                    if pending:  # cannot happen for a spec from expand_spec (ordered, acyclic)
                        raise KfacboundError("jobs wait on dependencies that never run: "
                                             + ", ".join(j.key[:12] for j in pending))
                    break
                for job, record in ex.wait():
                    running.discard(job.key)
                    finish(job, record)
                    outcome.ran += 1
                    bar.update(1)
                    bar.set_postfix(ok=len(outcome.ok), failed=len(outcome.all_failed))
        finally:
            bar.close()
            if ex is not None:
                ex.close(abort=sys.exc_info()[0] is not None)
        if report:
            from .report import write_report

            try:
                outcome.report = write_report(out)
            except Exception as exc:  # noqa: BLE001 - a report problem must not hide results
                print(f"warning: could not write the report: {exc}", file=sys.stderr)
    return outcome


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - macOS
        return os.cpu_count() or 1
