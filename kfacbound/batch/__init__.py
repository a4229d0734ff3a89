"""Batch evaluations: a TOML grid of jobs, run resumably in parallel, summarised in reports.

Modules, each importing only those listed before it (no import cycles):

- :mod:`.records`: job keys, :class:`Job`, the output directory's files (atomic JSONL records,
  ``batch.json``, checkpoint and artifact paths).
- :mod:`.jobs`: the registry of job kinds (train, curvature, bound, structure, spectra, plug-ins),
  entries by import path.
- :mod:`.adapters`: the built-in job functions (training, import, the analyses).
- :mod:`.spec`: the spec format and its expansion into content-keyed jobs.
- :mod:`.execute`: run one job and make its record (the worker side).
- :mod:`.executors`: inline, local processes, Ray.
- :mod:`.report`: ``summary.csv`` and ``report.md`` from ``results.jsonl``.
- :mod:`.runner`: the driver: resume, dependencies, failure isolation.
- :mod:`.compare`: the BatchNorm report (``kfacbound compare``).
"""

from __future__ import annotations

from .jobs import JOB_KINDS, JobKind, get_job_kind, register_job_kind
from .records import Job, append_record, job_key, latest_records, read_records
from .report import write_report
from .runner import BatchOutcome, run_batch
from .spec import BatchSpec, expand_spec, load_spec, parse_spec

__all__ = [
    "JOB_KINDS", "BatchOutcome", "BatchSpec", "Job", "JobKind", "append_record", "expand_spec",
    "get_job_kind", "job_key", "latest_records", "load_spec", "parse_spec", "read_records",
    "register_job_kind", "run_batch", "write_report",
]
