"""The registry of job kinds: name → function(config, out_dir) → JSON-able dict.

A job function receives the job's resolved configuration (see :mod:`kfacbound.batch.spec`) and
the batch output directory, and returns a dict of results (numbers, strings, small lists). It
raises to fail; the runner records the error and goes on. Functions are referenced by an import
path ``"module:function"`` and imported lazily *in the worker*, so a kind whose analysis module
is missing or broken fails as a recorded job error, not as a crash of the batch.

Built-in kinds
--------------
- ``train`` (needs nothing): :func:`kfacbound.train.train_model` on the dataset's train split
  (test split for the test error), checkpoint written to ``<out>/checkpoints/<key>.kfb``
  (temporary name + rename).
- ``import`` (needs nothing): an existing checkpoint file copied to the same place.
- ``curvature`` (needs one checkpoint): K-FAC factors of every layer.
- ``bound`` (needs one checkpoint): a certified PAC-Bayes bound.
- ``spectra`` (needs one checkpoint): layer-wise spectral diagnostics.
- ``structure`` (needs the checkpoints of all seeds of a cell): eigenspace overlap, rank-1
  ratio, outlier counts.

The analysis kinds adapt the analysis modules' APIs to flat result dicts with the field names
the reports use (``bound``, ``kl``, ``snn_train_error``, ``snn_test_error``, ``overlap``,
``rank1_ratio``, ``outliers``, ``top_eigenvalue`` ...; see :mod:`kfacbound.batch.report`).

Plug-ins: :func:`register_job_kind` at run time, or a ``[kinds]`` table in the spec. Worker
processes import the entry path themselves, so it must be importable there (a module on
``sys.path``; the runner forwards the parent's ``sys.path``).
"""

from __future__ import annotations

import importlib
import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import KfacboundError

NEEDS = ("none", "checkpoint", "checkpoints")
CHECKPOINT_DIR = "checkpoints"
ARTIFACT_DIR = "artifacts"


@dataclass(frozen=True)
class JobKind:
    """A job kind: ``entry`` ("module:function") run with (config, out_dir).

    ``needs``: what it consumes (see :data:`NEEDS`). ``options_from``: optional
    "module:function" whose keyword parameters (minus ``excluded``) are the options this kind
    accepts; when importable, unknown options are rejected at spec time and defaults are filled
    in, so the job's key covers them. ``expand``: optional "module:function" applied to the
    options first (the bound kind expands ``recipe = "best"`` into the recipe's options, so the
    key holds the values a recipe stands for, not its name).
    """

    name: str
    entry: str
    needs: str = "none"
    description: str = ""
    options_from: str | None = None
    excluded: tuple[str, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict)
    expand: str | None = None

    def resolve_options(self, options: dict[str, Any]) -> dict[str, Any]:
        """Options checked against ``options_from`` (plus ``extra``, the adapter's own options
        with their defaults) and completed with their defaults."""
        if self.expand is not None:
            options = resolve_entry(self.expand)(dict(options))
        if self.options_from is None:
            return dict(self.extra, **options)
        try:
            fn = resolve_entry(self.options_from)
        except Exception:  # noqa: BLE001 - analysis missing or broken: the job will say so
            return dict(self.extra, **options)
        params = {n: p for n, p in inspect.signature(fn).parameters.items()
                  if n not in self.excluded
                  and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
        unknown = sorted(set(options) - set(params) - set(self.extra))
        if unknown:
            raise KfacboundError(
                f"unknown option(s) {', '.join(map(repr, unknown))} for {self.name}; "
                f"known: {', '.join(sorted(set(params) | set(self.extra)))}")
        full = dict(self.extra)
        full.update({k: v for k, v in options.items() if k in self.extra})
        for name, p in params.items():
            if name in options:
                full[name] = options[name]
            elif p.default is not inspect.Parameter.empty and _jsonable_default(p.default):
                full[name] = p.default
        return full


def _jsonable_default(value: Any) -> bool:
    return value is None or isinstance(value, bool | int | float | str) and not (
        isinstance(value, float) and not math.isfinite(value))


JOB_KINDS: dict[str, JobKind] = {}


def register_job_kind(name: str, entry: str | Callable[..., dict[str, Any]], needs: str = "none",
                      description: str = "", options_from: str | None = None,
                      excluded: tuple[str, ...] = (),
                      extra: dict[str, Any] | None = None, expand: str | None = None
                      ) -> JobKind:
    """Register (or replace) a job kind; ``entry`` is "module:function" or a module-level
    function (stored by its import path, so worker processes can import it)."""
    if needs not in NEEDS:
        raise KfacboundError(f"needs must be one of {', '.join(NEEDS)}, not {needs!r}")
    if callable(entry):
        module, qual = entry.__module__, entry.__qualname__
        if "<locals>" in qual or module == "__main__":
            raise KfacboundError(
                f"job function {qual} must be a module-level function of an importable module")
        entry = f"{module}:{qual}"
    kind = JobKind(name, entry, needs, description, options_from, excluded, dict(extra or {}),
                   expand)
    JOB_KINDS[name] = kind
    return kind


def get_job_kind(name: str) -> JobKind:
    if name not in JOB_KINDS:
        raise KfacboundError(f"unknown job kind {name!r}; known: {', '.join(sorted(JOB_KINDS))}"
                             " (or declare it in the spec's [kinds] table)")
    return JOB_KINDS[name]


def resolve_entry(entry: str) -> Callable[..., Any]:
    """Import ``"package.module:function"`` (dotted attribute paths allowed after the colon)."""
    module_name, _, attr = entry.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise KfacboundError(f"cannot import {module_name!r} for job entry {entry!r}: {exc}") \
            from exc
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise KfacboundError(f"{module_name!r} has no {attr!r} (job entry {entry!r})") \
                from None
    return obj


def job_function(config: dict[str, Any]) -> Callable[[dict[str, Any], Path], dict[str, Any]]:
    """The function a job runs: its spec-declared ``entry`` or its registered kind's."""
    entry = config.get("entry") or get_job_kind(config["kind"]).entry
    return resolve_entry(entry)


# --------------------------------------------------------------------------------------------
# paths shared by jobs and reports


def checkpoint_path(out_dir: str | Path, key: str) -> Path:
    """Where the train job with ``key`` writes its checkpoint."""
    return Path(out_dir) / CHECKPOINT_DIR / f"{key}.kfb"


def artifact_path(out_dir: str | Path, key: str, suffix: str) -> Path:
    """A file a job writes besides its record: ``<out>/artifacts/<key><suffix>``."""
    path = Path(out_dir) / ARTIFACT_DIR / f"{key}{suffix}"
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def needed_checkpoints(config: dict[str, Any], out_dir: str | Path) -> list[Path]:
    """The checkpoints of the train jobs this job needs; a clear error when one is missing."""
    paths = [checkpoint_path(out_dir, key) for key in config.get("needs", [])]
    for path in paths:
        if not path.is_file():
            raise KfacboundError(f"checkpoint {path} of a finished train job is missing; "
                                 "delete its record or rerun with a fresh --out")
    return paths


def _dataset(config: dict[str, Any], split: str):
    from ..data import load_dataset

    ds = dict(config["dataset"])
    return load_dataset(ds.pop("name"), split, **ds)


# --------------------------------------------------------------------------------------------
# built-in kinds


def run_train(config: dict[str, Any], out_dir: Path) -> dict[str, Any]:
    """Train the cell's network with seed ``config['seed']``; checkpoint to checkpoints/<key>."""
    from ..models import count_parameters
    from ..train import TrainConfig, train_model
    from .spec import job_key

    train = _dataset(config, "train")
    test = _dataset(config, "test")
    cfg = TrainConfig(**config["options"], seed=int(config["seed"]))
    path = checkpoint_path(out_dir, job_key(config))
    path.parent.mkdir(parents=True, exist_ok=True)
    # train_model saves through kfacbound.checkpoint.atomic_write: temporary name, then rename.
    model, _, metrics = train_model(config["arch"], train, test, cfg, out=path, progress=False)
    result = {k: v for k, v in metrics.items() if k != "history"}
    result["final_train_loss"] = metrics["history"][-1]["train_loss"] if metrics.get(
        "history") else None
    result.update(checkpoint=str(path.relative_to(out_dir)), params=count_parameters(model))
    return result


def run_import(config: dict[str, Any], out_dir: Path) -> dict[str, Any]:
    """Copy an existing checkpoint file into ``checkpoints/<key>.kfb`` (temporary name + rename)
    after checking that its sha256 is still the one in the config; report its metrics."""
    import os
    import shutil

    from ..checkpoint import file_sha256, load_checkpoint
    from ..models import count_parameters
    from .spec import job_key

    source = Path(config["path"])
    if not source.is_file():
        raise KfacboundError(f"checkpoint {source} does not exist any more")
    if file_sha256(source) != config["sha256"]:
        raise KfacboundError(f"checkpoint {source} changed since the spec was read; rerun")
    path = checkpoint_path(out_dir, job_key(config))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    shutil.copyfile(source, tmp)
    os.replace(tmp, path)
    ckpt = load_checkpoint(path)
    metrics = {k: v for k, v in ckpt.metrics.items() if not isinstance(v, list | dict)}
    return dict(metrics, checkpoint=str(path.relative_to(out_dir)), source=str(source),
                params=count_parameters(ckpt.model))


def run_curvature(config: dict[str, Any], out_dir: Path) -> dict[str, Any]:
    """K-FAC factors of the checkpoint (saved as an artifact) and a per-layer summary."""
    from . import adapters

    return adapters.curvature(config, out_dir)


def run_bound(config: dict[str, Any], out_dir: Path) -> dict[str, Any]:
    """A certified PAC-Bayes bound of the checkpoint (certificate JSON as an artifact)."""
    from . import adapters

    return adapters.bound(config, out_dir)


def run_structure(config: dict[str, Any], out_dir: Path) -> dict[str, Any]:
    """Hessian structure across the seeds' checkpoints: overlap, rank-1 ratio, outliers."""
    from . import adapters

    return adapters.structure(config, out_dir)


def run_spectra(config: dict[str, Any], out_dir: Path) -> dict[str, Any]:
    """Layer-wise spectral diagnostics of the checkpoint."""
    from . import adapters

    return adapters.spectra(config, out_dir)


register_job_kind("train", "kfacbound.batch.jobs:run_train", "none",
                  "train the cell's network (implied by analyses that need a checkpoint)")
register_job_kind("import", "kfacbound.batch.jobs:run_import", "none",
                  "an existing checkpoint file (implied by the spec's checkpoints list)")
register_job_kind("curvature", "kfacbound.batch.jobs:run_curvature", "checkpoint",
                  "K-FAC factors per layer",
                  options_from="kfacbound.curvature.kfac:compute_kfac",
                  excluded=("model", "data", "loss", "progress", "seed"))
register_job_kind("bound", "kfacbound.batch.jobs:run_bound", "checkpoint",
                  "certified PAC-Bayes bound",
                  options_from="kfacbound.bounds.certify:certify_checkpoint",
                  excluded=("ckpt_or_model", "dataset", "progress", "init_model",
                            "test_dataset", "seed"),
                  expand="kfacbound.bounds.certify:expand_recipe")
register_job_kind("structure", "kfacbound.batch.jobs:run_structure", "checkpoints",
                  "eigenspace overlap across seeds, rank-1 ratio, outliers",
                  options_from="kfacbound.analysis.structure:structure_report",
                  excluded=("models", "data", "loss", "progress", "seed"),
                  extra={"max_examples": None})
register_job_kind("spectra", "kfacbound.batch.jobs:run_spectra", "checkpoint",
                  "layer-wise spectra",
                  options_from="kfacbound.analysis.spectra:spectra_series",
                  excluded=("checkpoints", "data", "loss", "progress", "seed"),
                  extra={"max_examples": None})
