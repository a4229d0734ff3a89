"""The BatchNorm report: networks with and without BatchNorm side by side.

Input: the records of a finished batch (``results.jsonl``), or checkpoint files, which
:func:`compare_checkpoints` turns into a small batch (``import`` + ``bound`` + ``structure``
jobs, run by :func:`kfacbound.batch.runner.run_batch`, so the numbers come from the analyses'
own APIs and are cached for reruns).

Pairing: a network without BN is matched with the one with BN of the same dataset, architecture,
seed and analysis options (e.g. the posterior). Tables (markdown and CSV) and figures (PNG) on one
markdown page:

- **bounds**: certified bound, KL(Q‖P), stochastic-network (SNN) error on the bound set (the
  Monte-Carlo ê_N) and on the test set, deterministic test error; one row per seed and the mean
  over seeds;
- **structure** per layer: top-k eigenspace overlap between independently trained networks,
  rank-1 ratio of the reshaped top eigenvectors (σ₁²/Σσᵢ²), number of outlier eigenvalues, top
  eigenvalue (and the top few in a figure).

Which numbers exist depends on the analyses the batch ran; missing ones are left blank.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from ..errors import KfacboundError
from ..io import canonical_json, write_csv_atomic, write_json_atomic, write_text_atomic
from .report import batch_records, fmt, markdown_table
from .runner import run_batch
from .spec import expand_spec

# matplotlib is imported inside the plotting functions: a heavy dependency only figures need.

BOUND_METRICS = [("bound", "bound"), ("kl", "KL"), ("snn_train_error", "SNN train error"),
                 ("snn_test_error", "SNN test error"), ("test_error", "test error")]
LAYER_METRICS = [("overlap", "eigenspace overlap"), ("rank1_ratio", "rank-1 ratio"),
                 ("outliers", "outliers"), ("top_eigenvalue", "top eigenvalue")]
SIDES = ((False, "no BN"), (True, "BN"))


def _label(record: dict[str, Any]) -> tuple[str, str]:
    config = record["config"]
    label = config.get("label") or {}
    return (str(label.get("dataset") or (config.get("dataset") or {}).get("name")),
            str(label.get("arch") or (config.get("arch") or {}).get("arch")))


def _variant(options: dict[str, Any], varying: set[str]) -> str:
    return ", ".join(f"{k}={options[k]}" for k in sorted(varying) if k in options) or "-"


def _varying(records: list[dict[str, Any]]) -> set[str]:
    values: dict[str, set[str]] = {}
    for r in records:
        for k, v in (r["config"].get("options") or {}).items():
            values.setdefault(k, set()).add(canonical_json(v))
    return {k for k, v in values.items() if len(v) > 1}


def _mean(values: list[Any]) -> float | None:
    xs = [float(v) for v in values if isinstance(v, int | float) and not isinstance(v, bool)
          and math.isfinite(float(v))]
    return sum(xs) / len(xs) if xs else None


def bound_rows(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows (dataset, arch, variant, seed) with ``<metric> (no BN)`` / ``<metric> (BN)``."""
    bounds = [r for r in records if r["kind"] == "bound" and r["status"] == "ok"]
    varying = _varying(bounds)
    cells: dict[tuple, dict[str, Any]] = {}
    for r in bounds:
        config = r["config"]
        ds, arch = _label(r)
        options = config.get("options") or {}
        key = (ds, arch, canonical_json(options), config.get("seed"))
        row = cells.setdefault(key, {"dataset": ds, "arch": arch,
                                     "variant": _variant(options, varying),
                                     "seed": config.get("seed")})
        side = "BN" if config.get("bn") else "no BN"
        for metric, _ in BOUND_METRICS:
            row[f"{metric} ({side})"] = r["result"].get(metric)
    rows = sorted(cells.values(), key=lambda x: (x["dataset"], x["arch"], x["variant"],
                                                 str(x["seed"])))
    out: list[dict[str, Any]] = []
    for i, row in enumerate(rows):
        out.append(row)
        last = i + 1 == len(rows) or any(rows[i + 1][c] != row[c]
                                         for c in ("dataset", "arch", "variant"))
        group = [r for r in rows if all(r[c] == row[c] for c in ("dataset", "arch", "variant"))]
        if last and len(group) > 1:
            mean = {c: row[c] for c in ("dataset", "arch", "variant")}
            mean["seed"] = "mean"
            for name in bound_columns()[4:]:
                mean[name] = _mean([g.get(name) for g in group])
            out.append(mean)
    return out


def bound_columns() -> list[str]:
    cols = ["dataset", "arch", "variant", "seed"]
    for metric, _ in BOUND_METRICS:
        cols += [f"{metric} ({side})" for _, side in SIDES]
    return cols


def _layer_results(record: dict[str, Any]) -> dict[str, dict[str, Any]]:
    layers = (record.get("result") or {}).get("layers") or {}
    return layers if isinstance(layers, dict) else {}


def layer_rows(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows (dataset, arch, layer) with each layer metric for no BN and BN, from structure jobs
    (means over their seeds) and, for metrics structure did not give, spectra jobs (mean over
    seeds)."""
    cells: dict[tuple, dict[str, Any]] = {}
    fallback: dict[tuple, dict[str, list[Any]]] = {}
    for r in records:
        if r["status"] != "ok" or r["kind"] not in ("structure", "spectra"):
            continue
        ds, arch = _label(r)
        side = "BN" if r["config"].get("bn") else "no BN"
        for layer, values in _layer_results(r).items():
            if not isinstance(values, dict):
                continue
            row = cells.setdefault((ds, arch, layer), {"dataset": ds, "arch": arch,
                                                       "layer": layer})
            for metric, _ in LAYER_METRICS:
                if metric not in values:
                    continue
                if r["kind"] == "structure":
                    row[f"{metric} ({side})"] = values[metric]
                else:
                    fallback.setdefault((ds, arch, layer, side), {}).setdefault(
                        metric, []).append(values[metric])
            for extra in ("top_eigenvalues", "overlap_curve"):
                if r["kind"] == "structure" and values.get(extra) is not None:
                    row[f"{extra} ({side})"] = values[extra]
            if r["kind"] == "structure" and "k" in (r.get("result") or {}):
                row["k"] = r["result"]["k"]
    for (ds, arch, layer, side), metrics in fallback.items():
        row = cells[(ds, arch, layer)]
        for metric, values in metrics.items():
            row.setdefault(f"{metric} ({side})", _mean(values))
    return sorted(cells.values(), key=lambda x: (x["dataset"], x["arch"]))


def layer_columns() -> list[str]:
    cols = ["dataset", "arch", "layer"]
    for metric, _ in LAYER_METRICS:
        cols += [f"{metric} ({side})" for _, side in SIDES]
    return cols


# ------------------------------------------------------------------------------------ figures


def _plot_bounds(rows: list[dict[str, Any]], path: Path) -> Path | None:
    rows = [r for r in rows if r["seed"] == "mean"] or rows
    rows = [r for r in rows if r.get("bound (no BN)") is not None or
            r.get("bound (BN)") is not None]
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [f"{r['dataset']}\n{r['arch']}" + (f"\n{r['variant']}" if r["variant"] != "-"
                                                 else "") +
             ("" if r["seed"] == "mean" else f"\nseed {r['seed']}") for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(max(9, 1.6 * len(rows) * 3), 3.6))
    for ax, (metric, title) in zip(axes, [BOUND_METRICS[0], BOUND_METRICS[1],
                                          BOUND_METRICS[2]], strict=True):
        for j, (_, side) in enumerate(SIDES):
            vals = [r.get(f"{metric} ({side})") for r in rows]
            xs = [i + (j - 0.5) * 0.38 for i in range(len(rows))]
            ax.bar(xs, [v if v is not None else 0 for v in vals], width=0.38, label=side)
        ax.set_xticks(range(len(rows)), names, fontsize=7)
        ax.set_title(title)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _plot_layers(rows: list[dict[str, Any]], path: Path) -> Path | None:
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [f"{r['arch']}\n{r['layer']}" for r in rows]
    fig, axes = plt.subplots(1, len(LAYER_METRICS), figsize=(max(12, 1.2 * len(rows) * 4), 3.6))
    for ax, (metric, title) in zip(axes, LAYER_METRICS, strict=True):
        for j, (_, side) in enumerate(SIDES):
            vals = [r.get(f"{metric} ({side})") for r in rows]
            xs = [i + (j - 0.5) * 0.38 for i in range(len(rows))]
            ax.bar(xs, [v if isinstance(v, int | float) else 0 for v in vals], width=0.38,
                   label=side)
        ax.set_xticks(range(len(rows)), names, fontsize=7)
        ax.set_title(title)
        if metric == "top_eigenvalue":
            ax.set_yscale("log")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _plot_curves(rows: list[dict[str, Any]], path: Path, field: str, ylabel: str,
                 log: bool) -> Path | None:
    """One panel per layer: ``field`` (a list per side) against its index, no BN against BN."""
    rows = [r for r in rows if any(isinstance(r.get(f"{field} ({s})"), list)
                                   for _, s in SIDES)]
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(rows), figsize=(3.2 * len(rows), 3.2), squeeze=False)
    for ax, row in zip(axes[0], rows, strict=True):
        for _, side in SIDES:
            vals = row.get(f"{field} ({side})")
            if isinstance(vals, list) and vals:
                ys = [max(float(v), 1e-12) if log else float(v) for v in vals]
                ax.plot(range(1, len(vals) + 1), ys, "o-", ms=3, label=side)
        if log:
            ax.set_yscale("log")
        ax.set_title(f"{row['arch']} {row['layer']}", fontsize=9)
        ax.set_xlabel("k" if field == "overlap_curve" else "index")
    axes[0][0].set_ylabel(ylabel)
    axes[0][0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------------ report


def compare_records(records: list[dict[str, Any]], report_dir: str | Path,
                    source: str = "") -> Path:
    """Write the BatchNorm report for ``records`` into ``report_dir``; return report.md."""
    out = Path(report_dir)
    out.mkdir(parents=True, exist_ok=True)
    brows, lrows = bound_rows(records), layer_rows(records)
    if not brows and not lrows:
        raise KfacboundError("no finished bound, structure or spectra jobs to compare "
                             f"({len(records)} records)")
    write_csv_atomic(out / "bounds.csv", brows, bound_columns())
    lcols = layer_columns()
    write_csv_atomic(out / "layers.csv", lrows, lcols + ["k"])
    write_json_atomic(out / "compare.json", {"bounds": brows, "layers": lrows}, indent=1,
                      sort_keys=False, default=str, newline=False)
    figs = {"bounds": _plot_bounds(brows, out / "bounds.png"),
            "layers": _plot_layers(lrows, out / "structure.png"),
            "eigenvalues": _plot_curves(lrows, out / "eigenvalues.png", "top_eigenvalues",
                                        "eigenvalue", log=True),
            "overlap": _plot_curves(lrows, out / "overlap.png", "overlap_curve",
                                    "overlap across seeds", log=False)}
    ks = sorted({r["k"] for r in lrows if "k" in r})
    parts = ["# BatchNorm report: with and without BN side by side", ""]
    if source:
        parts += [f"Source: {source}", ""]
    parts += [
        "Each pair compares networks that differ only in BatchNorm (same dataset, architecture,"
        " seed and analysis options). BN networks are certified in their deployed form (eval-mode"
        " BN folded into the preceding layer).", "",
        "## Certified bounds", ""]
    if brows:
        parts += [markdown_table(brows, bound_columns()), ""]
        parts += ["SNN train error: the stochastic network's Monte-Carlo error on the bound set "
                  "(ê_N); SNN test error: on the test split; test error: the deterministic "
                  "network.", ""]
        if figs["bounds"]:
            parts += ["![bounds](bounds.png)", ""]
    else:
        parts += ["(no finished bound jobs)", ""]
    parts += ["## Hessian structure per layer", ""]
    if lrows:
        parts += [markdown_table(lrows, lcols), ""]
        parts += [f"Eigenspace overlap ‖V₁ᵀV₂‖²_F / k of the top-k eigenspaces of networks "
                  f"trained with different seeds (k = {', '.join(map(str, ks)) or '?'}; 1 = same "
                  "subspace); rank-1 ratio σ₁²/Σσᵢ² of the reshaped top eigenvectors; outliers: "
                  "eigenvalues above the bulk (C − 1 expected without BN).", ""]
        if figs["layers"]:
            parts += ["![structure](structure.png)", ""]
        if figs["overlap"]:
            parts += ["Eigenspace overlap across seeds as a function of k:", "",
                      "![overlap](overlap.png)", ""]
        if figs["eigenvalues"]:
            parts += ["Top eigenvalues per layer:", "", "![eigenvalues](eigenvalues.png)", ""]
    else:
        parts += ["(no finished structure or spectra jobs)", ""]
    parts += ["Tables as CSV: `bounds.csv`, `layers.csv`; everything in `compare.json`.", ""]
    path = out / "report.md"
    write_text_atomic(path, "\n".join(parts))
    return path


def compare_batch(batch_dir: str | Path, report_dir: str | Path) -> Path:
    """The BatchNorm report from the records of a finished batch."""
    batch_dir = Path(batch_dir)
    if not (batch_dir / "results.jsonl").exists():
        raise KfacboundError(f"{batch_dir} holds no results.jsonl: is it a batch --out directory?")
    return compare_records(batch_records(batch_dir, only_latest_run=False), report_dir,
                           source=f"batch `{batch_dir}`")


def compare_checkpoints(paths: list[str | Path], report_dir: str | Path,
                        bound: dict[str, Any] | None = None,
                        structure: dict[str, Any] | None = None, workers: int = 1,
                        executor: str = "local", progress: bool = True,
                        threads: int | None = None) -> Path:
    """Run bound (options ``bound``) and structure (options ``structure``; ``None`` skips it)
    jobs on checkpoint files through a batch in ``<report_dir>/batch``, then report."""
    analyses = [dict(bound or {}, kind="bound")]
    if structure is not None:
        analyses.append(dict(structure, kind="structure"))
    raw = {"name": "compare", "checkpoints": [str(Path(p).resolve()) for p in paths],
           "analyses": analyses}
    spec = expand_spec(raw, where="compare")
    batch_dir = Path(report_dir) / "batch"
    run_batch(spec, batch_dir, executor=executor, workers=workers, threads=threads,
              progress=progress,
              command="kfacbound compare " + " ".join(map(str, paths)))
    records = batch_records(batch_dir)
    failed = [r for r in records if r["status"] == "error"]
    path = compare_records(records, report_dir, source=", ".join(f"`{p}`" for p in paths))
    if failed:
        with open(path, "a") as fh:
            fh.write("\n## Failed analyses\n\n" + "\n".join(
                f"- {r['kind']} {_label(r)} bn={fmt(r['config'].get('bn'))}: "
                f"{r['error']['type']}: {r['error']['message']}" for r in failed) + "\n")
    return path
