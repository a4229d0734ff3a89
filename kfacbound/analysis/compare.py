"""Exact curvature against K-FAC, layer by layer (issue 3, "Exact versus K-FAC").

For a Linear/Conv2d layer with parameters vec(W̃), W̃ = [W | b] row-major (the shared layout of
:mod:`kfacbound.curvature.layout`), and the mean loss L̂(θ) = (1/n) Σ_i ℓ(f(x_i; θ), y_i) over a
dataset (model in eval mode) we compare

- the exact diagonal block of the Hessian, H = ∇²_{W̃} L̂, and of the generalised Gauss–Newton,
  H_O = (1/n) Σ_i J_iᵀ Λ_i J_i (:mod:`kfacbound.curvature.exact` / ``operators``),
- with the Kronecker approximation G ⊗ Ã of :func:`kfacbound.curvature.kfac.compute_kfac`
  (Martens & Grosse 2015; KFLR = K-FAC of the exact GGN, Botev et al. 2017), whose eigenpairs
  are λ_i(G)·λ_j(Ã) with eigenvectors u_i ⊗ v_j.

Reported per layer (a JSON-able dict, :func:`compare_layer`):

- the top-k eigenvalues of H, H_O (largest algebraic) and of G ⊗ Ã;
- the eigenspace overlap ‖V_exactᵀ V_kfac‖_F² / k of the two top-k eigenbases for k = 1..K
  (:func:`kfacbound.curvature.spectral.overlap_curve`; 1 = same subspace, a random pair ≈ k/p).
  Where λ_k ≈ λ_{k+1} the top-k subspace itself is ill-defined and so is its overlap;
- the relative Frobenius error ‖H − G⊗Ã‖_F / ‖H‖_F (and for H_O): exact from the dense block when
  p ≤ ``dense_limit``, otherwise an unbiased Monte-Carlo estimate from Rademacher probes z,
  ‖M‖_F² = E‖M z‖² (Hutchinson), with ``frob_probes`` probes (reported with its method).

Small blocks (p ≤ ``dense_limit``) are formed densely in float64 and diagonalised with ``eigh``;
larger ones use Lanczos (ARPACK ``eigsh``) on the matrix-free Hessian/GGN-vector products.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from ..curvature.exact import exact_ggn, exact_hessian
from ..curvature.kfac import KFACResult, compute_kfac
from ..curvature.kfac_layer import KronLayer
from ..curvature.layer_ggn import exact_block_operator
from ..curvature.layout import curvature_layers, layer_size
from ..curvature.spectral import overlap_curve, top_eigenpairs
from ..data import dataset_tensors
from ..errors import KfacboundError
from ..losses import default_loss
from ..progress import progress_bar

PARTS = ("H", "H_O")
DTYPES = ("float64", "float32")
DEFAULT_DENSE_LIMIT = 2000
DEFAULT_TOL = 1e-8


@dataclass
class ExactBlock:
    """Top eigenpairs of one exact layer block (``part`` "H" or "H_O").

    ``values`` descending (k,), ``vectors`` (p, k) orthonormal, float64; ``dense`` holds the
    full p×p block when it was formed (``method == "dense"``), else None (``"lanczos"``).
    ``all_values`` holds every eigenvalue when the block was dense.
    """

    part: str
    values: np.ndarray
    vectors: np.ndarray
    method: str
    dense: np.ndarray | None = None
    all_values: np.ndarray | None = None
    operator: Any = None


def resolve_layers(model: nn.Module, layers: str | Sequence[str] | None) -> list[str]:
    """Module paths of the requested Linear/Conv2d layers (all by default), with a clear error."""
    known = [n for n, _ in curvature_layers(model)]
    if layers is None:
        return known
    if isinstance(layers, str):
        layers = [layers]
    missing = [name for name in layers if name not in known]
    if missing:
        raise KfacboundError(
            f"no Linear/Conv2d layer named {', '.join(map(repr, missing))}; layers: "
            f"{', '.join(known)}"
        )
    return list(layers)


def model_loss(model: nn.Module, loss: str | None, X: torch.Tensor) -> str:
    """``loss`` or the natural loss of the model's output size (bce for one logit, else ce)."""
    if loss is not None:
        return loss
    with torch.no_grad():
        out = model.eval()(X[:1])
    return default_loss(out.shape[-1] if out.ndim > 1 else 1)


def exact_block(
    model: nn.Module,
    X: torch.Tensor,
    y: torch.Tensor,
    loss: str,
    layer: str,
    k: int,
    part: str = "H",
    *,
    dense_limit: int = DEFAULT_DENSE_LIMIT,
    batch_size: int | None = None,
    device: str | torch.device | None = None,
    tol: float = DEFAULT_TOL,
    seed: int = 0,
    keep_dense: bool = False,
    dtype: str = "float64",
) -> ExactBlock:
    """Top-k eigenpairs of the exact layer block H or H_O of the mean loss.

    Dense ``eigh`` when the layer has at most ``dense_limit`` parameters, otherwise Lanczos
    (largest algebraic eigenvalues, relative tolerance ``tol``) on the matrix-free products of
    :func:`~kfacbound.curvature.layer_ggn.exact_block_operator` (layer-local GGN products where
    H = H_O on the layer, e.g. ReLU networks; Hessian-vector products otherwise).
    ``dtype`` "float64" (default) or "float32" for the products (about 4× faster for conv
    layers on CPU; Lanczos tolerance then at least 1e-5); eigensolvers run in float64.
    """
    if dtype not in DTYPES:
        raise KfacboundError(f"dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
    if part not in PARTS:
        raise KfacboundError(f"part must be one of {', '.join(PARTS)}, not {part!r}")
    module = dict(model.named_modules())[layer]
    p = layer_size(module)
    k = min(int(k), p)
    if k < 1:
        raise KfacboundError("k must be at least 1")
    common = dict(batch_size=batch_size, device=device)
    if p <= dense_limit:
        fn = exact_hessian if part == "H" else exact_ggn
        M = fn(model, X, y, loss, [layer], max_params=None, dtype=getattr(torch, dtype),
               **common).numpy().astype(np.float64)
        evals, evecs = np.linalg.eigh(M)
        evals, evecs = evals[::-1].copy(), evecs[:, ::-1].copy()
        return ExactBlock(part, evals[:k], evecs[:, :k], "dense", M if keep_dense else None,
                          evals)
    op = exact_block_operator(model, X, y, loss, layer, part, dtype=np.dtype(dtype), **common)
    if dtype == "float32":
        tol = max(tol, 1e-5)
    evals, evecs = top_eigenpairs(op, k, "LA", tol=tol, seed=seed)
    return ExactBlock(part, evals, evecs, "lanczos", operator=op)


def kron_top(kron: KronLayer, k: int) -> tuple[np.ndarray, np.ndarray, list[tuple[int, int]]]:
    """Top-k eigenvalues, eigenvectors (p × k) and factor index pairs (i, j) of G ⊗ Ã."""
    eig = kron.topk(k)
    vecs = kron.eigvecs(eig).numpy()
    return eig.values.numpy(), vecs, [tuple(map(int, pr)) for pr in eig.pairs]


def relative_frobenius(
    exact: ExactBlock, kron: KronLayer, *, probes: int = 10, seed: int = 0
) -> dict[str, Any] | None:
    """‖M − G⊗Ã‖_F / ‖M‖_F for the exact block M: exact from a dense M, otherwise estimated.

    The estimate uses m Rademacher probes Z (p × m): ‖M − K‖_F² ≈ ‖(M − K)Z‖_F²/m and
    ‖M‖_F² ≈ ‖MZ‖_F²/m with the same probes (ratio estimator; unbiased numerator and
    denominator). Returns None when neither is available (no dense block, ``probes`` = 0).
    """
    if exact.dense is not None:
        K = kron.to_dense(max_dim=exact.dense.shape[0]).numpy()
        num = float(np.linalg.norm(exact.dense - K))
        den = float(np.linalg.norm(exact.dense))
        return {"value": num / den if den > 0 else math.nan, "method": "dense",
                "abs": num, "norm": den}
    if exact.operator is None or probes < 1:
        return None
    rng = np.random.default_rng(seed)
    Z = rng.integers(0, 2, size=(kron.dim, probes)).astype(np.float64) * 2 - 1
    MZ = np.asarray(exact.operator.matmat(Z))
    KZ = kron.matvec(torch.from_numpy(Z)).numpy()
    num = float(np.linalg.norm(MZ - KZ) / math.sqrt(probes))
    den = float(np.linalg.norm(MZ) / math.sqrt(probes))
    return {"value": num / den if den > 0 else math.nan, "method": f"hutchinson-{probes}",
            "abs": num, "norm": den}


def compare_layer(
    model: nn.Module,
    X: torch.Tensor,
    y: torch.Tensor,
    loss: str,
    layer: str,
    kron: KronLayer,
    k: int = 20,
    *,
    parts: Sequence[str] = PARTS,
    dense_limit: int = DEFAULT_DENSE_LIMIT,
    frob_probes: int = 10,
    batch_size: int | None = None,
    device: str | torch.device | None = None,
    tol: float = DEFAULT_TOL,
    seed: int = 0,
    dtype: str = "float64",
) -> dict[str, Any]:
    """Exact (H, H_O) against K-FAC top-k spectra of one layer; a JSON-able dict.

    Keys: ``layer``, ``type``, ``shape`` [out, cols] of W̃, ``dim`` p, ``k``, ``method`` (dense or
    lanczos), ``kfac`` {eigenvalues, pairs}, ``exact`` {part: eigenvalues}, ``overlap``
    {part: [overlap(k') for k' = 1..k]}, ``rel_frobenius`` {part: {value, method, ...} or None},
    ``random_overlap`` [k'/p] (the expected overlap of random subspaces).
    """
    k = min(int(k), kron.dim)
    kvals, kvecs, pairs = kron_top(kron, k)
    out: dict[str, Any] = {
        "layer": layer, "type": kron.module_type, "shape": [kron.out_dim, kron.cols],
        "dim": kron.dim, "k": k,
        "kfac": {"eigenvalues": kvals.tolist(), "pairs": [list(p) for p in pairs]},
        "exact": {}, "overlap": {}, "rel_frobenius": {},
        "random_overlap": [j / kron.dim for j in range(1, k + 1)],
    }
    for part in parts:
        blk = exact_block(model, X, y, loss, layer, k, part, dense_limit=dense_limit,
                          batch_size=batch_size, device=device, tol=tol, seed=seed,
                          keep_dense=True, dtype=dtype)
        if blk.vectors.shape[0] != kron.dim:
            raise KfacboundError(
                f"layer {layer!r}: exact block has {blk.vectors.shape[0]} parameters, the K-FAC "
                f"factors describe {kron.dim} (factors from another model or bias convention?)"
            )
        out["method"] = blk.method
        out["exact"][part] = blk.values.tolist()
        curve = overlap_curve(blk.vectors, kvecs)
        out["overlap"][part] = [curve[j] for j in range(1, k + 1)]
        out["rel_frobenius"][part] = relative_frobenius(blk, kron, probes=frob_probes, seed=seed)
    return out


def compare_model(
    model: nn.Module,
    data: Any,
    loss: str | None = None,
    *,
    kfac: KFACResult | None = None,
    method: str = "kflr",
    mc_samples: int = 1,
    layers: str | Sequence[str] | None = None,
    k: int = 20,
    parts: Sequence[str] = PARTS,
    dense_limit: int = DEFAULT_DENSE_LIMIT,
    frob_probes: int = 10,
    batch_size: int | None = None,
    kfac_batch_size: int = 256,
    device: str | torch.device = "cpu",
    tol: float = DEFAULT_TOL,
    seed: int = 0,
    progress: bool = True,
    dtype: str = "float64",
) -> dict[str, Any]:
    """Exact against K-FAC for every (or the selected) Linear/Conv2d layer of ``model``.

    ``data``: a TensorDataset or (X, y); the exact curvature and (unless ``kfac`` is given) the
    K-FAC factors are both of the mean loss over all of it. Returns {"meta": ..., "layers":
    [compare_layer(...) for each layer]}.
    """
    X, y = dataset_tensors(data)
    model = model.eval()
    loss = model_loss(model, loss, X)
    names = resolve_layers(model, layers)
    if kfac is None:
        kfac = compute_kfac(model, (X, y), loss, method, mc_samples=mc_samples,
                            batch_size=kfac_batch_size, device=device, progress=progress,
                            seed=seed)
    rows = []
    bar = progress_bar(len(names), "exact vs K-FAC", progress, unit="layer")
    for name in names:
        bar.set_postfix(layer=name, refresh=False)
        rows.append(compare_layer(model, X, y, loss, name, kfac[name], k, parts=parts,
                                  dense_limit=dense_limit, frob_probes=frob_probes,
                                  batch_size=batch_size, device=device, tol=tol, seed=seed,
                                  dtype=dtype))
        bar.update(1)
    bar.close()
    meta = {"n": int(len(X)), "loss": loss, "k": int(k), "parts": list(parts),
            "kfac_method": kfac.meta.get("method"), "kfac_n": kfac.meta.get("n"),
            "mc_samples": kfac.meta.get("mc_samples"), "dense_limit": int(dense_limit),
            "lanczos_tol": tol, "dtype": dtype,
            "conv_convention": kfac.meta.get("conv_convention"),
            "layout": "vec([W | b]) row-major", "overlap": "||V1^T V2||_F^2 / k"}
    return {"meta": meta, "layers": rows}


def format_table(result: dict[str, Any], max_rows: int | None = None) -> str:
    """A readable per-layer table: i, exact λ_i (each part), K-FAC λ_i, overlap@i per part."""
    lines = []
    parts = result["meta"]["parts"]
    for row in result["layers"]:
        frob = "  ".join(
            f"‖{p}−G⊗A‖/‖{p}‖ = {v['value']:.3g} ({v['method']})"
            for p, v in row["rel_frobenius"].items() if v is not None
        )
        lines.append(f"layer {row['layer']} ({row['type']}, W̃ {row['shape'][0]}×{row['shape'][1]},"
                     f" p = {row['dim']}, {row['method']})  {frob}")
        head = f"{'i':>4} " + " ".join(f"{'λ_i(' + p + ')':>12}" for p in parts) + \
            f" {'λ_i(K-FAC)':>12} " + " ".join(f"{'ovl_' + p:>8}" for p in parts) + \
            f" {'random':>8}"
        lines.append(head)
        k = row["k"] if max_rows is None else min(row["k"], max_rows)
        for i in range(k):
            vals = " ".join(f"{row['exact'][p][i]:12.5g}" for p in parts)
            ovl = " ".join(f"{row['overlap'][p][i]:8.4f}" for p in parts)
            lines.append(f"{i + 1:>4} {vals} {row['kfac']['eigenvalues'][i]:12.5g} {ovl} "
                         f"{row['random_overlap'][i]:8.2g}")
        lines.append("")
    return "\n".join(lines)
