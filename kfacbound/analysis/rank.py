"""Hessian rank against theory (Singh, Bachmann & Hofmann, NeurIPS 2021; Singh, Hofmann & Schölkopf,
ICML 2023), following SCIENCE.md §4.

Deep linear network F(x) = W_L ⋯ W_1 x (no bias), input dimension d, K outputs, hidden widths
M_1 … M_{L−1}. With r = rank of the uncentred input second moment Σ_i x_i x_iᵀ, s = min(r, K) and
q = min(r, K, M_1, …, M_{L−1}) (cross-entropy: K → K − 1 everywhere, since Λ has rank K − 1):

- rank(H_O) = q (r + K − q)
- rank(H_F) = 2q ΣM_i + 2qs − L q²          (ΣM_i over the hidden widths)
- rank(H)   = 2q ΣM_i + q (r + K) − L q²

(upper bounds in the paper, identities for generic weights and data as in the authors' code).
With a bias in every layer only H_O has a formula (not from the paper). SCIENCE.md §4 quotes the
measured rank(H_O) = q (r̃ + K − q) + (K − q), r̃ = rank Σ x̃ x̃ᵀ, x̃ = [x; 1], q = min(r̃, K, M_i).
It fails when the data do not over-determine the layer (e.g. N ≤ d, 12 of 60 random configurations).
We use instead the following derivation, checked in float64 on 60 random configurations (all equal):
on the data the network is F = A X + c 1ᵀ with A = W_L⋯W_1 of rank ≤ min(M_i) and c free (through
b_L), so the GGN's image is T_A·X + R^K 1ᵀ, where T_A is the tangent space of the rank-q matrices.
With r_x = rank X (no ones), q = min(r_x, K, M_i):
- if 1ᵀ is not in the row space of X (r̃ = r_x + 1, generic for N > d):
  rank(H_O) = q(r_x + K − q) + K, which equals the SCIENCE.md form q(r̃ + K − q) + (K − q)
  whenever min(r̃, K, M_i) = q;
- otherwise (r̃ = r_x, generic for N ≤ d): rank(H_O) = q(r_x + K − q) + (K − q if r_x > q else 0).
Here ``r`` reported is always the rank of the (homogeneous, when biased) input second moment.

For ReLU/tanh/sigmoid networks the same formulas are reported as *estimates* (they are not
identities there), never forced to agree. Convolutional case (SCIENCE.md §4, derived for 1-D
convolutions, not from the paper): one conv layer with c input channels, ck = c·kh·kw weights per
filter, M filters and n' output positions, no bias, no pooling, linear, then one dense layer to K
outputs: rank(H_F) = 2M·min(ck, Kn'); rank(H_O) = min(K r, q(ck + Kn' − q)), q = min(M, ck, Kn');
rank(H) has no formula. We apply it to Conv2d (patches of c·kh·kw, n' = H'·W'); it matched the
measurement on 16 random 1-D and 2-D configurations here (MSE and CE), still not a proof.

Numerical rank: float64 singular values of the dense matrix (SVD, as NumPy's ``matrix_rank``),
tolerance σ_max · p · eps unless given; we also report the singular values on either side of the
cut so a reader can judge the gap.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..curvature.exact import DEFAULT_MAX_PARAMS, hessian_parts
from ..curvature.modules import rule_for
from ..errors import KfacboundError
from ..io import write_csv_atomic
from ..progress import progress_bar

_ACTIVATIONS = (nn.ReLU, nn.Tanh, nn.Sigmoid)
_PASSIVE = (nn.Flatten, nn.Identity, nn.Dropout)


def numerical_rank(M, tol: float | None = None, method: str = "svd") -> dict[str, Any]:
    """Rank of a matrix in float64: #σ_i > tol, tol = σ_max · max(shape) · eps by default.

    ``method`` "svd" (singular values, like NumPy) or "eigh" (|eigenvalues| of a symmetric matrix,
    the same numbers, about 3× cheaper). Returns rank, tol, sigma_max, sigma_kept (smallest σ
    counted), sigma_dropped (largest σ not counted), gap = sigma_kept / sigma_dropped (inf when
    nothing is dropped), and the log10 gap."""
    A = M.detach().cpu().numpy() if isinstance(M, torch.Tensor) else np.asarray(M)
    A = A.astype(np.float64)
    if A.ndim != 2:
        raise KfacboundError("numerical_rank needs a matrix")
    if A.size == 0:
        return {"rank": 0, "tol": 0.0, "sigma_max": 0.0, "sigma_kept": None,
                "sigma_dropped": None, "gap": None}
    if method == "svd":
        sigma = np.linalg.svd(A, compute_uv=False)
    elif method == "eigh":
        sigma = np.sort(np.abs(np.linalg.eigvalsh((A + A.T) / 2)))[::-1]
    else:
        raise KfacboundError("method must be 'svd' or 'eigh'")
    smax = float(sigma[0]) if sigma.size else 0.0
    if tol is None:
        tol = smax * max(A.shape) * np.finfo(np.float64).eps
    rank = int((sigma > tol).sum())
    kept = float(sigma[rank - 1]) if rank > 0 else None
    dropped = float(sigma[rank]) if rank < sigma.size else None
    gap = (kept / dropped if dropped else math.inf) if kept is not None else None
    return {"rank": rank, "tol": float(tol), "sigma_max": smax, "sigma_kept": kept,
            "sigma_dropped": dropped, "gap": gap}


def input_rank(X: torch.Tensor, bias: bool = False) -> int:
    """r = rank of the uncentred second moment Σ x xᵀ (of x̃ = [x; 1] when ``bias``), float64."""
    Xf = X.reshape(len(X), -1).to(torch.float64)
    if bias:
        Xf = torch.cat([Xf, torch.ones(len(Xf), 1, dtype=torch.float64)], dim=1)
    return numerical_rank(Xf)["rank"]


def predicted_linear_ranks(
    r: int, K: int, widths: Sequence[int], loss: str, bias: bool = False,
    r_x: int | None = None,
) -> dict[str, Any]:
    """Predicted ranks of H, H_O, H_F of a deep linear network (module docstring formulas).

    ``r`` is the input rank (of [x; 1] when ``bias``), ``K`` the number of outputs, ``widths`` the
    hidden widths (L = len(widths) + 1 layers); with ``bias``, ``r_x`` is the rank of X alone
    (required). Returns H, H_O, H_F (None where no formula applies), q, s, K_eff (K − 1 for
    cross-entropy); with bias also ``H_O_science``, the SCIENCE.md §4 form, for comparison."""
    K_eff = K - 1 if loss == "ce" else K
    L = len(widths) + 1
    sum_m = sum(int(w) for w in widths)
    if bias:
        if r_x is None:
            raise KfacboundError("with biases the prediction needs r_x = rank of X without ones")
        q = min([r_x, K_eff, *[int(w) for w in widths]])
        if r == r_x + 1:
            h_o = q * (r_x + K_eff - q) + K_eff
        else:
            h_o = q * (r_x + K_eff - q) + (K_eff - q if r_x > q else 0)
        q_sci = min([r, K_eff, *[int(w) for w in widths]])
        return {"H": None, "H_O": h_o, "H_F": None, "q": q, "s": min(r_x, K_eff),
                "K_eff": K_eff, "H_O_science": q_sci * (r + K_eff - q_sci) + (K_eff - q_sci)}
    q = min([r, K_eff, *[int(w) for w in widths]])
    s = min(r, K_eff)
    return {"H": 2 * q * sum_m + q * (r + K_eff) - L * q * q,
            "H_O": q * (r + K_eff - q),
            "H_F": 2 * q * sum_m + 2 * q * s - L * q * q,
            "q": q, "s": s, "K_eff": K_eff}


def predicted_conv_ranks(
    c: int, kernel_numel: int, M: int, positions: int, K: int, r: int, loss: str
) -> dict[str, Any]:
    """Conv (M filters, ck = c·kernel_numel weights each, n' positions) + dense to K, no bias."""
    K_eff = K - 1 if loss == "ce" else K
    ck = c * kernel_numel
    q = min(M, ck, K_eff * positions)
    return {"H": None, "H_F": 2 * M * min(ck, K_eff * positions),
            "H_O": min(K_eff * r, q * (ck + K_eff * positions - q)), "q": q, "K_eff": K_eff}


def _leaves(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if not list(m.children())]


def describe_for_prediction(model: nn.Module, X: torch.Tensor, loss: str) -> dict[str, Any]:
    """Which formula applies to ``model`` and its inputs: predicted ranks, r, q and a note.

    ``kind``: "deep-linear" (exact identities), "deep-linear-bias" (H_O only, unverified),
    "nonlinear-estimate" (deep-linear formulas on a ReLU/tanh/sigmoid MLP: estimates only),
    "conv" (Conv2d + dense, unverified 2-D extension), or "none"."""
    model = copy.deepcopy(model).to(torch.float64).eval()
    X = X.to(torch.float64)
    leaves = _leaves(model)
    kinds = [getattr(rule_for(m), "kind", None) for m in leaves]  # module rules: layer kinds
    linears = [m for m, kind in zip(leaves, kinds, strict=True) if kind == "linear"]
    convs = [m for m, kind in zip(leaves, kinds, strict=True) if kind == "conv"]
    known = all(kind in ("linear", "conv") or isinstance(m, (*_ACTIVATIONS, *_PASSIVE))
                for m, kind in zip(leaves, kinds, strict=True))
    with torch.no_grad():
        K = int(model(X[:1]).shape[-1])
    empty = {"H": None, "H_O": None, "H_F": None}
    base = {"K": K}
    if not known:
        return {**base, "kind": "none", "predicted": empty, "r": None, "q": None,
                "note": "no formula for this architecture (BatchNorm, pooling or other modules)"}
    biases = {m.bias is not None for m in linears + convs}
    if len(biases) > 1:
        return {**base, "kind": "none", "predicted": empty, "r": input_rank(X, False), "q": None,
                "note": "bias in some layers only: no formula"}
    bias = biases.pop() if biases else False
    nonlinear = any(isinstance(m, _ACTIVATIONS) for m in leaves)
    if not convs:
        r = input_rank(X, bias)
        r_x = input_rank(X, False)
        widths = [m.out_features for m in linears[:-1]]
        pred = predicted_linear_ranks(r, K, widths, loss, bias, r_x=r_x)
        kind = ("nonlinear-estimate" if nonlinear
                else "deep-linear-bias" if bias else "deep-linear")
        note = {"deep-linear": "deep linear network: formulas are identities (Singh et al. 2021)",
                "deep-linear-bias": "biases: only H_O predicted, by our derivation (checked "
                                    "numerically, not from the paper)",
                "nonlinear-estimate": "nonlinear activations: deep-linear formulas are estimates, "
                                      "not identities"}[kind]
        return {**base, "kind": kind, "predicted": {k: pred[k] for k in ("H", "H_O", "H_F")},
                "r": r, "r_x": r_x, "q": pred["q"], "note": note,
                **({"H_O_science": pred["H_O_science"]} if bias else {})}
    if (len(convs) == 1 and len(linears) == 1 and not bias and not nonlinear
            and leaves.index(convs[0]) < leaves.index(linears[0])):
        conv = convs[0]
        with torch.no_grad():
            z = conv(X[:1])
        positions = math.prod(z.shape[2:])
        if linears[0].in_features == conv.out_channels * positions:
            patches = rule_for(conv).unfold(conv, X)  # [N, T, D]: KFC-expand input rows
            r = input_rank(X, False)
            pred = predicted_conv_ranks(conv.in_channels, math.prod(conv.kernel_size),
                                        conv.out_channels, positions, K, r, loss)
            return {**base, "kind": "conv", "predicted": {k: pred[k] for k in ("H", "H_O", "H_F")},
                    "r": r, "q": pred["q"], "patch_rank": input_rank(
                        patches.reshape(-1, patches.shape[-1]), False),
                    "note": "conv + dense: 1-D derivation applied to Conv2d (checked "
                                              "numerically, not from the paper)"}
    return {**base, "kind": "none", "predicted": empty, "r": input_rank(X, bias), "q": None,
            "note": "no formula for this convolutional architecture; measurement only"}


def measure_ranks(
    model: nn.Module,
    X: torch.Tensor,
    y: torch.Tensor,
    loss: str,
    tol: float | None = None,
    *,
    method: str = "svd",
    batch_size: int | None = None,
    max_params: int | None = DEFAULT_MAX_PARAMS,
    device: str | torch.device | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Numerical ranks of H, H_O, H_F = H − H_O (whole network, float64) beside the predictions.

    Returns a JSON-able dict: params, rank {H, H_O, H_F}, predicted {H, H_O, H_F} (None where no
    formula applies), r, q, plus n, K, loss, tol (per matrix), svd {H, H_O, H_F}: the singular
    values around the cut (see :func:`numerical_rank`), prediction (kind) and note."""
    parts = hessian_parts(model, X, y, loss, batch_size=batch_size, max_params=max_params,
                          device=device, progress=progress)
    desc = describe_for_prediction(model, X, loss)
    svd = {name: numerical_rank(getattr(parts, name), tol, method) for name in ("H", "H_O", "H_F")}
    out: dict[str, Any] = {
        "params": int(parts.H.shape[0]),
        "rank": {k: v["rank"] for k, v in svd.items()},
        "predicted": desc["predicted"],
        "r": desc["r"],
        "q": desc["q"],
        "n": len(X),
        "K": desc["K"],
        "loss": loss,
        "prediction": desc["kind"],
        "note": desc["note"],
        "svd": svd,
        "train_loss": parts.loss,
    }
    for key in ("patch_rank", "r_x", "H_O_science"):
        if key in desc:
            out[key] = desc[key]
    return out


# ---------------------------------------------------------------------------------------------
# sweeps


def sweep_ranks(
    data_fn: Callable[[int], tuple[torch.Tensor, torch.Tensor, int]],
    widths: Sequence[int],
    depths: Sequence[int] = (2,),
    ns: Sequence[int] = (100,),
    *,
    activation: str = "linear",
    bias: bool = False,
    loss: str = "ce",
    seed: int = 0,
    tol: float | None = None,
    method: str = "svd",
    max_params: int | None = DEFAULT_MAX_PARAMS,
    progress: bool = True,
    extra: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Rank of H, H_O, H_F for fc networks with ``depth`` hidden layers of width ``w`` (Glorot init)
    on ``data_fn(n) -> (X, y, num_outputs)``, for every (depth, width, n). One flat row per config
    (CSV-ready); configs above ``max_params`` are skipped with a row noting it."""
    from ..models import build_model, resolve_spec

    rows = []
    configs = [(L, w, n) for L in depths for n in ns for w in widths]
    for L, w, n in progress_bar(len(configs), "rank sweep", progress, "config", configs):
        X, y, C = data_fn(n)
        spec = resolve_spec({"arch": "fc", "widths": [int(w)] * int(L), "activation": activation,
                             "bias": bias, "init": "glorot"}, input_shape=list(X.shape[1:]),
                            num_outputs=C)
        model = build_model(spec, seed=seed).to(torch.float64)
        row: dict[str, Any] = {"depth": L, "width": w, "n": n, "activation": activation,
                               "bias": bias, "loss": loss, "seed": seed, **(extra or {})}
        p = sum(q.numel() for q in model.parameters())
        if max_params is not None and p > max_params:
            row.update(params=p, skipped=f"p > max_params={max_params}")
            rows.append(row)
            continue
        res = measure_ranks(model, X.to(torch.float64), y, loss, tol, method=method,
                            max_params=max_params)
        row.update(params=res["params"], r=res["r"], q=res["q"], K=res["K"],
                   prediction=res["prediction"])
        for key in ("H", "H_O", "H_F"):
            row[f"rank_{key}"] = res["rank"][key]
            row[f"pred_{key}"] = res["predicted"][key]
            row[f"gap_{key}"] = res["svd"][key]["gap"]
        rows.append(row)
    return rows


def write_csv(rows: list[dict[str, Any]], path: str | Path) -> Path:
    """Rows as CSV, the columns every key in order of first appearance, written atomically."""
    keys: list[str] = []
    for row in rows:
        keys.extend(k for k in row if k not in keys)
    write_csv_atomic(path, rows, keys)
    return Path(path)


def plot_sweep(rows: list[dict[str, Any]], path: str | Path, title: str = "") -> Path:
    """Log-log plot of rank against parameter count: measured (markers), predicted (dashed),
    p itself and a √p reference line fitted through the measured rank(H)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if "rank_H" in r]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    colors = {"H": "C0", "H_O": "C1", "H_F": "C2"}
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r.get("depth"), r.get("n"), r.get("activation")), []).append(r)
    markers = "os^vD<>ph*"
    for gi, (key, grp) in enumerate(groups.items()):
        grp = sorted(grp, key=lambda r: r["params"])
        p = np.array([r["params"] for r in grp], dtype=float)
        for name, col in colors.items():
            ax.loglog(p, [r[f"rank_{name}"] for r in grp], markers[gi % len(markers)],
                      color=col, alpha=0.8,
                      label=f"rank {name} (depth {key[0]}, n {key[1]}, {key[2]})")
            pred = [r[f"pred_{name}"] for r in grp]
            if all(v not in (None, "") for v in pred):
                ax.loglog(p, pred, "--", color=col, alpha=0.6)
    allp = np.array(sorted({r["params"] for r in rows}), dtype=float)
    if allp.size:
        ax.loglog(allp, allp, ":", color="k", label="p (parameter count)")
        fit = [r for r in rows if r.get("activation") == "linear"] or rows
        rh = np.array([r["rank_H"] for r in fit], dtype=float)
        pp = np.array([r["params"] for r in fit], dtype=float)
        c = float(np.exp(np.mean(np.log(rh) - 0.5 * np.log(pp))))
        ax.loglog(allp, c * np.sqrt(allp), "-", color="0.5", lw=0.8, label=f"{c:.2f}·√p")
    ax.set_xlabel("parameters p")
    ax.set_ylabel("rank (markers measured, dashed predicted)")
    ax.set_title(title or "Hessian rank vs parameter count")
    ax.legend(fontsize=6, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path
