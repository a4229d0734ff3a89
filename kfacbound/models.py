"""Model zoo: architecture specs that round-trip through JSON, and their ``nn.Module``s.

A spec is a plain JSON-serialisable dict with an ``"arch"`` key. :func:`resolve_spec` fills in
every default, so a resolved spec describes the network completely; :func:`build_model` turns it
into an ``nn.Sequential`` whose children have readable names (``fc1``, ``bn1``, ``act1``, ...,
``out``), which are the module paths used for curvature factors.

Architectures
-------------
- ``fc``: ``Flatten`` then Linear → [BatchNorm1d] → activation for each hidden width, then a Linear
  output layer. Activation relu/tanh/sigmoid/linear; bias on/off.
- ``lenet5``: conv(6, 5×5, pad 2) → pool → conv(16, 5×5) → pool → fc 120 → fc 84 → out,
  optional BatchNorm2d/1d after each conv/hidden linear.
- ``cnn``: configurable conv stack (channels, kernel, padding, pooling) and a dense head.

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
from collections import OrderedDict
from typing import Any

import torch
from torch import nn

from .errors import KfacboundError

ACTIVATIONS = ("relu", "tanh", "sigmoid", "linear")
INITS = ("default", "glorot", "dr")
POOLS = ("max", "avg", "none")

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
}

ARCHS = tuple(_DEFAULTS)


def list_architectures() -> dict[str, str]:
    """Names accepted by :func:`resolve_spec` with a one-line description."""
    out = {
        "fc": "fully connected: widths, activation, bias, bn",
        "lenet5": "LeNet-5 (conv 6-16, fc 120-84), optional BatchNorm",
        "cnn": "configurable conv stack + dense head: channels, kernel, pool, widths, bn",
    }
    for name, spec in ALIASES.items():
        out[name] = f"Dziugaite & Roy MLP, hidden {spec['widths']}, ReLU, their init"
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
        if arch in ALIASES:
            spec = dict(ALIASES[arch], alias=arch)
        elif arch in _DEFAULTS:
            spec = {"arch": arch}
        else:
            raise KfacboundError(
                f"unknown architecture {arch!r}; known: {', '.join(list_architectures())}"
            )
    else:
        spec = copy.deepcopy(dict(arch))
        if spec.get("arch") in ALIASES:
            alias = spec.pop("arch")
            spec = {**ALIASES[alias], "alias": alias, **spec}
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
    if name in ("lenet5", "cnn") and len(spec["input_shape"]) != 3:
        raise KfacboundError(
            f"{name} needs image inputs (channels, height, width); got shape {spec['input_shape']}."
            " Do not pass --flatten for convolutional networks."
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


def build_model(spec: dict[str, Any], seed: int | None = None) -> nn.Sequential:
    """The network a resolved spec describes, initialised with ``spec['init']``.

    ``seed`` seeds the initialisation through a private generator (global RNG untouched).
    """
    spec = resolve_spec(spec) if "input_shape" not in spec else spec
    _validate(spec)
    name = spec["arch"]
    shape = spec["input_shape"]
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
        if isinstance(module, (nn.Linear, nn.Conv2d)):
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
        elif isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
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


def fold_batchnorm(model: nn.Sequential) -> nn.Sequential:
    """A copy of ``model`` with every eval-mode BatchNorm folded into the layer before it.

    BN(z) = s ⊙ (z − μ) + β with s = γ / √(σ² + ε) per channel, so for z = W a + b the fold is
    W' = diag(s) W, b' = s ⊙ (b − μ) + β (a bias is added when the layer had none). The folded
    network computes the same function as ``model.eval()``. The BN modules are removed, so module
    paths of the other layers are unchanged. Requires each BatchNorm to follow a Linear/Conv2d
    directly (as in every architecture of this zoo).
    """
    model = copy.deepcopy(model).eval()
    names = list(model._modules)
    keep: OrderedDict[str, nn.Module] = OrderedDict()
    prev_name: str | None = None
    for name in names:
        module = model._modules[name]
        if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
            prev = keep.get(prev_name) if prev_name is not None else None
            if not isinstance(prev, (nn.Linear, nn.Conv2d)):
                raise KfacboundError(
                    f"cannot fold BatchNorm {name!r}: it does not follow a Linear/Conv2d layer"
                )
            keep[prev_name] = _fold_pair(prev, module)
            continue
        keep[name] = module
        prev_name = name
    return nn.Sequential(keep)


def _fold_pair(layer: nn.Module, bn: nn.Module) -> nn.Module:
    with torch.no_grad():
        var, mean = bn.running_var, bn.running_mean
        gamma = bn.weight if bn.weight is not None else torch.ones_like(var)
        beta = bn.bias if bn.bias is not None else torch.zeros_like(mean)
        s = gamma / torch.sqrt(var + bn.eps)
        folded = copy.deepcopy(layer)
        if folded.bias is None:
            if isinstance(folded, nn.Linear):
                new = nn.Linear(folded.in_features, folded.out_features, bias=True)
            else:
                new = nn.Conv2d(
                    folded.in_channels, folded.out_channels, folded.kernel_size,
                    stride=folded.stride, padding=folded.padding, dilation=folded.dilation,
                    groups=folded.groups, bias=True,
                )
            new = new.to(dtype=folded.weight.dtype, device=folded.weight.device)
            new.weight.copy_(folded.weight)
            new.bias.zero_()
            folded = new
        shape = (-1,) + (1,) * (folded.weight.ndim - 1)
        folded.weight.mul_(s.reshape(shape))
        folded.bias.copy_(s * (folded.bias - mean) + beta)
    return folded


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
