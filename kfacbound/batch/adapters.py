"""Glue between batch job configs and the analysis APIs.

Each adapter loads the checkpoint(s) a job needs (``<out>/checkpoints/<train key>.kfb``), calls
the analysis with the job's options, writes the analysis' full output to
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

import json
from pathlib import Path
from typing import Any

from ..errors import KfacboundError
from .jobs import artifact_path, needed_checkpoints


def _write_json(path: Path, obj: Any) -> None:
    from .runner import to_jsonable

    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(to_jsonable(obj), indent=1, sort_keys=True))
    tmp.replace(path)


def _key(config: dict[str, Any]) -> str:
    from .spec import job_key

    return job_key(config)


def _one_checkpoint(config: dict[str, Any], out_dir: Path):
    from ..checkpoint import load_checkpoint

    (path,) = needed_checkpoints(config, out_dir)
    return load_checkpoint(path)


def _train_data(config: dict[str, Any], ckpt) -> Any:
    """The cell's training data (or the checkpoint's own, for jobs without a dataset)."""
    from ..data import dataset_from_spec, load_dataset

    if config.get("dataset"):
        ds = dict(config["dataset"])
        return load_dataset(ds.pop("name"), "train", **ds)
    if ckpt.dataset:
        return dataset_from_spec(ckpt.dataset, split="train")
    raise KfacboundError("the job has no dataset and the checkpoint records none")


# -------------------------------------------------------------------------------- bound


def bound(config: dict[str, Any], out_dir: Path) -> dict[str, Any]:
    """:func:`kfacbound.bounds.certify_checkpoint` on the cell's checkpoint and dataset."""
    from ..bounds.certify import certify_checkpoint

    (path,) = needed_checkpoints(config, out_dir)
    dataset = config.get("dataset") or None
    cert = certify_checkpoint(str(path), dataset, progress=False, seed=int(config["seed"]),
                              **config["options"])
    cert_path = artifact_path(out_dir, _key(config), ".cert.json")
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
    from ..losses import default_loss

    ckpt = _one_checkpoint(config, out_dir)
    data = _train_data(config, ckpt)
    loss = ckpt.loss or default_loss(data.num_outputs)
    result = compute_kfac(ckpt.model, data, loss=loss, progress=False, seed=int(config["seed"]),
                          **config["options"])
    path = artifact_path(out_dir, _key(config), ".kfac.safetensors")
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


def _analysis_data(config: dict[str, Any], ckpt, max_examples: int | None):
    """The cell's training data, cut to its first ``max_examples`` examples when given (exact
    Hessian blocks cost a pass over the data per Lanczos step)."""
    from ..curvature.operators import dataset_tensors

    X, y = dataset_tensors(_train_data(config, ckpt))
    if max_examples is not None:
        X, y = X[:int(max_examples)], y[:int(max_examples)]
    return X, y


def _models(config: dict[str, Any], out_dir: Path):
    from ..checkpoint import load_checkpoint

    ckpts = [load_checkpoint(p) for p in needed_checkpoints(config, out_dir)]
    seeds = config.get("seeds") or [config.get("seed")] * len(ckpts)
    labels = [f"seed{s}" for s in seeds]
    if len(set(labels)) != len(labels):
        labels = [f"{lab}-{i}" for i, lab in enumerate(labels)]
    return ckpts, labels


def structure(config: dict[str, Any], out_dir: Path) -> dict[str, Any]:
    """:func:`kfacbound.analysis.structure.structure_report` over the checkpoints of all seeds of
    the cell (full report as ``artifacts/<key>.structure.json``). Per layer in the record:
    ``overlap`` (mean over seed pairs of the exact top-k overlap at k; None with one seed),
    ``overlap_kfac``, ``rank1_ratio`` (of the top exact eigenvector, mean over seeds),
    ``outliers`` (exact, mean over seeds), ``expected_outliers`` (C − 1), ``align_A_mean``,
    ``top_eigenvalue`` and ``top_eigenvalues`` (exact, mean over seeds), ``overlap_curve``
    (exact overlap for k = 1..K, mean over seed pairs; None with one seed)."""
    import numpy as np

    from ..analysis.structure import structure_report

    options = dict(config["options"])
    max_examples = options.pop("max_examples", None)
    ckpts, labels = _models(config, out_dir)
    X, y = _analysis_data(config, ckpts[0], max_examples)
    report = structure_report(list(zip(labels, [c.model for c in ckpts], strict=True)), (X, y),
                              ckpts[0].loss, progress=False, seed=int(config["seeds"][0]),
                              **options)
    path = artifact_path(out_dir, _key(config), ".structure.json")
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

    options = dict(config["options"])
    max_examples = options.pop("max_examples", None)
    ckpts, labels = _models(config, out_dir)
    X, y = _analysis_data(config, ckpts[0], max_examples)
    result = spectra_series([(lab, c.model, c.meta) for lab, c in zip(labels, ckpts,
                                                                       strict=True)],
                            (X, y), ckpts[0].loss, progress=False, seed=int(config["seed"]),
                            **options)
    path = artifact_path(out_dir, _key(config), ".spectra.json")
    _write_json(path, result)
    layers = {}
    for row in result["rows"]:
        layers[row["layer"]] = dict({m: row.get(m) for m in METRICS},
                                    top_eigenvalue=row.get("top"), dim=row.get("dim"),
                                    method=row.get("method"))
    return {"n": result["meta"]["n"], "layers": layers, "report": str(path.relative_to(out_dir))}
