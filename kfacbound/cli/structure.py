"""``kfacbound structure``: Dissecting-Hessian structure and eigenspace overlap across models."""

from __future__ import annotations

from pathlib import Path

import click

from ..analysis.compare import DEFAULT_DENSE_LIMIT, PARTS
from ..analysis.structure import format_summary, structure_report
from ..curvature.kfac import METHODS
from ..errors import KfacboundError
from .common import (
    dataset_from_options,
    dataset_options,
    device_option,
    dtype_option,
    open_checkpoint,
    progress_option,
    with_dataset,
    write_json,
)


def model_labels(paths: list[str]) -> list[str]:
    """Short distinct labels: file names, or full paths where names repeat."""
    names = [Path(p).name for p in paths]
    return names if len(set(names)) == len(names) else [str(p) for p in paths]


@click.command("structure")
@click.argument("checkpoints", nargs=-1, required=True, type=click.Path())
@dataset_options(required=False)
@click.option("--split", type=click.Choice(["train", "test"]), default="train", show_default=True)
@click.option("--layer", "layers", multiple=True,
              help="Module path of a Linear/Conv2d layer (repeatable). Default: every layer of "
                   "equal shape in all models.")
@click.option("--k", type=int, default=10, show_default=True, help="Top-k eigenspaces compared.")
@click.option("--part", type=click.Choice(PARTS), default="H", show_default=True,
              help="Exact block: Hessian H or GGN H_O.")
@click.option("--method", type=click.Choice(METHODS), default="kflr", show_default=True,
              help="K-FAC variant.")
@click.option("--batch-size", type=int, default=256, show_default=True)
@click.option("--dense-limit", type=int, default=DEFAULT_DENSE_LIMIT, show_default=True,
              help="Blocks up to this size use dense eigh, larger ones Lanczos.")
@click.option("--seed", type=int, default=0, show_default=True)
@dtype_option
@device_option
@progress_option
@click.option("--json", "json_out", type=click.Path(dir_okay=False), default=None,
              help="Write the full report (per model, per pair, summary) as JSON.")
@click.option("--plot", "plot_out", type=click.Path(dir_okay=False), default=None,
              help="Write one figure with BN and non-BN models.")
@with_dataset
def command(data_opts, checkpoints, split, layers, k, part, method, batch_size, dense_limit, seed,
            dtype,
            device, progress, json_out, plot_out) -> None:
    """Per layer of CHECKPOINTS (several seeds, with and without BatchNorm): top-k eigenspace
    overlap between every pair of models against k (exact by Lanczos, and K-FAC), rank-1 ratio of
    reshaped top eigenvectors, alignment of A's top eigenvector with E[a], outliers against C-1.

    All models are evaluated on the same data (default: the first checkpoint's training data).
    Only layers of equal shape can be compared across models.

    \b
    Example:
      kfacbound structure s0.kfb s1.kfb bn0.kfb bn1.kfb --subset 1000 --k 10 \\
          --json structure.json --plot structure.png
    """
    if k < 1:
        raise KfacboundError("--k must be at least 1")
    ckpts = [open_checkpoint(p) for p in checkpoints]
    data = dataset_from_options(data_opts, split, ckpts[0])
    losses = {c.loss for c in ckpts if c.loss}
    if len(losses) > 1:
        raise KfacboundError(f"the checkpoints were trained with different losses: {losses}")
    labels = model_labels(list(checkpoints))
    report = structure_report(
        list(zip(labels, [c.model for c in ckpts], strict=True)), data,
        next(iter(losses), None),
        layers=list(layers) or None, k=k, part=part, method=method, dense_limit=dense_limit,
        batch_size=batch_size, kfac_batch_size=batch_size, device=device, seed=seed,
        progress=progress, dtype=dtype,
    )
    report["meta"].update(checkpoints=[str(p) for p in checkpoints],
                          dataset=getattr(data, "spec", None), split=split)
    click.echo(format_summary(report["summary"]))
    if report["meta"]["skipped_layers"]:
        click.echo(f"skipped (shape differs across models): "
                   f"{', '.join(report['meta']['skipped_layers'])}")
    if json_out:
        write_json(json_out, report)
        click.echo(f"wrote {json_out}")
    if plot_out:
        from ..analysis.plots import plot_structure

        plot_structure(report, plot_out)
        click.echo(f"wrote {plot_out}")
