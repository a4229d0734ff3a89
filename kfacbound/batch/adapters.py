"""The built-in job functions: glue between batch job configs and the training and analysis APIs.

:func:`train` and :func:`import_checkpoint` write ``<out>/checkpoints/<key>.kfb``. Each analysis
adapter loads the checkpoint(s) a job needs (``<out>/checkpoints/<train key>.kfb``), calls the
analysis with the job's options, writes the analysis' full output to
``<out>/artifacts/<key>.<ext>`` and returns a *flat* summary for the record, with the field names
the reports read:

- ``bound``: ``bound``, ``kl``, ``snn_train_error`` (the Monte-Carlo error ê_N of the stochastic
  network on the bound set), ``snn_test_error``, ``train_error``, ``test_error``, ``n``,
  ``mc_samples``, ``mc_error_bound``, ``lambda``, ``j``, ``params``, ``seconds``, ``prior_split``,
  and per layer ``layers.<name>.kl`` / ``.k`` (the certificate's ``kl_layers``).
- ``curvature``: per layer ``layers.<name>.top_eigenvalue`` (λ_max(G)·λ_max(Ã)), ``trace``
  (tr G · tr Ã), ``dim``; ``top_eigenvalue`` (max over layers).
- ``structure`` and ``spectra``: whatever :mod:`kfacbound.analysis.structure` /
  :mod:`kfacbound.analysis.spectra` return, flattened by the report.

Options: each kind accepts the keyword parameters of the analysis function it calls, minus the
ones the batch sets itself (the model, the data, ``progress``, the seed); defaults are filled in
at spec time so that a job's key covers them (see :class:`kfacbound.batch.jobs.JobKind`).
The data is the dataset of the job's cell (train split; the test split for test errors).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np

from ..checkpoint import file_sha256, load_checkpoint
from ..data import dataset_tensors, resolve_dataset
from ..errors import KfacboundError
from ..io import atomic_write, to_jsonable, write_json_atomic
from ..losses import default_loss
from ..models import count_parameters
from ..train import TrainConfig, train_model
from .jobs import get_job_kind
from .records import artifact_path, checkpoint_path, job_key, needed_checkpoints

# The analyses (kfacbound.curvature, .bounds, .analysis) are imported inside the functions that
# run them: they load BackPACK and scipy, which a worker needs only for the kinds it runs.


def _write_json(path: Path, obj: Any) -> None:
    """A job's full output as strict JSON (no trailing newline, as artifacts always were)."""
    write_json_atomic(path, to_jsonable(obj), indent=1, sort_keys=True, newline=False)


def _one_checkpoint(config: dict[str, Any], out_dir: Path):
    (path,) = needed_checkpoints(config, out_dir)
    return load_checkpoint(path)


def _dataset(config: dict[str, Any], split: str, ckpt=None) -> Any:
    """The cell's ``split`` (or the checkpoint's own data, for jobs without a dataset)."""
    return resolve_dataset(config.get("dataset") or None, split,
                           default=ckpt.dataset if ckpt is not None else None,
                           missing="the job has no dataset and the checkpoint records none")


# -------------------------------------------------------------------------------- checkpoints


def train(config: dict[str, Any], out_dir: Path) -> dict[str, Any]:
    """Train the cell's network with seed ``config['seed']``; checkpoint to checkpoints/<key>."""
    train_data = _dataset(config, "train")
    test_data = _dataset(config, "test")
    cfg = TrainConfig(**config["options"], seed=int(config["seed"]))
    path = checkpoint_path(out_dir, job_key(config))
    path.parent.mkdir(parents=True, exist_ok=True)
    # train_model saves through kfacbound.io.atomic_write: temporary name, then rename.
    model, _, metrics = train_model(config["arch"], train_data, test_data, cfg, out=path,
                                    progress=False)
    result = {k: v for k, v in metrics.items() if k != "history"}
    result["final_train_loss"] = metrics["history"][-1]["train_loss"] if metrics.get(
        "history") else None
    result.update(checkpoint=str(path.relative_to(out_dir)), params=count_parameters(model))
    return result


def import_checkpoint(config: dict[str, Any], out_dir: Path) -> dict[str, Any]:
    """Copy an existing checkpoint file into ``checkpoints/<key>.kfb`` (temporary name + rename)
    after checking that its sha256 is still the one in the config; report its metrics."""
    source = Path(config["path"])
    if not source.is_file():
        raise KfacboundError(f"checkpoint {source} does not exist any more")
    if file_sha256(source) != config["sha256"]:
        raise KfacboundError(f"checkpoint {source} changed since the spec was read; rerun")
    path = checkpoint_path(out_dir, job_key(config))
    atomic_write(path, lambda tmp: shutil.copyfile(source, tmp))
    ckpt = load_checkpoint(path)
    metrics = {k: v for k, v in ckpt.metrics.items() if not isinstance(v, list | dict)}
    return dict(metrics, checkpoint=str(path.relative_to(out_dir)), source=str(source),
                params=count_parameters(ckpt.model))


# -------------------------------------------------------------------------------- bound


def bound(config: dict[str, Any], out_dir: Path) -> dict[str, Any]:
    """:func:`kfacbound.bounds.certify_checkpoint` on the cell's checkpoint and dataset."""
    from ..bounds.certify import certify_checkpoint

    (path,) = needed_checkpoints(config, out_dir)
    dataset = config.get("dataset") or None
    options = get_job_kind("bound").call_options(config["options"])
    if isinstance(options.get("posterior"), list):  # a recipe's selection (expand_recipe)
        from ..bounds.certify import certify_best

        common = {k: v for k, v in options.items() if k not in ("posterior", "selection")}
        cert = certify_best(str(path), dataset, [{"posterior": p} for p in options["posterior"]],
                            progress=False, seed=int(config["seed"]), **common)
    else:
        cert = certify_checkpoint(str(path), dataset, progress=False, seed=int(config["seed"]),
                                  **options)
    cert_path = artifact_path(out_dir, job_key(config), ".cert.json")
    _write_json(cert_path, cert)
    return bound_summary(cert, artifact=str(cert_path.relative_to(out_dir)))


def bound_summary(cert: dict[str, Any], artifact: str | None = None) -> dict[str, Any]:
    """The flat fields of a certificate that the reports use (see the module docstring)."""
    out = {
        "bound": cert.get("bound"),
        "kl": cert.get("kl"),
        "snn_train_error": cert.get("mc_error"),
        "snn_test_error": cert.get("test_error_stochastic"),
        "train_error": cert.get("train_error"),
        "test_error": cert.get("test_error"),
        "n": cert.get("n"),
        "mc_samples": cert.get("mc_samples"),
        "mc_error_bound": cert.get("mc_error_bound"),
        "lambda": cert.get("lambda"),
        "j": cert.get("j"),
        "posterior": cert.get("posterior"),
        "params": cert.get("model_params") or cert.get("num_params"),
        "seconds": (cert.get("time_s") or {}).get("total"),
        "prior_split": (cert.get("prior") or {}).get("split"),
    }
    layers = {row["layer"]: {"kl": row["kl"], "k": row["k"]}
              for row in cert.get("kl_layers") or []}
    if layers:
        out["layers"] = layers
    if artifact:
        out["certificate"] = artifact
    return out


# -------------------------------------------------------------------------------- curvature


def curvature(config: dict[str, Any], out_dir: Path) -> dict[str, Any]:
    """:func:`kfacbound.curvature.kfac.compute_kfac` on the cell's checkpoint; factors saved as
    ``artifacts/<key>.kfac.safetensors``; per-layer top eigenvalue and trace of G ⊗ Ã."""
    from ..curvature.kfac import compute_kfac

    ckpt = _one_checkpoint(config, out_dir)
    data = _dataset(config, "train", ckpt)
    loss = ckpt.loss or default_loss(data.num_outputs)
    result = compute_kfac(ckpt.model, data, loss=loss, progress=False, seed=int(config["seed"]),
                          **config["options"])
    path = artifact_path(out_dir, job_key(config), ".kfac.safetensors")
    result.save(path)
    layers = {}
    for name, layer in result.layers.items():
        g, a = layer.eig("G")[0], layer.eig("A")[0]
        layers[name] = {"dim": layer.dim, "top_eigenvalue": float(g.max() * a.max()),
                        "trace": float(layer.G.trace() * layer.A.trace())}
    return {"method": result.meta.get("method"), "n": result.meta.get("n"), "loss": loss,
            "top_eigenvalue": max(v["top_eigenvalue"] for v in layers.values()),
            "layers": layers, "factors": str(path.relative_to(out_dir))}


# -------------------------------------------------------------------------------- structure


def _analysis_inputs(config: dict[str, Any], out_dir: Path):
    """(options without ``max_examples``, checkpoints, their labels, (X, y)) of a structure or
    spectra job: the needed checkpoints labelled by seed, and the cell's training data cut to
    its first ``max_examples`` examples when given (exact Hessian blocks cost a pass over the
    data per Lanczos step)."""
    options = dict(config["options"])
    max_examples = options.pop("max_examples", None)
    ckpts = [load_checkpoint(p) for p in needed_checkpoints(config, out_dir)]
    seeds = config.get("seeds") or [config.get("seed")] * len(ckpts)
    labels = [f"seed{s}" for s in seeds]
    if len(set(labels)) != len(labels):
        labels = [f"{lab}-{i}" for i, lab in enumerate(labels)]
    X, y = dataset_tensors(_dataset(config, "train", ckpts[0]))
    if max_examples is not None:
        X, y = X[:int(max_examples)], y[:int(max_examples)]
    return options, ckpts, labels, (X, y)


def structure(config: dict[str, Any], out_dir: Path) -> dict[str, Any]:
    """:func:`kfacbound.analysis.structure.structure_report` over the checkpoints of all seeds of
    the cell (full report as ``artifacts/<key>.structure.json``). Per layer in the record:
    ``overlap`` (mean over seed pairs of the exact top-k overlap at k; None with one seed),
    ``overlap_kfac``, ``rank1_ratio`` (of the top exact eigenvector, mean over seeds),
    ``outliers`` (exact, mean over seeds), ``expected_outliers`` (C − 1), ``align_A_mean``,
    ``top_eigenvalue`` and ``top_eigenvalues`` (exact, mean over seeds), ``overlap_curve``
    (exact overlap for k = 1..K, mean over seed pairs; None with one seed)."""
    from ..analysis.structure import structure_report

    options, ckpts, labels, (X, y) = _analysis_inputs(config, out_dir)
    report = structure_report(list(zip(labels, [c.model for c in ckpts], strict=True)), (X, y),
                              ckpts[0].loss, progress=False, seed=int(config["seeds"][0]),
                              **options)
    path = artifact_path(out_dir, job_key(config), ".structure.json")
    _write_json(path, report)
    layers: dict[str, Any] = {}
    for row in report["summary"]:
        if row["group"] == "bn-vs-no-bn":
            continue
        name = row["layer"]
        tops = [m["layers"][name]["exact_eigenvalues"] for m in report["models"]]
        kk = min(min(len(t) for t in tops), int(report["meta"]["k"]))
        mean_top = np.mean([t[:kk] for t in tops], axis=0)
        curves = [p["exact"] for p in report["pairs"] if p["layer"] == name
                  and p["group"] == row["group"]]
        curve = np.mean([c[:row["k"]] for c in curves], axis=0).tolist() if curves else None
        layers[name] = {
            "dim": row["dim"], "k": row["k"], "overlap": row["overlap_exact"],
            "overlap_kfac": row["overlap_kfac"], "random_overlap": row["random_overlap"],
            "rank1_ratio": row["rank1_top"], "outliers": row["outliers_exact"],
            "outliers_kfac": row["outliers_kfac"], "expected_outliers": row["expected_outliers"],
            "align_A_mean": row["align_A_mean"], "top_eigenvalue": float(mean_top[0]),
            "top_eigenvalues": mean_top.tolist(), "overlap_curve": curve,
        }
    return {"k": report["meta"]["k"], "n": report["meta"]["n"], "models": len(ckpts),
            "layers": layers, "report": str(path.relative_to(out_dir))}


def spectra(config: dict[str, Any], out_dir: Path) -> dict[str, Any]:
    """:func:`kfacbound.analysis.spectra.spectra_series` on the cell's checkpoint (full result
    with densities as ``artifacts/<key>.spectra.json``); per layer in the record the metrics of
    :data:`kfacbound.analysis.spectra.METRICS` with ``top`` also as ``top_eigenvalue``."""
    from ..analysis.spectra import METRICS, spectra_series

    options, ckpts, labels, (X, y) = _analysis_inputs(config, out_dir)
    result = spectra_series([(lab, c.model, c.meta) for lab, c in zip(labels, ckpts,
                                                                       strict=True)],
                            (X, y), ckpts[0].loss, progress=False, seed=int(config["seed"]),
                            **options)
    path = artifact_path(out_dir, job_key(config), ".spectra.json")
    _write_json(path, result)
    layers = {}
    for row in result["rows"]:
        layers[row["layer"]] = dict({m: row.get(m) for m in METRICS},
                                    top_eigenvalue=row.get("top"), dim=row.get("dim"),
                                    method=row.get("method"))
    return {"n": result["meta"]["n"], "layers": layers, "report": str(path.relative_to(out_dir))}
