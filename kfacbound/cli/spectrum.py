"""``kfacbound spectrum``: exact against K-FAC top eigenvalues and eigenspace overlaps per layer."""

from __future__ import annotations

import click

from ..analysis.compare import DEFAULT_DENSE_LIMIT, PARTS, compare_model, format_table
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


@click.command("spectrum")
@click.argument("checkpoint", type=click.Path())
@dataset_options(required=False)
@click.option("--split", type=click.Choice(["train", "test"]), default="train", show_default=True,
              help="Which split the curvature is taken on.")
@click.option("--layer", "layers", multiple=True,
              help="Module path of a Linear/Conv2d layer (repeatable). Default: all.")
@click.option("--k", type=int, default=20, show_default=True, help="Top eigenpairs per layer.")
@click.option("--compare", "method", type=click.Choice(METHODS), default="kflr",
              show_default=True, help="K-FAC variant to compare against the exact blocks.")
@click.option("--mc-samples", type=int, default=1, show_default=True,
              help="Monte-Carlo samples for --compare kfac.")
@click.option("--factors", type=click.Path(dir_okay=False), default=None,
              help="Use K-FAC factors written by `kfacbound curvature` instead of computing "
                   "them (they should be of the same data; --compare is then ignored).")
@click.option("--parts", type=click.Choice(["both", *PARTS]), default="both", show_default=True,
              help="Exact blocks: the Hessian H, the GGN H_O, or both.")
@click.option("--batch-size", type=int, default=256, show_default=True,
              help="Mini-batch size for K-FAC and the exact products.")
@click.option("--dense-limit", type=int, default=DEFAULT_DENSE_LIMIT, show_default=True,
              help="Blocks with at most this many parameters are formed densely (eigh, exact "
                   "Frobenius error); larger ones use Lanczos.")
@click.option("--frob-probes", type=int, default=10, show_default=True,
              help="Rademacher probes estimating the Frobenius error of large blocks (0: skip).")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed of the Lanczos start vector, probes and K-FAC's MC labels.")
@dtype_option
@device_option
@progress_option
@click.option("--json", "json_out", type=click.Path(dir_okay=False), default=None,
              help="Write the full comparison as JSON.")
@click.option("--plot", "plot_out", type=click.Path(dir_okay=False), default=None,
              help="Write a figure (eigenvalues and overlap against k per layer).")
@with_dataset
def command(data_opts, checkpoint, split, layers, k, method, mc_samples, factors, parts,
            batch_size,
            dense_limit, frob_probes, seed, dtype, device, progress, json_out, plot_out) -> None:
    """Top-k eigenvalues of each layer's exact Hessian H and GGN H_O block against K-FAC's
    G ⊗ A, and the overlap ||V_exact^T V_kfac||_F^2 / k of the top-k eigenspaces for k = 1..K.

    All curvature is of the mean loss over the chosen data (default: the checkpoint's training
    data; use --subset N to keep exact products affordable).

    \b
    Example:
      kfacbound spectrum t600.kfb --subset 1000 --k 20 --compare kflr --json s.json --plot s.png
    """
    if k < 1:
        raise KfacboundError("--k must be at least 1")
    if batch_size < 1:
        raise KfacboundError("--batch-size must be at least 1")
    ckpt = open_checkpoint(checkpoint)
    data = dataset_from_options(data_opts, split, ckpt)
    kfac = None
    if factors:
        from ..curvature.kfac import KFACResult

        kfac = KFACResult.load(factors)
    result = compare_model(
        ckpt.model, data, ckpt.loss, kfac=kfac, method=method, mc_samples=mc_samples,
        layers=list(layers) or None, k=k, parts=PARTS if parts == "both" else (parts,),
        dense_limit=dense_limit, frob_probes=frob_probes, batch_size=batch_size,
        kfac_batch_size=batch_size, device=device, seed=seed, progress=progress, dtype=dtype,
    )
    result["meta"].update(checkpoint=str(checkpoint), dataset=getattr(data, "spec", None),
                          split=split, factors=factors)
    click.echo(format_table(result))
    if json_out:
        write_json(json_out, result)
        click.echo(f"wrote {json_out}")
    if plot_out:
        from ..analysis.plots import plot_spectrum_comparison

        plot_spectrum_comparison(result, plot_out)
        click.echo(f"wrote {plot_out}")
