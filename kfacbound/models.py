"""Model zoo: architecture specs that round-trip through JSON, and their ``nn.Module``s.

A spec is a plain JSON-serialisable dict with an ``"arch"`` key. :func:`resolve_spec` fills in
every default, so a resolved spec describes the network completely; :func:`build_model` turns it
into an ``nn.Sequential`` whose children have readable names (``fc1``, ``bn1``, ``act1``, ...,
``out``) — or, for ``resnet``/``wrn``, a :class:`ResNet`/:class:`WideResNet` with torchvision's
nested names (``layer1.0.conv1``) — and these module paths name the curvature factors.

Architectures
-------------
- ``fc``: ``Flatten`` then Linear → [BatchNorm1d] → activation for each hidden width, then a Linear
  output layer. Activation relu/tanh/sigmoid/linear; bias on/off.
- ``lenet5``: conv(6, 5×5, pad 2) → pool → conv(16, 5×5) → pool → fc 120 → fc 84 → out,
  optional BatchNorm2d/1d after each conv/hidden linear.
- ``cnn``: configurable conv stack (channels, kernel, padding, pooling) and a dense head.
- ``resnet``: He et al.'s residual network of post-activation basic blocks (:class:`ResNet`,
  :class:`BasicBlock`), ``blocks`` per stage, ``channels`` per stage, ``stem`` "cifar"
  (conv 3×3, stride 1) or "imagenet" (conv 7×7 stride 2 + max-pool 3×3 stride 2, torchvision's).
  Stage i > 1 halves the resolution; a block whose stride or width changes gets a 1×1 projection
  shortcut (``downsample``, He et al.'s option B), all other shortcuts are identities. Submodule
  names are torchvision's (``conv1``, ``bn1``, ``layer1.0.conv1``, ``layer1.0.bn1``,
  ``layer2.0.downsample.0``/``.1``, ``fc``), so torchvision state_dicts load unchanged.
- ``wrn``: Zagoruyko & Komodakis' wide ResNet WRN-``depth``-``widen`` (:class:`WideResNet`,
  pre-activation blocks :class:`WideBasic`, (depth − 4)/6 blocks per stage, widths 16·k, 32·k,
  64·k).

ResNets and WRNs take ``bn`` (default True, BatchNorm2d after/before every conv); with
``bn=False`` every BatchNorm is dropped (an ``nn.Identity`` keeps its name, it has no
parameters) and the convs get biases (``bias`` = null means "bias iff no BN"). Activations are
never in-place (hooks need the pre-activation tensors), and the residual sum is out-of-place.

Names parsed by :func:`resolve_spec`: ``resnet<D>`` with D = 6n + 2 (``resnet8``, ``resnet20``,
``resnet32``, …: n blocks per stage, widths 16, 32, 64, CIFAR stem; He et al. 2016, §4.2),
``resnet18`` and ``resnet34`` (torchvision's layouts, blocks 2-2-2-2 / 3-4-6-3, widths 64…512,
ImageNet stem), ``wrn-<D>-<K>`` with D = 6n + 4 (``wrn-10-2``, ``wrn-16-4``, ``wrn-28-10``); a
``-nobn`` suffix (``resnet8-nobn``) sets ``bn=False``. Input channels and size come from the
dataset (3×32×32 CIFAR-10, 1×28×28 Fashion-MNIST: global average pooling makes any size work).

Aliases (Dziugaite & Roy 2017): ``T-600``, ``T-1200``, ``T-300-300``, ``T-600-600`` are ReLU ``fc``
networks with their initialisation (truncated normal, std 0.04; first-layer bias 0.1). The number
of outputs is 1 for binary tasks and C otherwise; it comes from the dataset.

Initialisation schemes: ``default`` (PyTorch), ``glorot`` (Glorot/Xavier normal, zero bias; the
Hessian-rank papers), ``dr`` (Dziugaite & Roy).
"""

from __future__ import annotations

import copy
import json
import math
import re
from collections import OrderedDict
from typing import Any

import torch
from torch import nn

from .curvature.modules import is_batchnorm, is_curvature_layer, rule_for
from .errors import KfacboundError

ACTIVATIONS = ("relu", "tanh", "sigmoid", "linear")
INITS = ("default", "glorot", "dr")
POOLS = ("max", "avg", "none")
STEMS = ("cifar", "imagenet")

ALIASES: dict[str, dict[str, Any]] = {
    "T-600": {"arch": "fc", "widths": [600], "activation": "relu", "init": "dr"},
    "T-1200": {"arch": "fc", "widths": [1200], "activation": "relu", "init": "dr"},
    "T-300-300": {"arch": "fc", "widths": [300, 300], "activation": "relu", "init": "dr"},
    "T-600-600": {"arch": "fc", "widths": [600, 600], "activation": "relu", "init": "dr"},
}

_DEFAULTS: dict[str, dict[str, Any]] = {
    "fc": {
        "widths": [100],
        "activation": "relu",
        "bias": True,
        "bn": False,
        "init": "default",
    },
    "lenet5": {"activation": "relu", "pool": "max", "bn": False, "init": "default"},
    "cnn": {
        "channels": [16, 32],
        "kernel": 3,
        "padding": 1,
        "pool": "max",
        "widths": [],
        "activation": "relu",
        "bias": True,
        "bn": False,
        "init": "default",
    },
    "resnet": {
        "blocks": [1, 1, 1],
        "channels": [16, 32, 64],
        "stem": "cifar",
        "activation": "relu",
        "bias": None,
        "bn": True,
        "init": "default",
    },
    "wrn": {
        "depth": 10,
        "widen": 2,
        "activation": "relu",
        "bias": None,
        "bn": True,
        "init": "default",
    },
}

ARCHS = tuple(_DEFAULTS)

_TORCHVISION_RESNETS: dict[int, list[int]] = {18: [2, 2, 2, 2], 34: [3, 4, 6, 3]}


def _zoo_name(name: str) -> dict[str, Any] | None:
    """The partial spec a parsed zoo name stands for (see the module docstring), or None."""
    base, bn = (name[:-5], False) if name.endswith("-nobn") else (name, None)
    spec: dict[str, Any] | None = None
    if m := re.fullmatch(r"resnet(\d+)", base):
        depth = int(m.group(1))
        if depth in _TORCHVISION_RESNETS:
            spec = {"arch": "resnet", "blocks": list(_TORCHVISION_RESNETS[depth]),
                    "channels": [64, 128, 256, 512], "stem": "imagenet"}
        elif depth >= 8 and (depth - 2) % 6 == 0:
            n = (depth - 2) // 6
            spec = {"arch": "resnet", "blocks": [n, n, n], "channels": [16, 32, 64],
                    "stem": "cifar"}
    elif m := re.fullmatch(r"wrn-(\d+)-(\d+)", base):
        depth, widen = int(m.group(1)), int(m.group(2))
        if depth >= 10 and (depth - 4) % 6 == 0 and widen >= 1:
            spec = {"arch": "wrn", "depth": depth, "widen": widen}
    if spec is None:
        return None
    if bn is not None:
        spec["bn"] = bn
    return spec


def _named_spec(name: str) -> dict[str, Any] | None:
    """An alias or parsed zoo name as a partial spec carrying ``alias``; None if neither."""
    if name in ALIASES:
        return dict(copy.deepcopy(ALIASES[name]), alias=name)
    spec = _zoo_name(name)
    return None if spec is None else dict(spec, alias=name)


def list_architectures() -> dict[str, str]:
    """Names accepted by :func:`resolve_spec` with a one-line description."""
    out = {
        "fc": "fully connected: widths, activation, bias, bn",
        "lenet5": "LeNet-5 (conv 6-16, fc 120-84), optional BatchNorm",
        "cnn": "configurable conv stack + dense head: channels, kernel, pool, widths, bn",
    }
    out["resnet"] = ("He et al. ResNet of basic blocks: blocks, channels, stem cifar|imagenet, "
                     "bn (torchvision names)")
    out["wrn"] = "wide ResNet WRN-depth-widen (pre-activation blocks), bn"
    for name, spec in ALIASES.items():
        out[name] = f"Dziugaite & Roy MLP, hidden {spec['widths']}, ReLU, their init"
    out["resnet8, resnet20, resnet<6n+2>"] = "CIFAR ResNet (He et al. 2016), 16-32-64, BN"
    out["resnet18, resnet34"] = "torchvision's ResNet-18/34 layout (ImageNet stem), BN"
    out["wrn-10-2, wrn-16-4, wrn-<6n+4>-<k>"] = "wide ResNet (Zagoruyko & Komodakis), BN"
    out["<name>-nobn"] = "any ResNet/WRN name without BatchNorm (convs get biases)"
    return out


def resolve_spec(
    arch: str | dict[str, Any],
    input_shape: list[int] | tuple[int, ...] | None = None,
    num_outputs: int | None = None,
    **overrides: Any,
) -> dict[str, Any]:
    """A complete architecture spec from a name or partial dict plus data shape.

    ``overrides`` whose value is ``None`` are ignored, so CLI options can be passed through.
    """
    if isinstance(arch, str):
        named = _named_spec(arch)
        if named is not None:
            spec = named
        elif arch in _DEFAULTS:
            spec = {"arch": arch}
        else:
            raise KfacboundError(
                f"unknown architecture {arch!r}; known: {', '.join(list_architectures())}"
            )
    else:
        spec = copy.deepcopy(dict(arch))
        named = _named_spec(str(spec.get("arch"))) if spec.get("arch") not in _DEFAULTS else None
        if named is not None:
            spec.pop("arch")
            spec = {**named, **spec}
    name = spec.get("arch")
    if name not in _DEFAULTS:
        raise KfacboundError(
            f"unknown architecture {name!r}; known: {', '.join(list_architectures())}"
        )
    for key, value in _DEFAULTS[name].items():
        spec.setdefault(key, copy.deepcopy(value))
    for key, value in overrides.items():
        if value is not None:
            spec[key] = value
    if input_shape is not None:
        spec["input_shape"] = [int(s) for s in input_shape]
    if num_outputs is not None:
        spec["num_outputs"] = int(num_outputs)
    _validate(spec)
    return spec


def _validate(spec: dict[str, Any]) -> None:
    name = spec["arch"]
    if "input_shape" not in spec or "num_outputs" not in spec:
        raise KfacboundError(f"architecture spec needs input_shape and num_outputs: {spec}")
    if spec["num_outputs"] < 1:
        raise KfacboundError("num_outputs must be at least 1")
    if spec.get("activation", "relu") not in ACTIVATIONS:
        raise KfacboundError(
            f"unknown activation {spec['activation']!r}; choose from {', '.join(ACTIVATIONS)}"
        )
    if spec.get("init", "default") not in INITS:
        raise KfacboundError(f"unknown init {spec['init']!r}; choose from {', '.join(INITS)}")
    if spec.get("pool", "max") not in POOLS:
        raise KfacboundError(f"unknown pool {spec['pool']!r}; choose from {', '.join(POOLS)}")
    if any(int(w) < 1 for w in spec.get("widths", [])):
        raise KfacboundError(f"hidden widths must be positive: {spec['widths']}")
    if name in ("lenet5", "cnn", "resnet", "wrn") and len(spec["input_shape"]) != 3:
        raise KfacboundError(
            f"{name} needs image inputs (channels, height, width); got shape {spec['input_shape']}."
            " Do not pass --flatten for convolutional networks."
        )
    if spec.get("bias", True) not in (True, False, None):
        raise KfacboundError(f"bias must be true, false or null, not {spec['bias']!r}")
    if name == "resnet":
        blocks, channels = spec["blocks"], spec["channels"]
        if (not isinstance(blocks, list) or not isinstance(channels, list) or not blocks
                or len(blocks) != len(channels)):
            raise KfacboundError(
                f"resnet needs lists blocks and channels of equal length (one entry per stage); "
                f"got blocks={blocks}, channels={channels}"
            )
        if any(int(b) < 1 for b in blocks) or any(int(c) < 1 for c in channels):
            raise KfacboundError(f"resnet blocks and channels must be positive: {blocks}, "
                                 f"{channels}")
        if spec["stem"] not in STEMS:
            raise KfacboundError(f"unknown stem {spec['stem']!r}; choose from {', '.join(STEMS)}")
    if name == "wrn":
        depth, widen = int(spec["depth"]), int(spec["widen"])
        if depth < 10 or (depth - 4) % 6 != 0 or widen < 1:
            raise KfacboundError(
                f"wrn needs depth = 6n + 4 >= 10 and widen >= 1 (e.g. wrn-10-2, wrn-16-4); got "
                f"depth {spec['depth']}, widen {spec['widen']}"
            )


def _activation(name: str) -> nn.Module:
    return {
        "relu": nn.ReLU,
        "tanh": nn.Tanh,
        "sigmoid": nn.Sigmoid,
        "linear": nn.Identity,
    }[name]()


def _pool(name: str) -> nn.Module | None:
    if name == "max":
        return nn.MaxPool2d(2)
    if name == "avg":
        return nn.AvgPool2d(2)
    return None


def _dense_stack(
    layers: OrderedDict, in_features: int, widths: list[int], spec: dict[str, Any], start: int
) -> int:
    """Append Linear → [BN] → activation blocks; return the last width."""
    bias = spec.get("bias", True)
    for i, width in enumerate(widths, start=start):
        layers[f"fc{i}"] = nn.Linear(in_features, int(width), bias=bias)
        if spec["bn"]:
            layers[f"bn{i}"] = nn.BatchNorm1d(int(width))
        if spec["activation"] != "linear":
            layers[f"act{i}"] = _activation(spec["activation"])
        in_features = int(width)
    return in_features


def _norm(bn: bool, channels: int) -> nn.Module:
    """BatchNorm2d, or a parameter-free ``nn.Identity`` standing in for it (``bn=False``)."""
    return nn.BatchNorm2d(channels) if bn else nn.Identity()


class BasicBlock(nn.Module):
    """He et al.'s post-activation basic block, with torchvision's submodule names.

        y = act2( bn2(conv2( act1(bn1(conv1(x))) )) + shortcut(x) ),

    conv1 3×3 with ``stride``, conv2 3×3; shortcut(x) = x, or ``downsample(x)`` =
    Sequential(conv 1×1 with ``stride`` [, BatchNorm2d]) when the stride or the width changes
    (option B). The sum is out-of-place and the activations are not in-place, so forward hooks see
    every layer's own output. ``fold_pairs`` lists the (layer, BN) pairs in which BN directly
    follows the layer (:func:`fold_batchnorm`).
    """

    fold_pairs = (("conv1", "bn1"), ("conv2", "bn2"))

    def __init__(self, in_channels: int, channels: int, stride: int, bn: bool, bias: bool,
                 activation: str):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride=stride, padding=1, bias=bias)
        self.bn1 = _norm(bn, channels)
        self.act1 = _activation(activation)
        self.conv2 = nn.Conv2d(channels, channels, 3, stride=1, padding=1, bias=bias)
        self.bn2 = _norm(bn, channels)
        self.act2 = _activation(activation)
        self.downsample: nn.Sequential | None = None
        if stride != 1 or in_channels != channels:
            proj: list[nn.Module] = [nn.Conv2d(in_channels, channels, 1, stride=stride,
                                               bias=bias)]
            if bn:
                proj.append(nn.BatchNorm2d(channels))
            self.downsample = nn.Sequential(*proj)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.act2(out + identity)


class ResNet(nn.Module):
    """conv1 → bn1 → act [→ maxpool] → layer1 … layerS → avgpool → flatten → fc.

    Stem "cifar": conv 3×3, stride 1, padding 1; "imagenet": conv 7×7, stride 2, padding 3, then
    max-pool 3×3 stride 2 padding 1 (torchvision). ``layer{i}`` is an ``nn.Sequential`` of
    ``blocks[i]`` :class:`BasicBlock` s of width ``channels[i]``; the first block of stages
    i > 1 has stride 2. avgpool is global (``AdaptiveAvgPool2d(1)``), fc the linear classifier.
    """

    fold_pairs = (("conv1", "bn1"),)

    def __init__(self, in_channels: int, num_outputs: int, blocks: list[int],
                 channels: list[int], stem: str = "cifar", bn: bool = True, bias: bool = False,
                 activation: str = "relu"):
        super().__init__()
        c0 = int(channels[0])
        if stem == "imagenet":
            self.conv1 = nn.Conv2d(in_channels, c0, 7, stride=2, padding=3, bias=bias)
        else:
            self.conv1 = nn.Conv2d(in_channels, c0, 3, stride=1, padding=1, bias=bias)
        self.bn1 = _norm(bn, c0)
        self.act = _activation(activation)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1) if stem == "imagenet" else None
        c = c0
        for i, (n, width) in enumerate(zip(blocks, channels, strict=True), start=1):
            stage = [BasicBlock(c if j == 0 else int(width), int(width),
                                2 if (i > 1 and j == 0) else 1, bn, bias, activation)
                     for j in range(int(n))]
            self.add_module(f"layer{i}", nn.Sequential(*stage))
            c = int(width)
        self.num_stages = len(blocks)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(c, num_outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.bn1(self.conv1(x)))
        if self.maxpool is not None:
            x = self.maxpool(x)
        for i in range(1, self.num_stages + 1):
            x = getattr(self, f"layer{i}")(x)
        return self.fc(self.flatten(self.avgpool(x)))


class WideBasic(nn.Module):
    """Pre-activation wide block (Zagoruyko & Komodakis 2016; He et al. 2016, "identity
    mappings"):

        h = act1(bn1(x)),   y = conv2( act2(bn2(conv1(h))) ) + shortcut,

    conv1 3×3 with ``stride``, conv2 3×3; shortcut = x, or ``downsample(h)`` = Sequential(conv
    1×1 with ``stride``) of the pre-activated input when the stride or the width changes (as in
    the authors' code). BN precedes each conv here, so it cannot be folded into one exactly.
    """

    def __init__(self, in_channels: int, channels: int, stride: int, bn: bool, bias: bool,
                 activation: str):
        super().__init__()
        self.bn1 = _norm(bn, in_channels)
        self.act1 = _activation(activation)
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride=stride, padding=1, bias=bias)
        self.bn2 = _norm(bn, channels)
        self.act2 = _activation(activation)
        self.conv2 = nn.Conv2d(channels, channels, 3, stride=1, padding=1, bias=bias)
        self.downsample: nn.Sequential | None = None
        if stride != 1 or in_channels != channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, channels, 1, stride=stride, bias=bias))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act1(self.bn1(x))
        out = self.conv2(self.act2(self.bn2(self.conv1(h))))
        identity = x if self.downsample is None else self.downsample(h)
        return out + identity


class WideResNet(nn.Module):
    """WRN-d-k: conv1 (3×3, 16) → layer1..3 → bn_final → act → avgpool → flatten → fc.

    Stage i holds n = (d − 4)/6 :class:`WideBasic` blocks of width (16, 32, 64)[i]·k; stages 2
    and 3 start with stride 2.
    """

    def __init__(self, in_channels: int, num_outputs: int, depth: int, widen: int,
                 bn: bool = True, bias: bool = False, activation: str = "relu"):
        super().__init__()
        n = (int(depth) - 4) // 6
        self.conv1 = nn.Conv2d(in_channels, 16, 3, stride=1, padding=1, bias=bias)
        c = 16
        for i, width in enumerate((16 * widen, 32 * widen, 64 * widen), start=1):
            stage = [WideBasic(c if j == 0 else width, width, 2 if (i > 1 and j == 0) else 1,
                               bn, bias, activation) for j in range(n)]
            self.add_module(f"layer{i}", nn.Sequential(*stage))
            c = width
        self.bn_final = _norm(bn, c)
        self.act = _activation(activation)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(c, num_outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(self.conv1(x))))
        return self.fc(self.flatten(self.avgpool(self.act(self.bn_final(x)))))


def _residual_model(spec: dict[str, Any]) -> nn.Module:
    bn = bool(spec["bn"])
    bias = (not bn) if spec.get("bias") is None else bool(spec["bias"])
    in_channels = int(spec["input_shape"][0])
    if spec["arch"] == "resnet":
        return ResNet(in_channels, spec["num_outputs"], [int(b) for b in spec["blocks"]],
                      [int(c) for c in spec["channels"]], spec["stem"], bn, bias,
                      spec["activation"])
    return WideResNet(in_channels, spec["num_outputs"], int(spec["depth"]), int(spec["widen"]),
                      bn, bias, spec["activation"])


def build_model(spec: dict[str, Any], seed: int | None = None) -> nn.Module:
    """The network a resolved spec describes, initialised with ``spec['init']``.

    An ``nn.Sequential`` for fc/lenet5/cnn, a :class:`ResNet` / :class:`WideResNet` for
    resnet/wrn. ``seed`` seeds the initialisation through a private generator (global RNG
    untouched).
    """
    spec = resolve_spec(spec) if "input_shape" not in spec else spec
    _validate(spec)
    name = spec["arch"]
    shape = spec["input_shape"]
    if name in ("resnet", "wrn"):
        model = _residual_model(spec)
        initialize(model, spec["init"], seed=seed)
        return model
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    if name == "fc":
        layers["flatten"] = nn.Flatten()
        width = _dense_stack(layers, math.prod(shape), spec["widths"], spec, 1)
        layers["out"] = nn.Linear(width, spec["num_outputs"], bias=spec["bias"])
    else:
        if name == "lenet5":
            convs = [(6, 5, 2), (16, 5, 0)]
            widths, bias = [120, 84], True
        else:
            convs = [(int(c), int(spec["kernel"]), int(spec["padding"])) for c in spec["channels"]]
            widths, bias = list(spec["widths"]), spec["bias"]
        c, h, w = shape
        for i, (out_c, k, pad) in enumerate(convs, start=1):
            layers[f"conv{i}"] = nn.Conv2d(c, out_c, k, padding=pad, bias=bias)
            h, w = h + 2 * pad - k + 1, w + 2 * pad - k + 1
            if spec["bn"]:
                layers[f"bn_conv{i}"] = nn.BatchNorm2d(out_c)
            if spec["activation"] != "linear":
                layers[f"act_conv{i}"] = _activation(spec["activation"])
            pool = _pool(spec["pool"])
            if pool is not None:
                layers[f"pool{i}"] = pool
                h, w = h // 2, w // 2
            if h < 1 or w < 1:
                raise KfacboundError(f"input {shape} is too small for {name}")
            c = out_c
        layers["flatten"] = nn.Flatten()
        width = _dense_stack(
            layers, c * h * w, widths, dict(spec, bias=bias), 1
        )
        layers["out"] = nn.Linear(width, spec["num_outputs"], bias=bias)
    model = nn.Sequential(layers)
    initialize(model, spec["init"], seed=seed)
    return model


def _truncated_normal_(t: torch.Tensor, std: float, gen: torch.Generator) -> None:
    """Normal(0, std²) truncated at ±2 std (TensorFlow's truncated_normal), by resampling."""
    with torch.no_grad():
        out = torch.empty_like(t)
        filled = torch.zeros_like(t, dtype=torch.bool)
        while not bool(filled.all()):
            draw = torch.randn(t.shape, generator=gen, dtype=t.dtype) * std
            take = (~filled) & (draw.abs() <= 2 * std)
            out[take] = draw[take]
            filled |= take
        t.copy_(out)


def initialize(model: nn.Module, scheme: str, seed: int | None = None) -> None:
    """Initialise weights in place. ``seed=None`` draws from torch's global RNG."""
    gen = torch.Generator()
    if seed is None:
        gen.manual_seed(int(torch.randint(0, 2**62, (1,)).item()))
    else:
        gen.manual_seed(int(seed))
    first = True
    for module in model.modules():
        if is_curvature_layer(module):
            w = module.weight
            with torch.no_grad():
                if scheme == "default":
                    fan_in = w[0].numel()
                    bound = 1.0 / math.sqrt(fan_in)
                    # PyTorch's default: kaiming_uniform(a=√5) == U(−1/√fan_in, 1/√fan_in).
                    w.copy_((torch.rand(w.shape, generator=gen) * 2 - 1) * bound)
                    if module.bias is not None:
                        module.bias.copy_((torch.rand(module.bias.shape, generator=gen) * 2 - 1)
                                          * bound)
                elif scheme == "glorot":
                    fan_in = w[0].numel()
                    fan_out = w.shape[0] * (w[0, 0].numel() if w.ndim > 2 else 1)
                    std = math.sqrt(2.0 / (fan_in + fan_out))
                    w.copy_(torch.randn(w.shape, generator=gen) * std)
                    if module.bias is not None:
                        module.bias.zero_()
                else:  # dr
                    _truncated_normal_(w, 0.04, gen)
                    if module.bias is not None:
                        module.bias.fill_(0.1 if first else 0.0)
            first = False
        elif is_batchnorm(module):
            module.reset_parameters()
            module.reset_running_stats()


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def parameters_per_layer(model: nn.Module) -> list[tuple[str, str, int]]:
    """(module path, module type, number of parameters) for every module owning parameters."""
    rows = []
    for name, module in model.named_modules():
        own = sum(p.numel() for p in module.parameters(recurse=False))
        if own:
            rows.append((name, type(module).__name__, own))
    return rows


def spec_to_json(spec: dict[str, Any]) -> str:
    return json.dumps(spec, sort_keys=True)


def spec_from_json(text: str) -> dict[str, Any]:
    try:
        spec = json.loads(text)
    except json.JSONDecodeError as exc:
        raise KfacboundError(f"architecture spec is not valid JSON: {exc}") from None
    return resolve_spec(spec)


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every eval-mode BatchNorm folded into the layer before it.

    BN(z) = s ⊙ (z − μ) + β with s = γ / √(σ² + ε) per channel, so for z = W a + b the fold is
    W' = diag(s) W, b' = s ⊙ (b − μ) + β (a bias is added when the layer had none). The folded
    network computes the same function as ``model.eval()``; module paths of the other layers are
    unchanged. Where BN may sit: directly after a Linear/Conv2d inside an ``nn.Sequential`` (the
    BN entry is removed, as in every fc/lenet5/cnn network and ResNet's ``downsample``), or as a
    (layer, BN) pair a module lists in its ``fold_pairs`` (:class:`ResNet`, :class:`BasicBlock`;
    the BN is replaced by ``nn.Identity``). Any other BatchNorm (pre-activation blocks of
    :class:`WideResNet`, BN after a pooling layer) raises :class:`KfacboundError`: no exact fold
    exists there (zero padding of the next conv would see the shifted border).
    """
    model = copy.deepcopy(model).eval()
    return _fold_module(model, "")


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _fold_module(module: nn.Module, path: str) -> nn.Module:
    if isinstance(module, nn.Sequential):
        module = _fold_sequential(module, path)
    else:
        for layer_name, bn_name in getattr(module, "fold_pairs", ()):
            bn = module._modules.get(bn_name)
            layer = module._modules.get(layer_name)
            if is_batchnorm(bn) and is_curvature_layer(layer):
                module._modules[layer_name] = _fold_pair(layer, bn)
                module._modules[bn_name] = nn.Identity()
    for name, child in list(module._modules.items()):
        if child is None:
            continue
        if isinstance(child, nn.modules.batchnorm._BatchNorm):
            raise KfacboundError(
                f"cannot fold BatchNorm {_join(path, name)!r}: it does not directly follow a "
                "Linear/Conv2d layer (e.g. a pre-activation block)"
            )
        module._modules[name] = _fold_module(child, _join(path, name))
    return module


def _fold_sequential(model: nn.Sequential, path: str) -> nn.Sequential:
    keep: OrderedDict[str, nn.Module] = OrderedDict()
    prev_name: str | None = None
    for name, module in model._modules.items():
        if is_batchnorm(module):
            prev = keep.get(prev_name) if prev_name is not None else None
            if not is_curvature_layer(prev):
                raise KfacboundError(
                    f"cannot fold BatchNorm {_join(path, name)!r}: it does not follow a "
                    "Linear/Conv2d layer"
                )
            keep[prev_name] = _fold_pair(prev, module)
            continue
        keep[name] = module
        prev_name = name
    return nn.Sequential(keep)


def _fold_pair(layer: nn.Module, bn: nn.Module) -> nn.Module:
    """The layer and the BN after it as one layer: :meth:`BatchNormRule.fold
    <kfacbound.curvature.modules.BatchNormRule.fold>`."""
    return rule_for(bn).fold(layer, bn)


def batchnorm_modules(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """Every BatchNorm module of ``model`` (any dimension), in module order."""
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def has_batchnorm(model: nn.Module) -> bool:
    return bool(batchnorm_modules(model))
