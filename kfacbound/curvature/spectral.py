"""Spectra of symmetric curvature matrices: Lanczos top-k, Hutchinson trace, SLQ density, metrics.

Every function takes a symmetric p×p matrix ``A`` as a ``scipy.sparse.linalg.LinearOperator``
(e.g. :func:`kfacbound.curvature.operators.hessian_operator`), a NumPy array or a torch tensor.

- :func:`top_eigenpairs`: k extreme eigenpairs by implicitly restarted Lanczos (ARPACK through
  ``scipy.sparse.linalg.eigsh``, ``method='arpack'``) or by one unrestarted Lanczos run with full
  reorthogonalisation that stops as soon as the wanted Ritz pairs' residuals meet ``tol``
  (``method='lanczos'``, :func:`lanczos_eigenpairs`: fewer products when the products are
  what costs, as for Hessians); seeded start vector; dense ``eigh`` when k ≥ p − 1.
- :func:`hutchinson_trace`: tr(A) ≈ (1/m) Σ_j z_jᵀ A z_j with Rademacher z_j (Hutchinson 1990);
  variance 2(‖A‖_F² − Σ A_ii²)/m. Returns the estimate and its standard error.
- :func:`slq`: stochastic Lanczos quadrature (Golub & Meurant; Ubaru, Chen & Saad 2017; used for
  Hessians by Ghorbani, Krishnan & Xiao 2019 and PyHessian). For a unit probe u = z/‖z‖, m Lanczos
  steps give the tridiagonal T_m = Q diag(θ) Qᵀ; the nodes θ_j with weights τ_j = Q_{1j}² are the
  m-point Gauss quadrature of the spectral measure of u: Σ_j τ_j g(θ_j) ≈ uᵀ g(A) u, exact for
  polynomials of degree ≤ 2m − 1. Averaged over probes this estimates the normalised density
  φ(t) = (1/p) Σ_i δ(t − λ_i), which integrates to 1; :func:`slq_density` smooths it with a
  Gaussian of width σ on a grid.
- :func:`eigenspace_overlap`: ‖V1ᵀV2‖_F² / k for orthonormal bases (1 = same subspace, a random
  pair of k-dimensional subspaces of R^n gives ≈ k/n).
- :func:`spectrum_metrics`: the diagnostics of SCIENCE.md §6 from a vector of eigenvalues.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import scipy.linalg
import torch
from scipy.sparse.linalg import LinearOperator, aslinearoperator, eigsh

from ..errors import KfacboundError


def _as_operator(A) -> LinearOperator:
    if isinstance(A, torch.Tensor):
        A = A.detach().cpu().numpy()
    if isinstance(A, np.ndarray):
        if A.ndim != 2 or A.shape[0] != A.shape[1]:
            raise KfacboundError(f"need a square matrix, got shape {A.shape}")
        return aslinearoperator(A)
    if isinstance(A, LinearOperator):
        if A.shape[0] != A.shape[1]:
            raise KfacboundError(f"need a square operator, got shape {A.shape}")
        return A
    raise KfacboundError(f"cannot use {type(A).__name__} as a matrix")


def _dense(A) -> np.ndarray | None:
    if isinstance(A, torch.Tensor):
        return A.detach().cpu().numpy().astype(np.float64)
    if isinstance(A, np.ndarray):
        return A.astype(np.float64)
    return None


def top_eigenpairs(
    A,
    k: int,
    which: str = "LA",
    *,
    tol: float = 0.0,
    maxiter: int | None = None,
    ncv: int | None = None,
    seed: int = 0,
    method: str = "arpack",
) -> tuple[np.ndarray, np.ndarray]:
    """k eigenpairs of symmetric A: ``which`` "LA" largest algebraic (default), "SA" smallest,
    "LM" largest magnitude. Returns (eigenvalues sorted descending (k,), eigenvectors (p, k)).
    ``tol=0`` means machine precision (ARPACK's convention). ``method``: 'arpack' (``eigsh``;
    ``ncv``, ``maxiter`` are its options) or 'lanczos' (:func:`lanczos_eigenpairs`, at most
    ``maxiter`` products, default min(p, 10 k + 100); ``tol=0`` is read as 1e-12, so give
    float32 operators an explicit ``tol``)."""
    if method not in ("arpack", "lanczos"):
        raise KfacboundError(f"method must be 'arpack' or 'lanczos', not {method!r}")
    op = _as_operator(A)
    p = op.shape[0]
    if not 1 <= k <= p:
        raise KfacboundError(f"k must be between 1 and p = {p}, not {k}")
    if which not in ("LA", "SA", "LM"):
        raise KfacboundError("which must be 'LA', 'SA' or 'LM'")
    if k >= p - 1:
        dense = _dense(A)
        if dense is None:
            dense = op.matmat(np.eye(p))
        evals, evecs = scipy.linalg.eigh((dense + dense.T) / 2)
        order = {"LA": np.argsort(-evals), "SA": np.argsort(evals),
                 "LM": np.argsort(-np.abs(evals))}[which][:k]
        evals, evecs = evals[order], evecs[:, order]
    elif method == "lanczos":
        v0 = np.random.default_rng(seed).standard_normal(p)
        evals, evecs = lanczos_eigenpairs(A if hasattr(A, "apply_torch") else op, k, which,
                                          v0=v0, tol=tol if tol > 0 else 1e-12,
                                          max_steps=maxiter)
    else:
        v0 = np.random.default_rng(seed).standard_normal(p)
        evals, evecs = eigsh(op, k=k, which=which, tol=tol, maxiter=maxiter, ncv=ncv, v0=v0)
    order = np.argsort(-evals)
    return evals[order], evecs[:, order]


def _wanted(theta: np.ndarray, k: int, which: str) -> np.ndarray:
    order = {"LA": np.argsort(-theta), "SA": np.argsort(theta),
             "LM": np.argsort(-np.abs(theta))}[which]
    return order[:k]


def _torch_products(A) -> tuple[Any, torch.dtype, torch.device]:
    """(V ↦ A V on torch vectors, dtype, device): a :class:`~kfacbound.curvature.operators.
    TorchOperator`'s own torch product in its dtype and device (no NumPy round trip), else the
    ``LinearOperator``'s matvec in float64 on the CPU."""
    apply = getattr(A, "apply_torch", None)
    if apply is not None and getattr(A, "problem", None) is not None:
        problem = A.problem

        def product(v: torch.Tensor) -> torch.Tensor:
            A.num_products += 1
            return apply(v)
        return product, problem.dtype, problem.device
    op = _as_operator(A)

    def product(v: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(np.asarray(op.matvec(v.numpy()), dtype=np.float64).reshape(-1))
    return product, torch.float64, torch.device("cpu")


def lanczos_eigenpairs(
    A, k: int, which: str = "LA", *, v0: np.ndarray, tol: float = 1e-8,
    max_steps: int | None = None, guard: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """k extreme eigenpairs by Lanczos with full reorthogonalisation, no restarts.

    After step j ≥ k + g the tridiagonal T_j = S diag(θ) Sᵀ gives Ritz pairs (θ_i, Q_j s_i)
    with residual ‖A Q_j s_i − θ_i Q_j s_i‖ = β_j |s_{j,i}| (Paige); the run stops at the
    first step where each of the k + g wanted-end Ritz values has β_j |s_{j,i}| ≤ tol · |θ_i|
    (ARPACK's criterion), so each returned θ_i lies within tol·|θ_i| of an eigenvalue of A (and,
    for a gap γ to the rest of the spectrum, within (tol·θ_i)²/γ). The g = ``guard`` extra
    Ritz values (default ⌈k/4⌉) must converge too: Ritz values approach the spectrum's end from
    inside, and a k-th Ritz value with a small residual can sit on a lower eigenvalue while a
    higher one is still unfound; the guards make that less likely, not impossible (as for any
    Krylov method, an eigenvector orthogonal to v0 or a repeated eigenvalue's copy is missed).

    One product per step, at most ``max_steps`` (default min(p, 10k + 100)). For a
    :class:`~kfacbound.curvature.operators.TorchOperator` the vectors and the Krylov basis
    (steps × p) stay torch tensors in the operator's dtype and device (float32 operators
    orthogonalise in float32); other operators run in float64. After the three-term step, full
    reorthogonalisation by classical Gram–Schmidt, repeated once when it cancels the norm below
    0.7 of its value (the DGKS test: twice is enough, Kahan–Parlett).
    Returns (eigenvalues (k,), eigenvectors (p, k)) in ``which``'s order, as NumPy float64."""
    product, dtype, device = _torch_products(A)
    p = A.shape[0]
    m = min(p, max_steps if max_steps is not None else 10 * k + 100)
    g = max(1, math.ceil(k / 4)) if guard is None else int(guard)
    want = min(k + g, m)
    if not 1 <= k <= m:
        raise KfacboundError(f"k must be between 1 and the number of steps {m}, not {k}")
    Qt = torch.empty(min(m, 2 * want + 10), p, dtype=dtype, device=device)  # grown when needed
    alpha, beta = np.zeros(m), np.zeros(m)
    q = torch.as_tensor(np.asarray(v0, dtype=np.float64).reshape(-1)).to(device, dtype)
    q = q / torch.linalg.vector_norm(q)
    for j in range(m):
        if j == Qt.shape[0]:
            grow = torch.empty(min(m, 2 * j) - j, p, dtype=dtype, device=device)
            Qt = torch.cat([Qt, grow])
        Qt[j] = q
        w = product(q).reshape(-1).to(dtype)
        alpha[j] = float(q @ w)
        basis = Qt[:j + 1]
        w = w - alpha[j] * q - (beta[j - 1] * Qt[j - 1] if j > 0 else 0.0)  # three-term step
        before = torch.linalg.vector_norm(w)
        w = w - basis.T @ (basis @ w)
        norm = torch.linalg.vector_norm(w)
        if norm < 0.7 * before:  # cancellation: a second pass (DGKS test; twice is enough)
            w = w - basis.T @ (basis @ w)
            norm = torch.linalg.vector_norm(w)
        beta[j] = float(norm)
        steps = j + 1
        if steps >= want or steps == m:
            theta, S = scipy.linalg.eigh_tridiagonal(alpha[:steps], beta[:steps - 1])
            idx = _wanted(theta, want, which)
            resid = beta[j] * np.abs(S[-1, idx])
            exhausted = beta[j] <= 1e-12 * max(np.abs(theta).max(), 1e-300)
            if exhausted or steps == m or np.all(resid <= tol * np.abs(theta[idx])):
                idx = idx[:k]
                vecs = basis.T.to(torch.float64) @ torch.as_tensor(S[:, idx])
                return theta[idx], vecs.cpu().numpy()
        q = w / beta[j]
    raise AssertionError("unreachable")


def hutchinson_trace(
    A, num_samples: int = 100, *, seed: int = 0, block: int = 32
) -> tuple[float, float]:
    """Hutchinson estimate of tr(A) with Rademacher probes: (estimate, standard error).

    Probes are applied ``block`` at a time (one ``matmat``). The standard error is the sample
    standard deviation of zᵀAz over √num_samples."""
    op = _as_operator(A)
    if num_samples < 1:
        raise KfacboundError("num_samples must be at least 1")
    p = op.shape[0]
    rng = np.random.default_rng(seed)
    values = []
    for start in range(0, num_samples, block):
        m = min(block, num_samples - start)
        Z = rng.integers(0, 2, size=(p, m)).astype(np.float64) * 2 - 1
        AZ = np.asarray(op.matmat(Z)).reshape(p, m)
        values.append(np.einsum("pm,pm->m", Z, AZ))
    v = np.concatenate(values)
    se = float(v.std(ddof=1) / math.sqrt(len(v))) if len(v) > 1 else float("nan")
    return float(v.mean()), se


def lanczos(A, v0: np.ndarray, num_steps: int) -> tuple[np.ndarray, np.ndarray]:
    """``num_steps`` Lanczos steps from v0 with full reorthogonalisation (float64).

    Returns (α, β): the diagonal and off-diagonal of the tridiagonal T_m. Stops early (shorter
    arrays) when the Krylov space is exhausted (β below 1e-12·‖A‖ estimate)."""
    op = _as_operator(A)
    p = op.shape[0]
    m = min(num_steps, p)
    Q = np.zeros((p, m))
    alpha, beta = [], []
    q = np.asarray(v0, dtype=np.float64) / np.linalg.norm(v0)
    scale = 0.0
    for j in range(m):
        Q[:, j] = q
        w = np.asarray(op.matvec(q), dtype=np.float64).reshape(-1)
        a = float(q @ w)
        alpha.append(a)
        w = w - Q[:, :j + 1] @ (Q[:, :j + 1].T @ w)
        w = w - Q[:, :j + 1] @ (Q[:, :j + 1].T @ w)  # twice is enough (Kahan–Parlett)
        b = float(np.linalg.norm(w))
        scale = max(scale, abs(a), b)
        if j == m - 1 or b <= 1e-12 * max(scale, 1e-300):
            break
        beta.append(b)
        q = w / b
    return np.array(alpha), np.array(beta)


def slq(
    A, num_probes: int = 10, num_steps: int = 80, *, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Stochastic Lanczos quadrature: (nodes, weights), each (num_probes, m).

    Row j holds the Gauss-quadrature nodes θ and weights τ (Σ τ = 1) of probe j (Rademacher,
    normalised); rows shorter than m (early Lanczos termination) are padded with weight 0. The
    density estimate is (1/num_probes) Σ_j Σ_l τ_jl δ(t − θ_jl)."""
    op = _as_operator(A)
    p = op.shape[0]
    m = min(num_steps, p)
    rng = np.random.default_rng(seed)
    nodes = np.zeros((num_probes, m))
    weights = np.zeros((num_probes, m))
    for j in range(num_probes):
        z = rng.integers(0, 2, size=p).astype(np.float64) * 2 - 1
        alpha, beta = lanczos(op, z, m)
        theta, S = scipy.linalg.eigh_tridiagonal(alpha, beta)
        nodes[j, :len(theta)] = theta
        nodes[j, len(theta):] = theta[-1]
        weights[j, :len(theta)] = S[0] ** 2
    return nodes, weights


def slq_density(
    nodes: np.ndarray,
    weights: np.ndarray,
    grid: np.ndarray | None = None,
    *,
    sigma: float | None = None,
    num_points: int = 1000,
) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian-broadened density on a grid: φ_σ(t) = mean_j Σ_l τ_jl N(t; θ_jl, σ²).

    Default σ = 1% of the node range (at least 1e-12); default grid: ``num_points`` points from
    min(θ) − 5σ to max(θ) + 5σ, so that the density integrates to 1 up to quadrature error."""
    nodes = np.atleast_2d(nodes)
    weights = np.atleast_2d(weights)
    lo, hi = float(nodes.min()), float(nodes.max())
    if sigma is None:
        sigma = max(0.01 * (hi - lo), 1e-12 * max(1.0, abs(hi)))
    if grid is None:
        grid = np.linspace(lo - 5 * sigma, hi + 5 * sigma, num_points)
    diff = (grid[:, None] - nodes.reshape(1, -1)) / sigma
    kern = np.exp(-0.5 * diff ** 2) / (sigma * math.sqrt(2 * math.pi))
    density = kern @ weights.reshape(-1) / nodes.shape[0]
    return grid, density


def eigenspace_overlap(V1, V2, *, orthonormalize: bool = False) -> float:
    """‖V1ᵀV2‖_F² / k with k = min(k1, k2), for V1 (n×k1), V2 (n×k2) with orthonormal columns.

    In [0, 1]; 1 when one subspace contains the other. ``orthonormalize`` first replaces each basis
    by the Q of its QR decomposition."""
    V1 = _dense(V1) if not isinstance(V1, np.ndarray) else V1.astype(np.float64)
    V2 = _dense(V2) if not isinstance(V2, np.ndarray) else V2.astype(np.float64)
    V1 = V1.reshape(V1.shape[0], -1)
    V2 = V2.reshape(V2.shape[0], -1)
    if V1.shape[0] != V2.shape[0]:
        raise KfacboundError(f"bases live in different spaces: {V1.shape[0]} vs {V2.shape[0]}")
    if orthonormalize:
        V1 = np.linalg.qr(V1)[0]
        V2 = np.linalg.qr(V2)[0]
    k = min(V1.shape[1], V2.shape[1])
    return float(np.linalg.norm(V1.T @ V2) ** 2 / k)


def overlap_curve(V1, V2, ks=None) -> dict[int, float]:
    """Overlap of the leading k columns of V1 and V2 for each k in ``ks`` (default 1..min k)."""
    k_max = min(np.shape(V1)[1], np.shape(V2)[1])
    ks = range(1, k_max + 1) if ks is None else ks
    return {int(k): eigenspace_overlap(np.asarray(V1)[:, :k], np.asarray(V2)[:, :k]) for k in ks}


def count_outliers(eigenvalues, *, max_outliers: int = 50, min_ratio: float = 3.0) -> int:
    """Number of eigenvalues above the bulk, by the largest relative gap.

    Rule: sort the positive eigenvalues λ_1 ≥ λ_2 ≥ …; among the top ``max_outliers`` + 1 take the
    index i maximising the ratio λ_i/λ_{i+1}. If that ratio is at least ``min_ratio`` the first i
    eigenvalues are outliers (the bulk edge lies in that gap), else there are none. A smoothly
    decaying spectrum has no outliers; C − 1 well-separated class outliers (Papyan 2019) are found
    when the gap after them is the largest one. With a truncated spectrum (top-k only) the count
    can only be trusted if it is below k − 1."""
    lam = np.sort(np.asarray(eigenvalues, dtype=np.float64))[::-1]
    lam = lam[lam > 0]
    if len(lam) < 2:
        return 0
    top = lam[:max_outliers + 1]
    ratios = top[:-1] / top[1:]
    i = int(np.argmax(ratios))
    return i + 1 if ratios[i] >= min_ratio else 0


def spectrum_metrics(
    eigenvalues,
    *,
    tol: float | None = None,
    max_outliers: int = 50,
    min_ratio: float = 3.0,
) -> dict[str, Any]:
    """Spectrum diagnostics (SCIENCE.md §6) from eigenvalues of a symmetric matrix.

    With λ₊ the eigenvalues above ``tol`` (default max|λ| · p · eps, NumPy's rank tolerance) and
    λ₋ those below −tol:
    ``top`` = max λ; ``trace`` = Σ λ (all); ``effective_rank`` = exp(−Σ π log π), π = λ₊/Σλ₊
    (Roy & Vetterli 2007); ``stable_rank`` = Σλ₊ / λ_max; ``negative_mass`` = Σ|λ₋| / Σ|λ|;
    ``negative_fraction`` = #λ₋ / p; ``condition_number`` = max λ₊ / min λ₊ (of the positive part);
    ``outliers`` = :func:`count_outliers`; ``num_positive``, ``num_negative``, ``num``, ``tol``.
    Trace, fractions and ranks are those of the full spectrum only when all p eigenvalues are
    given."""
    lam = np.asarray(eigenvalues, dtype=np.float64).reshape(-1)
    if lam.size == 0:
        raise KfacboundError("no eigenvalues given")
    p = lam.size
    scale = float(np.abs(lam).max())
    if tol is None:
        tol = scale * p * np.finfo(np.float64).eps
    pos = lam[lam > tol]
    neg = lam[lam < -tol]
    out: dict[str, Any] = {"num": p, "tol": tol, "top": float(lam.max()),
                           "trace": float(lam.sum()),
                           "num_positive": int(pos.size), "num_negative": int(neg.size)}
    if pos.size:
        pi = pos / pos.sum()
        out["effective_rank"] = float(np.exp(-(pi * np.log(pi)).sum()))
        out["stable_rank"] = float(pos.sum() / pos.max())
        out["condition_number"] = float(pos.max() / pos.min())
    else:
        out["effective_rank"] = out["stable_rank"] = 0.0
        out["condition_number"] = float("nan")
    total = float(np.abs(lam).sum())
    out["negative_mass"] = float(np.abs(neg).sum() / total) if total > 0 else 0.0
    out["negative_fraction"] = float(neg.size / p)
    out["outliers"] = count_outliers(lam, max_outliers=max_outliers, min_ratio=min_ratio)
    return out
