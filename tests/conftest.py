"""Shared fixtures. Tests run on CPU with a small, fixed thread count for reproducibility."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import pytest
import torch
from torch import nn

torch.set_num_threads(int(os.environ.get("KFACBOUND_TEST_THREADS", "1")))

FASHION_DIR = "/usr/share/datasets/fashion-mnist"


def fashion_available() -> bool:
    return os.path.exists(os.path.join(FASHION_DIR, "train-images-idx3-ubyte.gz"))


requires_fashion = pytest.mark.skipif(
    not fashion_available(),
    reason="Debian's dataset-fashion-mnist is not installed (.ci/run installs it as root)",
)


@pytest.fixture
def tiny_binary():
    """200 binary MNIST-5k digits downsampled to 8x8 (a fast real dataset)."""
    from kfacbound.data import load_dataset

    return load_dataset("mnist5k", binary=True, subset=200, downsample=8)


@pytest.fixture(scope="module")
def trained():
    """(X, y, w0 model, trained model): the toy one-logit problem of tests/test_certify.py."""
    from .test_certify import toy_data, toy_model, train

    X, y = toy_data()
    _, init, model = toy_model()
    return X, y, init, train(model, X, y)


# ------------------------------------------------------------------ shared reference cases
# The curvature, operator and posterior tests that check against independent references
# (dense float64 autograd, hand-cut patches, brute force, curvlinops) run over these networks,
# as curvlinops' tests do: a new module type or network gets every reference test by adding one
# entry to CASES (a new module type also names its rule in ``rules``; the ``case`` fixture
# registers it for the duration of each test).
DT = torch.float64


def randomise_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial eval statistics for every BatchNorm (β > 0 keeps later ReLUs alive)."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            c, dt = m.num_features, m.running_mean.dtype
            m.running_mean.copy_(torch.randn(c, generator=g, dtype=dt) * 0.3)
            m.running_var.copy_(torch.rand(c, generator=g, dtype=dt) * 1.5 + 0.5)
            m.weight.data.copy_(torch.rand(c, generator=g, dtype=dt) + 0.5)
            m.bias.data.copy_(torch.rand(c, generator=g, dtype=dt) * 0.3 + 0.2)
    return model.eval()


def _mlp(out: int, bias: bool = True) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(6, 5, bias=bias), nn.Tanh(),
                         nn.Linear(5, 4, bias=bias), nn.ReLU(), nn.Linear(4, out, bias=bias))


def _mlp_bn(out: int) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(6, 5), nn.BatchNorm1d(5), nn.ReLU(),
                         nn.Dropout(0.3), nn.Linear(5, 4), nn.Identity(), nn.Tanh(),
                         nn.Linear(4, out))


def _cnn_bn(out: int) -> nn.Module:  # 2×6×6 inputs
    return nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(),
                         nn.AvgPool2d(2), nn.Conv2d(3, 4, 2, bias=False), nn.BatchNorm2d(4),
                         nn.Sigmoid(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(4, out))


def _cnn(out: int) -> nn.Module:  # 2×6×6 inputs; stride, padding, dilation
    return nn.Sequential(nn.Conv2d(2, 3, 3, padding=2, dilation=2), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(3, 4, 2, stride=2, padding=1), nn.Tanh(), nn.Flatten(),
                         nn.Linear(4 * 4, out))


def _resnet(out: int) -> nn.Module:
    """Zoo ResNet on 1×6×6: conv1, layer1.0 (identity shortcut), layer2.0 (stride 2, 1×1
    projection shortcut ``layer2.0.downsample.0`` + BN), global pooling, fc."""
    from kfacbound.models import build_model, resolve_spec

    spec = {"arch": "resnet", "blocks": [1, 1], "channels": [2, 3], "bn": True}
    return build_model(resolve_spec(spec, [1, 6, 6], out))  # initialised from the seeded RNG


def _conv1d_bn(out: int) -> nn.Module:  # 2×7 inputs
    return nn.Sequential(nn.Conv1d(2, 3, 3, padding=1, dilation=2), nn.BatchNorm1d(3), nn.Tanh(),
                         nn.Conv1d(3, 2, 2, stride=2, bias=False), nn.Flatten(),
                         nn.Linear(4, out))


def _conv1d_rule():
    """nn.Conv1d as a user would add it: one rule entry."""
    import torch.nn.functional as F

    from kfacbound.curvature.modules import ConvRule

    return ConvRule(dims=1, conv=F.conv1d)  # BackPACK backend: HBPConv1d, wrapped


@dataclass(frozen=True)
class RefCase:
    """One reference network: ``build(out)`` (seeded, cast to float64, random BN statistics,
    eval mode), inputs of ``input_shape``, ``loss`` with ``out`` outputs; ``bn``, ``conv``: it
    has BatchNorm / convolutions. ``sequential``: an
    nn.Sequential of BackPACK-supported modules (BackPACK backend, KFRA); ``rules``: (module
    type, rule factory) pairs registered while the case runs (module types kfacbound does not
    know by default)."""

    name: str
    build: Callable[[int], nn.Module]
    input_shape: tuple[int, ...]
    loss: str = "ce"
    out: int = 3
    bn: bool = False
    conv: bool = False
    sequential: bool = True
    rules: tuple[tuple[type[nn.Module], Callable[[], Any]], ...] = ()

    def __str__(self) -> str:
        return self.name

    def model(self, seed: int = 0) -> nn.Module:
        torch.manual_seed(seed)
        return randomise_bn(self.build(self.out).to(DT), seed + 100)

    def data(self, n: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(seed)
        return (torch.randn(n, *self.input_shape, generator=g, dtype=DT),
                torch.randint(0, max(self.out, 2), (n,), generator=g))

    @staticmethod
    def layers(model: nn.Module) -> list[str]:
        """Paths of the Linear/Conv layers, found without kfacbound's registry."""
        return [n for n, m in model.named_modules()
                if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd))]


CASES = [
    RefCase("mlp", _mlp, (6,)),
    RefCase("mlp_nobias", partial(_mlp, bias=False), (6,)),
    RefCase("mlp_bn", _mlp_bn, (6,), bn=True),
    RefCase("cnn_bn", _cnn_bn, (2, 6, 6), bn=True, conv=True),
    RefCase("resnet", _resnet, (1, 6, 6), bn=True, conv=True, sequential=False),
    RefCase("mlp_bce", _mlp, (6,), loss="bce", out=1),
    RefCase("cnn_mse", _cnn, (2, 6, 6), loss="mse", conv=True),
    RefCase("conv1d_bn", _conv1d_bn, (2, 7), bn=True, conv=True,
            rules=((nn.Conv1d, _conv1d_rule),)),
]


def over_cases(*, where: Callable[[RefCase], bool] | None = None):
    """``pytest.mark.parametrize`` of the ``case`` fixture over CASES (those passing ``where``)."""
    chosen = [c for c in CASES if where is None or where(c)]
    return pytest.mark.parametrize("case", chosen, indirect=True, ids=str)


@pytest.fixture
def case(request):
    """A :class:`RefCase` (parametrise with :func:`over_cases`), its rules registered."""
    from kfacbound.curvature.modules import register_module_rule, unregister_module_rule

    ref: RefCase = request.param
    previous = [(cls, register_module_rule(cls, make())) for cls, make in ref.rules]
    try:
        yield ref
    finally:
        for cls, rule in reversed(previous):
            if rule is None:
                unregister_module_rule(cls)
            else:
                register_module_rule(cls, rule)
