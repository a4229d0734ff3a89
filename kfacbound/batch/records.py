"""The batch output directory: job keys, the records file and the paths jobs write.

A leaf of :mod:`kfacbound.batch`: every other batch module may import it, it imports none of
them.

- Keys: a job's key is ``sha256`` of the canonical JSON (:func:`kfacbound.io.canonical_json`) of
  its config without its display ``label`` (:func:`job_key`, :class:`Job`).
- ``results.jsonl``: one JSON record per finished job, appended with :func:`append_record`: the
  whole line in one ``write`` on an ``O_APPEND`` descriptor, under an exclusive ``flock``, then
  ``fsync``. A process killed at any moment leaves either the full line or none of it (at worst,
  on a crash of the machine, a truncated *last* line, which :func:`read_records` skips and the
  next append terminates first).
- Retractions: :func:`mark_stale` appends a ``status = "stale"`` record for finished results
  computed by code since found wrong; the latest record of a key is its status, so the job runs
  again.
- ``batch.json``: the spec text, the command and the job keys of the latest run.
- ``checkpoints/<key>.kfb``: the train jobs' checkpoints (:func:`checkpoint_path`).
- ``artifacts/<key>.*``: other files jobs write (:func:`artifact_path`).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import KfacboundError
from ..io import canonical_json, to_jsonable

RESULTS = "results.jsonl"
BATCH_INFO = "batch.json"
CHECKPOINT_DIR = "checkpoints"
ARTIFACT_DIR = "artifacts"
HASH_EXCLUDED = ("label",)

try:  # POSIX file locks; the batch runner needs them
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]


# --------------------------------------------------------------------------------------------
# keys


def job_key(config: dict[str, Any]) -> str:
    """sha256 (hex) of the canonical JSON of ``config`` without its display ``label``."""
    hashed = {k: v for k, v in config.items() if k not in HASH_EXCLUDED}
    return hashlib.sha256(canonical_json(hashed).encode()).hexdigest()


@dataclass(frozen=True)
class Job:
    """One resolved job: its key, kind, configuration and the keys of the jobs it needs."""

    key: str
    config: dict[str, Any]

    @property
    def kind(self) -> str:
        """The job's kind (a name of :data:`kfacbound.batch.jobs.JOB_KINDS` or ``[kinds]``)."""
        return self.config["kind"]

    @property
    def needs(self) -> tuple[str, ...]:
        """The keys of the jobs whose checkpoints this job reads."""
        return tuple(self.config.get("needs", ()))

    @staticmethod
    def from_config(config: dict[str, Any]) -> Job:
        """The job of ``config``, keyed by :func:`job_key`."""
        return Job(job_key(config), config)


def utc_now() -> str:
    """The time now, ISO 8601 in UTC with milliseconds (the timestamps of records)."""
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="milliseconds")


# --------------------------------------------------------------------------------------------
# results.jsonl


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


#: Status of a record that retracts a finished result (:func:`mark_stale`): the job runs again.
STALE = "stale"


def config_value(config: dict[str, Any], path: str) -> Any:
    """The value at a dotted ``path`` of a job config (``options.prior_split``, ``arch.bn``);
    a missing entry reads as None."""
    value: Any = config
    for part in path.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def config_matches(config: dict[str, Any], where: dict[str, Any]) -> bool:
    """Whether a job config holds every value of ``where`` (dotted path → value,
    :func:`config_value`)."""
    return all(config_value(config, k) == v for k, v in where.items())


def mark_stale(path: str | Path, where: dict[str, Any], reason: str) -> list[str]:
    """Retract every finished result whose config matches all of ``where`` (dotted path →
    value, :func:`config_value`): append a record with status :data:`STALE`, the reason and the
    retracted record's timing, so that the next run of the batch runs the job again and the
    file keeps the history. For results computed by code since found wrong (the key covers the
    options, not the code). Returns the keys marked."""
    if not where:
        raise KfacboundError("mark_stale needs at least one path=value condition")
    if not reason.strip():
        raise KfacboundError("say why the results are stale (a reason is recorded)")
    marked = []
    for key, record in latest_records(path).items():
        config = record.get("config") or {}
        if record["status"] != "ok" or not config_matches(config, where):
            continue
        append_record(path, {
            "key": key, "kind": record.get("kind"), "status": STALE, "config": config,
            "error": None, "result": None,
            "stale": {"reason": reason, "marked": utc_now(), "where": where,
                      "retracted_timing": record.get("timing")},
        })
        marked.append(key)
    return marked


def batch_info(out_dir: str | Path) -> dict[str, Any]:
    """The contents of ``<out>/batch.json`` (the latest run), ``{}`` when missing or unreadable."""
    path = Path(out_dir) / BATCH_INFO
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return {}


# --------------------------------------------------------------------------------------------
# files jobs write


def checkpoint_path(out_dir: str | Path, key: str) -> Path:
    """Where the train job with ``key`` writes its checkpoint."""
    return Path(out_dir) / CHECKPOINT_DIR / f"{key}.kfb"


def artifact_path(out_dir: str | Path, key: str, suffix: str) -> Path:
    """A file a job writes besides its record: ``<out>/artifacts/<key><suffix>``."""
    path = Path(out_dir) / ARTIFACT_DIR / f"{key}{suffix}"
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def needed_checkpoints(config: dict[str, Any], out_dir: str | Path) -> list[Path]:
    """The checkpoints of the train jobs this job needs; a clear error when one is missing."""
    paths = [checkpoint_path(out_dir, key) for key in config.get("needs", [])]
    for path in paths:
        if not path.is_file():
            raise KfacboundError(f"checkpoint {path} of a finished train job is missing; "
                                 "delete its record or rerun with a fresh --out")
    return paths
