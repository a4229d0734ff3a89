"""Dissecting-Hessian structure across models (issue 5; Wu, Zhu, Wu, Wang & Ge, arXiv 2010.04261).

For every Linear/Conv2d layer, W̃ = [W | b] (out × (in + 1), :mod:`kfacbound.curvature.layout`),
and the exact diagonal block H (or the GGN block H_O) of the mean loss over a dataset:

- **Eigenspace overlap across models**: for top-k orthonormal eigenbases V₁, V₂ of the same layer
  in two independently trained models, ‖V₁ᵀV₂‖_F²/k for k = 1..K (1 = same subspace; two random
  k-dimensional subspaces of R^p give ≈ k/p). Exact bases come from Lanczos on the layer block
  (dense ``eigh`` for small blocks), K-FAC bases from the Kronecker eigenvectors u_i ⊗ v_j of
  G ⊗ Ã (:func:`kfacbound.curvature.kfac.compute_kfac`). Only layers of equal shape in all models
  can be compared (the eigenvectors must live in the same R^p).
- **Rank-1 structure**: an eigenvector v ∈ R^{out·(in+1)} reshaped row-major to V (out × (in+1)) has
  rank-1 ratio σ₁(V)²/Σ_i σ_i(V)² ∈ [1/min(out, in+1), 1]; it is 1 for a Kronecker vector u ⊗ w.
  The paper's claim: top eigenvectors ≈ u_k ⊗ E[ã]/‖E[ã]‖, so the ratio is near 1.
- **Alignment with the mean input**: |cos(v₁(Ã), E[ã])| between Ã's top eigenvector and the mean
  layer input ã = [a; 1] in homogeneous coordinates as in Ã (no 1 appended without a bias; conv
  layers: the mean over examples and output positions of the unfolded input patch, as in Ã's
  "kfc-expand" convention). After a ReLU E[ããᵀ] is dominated by E[ã]E[ã]ᵀ, so |cos| ≈ 1; BatchNorm
  centres the pre-activations and weakens this. We also report the |cos| between the right
  singular vector of the reshaped top exact eigenvector and E[ã].
- **Outliers**: the number of eigenvalues separated from the bulk among the top max(k, 2(C−1)+2)
  (:func:`kfacbound.analysis.spectra.top_outliers`, largest-ratio gap rule) against C − 1,
  the rank of the cross-entropy Λ (E[M] has rank ≤ C − 1; one logit: 1; MSE: C).

Models with and without BatchNorm (eval mode) are grouped ("bn", "no-bn") so one table and one
figure compare them (Ghorbani et al. 2019: BatchNorm suppresses the outliers).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from ..curvature.kfac import KFACResult, compute_kfac
from ..curvature.modules import rule_for
from ..curvature.spectral import overlap_curve
from ..data import dataset_tensors
from ..errors import KfacboundError
from ..models import has_batchnorm
from ..progress import progress_bar
from .compare import (
    DEFAULT_DENSE_LIMIT,
    DEFAULT_TOL,
    exact_block,
    kron_top,
    model_loss,
    relative_frobenius,
    resolve_layers,
)
from .spectra import top_outliers


def rank1_ratio(vector, shape: Sequence[int]) -> float:
    """σ₁²/Σσᵢ² of ``vector`` reshaped row-major to ``shape`` (out × cols); 1 iff rank 1."""
    V = np.asarray(vector, dtype=np.float64).reshape(tuple(shape))
    s = np.linalg.svd(V, compute_uv=False)
    total = float((s ** 2).sum())
    return float(s[0] ** 2 / total) if total > 0 else float("nan")


def abs_cos(u, v) -> float:
    """|uᵀv| / (‖u‖‖v‖)."""
    u = np.asarray(u, dtype=np.float64).reshape(-1)
    v = np.asarray(v, dtype=np.float64).reshape(-1)
    den = float(np.linalg.norm(u) * np.linalg.norm(v))
    return float(abs(u @ v) / den) if den > 0 else float("nan")


@torch.no_grad()
def layer_input_means(
    model: nn.Module,
    X: torch.Tensor,
    layers: Sequence[str] | None = None,
    batch_size: int = 1024,
) -> dict[str, np.ndarray]:
    """E[ã] for each Linear/Conv2d layer: the mean input, with a trailing 1 when it has a bias.

    Conv2d: the mean unfolded patch (in_channels·kh·kw, ordered like ``weight.reshape(out, -1)``)
    over examples and output positions (the input rows of the layer's rule,
    :meth:`~kfacbound.curvature.modules.CurvatureRule.unfold`). Computed with forward hooks in
    eval mode, float64 sums.
    """
    modules = dict(model.named_modules())
    names = resolve_layers(model, layers)
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def hook_for(name: str):
        def hook(module, inputs, output):
            u = rule_for(module).unfold(module, inputs[0].detach())  # [N, T, D]
            u = u.reshape(-1, u.shape[-1])
            s = u.to(torch.float64).sum(0)
            sums[name] = sums[name] + s if name in sums else s
            counts[name] = counts.get(name, 0) + u.shape[0]
        return hook

    handles = [modules[n].register_forward_hook(hook_for(n)) for n in names]
    was_training = model.training
    model.eval()
    try:
        for i in range(0, len(X), batch_size):
            model(X[i:i + batch_size])
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    out = {}
    for n in names:
        mean = (sums[n] / counts[n]).cpu().numpy()
        if modules[n].bias is not None:
            mean = np.append(mean, 1.0)
        out[n] = mean
    return out


def expected_outliers(loss: str, num_outputs: int) -> int:
    """rank of the loss Hessian Λ: C − 1 for cross-entropy, 1 for one logit, C for MSE."""
    if loss == "ce":
        return num_outputs - 1
    if loss == "bce":
        return 1
    return num_outputs


def analyse_model(
    model: nn.Module,
    X: torch.Tensor,
    y: torch.Tensor,
    loss: str | None = None,
    *,
    layers: Sequence[str] | None = None,
    k: int = 10,
    part: str = "H",
    kfac: KFACResult | None = None,
    method: str = "kflr",
    dense_limit: int = DEFAULT_DENSE_LIMIT,
    batch_size: int | None = None,
    kfac_batch_size: int = 256,
    device: str | torch.device = "cpu",
    tol: float = DEFAULT_TOL,
    seed: int = 0,
    progress: bool = False,
    dtype: str = "float64",
) -> dict[str, Any]:
    """The per-model part of the structure report.

    Returns {"bn", "loss", "num_outputs", "expected_outliers", "layers": {name: {...}}}; each
    layer holds ``shape``, ``dim``, ``k``, ``method``, ``route`` (how the exact block's products
    were formed: "dense", "layer-ggn" or "hvp"), ``exact_eigenvalues``, ``kfac_eigenvalues``,
    ``rank1`` (ratio of each exact top eigenvector), ``rank1_kfac`` (same for K-FAC's, 1 up to
    rounding), ``align_A_mean`` (|cos(v₁(Ã), E[ã])|), ``align_exact_mean`` (|cos| of the top
    exact eigenvector's right singular vector with E[ã]), ``outliers_exact``, ``outliers_kfac``,
    ``overlap_exact_kfac`` (curve 1..k), ``rel_frobenius`` ‖M − G⊗Ã‖_F/‖M‖_F of the exact block
    M against K-FAC (dense, or estimated with 10 Rademacher probes for Lanczos-sized layers:
    :func:`kfacbound.analysis.compare.relative_frobenius`) with ``rel_frobenius_method``, and
    (not JSON) ``_V_exact``, ``_V_kfac``.
    The top max(k, 2(C−1) + 2) eigenvalues are computed so the outlier count can see a gap
    after C − 1; overlaps use the leading k.
    """
    model = model.eval()
    loss = model_loss(model, loss, X)
    names = resolve_layers(model, layers)
    with torch.no_grad():
        num_outputs = int(model(X[:1]).shape[-1])
    expected = expected_outliers(loss, num_outputs)
    if kfac is None:
        kfac = compute_kfac(model, (X, y), loss, method, batch_size=kfac_batch_size,
                            device=device, progress=progress, seed=seed)
    means = layer_input_means(model, X, names)
    k_all = max(int(k), 2 * expected + 2)
    out_layers: dict[str, Any] = {}
    for name in names:
        kron = kfac[name]
        kk = min(int(k), kron.dim)
        blk = exact_block(model, X, y, loss, name, min(k_all, kron.dim), part,
                          dense_limit=dense_limit, batch_size=batch_size, device=device,
                          tol=tol, seed=seed, dtype=dtype, keep_dense=True)
        frob = relative_frobenius(blk, kron, probes=10, seed=seed)
        kvals, kvecs, _ = kron_top(kron, min(k_all, kron.dim))
        shape = (kron.out_dim, kron.cols)
        Vex = blk.vectors[:, :kk]
        UA = kron.eig("A")[1][:, 0].numpy()
        top_mat = Vex[:, 0].reshape(shape)
        right = np.linalg.svd(top_mat)[2][0]
        curve = overlap_curve(Vex, kvecs[:, :kk])
        out_layers[name] = {
            "shape": list(shape), "dim": kron.dim, "k": kk, "method": blk.method,
            "route": getattr(blk.operator, "route", None) or blk.method,
            "exact_eigenvalues": blk.values[:k_all].tolist(),
            "kfac_eigenvalues": kvals.tolist(),
            "rank1": [rank1_ratio(Vex[:, i], shape) for i in range(kk)],
            "rank1_kfac": [rank1_ratio(kvecs[:, i], shape) for i in range(kk)],
            "align_A_mean": abs_cos(UA, means[name]),
            "align_exact_mean": abs_cos(right, means[name]),
            "outliers_exact": top_outliers(blk.values, k_all, kron.dim),
            "outliers_kfac": top_outliers(kvals, k_all, kron.dim),
            "overlap_exact_kfac": [curve[j] for j in range(1, kk + 1)],
            "rel_frobenius": None if frob is None else frob["value"],
            "rel_frobenius_method": None if frob is None else frob["method"],
            "_V_exact": Vex, "_V_kfac": kvecs[:, :kk],
        }
    return {"bn": has_batchnorm(model), "loss": loss, "num_outputs": num_outputs,
            "expected_outliers": expected, "layers": out_layers}


def _group(bn_a: bool, bn_b: bool) -> str:
    if bn_a and bn_b:
        return "bn"
    if not bn_a and not bn_b:
        return "no-bn"
    return "bn-vs-no-bn"


def comparable_layers(
    models: Sequence[tuple[str, nn.Module]], layers: Sequence[str] | None
) -> tuple[list[str], list[str]]:
    """(layers present with equal W̃ shape in every model, layers skipped because they are not).

    Explicitly requested layers that differ raise :class:`KfacboundError`: eigenspaces of layers of
    different shapes live in different spaces and their overlap is undefined.
    """
    shapes: list[dict[str, tuple]] = []
    for _, m in models:
        mods = dict(m.named_modules())
        shapes.append({n: (tuple(mods[n].weight.shape), mods[n].bias is not None)
                       for n in resolve_layers(m, None)})
    if layers is not None:
        layers = [layers] if isinstance(layers, str) else list(layers)
        for name in layers:
            found = [(label, s.get(name)) for (label, _), s in zip(models, shapes, strict=True)]
            if any(v is None for _, v in found):
                raise KfacboundError(
                    f"layer {name!r} is missing in "
                    f"{', '.join(lbl for lbl, v in found if v is None)}")
            if len({v for _, v in found}) > 1:
                detail = "; ".join(f"{lbl}: weight {v[0]}, bias {v[1]}" for lbl, v in found)
                raise KfacboundError(
                    f"layer {name!r} has different shapes across models ({detail}); eigenspace "
                    "overlap across models needs layers of equal shape")
        return layers, []
    first = list(shapes[0])
    keep = [n for n in first if all(s.get(n) == shapes[0][n] for s in shapes)]
    skipped = [n for n in first if n not in keep] + sorted(
        {n for s in shapes[1:] for n in s} - set(first))
    if not keep:
        raise KfacboundError(
            "the models share no layer of equal shape, so their eigenspaces cannot be compared "
            "(overlap across models needs layers of equal shape); layers per model: "
            + "; ".join(f"{lbl}: {', '.join(f'{n} {s[n][0]}' for n in s)}"
                        for (lbl, _), s in zip(models, shapes, strict=True)))
    return keep, skipped


def structure_report(
    models: Sequence[tuple[str, nn.Module]],
    data: Any,
    loss: str | None = None,
    *,
    layers: Sequence[str] | None = None,
    k: int = 10,
    part: str = "H",
    method: str = "kflr",
    dense_limit: int = DEFAULT_DENSE_LIMIT,
    batch_size: int | None = None,
    kfac_batch_size: int = 256,
    device: str | torch.device = "cpu",
    tol: float = DEFAULT_TOL,
    seed: int = 0,
    progress: bool = True,
    dtype: str = "float64",
) -> dict[str, Any]:
    """Structure of each model and top-k overlaps between every pair, per comparable layer.

    ``models``: (label, model) pairs; ``data``: TensorDataset or (X, y), the same data for all.
    Returns a JSON-able dict: ``meta``, ``models`` (label, bn, per-layer results of
    :func:`analyse_model`), ``pairs`` (a, b, group, layer, ``exact`` and ``kfac`` overlap curves),
    ``summary`` (rows per group and layer, see :func:`summarise`).
    """
    if len(models) < 1:
        raise KfacboundError("give at least one model")
    labels = [lbl for lbl, _ in models]
    if len(set(labels)) != len(labels):
        raise KfacboundError(f"model labels must be distinct: {labels}")
    X, y = dataset_tensors(data)
    names, skipped = comparable_layers(models, layers)
    per_model = []
    bar = progress_bar(len(models), "structure", progress, unit="model")
    for label, model in models:
        bar.set_postfix(model=label, refresh=False)
        res = analyse_model(model, X, y, loss, layers=names, k=k, part=part, method=method,
                            dense_limit=dense_limit, batch_size=batch_size,
                            kfac_batch_size=kfac_batch_size, device=device, tol=tol, seed=seed,
                            dtype=dtype)
        res["label"] = label
        per_model.append(res)
        bar.update(1)
    bar.close()
    pairs = []
    for a, b in itertools.combinations(range(len(per_model)), 2):
        ma, mb = per_model[a], per_model[b]
        for name in names:
            la, lb = ma["layers"][name], mb["layers"][name]
            kk = min(la["k"], lb["k"])
            ex = overlap_curve(la["_V_exact"][:, :kk], lb["_V_exact"][:, :kk])
            kf = overlap_curve(la["_V_kfac"][:, :kk], lb["_V_kfac"][:, :kk])
            pairs.append({"a": ma["label"], "b": mb["label"],
                          "group": _group(ma["bn"], mb["bn"]), "layer": name,
                          "exact": [ex[j] for j in range(1, kk + 1)],
                          "kfac": [kf[j] for j in range(1, kk + 1)]})
    for res in per_model:
        for lay in res["layers"].values():
            lay.pop("_V_exact")
            lay.pop("_V_kfac")
    meta = {"n": int(len(X)), "k": int(k), "part": part, "kfac_method": method,
            "layers": names, "skipped_layers": skipped, "dense_limit": int(dense_limit),
            "lanczos_tol": tol, "dtype": dtype,
            "overlap": "||V1^T V2||_F^2 / k (random subspaces: k/p)",
            "rank1": "sigma_1^2 / sum sigma_i^2 of the eigenvector reshaped to out x (in+1)",
            "alignment": "|cos(top eigenvector of A, E[a~])|, a~ = [a; 1] with a bias",
            "outliers": "largest eigenvalue-ratio gap among the top eigenvalues (>= 2x), "
                        "against C - 1"}
    report = {"meta": meta, "models": per_model, "pairs": pairs}
    report["summary"] = summarise(report)
    return report


def summarise(report: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per (group, layer): means over models of the group (rank-1, alignment,
    outliers) and over pairs of the group (overlap at k and at 1, exact and K-FAC).

    Groups: "bn" and "no-bn" for models (and pairs within them), "bn-vs-no-bn" for mixed pairs.
    """
    rows = []
    models = report["models"]
    groups = sorted({("bn" if m["bn"] else "no-bn") for m in models}) + (
        ["bn-vs-no-bn"] if any(p["group"] == "bn-vs-no-bn" for p in report["pairs"]) else [])
    for group in groups:
        members = [m for m in models if ("bn" if m["bn"] else "no-bn") == group]
        for name in report["meta"]["layers"]:
            pr = [p for p in report["pairs"] if p["group"] == group and p["layer"] == name]
            lay = [m["layers"][name] for m in members]
            dim = (lay[0]["dim"] if lay else models[0]["layers"][name]["dim"])
            k = min([len(p["exact"]) for p in pr] or [x["k"] for x in lay] or [0])
            row: dict[str, Any] = {"group": group, "layer": name, "dim": dim,
                                   "models": len(members), "pairs": len(pr), "k": k,
                                   "random_overlap": k / dim if dim else float("nan")}

            def mean(vals):
                vals = [v for v in vals if v is not None]
                return float(np.mean(vals)) if vals else None
            row["overlap_exact"] = mean([p["exact"][k - 1] for p in pr])
            row["overlap_kfac"] = mean([p["kfac"][k - 1] for p in pr])
            row["overlap1_exact"] = mean([p["exact"][0] for p in pr])
            row["overlap1_kfac"] = mean([p["kfac"][0] for p in pr])
            row["overlap_exact_kfac"] = mean([x["overlap_exact_kfac"][k - 1] for x in lay
                                              if len(x["overlap_exact_kfac"]) >= k > 0])
            row["rel_frobenius"] = mean([x.get("rel_frobenius") for x in lay])
            row["rank1_top"] = mean([x["rank1"][0] for x in lay])
            row["rank1_mean"] = mean([float(np.mean(x["rank1"])) for x in lay])
            row["align_A_mean"] = mean([x["align_A_mean"] for x in lay])
            row["align_exact_mean"] = mean([x["align_exact_mean"] for x in lay])
            row["outliers_exact"] = mean([x["outliers_exact"] for x in lay])
            row["outliers_kfac"] = mean([x["outliers_kfac"] for x in lay])
            row["expected_outliers"] = members[0]["expected_outliers"] if members else None
            rows.append(row)
    return rows


SUMMARY_COLUMNS = ("group", "layer", "dim", "models", "pairs", "k", "overlap_exact",
                   "overlap_kfac", "overlap1_exact", "overlap1_kfac", "random_overlap",
                   "overlap_exact_kfac", "rel_frobenius", "rank1_top", "rank1_mean", "align_A_mean",
                   "align_exact_mean", "outliers_exact", "outliers_kfac", "expected_outliers")


def format_summary(rows: list[dict[str, Any]]) -> str:
    """Fixed-width text table of :func:`summarise` rows."""
    head = (f"{'group':<12} {'layer':<10} {'p':>8} {'mod':>3} {'pairs':>5} {'k':>3} "
            f"{'ovl_ex@k':>8} {'ovl_kf@k':>8} {'random':>8} {'ex~kf@k':>8} {'rank1':>6} "
            f"{'alignA':>6} {'alignH':>6} {'out_ex':>6} {'out_kf':>6} {'C-1':>4}")
    lines = [head]

    def f(v, w=8, p=4):
        return f"{'-':>{w}}" if v is None else f"{v:{w}.{p}f}"
    for r in rows:
        lines.append(
            f"{r['group']:<12} {r['layer']:<10} {r['dim']:>8} {r['models']:>3} {r['pairs']:>5} "
            f"{r['k']:>3} {f(r['overlap_exact'])} {f(r['overlap_kfac'])} "
            f"{f(r['random_overlap'], 8, 5)} {f(r['overlap_exact_kfac'])} "
            f"{f(r['rank1_top'], 6, 3)} {f(r['align_A_mean'], 6, 3)} "
            f"{f(r['align_exact_mean'], 6, 3)} {f(r['outliers_exact'], 6, 1)} "
            f"{f(r['outliers_kfac'], 6, 1)} "
            f"{'-' if r['expected_outliers'] is None else r['expected_outliers']:>4}")
    return "\n".join(lines)
