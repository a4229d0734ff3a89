"""kfacbound: certified PAC-Bayes bounds and Hessian-structure reports from K-FAC curvature.

Pipeline (one module per stage): :mod:`kfacbound.data` → :mod:`kfacbound.models` and
:mod:`kfacbound.checkpoint` (:mod:`kfacbound.train`) → :mod:`kfacbound.curvature` (K-FAC through
BackPACK, exact Hessian blocks, operators, spectra) → :mod:`kfacbound.bounds` (PAC-Bayes) and
:mod:`kfacbound.analysis` (rank, structure, spectra) → :mod:`kfacbound.batch` (grids, reports).
The ``kfacbound`` command line (:mod:`kfacbound.cli`) is a thin layer over these.
"""

from __future__ import annotations

import os
import sys
from importlib import import_module
from typing import Any

if "torch" not in sys.modules:
    # OpenMP threads that spin while waiting collapse when the cores are shared (a batch with
    # several workers, other jobs): measured on 2 cores with 3 busy processes, 100 posterior steps
    # took 146 s with torch's default active waiting and 17 s with passive waiting. Set before
    # torch loads libgomp; an explicit OMP_WAIT_POLICY from the user wins.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from .checkpoint import Checkpoint, import_state_dict, load_checkpoint, save_checkpoint
from .data import KDataset, list_datasets, load_dataset
from .errors import KfacboundError, UnsupportedModuleError
from .models import build_model, fold_batchnorm, resolve_spec
from .train import TrainConfig, train_model

__version__ = "0.1.0"

# Later pipeline stages load on first use (they import BackPACK/scipy).
_LAZY = {
    "compute_kfac": "kfacbound.curvature",
    "certify_checkpoint": "kfacbound.bounds",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'kfacbound' has no attribute {name!r}")


__all__ = [
    "Checkpoint", "KDataset", "KfacboundError", "TrainConfig", "UnsupportedModuleError",
    "build_model", "fold_batchnorm", "import_state_dict", "list_datasets", "load_checkpoint",
    "load_dataset", "resolve_spec", "save_checkpoint", "train_model", *_LAZY,
]
