"""Layer-wise K-FAC factors of a network's GGN, accumulated over a whole dataset.

For every Linear/Conv2d layer (module path as in ``model.named_modules()``) :func:`compute_kfac`
returns a :class:`~kfacbound.curvature.kfac_layer.KronLayer` with factors G, Ã such that G ⊗ Ã
approximates the layer's block of the GGN of the MEAN loss over the n examples,

    H_O = (1/n) Σ_i J_iᵀ Λ_i J_i ,   Λ_i = ∂²ℓ/∂f² (see :mod:`kfacbound.losses`).

Linear layer z = W a + b (Martens & Grosse 2015; Botev et al. 2017):

    G = (1/n) Σ_i Σ_v γ_{i,v} γ_{i,v}ᵀ ,   Ã = (1/n) Σ_i ã_i ã_iᵀ ,   ã = [a; 1],

where γ_{i,v} = J_{z,i}ᵀ s_{i,v} is a column s_{i,v} of a square root of Λ_i (Σ_v s sᵀ = Λ_i)
backpropagated to the layer output. Methods:

- ``"kflr"``: exact square root (cross-entropy: S = diag(√p) − p √pᵀ, S Sᵀ = diag(p) − p pᵀ,
  reduced to C − 1 columns by a Householder reflection since Λ has rank C − 1; MSE: √(2/C)·I;
  logistic: √(σ(1−σ))). G ⊗ Ã is exact for n = 1.
- ``"kfac"``: Monte-Carlo square root from ``mc_samples`` labels ŷ drawn from the model's
  predictive distribution, s = ∇_f ℓ(f, ŷ)/√M (unbiased: E[s sᵀ] = Λ). Same sampling calls as
  BackPACK, so both backends give identical samples for equal seeds.
- ``"kfra"``: BackPACK's recursive batch-averaged approximation (Botev et al. 2017); BackPACK
  backend only.

Batches: G and Ã are averaged *separately* over the dataset, weighted by batch size (BackPACK
gives per-batch means; we accumulate sums and divide by n at the end). Linear layers accumulate
in the model's dtype (one in-place GEMM per batch and factor, as BackPACK and curvlinops do);
conv layers, whose N·T rows make long reductions, in float64 over chunks of 16,384 rows.
Factors are returned in float64; use a float64 model where exactness matters (tests do).

Conv2d convention ("kfc-expand", Grosse & Martens 2016, eq. 32; = curvlinops' ``"expand"``):
with T = H_out·W_out output positions, u_{i,t} the unfolded input patch (in_channels·kh·kw,
ordered like ``weight.reshape(out, -1)``) and ũ = [u; 1],

    G = (1/n) Σ_i Σ_v Σ_t γ_{i,v,t} γ_{i,v,t}ᵀ ,   Ã = (1/(n T)) Σ_i Σ_t ũ_{i,t} ũ_{i,t}ᵀ .

BackPACK's raw conv factors differ: its G is the bias GGN (1/n) Σ (Σ_t γ)(Σ_t γ)ᵀ and its A is
T times ours, so its G ⊗ A is ≈ T times the KFC one; we compute the KFC convention in both
backends (the BackPACK backend uses our own conv module extension). The convention is recorded
in the metadata as ``conv_convention = "kfc-expand"``.

Bias: ``bias="homogeneous"`` (default) — one block G ⊗ Ã on vec([W | b]) (layout.py);
``bias="separate"`` — G ⊗ A for the weight, G_bias = G·Ã[-1, -1] = G for the bias, no
weight–bias cross terms.

BatchNorm (eval mode) is the per-channel affine map y = s ⊙ (x − μ) + β, s = γ/√(σ² + ε): square
roots pass through it as a per-channel scaling by s. Its own parameters get their exact GGN
diagonal of the mean loss: diag_β = (1/n) Σ_i Σ_c (Σ_t δ_{i,c,t})², diag_γ with δ·x̂,
δ = exact square-root columns at the BN output, x̂ = (x − μ)/√(σ² + ε) (always exact, also for
"kfac"/"kfra").

Backends: ``"native"`` — forward hooks collect Ã, one batched backward of the square-root columns
(``autograd.grad(..., is_grads_batched=True)``) gives every layer's G; ``"backpack"`` —
BackPACK's KFAC/KFLR/KFRA extensions with our module extensions for BatchNorm1d/2d, Identity,
Linear and Conv2d registered on them, plus DiagGGNExact for BN parameters. ``"auto"`` is native
for kfac/kflr and BackPACK for kfra. Tests check that both backends agree.

Graphs: the native backend needs no sequential structure. Ã is read from each layer's input and
γ = J_zᵀ s is the gradient at each layer's own output z, so for a residual network (zoo ResNets,
any container without parameters of its own, :func:`check_supported`) every Linear/Conv2d gets
G and Ã wherever it sits — main path or shortcut projection — and autograd sums the branches:
γ at z is Σ over all paths from z to the logits. Each layer must be called once per forward and
its output must not be modified in place later (checked). The BackPACK backend needs an
nn.Sequential.

Module types: which modules carry factors, how a layer's input is unfolded into the rows of Ã and
its output columns reshaped for G, BatchNorm's scaling and diagonal, the BackPACK extension of a
type and the configurations refused are read from the module rules of :mod:`.modules`
(:func:`~.modules.register_module_rule` adds a type); the Gram accumulators are in
:mod:`.factors`.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from ..data import dataset_tensors
from ..errors import KfacboundError, UnsupportedModuleError
from ..losses import check_loss, prepare_targets
from . import factors
from .kfac_layer import KronLayer
from .modules import (
    curvature_rule,
    is_batchnorm,
    is_curvature_layer,
    registered_rules,
    rule_for,
    supported_names,
    types_where,
    unsupported,
)

METHODS = ("kfac", "kflr", "kfra")
BACKENDS = ("auto", "native", "backpack")
BIAS_MODES = ("homogeneous", "separate")
CONV_CONVENTION = "kfc-expand"
FORMAT = "kfacbound-kfac"

# Read from the module registry (modules.py) on each access: see __getattr__ below.
_DYNAMIC = {
    "BN_TYPES": lambda rule: rule.batchnorm,
    "BACKPACK_MODULES": lambda rule: not rule.container and rule.backpack is not None,
    "SUPPORTED_MODULES": lambda rule: not rule.container,
}


def __getattr__(name: str) -> Any:
    if name in _DYNAMIC:
        return types_where(_DYNAMIC[name])
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def is_graph_container(module: nn.Module) -> bool:
    """A module that only composes its children: it has children and no parameters or buffers
    of its own (a residual block, a ResNet). Its forward may combine the children's outputs by
    any parameter-free operation (residual sums, pooling); the native backend differentiates
    through it with autograd."""
    return (next(module.children(), None) is not None
            and next(module.parameters(recurse=False), None) is None
            and next(module.buffers(recurse=False), None) is None)


def check_supported(model: nn.Module, backend: str = "native") -> None:
    """Raise :class:`UnsupportedModuleError` naming the first module K-FAC cannot handle.

    Allowed: modules with a rule (:func:`~.modules.rule_for`; built in: Linear, Conv2d with
    groups = 1 and zero padding given as integers, BatchNorm1d/2d with affine parameters and
    running statistics, parameter-free activations, poolings, Flatten, Dropout, Identity)
    inside nn.Sequential containers or any graph container (:func:`is_graph_container`:
    residual blocks, ResNets), each curvature layer called once per forward pass. The BackPACK
    backend needs nn.Sequential containers of types whose own rule has a BackPACK extension
    (BackPACK has no rule for a sum of branches in KFLR/KFRA).
    """
    registered = registered_rules()
    for path, module in model.named_modules():
        rule = rule_for(module)
        if rule is not None and rule.container:
            continue
        if rule is None:
            if not is_graph_container(module):
                raise unsupported(
                    path, module,
                    f" is not supported by K-FAC extraction; supported: {supported_names()} "
                    "(inside nn.Sequential or containers without parameters of their own, e.g. "
                    "residual blocks)"
                )
            if backend == "backpack":
                raise unsupported(
                    path, module,
                    " is not an nn.Sequential: the BackPACK backend (and KFRA) needs a "
                    "sequential network; use backend='native' with method kfac or kflr"
                )
            continue
        own = registered.get(type(module))  # BackPACK dispatches on the exact type
        if backend == "backpack" and (own is None or own.backpack is None):
            raise unsupported(path, module,
                              " is not supported by the BackPACK backend; use backend='native'")
        rule.check(module, path)


# ---------------------------------------------------------------------------- shared pieces
# The factor arithmetic lives in the module rules (modules.py) and factors.py; these names are
# kept for callers of the earlier API.
_gram_upper_ = factors.gram_upper_
_add_gram = factors.add_gram
_conv_gram = factors.conv_gram
_new_acc = factors.new_acc
_acc = factors.accumulate


def input_factor(module: nn.Module, a: torch.Tensor,
                 out: torch.Tensor | None = None, *, upper: bool = False) -> torch.Tensor:
    """``out`` += Σ over the batch of ã ãᵀ (conv: (1/T) Σ_{i,t} ũ ũᵀ), ã = [a; 1] with a bias:
    :meth:`~.modules.CurvatureRule.input_factor` of the layer's rule. ``out`` is allocated when
    None; divide the final sum by the number of examples for Ã."""
    return curvature_rule(module).input_factor(module, a, out, upper=upper)


def output_factor(module: nn.Module, grads: torch.Tensor,
                  out: torch.Tensor | None = None, *, upper: bool = False) -> torch.Tensor:
    """``out`` += Σ_{v,i,t} γ γᵀ from the backpropagated columns ``grads`` [V, N, out, *spatial]:
    :meth:`~.modules.CurvatureRule.output_factor` of the layer's rule."""
    return curvature_rule(module).output_factor(module, grads, out, upper=upper)


def bn_diag(module: nn.Module, x: torch.Tensor, delta: torch.Tensor) -> dict[str, torch.Tensor]:
    """Σ over columns and examples of the exact GGN diagonal of BN's γ (weight) and β (bias):
    :meth:`~.modules.BatchNormRule.ggn_diag`."""
    return rule_for(module).ggn_diag(module, x, delta)


def _ce_sqrt(f: torch.Tensor) -> torch.Tensor:
    """C − 1 columns R_n with R_n R_nᵀ = Λ_n = diag(p) − p pᵀ (rank C − 1), as [C − 1, N, C].

    S = diag(√p) − p √pᵀ satisfies S Sᵀ = Λ and S √p = 0. With the Householder reflection
    H = I − 2 w wᵀ/‖w‖², w = √p + e_k, k = argmax p (‖w‖² ≥ 2: stable), H e_k = −√p, so column
    k of S H vanishes and the other C − 1 columns are a square root: S H Hᵀ Sᵀ = Λ. One column
    fewer to backpropagate than S (10% of KFLR's cost for C = 10).
    """
    N, C = f.shape
    p = torch.softmax(f, dim=1)
    sp = p.sqrt()
    if C == 2:  # closed form: one column √(p₀p₁)·(1, −1)
        r = (p[:, 0] * p[:, 1]).sqrt()
        return torch.stack([r, -r], dim=1)[None]
    k = p.argmax(dim=1)
    rows = torch.arange(N, device=f.device)
    eye = torch.eye(C, dtype=f.dtype, device=f.device)
    S = torch.diag_embed(sp) - p[:, :, None] * sp[:, None, :]  # [N, C, C]
    w = sp.clone()
    w[rows, k] += 1.0
    Sw = sp[rows, k][:, None] * (eye[k] - p)  # S w = S e_k = √p_k (e_k − p)
    R = S - (2.0 / (w * w).sum(1))[:, None, None] * Sw[:, :, None] * w[:, None, :]
    j = torch.arange(C - 1, device=f.device)
    idx = j[None, :] + (j[None, :] >= k[:, None]).long()  # the columns other than k
    R = R.transpose(1, 2).gather(1, idx[:, :, None].expand(N, C - 1, C))  # [N, C − 1, C]
    return R.transpose(0, 1).contiguous()


def sqrt_columns(loss: str, logits: torch.Tensor, exact: bool, mc_samples: int = 1) -> torch.Tensor:
    """Columns s_v [V, N, C] with Σ_v s_v s_vᵀ = Λ_n (exact) or E[·] = Λ_n (sampled), per example.

    Normalised for the per-example loss ℓ_n whose mean over n is the torch loss with
    reduction='mean' (MSE: ℓ_n = ‖f − y‖²/C). Sampling uses the same calls as BackPACK 1.7.1
    (torch.distributions on the global RNG), so equal seeds give equal samples.
    """
    f = logits.detach()
    N, C = f.shape
    if exact:
        if loss == "ce":
            return _ce_sqrt(f)
        if loss == "bce":
            s = torch.sigmoid(f)
            return (s * (1 - s)).sqrt()[None]
        eye = torch.eye(C, dtype=f.dtype, device=f.device) * math.sqrt(2.0 / C)
        return eye[:, None, :].expand(C, N, C).contiguous()
    M = int(mc_samples)
    size = torch.Size([M])
    if loss == "ce":
        p = torch.softmax(f, dim=1)
        y = torch.distributions.Categorical(p, validate_args=False).sample(size)
        cols = p[None] - F.one_hot(y, C).to(f.dtype)
    elif loss == "bce":
        s = torch.sigmoid(f)
        cols = s[None] - torch.distributions.Binomial(probs=s, validate_args=False).sample(size)
    else:
        std = torch.tensor(math.sqrt(0.5), dtype=f.dtype, device=f.device)
        y = torch.distributions.Normal(f, std, validate_args=False).sample(size)
        cols = 2 * (y - f[None]) / math.sqrt(C)
    return cols / math.sqrt(M)


def _prepare_model(model: nn.Module, device: str | torch.device,
                   backend: str = "native") -> nn.Module:
    """A private eval-mode copy on ``device`` with gradients on and in-place activations off."""
    check_supported(model, backend)
    model = copy.deepcopy(model).to(device).eval()
    for m in model.modules():
        if hasattr(m, "inplace"):
            m.inplace = False
    for p in model.parameters():
        p.requires_grad_(True)
        p.grad = None
    return model


def _batches(data: Any, batch_size: int) -> tuple[Iterable, int | None]:
    """(iterator over (X, y) batches, number of batches or None)."""
    if isinstance(data, DataLoader):
        try:
            total = len(data)
        except TypeError:
            total = None
        return ((b[0], b[1]) for b in data), total
    if isinstance(data, (tuple, list)) and not (len(data) == 2
                                                and isinstance(data[0], torch.Tensor)):
        data = None  # not a pair (X, y): refused below
    try:
        X, y = dataset_tensors(data)
    except KfacboundError:
        raise KfacboundError("data must be a TensorDataset (X, y), a DataLoader of (X, y) or a "
                             "tuple (X, y)") from None
    starts = range(0, X.shape[0], batch_size)
    return ((X[s:s + batch_size], y[s:s + batch_size]) for s in starts), len(starts)


def _batch_seed(seed: int, batch: int) -> int:
    """Seed of the Monte-Carlo labels of batch number ``batch``."""
    return (int(seed) * 1_000_003 + int(batch)) % (2**63 - 1)


def _rng(device: torch.device):
    """Context that restores the global RNG state (CPU and ``device``) on exit."""
    return torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])


# ---------------------------------------------------------------------------- result object
class KFACResult(Mapping):
    """Module path -> :class:`KronLayer`, plus BN diagonals and metadata.

    ``meta`` keys: method, n, loss, mc_samples, bias, conv_convention, backend, batch_size, seed,
    dtype, num_outputs, normalisation (free keys may be added, e.g. dataset, checkpoint).
    ``bn_diag[path] = {"weight": diag_γ, "bias": diag_β}`` (exact GGN diagonal of the mean loss).
    """

    def __init__(self, layers: dict[str, KronLayer], meta: dict[str, Any],
                 bn_diag: dict[str, dict[str, torch.Tensor]] | None = None):
        self.layers = dict(layers)
        self.meta = dict(meta)
        self.bn_diag = dict(bn_diag or {})

    def __getitem__(self, key: str) -> KronLayer:
        try:
            return self.layers[key]
        except KeyError:
            raise KeyError(f"no K-FAC factors for {key!r}; layers: {list(self.layers)}") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self.layers)

    def __len__(self) -> int:
        return len(self.layers)

    def __repr__(self) -> str:
        return (f"KFACResult(method={self.meta.get('method')!r}, n={self.meta.get('n')}, "
                f"layers={list(self.layers)})")

    def save(self, path: str | Path) -> Path:
        """Write to safetensors: ``<path>.G``, ``<path>.A`` [, ``<path>.G_bias``],
        ``<bn path>.ggn_diag_weight`` / ``.ggn_diag_bias``; JSON metadata under "kfacbound"."""
        from safetensors.torch import save_file

        from ..io import atomic_write

        tensors: dict[str, torch.Tensor] = {}
        layers_meta = []
        for name, L in self.layers.items():
            tensors[f"{name}.G"] = L.G.detach().cpu().contiguous()
            tensors[f"{name}.A"] = L.A.detach().cpu().contiguous()
            if L.G_bias is not None:
                tensors[f"{name}.G_bias"] = L.G_bias.detach().cpu().contiguous()
            layers_meta.append({"name": name, "type": L.module_type,
                                "weight_shape": list(L.weight_shape), "bias": L.bias,
                                "homogeneous": L.homogeneous})
        for name, d in self.bn_diag.items():
            for key, value in d.items():
                tensors[f"{name}.ggn_diag_{key}"] = value.detach().cpu().contiguous()
        meta = dict(self.meta, format=FORMAT, layers=layers_meta, bn=list(self.bn_diag))
        header = {"format": FORMAT, "kfacbound": json.dumps(meta, sort_keys=True, default=str)}
        atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=header))
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> KFACResult:
        """Read a file written by :meth:`save`."""
        from safetensors import SafetensorError, safe_open

        path = Path(path)
        if not path.exists():
            raise KfacboundError(f"K-FAC factor file not found: {path}")
        try:
            with safe_open(str(path), framework="pt") as fh:
                header = fh.metadata() or {}
                tensors = {k: fh.get_tensor(k) for k in fh.keys()}
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise KfacboundError(f"{path} is not a readable K-FAC factor file ({exc})") from None
        if header.get("format") != FORMAT:
            raise KfacboundError(f"{path} is not a kfacbound K-FAC factor file")
        meta = json.loads(header["kfacbound"])
        layers = {}
        for info in meta.pop("layers"):
            name = info["name"]
            layers[name] = KronLayer(
                name, info["type"], tensors[f"{name}.G"], tensors[f"{name}.A"],
                tuple(info["weight_shape"]), info["bias"], homogeneous=info["homogeneous"],
                G_bias=tensors.get(f"{name}.G_bias"),
            )
        bn = {name: {"weight": tensors[f"{name}.ggn_diag_weight"],
                     "bias": tensors[f"{name}.ggn_diag_bias"]} for name in meta.pop("bn")}
        meta.pop("format", None)
        return cls(layers, meta, bn)


# ---------------------------------------------------------------------------- native backend
class _NativeBatch:
    """Hooks that collect Ã sums and layer outputs during one forward pass."""

    def __init__(self, model: nn.Module, layers: dict[str, nn.Module],
                 bns: dict[str, nn.Module]):
        self.layers, self.bns = layers, bns
        self.A_sum: dict[str, torch.Tensor] = {}  # running Σ ã ãᵀ over all batches
        self.seen: set[str] = set()
        self.z: dict[str, torch.Tensor] = {}
        self.bn_in: dict[str, torch.Tensor] = {}
        self.bn_out: dict[str, torch.Tensor] = {}
        self.versions: dict[str, int] = {}  # autograd version of each hooked output
        self.handles = []
        for name, m in layers.items():
            self.handles.append(m.register_forward_hook(self._layer_hook(name)))
        for name, m in bns.items():
            self.handles.append(m.register_forward_hook(self._bn_hook(name)))

    def _layer_hook(self, name: str):
        def hook(module, inputs, output):
            if name in self.seen:
                raise UnsupportedModuleError(
                    f"module {name!r} is called twice in one forward pass (weight sharing is not "
                    "supported by K-FAC extraction)"
                )
            self.seen.add(name)
            self.A_sum[name] = input_factor(module, inputs[0], out=self.A_sum.get(name),
                                            upper=True)
            self.z[name] = output
            self.versions[name] = output._version
        return hook

    def _bn_hook(self, name: str):
        def hook(module, inputs, output):
            self.bn_in[name] = inputs[0].detach()
            self.bn_out[name] = output
            self.versions[name] = output._version
        return hook

    def reset(self) -> None:
        self.seen, self.z, self.bn_in, self.bn_out, self.versions = set(), {}, {}, {}, {}

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


BATCHED_COLUMNS = False  # "auto", True (one vmapped backward) or False (one backward per column)


def _use_batched(model: nn.Module) -> bool:
    """Backpropagate several square-root columns in one vmapped backward (conv nets: the
    batched convolutions are efficient) or one plain backward per column (fully connected nets:
    vmap's batching of ReLU/threshold_backward copied [V, N, width] tensors and was slower;
    measured on T-600 and LeNet-5, CPU)."""
    if BATCHED_COLUMNS != "auto":
        return bool(BATCHED_COLUMNS)
    return any(is_curvature_layer(m) and rule_for(m).batched_columns for m in model.modules())


def _vjp_groups(outputs: torch.Tensor, inputs: list[torch.Tensor], cols: torch.Tensor,
                retain_graph: bool, batched: bool) -> Iterator[tuple[torch.Tensor, ...]]:
    """J_zᵀ s for the columns s (dim 0 of ``cols``) and each tensor z in ``inputs``, yielded in
    groups: a tuple of [v, *z.shape] tensors per group of v columns (all V at once when
    ``batched``, else one at a time). The sums over columns that the factors need can be taken
    group by group, so at most one group's gradients are alive at a time."""
    V = cols.shape[0]
    if batched and V > 1:
        yield torch.autograd.grad(outputs, inputs, grad_outputs=cols, retain_graph=retain_graph,
                                  is_grads_batched=True)
        return
    for v in range(V):
        grads = torch.autograd.grad(outputs, inputs, grad_outputs=cols[v],
                                    retain_graph=retain_graph or v < V - 1)
        yield tuple(g[None] for g in grads)


def _native_step(model, hooks: _NativeBatch, X, loss, method, mc_samples, out_sums, bn_sums):
    hooks.reset()
    with torch.enable_grad():
        logits = model(X)
    if logits.ndim != 2:
        raise KfacboundError(f"the model output must be [N, C] logits, got {tuple(logits.shape)}")
    for name, t in (*hooks.z.items(), *hooks.bn_out.items()):
        if t._version != hooks.versions[name]:  # its gradient would be that of a later tensor
            raise UnsupportedModuleError(
                f"the output of module {name!r} is modified in place later in the forward pass "
                "(e.g. `out += identity` or an in-place activation in a custom forward); write "
                "that operation out of place"
            )
    missing = [n for n in hooks.layers if n not in hooks.z]
    if missing:
        raise KfacboundError(f"layers {missing} were not called in the forward pass")
    exact = method == "kflr"
    names = list(hooks.layers)
    bn_names = list(hooks.bns)
    batched = _use_batched(model)
    if bn_names and not exact:
        cols = sqrt_columns(loss, logits, exact=True)
        for grads in _vjp_groups(logits, [hooks.bn_out[b] for b in bn_names], cols,
                                 retain_graph=True, batched=batched):
            _add_bn(hooks, bn_names, grads, bn_sums)
    cols = sqrt_columns(loss, logits, exact=exact, mc_samples=mc_samples)
    targets = [hooks.z[n] for n in names] + ([hooks.bn_out[b] for b in bn_names] if exact else [])
    for grads in _vjp_groups(logits, targets, cols, retain_graph=False, batched=batched):
        for name, g in zip(names, grads[: len(names)], strict=True):
            out_sums[name] = output_factor(hooks.layers[name], g, out=out_sums.get(name),
                                           upper=True)
        if exact and bn_names:
            _add_bn(hooks, bn_names, grads[len(names):], bn_sums)
    return logits


def _add_bn(hooks, bn_names, grads, bn_sums):
    for b, g in zip(bn_names, grads, strict=True):
        d = bn_diag(hooks.bns[b], hooks.bn_in[b], g)
        if b not in bn_sums:
            bn_sums[b] = d
        else:
            for k in d:
                bn_sums[b][k] += d[k]


# ---------------------------------------------------------------------------- entry point
def compute_kfac(
    model: nn.Module,
    data: Any,
    loss: str = "ce",
    method: str = "kflr",
    mc_samples: int = 1,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    bias: str = "homogeneous",
    backend: str = "auto",
    progress: bool = True,
    seed: int = 0,
) -> KFACResult:
    """K-FAC factors (G, Ã) of every Linear/Conv2d layer, for the GGN of the mean ``loss`` over
    ``data`` (see the module docstring for formulas and conventions).

    ``data``: a TensorDataset (X, integer labels y), a DataLoader yielding (X, y), or (X, y).
    The model is copied, put in eval mode and moved to ``device``; the caller's model is not
    modified. ``seed`` seeds the Monte-Carlo labels of ``method="kfac"`` (the global RNG state
    is restored afterwards). Factors are float64 on the CPU.
    """
    method = str(method).lower()
    if method not in METHODS:
        raise KfacboundError(f"unknown K-FAC method {method!r}; choose one of {', '.join(METHODS)}")
    if backend not in BACKENDS:
        raise KfacboundError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if bias not in BIAS_MODES:
        raise KfacboundError(f"unknown bias mode {bias!r}; choose one of {', '.join(BIAS_MODES)}")
    check_loss(loss)
    if method == "kfac" and int(mc_samples) < 1:
        raise KfacboundError("mc_samples must be at least 1")
    if int(batch_size) < 1:
        raise KfacboundError("batch_size must be at least 1")
    if backend == "auto":
        backend = "backpack" if method == "kfra" else "native"
    if backend == "native" and method == "kfra":
        raise KfacboundError("KFRA is available with backend='backpack' only")
    if method == "kfra" and loss == "bce":
        raise KfacboundError(
            "KFRA needs the batch-averaged loss Hessian, which BackPACK does not provide for the "
            "one-logit logistic loss ('bce'); use --method kflr (exact) or kfac"
        )
    device = torch.device(device)
    model = _prepare_model(model, device, backend)
    layers = {n: m for n, m in model.named_modules() if is_curvature_layer(m)}
    bns = {n: m for n, m in model.named_modules() if is_batchnorm(m)}
    if not layers:
        raise KfacboundError("the model has no Linear or Conv2d layer")
    dtype = next(model.parameters()).dtype
    batches, total = _batches(data, int(batch_size))

    from ..progress import progress_bar

    G_sum: dict[str, torch.Tensor] = {}
    A_sum: dict[str, torch.Tensor] = {}
    bn_sum: dict[str, dict[str, torch.Tensor]] = {}
    n = 0
    num_outputs = None
    with _rng(device):
        if backend == "native":
            hooks = _NativeBatch(model, layers, bns)
            step = None
        else:
            from .kfac_backpack import BackpackStepper

            hooks = None
            step = BackpackStepper(model, loss, method, int(mc_samples), layers, bns)
        try:
            for b, (X, y) in enumerate(progress_bar(total, f"K-FAC {method}", progress,
                                                    "batch", batches)):
                # Re-seed per batch: BackPACK's AvgPool2d rule draws from the global RNG (it
                # initialises a ConvTranspose2d), which would desynchronise the two backends.
                torch.manual_seed(_batch_seed(seed, b))
                X = X.to(device=device, dtype=dtype if X.is_floating_point() else X.dtype)
                N = X.shape[0]
                if N == 0:
                    continue
                if hooks is not None:
                    logits = _native_step(model, hooks, X, loss, method, int(mc_samples), G_sum,
                                          bn_sum)
                    A_sum = hooks.A_sum
                    hooks.reset()
                    C = logits.shape[1]
                    prepare_targets(loss, y[:1], C)  # validates loss vs. number of outputs
                else:
                    C = step.step(X, y.to(device), N, G_sum, A_sum, bn_sum)
                if num_outputs is None:
                    num_outputs = C
                n += N
        finally:
            if hooks is not None:
                hooks.remove()
            if step is not None:
                step.close()
    if n == 0:
        raise KfacboundError("the dataset is empty")

    if backend == "native":  # its sums hold only their upper triangles (no per-batch copies)
        for sums in (G_sum, A_sum):
            for value in sums.values():
                factors.symmetrize_upper_(value)
    result_layers: dict[str, KronLayer] = {}
    for name, m in layers.items():
        G = (G_sum[name].to(torch.float64) / n).cpu()
        A = (A_sum[name].to(torch.float64) / n).cpu()
        L = KronLayer(name, type(m).__name__, 0.5 * (G + G.T), 0.5 * (A + A.T),
                      tuple(m.weight.shape), m.bias is not None, homogeneous=True)
        result_layers[name] = L.to_separate() if bias == "separate" else L
    bn_out = {b: {k: (v / n).cpu() for k, v in d.items()} for b, d in bn_sum.items()}
    meta = {
        "method": method, "n": n, "loss": loss,
        "mc_samples": int(mc_samples) if method == "kfac" else None,
        "bias": bias, "conv_convention": CONV_CONVENTION, "backend": backend,
        "batch_size": int(batch_size), "seed": int(seed), "dtype": str(dtype).replace("torch.", ""),
        "num_outputs": num_outputs,
        "normalisation": "G ⊗ A approximates the GGN block of the mean loss over n examples",
        "layout": "vec([W | b]) row-major (kfacbound.curvature.layout)",
    }
    return KFACResult(result_layers, meta, bn_out)
