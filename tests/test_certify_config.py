"""CertifyConfig (defaults = certify_checkpoint's, validation, recipes) and the Certificate that
certify() returns (its JSON is certify_checkpoint's, recompute() gives the bound)."""

from __future__ import annotations

import inspect
import json
from dataclasses import fields

import pytest
from torch.utils.data import TensorDataset

from kfacbound.bounds.certificate import Certificate
from kfacbound.bounds.certify import certify, certify_checkpoint
from kfacbound.bounds.config import (
    DEFAULTS,
    RECIPES,
    CertifyConfig,
    apply_recipe,
    expand_recipe,
)
from kfacbound.bounds.posteriors import GaussianPosterior
from kfacbound.bounds.prior import IsotropicPrior
from kfacbound.errors import KfacboundError

#: certify_checkpoint's signature (issue 14's refactor kept it): batch job keys hash it. Added
#: since, key-neutral at their old-behaviour values (kfacbound.batch.jobs, "bound" kind):
#: optimizer, schedule, prior_dropout. Changed defaults since: prior_epochs 10 → 30, prior_dropout
#: 0 → 0.2 (the BatchNorm study pins the old values in its spec).
SIGNATURE = (
    "(ckpt_or_model: 'Any', dataset: 'Any' = None, posterior: 'str' = 'diag', curvature: 'str' "
    "= 'kflr', iterations: 'int' = 20000, delta: 'float' = 0.025, delta_prime: 'float' = 0.01, "
    "mc_passes: 'int' = 10, prior_split: 'float | None' = None, device: 'str' = 'cpu', seed: "
    "'int' = 0, progress: 'bool' = True, *, init_model: 'nn.Module | None' = None, "
    "test_dataset: 'Any' = None, loss: 'str | None' = None, formula: 'str' = 'maurer', "
    "objective: 'str' = 'pinsker', surrogate: 'str' = 'bits', lr: 'float' = 0.001, mean_lr: "
    "'float | None' = None, lr_decay: 'tuple[float, float] | None' = (0.25, 0.1), optimizer: "
    "'str' = 'rmsprop', schedule: 'str' = 'step', batch_size: 'int' = 100, std_init: "
    "'str | float' = 'dr', std_scale: 'float' = 1.0, basis_every: "
    "'int | None' = None, exact_k: 'int | None' = None, prior_epochs: 'int' = 30, "
    "prior_dropout: 'float' = 0.2, prior_scheme: 'str' = 'pbb', prior_kind: 'str' = "
    "'isotropic', c: 'float' = 0.1, b: "
    "'float' = 100.0, mc_batch_size: 'int' = 8192, selection: 'Selection | None' = None) -> "
    "'dict[str, Any]'"
)


def test_certify_checkpoint_keeps_its_signature_and_the_config_defaults():
    sig = inspect.signature(certify_checkpoint)
    assert str(sig) == SIGNATURE
    options = {n: p for n, p in sig.parameters.items()
               if n not in ("ckpt_or_model", "dataset", "init_model", "test_dataset")}
    assert list(options) == [f.name for f in fields(CertifyConfig)]
    assert {n: p.default for n, p in options.items()} == DEFAULTS.options()
    with pytest.raises(TypeError):
        certify_checkpoint("m.kfb", None, "diag", nope=1)


@pytest.mark.parametrize("changes,match", [
    ({"delta": 2.0}, r"--delta must lie in \(0, 1\), got 2.0"),
    ({"delta_prime": 0.0}, r"--delta-prime must lie in \(0, 1\)"),
    ({"delta": 0.6, "delta_prime": 0.5}, r"--delta \+ --delta-prime must be below 1"),
    ({"iterations": -1}, "--iterations is too small: -1"),
    ({"iterations": 1.5}, "--iterations must be an integer"),
    ({"mc_passes": 0}, "--mc-passes is too small"),
    ({"batch_size": 0}, "--batch-size is too small"),
    ({"mc_batch_size": True}, "--mc-batch-size must be an integer"),
    ({"prior_epochs": -2}, "--prior-epochs is too small"),
    ({"basis_every": 0}, "--basis-every is too small"),
    ({"exact_k": 0}, "--exact-k is too small"),
    ({"prior_split": 1.5}, r"--prior-split must lie in \(0, 1\), got 1.5"),
    ({"std_init": "abc"}, "--std-init must be 'dr', 'curvature' or a number, not 'abc'"),
    ({"std_init": -1.0}, "--std-init must be positive"),
    ({"lr": 0.0}, "--lr must be a positive number"),
    ({"mean_lr": -1e-3}, "--mean-lr must be a positive number"),
    ({"std_scale": float("nan")}, "--std-scale must be a positive number"),
    ({"c": -0.1}, "--grid-c must be a positive number"),
    ({"b": 0}, "--grid-b must be a positive number"),
    ({"lr_decay": (0.5, 0.0)}, r"lr_decay must be \(fraction in \(0, 1\), factor > 0\)"),
    ({"lr_decay": (0.5, 0.1, 2.0)}, "lr_decay must be a pair"),
    ({"posterior": "nope"}, "unknown posterior 'nope'; choose from diag, kfac, exact"),
    ({"curvature": "kfra"}, "unknown curvature 'kfra'"),
    ({"formula": "nope"}, "unknown formula"),
    ({"objective": "nope"}, "unknown objective"),
    ({"surrogate": "nope"}, "unknown surrogate"),
    ({"loss": "hinge"}, "unknown loss"),
    ({"prior_scheme": "nope"}, "unknown prior scheme"),
    ({"prior_kind": "nope"}, "unknown prior kind"),
    ({"prior_kind": "curvature", "posterior": "kfac"}, "the curvature prior needs --prior-split"),
    ({"prior_kind": "curvature", "prior_split": 0.5}, "and the kfac posterior"),
    ({"prior_kind": "curvature", "prior_split": 0.5, "posterior": "kfac", "basis_every": 5},
     "no --basis-every"),
    ({"selection": {"m": 2}}, "selection must be a Selection"),
])
def test_bad_options_are_refused_with_a_clear_message(changes, match):
    with pytest.raises(KfacboundError, match=match):
        CertifyConfig(**changes)
    with pytest.raises(KfacboundError, match=match):  # replace validates too
        DEFAULTS.replace(**changes)


def test_config_conversions():
    assert CertifyConfig(std_init="0.02").std_init == 0.02
    assert CertifyConfig(std_init=1).std_init == 1
    ok = CertifyConfig(prior_kind="curvature", prior_split=0.5, posterior="kfac")
    assert ok.options()["prior_kind"] == "curvature"
    config = CertifyConfig.from_options({"posterior": "kfac", "output": "x.json", "c": 0.2},
                                        iterations=5)
    assert (config.posterior, config.c, config.iterations) == ("kfac", 0.2, 5)
    assert CertifyConfig(**config.options()) == config
    with pytest.raises(TypeError):
        CertifyConfig(nope=1)


def test_recipes_operate_on_configs_and_options():
    fields_ = {f.name for f in fields(CertifyConfig)}
    for recipe in RECIPES.values():
        assert set(recipe) <= fields_
    config, chosen = apply_recipe("best", CertifyConfig(prior_epochs=2), {"prior_epochs"})
    assert isinstance(config, CertifyConfig) and "prior_epochs" not in chosen
    assert (config.posterior, config.prior_split, config.prior_epochs) == ("diag", 0.5, 2)
    assert config.iterations == RECIPES["best"]["iterations"]
    options, chosen = apply_recipe("fast", {"lr": 0.5}, {"lr"})
    assert options["lr"] == 0.5 and options["iterations"] == 2000 and "lr" not in chosen
    assert expand_recipe({"recipe": "best", "prior_split": 0.3})["prior_split"] == 0.3
    with pytest.raises(KfacboundError, match="unknown recipe"):
        apply_recipe("nope", DEFAULTS)


def test_certificate_holds_q_p_and_the_json_of_certify_checkpoint(trained, tmp_path):
    X, y, init, model = trained
    kw = dict(posterior="kfac", iterations=20, mc_passes=2, prior_split=0.5, prior_epochs=1,
              progress=False)
    cert = certify(model, TensorDataset(X, y), CertifyConfig(**kw), init_model=init)
    assert isinstance(cert, Certificate) and cert.config == CertifyConfig(**kw)
    assert isinstance(cert.posterior, GaussianPosterior) and cert.posterior.kind == "kfac"
    assert isinstance(cert.prior, IsotropicPrior)
    assert cert.recompute() == pytest.approx(cert.bound, abs=1e-12)
    assert cert.bound == cert.to_json()["bound"]
    # the same numbers as certify_checkpoint with the same options (same seeds)
    same = certify_checkpoint(model, TensorDataset(X, y), init_model=init, **kw)
    ours = dict(cert.to_json())
    for d in (same, ours):
        d.pop("time_s")
    assert json.dumps(ours) == json.dumps(same)
    path = tmp_path / "cert.json"
    cert.save(path)
    assert json.loads(path.read_text()) == json.loads(json.dumps(cert.to_json()))
