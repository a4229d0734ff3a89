"""The priors P of a certificate and the record of what data they saw.

- **Isotropic prior** (Dziugaite & Roy 2017): P = N(w0, λI) (:class:`IsotropicPrior`,
  :func:`build_prior`), w0 the (BatchNorm-folded) initial weights, λ trainable and certified on
  the grid λ_j = c·exp(−j/b) under a union bound over j (SCIENCE.md §5).
- **Data-dependent prior** (Pérez-Ortiz et al. 2021; Dziugaite et al. 2021), ``prior_split=f``:
  a seeded fraction f of the training set trains the prior mean by SGD from w0
  (:func:`train_prior_mean`, ``prior_epochs``); the bound is certified on the rest, n = |rest|,
  never |S|; :func:`check_disjoint` refuses index sets that do not partition the training set.
  Scheme ``'pbb'``: Q starts at the prior mean and is optimised (and its curvature computed) on
  the whole training set — valid, since Q may depend on all of S and only P must not see the
  bound split; ``'checkpoint'``: Q starts at the trained network and sees only the bound split.
- **Curvature prior** (``prior_kind='curvature'``, with a prior split and a family with Kronecker
  bases): P = N(w_p, (λ⁻¹I + τ n_p G_p ⊗ A_p)⁻¹) per layer from the K-FAC factors of the prior
  split at the prior mean (:func:`curvature_prior`; the maths and the KL in
  :mod:`.kron_prior`); Q lives in the eigenbasis of those factors and starts at Q = P.

:func:`prior_data` makes the split and says which data every part of the certificate sees
(:class:`PriorData`, the certificate's ``prior`` record); :func:`make_prior` builds P for Q.
"""

from __future__ import annotations

import copy
import hashlib
import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..curvature.layout import curvature_layers, layer_matrix
from ..errors import KfacboundError
from ..losses import make_loss, prepare_targets
from ..models import batchnorm_modules, fold_batchnorm, has_batchnorm
from ..progress import progress_bar
from .families import family_names, posterior_family
from .inputs import CertifyInputs, num_outputs
from .kron_prior import TAU_GRID, KronPrior
from .pacbayes import GRID_B, GRID_C, grid_j
from .posteriors import GaussianPosterior, _ensure_folded

if TYPE_CHECKING:
    from .config import CertifyConfig

#: Epochs of SGD for a data-dependent prior mean, and PBB's dropout while it trains: measured on
#: 10-class Fashion-MNIST MLP-600 (benchmarks/RESULTS.md, "Prior training"): 10 epochs 0.181,
#: 10 + dropout 0.2 0.164, 30 + dropout 0.148, 50 + dropout 0.147 (30 costs 3/5 of 50).
DEFAULT_PRIOR_EPOCHS = 30
DEFAULT_PRIOR_DROPOUT = 0.2
PRIOR_SCHEMES = ("pbb", "checkpoint")
PRIOR_KINDS = ("isotropic", "curvature")


# ----------------------------------------------------------------------------- isotropic prior


class IsotropicPrior(nn.Module):
    """P = N(w0, λI) over all posterior layers; λ = exp(log_lam) is trainable.

    ``w0`` maps layer path → W̃0 (out × in1); ``None`` for a layer means a zero-centred prior.
    """

    def __init__(self, w0: Mapping[str, torch.Tensor | None], lam: float,
                 c: float = GRID_C, b: float = GRID_B):
        super().__init__()
        self.paths = list(w0)
        for i, path in enumerate(self.paths):
            t = w0[path]
            self.register_buffer(f"w0_{i}", None if t is None else t.detach().clone())
        self.log_lam = nn.Parameter(torch.tensor(math.log(lam), dtype=torch.float64))
        self.c, self.b = float(c), float(b)

    def center(self, path: str) -> torch.Tensor | None:
        return getattr(self, f"w0_{self.paths.index(path)}")

    @property
    def lam(self) -> torch.Tensor:
        return torch.exp(self.log_lam)

    def j_continuous(self) -> float:
        return grid_j(float(self.lam), self.c, self.b)


def build_prior(
    posterior: GaussianPosterior,
    init_model: nn.Module | None,
    lam: float | None = None,
    c: float = GRID_C,
    b: float = GRID_B,
) -> IsotropicPrior:
    """P = N(w0, λI) with w0 the (BatchNorm-folded) initial weights of ``init_model``.

    ``init_model=None``: zero-centred prior, with a warning (the checkpoint has no w0).
    ``lam=None``: the KL-optimal λ = (tr Σ + ‖M − w0‖²)/k for the current Q, capped at the
    first grid point c·exp(−1/b).
    """
    w0: dict[str, torch.Tensor | None] = {}
    if init_model is None:
        warnings.warn(
            "no initial weights w0: using a zero-centred prior N(0, λI); bounds are looser",
            stacklevel=2,
        )
        w0 = {path: None for path in posterior.layer_paths}
    else:
        init = _ensure_folded(init_model)
        mods = dict(curvature_layers(init))
        for path, layer in posterior.layers():
            if path not in mods or layer_matrix(mods[path]).shape != layer.mean.shape:
                raise KfacboundError(
                    f"the initial model does not match the trained model at layer {path!r}"
                )
            w0[path] = layer_matrix(mods[path]).detach().to(layer.mean.dtype)
    prior = IsotropicPrior(w0, 1.0, c, b)
    if lam is None:
        with torch.no_grad():
            sq, sv, _, k = posterior.kl_terms(prior, torch.float64)
            lam = (float(sq) + float(sv)) / k
        lam = min(lam, c * math.exp(-1.0 / b))
    with torch.no_grad():
        prior.log_lam.fill_(math.log(lam))
    return prior


# ----------------------------------------------------------------------------- data-dependent


def check_disjoint(prior_idx: torch.Tensor, bound_idx: torch.Tensor, n_total: int) -> None:
    """Refuse a data-dependent prior that saw the bound set: the index sets must be disjoint
    and together cover the n_total training examples exactly once."""
    seen = torch.zeros(n_total, dtype=torch.int64)
    seen.index_add_(0, prior_idx.long(), torch.ones(len(prior_idx), dtype=torch.int64))
    overlap = int(((seen > 0) & torch.isin(torch.arange(n_total), bound_idx.long())).sum())
    if overlap:
        raise KfacboundError(
            f"the prior split and the bound split share {overlap} examples: a prior that saw "
            "the bound set gives no valid bound")
    seen.index_add_(0, bound_idx.long(), torch.ones(len(bound_idx), dtype=torch.int64))
    if not bool((seen == 1).all()):
        raise KfacboundError("the prior and bound splits do not partition the training set")


def _index_hash(idx: torch.Tensor) -> str:
    return hashlib.sha256(idx.to(torch.int64).numpy().tobytes()).hexdigest()


def _input_dropout(model: nn.Module, p: float, gen: torch.Generator
                   ) -> list[torch.utils.hooks.RemovableHandle]:
    """Inverted dropout with rate p on the input of every curvature layer but the first (in
    module order), in training mode only, masks drawn from ``gen`` (so the prior, and the
    certificate, depend on the seed alone): PBB's prior networks have dropout after each hidden
    layer; on the layer inputs it is architecture-agnostic. Returns the hook handles."""
    def hook(module: nn.Module, args: tuple) -> tuple:
        x = args[0]
        if not module.training:
            return args
        keep = torch.rand(x.shape, generator=gen, device=x.device) >= p
        return (x * keep.to(x.dtype) / (1.0 - p), *args[1:])

    return [module.register_forward_pre_hook(hook)
            for _path, module in curvature_layers(model)[1:]]


def train_prior_mean(init_model: nn.Module, X: torch.Tensor, y: torch.Tensor, loss: str,
                     epochs: int = 1, lr: float = 0.01, momentum: float = 0.9,
                     batch_size: int = 100, seed: int = 0, device: str | torch.device = "cpu",
                     progress: bool = True, dropout: float = 0.0) -> nn.Module:
    """A data-dependent prior mean: SGD from w0 on the prior split only (D&R's SGD settings).

    ``dropout`` p > 0: inverted dropout (rate p) on the input of every curvature layer after the
    first during this training, as PBB train their priors (Pérez-Ortiz et al. 2021, dropout
    0.2); the returned network has no dropout (hooks removed), and its BatchNorm statistics are
    then recomputed on ``X`` without dropout (:func:`recompute_batchnorm_statistics`)."""
    if not 0.0 <= dropout < 1.0:
        raise KfacboundError(f"--prior-dropout must lie in [0, 1), got {dropout}")
    model = copy.deepcopy(init_model).to(device).train()
    crit = make_loss(loss)
    T = prepare_targets(loss, y, num_outputs(model, X))
    hooks = (_input_dropout(model, dropout, torch.Generator(device=torch.device(device))
                            .manual_seed(int(seed) + 11)) if dropout > 0 else [])
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    gen = torch.Generator().manual_seed(int(seed) + 7)
    steps = epochs * math.ceil(len(X) / batch_size)
    for step in progress_bar(steps, "prior SGD", progress, "step", range(steps), leave=False):
        if step % math.ceil(len(X) / batch_size) == 0:
            perm = torch.randperm(len(X), generator=gen)
        s = (step % math.ceil(len(X) / batch_size)) * batch_size
        idx = perm[s:s + batch_size]
        out = model(X[idx].to(device))
        loss_v = crit(out, T[idx].to(device))
        opt.zero_grad()
        loss_v.backward()
        opt.step()
    for handle in hooks:
        handle.remove()
    if hooks:
        recompute_batchnorm_statistics(model, X, device=device)
    return model.eval()


def recompute_batchnorm_statistics(model: nn.Module, X: torch.Tensor, batch_size: int = 1000,
                                   device: str | torch.device = "cpu") -> None:
    """Replace every BatchNorm layer's running mean and variance by their average over the
    batches of ``X`` (``momentum=None``: the cumulative average), in train mode, without grad;
    the model's mode and the layers' momenta are restored.

    Why: a prior mean trained with dropout collected its running statistics on dropped-out
    activations, whose variance the inverted-dropout scaling inflates, while the folded,
    deployed network runs without dropout ("variance shift", Li et al., CVPR 2019). Measured on
    the BatchNorm study's MLP-600 with BN (seed 0; benchmarks/RESULTS.md): the posterior then
    drifted far from the prior mean to make up (KL 271 against 30–40 without BN). ``X`` must be
    the prior split only (the prior may not see the bound set). A model without BatchNorm is
    left as it is (no forward pass)."""
    bns = batchnorm_modules(model)
    if not bns:
        return
    momenta = [bn.momentum for bn in bns]
    was_training = model.training
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None
    model.train()
    with torch.no_grad():
        for s in range(0, len(X), batch_size):
            model(X[s:s + batch_size].to(device))
    for bn, momentum in zip(bns, momenta, strict=True):
        bn.momentum = momentum
    model.train(was_training)


# ----------------------------------------------------------------------------- options


def check_prior_options(config: CertifyConfig) -> None:
    """Refuse prior options that do not fit together (called by :class:`.config.CertifyConfig`)."""
    if config.prior_kind not in PRIOR_KINDS:
        raise KfacboundError(f"unknown prior kind {config.prior_kind!r}; "
                             f"choose from {PRIOR_KINDS}")
    if config.prior_scheme not in PRIOR_SCHEMES:
        raise KfacboundError(f"unknown prior scheme {config.prior_scheme!r}; "
                             f"choose from {PRIOR_SCHEMES}")
    if config.prior_kind == "curvature" and (
            config.prior_split is None or not posterior_family(config.posterior).kron_bases
            or config.basis_every):
        kron = " or ".join(family_names(kron_bases=True))
        raise KfacboundError(
            "the curvature prior needs --prior-split (its factors come from the prior split) "
            f"and the {kron} posterior in the prior's fixed eigenbasis (no --basis-every)")


# ----------------------------------------------------------------------------- which data


@dataclass
class PriorData:
    """Which network and data every part of a certificate uses.

    ``center``: the network whose (folded) weights are P's mean — w0, the learnt prior mean, or
    None (zero-centred); ``start``: Q's initial mean; ``X, y``: the bound set (Monte-Carlo draws
    and n); ``X_post, y_post``: what Q is optimised on; ``X_prior, y_prior``: the prior split
    (None without one); ``curvature_prior``: P is the curvature prior; ``record``: the
    certificate's ``prior`` provenance (updated by :func:`make_prior`).
    """

    center: nn.Module | None
    start: nn.Module
    X: torch.Tensor
    y: torch.Tensor
    X_post: torch.Tensor
    y_post: torch.Tensor
    X_prior: torch.Tensor | None
    y_prior: torch.Tensor | None
    curvature_prior: bool
    record: dict[str, Any]

    @property
    def n(self) -> int:
        """Size of the bound set (the n of the bound)."""
        return len(self.X)

    def curvature_data(self) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
        """(network, X, y) that Q's curvature is computed from: Q's start on the data Q is
        optimised on — or, for the curvature prior, the prior mean on the prior split (P's
        factors: Q lives in P's bases, which therefore must not see the bound split)."""
        if self.curvature_prior:
            assert self.center is not None and self.X_prior is not None
            return self.center, self.X_prior, self.y_prior
        return self.start, self.X_post, self.y_post


def center_sha256(P: nn.Module) -> str:
    """sha256 of the prior's centre: each layer's path, then its W̃0 as float64 bytes, in the
    prior's layer order ("zero" for a zero-centred layer). Lets a reader tell which prior mean a
    certificate was computed against (e.g. before or after a change to prior training) and check
    a recomputed prior against it."""
    h = hashlib.sha256()
    for path in P.paths:
        h.update(path.encode())
        c = P.center(path)
        h.update(b"zero" if c is None else
                 c.detach().to("cpu", torch.float64).contiguous().numpy().tobytes())
    return h.hexdigest()


def check_fresh_batchnorm(w0: nn.Module) -> None:
    """Refuse a data-free prior centre w0 whose BatchNorm layers carry running statistics.

    Folding eval-mode BN turns its running mean and variance into weights of w0 (SCIENCE.md §5),
    so statistics gathered on data (``num_batches_tracked`` > 0, or μ ≠ 0, σ² ≠ 1) would make
    the "data-free" prior depend on that data, possibly the bound set. Fresh BN (μ = 0, σ² = 1,
    as every checkpoint of ``kfacbound train`` stores for w0) passes."""
    bns = {id(m) for m in batchnorm_modules(w0)}
    for name, m in w0.named_modules():
        if id(m) not in bns:
            continue
        tracked = int(m.num_batches_tracked) if m.num_batches_tracked is not None else 0
        fresh = (m.running_mean is None or bool((m.running_mean == 0).all())) and (
            m.running_var is None or bool((m.running_var == 1).all()))
        if tracked or not fresh:
            raise KfacboundError(
                f"w0's BatchNorm layer {name!r} carries running statistics ({tracked} batches "
                "tracked): a data-free prior centred at it would depend on the data they came "
                "from. Give w0 with fresh BatchNorm statistics (mean 0, variance 1) or learn "
                "the prior on a split (--prior-split)")


def prior_data(inputs: CertifyInputs, config: CertifyConfig) -> PriorData:
    """Split the training set for a data-dependent prior (if ``config.prior_split``), train the
    prior mean on the prior split, and record which data each quantity sees."""
    X, y = inputs.X, inputs.y
    record: dict[str, Any] = {"split": config.prior_split,
                              "center": "zero" if inputs.init_model is None else "init"}
    center, start = inputs.init_model, inputs.model
    X_post, y_post, Xp, yp = X, y, None, None
    pbb = config.prior_split is not None and config.prior_scheme == "pbb"
    if config.prior_split is None and inputs.prior_net is not None:
        check_fresh_batchnorm(inputs.prior_net)
    if config.prior_split is not None:
        if center is None:
            raise KfacboundError("--prior-split needs the initial weights w0 in the checkpoint")
        from ..data import split_indices

        idx_p, idx_b = split_indices(len(X), config.prior_split, config.seed)
        check_disjoint(idx_p, idx_b, len(X))
        Xp, yp = X[idx_p], y[idx_p]
        X, y = X[idx_b], y[idx_b]
        # the prior mean trains as the network itself (BN in train mode on the prior split) and
        # is folded afterwards: folding first would train a network without BN
        net = inputs.prior_net if inputs.prior_net is not None else center
        center = train_prior_mean(net, Xp, yp, inputs.loss, epochs=config.prior_epochs,
                                  seed=config.seed, device=config.device,
                                  progress=config.progress,
                                  dropout=config.prior_dropout).cpu()
        if has_batchnorm(center):  # eval-mode BN with the prior split's running statistics
            center = fold_batchnorm(center)
        if pbb:
            start = copy.deepcopy(center).eval()
        else:
            X_post, y_post = X, y
        record.update(
            center="data-dependent", prior_n=len(Xp), prior_epochs=config.prior_epochs,
            prior_dropout=config.prior_dropout,
            scheme=config.prior_scheme, prior_indices_sha256=_index_hash(idx_p),
            bound_indices_sha256=_index_hash(idx_b),
        )
    record["data"] = {
        "prior_mean": (f"prior split only ({record['prior_n']} examples, "
                       f"{config.prior_epochs} epochs SGD from w0"
                       + (f", dropout {config.prior_dropout:g}" if config.prior_dropout else "")
                       + (", trained with its BatchNorm layers, then folded"
                          if inputs.batchnorm else "") + ")"
                       if config.prior_split is not None
                       else "none (data-free: initial weights w0)" if center is not None
                       else "none (zero)"),
        "prior_variance": "grid λ_j = c·exp(−j/b), union bound over j (may use any data)",
        "posterior_mean_init": "prior mean" if pbb else "trained checkpoint",
        "posterior_and_curvature": ("all training data (prior split + bound split)" if pbb
                                    else "bound split"),
        "monte_carlo_and_n": f"bound split ({len(X)} examples)",
    }
    return PriorData(center=center, start=start, X=X, y=y, X_post=X_post, y_post=y_post,
                     X_prior=Xp, y_prior=yp, curvature_prior=config.prior_kind == "curvature",
                     record=record)


# ----------------------------------------------------------------------------- building P


@torch.no_grad()
def curvature_prior(Q: GaussianPosterior, iso: IsotropicPrior, n_prior: int,
                    tau: float = 1.0) -> KronPrior:
    """The curvature prior in Q's (K-FAC) bases, centred where ``iso`` is, and Q's stds set to
    the prior's, s² = 1/π (then KL(Q‖P) = ½ Σ π R², zero when Q's mean is the prior mean)."""
    if not posterior_family(Q.kind).kron_bases:
        raise KfacboundError("the curvature prior needs the kfac posterior")
    means, bases = {}, {}
    for path, layer in Q.layers():
        means[path] = iso.center(path)
        bases[path] = (layer.U_G, layer.U_A, layer.eig_G, layer.eig_A)
    P = KronPrior(means, bases, n_prior=n_prior, lam=float(iso.lam), tau=tau, c=iso.c, b=iso.b)
    for i, (_path, layer) in enumerate(Q.layers()):
        pi = 1.0 / float(P.lam) + float(P.tau) * getattr(P, f"h_{i}")
        layer.log_std.copy_((-0.5 * torch.log(pi)).to(layer.log_std.dtype))
    return P


def make_prior(Q: GaussianPosterior, data: PriorData, config: CertifyConfig
               ) -> IsotropicPrior | KronPrior:
    """P for Q: N(center, λI) on the grid (c, b), λ at its KL-optimal start — or the curvature
    prior built on it, whose kind and factors are added to ``data.record``."""
    P = build_prior(Q, data.center, c=config.c, b=config.b)
    if data.curvature_prior:
        assert data.X_prior is not None
        P = curvature_prior(Q, P, n_prior=len(data.X_prior), tau=1.0)
        data.record.update(kind="curvature", tau_grid=list(TAU_GRID),
                           factors=f"{config.curvature} on the prior split at the prior mean")
    return P
