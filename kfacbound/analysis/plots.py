"""Figures for the comparison, structure and spectra reports (matplotlib, Agg backend).

Shared helpers (:func:`subplots_grid`, :func:`save_figure`) plus one function per report. All write
a PNG (or any format matplotlib infers from the suffix) and return its path; nothing is shown.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def subplots_grid(n: int, ncols: int = 3, size: tuple[float, float] = (4.2, 3.2)):
    """(figure, flat list of n axes) on a grid of ``ncols`` columns; unused axes are hidden."""
    plt = _plt()
    ncols = max(1, min(ncols, n))
    nrows = max(1, math.ceil(n / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(size[0] * ncols, size[1] * nrows),
                             squeeze=False)
    flat = list(axes.ravel())
    for ax in flat[n:]:
        ax.set_visible(False)
    return fig, flat[:n]


def save_figure(fig, path: str | Path, title: str | None = None, dpi: int = 120) -> Path:
    """Tight layout, optional suptitle, save to ``path`` (parents created), close."""
    plt = _plt()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def plot_spectrum_comparison(result: dict[str, Any], path: str | Path) -> Path:
    """Per layer: exact and K-FAC top-k eigenvalues (log scale, left) and their overlap curves
    against k (right), for the output of :func:`kfacbound.analysis.compare.compare_model`."""
    layers = result["layers"]
    fig, axes = subplots_grid(2 * len(layers), ncols=2)
    for r, row in enumerate(layers):
        ax_e, ax_o = axes[2 * r], axes[2 * r + 1]
        ks = np.arange(1, row["k"] + 1)
        for part, vals in row["exact"].items():
            v = np.asarray(vals)
            ax_e.plot(ks, np.where(v > 0, v, np.nan), "o-", ms=3, label=f"exact {part}")
            ax_o.plot(ks, row["overlap"][part], "o-", ms=3, label=f"{part} vs K-FAC")
        kv = np.asarray(row["kfac"]["eigenvalues"])
        ax_e.plot(ks, np.where(kv > 0, kv, np.nan), "s--", ms=3, label="K-FAC G⊗A")
        ax_e.set_yscale("log")
        ax_e.set_xlabel("i")
        ax_e.set_ylabel("λ_i")
        ax_e.set_title(f"{row['layer']} (p = {row['dim']}): top eigenvalues")
        ax_e.legend(fontsize=7)
        ax_o.plot(ks, row["random_overlap"], ":", color="grey", label="random k/p")
        ax_o.set_ylim(-0.02, 1.02)
        ax_o.set_xlabel("k")
        ax_o.set_ylabel("overlap")
        ax_o.set_title(f"{row['layer']}: top-k eigenspace overlap")
        ax_o.legend(fontsize=7)
    return save_figure(fig, path, f"exact vs K-FAC ({result['meta'].get('kfac_method')}), "
                                  f"n = {result['meta'].get('n')}")


_GROUP_STYLE = {"no-bn": "tab:blue", "bn": "tab:orange", "bn-vs-no-bn": "tab:green"}


def plot_structure(report: dict[str, Any], path: str | Path) -> Path:
    """One panel per layer: mean (± min/max band) overlap across model pairs against k, per group
    (no-bn, bn, mixed), exact (solid) and K-FAC (dashed), with the random baseline k/p; a last
    panel with the rank-1 ratio of the top exact eigenvector and the alignment |cos(v₁(Ã), E[ã])|
    per layer and group (BN and non-BN models in one figure)."""
    names = report["meta"]["layers"]
    fig, axes = subplots_grid(len(names) + 1, ncols=3)
    for ax, name in zip(axes, names, strict=False):
        dim = report["models"][0]["layers"][name]["dim"]
        kmax = 1
        for group, color in _GROUP_STYLE.items():
            pr = [p for p in report["pairs"] if p["group"] == group and p["layer"] == name]
            if not pr:
                continue
            k = min(len(p["exact"]) for p in pr)
            kmax = max(kmax, k)
            ks = np.arange(1, k + 1)
            for key, style in (("exact", "-"), ("kfac", "--")):
                curves = np.array([p[key][:k] for p in pr])
                ax.plot(ks, curves.mean(0), style, color=color,
                        label=f"{group} {'exact' if key == 'exact' else 'K-FAC'} ({len(pr)})")
                if len(pr) > 1:
                    ax.fill_between(ks, curves.min(0), curves.max(0), color=color, alpha=0.12)
        ks = np.arange(1, kmax + 1)
        ax.plot(ks, ks / dim, ":", color="grey", label="random k/p")
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel("k")
        ax.set_ylabel("overlap across models")
        ax.set_title(f"{name} (p = {dim})")
        ax.legend(fontsize=6)
    ax = axes[-1]
    groups = [g for g in ("no-bn", "bn") if any(r["group"] == g for r in report["summary"])]
    width = 0.8 / max(1, 2 * len(groups))
    x = np.arange(len(names))
    for g_i, group in enumerate(groups):
        rows = {r["layer"]: r for r in report["summary"] if r["group"] == group}
        for m_i, (key, label, hatch) in enumerate((("rank1_top", "rank-1 ratio", ""),
                                                   ("align_A_mean", "|cos(v1(A), E[a])|",
                                                    "//"))):
            vals = [rows[n][key] if rows.get(n) and rows[n][key] is not None else np.nan
                    for n in names]
            ax.bar(x + (2 * g_i + m_i - len(groups) + 0.5) * width, vals, width,
                   color=_GROUP_STYLE[group], hatch=hatch, edgecolor="black", linewidth=0.4,
                   label=f"{group}: {label}")
    ax.set_xticks(x, names, rotation=30, fontsize=7)
    ax.set_ylim(0, 1.05)
    ax.set_title("rank-1 ratio (top eigvec), |cos(v1(A), E[a])|", fontsize=9)
    ax.legend(fontsize=6)
    return save_figure(fig, path, f"Hessian structure across models (k = "
                                  f"{report['meta']['k']}, n = {report['meta']['n']})")


_METRIC_LABELS = {"top": "top eigenvalue", "trace": "trace", "effective_rank": "effective rank",
                  "stable_rank": "stable rank", "negative_mass": "negative mass",
                  "negative_fraction": "negative fraction",
                  "condition_number": "condition number (positive part)",
                  "outliers": "outliers"}
_LOG_METRICS = ("top", "trace", "effective_rank", "stable_rank", "condition_number")


def plot_spectra_metrics(rows: Sequence[dict[str, Any]], path: str | Path,
                         metrics: Sequence[str] = tuple(_METRIC_LABELS)) -> Path:
    """One panel per metric against epoch (a line per layer), and a last panel with the train
    and test error of the checkpoints (from their metadata)."""
    layers = list(dict.fromkeys(r["layer"] for r in rows))
    fig, axes = subplots_grid(len(metrics) + 1, ncols=3)
    for ax, metric in zip(axes, metrics, strict=False):
        for layer in layers:
            pts = [(r["epoch"], r[metric]) for r in rows if r["layer"] == layer
                   and r.get(metric) is not None and not _isnan(r[metric])]
            if pts:
                e, v = zip(*pts, strict=False)
                ax.plot(e, v, "o-", ms=3, label=layer)
        if metric in _LOG_METRICS and all(
                (r.get(metric) or 0) > 0 for r in rows if r.get(metric) is not None):
            ax.set_yscale("log")
        ax.set_title(_METRIC_LABELS.get(metric, metric))
        ax.set_xlabel("epoch")
        ax.legend(fontsize=6)
    ax = axes[-1]
    seen = {}
    for r in rows:
        seen.setdefault(r["epoch"], r)
    epochs = sorted(seen)
    for key, style in (("train_error", "o-"), ("test_error", "s--")):
        vals = [seen[e].get(key) for e in epochs]
        if any(v is not None for v in vals):
            ax.plot(epochs, [np.nan if v is None else v for v in vals], style, ms=3,
                    label=key.replace("_", " "))
    ax.set_title("0-1 error")
    ax.set_xlabel("epoch")
    ax.legend(fontsize=7)
    return save_figure(fig, path, "layer Hessian spectra over training")


def plot_spectra_runs(runs: dict[str, Sequence[dict[str, Any]]], path: str | Path,
                      metrics: Sequence[str] = ("top", "effective_rank", "negative_mass")
                      ) -> Path:
    """Several training runs side by side: one row of panels per layer position (first and
    last layer of each run), one panel per metric against epoch with a line per run, and a last
    column with each run's generalisation gap (test − train 0-1 error)."""
    positions = ("first", "last")
    fig, axes = subplots_grid(len(positions) * (len(metrics) + 1), ncols=len(metrics) + 1,
                              size=(3.6, 2.8))
    for row_i, pos in enumerate(positions):
        for col, metric in enumerate(list(metrics) + ["gap"]):
            ax = axes[row_i * (len(metrics) + 1) + col]
            for run, rows in runs.items():
                layers = list(dict.fromkeys(r["layer"] for r in rows))
                layer = layers[0] if pos == "first" else layers[-1]
                mine = [r for r in rows if r["layer"] == layer]
                if metric == "gap":
                    pts = [(r["epoch"], r["test_error"] - r["train_error"]) for r in mine
                           if r.get("test_error") is not None and r.get("train_error") is not None]
                else:
                    pts = [(r["epoch"], r[metric]) for r in mine
                           if r.get(metric) is not None and not _isnan(r[metric])]
                if pts:
                    e, v = zip(*pts, strict=False)
                    ax.plot(e, v, "o-", ms=2, label=run)
            if metric in _LOG_METRICS:
                ax.set_yscale("log")
            title = "test − train error" if metric == "gap" else _METRIC_LABELS.get(metric,
                                                                                    metric)
            ax.set_title(f"{title} ({pos} layer)" if metric != "gap" else title, fontsize=8)
            ax.set_xlabel("epoch", fontsize=7)
            ax.tick_params(labelsize=6)
            if col == 0:
                ax.legend(fontsize=6)
    return save_figure(fig, path, "layer Hessian diagnostics over training")


def plot_densities(densities: Sequence[dict[str, Any]], path: str | Path, layer: str) -> Path:
    """Spectral densities of one layer, one curve per checkpoint coloured by epoch (symlog x)."""
    plt = _plt()
    items = [d for d in densities if d["layer"] == layer]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    cmap = plt.get_cmap("viridis")
    for i, d in enumerate(items):
        color = cmap(i / max(1, len(items) - 1))
        ax.plot(d["grid"], np.maximum(np.asarray(d["density"]), 1e-12), color=color,
                label=f"epoch {d['epoch']}")
    ax.set_yscale("log")
    ax.set_xscale("symlog", linthresh=_linthresh(items))
    ax.set_xlabel("eigenvalue")
    ax.set_ylabel("density (broadened)")
    ax.legend(fontsize=6, ncol=2)
    return save_figure(fig, path, f"{layer}: spectral density over training")


def _linthresh(items) -> float:
    vals = np.concatenate([np.abs(np.asarray(d["grid"])) for d in items]) if items else [1.0]
    top = float(np.max(vals)) if len(vals) else 1.0
    return max(top * 1e-4, 1e-12)


def _isnan(v) -> bool:
    return isinstance(v, float) and math.isnan(v)
