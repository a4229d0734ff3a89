"""The posterior-family registry (issue 14): every registered family builds and its KL is the
dense float64 torch.distributions KL; a family registered here (one std per layer) and a family
with its own refresh run end to end through ``certify``; the CLI offers exactly the registry."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from kfacbound.bounds import families, gather
from kfacbound.bounds.certify import certify
from kfacbound.bounds.config import CertifyConfig
from kfacbound.bounds.families import (
    FAMILIES,
    KFACEigenbasisFamily,
    PosteriorFamily,
    build_posterior,
    family_help,
    family_names,
    posterior_family,
    register_family,
)
from kfacbound.bounds.posteriors import LayerPosterior, StdInit
from kfacbound.bounds.prior import build_prior
from kfacbound.errors import KfacboundError

from .test_certify import data_factors, independent_recompute
from .test_posteriors import random_eigenbases, random_factors, small_mlp
from .test_validity import dense_kl

D = torch.float64


@pytest.fixture
def registry(monkeypatch):
    """A private copy of the registry: families registered in a test do not leak."""
    monkeypatch.setattr(families, "FAMILIES", dict(families.FAMILIES))
    return families.FAMILIES


@pytest.mark.parametrize("name", list(FAMILIES))
def test_every_registered_family_builds_and_its_kl_matches_dense(name):
    gen = torch.Generator().manual_seed(11)
    model, init = small_mlp(0), small_mlp(1)
    Q = build_posterior(model, name, factors=random_factors(model, gen),
                        eigenbases=random_eigenbases(model, gen, 4), std_init=0.05, dtype=D)
    assert Q.kind == name and posterior_family(name).name == name
    with torch.no_grad():  # non-uniform variances
        for _, layer in Q.layers():
            layer.log_std.add_(0.3 * torch.randn(layer.log_std.shape, generator=gen, dtype=D))
    P = build_prior(Q, init, lam=0.02)
    assert float(Q.kl(P, dtype=D).detach()) == pytest.approx(dense_kl(Q, P), rel=1e-9)


def test_registry_lookup_and_the_cli_choices():
    assert family_names()[:3] == ["diag", "kfac", "exact"]
    assert family_names(kron_bases=True) == ["kfac"]
    assert family_names(refreshes=True) == ["kfac"]
    with pytest.raises(KfacboundError, match="unknown posterior 'nope'; choose from diag, kfac"):
        posterior_family("nope")
    from click.testing import CliRunner

    from kfacbound.cli import main

    out = CliRunner().invoke(main, ["bound", "--help"], terminal_width=1000).output
    assert "[" + "|".join(family_names()) + "]" in out
    assert family_help() in out


# ----------------------------------------------------------------------------- a new family


class SharedStdLayer(LayerPosterior):
    """W̃ = M + σ Z with one σ for the whole layer: Σ = σ² I."""

    def __init__(self, module: nn.Module, std: float, dtype: torch.dtype):
        super().__init__(module, dtype)
        self.log_std = nn.Parameter(torch.tensor([math.log(std)], dtype=dtype))

    def var_stats(self, dtype=None):
        ls = self.log_std_used(dtype=dtype)[0]
        return self.numel() * torch.exp(2 * ls), self.numel() * 2 * ls

    def sample_noise(self, num: int) -> torch.Tensor:
        std = torch.exp(self.log_std_used())
        return std * torch.randn(num, *self.mean.shape, dtype=std.dtype, device=std.device)

    def noise_scale(self, a1: torch.Tensor) -> torch.Tensor:
        """s_o = σ ‖ã‖ for every output o; T = I."""
        std = torch.exp(self.log_std_used())
        return (std * a1.norm(dim=1, keepdim=True)).expand(-1, self.out_dim)

    def noise_from_scale(self, scale: torch.Tensor) -> torch.Tensor:
        return scale * torch.randn_like(scale)


class SharedStdFamily(PosteriorFamily):
    name = "shared"
    summary = "one std per layer"

    def layer(self, path: str, module: nn.Module, curvature, init: StdInit) -> LayerPosterior:
        from kfacbound.curvature.layout import layer_matrix

        if init.std == "dr":  # the RMS weight, as D&R's |w| but shared
            rms = float(layer_matrix(module).detach().double().pow(2).mean().sqrt())
            std = min(max(rms * init.scale, init.std_min), math.sqrt(init.prior_var))
        else:
            std = float(init.std)
        return SharedStdLayer(module, std, init.dtype)


def test_a_registered_family_runs_end_to_end_through_certify(trained, registry):
    X, y, init, model = trained
    with pytest.raises(KfacboundError, match="unknown posterior 'shared'"):
        CertifyConfig(posterior="shared")
    register_family(SharedStdFamily)
    assert "shared" in family_names()
    config = CertifyConfig(posterior="shared", iterations=60, mc_passes=2, progress=False)
    cert = certify(model, TensorDataset(X, y), config, init_model=init)
    d = json.loads(json.dumps(cert.to_json()))
    assert d["posterior"] == "shared" and d["curvature"] is None
    assert d["bound"] == pytest.approx(independent_recompute(d), abs=1e-9)
    assert cert.recompute() == pytest.approx(cert.bound, abs=1e-12)
    # the certified KL is that of the Gaussian sampled: N(M, σ² I) against N(w0, λ_j I)
    ref = 0.0
    for path, layer in cert.posterior.layers():
        mu = layer.mean.detach().reshape(-1).double()
        s2 = float(torch.exp(2 * layer.log_std.detach().double()))
        q = torch.distributions.MultivariateNormal(mu, s2 * torch.eye(len(mu), dtype=D))
        p = torch.distributions.MultivariateNormal(
            cert.prior.center(path).reshape(-1).double(),
            d["lambda"] * torch.eye(len(mu), dtype=D))
        ref += float(torch.distributions.kl_divergence(q, p))
    assert d["kl"] == pytest.approx(ref, rel=1e-9)
    # the one-std layers sample what their local reparameterisation says: Var z_o = σ² ‖ã‖²
    layer = cert.posterior.layers()[0][1]
    a1 = F.pad(X[:1], (0, 1), value=1.0).expand(50000, -1)
    torch.manual_seed(0)
    z = layer.linear_noise(a1)
    s2 = float(torch.exp(2 * layer.log_std.detach())) * float(a1[0].pow(2).sum())
    assert float(z.var(0).mean()) == pytest.approx(s2, rel=0.03)


def test_a_family_with_its_own_refresh_is_called_every_basis_every_steps(trained, registry,
                                                                         monkeypatch):
    X, y, init, model = trained
    monkeypatch.setattr(gather, "kfac_factors", data_factors)
    calls = []

    @register_family
    class CountingKFAC(KFACEigenbasisFamily):
        name = "kfac-counted"

        def refresh(self, posterior, curvature):
            calls.append(sorted(curvature))
            super().refresh(posterior, curvature)

    cert = certify(model, TensorDataset(X, y),
                   CertifyConfig(posterior="kfac-counted", iterations=30, basis_every=10,
                                 mc_passes=1, progress=False), init_model=init)
    assert calls == [["fc1", "out"], ["fc1", "out"]]  # steps 10 and 20
    assert cert.record["curvature"] == "kflr" and cert.record["basis_every"] == 10
    assert cert.recompute() == pytest.approx(cert.bound, abs=1e-12)


def test_families_without_a_refresh_gather_no_curvature_for_basis_every(trained, monkeypatch):
    X, y, init, model = trained

    def no_factors(*args, **kwargs):
        raise AssertionError("the diag posterior needs no K-FAC factors")

    monkeypatch.setattr(gather, "kfac_factors", no_factors)
    cert = certify(model, TensorDataset(X, y),
                   CertifyConfig(iterations=12, basis_every=5, mc_passes=1, progress=False),
                   init_model=init)
    assert cert.record["posterior"] == "diag" and cert.record["curvature"] is None
