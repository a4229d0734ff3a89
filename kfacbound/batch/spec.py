"""Batch specs: a TOML grid expanded into fully resolved, content-keyed jobs.

A spec describes the grid datasets × architectures × {bn, no-bn} × seeds × analyses. Every cell
becomes a *job*: a JSON dict that states everything the job depends on (dataset options, the
architecture spec with every default filled in, the seed, the analysis options, and the keys of
the jobs it needs). Its **key** is ``sha256`` of the canonical JSON of that dict (sorted keys,
no whitespace), so an edited option gives a new key and an unchanged cell keeps its key: this
is what lets :mod:`kfacbound.batch.runner` resume. Display labels (``label``) are left out of
the hash, so renaming a column does not rerun anything.

Format (every key optional unless marked; unknown keys are errors)::

    name = "smoke"                 # a title for the report
    description = "..."            # free text for the report
    recipe_trials = 3500           # the bound recipes' settings were chosen among this many
                                   # certified on the same training data: the study page adds
                                   # the bound paying for that choice (bound_after_trials)
    seeds = [0, 1]                 # training / analysis seeds (default [0])
    bn = [false, true]             # BatchNorm after every hidden layer: false, true or both
    checkpoints = ["runs/*.kfb"]   # optional: evaluate existing checkpoints (paths or globs,
                                   # relative to the spec file); each becomes an ``import``
                                   # job whose dataset, architecture, BN and seed come from
                                   # the file. Without [train] no training happens.
                                   # (TOML: top-level keys come before the first [table].)

    [[datasets]]                   # one table per dataset (or: datasets = ["digits", ...])
    name = "digits"                # required: a name of kfacbound.data.load_dataset
    label = "digits"               # optional column label (not hashed)
    subset = 1000                  # every other key is a load_dataset option

    [[architectures]]              # one table per network (or: architectures = ["T-600"])
    arch = "fc"                    # required: fc, lenet5, cnn or an alias (T-600, ...)
    label = "fc32"                 # optional column label (not hashed)
    widths = [32]                  # every other key goes to kfacbound.models.resolve_spec;
                                   # "bn" is not allowed here: use the top-level bn list
    train = { epochs = 40 }        # optional: this network's [train] fields over [train]

    [train]                        # kfacbound.train.TrainConfig fields except seed
    epochs = 5                     # (the seed comes from `seeds`)

    [[analyses]]                   # one table per analysis
    kind = "bound"                 # required: a registered job kind (kfacbound.batch.jobs)
    iterations = 2000              # every other key is an option of that kind
    architectures = ["fc32"]       # optional: only the cells of these architecture labels
    [analyses.grid]                # optional: one job per value (cartesian product)
    posterior = ["diag", "kfac"]

    [kinds]                        # optional plug-in job kinds, "module:function"; the
                                   # module must be importable (installed or on PYTHONPATH)
    sleep = "mypkg.jobs:sleep"     # needs nothing; or a table
    score = { entry = "mypkg.jobs:score", needs = "checkpoint" }

What a job needs is a property of its kind (:class:`kfacbound.batch.jobs.JobKind`):

- ``"none"``: one job per (dataset, architecture, bn, seed, grid point); datasets and
  architectures may be omitted, then the grid has one ``null`` entry for them.
- ``"checkpoint"`` (curvature, bound, spectra): one job per checkpoint, needing the ``train``
  job of its (dataset, architecture, bn, seed) (generated automatically) or the ``import`` job
  of a checkpoint file.
- ``"checkpoints"`` (structure): one job per (dataset, architecture, bn, grid point) needing the
  checkpoints of *all* seeds, so that it compares independently trained networks.

A kind listed in ``[kinds]`` replaces a built-in kind of the same name (tests use this to swap in
a fast fake ``train``).

Seeds: the grid seed seeds a train job (initialisation and shuffling, see
:class:`kfacbound.train.TrainConfig`) and the analyses of its checkpoint (Monte-Carlo draws).
Dataset options, including a dataset's own ``seed`` (random subsets, synthetic data), are fixed
per ``[[datasets]]`` entry, so all seeds of a cell see the same data.
"""

from __future__ import annotations

import copy
import glob
import inspect
import itertools
import tomllib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..checkpoint import file_sha256, load_checkpoint
from ..data import SOURCES, list_datasets, load_dataset
from ..errors import KfacboundError
from ..io import canonical_json as canonical_json  # re-export: the keys' JSON, its old home
from ..losses import check_loss
from ..models import _DEFAULTS, ALIASES, has_batchnorm, resolve_spec
from ..train import SCHEDULES, TrainConfig
from .jobs import NEEDS, get_job_kind
from .records import HASH_EXCLUDED as HASH_EXCLUDED
from .records import Job
from .records import job_key as job_key

TOP_KEYS = ("name", "description", "seeds", "bn", "datasets", "architectures", "train",
            "checkpoints", "analyses", "kinds", "recipe_trials")


@dataclass
class BatchSpec:
    """A validated spec and its jobs in dependency order (every job after the jobs it needs),
    grouped by (dataset, architecture) cell in spec order."""

    name: str
    jobs: list[Job]
    text: str = ""
    path: str | None = None
    description: str = ""
    kinds: dict[str, dict[str, str]] = field(default_factory=dict)
    recipe_trials: int = 1

    def job(self, key: str) -> Job:
        for job in self.jobs:
            if job.key == key:
                return job
        raise KeyError(key)


def load_spec(path: str | Path) -> BatchSpec:
    """Read, validate and expand the TOML spec at ``path``."""
    path = Path(path)
    if not path.is_file():
        raise KfacboundError(f"spec file {str(path)!r} does not exist")
    text = path.read_text()
    return parse_spec(text, where=str(path))


def parse_spec(text: str, where: str = "spec") -> BatchSpec:
    """Validate and expand a spec given as TOML text (``where`` names it in error messages)."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise KfacboundError(f"{where}: not valid TOML: {exc}") from None
    spec = expand_spec(raw, where=where)
    spec.text = text
    spec.path = where
    return spec


# --------------------------------------------------------------------------------------------
# validation helpers


def _fail(where: str, message: str) -> KfacboundError:
    return KfacboundError(f"{where}: {message}")


def _check_keys(table: dict[str, Any], allowed, where: str) -> None:
    unknown = sorted(set(table) - set(allowed))
    if unknown:
        raise _fail(where, f"unknown key(s) {', '.join(map(repr, unknown))}; "
                           f"allowed: {', '.join(allowed)}")


def _as_list(value: Any, where: str) -> list[Any]:
    if isinstance(value, list):
        return value
    return [value]


def _tables(raw: dict[str, Any], section: str, key: str, what: str, where: str
            ) -> list[tuple[str, dict[str, Any]]]:
    """(location for messages, a copy of the table) per entry of a ``[[section]]`` list; a bare
    string stands for ``{key = string}``. ``what`` completes the error for an entry without
    ``key``, e.g. "a dataset is a name or a table with a 'name' key"."""
    out = []
    for i, entry in enumerate(_as_list(raw.get(section, []), where)):
        here = f"{where}: {section}[{i}]"
        if isinstance(entry, str):
            entry = {key: entry}
        if not isinstance(entry, dict) or key not in entry:
            raise KfacboundError(f"{here}: {what}")
        out.append((here, copy.deepcopy(entry)))
    return out


def _seeds(raw: dict[str, Any], where: str) -> list[int]:
    seeds = raw.get("seeds", [0])
    if not isinstance(seeds, list) or not seeds:
        raise _fail(where, "seeds must be a non-empty list of integers, e.g. seeds = [0, 1, 2]")
    for s in seeds:
        if isinstance(s, bool) or not isinstance(s, int) or s < 0:
            raise _fail(where, f"seeds must be non-negative integers, got {s!r}")
    if len(set(seeds)) != len(seeds):
        raise _fail(where, f"seeds has duplicates: {seeds}")
    return list(seeds)


def _bns(raw: dict[str, Any], where: str) -> list[bool]:
    bn = _as_list(raw.get("bn", [False]), where)
    if not bn or any(not isinstance(b, bool) for b in bn):
        raise _fail(where, f"bn must be true, false or a list of them, got {raw.get('bn')!r}")
    if len(set(bn)) != len(bn):
        raise _fail(where, f"bn has duplicates: {bn}")
    return bn


def _datasets(raw: dict[str, Any], where: str) -> list[tuple[dict[str, Any], str]]:
    """(load_dataset options including ``name``, label) per dataset entry."""
    known = list(list_datasets())
    out = []
    for here, entry in _tables(raw, "datasets", "name",
                               "a dataset is a name or a table with a 'name' key", where):
        label = str(entry.pop("label", entry["name"]))
        if entry["name"] not in known:
            raise KfacboundError(
                f"{here}: unknown dataset {entry['name']!r}; known: {', '.join(known)}")
        if "split" in entry:
            raise KfacboundError(f"{here}: 'split' is chosen by each analysis; remove it")
        _check_dataset_options(entry, here)
        out.append((entry, label))
    labels = [lab for _, lab in out]
    if len(set(labels)) != len(labels):
        raise _fail(where, f"dataset labels must be distinct: {labels}; add label = '...'")
    return out


def _check_dataset_options(entry: dict[str, Any], where: str) -> None:
    params = inspect.signature(load_dataset).parameters
    named = {n for n, p in params.items() if p.kind is p.KEYWORD_ONLY}
    loader = SOURCES[entry["name"]][0]
    source = {n for n, p in inspect.signature(loader).parameters.items()
              if n != "split" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    for key in entry:
        if key != "name" and key not in named and key not in source:
            raise KfacboundError(
                f"{where}: unknown dataset option {key!r}; known: "
                f"{', '.join(sorted(named | source))}")


def _placeholder_shape(arch: dict[str, Any]) -> list[int]:
    name = arch.get("arch")
    return [1] if name == "fc" or name in ALIASES else [1, 32, 32]


def _architectures(raw: dict[str, Any], where: str) -> list[tuple[dict[str, Any], str]]:
    """(resolved architecture spec without data shape, label) per entry."""
    out = []
    for here, entry in _tables(raw, "architectures", "arch",
                               "an architecture is a name or a table with an 'arch' key", where):
        if "bn" in entry:
            raise KfacboundError(f"{here}: set BatchNorm with the top-level bn list, not here")
        for key in ("input_shape", "num_outputs"):
            if key in entry:
                raise KfacboundError(f"{here}: {key!r} comes from the dataset; remove it")
        label = entry.pop("label", None)
        train = entry.pop("train", None)
        try:
            spec = resolve_spec(entry, input_shape=_placeholder_shape(entry), num_outputs=2)
        except KfacboundError as exc:
            raise KfacboundError(f"{here}: {exc}") from None
        # the keys each architecture understands
        allowed = set(_DEFAULTS[spec["arch"]]) | {"arch", "alias", "input_shape", "num_outputs"}
        _check_keys(spec, sorted(allowed), here)
        spec.pop("input_shape")
        spec.pop("num_outputs")
        if label is None:
            label = spec.get("alias") or _auto_label(spec)
        if train is not None:
            if not isinstance(train, dict):
                raise KfacboundError(f"{here}: train must be a table of TrainConfig fields")
            spec["_train"] = train  # taken out again by expand_spec (arch_train)
        out.append((spec, str(label)))
    labels = [lab for _, lab in out]
    if len(set(labels)) != len(labels):
        raise _fail(where, f"architecture labels must be distinct: {labels}; add label = '...'")
    return out


def _auto_label(spec: dict[str, Any]) -> str:
    if spec["arch"] == "fc":
        return "fc-" + "-".join(str(w) for w in spec["widths"])
    if spec["arch"] == "cnn":
        return "cnn-" + "-".join(str(c) for c in spec["channels"])
    return spec["arch"]


#: TrainConfig fields added after studies were run, at the default that reproduces the old
#: behaviour: left out of a train job's options (and so of its key) at that value, so that a
#: study made before the field existed still resumes.
KEY_NEUTRAL_TRAIN_DEFAULTS = {"schedule": "constant"}


def _train_options(raw: dict[str, Any], where: str,
                   override: dict[str, Any] | None = None) -> dict[str, Any]:
    """[train] (with an architecture's own ``train = {...}`` table over it), validated and
    completed with TrainConfig's defaults."""
    table = raw.get("train", {})
    if not isinstance(table, dict):
        raise _fail(where, "[train] must be a table of TrainConfig fields")
    table = dict(table, **(override or {}))
    defaults = asdict(TrainConfig())
    allowed = [k for k in defaults if k != "seed"]
    if "seed" in table:
        raise _fail(where, "[train]: the seed comes from the top-level seeds list")
    _check_keys(table, allowed, f"{where}: [train]")
    options = {k: v for k, v in defaults.items() if k != "seed"}
    options.update(table)
    if options["schedule"] not in SCHEDULES:
        raise _fail(where, f"[train] schedule must be one of {', '.join(SCHEDULES)}")
    for key, neutral in KEY_NEUTRAL_TRAIN_DEFAULTS.items():
        if options.get(key) == neutral:
            del options[key]
    for key in ("epochs", "batch_size"):
        if isinstance(options[key], bool) or not isinstance(options[key], int):
            raise _fail(where, f"[train] {key} must be an integer")
    if options["epochs"] < 0 or options["batch_size"] < 1:
        raise _fail(where, "[train] needs epochs >= 0 and batch_size >= 1")
    if not isinstance(options["lr"], int | float) or options["lr"] <= 0:
        raise _fail(where, "[train] lr must be a positive number")
    if options["loss"] is not None:
        try:
            check_loss(options["loss"])
        except KfacboundError as exc:
            raise _fail(where, f"[train] {exc}") from None
    return options


def _plugin_kinds(raw: dict[str, Any], where: str) -> dict[str, dict[str, str]]:
    table = raw.get("kinds", {})
    if not isinstance(table, dict):
        raise _fail(where, "[kinds] must map a kind name to 'module:function' or a table")
    out = {}
    for name, value in table.items():
        here = f"{where}: kinds.{name}"
        if isinstance(value, str):
            value = {"entry": value}
        if not isinstance(value, dict):
            raise KfacboundError(f"{here}: give 'module:function' or {{entry = ..., needs = ...}}")
        _check_keys(value, ("entry", "needs"), here)
        entry = value.get("entry")
        if not isinstance(entry, str) or entry.count(":") != 1:
            raise KfacboundError(f"{here}: entry must look like 'package.module:function'")
        needs = value.get("needs", "none")
        if needs not in NEEDS:
            raise KfacboundError(f"{here}: needs must be one of {', '.join(NEEDS)}")
        out[name] = {"entry": entry, "needs": needs}
    return out


def _analyses(raw: dict[str, Any], kinds: dict[str, Any], where: str) -> list[dict[str, Any]]:
    """Each analysis table expanded over its grid: list of {"kind", "options"}."""
    out = []
    for here, entry in _tables(raw, "analyses", "kind",
                               "an analysis is a kind name or a table with 'kind'", where):
        kind = entry.pop("kind")
        grid = entry.pop("grid", {})
        only = entry.pop("architectures", None)
        if only is not None and (not isinstance(only, list) or not only
                                 or not all(isinstance(a, str) for a in only)):
            raise KfacboundError(f"{here}: architectures must be a non-empty list of "
                                 "architecture labels")
        if kind in ("train", "import"):
            raise KfacboundError(f"{here}: {kind} jobs are implied; use [train] or checkpoints")
        if kind in kinds:
            spec_kind = None
        else:
            try:
                spec_kind = get_job_kind(kind)
            except KfacboundError as exc:
                raise KfacboundError(f"{here}: {exc}") from None
        if not isinstance(grid, dict):
            raise KfacboundError(f"{here}: grid must be a table of option = [values]")
        for name, values in grid.items():
            if not isinstance(values, list) or not values:
                raise KfacboundError(f"{here}: grid.{name} must be a non-empty list of values")
            if name in entry:
                raise KfacboundError(f"{here}: {name!r} is both an option and a grid axis")
        names = sorted(grid)
        for combo in itertools.product(*(grid[n] for n in names)):
            options = dict(entry, **dict(zip(names, combo, strict=True)))
            if spec_kind is not None:
                try:
                    options = spec_kind.resolve_options(options)
                except KfacboundError as exc:
                    raise KfacboundError(f"{here}: {exc}") from None
            out.append({"kind": kind, "options": options, "architectures": only, "where": here})
    return out


# --------------------------------------------------------------------------------------------
# expansion


def checkpoint_sources(paths: list[str | Path], where: str = "spec") -> list[dict[str, Any]]:
    """``import`` job configs for existing checkpoint files (dataset, architecture, BatchNorm and
    seed read from each checkpoint; its sha256 is part of the config, so an edited file gets a
    new key)."""
    configs = []
    for path in paths:
        ckpt = load_checkpoint(path)
        dataset = dict(ckpt.dataset or {})
        for key in ("split", "selection"):
            dataset.pop(key, None)
        if not dataset.get("name"):
            raise KfacboundError(f"{where}: checkpoint {path} records no dataset")
        arch = {k: v for k, v in ckpt.spec.items() if k not in ("input_shape", "num_outputs")}
        seed = (ckpt.meta.get("training") or {}).get("seed", 0)
        configs.append({
            "kind": "import",
            "path": str(Path(path).resolve()),
            "sha256": file_sha256(path),
            "dataset": dataset,
            "arch": arch,
            "bn": bool(has_batchnorm(ckpt.model)),
            "seed": int(seed),
            "label": {"dataset": dataset["name"], "arch": arch.get("alias") or _auto_label(arch),
                      "file": Path(path).name},
        })
    return configs


def _checkpoint_paths(raw: dict[str, Any], where: str) -> list[Path]:
    entries = _as_list(raw.get("checkpoints", []), where)
    base = Path(where).parent if Path(where).suffix == ".toml" else Path.cwd()
    paths: list[Path] = []
    for entry in entries:
        if not isinstance(entry, str):
            raise _fail(where, "checkpoints must be a list of file paths or glob patterns")
        pattern = entry if Path(entry).is_absolute() else str(base / entry)
        found = sorted(glob.glob(pattern))
        if not found:
            raise _fail(where, f"no checkpoint matches {entry!r}")
        paths += [Path(p) for p in found]
    return paths


def expand_spec(raw: dict[str, Any], where: str = "spec") -> BatchSpec:
    """Validate a parsed spec and expand it into jobs (see the module docstring)."""
    if not isinstance(raw, dict):
        raise _fail(where, "a spec is a TOML table")
    _check_keys(raw, TOP_KEYS, where)
    name = str(raw.get("name", Path(where).stem))
    seeds = _seeds(raw, where)
    bns = _bns(raw, where)
    kinds = _plugin_kinds(raw, where)
    datasets = _datasets(raw, where)
    archs = _architectures(raw, where)
    arch_train = {label: spec.pop("_train") for spec, label in archs if "_train" in spec}
    analyses = _analyses(raw, kinds, where)
    imports = checkpoint_sources(_checkpoint_paths(raw, where), where)

    def needs_of(kind: str) -> str:
        return kinds[kind]["needs"] if kind in kinds else get_job_kind(kind).needs

    uses_checkpoints = any(needs_of(a["kind"]) != "none" for a in analyses)
    if "train" in raw or (uses_checkpoints and not imports) or (
            not analyses and (datasets or archs)):
        if not datasets or not archs:
            raise _fail(where, "training needs at least one [[datasets]] and one "
                               "[[architectures]] entry")
        train_options = _train_options(raw, where)
    else:
        train_options = None
    if not analyses and train_options is None:
        raise _fail(where, "nothing to do: add [[datasets]], [[architectures]] and "
                           "[[analyses]] (or a [train] table)")

    def plug(config: dict[str, Any]) -> dict[str, Any]:
        if config["kind"] in kinds:
            config["entry"] = kinds[config["kind"]]["entry"]
        return config

    jobs: list[Job] = []
    seen: set[str] = set()

    def add(config: dict[str, Any]) -> Job:
        job = Job.from_config(plug(config))
        if job.key not in seen:
            seen.add(job.key)
            jobs.append(job)
        return job

    # producers of checkpoints: train jobs of the grid, and imported checkpoint files
    producers: list[Job] = []
    if train_options is not None:
        per_arch = {label: _train_options(raw, f"{where}: architecture {label!r}", override)
                    for label, override in arch_train.items()}
        for (ds, ds_label), (arch, arch_label), bn, seed in itertools.product(
                datasets, archs, bns, seeds):
            options = per_arch.get(arch_label, train_options)
            producers.append(add({
                "kind": "train",
                "dataset": ds,
                "arch": dict(arch, bn=bn),
                "bn": bn,
                "seed": seed,
                "options": dict(options),
                "label": {"dataset": ds_label, "arch": arch_label},
            }))
    producers += [add(config) for config in imports]

    def cell(job: Job) -> tuple:
        label = job.config["label"]
        return (label["dataset"], label["arch"], job.config["bn"])

    groups: dict[tuple, list[Job]] = {}
    for job in producers:
        groups.setdefault(cell(job), []).append(job)

    ds_axis = datasets or [(None, None)]
    arch_axis = archs or [(None, None)]
    arch_labels = {label for _, label in archs} | {g[1] for g in groups}
    for analysis in analyses:
        kind, options, only = analysis["kind"], analysis["options"], analysis["architectures"]
        unknown = sorted(set(only or ()) - arch_labels)
        if unknown:
            raise KfacboundError(
                f"{analysis['where']}: architectures {', '.join(map(repr, unknown))} are not "
                f"in the grid; its labels: {', '.join(sorted(map(str, arch_labels)))}")
        wanted = set(only) if only is not None else None
        needs = needs_of(kind)
        if needs == "none":
            for (ds, ds_label), (arch, arch_label), bn, seed in itertools.product(
                    ds_axis, arch_axis, bns, seeds):
                if wanted is not None and arch_label not in wanted:
                    continue
                add({"kind": kind, "dataset": ds,
                     "arch": None if arch is None else dict(arch, bn=bn), "bn": bn,
                     "seed": seed, "options": copy.deepcopy(options),
                     "label": {"dataset": ds_label, "arch": arch_label}})
            continue
        for members in groups.values():
            first = members[0].config
            if wanted is not None and first["label"]["arch"] not in wanted:
                continue
            base = {"kind": kind, "dataset": first["dataset"], "arch": first["arch"],
                    "bn": first["bn"], "options": copy.deepcopy(options),
                    "label": {"dataset": first["label"]["dataset"],
                              "arch": first["label"]["arch"]}}
            if needs == "checkpoints":
                add(dict(base, seeds=[m.config["seed"] for m in members],
                         needs=[m.key for m in members]))
                continue
            for member in members:
                config = dict(base, seed=member.config["seed"], needs=[member.key])
                if "file" in member.config["label"]:
                    config["label"] = dict(config["label"], file=member.config["label"]["file"])
                add(config)
    trials = raw.get("recipe_trials", 1)
    if isinstance(trials, bool) or not isinstance(trials, int) or trials < 1:
        raise _fail(where, f"recipe_trials must be an integer ≥ 1, not {trials!r}")
    return BatchSpec(name=name, jobs=_cell_major(jobs), description=str(raw.get("description", "")),
                     kinds=kinds, recipe_trials=trials)


def _cell_major(jobs: list[Job]) -> list[Job]:
    """Jobs grouped by (dataset, architecture) cell, cells in spec order, the order within a
    cell kept: a cheap architecture listed first is trained *and* analysed before the next
    cell's training starts (a long study gives complete cells early). Dependency order holds,
    since a job needs only checkpoints of its own cell, which come first within it."""
    first: dict[tuple, int] = {}
    for job in jobs:
        label = job.config.get("label") or {}
        first.setdefault((label.get("dataset"), label.get("arch")), len(first))

    def cell(job: Job) -> int:
        label = job.config.get("label") or {}
        return first[(label.get("dataset"), label.get("arch"))]

    return sorted(jobs, key=cell)  # stable
