"""``kfacbound batch SPEC --out DIR``: run a grid of jobs resumably (see kfacbound.batch)."""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path
from typing import Any

import click

from ..batch.executors import EXECUTORS
from ..batch.records import RESULTS, config_matches, latest_records, mark_stale
from ..batch.report import write_report
from ..batch.runner import run_batch, select_jobs
from ..batch.spec import load_spec


def parse_where(text: str, option: str = "--mark-stale") -> dict[str, Any]:
    """'a.b=1,c="x"' → {'a.b': 1, 'c': 'x'}: values are JSON, else plain strings."""
    where: dict[str, Any] = {}
    for part in (p for p in text.split(",") if p.strip()):
        if "=" not in part:
            raise click.BadParameter(f"{part!r} is not PATH=VALUE", param_hint=option)
        path, value = (s.strip() for s in part.split("=", 1))
        try:
            where[path] = json.loads(value)
        except json.JSONDecodeError:
            where[path] = value
    return where


@click.command("batch")
@click.argument("spec", type=click.Path(dir_okay=False))
@click.option("--out", "-o", "out", required=True, type=click.Path(file_okay=False),
              help="Output directory: results.jsonl, checkpoints/, summary.csv, report.md.")
@click.option("--workers", "-j", type=int, default=1, show_default=True,
              help="Jobs run at once (local processes or Ray tasks).")
@click.option("--executor", type=click.Choice(EXECUTORS), default="local", show_default=True,
              help="inline: in this process; local: spawned worker processes; ray: Ray tasks.")
@click.option("--threads", type=int, default=None,
              help="torch threads per job [default: max(1, cores // workers)].")
@click.option("--ray-address", default=None, envvar="RAY_ADDRESS",
              help="Ray cluster address (env RAY_ADDRESS); default: start a local Ray.")
@click.option("--retry-failed", is_flag=True,
              help="Run jobs whose recorded status is error again (default: keep them).")
@click.option("--dry-run", is_flag=True,
              help="List the jobs and whether each would run; run nothing.")
@click.option("--report-only", is_flag=True,
              help="Rewrite OUT/summary.csv and OUT/report.md from the records so far (e.g. "
                   "of an interrupted run); run nothing.")
@click.option("--mark-stale", "stale", multiple=True, metavar="PATH=VALUE[,PATH=VALUE...]",
              help="Before running, retract the finished results whose job config matches "
                   "every PATH=VALUE (dotted config paths, JSON values), e.g. "
                   "'kind=\"bound\",bn=true,options.prior_split=0.5', so that they run again; "
                   "needs --reason. Repeat for several filters.")
@click.option("--reason", default="", help="Why the --mark-stale results are wrong (recorded).")
@click.option("--only", "only", multiple=True, metavar="PATH=VALUE[,PATH=VALUE...]",
              help="Run only the jobs whose config matches every PATH=VALUE (same syntax as "
                   "--mark-stale), and the jobs they need, e.g. 'label.arch=\"resnet8-w8\"' "
                   "for one cell of the grid; the rest waits for a later run. Repeat for "
                   "several filters (a job matching any runs).")
@click.option("--progress/--no-progress", default=True, show_default=True,
              help="Show a progress bar over jobs on stderr.")
def command(spec: str, out: str, workers: int, executor: str, threads: int | None,
            ray_address: str | None, retry_failed: bool, dry_run: bool, report_only: bool,
            stale: tuple[str, ...], reason: str, only: tuple[str, ...], progress: bool) -> None:
    """Run the grid described by the TOML file SPEC, resumably.

    Every finished job appends one JSON record to OUT/results.jsonl; a rerun of the same spec
    skips jobs already recorded as ok (also after the run was killed), keeps failed ones unless
    --retry-failed, and regenerates OUT/summary.csv and OUT/report.md. Exit code 0 when every
    job of this run is ok (with --only, jobs left for later do not count; failures kept from
    earlier runs do), 1 when some failed, 2 for bad input. The spec format is documented in
    kfacbound/batch/spec.py and scripts/specs/smoke.toml.

    Example: kfacbound batch scripts/specs/smoke.toml --out smoke-out --workers 2
    """
    batch = load_spec(spec)
    wheres = [parse_where(text, "--only") for text in only]
    for text, where in zip(only, wheres, strict=True):
        if not where:
            raise click.BadParameter("give at least one PATH=VALUE", param_hint="--only")
        if not any(config_matches(job.config, where) for job in batch.jobs):
            raise click.BadParameter(f"no job of the spec matches {text!r}", param_hint="--only")
    selected = select_jobs(batch.jobs, wheres)
    if stale and not dry_run:
        for text in stale:
            keys = mark_stale(Path(out) / RESULTS, parse_where(text), reason)
            click.echo(f"marked {len(keys)} finished result(s) stale: {text}", err=True)
    if report_only:
        click.echo(f"report: {write_report(out)}", err=True)
        return
    if dry_run:
        previous = latest_records(Path(out) / RESULTS)
        for job in batch.jobs:
            rec = previous.get(job.key)
            status = rec["status"] if rec else "new"
            action = "skip" if status == "ok" or (status == "error" and not retry_failed) \
                else "run" if job.key in selected else "later"
            label = job.config.get("label") or {}
            seed = job.config.get("seeds", job.config.get("seed"))
            click.echo(f"{job.key[:12]}  {job.kind:<10} {str(label.get('dataset')):<14} "
                       f"{str(label.get('arch')):<14} bn={job.config.get('bn')!s:<5} "
                       f"seed={seed}  {status:<5} -> {action}")
        click.echo(f"{len(batch.jobs)} jobs", err=True)
        return
    command_line = "kfacbound batch " + " ".join(shlex.quote(a) for a in sys.argv[2:]) \
        if len(sys.argv) > 2 and sys.argv[1] == "batch" else \
        f"kfacbound batch {shlex.quote(spec)} --out {shlex.quote(out)}"
    outcome = run_batch(batch, out, executor=executor, workers=workers, threads=threads,
                        ray_address=ray_address, retry_failed=retry_failed, progress=progress,
                        command=command_line, only=wheres)
    click.echo(f"{outcome.summary()}; report: {outcome.report}", err=True)
    if outcome.all_failed:
        click.echo(f"{len(outcome.all_failed)} job(s) failed: see {out}/report.md "
                   "(rerun with --retry-failed to try them again)", err=True)
        sys.exit(1)
