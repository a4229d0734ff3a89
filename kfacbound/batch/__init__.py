"""Batch evaluations: a TOML grid of jobs, run resumably in parallel, summarised in reports.

- :mod:`.spec`: the spec format and its expansion into content-keyed jobs.
- :mod:`.jobs`: the registry of job kinds (train, curvature, bound, structure, spectra, plug-ins).
- :mod:`.runner`: atomic JSONL records, resume, failure isolation.
- :mod:`.executors`: inline, local processes, Ray.
- :mod:`.report`: ``summary.csv`` and ``report.md`` from ``results.jsonl``.
- :mod:`.compare`: the BatchNorm report (``kfacbound compare``).
"""

from __future__ import annotations

from .jobs import JOB_KINDS, JobKind, get_job_kind, register_job_kind
from .report import write_report
from .runner import BatchOutcome, append_record, latest_records, read_records, run_batch
from .spec import BatchSpec, Job, expand_spec, job_key, load_spec, parse_spec

__all__ = [
    "JOB_KINDS", "BatchOutcome", "BatchSpec", "Job", "JobKind", "append_record", "expand_spec",
    "get_job_kind", "job_key", "latest_records", "load_spec", "parse_spec", "read_records",
    "register_job_kind", "run_batch", "write_report",
]
