"""ResNet / WideResNet zoo entries: shapes, parameter counts, BN folding, torchvision-style import,
checkpoint round trips and training on Fashion-MNIST.

References are independent of kfacbound: parameter counts from the papers (He et al. 2016,
Table 6; torchvision's published ResNet-18 count) and a transcription of torchvision's
``resnet.py`` written here (torchvision itself cannot be imported with this CPU torch).
"""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner
from torch import nn

from kfacbound.checkpoint import import_state_dict, load_checkpoint, save_checkpoint
from kfacbound.cli import main
from kfacbound.errors import KfacboundError
from kfacbound.models import build_model, count_parameters, fold_batchnorm, resolve_spec

from .conftest import requires_fashion


# ------------------------------------------------------------------ torchvision transcription
class TVBasicBlock(nn.Module):
    """torchvision.models.resnet.BasicBlock (v0.28), verbatim apart from the width arguments."""

    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class TVResNet(nn.Module):
    """torchvision.models.resnet.ResNet with BasicBlock; ``widths`` replaces 64-128-256-512 and
    ``cifar_stem`` the common CIFAR modification (conv1 3×3 stride 1, no max-pool)."""

    def __init__(self, layers, widths=(64, 128, 256, 512), num_classes=1000, in_channels=3,
                 cifar_stem=False):
        super().__init__()
        self.inplanes = widths[0]
        if cifar_stem:
            self.conv1 = nn.Conv2d(in_channels, widths[0], 3, stride=1, padding=1, bias=False)
        else:
            self.conv1 = nn.Conv2d(in_channels, widths[0], 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.Identity() if cifar_stem else nn.MaxPool2d(3, stride=2, padding=1)
        self.stages = []
        for i, (n, w) in enumerate(zip(layers, widths, strict=True), start=1):
            setattr(self, f"layer{i}", self._make_layer(w, n, stride=1 if i == 1 else 2))
            self.stages.append(f"layer{i}")
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(widths[-1], num_classes)

    def _make_layer(self, planes, blocks, stride):
        downsample = None
        if stride != 1 or self.inplanes != planes:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes))
        layers = [TVBasicBlock(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes
        layers += [TVBasicBlock(planes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for name in self.stages:
            x = getattr(self, name)(x)
        return self.fc(torch.flatten(self.avgpool(x), 1))


def _randomise(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BN statistics and affine parameters, eval mode."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            c = m.num_features
            m.running_mean.copy_(torch.randn(c, generator=g) * 0.3)
            m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(c, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(c, generator=g) * 0.2)
            m.num_batches_tracked.fill_(7)
    return model.eval()


# ------------------------------------------------------------------ zoo
def test_names_resolve_to_specs():
    r20 = resolve_spec("resnet20", [3, 32, 32], 10)
    assert r20["arch"] == "resnet" and r20["blocks"] == [3, 3, 3] and r20["bn"] is True
    assert r20["channels"] == [16, 32, 64] and r20["stem"] == "cifar"
    assert resolve_spec("resnet8-nobn", [1, 28, 28], 10)["bn"] is False
    assert resolve_spec("resnet8", [1, 28, 28], 10, bn=False)["bn"] is False
    wrn = resolve_spec("wrn-16-4", [3, 32, 32], 10)
    assert (wrn["arch"], wrn["depth"], wrn["widen"]) == ("wrn", 16, 4)
    assert resolve_spec({"arch": "resnet20", "bn": False}, [3, 32, 32], 10)["blocks"] == [3, 3, 3]
    for bad in ("resnet9", "wrn-11-2", "resnet"):
        with pytest.raises(KfacboundError):
            resolve_spec(bad, [3, 32, 32], 10) if bad != "resnet" else resolve_spec(bad, [784], 10)
    with pytest.raises(KfacboundError, match="equal length"):
        resolve_spec("resnet8", [3, 32, 32], 10, channels=[8, 16])


def _projection_params(widths, bn=True):
    """1×1 projection convs (+ BN γ, β) where the width changes: He et al.'s option B."""
    return sum(a * b + (2 * b if bn else 0) for a, b in zip(widths[:-1], widths[1:], strict=True))


def test_parameter_counts_match_the_papers():
    # He et al. (2016), ResNet-20 with option-A shortcuts: 269,722 parameters ("0.27M"); ours
    # has option-B projections at the two width changes.
    r20 = build_model(resolve_spec("resnet20", [3, 32, 32], 10), seed=0)
    assert count_parameters(r20) == 269_722 + _projection_params([16, 32, 64])
    # torchvision's ResNet-18 (ImageNet, 1000 classes): 11,689,512 parameters
    r18 = build_model(resolve_spec("resnet18", [3, 224, 224], 1000), seed=0)
    assert count_parameters(r18) == 11_689_512
    # Zagoruyko & Komodakis, Table 1/4: WRN-16-4 has 2.7M parameters
    wrn = build_model(resolve_spec("wrn-16-4", [3, 32, 32], 10), seed=0)
    assert abs(count_parameters(wrn) - 2.75e6) < 0.05e6
    # without BN: no BN parameters, a bias per conv channel instead
    nobn = build_model(resolve_spec("resnet8-nobn", [3, 32, 32], 10), seed=0)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in nobn.modules())
    assert all(m.bias is not None for m in nobn.modules() if isinstance(m, nn.Conv2d))


@pytest.mark.parametrize("name", ["resnet8", "resnet8-nobn", "wrn-10-2", "wrn-10-2-nobn"])
@pytest.mark.parametrize("shape", [(3, 32, 32), (1, 28, 28)])
def test_forward_shapes_and_no_inplace(name, shape):
    model = build_model(resolve_spec(name, list(shape), 10), seed=0).eval()
    assert model(torch.randn(2, *shape)).shape == (2, 10)
    assert not any(getattr(m, "inplace", False) for m in model.modules())


def test_resnet_matches_torchvision_transcription():
    """Same weights, same function: the zoo's ResNet is torchvision's (names and maths)."""
    spec = resolve_spec({"arch": "resnet", "blocks": [2, 1, 1, 1], "channels": [8, 8, 16, 16],
                         "stem": "imagenet"}, [3, 40, 40], 7)
    tv = _randomise(TVResNet([2, 1, 1, 1], (8, 8, 16, 16), num_classes=7))
    ours = build_model(spec, seed=0).eval()
    assert list(ours.state_dict()) == list(tv.state_dict())
    ours.load_state_dict(tv.state_dict())
    x = torch.randn(3, 3, 40, 40)
    torch.testing.assert_close(ours(x), tv(x))


def test_fold_batchnorm_resnet_same_function_and_wrn_refused():
    spec = resolve_spec({"arch": "resnet", "blocks": [1, 2], "channels": [4, 6]}, [2, 8, 8], 3)
    model = _randomise(build_model(spec, seed=0)).double()
    folded = fold_batchnorm(model)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert [n for n, m in folded.named_modules() if isinstance(m, nn.Conv2d)] == \
        [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    x = torch.randn(4, 2, 8, 8, dtype=torch.float64)
    torch.testing.assert_close(folded(x), model(x))
    wrn = build_model(resolve_spec("wrn-10-1", [1, 8, 8], 3), seed=0)
    with pytest.raises(KfacboundError, match="layer1.0.bn1"):
        fold_batchnorm(wrn)


# ------------------------------------------------------------------ import and checkpoints
def test_import_torchvision_state_dict(tmp_path):
    tv = _randomise(TVResNet([1, 1, 1], (4, 8, 8), num_classes=10, cifar_stem=True), seed=3)
    init = TVResNet([1, 1, 1], (4, 8, 8), num_classes=10, cifar_stem=True).eval()
    torch.save(tv.state_dict(), tmp_path / "tv.pt")
    # DataParallel prefix and an old-style state_dict without num_batches_tracked
    old = {f"module.{k}": v for k, v in init.state_dict().items()
           if not k.endswith("num_batches_tracked")}
    torch.save(old, tmp_path / "init.pt")
    spec = resolve_spec({"arch": "resnet", "blocks": [1, 1, 1], "channels": [4, 8, 8]},
                        [3, 32, 32], 10)
    ckpt = import_state_dict(tmp_path / "tv.pt", spec, tmp_path / "r.kfb",
                             init_path=tmp_path / "init.pt", loss="ce")
    x = torch.randn(5, 3, 32, 32)
    torch.testing.assert_close(ckpt.model(x), tv(x))
    torch.testing.assert_close(ckpt.init_model(x), init(x))
    assert int(ckpt.model.layer2[0].downsample[1].num_batches_tracked) == 7


def test_import_mismatch_is_one_line_listing_keys(tmp_path):
    tv = TVResNet([1, 1], (4, 8), num_classes=10, cifar_stem=True)
    torch.save(tv.state_dict(), tmp_path / "tv.pt")
    spec = resolve_spec({"arch": "resnet", "blocks": [1, 1, 1], "channels": [4, 8, 8]},
                        [3, 32, 32], 10)
    with pytest.raises(KfacboundError) as err:
        import_state_dict(tmp_path / "tv.pt", spec, tmp_path / "r.kfb")
    msg = str(err.value)
    assert "\n" not in msg and "missing" in msg and "layer3.0.conv1.weight" in msg
    assert not (tmp_path / "r.kfb").exists()
    state = dict(tv.state_dict(), **{"extra.weight": torch.zeros(1)})
    torch.save(state, tmp_path / "extra.pt")
    spec2 = resolve_spec({"arch": "resnet", "blocks": [1, 1], "channels": [4, 8]}, [3, 32, 32],
                         10)
    with pytest.raises(KfacboundError, match=r"unexpected 1 \(extra.weight\)"):
        import_state_dict(tmp_path / "extra.pt", spec2, tmp_path / "r.kfb")
    imagenet = TVResNet([1, 1], (4, 8), num_classes=10)
    torch.save(imagenet.state_dict(), tmp_path / "in.pt")
    with pytest.raises(KfacboundError, match="stem"):
        import_state_dict(tmp_path / "in.pt", spec2, tmp_path / "r.kfb")
    res = CliRunner().invoke(main, ["import", str(tmp_path / "tv.pt"), "--arch", "resnet8",
                                    "--input-shape", "3,32,32", "--num-outputs", "10",
                                    "-o", str(tmp_path / "c.kfb")])
    assert res.exit_code == 2 and res.output.count("\n") == 1 and "error:" in res.output


@pytest.mark.parametrize("name", ["resnet8", "resnet8-nobn", "wrn-10-2", "wrn-10-1-nobn"])
def test_checkpoint_roundtrip(tmp_path, name):
    spec = resolve_spec(name, [1, 28, 28], 10)
    model = build_model(spec, seed=1)
    if spec["bn"]:
        _randomise(model)
    init = build_model(spec, seed=2)
    path = save_checkpoint(tmp_path / "m.kfb", model, spec, init_model=init, loss="ce")
    ckpt = load_checkpoint(path)
    assert ckpt.spec == spec and type(ckpt.model) is type(model)
    x = torch.randn(3, 1, 28, 28)
    assert torch.equal(ckpt.model(x), model.eval()(x))
    assert torch.equal(ckpt.init_model(x), init.eval()(x))
    for (ka, va), (kb, vb) in zip(ckpt.model.state_dict().items(), model.state_dict().items(),
                                  strict=True):
        assert ka == kb and torch.equal(va, vb)


# ------------------------------------------------------------------ training
@requires_fashion
def test_train_resnet8_on_fashion_mnist(tmp_path):
    out = tmp_path / "r8.kfb"
    res = CliRunner().invoke(main, ["train", "--arch", "resnet8", "--dataset", "fashion-mnist",
                                    "--subset", "300", "--epochs", "3", "--batch-size", "20",
                                    "--no-progress", "-o", str(out)])
    assert res.exit_code == 0, res.output
    ckpt = load_checkpoint(out)
    assert ckpt.spec["alias"] == "resnet8" and ckpt.spec["input_shape"] == [1, 28, 28]
    # its own evaluation against ours: BN in eval mode, the recorded training error
    from kfacbound.data import load_dataset

    data = load_dataset("fashion-mnist", subset=300)
    with torch.no_grad():
        err = int((ckpt.model(data.X).argmax(1) != data.y).sum()) / len(data)
    assert abs(err - ckpt.metrics["train_error"]) < 1e-12
    assert err < 0.6  # chance is 0.9
    moved = [n for n, m in ckpt.model.named_modules() if isinstance(m, nn.BatchNorm2d)
             and not torch.equal(m.running_var, torch.ones_like(m.running_var))]
    assert "layer2.0.downsample.1" in moved
