"""``kfacbound spectra``: layer Hessian spectra of checkpoints, e.g. over a training run."""

from __future__ import annotations

from pathlib import Path

import click

from ..analysis.compare import DEFAULT_DENSE_LIMIT, PARTS
from ..analysis.spectra import format_rows, spectra_series, write_csv
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


@click.command("spectra")
@click.argument("checkpoints", nargs=-1, required=True, type=click.Path())
@dataset_options(required=False)
@click.option("--split", type=click.Choice(["train", "test"]), default="train", show_default=True)
@click.option("--layer", "layers", multiple=True,
              help="Module path of a Linear/Conv2d layer (repeatable). Default: all.")
@click.option("--part", type=click.Choice(PARTS), default="H", show_default=True,
              help="Hessian H or GGN H_O.")
@click.option("--k", type=int, default=20, show_default=True,
              help="Top eigenvalues by Lanczos for large blocks (top, outliers).")
@click.option("--dense-limit", type=int, default=DEFAULT_DENSE_LIMIT, show_default=True,
              help="Blocks up to this size: all eigenvalues by dense eigh; larger: Lanczos + "
                   "Hutchinson + stochastic Lanczos quadrature.")
@click.option("--slq-probes", type=int, default=10, show_default=True)
@click.option("--slq-steps", type=int, default=80, show_default=True)
@click.option("--hutchinson", "hutchinson_samples", type=int, default=100, show_default=True,
              help="Rademacher probes for the trace of large blocks.")
@click.option("--batch-size", type=int, default=256, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@dtype_option
@device_option
@progress_option
@click.option("--csv", "csv_out", type=click.Path(dir_okay=False), default=None,
              help="Write one row per (checkpoint, layer).")
@click.option("--json", "json_out", type=click.Path(dir_okay=False), default=None,
              help="Write rows and spectral densities as JSON.")
@click.option("--plot-dir", type=click.Path(file_okay=False), default=None,
              help="Write metrics.png (each metric over training, with train/test error) and "
                   "density-<layer>.png.")
@with_dataset
def command(data_opts, checkpoints, split, layers, part, k, dense_limit, slq_probes, slq_steps,
            hutchinson_samples, batch_size, seed, dtype, device, progress, csv_out, json_out,
            plot_dir) -> None:
    """Per layer of each checkpoint: top eigenvalue, trace, effective and stable rank, negative
    mass and fraction, condition number of the positive part, outliers, spectral density.

    Checkpoints are ordered by the epoch in their metadata (a `train --save-every` series);
    all use the same data (default: the first checkpoint's training data).

    \b
    Example:
      kfacbound train --arch fc --widths 50 --dataset mnist5k --downsample 8 --epochs 10 \\
          --save-every 2 -o run.kfb
      kfacbound spectra run-epoch*.kfb --csv spectra.csv --plot-dir plots/
    """
    if k < 1:
        raise KfacboundError("--k must be at least 1")
    ckpts = [open_checkpoint(p) for p in checkpoints]
    data = dataset_from_options(data_opts, split, ckpts[0])
    result = spectra_series(
        [(str(p), c.model, c.meta) for p, c in zip(checkpoints, ckpts, strict=True)],
        data, ckpts[0].loss,
        layers=list(layers) or None, part=part, dense_limit=dense_limit, k=k,
        slq_probes=slq_probes, slq_steps=slq_steps, hutchinson_samples=hutchinson_samples,
        batch_size=batch_size, device=device, seed=seed, progress=progress, dtype=dtype,
    )
    result["meta"].update(checkpoints=[str(p) for p in checkpoints],
                          dataset=getattr(data, "spec", None), split=split)
    click.echo(format_rows(result["rows"]))
    if csv_out:
        write_csv(result["rows"], csv_out)
        click.echo(f"wrote {csv_out}")
    if json_out:
        write_json(json_out, result)
        click.echo(f"wrote {json_out}")
    if plot_dir:
        from ..analysis.plots import plot_densities, plot_spectra_metrics

        out = Path(plot_dir)
        plot_spectra_metrics(result["rows"], out / "metrics.png")
        for layer in dict.fromkeys(r["layer"] for r in result["rows"]):
            plot_densities(result["densities"], out / f"density-{layer}.png", layer)
        click.echo(f"wrote plots to {plot_dir}")
