"""Self-describing checkpoints that cannot run code when loaded.

A kfacbound checkpoint (``.kfb``) is a safetensors file:

- tensors ``model.<key>`` — the trained state_dict; ``init.<key>`` — the *initial* weights w0
  (Dziugaite & Roy centre their prior at the initialisation; without w0 a bound falls back to a
  weaker, data-independent prior);
- metadata (strings): ``format = "kfacbound-checkpoint"``, ``version``, ``spec`` (architecture
  spec, JSON, see :mod:`kfacbound.models`) and ``meta`` (JSON: ``dataset`` spec for
  :func:`kfacbound.data.dataset_from_spec`, ``loss``, ``training`` config, ``metrics``, free
  keys).

safetensors stores raw arrays and a JSON header only, so loading never executes code. Plain
state_dicts trained elsewhere are wrapped with :func:`import_state_dict`, which reads ``.pt``
files with ``torch.load(weights_only=True)``: a pickle that carries code is refused and its
payload never runs. Files are written to a temporary name and renamed, so an interrupted write
never leaves a partial checkpoint.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import KfacboundError
from .io import atomic_write, to_jsonable
from .io import atomic_write_text as atomic_write_text  # re-export: scripts import it from here
from .models import build_model, resolve_spec

FORMAT = "kfacbound-checkpoint"
VERSION = "1"


@dataclass
class Checkpoint:
    """A loaded checkpoint: ``model`` (eval mode), ``init_model`` (w0, or None), spec and meta."""

    model: nn.Module
    init_model: nn.Module | None
    spec: dict[str, Any]
    meta: dict[str, Any] = field(default_factory=dict)
    path: str | None = None

    @property
    def dataset(self) -> dict[str, Any] | None:
        return self.meta.get("dataset")

    @property
    def loss(self) -> str | None:
        return self.meta.get("loss")

    @property
    def metrics(self) -> dict[str, Any]:
        return self.meta.get("metrics", {})

    def sha256(self) -> str | None:
        return file_sha256(self.path) if self.path else None


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def check_finite(model: nn.Module, what: str = "model") -> None:
    """Raise :class:`KfacboundError` naming the first tensor holding NaN or inf."""
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise KfacboundError(f"{what} has non-finite values (NaN or inf) in {name!r}")


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}


def save_checkpoint(
    path: str | Path,
    model: nn.Module,
    spec: dict[str, Any],
    init_model: nn.Module | None = None,
    **meta: Any,
) -> Path:
    """Write ``model`` (and w0 = ``init_model``) with its spec and ``meta`` to ``path``."""
    from safetensors.torch import save_file

    spec = resolve_spec(spec)
    check_finite(model)
    tensors = {f"model.{k}": v for k, v in _state(model).items()}
    if init_model is not None:
        tensors.update({f"init.{k}": v for k, v in _state(init_model).items()})
    metadata = {
        "format": FORMAT,
        "version": VERSION,
        "spec": json.dumps(spec, sort_keys=True),
        "meta": json.dumps(to_jsonable(meta, default=str), sort_keys=True),
    }
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))
    return Path(path)


def _looks_like_safetensors(head: bytes) -> bool:
    """safetensors: an 8-byte little-endian header length, then a JSON header starting with '{'."""
    return len(head) >= 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") > 1


def _is_pickle(path: Path) -> bool:
    """A torch zip archive or a raw pickle (protocol 2-5), and not a safetensors file."""
    with open(path, "rb") as fh:
        head = fh.read(9)
    if _looks_like_safetensors(head):
        return False
    return head[:2] == b"PK" or head[:2] in (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05")


def load_checkpoint(path: str | Path, map_location: str = "cpu") -> Checkpoint:
    """Load a kfacbound checkpoint; models come back in eval mode.

    Raises :class:`KfacboundError` for a missing, truncated or corrupt file, a file of another
    format (a PyTorch pickle: use ``kfacbound import``), weights that do not fit the spec, or
    non-finite weights.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.exists():
        raise KfacboundError(f"checkpoint not found: {path}")
    if path.is_dir():
        raise KfacboundError(f"{path} is a directory, not a checkpoint")
    if _is_pickle(path):
        raise KfacboundError(
            f"{path} is a PyTorch pickle, not a kfacbound checkpoint; wrap a plain state_dict with "
            "`kfacbound import STATE_DICT --arch SPEC -o out.kfb`"
        )
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as fh:
            header = fh.metadata() or {}
        tensors = load_file(str(path), device=map_location)
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise KfacboundError(f"{path} is truncated or not a kfacbound checkpoint ({exc})") from None
    if header.get("format") != FORMAT:
        raise KfacboundError(
            f"{path} is a safetensors file but not a kfacbound checkpoint; wrap it with "
            "`kfacbound import`"
        )
    try:
        spec = resolve_spec(json.loads(header["spec"]))
        meta = json.loads(header.get("meta", "{}"))
    except (KeyError, json.JSONDecodeError) as exc:
        raise KfacboundError(f"{path} has a corrupt header: {exc}") from None
    model_state = {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}
    init_state = {k[5:]: v for k, v in tensors.items() if k.startswith("init.")}
    model = model_from_state(spec, model_state, str(path))
    init_model = model_from_state(spec, init_state, f"{path} (initial weights)") if init_state \
        else None
    return Checkpoint(model, init_model, spec, meta, str(path))


def _key_list(keys: list[str], limit: int = 12) -> str:
    shown = ", ".join(keys[:limit])
    return f"{len(keys)} ({shown}{', ...' if len(keys) > limit else ''})"


def model_from_state(spec: dict[str, Any], state: dict[str, torch.Tensor], where: str) -> nn.Module:
    """Build the spec's model and load ``state`` strictly: every key and every shape must match.

    A mismatch raises :class:`KfacboundError` with one line listing the missing keys, the
    unexpected keys and the keys of the wrong shape (the first 12 of each, with their counts).
    """
    model = build_model(spec, seed=0)
    expected = model.state_dict()
    name = spec.get("alias", spec["arch"])
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [f"{k} {tuple(v.shape)} vs {tuple(expected[k].shape)}" for k, v in state.items()
             if k in expected and tuple(v.shape) != tuple(expected[k].shape)]
    if missing or unexpected:
        raise KfacboundError(
            f"{where}: state_dict does not fit architecture {name}: "
            f"missing {_key_list(missing)}; unexpected {_key_list(unexpected)}"
            + (f"; wrong shape {_key_list(wrong)}" if wrong else "")
        )
    if wrong:
        hint = ""
        if any(w.startswith("conv1.weight ") for w in wrong) and spec["arch"] == "resnet":
            hint = " (a 7x7 conv1 is the ImageNet stem: set \"stem\": \"imagenet\")"
        raise KfacboundError(
            f"{where}: state_dict does not fit architecture {name}: wrong shape (given vs "
            f"expected) {_key_list(wrong)}{hint}"
        )
    model.load_state_dict(state)
    check_finite(model, where)
    return model.eval()


WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def adapt_state_dict(state: dict[str, torch.Tensor], spec: dict[str, Any]
                     ) -> dict[str, torch.Tensor]:
    """A state_dict saved elsewhere (e.g. torchvision-style) renamed to the zoo model's keys.

    The zoo's ResNet uses torchvision's names (``conv1.weight``, ``layer1.0.bn1.running_mean``,
    ``layer2.0.downsample.0.weight``, ``fc.bias``), so keys map one to one. Only two wrapper
    artefacts are undone: a prefix on every key from ``nn.DataParallel``/DDP (``module.``) or
    ``torch.compile`` (``_orig_mod.``) is stripped, and a BatchNorm's ``num_batches_tracked``
    counter that older PyTorch versions did not save is filled with 0 (it is not used in eval
    mode, where BN is the fixed affine map of its running statistics). Everything else is left
    for :func:`model_from_state` to check key by key and shape by shape.
    """
    state = dict(state)
    for prefix in WRAPPER_PREFIXES:
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    expected = build_model(spec, seed=0).state_dict()
    for key in expected:
        if key.endswith(".num_batches_tracked") and key not in state:
            stem = key[: -len("num_batches_tracked")]
            if f"{stem}running_mean" in state:
                state[key] = torch.zeros((), dtype=torch.long)
    return state


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A plain state_dict from ``.safetensors`` or a torch file, never executing code."""
    path = Path(path)
    if not path.exists():
        raise KfacboundError(f"state_dict file not found: {path}")
    if not _is_pickle(path):
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            state = load_file(str(path))
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise KfacboundError(
                f"{path} is neither a torch file nor safetensors ({exc})"
            ) from None
        return {k[6:] if k.startswith("model.") else k: v for k, v in state.items()
                if not k.startswith("init.")}
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many types for unsafe pickles
        raise KfacboundError(
            f"refusing to load {path}: it is not a plain tensor pickle (it may carry code, which "
            f"is never run). Save it with torch.save(model.state_dict(), ...). Detail: "
            f"{str(exc).splitlines()[0][:200]}"
        ) from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise KfacboundError(f"{path} does not hold a state_dict (a dict of tensors)")
    return obj


def import_state_dict(
    state_path: str | Path,
    spec: dict[str, Any],
    out: str | Path,
    init_path: str | Path | None = None,
    **meta: Any,
) -> Checkpoint:
    """Wrap a plain state_dict (and optionally the initial weights) into a checkpoint.

    The state_dicts pass through :func:`adapt_state_dict` (wrapper prefixes, missing BN
    counters), then every key and shape is checked against ``spec``'s model.
    """
    spec = resolve_spec(spec)
    state = adapt_state_dict(read_state_dict(state_path), spec)
    model = model_from_state(spec, state, str(state_path))
    init_model = None
    if init_path is not None:
        init_state = adapt_state_dict(read_state_dict(init_path), spec)
        init_model = model_from_state(spec, init_state, str(init_path))
    meta.setdefault("imported_from", str(state_path))
    save_checkpoint(out, model, spec, init_model=init_model, **meta)
    return load_checkpoint(out)
