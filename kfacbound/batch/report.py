"""``summary.csv`` and ``report.md``, regenerated from ``results.jsonl`` alone.

One row per job (its latest record; the keys of the latest run, in spec order, when
``batch.json`` lists them). Columns: ``key`` (first 12 hex digits), ``kind``, ``status``,
``dataset``, ``arch`` (display labels), ``bn``, ``seed`` (or the seeds a structure job
compares), the analysis options as ``opt.<name>``, the result fields (nested dicts flattened with
dots, e.g. ``layers.fc1.rank1_ratio``; short lists as JSON text), ``wall_s`` and ``error``. The
markdown report has one table per job kind with its scalar result fields, a list of failures,
and a header with the batch name, the command that ran it and the spec text.
"""

from __future__ import annotations

import csv
import datetime as _dt
import io
import json
from pathlib import Path
from typing import Any

from ..errors import KfacboundError
from ..io import write_text_atomic
from .records import RESULTS, STALE, batch_info, latest_records

SUMMARY = "summary.csv"
REPORT = "report.md"
MAX_LIST = 16  # longer lists stay out of the CSV (they are in results.jsonl)
ID_COLUMNS = ["key", "kind", "status", "dataset", "arch", "bn", "seed"]


def batch_records(out_dir: str | Path, only_latest_run: bool = True) -> list[dict[str, Any]]:
    """The latest record per key; restricted to (and ordered as) the latest run's keys."""
    latest = latest_records(Path(out_dir) / RESULTS)
    keys = batch_info(out_dir).get("keys") if only_latest_run else None
    if keys:
        return [latest[k] for k in keys if k in latest]
    return list(latest.values())


def flatten(obj: Any, prefix: str = "", out: dict[str, Any] | None = None) -> dict[str, Any]:
    """Nested dicts as dotted keys; lists of at most :data:`MAX_LIST` scalars as JSON text."""
    out = {} if out is None else out
    if isinstance(obj, dict):
        for k, v in obj.items():
            flatten(v, f"{prefix}.{k}" if prefix else str(k), out)
    elif isinstance(obj, list):
        if len(obj) <= MAX_LIST and all(not isinstance(v, dict | list) for v in obj):
            out[prefix] = json.dumps(obj)
    else:
        out[prefix] = obj
    return out


def record_row(record: dict[str, Any]) -> dict[str, Any]:
    """The CSV row of one record (see the module docstring for the columns)."""
    config = record.get("config", {})
    label = config.get("label") or {}
    row: dict[str, Any] = {
        "key": record["key"][:12],
        "kind": record.get("kind"),
        "status": record.get("status"),
        "dataset": label.get("dataset") or (config.get("dataset") or {}).get("name"),
        "arch": label.get("arch") or (config.get("arch") or {}).get("arch"),
        "bn": config.get("bn"),
        "seed": config.get("seed") if "seeds" not in config else
        " ".join(str(s) for s in config["seeds"]),
    }
    for name, value in flatten(config.get("options") or {}).items():
        row[f"opt.{name}"] = value
    for name, value in flatten(record.get("result") or {}).items():
        row.setdefault(name, value)
    row["wall_s"] = (record.get("timing") or {}).get("wall_s")
    error = record.get("error")
    row["error"] = f"{error['type']}: {error['message']}" if error else ""
    return row


def _columns(rows: list[dict[str, Any]]) -> list[str]:
    cols: list[str] = list(ID_COLUMNS)
    for row in rows:
        for name in row:
            if name not in cols and name not in ("wall_s", "error"):
                cols.append(name)
    return cols + ["wall_s", "error"]


def summary_csv(records: list[dict[str, Any]]) -> str:
    rows = [record_row(r) for r in records]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=_columns(rows), extrasaction="ignore",
                            lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if v is None else v) for k, v in row.items()})
    return buf.getvalue()


def fmt(value: Any) -> str:
    """A table cell: floats with 4 significant digits, booleans as yes/no, None as blank."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def markdown_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(fmt(row.get(c)) for c in columns) + " |")
    return "\n".join(lines)


# result fields shown first in the markdown tables, when present
PREFERRED = ("bound", "kl", "snn_train_error", "snn_test_error", "train_error", "test_error",
             "overlap", "rank1_ratio", "outliers", "top_eigenvalue")


def _kind_columns(rows: list[dict[str, Any]], max_results: int = 14) -> list[str]:
    """Identity columns, options that vary, then scalar result fields (the :data:`PREFERRED`
    ones first; long strings such as file paths stay in the CSV)."""
    ident = [c for c in [*ID_COLUMNS, "layer"] if c not in ("kind",) and
             any(r.get(c) is not None for r in rows)]
    options, results = [], []
    for row in rows:
        for name, value in row.items():
            if name in ID_COLUMNS or name in ("wall_s", "error", "layer"):
                continue
            if name.startswith("opt."):
                if name not in options and len({fmt(r.get(name)) for r in rows}) > 1:
                    options.append(name)  # only options that vary between the rows
            elif "." not in name and name not in results and not (
                    isinstance(value, str) and (value.startswith("[") or len(value) > 32)):
                results.append(name)
    results.sort(key=lambda n: PREFERRED.index(n) if n in PREFERRED else len(PREFERRED))
    tail = ["wall_s"] if any("wall_s" in r for r in rows) else []
    return ident + options + results[:max_results] + tail


def layer_table_rows(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (job, layer) for results holding a ``layers`` dict of per-layer scalars."""
    out = []
    for record in records:
        layers = (record.get("result") or {}).get("layers")
        if record.get("status") != "ok" or not isinstance(layers, dict):
            continue
        base = {k: v for k, v in record_row({**record, "result": {}}).items()
                if k in ID_COLUMNS and k not in ("kind", "status")}
        for name, values in layers.items():
            if isinstance(values, dict):
                row = dict(base, layer=name)
                row.update({k: v for k, v in values.items()
                            if not isinstance(v, dict | list)})
                out.append(row)
    return out


def report_markdown(out_dir: str | Path, records: list[dict[str, Any]]) -> str:
    info = batch_info(out_dir)
    rows = [record_row(r) for r in records]
    n_ok = sum(r["status"] == "ok" for r in rows)
    failed = [r for r in rows if r["status"] == "error"]
    n_stale = sum(r["status"] == STALE for r in rows)
    now = _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    parts = [f"# Batch report: {info.get('name', Path(out_dir).name)}", ""]
    if info.get("description"):
        parts += [info["description"], ""]
    parts += [
        f"- generated: {now}, from `{Path(out_dir) / RESULTS}`",
        f"- command: `{info.get('command', '?')}`",
        f"- spec: `{info.get('spec_path') or '?'}`",
        f"- last run started: {info.get('started', '?')} (executor {info.get('executor', '?')}, "
        f"workers {info.get('workers', '?')})",
        f"- jobs: {len(rows)} recorded of {len(info.get('keys', rows))} in the spec; "
        f"{n_ok} ok, {len(failed)} failed"
        + (f", {n_stale} retracted as stale (they run again)" if n_stale else ""),
        "",
    ]
    if info.get("spec_text"):
        parts += ["<details><summary>spec</summary>", "", "```toml",
                  info["spec_text"].rstrip(), "```", "", "</details>", ""]
    kinds: list[str] = []
    for row in rows:
        if row["kind"] not in kinds:
            kinds.append(row["kind"])
    for kind in kinds:
        these = [r for r in rows if r["kind"] == kind]
        parts += [f"## {kind} ({len(these)} jobs)", "",
                  markdown_table(these, _kind_columns(these)), ""]
        per_layer = layer_table_rows([r for r in records if r.get("kind") == kind])
        if per_layer:
            parts += [f"Per layer ({kind}):", "",
                      markdown_table(per_layer, _kind_columns(per_layer)), ""]
    if failed:
        parts += ["## Failures", ""]
        for r in failed:
            parts.append(f"- `{r['key']}` {r['kind']} {r.get('dataset') or ''} "
                         f"{r.get('arch') or ''} bn={fmt(r.get('bn'))} seed={r.get('seed')}: "
                         f"{r['error']}")
        parts.append("")
    parts += ["Every number above is in `summary.csv` (all result fields) and "
              "`results.jsonl` (full records).", ""]
    return "\n".join(parts)


def write_report(out_dir: str | Path) -> Path:
    """Rewrite ``summary.csv`` and ``report.md`` in ``out_dir``; return the report's path."""
    out = Path(out_dir)
    if not out.is_dir():
        raise KfacboundError(f"{out} is not a batch output directory")
    records = batch_records(out)
    for name, text in ((SUMMARY, summary_csv(records)),
                       (REPORT, report_markdown(out, records))):
        write_text_atomic(out / name, text)
    return out / REPORT
