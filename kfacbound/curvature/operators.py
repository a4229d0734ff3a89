"""Matrix-free exact curvature: Hessian- and GGN-vector products of the mean loss over a dataset.

Objective: the empirical loss L̂(θ) = (1/n) Σ_i ℓ(f(x_i; θ), y_i) of a model in eval mode (BatchNorm
uses its running statistics, Dropout is off), with ``ℓ`` one of :mod:`kfacbound.losses` ("ce",
"bce", "mse" with ``reduction='mean'``). The data are processed in mini-batches; batch b contributes
(n_b / n) · (its own mean-loss curvature), so the result is exactly the full-dataset curvature.

- Hessian-vector product: H v = ∂/∂ε ∇L̂(θ + εv) |₀, forward-over-reverse (``torch.func.jvp`` of
  ``torch.func.grad``), vectorised over many vectors with ``torch.func.vmap``.
- GGN ("outer-product Hessian", H_O) vector product: H_O v = (1/n) Σ_i J_iᵀ Λ_i J_i v with J_i the
  Jacobian of the network output f(x_i) w.r.t. θ and Λ_i = ∂²ℓ_i/∂f² the per-example loss Hessian
  (cross-entropy diag(p) − ppᵀ; MSE (2/C)·I under torch's mean over the C outputs; logistic
  σ(1 − σ)). Computed as a Jacobian-vector product (forward mode), Λ, then a vector-Jacobian
  product (reverse mode).

Parameter selection and coordinates (:class:`ParameterSelection`): the whole network or any subset,
given as module paths and/or parameter names. A Linear/Conv2d module path selects the layer block in
the shared layout of :mod:`kfacbound.curvature.layout` (vec([W | b]) row-major); any other module
path selects its own parameters (e.g. BatchNorm γ then β), each flattened; a parameter name
(``"bn1.weight"``) selects that tensor alone, flattened in torch order. The whole network
(``params=None``) is every module with parameters in ``named_modules()`` order, each as above, so
every Linear/Conv2d appears as its layout block.

:func:`hessian_operator` and :func:`ggn_operator` wrap the products as
``scipy.sparse.linalg.LinearOperator`` (symmetric; float64 by default, float32 on request) for
Lanczos (:mod:`kfacbound.curvature.spectral`); :class:`CurvatureProblem` exposes the torch side,
which :mod:`kfacbound.curvature.exact` uses to build dense matrices.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from scipy.sparse.linalg import LinearOperator
from torch import nn
from torch.func import functional_call, grad, hessian, jacrev, jvp, vjp, vmap

from ..data import dataset_tensors as dataset_tensors  # re-export: its old home
from ..errors import KfacboundError
from ..losses import make_loss, prepare_targets
from .modules import CurvatureRule, rule_for

# Memory budget (bytes) for one vectorised chunk of products; sets the default chunk size.
CHUNK_MEMORY = 256 * 2**20
VMAP_MIN = 4  # fewer vectors than this: plain autograd (less overhead per call)
MAX_CHUNK = 256  # larger chunks were slower on CPU (measured for p = 3960, n = 100)
# Memory budget (bytes) for keeping the gradient graphs of all batches between Hessian-vector
# products (CurvatureProblem.cache_graph); above it each product rebuilds its batch's graph.
GRAPH_MEMORY = 2 * 2**30


def _functional_loss(name: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """``make_loss(name)``, except MSE written out as mean((f − y)²) (the same number).

    torch's fused ``mse_loss`` fails under forward-over-reverse differentiation in torch 2.13
    ("ZeroTensors are immutable"); the written-out form is the identical function.
    """
    if name == "mse":
        return lambda f, t: torch.mean((f - t) ** 2)
    return make_loss(name)


@dataclass
class _Entry:
    """One selected block: a layer in [W | b] layout, or plain parameters in torch order."""

    label: str  # module path or parameter name
    kind: str  # "layer" or "params"
    names: list[str]  # full parameter names covered (weight, bias order for layers)
    shapes: list[torch.Size]
    size: int
    offset: int = 0
    rule: CurvatureRule | None = None  # the layer's rule (its layout), for kind "layer"


class ParameterSelection:
    """Which parameters the curvature is taken with respect to, and their flat coordinates.

    ``params``: ``None`` (all), a module path / parameter name, or a sequence of them (in the order
    given). See the module docstring for the coordinates. ``slices`` maps each label to its range
    in the flat vector.
    """

    def __init__(self, model: nn.Module, params: str | Sequence[str] | None = None):
        modules = dict(model.named_modules())
        named = dict(model.named_parameters())
        if params is None:
            labels = [n for n, m in model.named_modules() if any(True for _ in
                                                                  m.parameters(recurse=False))]
        elif isinstance(params, str):
            labels = [params]
        else:
            labels = list(params)
        if not labels:
            raise KfacboundError("the parameter selection is empty")
        self.entries: list[_Entry] = []
        seen: set[str] = set()
        offset = 0
        for label in labels:
            if label in modules and label not in named:
                module = modules[label]
                own = [(f"{label}.{k}" if label else k, p)
                       for k, p in module.named_parameters(recurse=False)]
                rule = rule_for(module)
                if rule is not None and rule.curvature:
                    own = [(f"{label}.{k}" if label else k, p)
                           for k, p in rule.layer_params(module)]
                    kind = "layer"
                else:
                    rule, kind = None, "params"
                if not own:
                    raise KfacboundError(f"module {label!r} has no parameters of its own")
            elif label in named:
                own, kind, rule = [(label, named[label])], "params", None
            else:
                layers = [n for n, m in model.named_modules() if any(True for _ in
                                                                      m.parameters(recurse=False))]
                raise KfacboundError(
                    f"no module or parameter named {label!r}; modules with parameters: "
                    f"{', '.join(layers)}"
                )
            for name, _ in own:
                if name in seen:
                    raise KfacboundError(f"parameter {name!r} is selected twice")
                seen.add(name)
            size = sum(p.numel() for _, p in own)
            self.entries.append(_Entry(label, kind, [n for n, _ in own],
                                       [p.shape for _, p in own], size, offset, rule))
            offset += size
        self.size = offset
        self.names = seen

    @property
    def slices(self) -> dict[str, slice]:
        return {e.label: slice(e.offset, e.offset + e.size) for e in self.entries}

    def vector(self, model: nn.Module) -> torch.Tensor:
        """θ of ``model`` in these coordinates (detached copy)."""
        named = dict(model.named_parameters())
        parts = []
        for e in self.entries:
            tensors = [named[n].detach() for n in e.names]
            if e.kind == "layer":
                bias = tensors[1] if len(tensors) == 2 else None
                parts.append(e.rule.matrix(tensors[0], bias).reshape(-1))
            else:
                parts.extend(t.reshape(-1) for t in tensors)
        return torch.cat(parts).clone()

    def unflatten(self, theta: torch.Tensor) -> dict[str, torch.Tensor]:
        """Parameter tensors (full names) from a flat θ; differentiable, vmap-friendly."""
        out: dict[str, torch.Tensor] = {}
        for e in self.entries:
            chunk = theta[e.offset:e.offset + e.size]
            if e.kind == "layer":
                w, b = e.rule.split(chunk, e.shapes[0], len(e.names) == 2)
                out[e.names[0]] = w
                if b is not None:
                    out[e.names[1]] = b
            else:
                start = 0
                for name, shape in zip(e.names, e.shapes, strict=True):
                    k = math.prod(shape)
                    out[name] = chunk[start:start + k].reshape(shape)
                    start += k
        return out


class CurvatureProblem:
    """The mean loss of ``model`` on (X, y) as a function of a flat parameter vector θ.

    The model is deep-copied, cast to ``dtype`` (float64 by default) and put in eval mode; inputs
    are cast to ``dtype``. ``y`` holds integer labels (turned into targets by
    :func:`kfacbound.losses.prepare_targets`) or, for MSE, ready targets of shape (n, C).
    ``batch_size`` (default: all n at once) splits the data; ``chunk_size`` is how many vectors
    one vectorised product handles (default from a memory budget).

    Graph reuse (single products, e.g. Lanczos): with ``cache_graph=True`` the gradient graph
    of every batch is built once and each later ``hvp`` of fewer than VMAP_MIN vectors is one
    backward pass through it (about half the cost of rebuilding it). The default
    (``cache_graph=None``) caches when the estimate :meth:`graph_bytes` (≈ 3 activations per
    example and layer output, all n examples) fits under ``graph_memory`` bytes (default
    GRAPH_MEMORY = 2 GiB); a large dataset does not fit, and then every product rebuilds its
    batch's graph, holding one batch's graph at a time. Free the cache with :meth:`clear_graphs`.
    """

    def __init__(
        self,
        model: nn.Module,
        X: torch.Tensor,
        y: torch.Tensor,
        loss: str,
        params: str | Sequence[str] | None = None,
        *,
        batch_size: int | None = None,
        chunk_size: int | None = None,
        dtype: torch.dtype = torch.float64,
        device: str | torch.device | None = None,
        cache_graph: bool | None = None,
        graph_memory: int | None = None,
    ):
        if len(X) != len(y):
            raise KfacboundError(f"X has {len(X)} examples but y has {len(y)}")
        if len(X) == 0:
            raise KfacboundError("the dataset is empty")
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.dtype = dtype
        self.model = copy.deepcopy(model).to(device=self.device, dtype=dtype).eval()
        self.selection = ParameterSelection(self.model, params)
        self.p = self.selection.size
        self.theta = self.selection.vector(self.model)
        self.fixed = {n: p.detach() for n, p in self.model.named_parameters()
                      if n not in self.selection.names}
        self.buffers = {n: b for n, b in self.model.named_buffers()}
        self.loss_name = loss
        self.loss_fn = _functional_loss(loss)
        self.X = X.to(device=self.device, dtype=dtype)
        with torch.no_grad():
            out = self.model(self.X[:1])
        self.num_outputs = out.shape[-1] if out.ndim > 1 else 1
        self.targets = self._targets(y)
        self.n = len(self.X)
        self.batch_size = int(batch_size) if batch_size else self.n
        self._lambda_cache: dict[int, torch.Tensor] = {}
        # activation elements per example, for the chunk-size heuristic
        sizes: list[int] = []
        hooks = [m.register_forward_hook(lambda _m, _i, o: sizes.append(o[0].numel()))
                 for m in self.model.modules() if not list(m.children())]
        with torch.no_grad():
            self.model(self.X[:1])
        for h in hooks:
            h.remove()
        per_vector = 4 * (min(self.batch_size, self.n) * (sum(sizes) + self.num_outputs)
                          + self.p) * torch.finfo(dtype).bits // 8
        self._activation_elements = sum(sizes) + self.num_outputs
        self._itemsize = torch.finfo(dtype).bits // 8
        self._graphs: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.graph_memory = GRAPH_MEMORY if graph_memory is None else int(graph_memory)
        self.cache_graph = (self.graph_bytes() <= self.graph_memory if cache_graph is None
                            else bool(cache_graph))
        self.chunk_size = (int(chunk_size) if chunk_size
                           else max(1, min(MAX_CHUNK, CHUNK_MEMORY // per_vector)))

    def _targets(self, y: torch.Tensor) -> torch.Tensor:
        if self.loss_name == "mse" and y.is_floating_point() and y.ndim == 2:
            if y.shape[1] != self.num_outputs:
                raise KfacboundError(
                    f"MSE targets have {y.shape[1]} columns, the model {self.num_outputs} outputs"
                )
            t = y
        else:
            t = prepare_targets(self.loss_name, y, self.num_outputs)
        t = t.to(self.device)
        return t.to(self.dtype) if t.is_floating_point() else t

    # -- functions of θ ------------------------------------------------------------------------
    def forward(self, theta: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
        state = {**self.fixed, **self.buffers, **self.selection.unflatten(theta)}
        return functional_call(self.model, state, (X,))

    def batch_loss(self, theta: torch.Tensor, X: torch.Tensor, T: torch.Tensor) -> torch.Tensor:
        return self.loss_fn(self.forward(theta, X), T)

    def batches(self) -> list[tuple[torch.Tensor, torch.Tensor, float]]:
        """(X_b, T_b, n_b / n) for each mini-batch."""
        return [(self.X[i:i + self.batch_size], self.targets[i:i + self.batch_size],
                 len(self.X[i:i + self.batch_size]) / self.n)
                for i in range(0, self.n, self.batch_size)]

    def subset(self, idx: torch.Tensor) -> CurvatureProblem:
        """The same problem on the examples ``idx`` (the mean loss over them): shares the model,
        parameters, selection and ``cache_graph`` setting, with its own data, batches and
        caches."""
        sub = copy.copy(self)
        sub.X, sub.targets = self.X[idx], self.targets[idx]
        sub.n = len(sub.X)
        sub.batch_size = min(self.batch_size, sub.n)
        sub._lambda_cache, sub._graphs = {}, {}
        return sub

    def loss(self, theta: torch.Tensor | None = None) -> float:
        theta = self.theta if theta is None else theta
        with torch.no_grad():
            return float(sum(w * self.batch_loss(theta, X, T) for X, T, w in self.batches()))

    def loss_hessians(self, out: torch.Tensor, T: torch.Tensor) -> torch.Tensor:
        """Λ_i = ∂²ℓ(f_i, y_i)/∂f_i², shape (N, C, C), from the loss itself (torch.func.hessian)."""
        def single(f, t):
            return self.loss_fn(f[None], t[None])
        return vmap(hessian(single))(out.detach(), T)

    # -- products ------------------------------------------------------------------------------
    def _as_matrix(self, V: torch.Tensor) -> tuple[torch.Tensor, bool]:
        V = torch.as_tensor(V)
        vec = V.ndim == 1
        V = V.reshape(self.p, -1).to(device=self.device, dtype=self.dtype)
        return V, vec

    def _chunks(self, k: int) -> list[slice]:
        return [slice(i, min(k, i + self.chunk_size)) for i in range(0, k, self.chunk_size)]

    def hvp(self, V: torch.Tensor) -> torch.Tensor:
        """H V for V of shape (p,) or (p, k): Hessian of the mean loss.

        Few vectors (k < ``VMAP_MIN``, e.g. Lanczos matvecs): reverse-over-reverse autograd,
        H v = ∇(∇L·v), through the gradient graph of each batch, kept between calls when
        ``cache_graph`` (see the class docstring); many vectors: forward-over-reverse vectorised
        with vmap."""
        V, vec = self._as_matrix(V)
        out = torch.zeros_like(V)
        theta = self.theta
        for b, (X, T, w) in enumerate(self.batches()):
            if V.shape[1] < VMAP_MIN:
                with torch.enable_grad():
                    t, g, keep = self._grad_graph(b, X, T)
                    for j in range(V.shape[1]):
                        out[:, j] += w * torch.autograd.grad(
                            g, t, V[:, j], retain_graph=keep or j < V.shape[1] - 1)[0]
                continue
            gfun = grad(lambda t, X=X, T=T: self.batch_loss(t, X, T))

            def one(v, gfun=gfun):
                return jvp(gfun, (theta,), (v,))[1]
            for s in self._chunks(V.shape[1]):
                out[:, s] += w * vmap(one)(V[:, s].T.contiguous()).T
        return out[:, 0] if vec else out

    def graph_bytes(self) -> int:
        """Estimated memory of the gradient graphs of all batches kept by :meth:`hvp`: about
        three float tensors per activation element (saved inputs, outputs and the first
        backward's intermediates) for each of the n examples, plus 4 p-vectors."""
        return (3 * self.n * self._activation_elements + 4 * self.p) * self._itemsize

    def _grad_graph(self, b: int, X: torch.Tensor, T: torch.Tensor):
        """(θ leaf, ∇L_b(θ) with its graph, keep) for batch ``b``.

        With ``cache_graph`` (default: when :meth:`graph_bytes` ≤ ``graph_memory``) the gradient
        graph of each batch is built once (``create_graph=True``) and kept, so every later
        Hessian-vector product is one backward pass of ∇L_b·v through it (``retain_graph``), as
        PyHessian does; otherwise it is rebuilt per call and freed after the last product."""
        if b in self._graphs:
            return (*self._graphs[b], True)
        t = self.theta.detach().requires_grad_(True)
        g = torch.autograd.grad(self.batch_loss(t, X, T), t, create_graph=True)[0]
        if self.cache_graph:
            self._graphs[b] = (t, g)
        return t, g, self.cache_graph

    def clear_graphs(self) -> None:
        """Free the cached gradient graphs."""
        self._graphs.clear()

    def _lambda(self, b: int, F: torch.Tensor, T: torch.Tensor) -> torch.Tensor:
        """Λ of batch ``b`` (cached: θ is fixed), shape (N, C, C)."""
        if b not in self._lambda_cache:
            self._lambda_cache[b] = self.loss_hessians(F, T).reshape(F.shape[0], -1,
                                                                      self.num_outputs)
        return self._lambda_cache[b]

    def ggnvp(self, V: torch.Tensor) -> torch.Tensor:
        """H_O V = (1/n) Σ_i J_iᵀ Λ_i J_i V for V of shape (p,) or (p, k).

        Few vectors: J v by the double-vjp trick (two reverse passes), then Jᵀ(Λ J v); many
        vectors: forward-mode J v and reverse-mode Jᵀ, vectorised with vmap."""
        V, vec = self._as_matrix(V)
        out = torch.zeros_like(V)
        theta = self.theta
        for b, (X, T, _) in enumerate(self.batches()):
            if V.shape[1] < VMAP_MIN:
                t = theta.detach().requires_grad_(True)
                with torch.enable_grad():
                    F = self.forward(t, X)
                    Lam = self._lambda(b, F.detach(), T)
                    dummy = torch.zeros_like(F, requires_grad=True)
                    u = torch.autograd.grad(F, t, dummy, create_graph=True)[0]
                    for j in range(V.shape[1]):
                        Jv = torch.autograd.grad(u, dummy, V[:, j], retain_graph=True)[0]
                        LJv = torch.einsum("ncd,nd->nc", Lam, Jv.reshape(len(X), -1))
                        out[:, j] += torch.autograd.grad(
                            F, t, LJv.reshape(F.shape), retain_graph=True)[0] / self.n
                continue

            def f(t, X=X):
                return self.forward(t, X)
            F, vjp_fn = vjp(f, theta)
            Lam = self._lambda(b, F.detach(), T)

            def one(v, f=f, Lam=Lam, vjp_fn=vjp_fn, F=F):
                Jv = jvp(f, (theta,), (v,))[1].reshape(Lam.shape[0], -1)
                u = torch.einsum("ncd,nd->nc", Lam, Jv).reshape(F.shape)
                return vjp_fn(u)[0]
            for s in self._chunks(V.shape[1]):
                out[:, s] += vmap(one)(V[:, s].T.contiguous()).T / self.n
        return out[:, 0] if vec else out

    def jacobian(self, X: torch.Tensor) -> torch.Tensor:
        """J of the outputs on X w.r.t. θ, shape (N, C, p).

        Per example (the model is in eval mode, so output i depends on example i alone):
        ``vmap`` over examples of ``jacrev`` of the one-example output, C reverse passes
        vectorised over examples, in chunks of examples holding about CHUNK_MEMORY bytes of J.
        That costs about C backward passes of the batch, against N·C (or p) batch passes for
        rows (columns) of the batch Jacobian, which :meth:`batch_jacobian` forms and this falls
        back to when the model cannot be vmapped over examples."""
        theta = self.theta

        def single(t, x):
            return self.forward(t, x[None]).reshape(-1)
        N, step = len(X), self.jacobian_chunk()
        try:
            per_example = vmap(jacrev(single), in_dims=(None, 0))
            return torch.cat([per_example(theta, X[i:i + step]) for i in range(0, N, step)])
        except RuntimeError:  # e.g. an operation without a batching rule: batch passes
            return self.batch_jacobian(X)

    def jacobian_chunk(self) -> int:
        """Examples per chunk of per-example Jacobians: about CHUNK_MEMORY bytes of J."""
        return max(1, CHUNK_MEMORY // max(1, self.num_outputs * self.p * self._itemsize))

    def batch_jacobian(self, X: torch.Tensor) -> torch.Tensor:
        """J of the outputs on X w.r.t. θ, shape (N, C, p), from the batch function: N·C
        reverse passes or p forward passes (the fewer), vectorised with vmap. Exact for any
        model, also one whose examples interact; :meth:`jacobian` is faster when they don't."""
        theta = self.theta

        def f(t):
            return self.forward(t, X).reshape(len(X), -1)
        N, C = len(X), self.num_outputs
        if N * C <= self.p:
            _, vjp_fn = vjp(f, theta)
            eye = torch.eye(N * C, device=self.device, dtype=self.dtype).reshape(-1, N, C)
            rows = [vmap(vjp_fn)(eye[s])[0] for s in self._chunks(N * C)]
            return torch.cat(rows).reshape(N, C, self.p)
        eye = torch.eye(self.p, device=self.device, dtype=self.dtype)
        cols = [vmap(lambda v: jvp(f, (theta,), (v,))[1])(eye[s]) for s in self._chunks(self.p)]
        return torch.cat(cols).permute(1, 2, 0)


PROBE_EXAMPLES = 128  # examples the functional-part test runs on (a seeded random subset)


def functional_part_vanishes(problem: CurvatureProblem, probes: int = 2, seed: int = 0,
                             rtol: float | None = None,
                             max_examples: int | None = PROBE_EXAMPLES) -> bool:
    """Whether H_F = H − H_O is zero on the selected block, tested with Gaussian probes v:
    ‖(H − H_O) v‖ ≤ rtol · ‖H v‖ for every probe (rtol default √eps of the dtype: 1.5e-8 in
    float64). A non-zero H_F is found with probability 1 (M v = 0 has measure zero for M ≠ 0),
    so a pass means H_F is zero up to rtol.

    The test runs on a seeded random subset of ``max_examples`` examples (all when None or
    when n is smaller): H_F = (1/n) Σ_i H_F,i vanishes example by example where it vanishes at
    all (the piecewise-linear maps below), and a smooth nonlinearity above the layer (tanh,
    sigmoid, GELU, softplus) makes H_F,i ≠ 0 for almost every example, so the subset decides
    as the full set would at a fraction of its cost (four network products on 128 examples
    instead of on n; the probes were half of a structure job's time at n = 1,000). This is a
    heuristic: a network whose functional part lives on a few examples only (an activation
    curved on a narrow interval, a smooth branch that a ReLU gates off for most inputs, MSE
    with most residuals exactly zero) could pass on the subset and not on all n; pass
    ``max_examples=None`` to test on every example.

    Why it pays: for networks that are piecewise linear in their parameters one layer at a time
    — ReLU/max-pool/affine layers, eval-mode BatchNorm, residual additions — the output is
    piecewise linear in a single layer's [W | b] (z = W̃x̃ enters a piecewise-linear map), so
    ∂²f/∂W̃² = 0 almost everywhere and the layer's diagonal block of H equals its GGN block
    (Singh, Bachmann & Hofmann 2021; Wu et al., "Dissecting Hessian"). H_O then comes from
    per-example Jacobians, C backward passes, instead of p Hessian-vector products. Cross-layer
    blocks and layers followed by smooth activations (tanh, GELU, …) fail the test and take the
    Hessian-vector-product route."""
    if rtol is None:
        rtol = float(torch.finfo(problem.dtype).eps) ** 0.5
    gen = torch.Generator().manual_seed(seed)
    if max_examples is not None and problem.n > max_examples:
        idx = torch.randperm(problem.n, generator=gen)[:max_examples].sort().values
        problem = problem.subset(idx.to(problem.X.device))
    V = torch.randn(problem.p, probes, generator=gen, dtype=problem.dtype).to(problem.device)
    HV = torch.stack([problem.hvp(V[:, j]) for j in range(probes)], 1)
    GV = torch.stack([problem.ggnvp(V[:, j]) for j in range(probes)], 1)
    num = torch.linalg.vector_norm(HV - GV, dim=0)
    den = torch.linalg.vector_norm(HV, dim=0)
    return bool(torch.all(num <= rtol * den))


class TorchOperator(LinearOperator):
    """A symmetric ``LinearOperator`` around a torch product ``apply(V: (p, k)) -> (p, k)``."""

    def __init__(self, apply: Callable[[torch.Tensor], torch.Tensor], p: int,
                 problem: CurvatureProblem | None = None, dtype=np.float64):
        super().__init__(dtype=np.dtype(dtype), shape=(p, p))
        self.apply_torch = apply
        self.problem = problem
        self.num_products = 0
        self.route = ""  # how products are formed, where a builder records it

    def _matmat(self, X):
        V = torch.as_tensor(np.ascontiguousarray(X))
        self.num_products += V.shape[1] if V.ndim == 2 else 1
        out = self.apply_torch(V)
        return out.detach().cpu().numpy().astype(self.dtype, copy=False)

    def _matvec(self, x):
        return self._matmat(np.asarray(x).reshape(-1, 1)).reshape(-1)

    def _adjoint(self):
        return self

    def _rmatvec(self, x):
        return self._matvec(x)


def operator_dtype(dtype) -> torch.dtype:
    """The torch dtype of an operator dtype (NumPy float64 or float32); KfacboundError else."""
    tdtype = {np.dtype(np.float64): torch.float64, np.dtype(np.float32): torch.float32}.get(
        np.dtype(dtype))
    if tdtype is None:
        raise KfacboundError("operator dtype must be float64 or float32")
    return tdtype


def _operator(kind: str, model, X, y, loss, params, batch_size, dtype, device, chunk_size,
              cache_graph=None, graph_memory=None):
    tdtype = operator_dtype(dtype)
    problem = CurvatureProblem(model, X, y, loss, params, batch_size=batch_size,
                               chunk_size=chunk_size, dtype=tdtype, device=device,
                               cache_graph=cache_graph, graph_memory=graph_memory)
    apply = problem.hvp if kind == "H" else problem.ggnvp
    return TorchOperator(apply, problem.p, problem, dtype=dtype)


def hessian_operator(
    model: nn.Module,
    X: torch.Tensor,
    y: torch.Tensor,
    loss: str,
    params: str | Sequence[str] | None = None,
    *,
    batch_size: int | None = None,
    dtype=np.float64,
    device: str | torch.device | None = None,
    chunk_size: int | None = None,
    cache_graph: bool | None = None,
    graph_memory: int | None = None,
) -> TorchOperator:
    """H of the mean loss (θ selected by ``params``) as a p×p ``LinearOperator``.

    ``cache_graph`` / ``graph_memory``: keep each batch's gradient graph between products
    (default: when it fits in ``graph_memory`` bytes, GRAPH_MEMORY = 2 GiB; see
    :class:`CurvatureProblem`). ``op.problem.clear_graphs()`` frees it."""
    return _operator("H", model, X, y, loss, params, batch_size, dtype, device, chunk_size,
                     cache_graph, graph_memory)


def ggn_operator(
    model: nn.Module,
    X: torch.Tensor,
    y: torch.Tensor,
    loss: str,
    params: str | Sequence[str] | None = None,
    *,
    batch_size: int | None = None,
    dtype=np.float64,
    device: str | torch.device | None = None,
    chunk_size: int | None = None,
) -> TorchOperator:
    """The GGN H_O = (1/n) Σ J_iᵀ Λ_i J_i of the mean loss as a p×p ``LinearOperator``."""
    return _operator("GGN", model, X, y, loss, params, batch_size, dtype, device, chunk_size)
