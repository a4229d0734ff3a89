"""Run a batch: resumable, failure-isolated, one atomic JSON record per finished job.

Layout of an output directory ``<out>`` (paths and record files: :mod:`kfacbound.batch.records`):

- ``results.jsonl``: one JSON record per finished job (see
  :func:`kfacbound.batch.execute.execute_job`), appended with
  :func:`~kfacbound.batch.records.append_record` (atomic, see there).
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

Failure isolation: a job that raises is recorded with ``status = "error"``, the exception type,
message and a traceback summary (:mod:`kfacbound.batch.execute`); jobs that need it are recorded
as failed without running; every other job still runs. A worker process that dies (segfault, out
of memory) fails the jobs it may have been running, and a fresh pool continues.

The driver alone appends records; it is the top of the batch package (it imports
:mod:`.records`, :mod:`.spec`, :mod:`.execute`, :mod:`.executors` and :mod:`.report`, none of
which imports it).
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import KfacboundError
from ..io import to_jsonable as to_jsonable  # re-exported (with the other "x as x" names)
from ..io import write_json_atomic
from ..progress import progress_bar
from .execute import THREAD_VARS as THREAD_VARS
from .execute import execute_job as execute_job
from .execute import failure_record
from .execute import set_threads as set_threads
from .execute import versions as versions
from .executors import make_executor
from .records import (
    BATCH_INFO,
    RESULTS,
    Job,
    append_record,
    config_matches,
    latest_records,
    utc_now,
)
from .records import read_records as read_records
from .report import write_report
from .spec import BatchSpec

try:  # POSIX file locks; the batch runner needs them
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

LOCK = ".batch.lock"


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


@dataclass
class BatchOutcome:
    """What a run did: keys by final status, and the counts shown to the user."""

    out_dir: Path
    ok: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # already ok before this run
    kept_failed: list[str] = field(default_factory=list)  # failed before, not retried
    deselected: list[str] = field(default_factory=list)  # not finished, outside ``only``
    ran: int = 0
    report: Path | None = None

    @property
    def all_failed(self) -> list[str]:
        return self.failed + self.kept_failed

    def summary(self) -> str:
        text = (f"{len(self.ok)} ok ({len(self.skipped)} from earlier runs), "
                f"{len(self.all_failed)} failed ({len(self.kept_failed)} kept from earlier "
                f"runs), {self.ran} run now")
        if self.deselected:
            text += f", {len(self.deselected)} left for a later run (outside --only)"
        return text


def select_jobs(jobs: Sequence[Job], only: Sequence[dict[str, Any]]) -> set[str]:
    """The keys of the jobs that match any of the filters ``only`` (dotted config path →
    value, :func:`.records.config_matches`), with every job they need, transitively: the part
    of a grid a run is restricted to (``kfacbound batch --only``). No filter selects all."""
    if not only:
        return {job.key for job in jobs}
    by_key = {job.key: job for job in jobs}
    chosen: set[str] = set()
    stack = [job.key for job in jobs if any(config_matches(job.config, w) for w in only)]
    while stack:
        key = stack.pop()
        if key not in chosen:
            chosen.add(key)
            stack.extend(k for k in by_key[key].needs if k in by_key)
    return chosen


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
    only: Sequence[dict[str, Any]] = (),
) -> BatchOutcome:
    """Run the jobs of ``spec`` not yet finished in ``out_dir`` and record each one.

    ``executor``: "inline" (this process, ``workers`` ignored), "local" (``workers`` spawned
    processes) or "ray". ``threads``: torch threads per job, default max(1, cores // workers).
    Jobs start only after the jobs they need finished ok; jobs whose needs failed are recorded as
    failed. ``only``: filters (:func:`select_jobs`): run just the matching jobs and what they
    need; the others stay for a later run (the batch's keys, and so its report, still cover
    every job). Returns a :class:`BatchOutcome`; the caller decides the exit code.
    """
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
            "recipe_trials": spec.recipe_trials if isinstance(spec, BatchSpec) else 1,
            "spec_path": spec.path if isinstance(spec, BatchSpec) else None,
            "spec_text": spec.text if isinstance(spec, BatchSpec) else "",
            "command": command or " ".join(sys.argv),
            "started": utc_now(),
            "executor": executor,
            "workers": workers,
            "keys": [job.key for job in jobs],
        }
        write_json_atomic(out / BATCH_INFO, info, indent=2, sort_keys=True)
        previous = latest_records(results)
        state: dict[str, str] = {}  # key -> "ok" | "error"
        errors: dict[str, str] = {}
        todo: list[Job] = []
        selected = select_jobs(jobs, only)
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
            elif job.key not in selected:
                outcome.deselected.append(job.key)
            else:
                todo.append(job)
        todo_keys = {j.key for j in todo}
        for key in (k for job in todo for k in job.needs):
            if key not in state and key not in todo_keys:
                raise KfacboundError(f"job dependency {key[:12]} is not part of this batch")

        def finish(job: Job, record: dict[str, Any]) -> None:
            append_record(results, record)
            state[job.key] = record["status"]
            if record["status"] == "ok":
                outcome.ok.append(job.key)
            else:
                outcome.failed.append(job.key)
                errors[job.key] = record["error"]["message"]

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
