"""Dense exact curvature of the mean loss: the Hessian H, its GGN part H_O and H_F = H − H_O.

For a network f(x; θ) and the empirical loss L̂(θ) = (1/n) Σ_i ℓ(f(x_i; θ), y_i) (model in eval
mode, losses of :mod:`kfacbound.losses`):

- H   = ∇²L̂(θ), the full Hessian;
- H_O = (1/n) Σ_i J_iᵀ Λ_i J_i, the generalised Gauss–Newton / "outer-product Hessian"
  (J_i = ∂f(x_i)/∂θ, Λ_i = ∂²ℓ_i/∂f²);
- H_F = H − H_O = (1/n) Σ_i Σ_c (∂ℓ_i/∂f_c) ∂²f_c(x_i)/∂θ², the "functional Hessian"
  (Singh, Bachmann & Hofmann, NeurIPS 2021).

All in float64 by default, for the whole network, one Linear/Conv2d layer block (in the [W | b]
row-major layout of :mod:`kfacbound.curvature.layout`) or any subset of parameters (see
:class:`~kfacbound.curvature.operators.ParameterSelection`). Computation: H column blocks are
Hessian-vector products against identity columns, vectorised with ``torch.func.vmap`` over
forward-over-reverse products (much faster than ``torch.autograd.functional.hessian``'s Python loop
of double-backward passes); H_O from the per-batch output Jacobian J (reverse or forward mode,
whichever needs fewer passes) as Jᵀ(ΛJ). Data are processed in mini-batches (``batch_size``),
each contributing n_b/n of its own mean-loss matrix. Matrices above ``max_params`` rows raise
:class:`KfacboundError` (p² · 8 bytes of memory, O(p²·n) time); use the matrix-free operators of
:mod:`kfacbound.curvature.operators` instead.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import KfacboundError
from .operators import CurvatureProblem

DEFAULT_MAX_PARAMS = 6000


@dataclass
class HessianParts:
    """Dense H, H_O, H_F (float64, CPU) and where each selected block lies in them."""

    H: torch.Tensor
    H_O: torch.Tensor
    H_F: torch.Tensor
    slices: dict[str, slice] = field(default_factory=dict)
    loss: float = float("nan")


def _problem(model, X, y, loss, params, batch_size, max_params, dtype, device, chunk_size):
    problem = CurvatureProblem(model, X, y, loss, params, batch_size=batch_size,
                               chunk_size=chunk_size, dtype=dtype, device=device)
    if max_params is not None and problem.p > max_params:
        raise KfacboundError(
            f"the selected parameters number {problem.p} > max_params={max_params}: a dense "
            f"{problem.p}x{problem.p} matrix needs {problem.p ** 2 * 8 / 2**30:.2f} GiB. Select a "
            "smaller block (params=...), raise max_params, or use the matrix-free operators "
            "(kfacbound.curvature.operators) with Lanczos"
        )
    return problem


def _dense_hessian(problem: CurvatureProblem, progress: bool) -> torch.Tensor:
    p = problem.p
    H = torch.empty(p, p, dtype=problem.dtype, device=problem.device)
    step = problem.chunk_size
    for i in tqdm(range(0, p, step), desc="dense Hessian", disable=not progress, leave=False):
        j = min(p, i + step)
        E = torch.zeros(p, j - i, dtype=problem.dtype, device=problem.device)
        E[torch.arange(i, j), torch.arange(j - i)] = 1.0
        H[:, i:j] = problem.hvp(E)
    return (H + H.T) / 2


def _dense_ggn(problem: CurvatureProblem, progress: bool) -> torch.Tensor:
    p = problem.p
    G = torch.zeros(p, p, dtype=problem.dtype, device=problem.device)
    for X, T, _ in tqdm(problem.batches(), desc="dense GGN", disable=not progress, leave=False):
        with torch.no_grad():
            F = problem.forward(problem.theta, X)
        Lam = problem.loss_hessians(F, T).reshape(len(X), problem.num_outputs, -1)
        J = problem.jacobian(X)  # (N, C, p)
        LJ = torch.einsum("ncd,ndp->ncp", Lam, J)
        G += J.reshape(-1, p).T @ LJ.reshape(-1, p)
    G /= problem.n
    return (G + G.T) / 2


def exact_hessian(
    model: nn.Module,
    X: torch.Tensor,
    y: torch.Tensor,
    loss: str,
    params: str | Sequence[str] | None = None,
    *,
    batch_size: int | None = None,
    max_params: int | None = DEFAULT_MAX_PARAMS,
    dtype: torch.dtype = torch.float64,
    device: str | torch.device | None = None,
    chunk_size: int | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Dense Hessian H of the mean loss w.r.t. the parameters selected by ``params`` (p×p, CPU)."""
    problem = _problem(model, X, y, loss, params, batch_size, max_params, dtype, device,
                       chunk_size)
    return _dense_hessian(problem, progress).cpu()


def exact_ggn(
    model: nn.Module,
    X: torch.Tensor,
    y: torch.Tensor,
    loss: str,
    params: str | Sequence[str] | None = None,
    *,
    batch_size: int | None = None,
    max_params: int | None = DEFAULT_MAX_PARAMS,
    dtype: torch.dtype = torch.float64,
    device: str | torch.device | None = None,
    chunk_size: int | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Dense GGN H_O = (1/n) Σ_i J_iᵀ Λ_i J_i w.r.t. the selected parameters (p×p, CPU)."""
    problem = _problem(model, X, y, loss, params, batch_size, max_params, dtype, device,
                       chunk_size)
    return _dense_ggn(problem, progress).cpu()


def hessian_parts(
    model: nn.Module,
    X: torch.Tensor,
    y: torch.Tensor,
    loss: str,
    params: str | Sequence[str] | None = None,
    *,
    batch_size: int | None = None,
    max_params: int | None = DEFAULT_MAX_PARAMS,
    dtype: torch.dtype = torch.float64,
    device: str | torch.device | None = None,
    chunk_size: int | None = None,
    progress: bool = False,
) -> HessianParts:
    """H, H_O and H_F = H − H_O in one pass over the set-up (same coordinates for all three)."""
    problem = _problem(model, X, y, loss, params, batch_size, max_params, dtype, device,
                       chunk_size)
    H = _dense_hessian(problem, progress).cpu()
    H_O = _dense_ggn(problem, progress).cpu()
    return HessianParts(H=H, H_O=H_O, H_F=H - H_O, slices=problem.selection.slices,
                        loss=problem.loss())


def layer_hessian(
    model: nn.Module,
    X: torch.Tensor,
    y: torch.Tensor,
    loss: str,
    layer: str,
    part: str = "H",
    **kwargs,
) -> torch.Tensor:
    """Dense block of one layer (module path) in the [W | b] layout: ``part`` "H", "H_O", "H_F".

    This is the *diagonal block* of the full matrix (curvature w.r.t. this layer only, the other
    parameters held fixed). Keyword arguments as for :func:`hessian_parts`.
    """
    if part == "H":
        return exact_hessian(model, X, y, loss, [layer], **kwargs)
    if part == "H_O":
        return exact_ggn(model, X, y, loss, [layer], **kwargs)
    if part == "H_F":
        return hessian_parts(model, X, y, loss, [layer], **kwargs).H_F
    raise KfacboundError(f"part must be 'H', 'H_O' or 'H_F', not {part!r}")
