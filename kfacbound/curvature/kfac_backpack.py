"""BackPACK backend of :func:`kfacbound.curvature.kfac.compute_kfac`, with BatchNorm support.

BackPACK 1.7.1's KFAC/KFLR/KFRA (the HBP family) raise NotImplementedError for BatchNorm. We
register module extensions on the extension objects (``set_module_extension``):

- ``BatchNorm1d/2d`` (eval mode): y = s ⊙ (x − μ) + β with s = γ/√(σ² + ε) per channel, so a
  backpropagated square root [V, N, ch, *] is scaled per channel by s (BackPACK's
  ``BatchNormNdDerivatives.jac_t_mat_prod`` in eval mode), and KFRA's batch-averaged matrix
  M [D, D] (D = ch·T, channel-major) becomes diag(s) M diag(s). BN's γ, β get their exact GGN
  diagonal from BackPACK's ``DiagGGNExact`` run in the same backward pass.
- ``Identity``: BackPACK has no KFRA rule for it; the map is the identity.
- ``Linear``/``Conv2d`` (any curvature layer whose rule names a BackPACK HBP class): G from
  BackPACK's backpropagated quantity, in the conventions of :mod:`kfacbound.curvature.kfac`
  (Ã in homogeneous coordinates; conv: KFC "expand" convention, G = Σ_t γ_t γ_tᵀ and Ã averaged
  over positions, instead of BackPACK's raw |T|-scaled factors), computed by the layer's rule.
  Each weight's ``<savefield>`` holds [G, Ã] (batch means).

Which extension a type gets is its rule's ``backpack`` entry (:mod:`kfacbound.curvature.modules`);
this module imports the rules and the shared accumulators, not :mod:`.kfac`.
"""

from __future__ import annotations

import functools
import warnings
from importlib import import_module
from typing import Any

import torch
from backpack import backpack, extend
from backpack.core.derivatives.batchnorm_nd import BatchNormNdDerivatives
from backpack.core.derivatives.scale_module import ScaleModuleDerivatives
from backpack.extensions import KFAC, KFLR, KFRA, DiagGGNExact
from backpack.extensions.secondorder.hbp.hbp_options import BackpropStrategy
from backpack.extensions.secondorder.hbp.hbpbase import HBPBaseModule
from torch import nn

from ..errors import KfacboundError
from ..losses import make_loss, prepare_targets
from .factors import accumulate
from .modules import BUILTIN, ModuleRule, registered_rules, rule_for


class HBPBatchNormEval(HBPBaseModule):
    """HBP rule for eval-mode BatchNorm1d/2d: per-channel scaling by s = γ/√(σ² + ε)."""

    def __init__(self) -> None:
        super().__init__(derivatives=BatchNormNdDerivatives(), params=None)

    def backpropagate(self, ext, module, g_inp, g_out, backproped):
        if module.training:
            raise KfacboundError("BatchNorm must be in eval mode for K-FAC extraction")
        return super().backpropagate(ext, module, g_inp, g_out, backproped)

    def backpropagate_sqrt(self, ext, module, g_inp, g_out, H):
        s = rule_for(module).scale(module)
        shape = (1, 1, -1) + (1,) * (H.ndim - 3)
        return H * s.reshape(shape)

    def backpropagate_batch_average(self, ext, module, g_inp, g_out, H):
        s = rule_for(module).scale(module)
        T = module.output[0].numel() // s.numel()
        d = s.repeat_interleave(T)
        return H * d[:, None] * d[None, :]


class HBPIdentity(HBPBaseModule):
    """HBP rule for nn.Identity, including KFRA's batch-average strategy."""

    def __init__(self) -> None:
        super().__init__(derivatives=ScaleModuleDerivatives())

    def backpropagate_sqrt(self, ext, module, g_inp, g_out, H):
        return H

    def backpropagate_batch_average(self, ext, module, g_inp, g_out, H):
        return H


class _KronMixin:
    """Weight extension returning [G, Ã] (batch means) in kfacbound's conventions, computed by
    the layer's rule from BackPACK's backpropagated quantity: square-root columns
    [V, N, out, *positions] (KFAC/KFLR) or the batch-averaged output Hessian (KFRA)."""

    def weight(self, ext, module, g_inp, g_out, backproped):
        rule = rule_for(module)
        N = module.input0.shape[0]
        if BackpropStrategy.is_batch_average(ext.get_backprop_strategy()):  # KFRA: [D, D]
            G = rule.batch_average_G(module, backproped)
        else:
            G = rule.output_factor(module, backproped)  # sums over columns and examples
        A = rule.input_factor(module, module.input0) / N
        return [G, A]


@functools.cache
def kron_extension_class(base: type) -> type:
    """BackPACK's HBP class ``base`` of a layer (HBPLinear, HBPConv2d, …) with its weight
    extension replaced by :class:`_KronMixin` and no separate bias extension (the bias sits in
    Ã's last row and column)."""

    def __init__(self) -> None:
        base.__init__(self)
        HBPBaseModule.__init__(self, derivatives=self.derivatives, params=["weight"])

    return type(f"Kron{base.__name__.removeprefix('HBP')}", (_KronMixin, base),
                {"__init__": __init__})


def _resolve(target: str) -> Any:
    module, _, name = target.partition(":")
    return getattr(import_module(module), name)


def module_extension(rule: ModuleRule) -> Any | None:
    """The module extension the rule asks for (a fresh object), or None for BackPACK's own."""
    if rule.backpack is None or rule.backpack == BUILTIN:
        return None
    cls = _resolve(rule.backpack)
    return kron_extension_class(cls)() if rule.curvature else cls()


def make_extension(method: str, mc_samples: int = 1):
    """A BackPACK KFAC/KFLR/KFRA extension object with the module extensions of every
    registered rule (:mod:`.modules`) set on it."""
    ext = {"kfac": lambda: KFAC(mc_samples=mc_samples), "kflr": KFLR, "kfra": KFRA}[method]()
    for cls, rule in registered_rules().items():
        extension = module_extension(rule)
        if extension is not None:
            ext.set_module_extension(cls, extension, overwrite=True)
    return ext


class BackpackStepper:
    """Runs one BackPACK backward per batch and adds N·(batch means) to the running sums."""

    def __init__(self, model: nn.Module, loss: str, method: str, mc_samples: int,
                 layers: dict[str, nn.Module], bns: dict[str, nn.Module]):
        self.model = extend(model)
        self.loss = loss
        self.lossfn = extend(make_loss(loss))
        self.ext = make_extension(method, mc_samples)
        self.savefield = self.ext.savefield
        self.layers, self.bns = layers, bns
        self.exts = [self.ext] + ([DiagGGNExact()] if bns else [])

    def step(self, X, y, N, G_sum, A_sum, bn_sum) -> int:
        self.model.zero_grad(set_to_none=True)
        with torch.enable_grad():
            logits = self.model(X)
            C = logits.shape[1]
            target = prepare_targets(self.loss, y, C)
            if target.is_floating_point():
                target = target.to(logits.dtype)
            value = self.lossfn(logits, target)
            default = torch.get_default_dtype()
            try:
                # BackPACK's AvgPool2d rule builds a ConvTranspose2d in the default dtype.
                torch.set_default_dtype(logits.dtype)
                with backpack(*self.exts), warnings.catch_warnings():
                    # BackPACK's full backward hooks warn when the input needs no gradient.
                    warnings.filterwarnings("ignore", message="Full backward hook")
                    value.backward()
            finally:
                torch.set_default_dtype(default)
        for name, m in self.layers.items():
            G, A = getattr(m.weight, self.savefield)
            accumulate(G_sum, name, G.detach(), alpha=N)
            accumulate(A_sum, name, A.detach(), alpha=N)
            delattr(m.weight, self.savefield)
        for name, m in self.bns.items():
            d = {"weight": m.weight.diag_ggn_exact.detach().to(torch.float64) * N,
                 "bias": m.bias.diag_ggn_exact.detach().to(torch.float64) * N}
            if name in bn_sum:
                for k in d:
                    bn_sum[name][k] += d[k]
            else:
                bn_sum[name] = d
        return C

    def close(self) -> None:
        self.model.zero_grad(set_to_none=True)
