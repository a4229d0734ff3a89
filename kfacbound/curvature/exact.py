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
of double-backward passes), except where H_F vanishes on the block (one layer of a ReLU network:
:func:`functional_part_vanishes`) and H = H_O; H_O from per-example output Jacobians J_i as
Σ_i J_iᵀ(Λ_i J_i). Data are processed in mini-batches (``batch_size``),
each contributing n_b/n of its own mean-loss matrix. Matrices above ``max_params`` rows raise
:class:`KfacboundError` (p² · 8 bytes of memory, O(p²·n) time); use the matrix-free operators of
:mod:`kfacbound.curvature.operators` instead.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import KfacboundError
from ..progress import progress_bar
from .layer_ggn import LayerGGN
from .modules import LinearRule, rule_for
from .operators import CurvatureProblem, functional_part_vanishes

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


def _dense_hessian(problem: CurvatureProblem, progress: bool,
                   structured: bool = True, ggn_shortcut: bool = True) -> torch.Tensor:
    """Dense H: the closed form :func:`_mlp_hessian` for MLPs (``structured``); else H_O when
    ``ggn_shortcut``, the selection is one block and :func:`functional_part_vanishes` says
    H_F = 0 on it; else
    Hessian-vector products against identity columns in vmapped chunks."""
    layers = mlp_layers(problem) if structured else None
    if layers is not None:
        return _mlp_hessian(problem, layers)
    # one block only: across layers H_F has cross terms, and the probe would be wasted work
    if ggn_shortcut and len(problem.selection.entries) == 1 and functional_part_vanishes(problem):
        return _dense_ggn(problem, progress)
    p = problem.p
    H = torch.empty(p, p, dtype=problem.dtype, device=problem.device)
    step = problem.chunk_size
    starts = range(0, p, step)
    for i in progress_bar(len(starts), "dense Hessian", progress, "chunk", starts, leave=False):
        j = min(p, i + step)
        E = torch.zeros(p, j - i, dtype=problem.dtype, device=problem.device)
        E[torch.arange(i, j), torch.arange(j - i)] = 1.0
        H[:, i:j] = problem.hvp(E)
    return (H + H.T) / 2


def _dense_ggn(problem: CurvatureProblem, progress: bool, layer_local: bool = True
               ) -> torch.Tensor:
    """Dense H_O = (1/n) Σ_i J_iᵀ Λ_i J_i, over chunks of examples
    (:meth:`CurvatureProblem.jacobian_chunk`): per-example Jacobians
    (:meth:`CurvatureProblem.jacobian`), one GEMM per chunk. A selection of one Linear/Conv
    layer forms J_i from the backpropagated output Jacobians instead
    (:meth:`~kfacbound.curvature.layer_ggn.LayerGGN.dense`: C plain reverse passes per chunk
    and one batched GEMM with the layer's input rows, no vmap over examples) unless
    ``layer_local`` is False."""
    entries = problem.selection.entries
    if layer_local and len(entries) == 1 and entries[0].kind == "layer":
        try:
            return LayerGGN(problem, keep=False).dense()
        except KfacboundError:  # shared/tied weights, rows that do not describe the layer
            pass
    p = problem.p
    G = torch.zeros(p, p, dtype=problem.dtype, device=problem.device)
    step = problem.jacobian_chunk()
    chunks = [(X[i:i + step], T[i:i + step]) for X, T, _ in problem.batches()
              for i in range(0, len(X), step)]
    for X, T in progress_bar(len(chunks), "dense GGN", progress, "chunk", chunks, leave=False):
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
    H = _dense_hessian(problem, progress, ggn_shortcut=False).cpu()
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


# ---------------------------------------------------------------------------- MLP closed form
_ACTIVATIONS = (nn.ReLU, nn.Tanh, nn.Sigmoid, nn.Identity)
MLP_BLOCK_ELEMENTS = 2**24  # largest work tensor (examples × out_l × p_m) of one block product


def mlp_layers(problem: CurvatureProblem) -> list[tuple[nn.Linear, nn.Module | None]] | None:
    """(Linear, activation after it or None) when :func:`_mlp_hessian` applies, else None.

    It applies to an nn.Sequential of an optional leading Flatten, then Linear layers (modules
    whose rule is :class:`~.modules.LinearRule` itself), each but the last followed by at most
    one ReLU/Tanh/Sigmoid/Identity (the last Linear gives the output), with a selection made of
    whole Linear layer blocks (any subset, any order)."""
    model = problem.model
    if not isinstance(model, nn.Sequential):
        return None
    mods = list(model.children())
    if mods and isinstance(mods[0], nn.Flatten):
        mods = mods[1:]
    layers: list[tuple[nn.Linear, nn.Module | None]] = []
    for m in mods:
        if type(rule_for(m)) is LinearRule:  # z = F.linear(a, W, b), Linear's own rule
            layers.append((m, None))
        elif isinstance(m, _ACTIVATIONS) and layers and layers[-1][1] is None:
            layers[-1] = (layers[-1][0], m)
        else:
            return None
    if not layers or layers[-1][1] is not None:
        return None
    ids = {id(lin) for lin, _ in layers}
    modules = dict(model.named_modules())
    if any(e.kind != "layer" or id(modules.get(e.label)) not in ids
           for e in problem.selection.entries):
        return None
    return layers


def _act_derivs(act: nn.Module | None, z: torch.Tensor):
    """(σ(z), σ'(z), σ''(z)) elementwise (ReLU: σ'' = 0, its derivative at 0 taken as 0)."""
    if act is None or isinstance(act, nn.Identity):
        return z, torch.ones_like(z), torch.zeros_like(z)
    if isinstance(act, nn.ReLU):
        d = (z > 0).to(z.dtype)
        return z * d, d, torch.zeros_like(z)
    if isinstance(act, nn.Tanh):
        a = torch.tanh(z)
        d = 1 - a * a
        return a, d, -2 * a * d
    s = torch.sigmoid(z)
    d = s * (1 - s)
    return s, d, d * (1 - 2 * s)


def _block_sum(at_l, at_m, Q, delta_m, K):
    """Σ_n of one Hessian block (layer l ≤ m) over a chunk of examples, rows (o, i) of W̃_l,
    columns (o', i') of W̃_m: Σ_n ã_l[i] P_n[o, (o', i')] with
    P_n[o, (o', i')] = Q[o,o'] ã_m[i'] + δ_m[o'] K̃[i',o] (K None: l = m, no second term),
    as one batched GEMM over o that writes the block in layout order (no transposed copies)."""
    N, in_l = at_l.shape
    out_l, out_m = Q.shape[1], Q.shape[2]
    in_m = at_m.shape[1]
    P = Q[:, :, :, None] * at_m[:, None, None, :]  # [N, out_l, out_m, in_m]
    if K is not None:
        if K.shape[1] < in_m:  # bias column of W̃_m: ã_m[-1] = 1 does not depend on W̃_l
            K = torch.cat([K, K.new_zeros(N, in_m - K.shape[1], out_l)], dim=1)
        P += K.transpose(1, 2)[:, :, None, :] * delta_m[:, None, :, None]
    P = P.reshape(N, out_l, out_m * in_m).transpose(0, 1)  # [out_l, N, r], a strided view
    B = torch.bmm(at_l.T.expand(out_l, in_l, N), P)  # [out_l, in_l, r]
    return B.reshape(out_l * in_l, out_m * in_m)


def _mlp_hessian(problem: CurvatureProblem, layers) -> torch.Tensor:
    """Dense Hessian of the mean loss of an MLP in closed form, from per-example quantities.

    Network z_l = W_l a_{l-1} + b_l, a_l = σ_l(z_l), f = z_L, ã = [a; 1]; per example, δ_m =
    ∂ℓ/∂z_m and H_m = ∂²ℓ/∂z_m² from the exact recursion (Hessian backpropagation)

        H_L = Λ,   H_m = D_m W_{m+1}ᵀ H_{m+1} W_{m+1} D_m + diag(σ_m''(z_m) ⊙ W_{m+1}ᵀ δ_{m+1}),

    D_m = diag(σ_m'(z_m)); J_{ml} = ∂z_m/∂z_l = W_m D_{m-1} J_{m-1,l} (J_ll = I) and
    K_{ml} = ∂a_{m-1}/∂z_l = D_{m-1} J_{m-1,l}. W̃_l acts only through z_l, so for l ≤ m and
    layout indices (o, i) of W̃_l, (o', i') of W̃_m,

        ∂²ℓ/∂W̃_l[o,i] ∂W̃_m[o',i'] = ã_{l-1,i} ( (J_{ml}ᵀ H_m)[o,o'] ã_{m-1,i'}
                                                 + δ_m[o'] K_{ml}[i',o] )

    (no second term for l = m, nor for the bias column i' of W̃_m). Blocks are summed over the
    examples by GEMMs over the example index (chunks of at most MLP_BLOCK_ELEMENTS work
    entries), divided by n; lower blocks are transposes (H is symmetric by construction).
    O(n·p²) multiply-adds in a few large GEMMs instead of p Hessian-vector products; tested
    against ``torch.func.hessian`` (float64).
    """
    modules = dict(problem.model.named_modules())
    index = {id(lin): k for k, (lin, _) in enumerate(layers)}
    sel = [(index[id(modules[e.label])], e.offset, e.size) for e in problem.selection.entries]
    H = torch.empty(problem.p, problem.p, dtype=problem.dtype, device=problem.device)
    L = len(layers)
    first = True  # the first batch writes every block of H, later ones add
    for X, T, _ in problem.batches():
        N = len(X)
        with torch.no_grad():
            a, d1, d2 = [X.reshape(N, -1)], [], []
            for lin, act in layers:
                s, d, dd = _act_derivs(act, F.linear(a[-1], lin.weight, lin.bias))
                a.append(s)
                d1.append(d)
                d2.append(dd)
            f = a[-1]
            C = f.shape[1]
            Hz: list = [None] * L
            Hz[L - 1] = problem.loss_hessians(f, T).reshape(N, C, C)
        with torch.enable_grad():
            ff = f.detach().requires_grad_(True)
            delta_f = torch.autograd.grad(problem.loss_fn(ff, T) * N, ff)[0]  # per-example ∂ℓ/∂f
        with torch.no_grad():
            delta: list = [None] * L
            delta[L - 1] = delta_f
            for m in range(L - 2, -1, -1):
                W = layers[m + 1][0].weight
                back = delta[m + 1] @ W
                delta[m] = d1[m] * back
                Hz[m] = (d1[m][:, :, None] * (W.T @ Hz[m + 1] @ W) * d1[m][:, None, :]
                         + torch.diag_embed(d2[m] * back))
            ones = X.new_ones(N, 1)
            at = [torch.cat([a[k], ones], 1) if lin.bias is not None else a[k]
                  for k, (lin, _) in enumerate(layers)]
            for l in sorted({s[0] for s in sel}):
                J = {l: torch.eye(d1[l].shape[1], dtype=X.dtype, device=X.device).expand(N, -1, -1)}
                for m in range(l + 1, L):
                    J[m] = layers[m][0].weight @ (d1[m - 1][:, :, None] * J[m - 1])
                for _, off_l, size_l in (s for s in sel if s[0] == l):
                    for m, off_m, size_m in (s for s in sel if s[0] >= l):
                        Q = J[m].transpose(1, 2) @ Hz[m]  # [N, out_l, out_m]
                        K = d1[m - 1][:, :, None] * J[m - 1] if m > l else None
                        step = max(1, MLP_BLOCK_ELEMENTS // (at[m].shape[1] * Q.shape[1]
                                                             * Q.shape[2]))
                        block = None
                        for s in range(0, N, step):
                            part = _block_sum(at[l][s:s + step], at[m][s:s + step],
                                              Q[s:s + step], delta[m][s:s + step],
                                              None if K is None else K[s:s + step])
                            block = part if block is None else block.add_(part)
                        block.mul_(1.0 / problem.n)
                        if m == l:  # symmetric up to rounding: make it exact
                            block = (block + block.T).mul_(0.5)
                        upper = H[off_l:off_l + size_l, off_m:off_m + size_m]
                        upper.copy_(block) if first else upper.add_(block)
                        if m != l:
                            lower = H[off_m:off_m + size_m, off_l:off_l + size_l]
                            lower.copy_(block.T) if first else lower.add_(block.T)
        first = False
    return H
