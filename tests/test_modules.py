"""The module registry (kfacbound.curvature.modules) is the single source of module knowledge.

Registering one rule for a type kfacbound does not know (nn.Conv1d) makes every consumer handle
it — K-FAC in both backends, the layer layout, exact layer blocks, BatchNorm folding and the
posteriors — checked against independent references (hand-cut patches and output Jacobians,
dense autograd GGN/Hessian blocks, the module's own forward); unregistering it makes all of them
refuse it again. The full reference suite runs on the same type through the ``conv1d_bn`` entry
of tests/conftest.py.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kfacbound.bounds.families import build_posterior
from kfacbound.curvature import kfac, layout
from kfacbound.curvature.exact import layer_hessian
from kfacbound.curvature.kfac import compute_kfac
from kfacbound.curvature.kfac_backpack import make_extension
from kfacbound.curvature.modules import (
    BatchNormRule,
    ContainerRule,
    LinearRule,
    ModuleRule,
    register_module_rule,
    rule_for,
    unregister_module_rule,
)
from kfacbound.curvature.operators import ParameterSelection
from kfacbound.errors import KfacboundError, UnsupportedModuleError
from kfacbound.models import fold_batchnorm

from .conftest import CASES
from .test_exact import _reference
from .test_kfac_helpers import close, ggn_block, kfc_reference

CONV1D = next(c for c in CASES if c.name == "conv1d_bn")


def test_rule_lookup_walks_the_mro():
    class MyLinear(nn.Linear):
        pass

    lin = rule_for(nn.Linear(2, 3))
    assert isinstance(lin, LinearRule) and lin.curvature and lin.kind == "linear"
    assert rule_for(MyLinear(2, 3)) is lin and rule_for(MyLinear) is lin
    assert isinstance(rule_for(nn.BatchNorm2d(2)), BatchNormRule)
    assert isinstance(rule_for(nn.Sequential()), ContainerRule)
    assert rule_for(nn.GELU()) is None and rule_for(nn.Module()) is None
    assert rule_for(nn.AdaptiveAvgPool2d(1)).backpack is None  # native backend only
    own = ModuleRule(backpack=None)
    assert register_module_rule(MyLinear, own) is None
    try:
        assert rule_for(MyLinear(2, 3)) is own and rule_for(nn.Linear(2, 3)) is lin
        assert register_module_rule(MyLinear, own) is own
    finally:
        assert unregister_module_rule(MyLinear) is own
    assert rule_for(MyLinear) is lin and unregister_module_rule(MyLinear) is None
    with pytest.raises(TypeError):
        register_module_rule(nn.GELU, "not a rule")
    with pytest.raises(TypeError):
        register_module_rule(nn.GELU(), ModuleRule())


def _refused(model: nn.Module, X: torch.Tensor, y: torch.Tensor) -> None:
    """Every consumer refuses the unregistered Conv1d layers."""
    with pytest.raises(UnsupportedModuleError) as err:
        compute_kfac(model, (X, y), progress=False)
    assert "'0' (Conv1d)" in str(err.value) and "\n" not in str(err.value)
    assert nn.Conv1d not in layout.CURVATURE_LAYERS and nn.Conv1d not in kfac.SUPPORTED_MODULES
    assert [p for p, _ in layout.curvature_layers(model)] == ["5"]
    assert ParameterSelection(model, "0").entries[0].kind == "params"  # torch order, no layout
    with pytest.raises(KfacboundError, match="cannot fold BatchNorm '1'"):
        fold_batchnorm(model)


def test_one_rule_entry_makes_every_consumer_handle_a_new_module_type():
    model = CONV1D.model()  # Conv1d → BatchNorm1d → Tanh → Conv1d (no bias) → Flatten → Linear
    X, y = CONV1D.data(3)
    _refused(model, X, y)
    (cls, make), = CONV1D.rules
    assert register_module_rule(cls, make()) is None
    try:
        assert nn.Conv1d in layout.CURVATURE_LAYERS and nn.Conv1d in kfac.BACKPACK_MODULES
        assert [p for p, _ in layout.curvature_layers(model)] == ["0", "3", "5"]
        assert type(make_extension("kflr")._BackpropExtension__module_extensions[nn.Conv1d]
                    ).__name__ == "KronConv1d"
        # K-FAC, both backends: the KFC-expand references (1-D patches cut by hand)
        for backend in ("native", "backpack"):
            res = compute_kfac(model, (X, y), method="kflr", backend=backend, batch_size=2,
                               progress=False)
            for name in ("0", "3"):
                G, A = kfc_reference(model, name, X, y, "ce")
                close(res[name].G, G)
                close(res[name].A, A)
        # exact layer blocks in the [W | b] layout: dense autograd GGN and Hessian
        for name in ("0", "3"):
            close(layer_hessian(model, X, y, "ce", name, part="H_O"),
                  ggn_block(model, name, X, y, "ce"))
            close(layer_hessian(model, X, y, "ce", name), _reference(model, X, y, "ce",
                                                                     [name])[0])
        # BatchNorm folding and the posteriors (sampled per example through Conv1d kernels)
        with torch.no_grad():
            ref = model(X)
            assert torch.allclose(fold_batchnorm(model)(X), ref, atol=1e-12, rtol=0)
            for kind in ("diag", "exact"):
                Q = build_posterior(model, kind, std_init=1e-9, dtype=torch.float64,
                                    eigenbases={p: (torch.eye(n, dtype=torch.float64),
                                                    torch.ones(n, dtype=torch.float64))
                                                for p, n in (("0", 21), ("3", 12), ("5", 15))})
                assert [p for p, _ in Q.layers()] == ["0", "3", "5"]
                assert Q.layers()[0][1].kind == "conv"
                assert torch.allclose(Q(X, sample=False), ref, atol=1e-12, rtol=0)
                assert torch.allclose(Q(X), ref, atol=1e-6, rtol=0)
    finally:
        unregister_module_rule(cls)
    _refused(model, X, y)
