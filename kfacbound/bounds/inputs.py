"""What a certificate is computed from: the network, its initialisation w0 and the data.

:func:`resolve_inputs` turns the forms :func:`.certify.certify` accepts into tensors and folded
networks (SCIENCE.md §5, "BatchNorm and validity"):

- the network: a checkpoint path, a :class:`kfacbound.checkpoint.Checkpoint` (w0, the loss and
  the dataset come with it) or an ``nn.Module`` (then w0 is ``init_model``, or absent);
- eval-mode BatchNorm is folded into the preceding layers, of the trained *and* the initial
  network, so the running statistics become ordinary weights of the certified predictor and the
  prior is centred at the folded initialisation (fresh BN — γ=1, β=0, μ=0, σ²=1 — is the
  identity up to its ε). With a data-free prior w0 must not have seen the data: the *initial*
  statistics are folded into w0, never the trained ones;
- the data: a dataset name, a spec dict, a ``TensorDataset`` / (X, y) tuple, or None for the
  checkpoint's own training data; standardised data are refused (the statistics would come from
  the bound set).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import KfacboundError
from ..losses import default_loss
from ..models import fold_batchnorm, has_batchnorm


@dataclass
class CertifyInputs:
    """The resolved inputs of a certificate.

    ``model`` / ``init_model``: the folded, eval-mode trained network and w0 (None: no w0, the
    prior is zero-centred); ``X, y``: the training set as given (before any prior split);
    ``test``: (X, y) of the test split or None; ``data_spec``: the certificate's ``dataset``
    record (with ``size`` = len(X)); ``checkpoint``: its ``checkpoint`` record (path, sha256,
    spec) or None; ``loss``, ``num_outputs``: the loss and the number of logits;
    ``prior_net``: w0 *before* folding (a learnt prior mean trains as the network itself, with
    its BatchNorm layers, and is folded afterwards); ``batchnorm``: the network had BN.
    """

    model: nn.Module
    init_model: nn.Module | None
    X: torch.Tensor
    y: torch.Tensor
    test: tuple[torch.Tensor, torch.Tensor] | None
    data_spec: dict[str, Any]
    checkpoint: dict[str, Any] | None
    loss: str
    num_outputs: int
    prior_net: nn.Module | None = None
    batchnorm: bool = False


def resolve_inputs(model_or_ckpt: Any, data: Any = None, *, init_model: nn.Module | None = None,
                   test_data: Any = None, loss: str | None = None) -> CertifyInputs:
    """:class:`CertifyInputs` from a checkpoint or module and a dataset (module docstring).

    ``loss``: None takes the checkpoint's, else the natural loss of the number of logits.
    """
    from ..curvature.operators import dataset_tensors

    ckpt_info: dict[str, Any] = {}
    if isinstance(model_or_ckpt, nn.Module):
        model = model_or_ckpt
        meta: dict[str, Any] = {}
    else:
        from ..checkpoint import Checkpoint, load_checkpoint

        ckpt = model_or_ckpt if isinstance(model_or_ckpt, Checkpoint) else load_checkpoint(
            model_or_ckpt)
        model, meta = ckpt.model, dict(ckpt.meta)
        if init_model is None:
            init_model = ckpt.init_model
        ckpt_info = {"path": ckpt.path, "sha256": ckpt.sha256(), "spec": ckpt.spec}
    train_ds, test_ds, data_spec = resolve_data(data, test_data, meta)
    if isinstance(data_spec, Mapping) and data_spec.get("standardize"):
        raise KfacboundError(
            "--standardize takes its statistics from the training split, i.e. the bound set, so "
            "the predictor would depend on the data the bound is certified on; certify without "
            "it (or standardise with fixed statistics in an npz file)"
        )
    X, y = dataset_tensors(train_ds)
    data_spec = dict(data_spec) if isinstance(data_spec, Mapping) else {}
    data_spec["size"] = len(X)  # the training set as given, before any prior split
    prior_net, batchnorm = init_model, has_batchnorm(model)
    if batchnorm:
        model = fold_batchnorm(model)
        if init_model is not None:
            init_model = fold_batchnorm(init_model)
    model = copy.deepcopy(model).eval()
    C = num_outputs(model, X[:1])
    loss = loss or meta.get("loss") or default_loss(C)
    if C > 1 and loss == "bce":
        raise KfacboundError("loss 'bce' needs a one-logit network")
    return CertifyInputs(model=model, init_model=init_model, X=X, y=y,
                         test=None if test_ds is None else dataset_tensors(test_ds),
                         data_spec=data_spec, checkpoint=ckpt_info or None, loss=loss,
                         num_outputs=C, prior_net=prior_net, batchnorm=batchnorm)


def resolve_data(dataset: Any, test_dataset: Any, meta: Mapping[str, Any]):
    """(train, test or None, spec or None) from the forms :func:`resolve_inputs` accepts."""
    from ..data import dataset_from_spec, load_dataset

    if dataset is None:
        spec = meta.get("dataset")
        if not spec:
            raise KfacboundError("no dataset given and the checkpoint records none")
        train = dataset_from_spec(spec, "train")
        test = test_dataset if test_dataset is not None else dataset_from_spec(spec, "test")
        return train, test, getattr(train, "spec", spec)
    if isinstance(dataset, str):
        train = load_dataset(dataset, split="train")
        test = test_dataset if test_dataset is not None else load_dataset(dataset, split="test")
        return train, test, train.spec
    if isinstance(dataset, Mapping):
        spec = dict(dataset)
        train = dataset_from_spec(spec, "train")
        test = test_dataset if test_dataset is not None else dataset_from_spec(spec, "test")
        return train, test, train.spec
    return dataset, test_dataset, getattr(dataset, "spec", None)


def num_outputs(model: nn.Module, X: torch.Tensor) -> int:
    """The number of logits of ``model`` (evaluated in eval mode on the first example of
    ``X``); the model's train/eval mode is restored afterwards."""
    training = model.training
    with torch.no_grad():
        out = model.eval()(X[:1])
    model.train(training)
    return int(out.shape[-1])
