"""The registry of job kinds: name → function(config, out_dir) → JSON-able dict.

A job function receives the job's resolved configuration (see :mod:`kfacbound.batch.spec`) and
the batch output directory, and returns a dict of results (numbers, strings, small lists). It
raises to fail; the runner records the error and goes on. Functions are referenced by an import
path ``"module:function"`` and imported lazily *in the worker*, so a kind whose analysis module
is missing or broken fails as a recorded job error, not as a crash of the batch.

This module is the registry alone: it names job functions by import path, so it imports no
job implementation (the built-in ones are in :mod:`kfacbound.batch.adapters`).

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

# re-exported: job functions (plug-ins, tests) import the output paths from here
from .records import ARTIFACT_DIR as ARTIFACT_DIR
from .records import CHECKPOINT_DIR as CHECKPOINT_DIR
from .records import artifact_path as artifact_path
from .records import checkpoint_path as checkpoint_path
from .records import needed_checkpoints as needed_checkpoints

NEEDS = ("none", "checkpoint", "checkpoints")


@dataclass(frozen=True)
class JobKind:
    """A job kind: ``entry`` ("module:function") run with (config, out_dir).

    ``needs``: what it consumes (see :data:`NEEDS`). ``options_from``: optional
    "module:function" whose keyword parameters (minus ``excluded``) are the options this kind
    accepts; when importable, unknown options are rejected at spec time and defaults are filled
    in, so the job's key covers them. ``expand``: optional "module:function" applied to the
    options first (the bound kind expands ``recipe = "best"`` into the recipe's options, so the
    key holds the values a recipe stands for, not its name). ``key_neutral``: options added
    after studies were run, with the value that reproduces the old behaviour: left out of the
    resolved options (and so of the key) at that value, so that an older study still resumes;
    :meth:`call_options` puts them back before the job runs.
    """

    name: str
    entry: str
    needs: str = "none"
    description: str = ""
    options_from: str | None = None
    excluded: tuple[str, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict)
    expand: str | None = None
    key_neutral: dict[str, Any] = field(default_factory=dict)

    def call_options(self, options: dict[str, Any]) -> dict[str, Any]:
        """The keywords a job passes to its function: its options with the key-neutral ones
        that were left out at their neutral value restored."""
        return {**self.key_neutral, **options}

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
        for name, neutral in self.key_neutral.items():
            if name in full and full[name] == neutral:
                del full[name]
        return full


def _jsonable_default(value: Any) -> bool:
    return value is None or isinstance(value, bool | int | float | str) and not (
        isinstance(value, float) and not math.isfinite(value))


JOB_KINDS: dict[str, JobKind] = {}


def register_job_kind(name: str, entry: str | Callable[..., dict[str, Any]], needs: str = "none",
                      description: str = "", options_from: str | None = None,
                      excluded: tuple[str, ...] = (),
                      extra: dict[str, Any] | None = None, expand: str | None = None,
                      key_neutral: dict[str, Any] | None = None) -> JobKind:
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
                   expand, dict(key_neutral or {}))
    JOB_KINDS[name] = kind
    return kind


def get_job_kind(name: str) -> JobKind:
    """The registered kind ``name``; a :class:`KfacboundError` listing the known ones if none."""
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
# built-in kinds (functions in kfacbound.batch.adapters)


register_job_kind("train", "kfacbound.batch.adapters:train", "none",
                  "train the cell's network (implied by analyses that need a checkpoint)")
register_job_kind("import", "kfacbound.batch.adapters:import_checkpoint", "none",
                  "an existing checkpoint file (implied by the spec's checkpoints list)")
register_job_kind("curvature", "kfacbound.batch.adapters:curvature", "checkpoint",
                  "K-FAC factors per layer",
                  options_from="kfacbound.curvature.kfac:compute_kfac",
                  excluded=("model", "data", "loss", "progress", "seed"))
register_job_kind("bound", "kfacbound.batch.adapters:bound", "checkpoint",
                  "certified PAC-Bayes bound",
                  options_from="kfacbound.bounds.certify:certify_checkpoint",
                  excluded=("ckpt_or_model", "dataset", "progress", "init_model",
                            "test_dataset", "seed"),
                  expand="kfacbound.bounds.certify:expand_recipe",
                  key_neutral={"optimizer": "rmsprop", "schedule": "step", "prior_dropout": 0.0})
register_job_kind("structure", "kfacbound.batch.adapters:structure", "checkpoints",
                  "eigenspace overlap across seeds, rank-1 ratio, outliers",
                  options_from="kfacbound.analysis.structure:structure_report",
                  excluded=("models", "data", "loss", "progress", "seed"),
                  extra={"max_examples": None})
register_job_kind("spectra", "kfacbound.batch.adapters:spectra", "checkpoint",
                  "layer-wise spectra",
                  options_from="kfacbound.analysis.spectra:spectra_series",
                  excluded=("checkpoints", "data", "loss", "progress", "seed"),
                  extra={"max_examples": None})
