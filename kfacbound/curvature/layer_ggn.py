"""The exact GGN block of one layer as a matrix-free operator from per-example output Jacobians.

For one Linear/Conv layer z = layer(a; W̃) (W̃ = [W | b] in the layout of
:mod:`kfacbound.curvature.layout`) the layer's block of the generalised Gauss–Newton matrix is

    H_O,ll = (1/n) Σ_i J_iᵀ Λ_i J_i,   J_i = B_i ∂z_i/∂W̃,   B_i = ∂f(x_i)/∂z_i   (C × |z|),

with Λ_i = ∂²ℓ_i/∂f² (Martens & Grosse 2015 §3; the same B_i that KFLR backpropagates before it
takes the Kronecker approximation E[G] ⊗ E[A]). :class:`LayerGGN` backpropagates B_i once, C
reverse passes over the data (eval mode: example i's output depends on example i alone), and
keeps B, the layer inputs a and Λ. A product is then local to the layer:

    δz_i = layer(a_i; V)                      (the layer is linear in W̃)
    u_i  = B_i δz_i,   w_i = Λ_i u_i,   g_i = B_iᵀ w_i
    H_O,ll V = (1/n) Σ_i (∂z_i/∂W̃)ᵀ g_i      (the layer's weight gradient for output gradient g)

— one layer forward and one weight gradient instead of a Hessian-vector product through the
whole network (each costs several forward passes of the model).

It is the exact *Hessian* block wherever the functional part H_F vanishes on the layer, which
:func:`~kfacbound.curvature.operators.functional_part_vanishes` tests (single layers of ReLU /
max-pool / eval-BN / residual networks); :func:`exact_block_operator` picks it then, and the
Hessian-vector-product operator otherwise.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ..errors import KfacboundError
from .operators import CurvatureProblem, TorchOperator, functional_part_vanishes, operator_dtype

# bytes of B, a and Λ kept by LayerGGN (default budget): 4 GiB holds every Lanczos block of the
# BatchNorm study's ResNet-8-w8 at 8,000 examples in float64 (layer2.0.conv2: 2.8 GB), where a
# network product costs about 5× a layer-local one (benchmarks/RESULTS.md)
LAYER_GGN_MEMORY = 4 * 2**30
SETUP_BATCH = 512  # examples per reverse pass when B is formed
DENSE_CHUNK_MEMORY = 2**29  # bytes of B, input rows and J per chunk of LayerGGN.dense


class LayerGGN:
    """H_O of the mean loss restricted to one layer (``problem`` selects exactly that layer):
    ``matmat(V)`` for V (p × k), p = the layer's size in [W | b] layout.

    Stores, per chunk of at most SETUP_BATCH examples, B (N, C, |z|), the layer input a and
    Λ (N, C, C): :meth:`memory_bytes` predicts the total before anything is formed."""

    def __init__(self, problem: CurvatureProblem, keep: bool = True):
        entries = problem.selection.entries
        if len(entries) != 1 or entries[0].kind != "layer":
            raise KfacboundError("LayerGGN needs a selection of exactly one Linear/Conv layer")
        self.problem = problem
        self.label = entries[0].label
        self.module = dict(problem.model.named_modules())[self.label]
        self.fn = entries[0].rule.function(self.module)
        self.shape = tuple(entries[0].rule.layer_matrix(self.module).shape)
        self.p = problem.p
        own = {id(t) for t in self.module.parameters(recurse=False)}
        for name, m in problem.model.named_modules(remove_duplicate=False):
            if m is not self.module and any(id(t) in own for t in m.parameters(recurse=False)):
                raise KfacboundError(f"layer {self.label!r} shares its parameters with {name!r} "
                                     "(tied weights): no per-layer GGN block")
        self._chunks = list(self.chunks()) if keep else []  # keep=False: for dense() only

    @staticmethod
    def memory_bytes(problem: CurvatureProblem, layer: str) -> int:
        """Bytes of B, a and Λ for ``layer`` on the problem's data (one forward of 1 example)."""
        module = dict(problem.model.named_modules())[layer]
        sizes: dict[str, int] = {}

        def hook(_m, inputs, output):
            sizes["a"], sizes["z"] = inputs[0][0].numel(), output[0].numel()
        h = module.register_forward_hook(hook)
        try:
            with torch.no_grad():
                problem.model(problem.X[:1])
        finally:
            h.remove()
        C = problem.num_outputs
        return problem.n * (C * sizes["z"] + sizes["a"] + C * C) * problem._itemsize

    def chunks(self, size: int = SETUP_BATCH):
        """(B, a, Λ) of each chunk of at most ``size`` examples of the problem's batches."""
        for X, T, _ in self.problem.batches():
            for i in range(0, len(X), size):
                yield self._backpropagate(X[i:i + size], T[i:i + size])

    def dense(self) -> torch.Tensor:
        """The dense block H_O,ll (p × p) without keeping B: per chunk, the per-example Jacobians
        J_i[c] = Σ_t B_i[c, :, t] ã_{i,t}ᵀ (z_t = W̃ ã_t at each output position t; ã the
        layer's input rows, :meth:`~kfacbound.curvature.modules.CurvatureRule.rows`) by one
        batched GEMM, then H_O,ll += J_iᵀ Λ_i J_i; divided by n. Chunks hold B, ã and J of at
        about DENSE_CHUNK_MEMORY bytes. Raises :class:`KfacboundError` (callers fall back to
        the network's per-example Jacobians) for layers the input rows do not describe (conv
        padding given as a string, a Linear layer on inputs of more than two dimensions)."""
        entry = self.problem.selection.entries[0]
        entry.rule.check(self.module, self.label)
        C, out = self.problem.num_outputs, self.shape[0]
        p, item = self.p, self.problem._itemsize
        G = torch.zeros(p, p, dtype=self.problem.dtype, device=self.problem.device)
        size = None
        for X, T, _ in self.problem.batches():
            if size is None:  # bytes per example from one example's B and rows
                B1, a1, _ = self._backpropagate(X[:1], T[:1])
                r1 = entry.rule.rows(self.module, a1)
                if B1.shape[2] != out * r1.shape[1]:
                    raise KfacboundError(f"layer {self.label!r}: {B1.shape[2]} outputs per "
                                         f"example are not {out} × {r1.shape[1]} positions")
                size = max(1, min(SETUP_BATCH, DENSE_CHUNK_MEMORY // (  # B, rows, J and ΛJ
                    (B1.numel() + r1.numel() + 2 * C * p) * item)))
            for i in range(0, len(X), size):
                B, a, Lam = self._backpropagate(X[i:i + size], T[i:i + size])
                rows = entry.rule.rows(self.module, a)  # (N, T, D + 1)
                J = torch.einsum("ncot,ntd->ncod", B.reshape(len(a), C, out, rows.shape[1]),
                                 rows).reshape(len(a), C, p)
                LJ = torch.bmm(Lam, J)
                G += J.reshape(-1, p).T @ LJ.reshape(-1, p)
        G /= self.problem.n
        return (G + G.T) / 2

    def _backpropagate(self, X: torch.Tensor, T: torch.Tensor):
        """(B, a, Λ) of one chunk: B[i, c] = ∂f_c(x_i)/∂z_i by C reverse passes to the layer
        output (made a leaf by a forward hook)."""
        captured: dict[str, torch.Tensor] = {}

        def hook(_m, inputs, output):
            if "z" in captured:
                raise KfacboundError(f"layer {self.label!r} is called more than once per "
                                     "forward pass (shared weights): no per-layer GGN block")
            captured["a"] = inputs[0].detach()
            captured["z"] = output.detach().requires_grad_(True)
            return captured["z"]
        h = self.module.register_forward_hook(hook)
        try:
            with torch.enable_grad():
                F = self.problem.model(X).reshape(len(X), -1)
                if "z" not in captured:
                    raise KfacboundError(f"layer {self.label!r} is not called in the forward "
                                         "pass")
                z = captured["z"]
                C = F.shape[1]
                B = torch.stack([torch.autograd.grad(F[:, c].sum(), z, retain_graph=c < C - 1)[0]
                                 .reshape(len(X), -1) for c in range(C)], 1)
        finally:
            h.remove()
        Lam = self.problem.loss_hessians(F.detach(), T).reshape(len(X), C, C)
        return B, captured["a"], Lam

    def matmat(self, V: torch.Tensor) -> torch.Tensor:
        """H_O,ll V for V (p,) or (p, k), in the problem's dtype and device."""
        V, vec = self.problem._as_matrix(V)
        out = torch.zeros_like(V)
        for j in range(V.shape[1]):
            # the layer is linear in W̃, so z = layer(a; M) is δz itself: one layer forward per
            # chunk, and its graph gives the weight gradient
            M = V[:, j].reshape(self.shape).detach().requires_grad_(True)
            acc = torch.zeros_like(M)
            for B, a, Lam in self._chunks:
                with torch.enable_grad():
                    z = self.fn(a, M)
                with torch.no_grad():
                    dz = z.detach().reshape(len(a), -1, 1)
                    w = torch.bmm(Lam, torch.bmm(B, dz))  # (N, C, 1)
                    g = torch.bmm(B.transpose(1, 2), w)  # (N, |z|, 1)
                acc += torch.autograd.grad(z, M, g.reshape(z.shape))[0]
            out[:, j] = acc.reshape(-1) / self.problem.n
        return out[:, 0] if vec else out


ROUTES = ("auto", "layer-ggn", "hvp")


def exact_block_operator(
    model: nn.Module,
    X: torch.Tensor,
    y: torch.Tensor,
    loss: str,
    layer: str,
    part: str = "H",
    *,
    batch_size: int | None = None,
    dtype=np.float64,
    device: str | torch.device | None = None,
    memory: int = LAYER_GGN_MEMORY,
    route: str = "auto",
) -> TorchOperator:
    """The exact block ``part`` ("H" or "H_O") of one layer as a p×p ``LinearOperator``.

    Routes (``op.route`` records the one taken):

    - "layer-ggn": :class:`LayerGGN`, for H_O, and for H where the functional part vanishes on
      the layer (:func:`~kfacbound.curvature.operators.functional_part_vanishes`), when its stored
      Jacobians fit in ``memory`` bytes;
    - "hvp" / "ggnvp": Hessian- (GGN-) vector products through the network (the gradient graph
      cached when it fits, :class:`~kfacbound.curvature.operators.CurvatureProblem`).

    ``route="auto"`` (default) takes "layer-ggn" for convolutions, where a network product
    also runs every layer above the block at every position (benchmarks/RESULTS.md, n = 2,000,
    float64, 1 thread: 6–21× fewer seconds per product on ResNet-8's layer2/layer3
    convolutions, 1.5–3× on LeNet-5's conv2, after a set-up of C reverse passes), and for
    Linear layers only when the network's gradient graph is too large to keep
    (``problem.cache_graph`` false): with the graph kept a Linear layer's product costs the
    same two GEMMs either way (0.7–1.1×), without it every network product rebuilds the graph.
    "layer-ggn" forces it where it is valid; "hvp" always multiplies through the network."""
    tdtype = operator_dtype(dtype)
    if part not in ("H", "H_O"):
        raise KfacboundError(f"part must be 'H' or 'H_O', not {part!r}")
    if route not in ROUTES:
        raise KfacboundError(f"route must be one of {', '.join(ROUTES)}, not {route!r}")
    problem = CurvatureProblem(model, X, y, loss, [layer], batch_size=batch_size, dtype=tdtype,
                               device=device)
    entry = problem.selection.entries[0]
    wanted = entry.kind == "layer" and (route == "layer-ggn" or (
        route == "auto" and (entry.rule.kind == "conv" or not problem.cache_graph)))
    if (wanted and LayerGGN.memory_bytes(problem, layer) <= memory
            and (part == "H_O" or functional_part_vanishes(problem))):
        try:
            ggn = LayerGGN(problem)
        except KfacboundError:  # shared or tied weights: products through the network
            pass
        else:
            problem.clear_graphs()  # (the network products' graphs, kept for the fallback)
            op = TorchOperator(ggn.matmat, problem.p, problem, dtype=dtype)
            op.route = "layer-ggn"
            return op
    op = TorchOperator(problem.hvp if part == "H" else problem.ggnvp, problem.p, problem,
                       dtype=dtype)
    op.route = "hvp" if part == "H" else "ggnvp"
    return op
