"""One rule per module type: everything kfacbound knows about a kind of module, in one map.

BackPACK keeps one module extension per module type in one map; kfacbound does the same for the
whole code base. K-FAC (native hooks and the BackPACK backend), the layout of layer blocks, the
exact curvature's parameter selection, BatchNorm folding, the analyses and the posteriors'
sampled forward ask :func:`rule_for` about a module instead of testing its type themselves.
Adding a module type is one :func:`register_module_rule` call (for a built-in type: one entry at
the end of this file) plus one reference case in ``tests/conftest.py``.

:func:`rule_for` walks the module's MRO, so a subclass of a registered type gets its base's
rule unless it has one of its own (a subclass that changes what the layer computes must register
its own rule). The rules (frozen dataclasses):

- :class:`ModuleRule`: a parameter-free module (activation, pooling, Flatten, Dropout,
  Identity). The native backend and the exact curvature differentiate through it with autograd.
- :class:`ContainerRule` (nn.Sequential): only composes its children.
- :class:`CurvatureRule` — :class:`LinearRule`, :class:`ConvRule` (Conv2d built in; any number
  of spatial dimensions): a layer z = W a + b (conv: at every output position) that carries a
  K-FAC block G ⊗ Ã, a block of the exact curvature and a posterior.
- :class:`BatchNormRule` (BatchNorm1d/2d in eval mode): y = s ⊙ (x − μ) + β,
  s = γ/√(σ² + ε) per channel. Folded into the preceding layer for the posteriors; K-FAC gives
  its γ, β the exact GGN diagonal and passes square roots through it as a scaling by s.

Conventions of a curvature layer (shared with :mod:`.layout`):

- Parameters: W̃ = [W | b], out × (D + 1), with D = in_features (Linear) or
  in_channels·∏kernel_size (conv), the columns ordered like ``weight.reshape(out, -1)``
  (W̃ = W without a bias); the layer's parameter vector is vec(W̃) row-major.
- Input rows (:meth:`CurvatureRule.unfold`): u_{i,t} ∈ R^D for example i and output position t
  (T positions) with z_{i,:,t} = W u_{i,t} + b. Linear: T = 1 and u = a. Conv, KFC "expand"
  (Grosse & Martens 2016, eq. 32): u_{i,t} is the zero-padded input patch position t sees.
  ã = [u; 1] with a bias, else ã = u (:meth:`CurvatureRule.rows`).
- K-FAC factors of the mean loss over n examples, for square-root columns v backpropagated to
  the output, γ_{i,v,t} ∈ R^out (:meth:`CurvatureRule.output_rows` gives them as [B, out, T]):
  Ã = (1/(n T)) Σ_{i,t} ã ãᵀ and G = (1/n) Σ_{i,v,t} γ γᵀ. :meth:`CurvatureRule.input_factor`
  and :meth:`CurvatureRule.output_factor` add the sums (n T Ã and n G) into an accumulator.
- Functional forward (:meth:`CurvatureRule.function`): z = layer(a; W̃) for any W̃, detached
  from the module's own parameters (what the posteriors sample), with one W̃ for the batch or
  one per example.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UnsupportedModuleError
from . import factors

BUILTIN = "builtin"  # ModuleRule.backpack: BackPACK's own module extension handles the type


def describe(path: str, module: nn.Module) -> str:
    """How messages name a module: ``module 'path' (Type)``, ``<root>`` for the model itself."""
    return f"module {path or '<root>'!r} ({type(module).__name__})"


def unsupported(path: str, module: nn.Module, reason: str) -> UnsupportedModuleError:
    """The one-line error for a module kfacbound cannot handle: :func:`describe` + ``reason``
    (which starts with ": " or " is ...")."""
    return UnsupportedModuleError(f"{describe(path, module)}{reason}")


def append_one(u: torch.Tensor, bias: bool) -> torch.Tensor:
    """ã = [u; 1] along the last dimension (homogeneous coordinates) when ``bias``, else u."""
    return torch.cat([u, u.new_ones(*u.shape[:-1], 1)], dim=-1) if bias else u


# ---------------------------------------------------------------------------- rules
@dataclass(frozen=True)
class ModuleRule:
    """What kfacbound knows about one module type. This base rule: a parameter-free map that
    every part of kfacbound differentiates through (activation, pooling, Flatten, Dropout, …).

    ``backpack`` says how the BackPACK backend of K-FAC handles the type: ``"builtin"``
    (BackPACK's own module extension), ``None`` (no rule there: native backend only) or
    ``"package.module:Class"``, a module extension class that :mod:`.kfac_backpack` registers
    (for a curvature layer: BackPACK's HBP class of the layer, which it wraps so that it returns
    kfacbound's factors). BackPACK looks extensions up by the exact type, so its backend needs
    a rule registered for the module's own type.
    """

    backpack: str | None = BUILTIN

    curvature: ClassVar[bool] = False  # carries a K-FAC block / layer block / posterior
    batchnorm: ClassVar[bool] = False
    container: ClassVar[bool] = False
    kind: ClassVar[str] = "passive"

    def check(self, module: nn.Module, path: str) -> None:
        """Raise :func:`unsupported` when K-FAC cannot handle this module's configuration."""


@dataclass(frozen=True)
class ContainerRule(ModuleRule):
    """A container that only runs its children (nn.Sequential)."""

    container: ClassVar[bool] = True
    kind: ClassVar[str] = "container"


@dataclass(frozen=True, eq=False)
class LayerFunction:
    """z = layer(a; W̃) of one layer for any matrix W̃ (out × (D + 1)), detached from the
    module's parameters: what a posterior samples. Built by :meth:`CurvatureRule.function`.

    ``options``: the static arguments of the functional call (conv: stride, padding, dilation,
    groups); ``kind``: the rule's kind ("linear": a matrix product per example, sampled by local
    reparameterisation; "conv": a kernel shared over positions, sampled per example).
    """

    rule: CurvatureRule
    weight_shape: tuple[int, ...]
    bias: bool
    options: dict[str, Any]

    @property
    def kind(self) -> str:
        return self.rule.kind

    def __call__(self, a: torch.Tensor, mat: torch.Tensor) -> torch.Tensor:
        """The layer with the weights W̃ = ``mat`` for the whole batch ``a``."""
        return self.rule.forward(self, a, mat)

    def per_example(self, a: torch.Tensor, mats: torch.Tensor) -> torch.Tensor:
        """The layer with its own weights ``mats[i]`` (B × out × (D + 1)) for example ``a[i]``."""
        return self.rule.forward_per_example(self, a, mats)

    def rows(self, a: torch.Tensor) -> torch.Tensor:
        """ã = [a; 1] (B × (D + 1)) of a linear-kind layer's 2-D input: z = W̃ ã per row."""
        return append_one(a, self.bias)

    def split(self, mat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(W, b) from W̃ [..., out, D + 1]: the last column is b when the layer has a bias."""
        return (mat[..., :-1], mat[..., -1]) if self.bias else (mat, None)


@dataclass(frozen=True)
class CurvatureRule(ModuleRule):
    """A layer z = W ã per output position with parameters ``weight`` (out × …) and ``bias``
    (out or None); see the module docstring for W̃, the input rows and the factors.

    Layout, bias folding and the generic factor accumulation are implemented here; a subclass
    gives :meth:`unfold`, :meth:`output_rows`, :meth:`options`, :meth:`forward` and
    :meth:`forward_per_example` (and may override the factor methods with faster paths).
    """

    curvature: ClassVar[bool] = True
    kind: ClassVar[str] = "layer"
    # backpropagate all square-root columns in one vmapped backward (kfac._use_batched)
    batched_columns: ClassVar[bool] = False

    # -- layout vec(W̃) ----------------------------------------------------------------------
    def layer_params(self, module: nn.Module) -> list[tuple[str, torch.Tensor]]:
        """(name, tensor) of the parameters W̃ is made of, weight first."""
        own = [("weight", module.weight)]
        if module.bias is not None:
            own.append(("bias", module.bias))
        return own

    def matrix(self, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """W̃ = [W | b] (out × (D + 1)) from tensors in torch shapes (a view without a bias)."""
        w = weight.reshape(weight.shape[0], -1)
        return w if bias is None else torch.cat([w, bias.reshape(-1, 1)], dim=1)

    def split(self, mat: torch.Tensor, weight_shape: tuple[int, ...] | torch.Size,
              bias: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(W, b or None) in torch shapes from W̃ or vec(W̃) (differentiable, vmap-friendly)."""
        mat = mat.reshape(weight_shape[0], -1)
        n_w = math.prod(weight_shape[1:])
        return mat[:, :n_w].reshape(weight_shape), (mat[:, n_w] if bias else None)

    def layer_matrix(self, module: nn.Module) -> torch.Tensor:
        """W̃ of the module (a copy)."""
        mat = self.matrix(module.weight, module.bias)
        return mat.clone() if module.bias is None else mat

    def set_layer_matrix(self, module: nn.Module, mat: torch.Tensor) -> None:
        """Write W̃ (or vec(W̃)) into the module's weight and bias."""
        with torch.no_grad():
            w, b = self.split(mat, module.weight.shape, module.bias is not None)
            module.weight.copy_(w)
            if b is not None:
                module.bias.copy_(b)

    def layer_size(self, module: nn.Module) -> int:
        """Number of entries of W̃."""
        return sum(p.numel() for _, p in self.layer_params(module))

    def torch_to_layout_index(self, module: nn.Module) -> torch.Tensor:
        """``idx`` with ``torch.cat([W.flatten(), b])[idx] == vec(W̃)``."""
        out = module.weight.shape[0]
        n_w = module.weight[0].numel()
        w_idx = torch.arange(out * n_w).reshape(out, n_w)
        if module.bias is None:
            return w_idx.reshape(-1)
        b_idx = out * n_w + torch.arange(out).reshape(out, 1)
        return torch.cat([w_idx, b_idx], dim=1).reshape(-1)

    def with_bias(self, module: nn.Module) -> nn.Module:
        """A copy of the layer with a bias (zero if it had none), for BatchNorm folding."""
        raise NotImplementedError(f"{type(self).__name__} cannot add a bias to a layer")

    # -- input rows and factors -------------------------------------------------------------
    def unfold(self, module: nn.Module, a: torch.Tensor) -> torch.Tensor:
        """The input rows u [N, T, D] of the layer input ``a`` (see the module docstring)."""
        raise NotImplementedError

    def rows(self, module: nn.Module, a: torch.Tensor) -> torch.Tensor:
        """ã [N, T, D + 1] (with a bias) or u [N, T, D]: the rows whose Gram matrix is n T Ã."""
        return append_one(self.unfold(module, a), module.bias is not None)

    def output_rows(self, module: nn.Module, grads: torch.Tensor) -> torch.Tensor:
        """Backpropagated columns at the layer output, [V, N, out, *positions] (native and
        BackPACK layout), as [V·N, out, T]: G's sum runs over the first and last index."""
        raise NotImplementedError

    def input_factor(self, module: nn.Module, a: torch.Tensor,
                     out: torch.Tensor | None = None, *, upper: bool = False) -> torch.Tensor:
        """``out`` += Σ_i (1/T) Σ_t ã_{i,t} ã_{i,t}ᵀ over the batch ``a`` (float64 unless given).

        ``upper=True``: only the upper triangle of ``out`` is updated (see
        :func:`~.factors.gram_upper_`), for sums completed once by
        :func:`~.factors.symmetrize_upper_`; the same holds for :meth:`output_factor`."""
        r = self.rows(module, a.detach())
        N, T, D = r.shape
        if out is None:
            out = torch.zeros(D, D, dtype=torch.float64, device=a.device)
        return factors.add_gram(out, r.reshape(N * T, D), alpha=1.0 / T, upper=upper)

    def output_factor(self, module: nn.Module, grads: torch.Tensor,
                      out: torch.Tensor | None = None, *, upper: bool = False) -> torch.Tensor:
        """``out`` += Σ_{v,i,t} γ γᵀ for the columns ``grads`` [V, N, out, *positions]."""
        g = self.output_rows(module, grads.detach())
        if out is None:
            out = torch.zeros(g.shape[1], g.shape[1], dtype=torch.float64, device=g.device)
        return factors.conv_gram(out, g, upper=upper)

    def batch_average_G(self, module: nn.Module, M: torch.Tensor) -> torch.Tensor:
        """G from KFRA's batch-averaged output Hessian M [out·T, out·T] (channel-major):
        G[o, o'] = Σ_t M[(o, t), (o', t)]."""
        C = module.weight.shape[0]
        T = M.shape[0] // C
        return M.reshape(C, T, C, T).diagonal(dim1=1, dim2=3).sum(-1)

    # -- functional forward -----------------------------------------------------------------
    def options(self, module: nn.Module) -> dict[str, Any]:
        """Static keyword arguments of the functional forward; raises UnsupportedModuleError
        for configurations it cannot express."""
        return {}

    def function(self, module: nn.Module) -> LayerFunction:
        """The layer as a function of W̃ (see :class:`LayerFunction`)."""
        return LayerFunction(self, tuple(module.weight.shape), module.bias is not None,
                             self.options(module))

    def forward(self, fn: LayerFunction, a: torch.Tensor, mat: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward_per_example(self, fn: LayerFunction, a: torch.Tensor,
                            mats: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} has no per-example forward")


@dataclass(frozen=True)
class LinearRule(CurvatureRule):
    """nn.Linear: z = W a + b on [N, in] inputs, T = 1."""

    backpack: str | None = "backpack.extensions.secondorder.hbp.linear:HBPLinear"
    kind: ClassVar[str] = "linear"

    def with_bias(self, module: nn.Module) -> nn.Module:
        if module.bias is not None:
            return copy.deepcopy(module)
        new = nn.Linear(module.in_features, module.out_features, bias=True)
        return _with_zero_bias(new, module)

    def unfold(self, module: nn.Module, a: torch.Tensor) -> torch.Tensor:
        return a.reshape(a.shape[0], 1, -1)

    def output_rows(self, module: nn.Module, grads: torch.Tensor) -> torch.Tensor:
        return grads.reshape(-1, grads.shape[-1])[:, :, None]

    def input_factor(self, module: nn.Module, a: torch.Tensor,
                     out: torch.Tensor | None = None, *, upper: bool = False) -> torch.Tensor:
        """Σ ã ãᵀ without forming ã: one half-flop Gram product of the inputs
        (:func:`~.factors.add_gram`, in the input's dtype) and their sum for the bias row."""
        u = a.detach().reshape(a.shape[0], -1)
        d = u.shape[1]
        if out is None:
            out = factors.new_acc(d + int(module.bias is not None), u)
        factors.add_gram(out[:d, :d], u, upper=upper)
        if module.bias is not None:
            s = u.sum(0)
            out[:d, d] += s
            out[d, :d] += s
            out[d, d] += u.shape[0]
        return out

    def output_factor(self, module: nn.Module, grads: torch.Tensor,
                      out: torch.Tensor | None = None, *, upper: bool = False) -> torch.Tensor:
        """One half-flop Gram product of the [V·N, out] columns in their dtype."""
        g = grads.detach().reshape(-1, grads.shape[-1])
        if out is None:
            out = factors.new_acc(g.shape[1], g)
        return factors.add_gram(out, g, upper=upper)

    def batch_average_G(self, module: nn.Module, M: torch.Tensor) -> torch.Tensor:
        return M

    def forward(self, fn: LayerFunction, a: torch.Tensor, mat: torch.Tensor) -> torch.Tensor:
        w, b = fn.split(mat)
        return F.linear(a, w, b)


@dataclass(frozen=True)
class ConvRule(CurvatureRule):
    """nn.Conv{dims}d with groups = 1 and zero padding given as integers; ``conv`` is the
    functional convolution (F.conv2d). Unfolding follows the KFC "expand" convention.
    ``backpack`` left at "builtin" means BackPACK's HBPConv{dims}d (wrapped by
    :mod:`.kfac_backpack`)."""

    dims: int = 2
    conv: Callable[..., torch.Tensor] = F.conv2d
    kind: ClassVar[str] = "conv"
    batched_columns: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if self.backpack == BUILTIN:
            hbp = f"backpack.extensions.secondorder.hbp.conv{self.dims}d:HBPConv{self.dims}d"
            object.__setattr__(self, "backpack", hbp)

    def check(self, module: nn.Module, path: str) -> None:
        if module.groups != 1 or module.padding_mode != "zeros" or isinstance(module.padding,
                                                                               str):
            raise unsupported(path, module, ": only groups=1, padding_mode='zeros' and integer "
                                            "padding are supported")

    def with_bias(self, module: nn.Module) -> nn.Module:
        if module.bias is not None:
            return copy.deepcopy(module)
        cls = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[self.dims]
        new = cls(module.in_channels, module.out_channels, module.kernel_size,
                  stride=module.stride, padding=module.padding, dilation=module.dilation,
                  groups=module.groups, bias=True)
        return _with_zero_bias(new, module)

    @staticmethod
    def pad_input(module: nn.Module, a: torch.Tensor) -> torch.Tensor:
        """The layer input with the convolution's zero padding applied (``a`` itself without)."""
        pad = [p for p in reversed(module.padding) for _ in (0, 1)]
        return F.pad(a, pad) if any(pad) else a

    def patch_view(self, module: nn.Module, a: torch.Tensor, *,
                   padded: bool = False) -> torch.Tensor:
        """The input patches as a strided view [C_in, *kernel, N, *out_positions] (no copy
        beyond the zero padding; ``padded``: ``a`` is already :meth:`pad_input`'s result); in
        2-D entry (c, i, j, n, p, q) is x_pad[n, c, p·s_h + i·d_h, q·s_w + j·d_w], i.e.
        ``F.unfold(a)`` [N, D, T] with D = (c, i, j) in ``weight.reshape(out, -1)`` order."""
        xp = a if padded else self.pad_input(module, a)
        N, C, *size = xp.shape
        k, s, d = module.kernel_size, module.stride, module.dilation
        out = [(L - dd * (kk - 1) - 1) // ss + 1 for L, kk, ss, dd in zip(size, k, s, d,
                                                                           strict=True)]
        sN, sC, *sp = xp.stride()
        return xp.as_strided((C, *k, N, *out),
                             (sC, *(x * dd for x, dd in zip(sp, d, strict=True)), sN,
                              *(x * ss for x, ss in zip(sp, s, strict=True))),
                             xp.storage_offset())

    def unfold(self, module: nn.Module, a: torch.Tensor) -> torch.Tensor:
        view = self.patch_view(module, a)
        nd = self.dims
        N = view.shape[1 + nd]
        perm = (*range(1 + nd, 2 + 2 * nd), *range(1 + nd))
        return view.permute(perm).reshape(N, math.prod(view.shape[2 + nd:]),
                                          math.prod(view.shape[:1 + nd]))

    def output_rows(self, module: nn.Module, grads: torch.Tensor) -> torch.Tensor:
        return grads.reshape(grads.shape[0] * grads.shape[1], grads.shape[2], -1)

    def input_factor(self, module: nn.Module, a: torch.Tensor,
                     out: torch.Tensor | None = None, *, upper: bool = False) -> torch.Tensor:
        """``out`` (float64) += (1/T) Σ_{i,t} ũ ũᵀ for the patches ũ = [u; 1].

        Kernels of 16 taps or more at stride and dilation 1 (LeNet-5's 5×5 layers) take the
        correlation form, :func:`~.factors.patch_gram_correlation` (no patches formed), when
        :func:`~.factors.correlation_pays`. Otherwise chunks of b examples (b·T ≈ GRAM_CHUNK
        rows) of the strided :meth:`patch_view` are copied straight into a [D, b·T] matrix
        (3–5× faster than ``F.unfold`` followed by a transposed copy, measured on LeNet-5's
        layers), whose Gram product is formed in the input's dtype by
        :func:`~.factors.gram_upper_` and added into the float64 accumulator.
        """
        xp = self.pad_input(module, a.detach())  # padded once, for either route
        view = self.patch_view(module, xp, padded=True)
        nd = self.dims
        N = view.shape[1 + nd]
        D, T = math.prod(view.shape[:1 + nd]), math.prod(view.shape[2 + nd:])
        size = D + int(module.bias is not None)
        if out is None:
            out = torch.zeros(size, size, dtype=torch.float64, device=a.device)
        if factors.correlation_pays(xp.shape[1], module.kernel_size, module.stride,
                                    module.dilation, tuple(xp.shape[2:]), xp.element_size()):
            return out.add_(factors.patch_gram_correlation(
                xp, module.kernel_size, module.bias is not None), alpha=1.0 / T)
        step = max(1, factors.GRAM_CHUNK // T)
        tmp = torch.zeros(D, D, dtype=a.dtype, device=a.device)
        lead = (slice(None),) * (1 + nd)
        for start in range(0, N, step):
            c = view[(*lead, slice(start, start + step))].reshape(D, -1)
            if start:
                tmp.zero_()
            out[:D, :D].add_(factors.gram_upper_(tmp, c.T, upper=upper), alpha=1.0 / T)
            if module.bias is not None:
                s = c.sum(1).to(torch.float64) / T
                out[:D, D] += s
                out[D, :D] += s
        if module.bias is not None:
            out[D, D] += N
        return out

    def options(self, module: nn.Module) -> dict[str, Any]:
        if module.groups != 1:
            raise UnsupportedModuleError("grouped convolutions are not supported")
        if module.padding_mode != "zeros":
            raise UnsupportedModuleError("only zero padding is supported")
        return {"stride": module.stride, "padding": module.padding,
                "dilation": module.dilation, "groups": module.groups}

    def forward(self, fn: LayerFunction, a: torch.Tensor, mat: torch.Tensor) -> torch.Tensor:
        w, b = fn.split(mat)
        return self.conv(a, w.reshape(fn.weight_shape), b, **fn.options)

    def forward_per_example(self, fn: LayerFunction, a: torch.Tensor,
                            mats: torch.Tensor) -> torch.Tensor:
        """One kernel per example as a single grouped convolution (groups = B)."""
        B = a.shape[0]
        w, b = fn.split(mats)
        out_c = fn.weight_shape[0]
        w = w.reshape(B * out_c, *fn.weight_shape[1:])
        args = dict(fn.options, groups=B)
        z = self.conv(a.reshape(1, B * a.shape[1], *a.shape[2:]), w,
                      None if b is None else b.reshape(-1), **args)
        return z.reshape(B, out_c, *z.shape[2:])


@dataclass(frozen=True)
class BatchNormRule(ModuleRule):
    """Eval-mode BatchNorm with affine parameters: y = s ⊙ (x − μ) + β, s = γ/√(σ² + ε) per
    channel (μ, σ² the running statistics)."""

    backpack: str | None = "kfacbound.curvature.kfac_backpack:HBPBatchNormEval"
    batchnorm: ClassVar[bool] = True
    kind: ClassVar[str] = "batchnorm"

    def check(self, module: nn.Module, path: str) -> None:
        if not (module.affine and module.track_running_stats):
            raise unsupported(path, module, ": BatchNorm needs affine=True and running "
                                            "statistics (eval mode)")

    def scale(self, bn: nn.Module) -> torch.Tensor:
        """s = γ/√(σ² + ε) per channel (γ = 1 without affine parameters), detached."""
        gamma = bn.weight.detach() if bn.weight is not None else torch.ones_like(bn.running_var)
        return gamma / torch.sqrt(bn.running_var + bn.eps)

    def ggn_diag(self, bn: nn.Module, x: torch.Tensor,
                 delta: torch.Tensor) -> dict[str, torch.Tensor]:
        """Σ over columns and examples of the exact GGN diagonal of γ (weight) and β (bias).

        ``x``: BN input [N, ch, *]; ``delta``: exact square-root columns at the BN output
        [V, N, ch, *]. diag_β = Σ (Σ_t δ)², diag_γ = Σ (Σ_t δ x̂)², x̂ = (x − μ)/√(σ² + ε).
        """
        shape = (1, -1) + (1,) * (x.ndim - 2)
        xhat = (x.detach() - bn.running_mean.reshape(shape)) / torch.sqrt(
            bn.running_var.reshape(shape) + bn.eps
        )
        d = delta.detach().to(torch.float64)
        dims = tuple(range(3, d.ndim))
        sb = d.sum(dims) if dims else d
        sw = (d * xhat.to(torch.float64)).sum(dims) if dims else d * xhat.to(torch.float64)
        return {"weight": (sw**2).sum((0, 1)), "bias": (sb**2).sum((0, 1))}

    def fold(self, layer: nn.Module, bn: nn.Module) -> nn.Module:
        """The layer z = W a + b followed by this BN as one layer (a copy):
        W' = diag(s) W, b' = s ⊙ (b − μ) + β (a zero bias is added when the layer had none)."""
        with torch.no_grad():
            s = self.scale(bn)
            beta = bn.bias if bn.bias is not None else torch.zeros_like(bn.running_mean)
            folded = curvature_rule(layer).with_bias(layer)
            shape = (-1,) + (1,) * (folded.weight.ndim - 1)
            folded.weight.mul_(s.reshape(shape))
            folded.bias.copy_(s * (folded.bias - bn.running_mean) + beta)
        return folded


def _with_zero_bias(new: nn.Module, old: nn.Module) -> nn.Module:
    """``new`` (a freshly built layer with a bias) on old's dtype/device, old's weight, b = 0."""
    new = new.to(dtype=old.weight.dtype, device=old.weight.device)
    with torch.no_grad():
        new.weight.copy_(old.weight)
        new.bias.zero_()
    return new


# ---------------------------------------------------------------------------- the map
_RULES: dict[type[nn.Module], ModuleRule] = {}


def register_module_rule(cls: type[nn.Module], rule: ModuleRule) -> ModuleRule | None:
    """Make ``rule`` the rule of module type ``cls`` (and of its subclasses without a rule of
    their own); returns the rule it replaces, if any."""
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise TypeError(f"{cls!r} is not an nn.Module subclass")
    if not isinstance(rule, ModuleRule):
        raise TypeError(f"{rule!r} is not a ModuleRule")
    previous = _RULES.get(cls)
    _RULES[cls] = rule
    return previous


def unregister_module_rule(cls: type[nn.Module]) -> ModuleRule | None:
    """Remove the rule registered for exactly ``cls``; returns it (None if there was none)."""
    return _RULES.pop(cls, None)


def registered_rules() -> dict[type[nn.Module], ModuleRule]:
    """A copy of the map, in registration order."""
    return dict(_RULES)


def rule_for(module: nn.Module | type[nn.Module]) -> ModuleRule | None:
    """The rule of a module (or module type): that of the first class in its MRO that has one;
    None when no class has (the module is unknown to kfacbound)."""
    cls = module if isinstance(module, type) else type(module)
    for c in cls.__mro__:
        rule = _RULES.get(c)
        if rule is not None:
            return rule
    return None


def is_curvature_layer(module: nn.Module | None) -> bool:
    """Whether the module carries a curvature block (Linear, Conv2d, …); False for None."""
    rule = rule_for(module)
    return rule is not None and rule.curvature


def is_batchnorm(module: nn.Module | None) -> bool:
    """Whether the module is a BatchNorm K-FAC and the posteriors handle (BatchNorm1d/2d);
    False for None."""
    rule = rule_for(module)
    return rule is not None and rule.batchnorm


def curvature_rule(module: nn.Module) -> CurvatureRule:
    """The :class:`CurvatureRule` of a layer; UnsupportedModuleError for any other module."""
    rule = rule_for(module)
    if rule is None or not rule.curvature:
        raise UnsupportedModuleError(
            f"{type(module).__name__} is not a layer with a curvature block; layers: "
            f"{', '.join(t.__name__ for t in types_where(lambda r: r.curvature))}"
        )
    return rule  # type: ignore[return-value]


def types_where(predicate: Callable[[ModuleRule], bool]) -> tuple[type[nn.Module], ...]:
    """The registered types whose rule satisfies ``predicate``, in registration order."""
    return tuple(cls for cls, rule in _RULES.items() if predicate(rule))


def supported_names() -> str:
    """Names of the registered module types (containers left out), for error messages."""
    return ", ".join(cls.__name__ for cls in types_where(lambda r: not r.container))


# Built-in rules. The order is that of the "supported: …" list in error messages.
register_module_rule(nn.Sequential, ContainerRule())
register_module_rule(nn.Linear, LinearRule())
register_module_rule(nn.Conv2d, ConvRule())
register_module_rule(nn.BatchNorm1d, BatchNormRule())
register_module_rule(nn.BatchNorm2d, BatchNormRule())
for _cls in (nn.MaxPool2d, nn.AvgPool2d, nn.Flatten, nn.Dropout, nn.ReLU, nn.Tanh, nn.Sigmoid):
    register_module_rule(_cls, ModuleRule())
register_module_rule(nn.Identity,
                     ModuleRule(backpack="kfacbound.curvature.kfac_backpack:HBPIdentity"))
register_module_rule(nn.AdaptiveAvgPool2d, ModuleRule(backpack=None))
del _cls
