"""Training with Dziugaite & Roy's defaults: SGD, learning rate 0.01, momentum 0.9, batch 100.

:func:`train_model` builds the network from its spec, records the initial weights w0 (the
PAC-Bayes prior's centre), trains with a seeded shuffling generator and writes a checkpoint (and,
with ``save_every``, a numbered series ``<stem>-epoch003.kfb`` … for spectra over training).
On CPU the same seed and thread count give bitwise-identical weights.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from .checkpoint import check_finite, save_checkpoint
from .data import KDataset
from .errors import KfacboundError
from .losses import check_loss, default_loss, make_loss, prepare_targets, zero_one_errors
from .models import build_model, resolve_spec
from .progress import progress_bar

#: Learning-rate schedules: "constant" (Dziugaite & Roy) or "cosine", lr·½(1 + cos(π t/T)) at
#: step t of T (Loshchilov & Hutter 2017, without restarts): the rate reaches ≈ 0 in the last
#: epoch, so a fixed epoch budget ends on a plateau of the training loss.
SCHEDULES = ("constant", "cosine")


@dataclass
class TrainConfig:
    """Hyper-parameters of :func:`train_model` (stored in the checkpoint)."""

    epochs: int = 20
    lr: float = 0.01
    momentum: float = 0.9
    batch_size: int = 100
    weight_decay: float = 0.0
    seed: int = 0
    loss: str | None = None
    device: str = "cpu"
    schedule: str = "constant"


def resolve_device(device: str | None) -> torch.device:
    """``'cpu'``, ``'cuda'``, ``'cuda:1'``, ``'mps'``; a clear error when it is not available."""
    device = device or "cpu"
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise KfacboundError(f"bad device {device!r}: {exc}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise KfacboundError(f"device {device!r} requested but CUDA is not available here")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise KfacboundError("device 'mps' requested but not available here")
    return dev


@torch.no_grad()
def evaluate(model: nn.Module, data: KDataset, loss: str, batch_size: int = 1000,
             device: str | torch.device = "cpu") -> dict[str, float]:
    """Mean loss and 0-1 error of ``model`` (eval mode) on ``data``."""
    was_training = model.training
    model.eval()
    dev = torch.device(device)
    loss_fn = make_loss(loss, reduction="sum")
    total_loss, errors = 0.0, 0
    out_dim = None
    for X, y in DataLoader(data, batch_size=batch_size):
        X, y = X.to(dev), y.to(dev)
        logits = model(X)
        out_dim = logits.shape[1]
        total_loss += float(loss_fn(logits, prepare_targets(loss, y, out_dim)))
        errors += int(zero_one_errors(logits, y).sum())
    model.train(was_training)
    n = max(len(data), 1)
    return {"loss": total_loss / n, "error": errors / n}


def train_model(
    arch: str | dict[str, Any],
    train_data: KDataset,
    test_data: KDataset | None = None,
    config: TrainConfig | None = None,
    out: str | Path | None = None,
    save_every: int | None = None,
    progress: bool = True,
    **spec_overrides: Any,
) -> tuple[nn.Module, nn.Module, dict[str, Any]]:
    """Train ``arch`` on ``train_data``; return (model, init_model, metrics) and save to ``out``.

    The architecture's input shape and number of outputs come from the data (one logit for binary
    tasks). ``spec_overrides`` (e.g. ``bn=True``) go to :func:`kfacbound.models.resolve_spec`.
    """
    config = config or TrainConfig()
    if config.epochs < 0 or config.batch_size < 1 or config.lr <= 0:
        raise KfacboundError("epochs must be >= 0, batch size >= 1 and lr > 0")
    if config.schedule not in SCHEDULES:
        raise KfacboundError(f"unknown schedule {config.schedule!r}; choose from "
                             f"{', '.join(SCHEDULES)}")
    loss = check_loss(config.loss or default_loss(train_data.num_outputs))
    config = TrainConfig(**{**asdict(config), "loss": loss})
    spec = resolve_spec(arch, train_data.input_shape, train_data.num_outputs, **spec_overrides)
    dev = resolve_device(config.device)
    model = build_model(spec, seed=config.seed)
    init_model = copy.deepcopy(model).eval()
    model.to(dev)
    opt = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                          weight_decay=config.weight_decay)
    loss_fn = make_loss(loss)
    gen = torch.Generator().manual_seed(config.seed)
    loader = DataLoader(train_data, batch_size=config.batch_size, shuffle=True, generator=gen,
                        drop_last=False)
    total_steps = max(config.epochs * len(loader), 1)
    sched = None
    if config.schedule == "cosine":
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda t: 0.5 * (1.0 + math.cos(math.pi * min(t, total_steps) / total_steps)))
    meta_common = {"dataset": train_data.spec, "loss": loss, "training": asdict(config)}
    history: list[dict[str, float]] = []
    start = time.perf_counter()
    bar = progress_bar(config.epochs * len(loader), "train", progress, unit="step")
    for epoch in range(1, config.epochs + 1):
        model.train()
        running, seen = 0.0, 0
        for X, y in loader:
            X, y = X.to(dev), y.to(dev)
            opt.zero_grad(set_to_none=True)
            out_ = model(X)
            batch_loss = loss_fn(out_, prepare_targets(loss, y, out_.shape[1]))
            if not torch.isfinite(batch_loss):
                bar.close()
                raise KfacboundError(
                    f"training diverged at epoch {epoch} (loss is {float(batch_loss)}); "
                    "lower --lr"
                )
            batch_loss.backward()
            opt.step()
            if sched is not None:
                sched.step()
            running += float(batch_loss.detach()) * len(y)
            seen += len(y)
            bar.update(1)
            bar.set_postfix(epoch=epoch, loss=f"{running / seen:.4f}", refresh=False)
        history.append({"epoch": epoch, "train_loss": running / max(seen, 1)})
        if save_every and out is not None and epoch % save_every == 0:
            metrics = _metrics(model, train_data, test_data, loss, dev, epoch, start)
            save_checkpoint(_series_path(out, epoch), model, spec, init_model=init_model,
                            metrics=metrics, **meta_common)
    bar.close()
    model.eval()
    check_finite(model, "trained model")
    metrics = _metrics(model, train_data, test_data, loss, dev, config.epochs, start)
    metrics["history"] = history
    model.cpu()
    if out is not None:
        save_checkpoint(out, model, spec, init_model=init_model, metrics=metrics, **meta_common)
    return model, init_model, metrics


def _series_path(out: str | Path, epoch: int) -> Path:
    out = Path(out)
    return out.with_name(f"{out.stem}-epoch{epoch:03d}{out.suffix or '.kfb'}")


def _metrics(model, train_data, test_data, loss, dev, epoch, start) -> dict[str, Any]:
    train = evaluate(model, train_data, loss, device=dev)
    metrics: dict[str, Any] = {"epoch": epoch, "train_loss": train["loss"],
                               "train_error": train["error"], "n_train": len(train_data),
                               "seconds": round(time.perf_counter() - start, 3)}
    if test_data is not None:
        test = evaluate(model, test_data, loss, device=dev)
        metrics.update(test_loss=test["loss"], test_error=test["error"], n_test=len(test_data))
    return metrics
