"""Training of the data-dependent prior mean (kfacbound.bounds.prior.train_prior_mean): PBB's
dropout against a hand-written SGD step on the same dropout masks."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import TensorDataset

from kfacbound.bounds import certify as cf
from kfacbound.bounds.prior import train_prior_mean
from kfacbound.errors import KfacboundError


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 6), nn.ReLU(),
                         nn.Linear(6, 3))


def test_prior_dropout_is_one_sgd_step_on_masked_hidden_inputs():
    """One step over the whole split (batch = n): train_prior_mean with dropout p equals plain
    SGD (first step: w − lr·∇) on the loss of the network whose 2nd and 3rd Linear layers see
    inverted-dropout inputs, drawn from the same generator state in the same example order."""
    g = torch.Generator().manual_seed(3)
    X = torch.randn(20, 5, generator=g)
    y = torch.randint(0, 3, (20,), generator=g)
    net, p, lr, seed = _net(), 0.4, 0.05, 11
    torch.manual_seed(123)
    got = train_prior_mean(net, X, y, "ce", epochs=1, lr=lr, batch_size=len(X), seed=seed,
                           progress=False, dropout=p)
    torch.manual_seed(456)  # the global RNG plays no part: the masks come from the seed
    again = train_prior_mean(net, X, y, "ce", epochs=1, lr=lr, batch_size=len(X), seed=seed,
                             progress=False, dropout=p)
    for a, b in zip(got.parameters(), again.parameters(), strict=True):
        assert torch.equal(a, b)

    ref = copy.deepcopy(net)
    perm = torch.randperm(len(X), generator=torch.Generator().manual_seed(seed + 7))
    xb, yb = X[perm], y[perm]
    g = torch.Generator().manual_seed(seed + 11)

    def drop(h):  # inverted dropout: zero with probability p, scale the rest by 1/(1 − p)
        return h * (torch.rand(h.shape, generator=g) >= p).float() / (1 - p)
    h = F.relu(ref[0](xb))
    h = F.relu(ref[2](drop(h)))
    out = ref[4](drop(h))
    F.cross_entropy(out, yb).backward()
    with torch.no_grad():
        for a, b in zip(got.parameters(), ref.parameters(), strict=True):
            torch.testing.assert_close(a, b - lr * b.grad)
    # the returned network has no dropout left: eval and train mode compute the same function
    assert not any(m._forward_pre_hooks for m in got.modules())
    torch.testing.assert_close(got.train()(X), got.eval()(X))
    # and dropout did change the result
    plain = train_prior_mean(net, X, y, "ce", epochs=1, lr=lr, batch_size=len(X), seed=seed,
                             progress=False)
    assert not torch.allclose(plain[0].weight, got[0].weight)


def test_prior_dropout_is_recorded_and_checked():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(80, 5, generator=g)
    y = torch.randint(0, 3, (80,), generator=g)
    init, model = _net(), _net()
    cert = cf.certify_checkpoint(model, TensorDataset(X, y), posterior="diag", iterations=5,
                                 mc_passes=1, init_model=init, prior_split=0.5, prior_epochs=2,
                                 prior_dropout=0.2, loss="ce", progress=False)
    cert = json.loads(json.dumps(cert))
    assert cert["prior"]["prior_dropout"] == 0.2
    assert "dropout 0.2" in cert["prior"]["data"]["prior_mean"]
    assert cf.recompute_certificate(cert) == pytest.approx(cert["bound"], abs=1e-12)
    for bad in (1.0, -0.1, True):
        with pytest.raises(KfacboundError, match="prior-dropout"):
            cf.certify_checkpoint(model, TensorDataset(X, y), init_model=init, prior_split=0.5,
                                  prior_dropout=bad, progress=False)


def test_batchnorm_statistics_of_a_dropout_prior_are_those_without_dropout():
    """After prior training with dropout, every BN layer's running mean / variance are the
    average, over batches of the prior split, of the batch mean and unbiased batch variance of
    the layer's input in the network *without* dropout, computed here by hand in float64."""
    torch.manual_seed(1)
    net = nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 6),
                        nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3))
    X, y = torch.randn(300, 5), torch.randint(0, 3, (300,))
    model = train_prior_mean(net, X, y, "ce", epochs=2, batch_size=50, dropout=0.4,
                             progress=False)
    assert not model.training
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm1d)]
    # the same weights, BN in train mode, no dropout: the layer inputs batch by batch
    probe = copy.deepcopy(model).double().train()
    seen: dict[int, list[torch.Tensor]] = {0: [], 1: []}
    pbns = [m for m in probe.modules() if isinstance(m, nn.BatchNorm1d)]
    for i, bn in enumerate(pbns):
        bn.register_forward_pre_hook(lambda m, a, i=i: seen[i].append(a[0].detach()))
    with torch.no_grad():
        for s in range(0, 300, 1000):  # the default batch of 1,000 holds all 300
            probe(X[s:s + 1000].double())
    for i, bn in enumerate(bns):
        (inp,) = seen[i]
        assert torch.allclose(bn.running_mean.double(), inp.mean(0), atol=1e-5)
        assert torch.allclose(bn.running_var.double(), inp.var(0, unbiased=True), atol=1e-5)
        assert bn.momentum == 0.1  # restored
