"""Layer-wise Hessian spectra as diagnostics, e.g. over a training run (issue 5; SCIENCE.md §6).

For each Linear/Conv2d layer block M (exact H by default, or the GGN H_O; p×p in the [W | b]
layout of :mod:`kfacbound.curvature.layout`) of the mean loss over a dataset, the metrics of
:func:`kfacbound.curvature.spectral.spectrum_metrics`: top eigenvalue, trace, effective rank
exp(−Σ π log π) with π = λ₊/Σλ₊, stable rank Σλ₊/λ_max, negative mass Σ|λ₋|/Σ|λ| and fraction
#λ₋/p, condition number λ_max/λ_min of the positive part, number of outliers among the top k
(:func:`top_outliers`: largest eigenvalue-ratio gap ≥ 2, numerical zeros excluded) — and the
spectral density φ(t) = (1/p) Σ_i δ(t − λ_i), Gaussian-broadened on a grid (integrates to 1).
(Bolshim & Kugaevskikh, arXiv 2510.17486, read these over training; their exact metric
definitions are unverified, these are the usual ones.)

Two regimes:

- ``method="dense"`` (p ≤ ``dense_limit``): the dense block and all p eigenvalues (``eigh``);
  every metric is exact; eigenvalues within max|λ|·p·eps of 0 count as zero (eps of the
  precision of the products: float64 by default, float32 on request).
- ``method="slq"`` (larger blocks): the top ``k`` eigenvalues by Lanczos (top, outliers), the trace
  by Hutchinson (Rademacher probes; its standard error is reported), and the density by stochastic
  Lanczos quadrature (SLQ): nodes θ_jl and weights τ_jl (Σ_l τ_jl = 1) of probe j estimate
  Σ_i g(λ_i) ≈ (p/m) Σ_jl τ_jl g(θ_jl). From it: negative fraction ≈ (1/m) Σ τ 1[θ < −tol],
  negative mass ≈ Σ τ|θ|1[θ < −tol] / Σ τ|θ|, Σλ₊ ≈ (p/m) Σ τ θ 1[θ > tol], effective rank with
  π = λ/Σλ₊ integrated the same way, stable rank Σλ₊ / λ_max(Lanczos). ``tol`` = 1e-6 · max|θ|
  (float32 products: 100 · eps32 · max|θ|).
  The smallest positive eigenvalue is not resolved by SLQ, so ``condition_number`` is None there.
  These are estimates (quadrature with ``slq_steps`` nodes per probe), flagged by ``method``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..curvature.spectral import (
    count_outliers,
    hutchinson_trace,
    slq,
    slq_density,
    spectrum_metrics,
)
from ..data import dataset_tensors
from ..io import write_csv_atomic
from ..progress import progress_bar
from .compare import DEFAULT_DENSE_LIMIT, DEFAULT_TOL, exact_block, model_loss, resolve_layers

METRICS = ("top", "trace", "effective_rank", "stable_rank", "negative_mass", "negative_fraction",
           "condition_number", "outliers")
SLQ_REL_TOL = 1e-6


def zero_tol(eigenvalues, p: int | None = None, dtype: str = "float64") -> float:
    """Numerical-zero tolerance max|λ| · p · eps(dtype) (NumPy's rank tolerance; eps of the
    precision the matrix was computed in)."""
    lam = np.asarray(eigenvalues, dtype=np.float64).reshape(-1)
    if lam.size == 0:
        return 0.0
    return float(np.abs(lam).max()) * (p or lam.size) * float(np.finfo(np.dtype(dtype)).eps)


def top_outliers(eigenvalues, top: int, p: int | None = None, dtype: str = "float64") -> int:
    """:func:`~kfacbound.curvature.spectral.count_outliers` among the ``top`` largest eigenvalues
    above :func:`zero_tol` (p = block size, default the number of values). Without the cut, a
    numerical null space (e.g. the weights of dead ReLU units) gives ratio gaps of 1e10 at the
    rank boundary, which the largest-gap rule would call "outliers"."""
    lam = np.sort(np.asarray(eigenvalues, dtype=np.float64).reshape(-1))[::-1]
    if lam.size == 0:
        return 0
    tol = zero_tol(lam, p, dtype)
    lam = lam[lam > tol][:top]
    return count_outliers(lam, max_outliers=max(1, top - 1))


def slq_metrics(nodes: np.ndarray, weights: np.ndarray, p: int, top: float,
                rel_tol: float = SLQ_REL_TOL) -> dict[str, Any]:
    """Spectrum metrics estimated from SLQ nodes/weights (see the module docstring)."""
    theta = np.asarray(nodes, dtype=np.float64).reshape(-1)
    tau = np.asarray(weights, dtype=np.float64).reshape(-1) / np.atleast_2d(nodes).shape[0]
    tol = rel_tol * float(np.abs(theta).max()) if theta.size else 0.0
    pos = theta > tol
    neg = theta < -tol
    sum_pos = p * float((tau[pos] * theta[pos]).sum())
    abs_total = float((tau * np.abs(theta)).sum())
    out: dict[str, Any] = {"tol": tol, "num": p,
                           "num_positive": p * float(tau[pos].sum()),
                           "num_negative": p * float(tau[neg].sum()),
                           "negative_fraction": float(tau[neg].sum()),
                           "negative_mass": (float((tau[neg] * np.abs(theta[neg])).sum())
                                             / abs_total) if abs_total > 0 else 0.0,
                           "condition_number": None}
    if sum_pos > 0:
        pi = theta[pos] / sum_pos
        out["effective_rank"] = float(np.exp(-p * (tau[pos] * pi * np.log(pi)).sum()))
        out["stable_rank"] = sum_pos / top if top > 0 else float("nan")
    else:
        out["effective_rank"] = out["stable_rank"] = 0.0
    return out


def layer_spectrum(
    model: nn.Module,
    X: torch.Tensor,
    y: torch.Tensor,
    loss: str,
    layer: str,
    *,
    part: str = "H",
    dense_limit: int = DEFAULT_DENSE_LIMIT,
    k: int = 20,
    slq_probes: int = 10,
    slq_steps: int = 80,
    hutchinson_samples: int = 100,
    grid_points: int = 200,
    batch_size: int | None = None,
    device: str | torch.device | None = None,
    tol: float = DEFAULT_TOL,
    seed: int = 0,
    dtype: str = "float64",
) -> dict[str, Any]:
    """Metrics and density of one layer block; a JSON-able dict.

    Keys: ``layer``, ``part``, ``dim``, ``method`` ("dense"/"slq"), the :data:`METRICS`,
    ``top_eigenvalues`` (top k), ``density`` {grid, density, sigma}, and for SLQ ``trace_se``
    (Hutchinson standard error).
    """
    module = dict(model.named_modules())[layer]
    p = sum(t.numel() for t in (module.weight, module.bias) if t is not None)
    common = dict(batch_size=batch_size, device=device, dtype=dtype)
    if p <= dense_limit:
        blk = exact_block(model, X, y, loss, layer, p, part, dense_limit=dense_limit, **common)
        lam = blk.all_values
        metrics = spectrum_metrics(lam, tol=zero_tol(lam, p, dtype))
        metrics["outliers"] = top_outliers(lam, k, p, dtype)
        nodes, weights = lam[None, :], np.full((1, p), 1.0 / p)
        method, top_vals, trace_se = "dense", lam[:k], 0.0
    else:
        blk = exact_block(model, X, y, loss, layer, k, part, dense_limit=dense_limit, tol=tol,
                          seed=seed, **common)
        op = blk.operator
        top_vals = blk.values
        trace, trace_se = hutchinson_trace(op, hutchinson_samples, seed=seed)
        nodes, weights = slq(op, slq_probes, slq_steps, seed=seed)
        rel_tol = max(SLQ_REL_TOL, 100 * float(np.finfo(np.dtype(dtype)).eps))
        metrics = slq_metrics(nodes, weights, p, float(top_vals[0]), rel_tol)
        metrics.update(top=float(top_vals[0]), trace=trace,
                       outliers=top_outliers(top_vals, k, p, dtype))
        method = "slq"
    lo, hi = float(nodes.min()), float(nodes.max())
    sigma = max(0.01 * (hi - lo), 1e-12 * max(1.0, abs(hi)))
    grid, dens = slq_density(nodes, weights, sigma=sigma, num_points=grid_points)
    out = {"layer": layer, "part": part, "dim": p, "method": method}
    out.update({m: metrics.get(m) for m in METRICS})
    out.update(trace_se=trace_se, num_negative=metrics.get("num_negative"),
               num_positive=metrics.get("num_positive"), tol=metrics.get("tol"),
               top_eigenvalues=np.asarray(top_vals).tolist(),
               density={"grid": grid.tolist(), "density": dens.tolist(), "sigma": sigma})
    return out


def checkpoint_epoch(label: str, meta: dict[str, Any] | None, default: int) -> int:
    """Epoch of a checkpoint: meta["metrics"]["epoch"], else ``-epochNNN`` in its name."""
    metrics = (meta or {}).get("metrics", {}) or {}
    if metrics.get("epoch") is not None:
        return int(metrics["epoch"])
    m = re.search(r"epoch(\d+)", str(label))
    return int(m.group(1)) if m else default


def spectra_series(
    checkpoints: Sequence[tuple[str, nn.Module, dict[str, Any] | None]],
    data: Any,
    loss: str | None = None,
    *,
    layers: Sequence[str] | None = None,
    part: str = "H",
    dense_limit: int = DEFAULT_DENSE_LIMIT,
    k: int = 20,
    slq_probes: int = 10,
    slq_steps: int = 80,
    hutchinson_samples: int = 100,
    grid_points: int = 200,
    batch_size: int | None = None,
    device: str | torch.device | None = None,
    seed: int = 0,
    progress: bool = True,
    dtype: str = "float64",
) -> dict[str, Any]:
    """Layer spectra of each checkpoint, ordered by epoch; a JSON-able dict.

    ``checkpoints``: (label, model, meta) with meta as stored in a checkpoint (its
    ``metrics`` — epoch, train/test error and loss — join every row). Returns {"meta", "rows":
    one per (checkpoint, layer) with the metrics and errors, "densities": [{checkpoint, epoch,
    layer, grid, density}]}.
    """
    X, y = dataset_tensors(data)
    items = [(checkpoint_epoch(lbl, meta, i), i, lbl, m, meta or {})
             for i, (lbl, m, meta) in enumerate(checkpoints)]
    items.sort(key=lambda t: (t[0], t[1]))
    loss = model_loss(items[0][3], loss or items[0][4].get("loss"), X)
    jobs = [(it, name) for it in items for name in resolve_layers(it[3], layers)]
    rows, densities = [], []
    bar = progress_bar(len(jobs), "spectra", progress, unit="layer")
    for (epoch, _, label, model, meta), name in jobs:
        bar.set_postfix(ckpt=Path(str(label)).name, layer=name, refresh=False)
        res = layer_spectrum(model.eval(), X, y, loss, name, part=part, dense_limit=dense_limit,
                             k=k, slq_probes=slq_probes, slq_steps=slq_steps,
                             hutchinson_samples=hutchinson_samples, grid_points=grid_points,
                             batch_size=batch_size, device=device, seed=seed, dtype=dtype)
        metrics = meta.get("metrics", {}) or {}
        dens = res.pop("density")
        row = {"checkpoint": str(label), "epoch": epoch, **res}
        row.pop("top_eigenvalues")
        for key in ("train_error", "test_error", "train_loss", "test_loss"):
            row[key] = metrics.get(key)
        rows.append(row)
        densities.append({"checkpoint": str(label), "epoch": epoch, "layer": name,
                          "top_eigenvalues": res["top_eigenvalues"], **dens})
        bar.update(1)
    bar.close()
    meta = {"n": int(len(X)), "loss": loss, "part": part, "dense_limit": int(dense_limit),
            "k": int(k), "slq_probes": slq_probes, "slq_steps": slq_steps,
            "hutchinson_samples": hutchinson_samples, "dtype": dtype,
            "metrics": {"effective_rank": "exp(entropy of lambda+/sum lambda+)",
                        "stable_rank": "sum lambda+ / lambda_max",
                        "negative_mass": "sum |lambda-| / sum |lambda|",
                        "negative_fraction": "#lambda- / p",
                        "condition_number": "lambda_max / lambda_min of the positive part "
                                            "(dense only)",
                        "outliers": "largest eigenvalue-ratio gap (>= 2x) among the top"}}
    return {"meta": meta, "rows": rows, "densities": densities}


CSV_COLUMNS = ("checkpoint", "epoch", "layer", "part", "dim", "method", *METRICS, "trace_se",
               "num_negative", "num_positive", "tol", "train_error", "test_error", "train_loss",
               "test_loss")


def write_csv(rows: Sequence[dict[str, Any]], path: str | Path,
              columns: Sequence[str] = CSV_COLUMNS) -> Path:
    """Rows as CSV (empty cells for None), written atomically."""
    write_csv_atomic(path, rows, columns)
    return Path(path)


def format_rows(rows: Sequence[dict[str, Any]]) -> str:
    """Fixed-width text table of :func:`spectra_series` rows."""
    head = (f"{'epoch':>5} {'layer':<10} {'p':>7} {'meth':>5} {'top':>10} {'trace':>10} "
            f"{'eff.rank':>9} {'st.rank':>8} {'neg.mass':>8} {'neg.frac':>8} {'cond':>9} "
            f"{'outl':>4} {'train_err':>9} {'test_err':>8}")
    lines = [head]

    def f(v, w, spec):
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return f"{'-':>{w}}"
        return f"{v:{w}{spec}}"
    for r in rows:
        lines.append(
            f"{r['epoch']:>5} {r['layer']:<10} {r['dim']:>7} {r['method']:>5} "
            f"{f(r['top'], 10, '.4g')} {f(r['trace'], 10, '.4g')} "
            f"{f(r['effective_rank'], 9, '.4g')} {f(r['stable_rank'], 8, '.4g')} "
            f"{f(r['negative_mass'], 8, '.3g')} {f(r['negative_fraction'], 8, '.3g')} "
            f"{f(r['condition_number'], 9, '.3g')} {f(r['outliers'], 4, 'd')} "
            f"{f(r['train_error'], 9, '.4f')} {f(r['test_error'], 8, '.4f')}")
    return "\n".join(lines)
