"""``kfacbound compare``: the BatchNorm report (see kfacbound.batch.compare)."""

from __future__ import annotations

import click

from ..bounds.families import family_names
from ..errors import KfacboundError


@click.command("compare")
@click.argument("checkpoints", nargs=-1, type=click.Path(dir_okay=False))
@click.option("--batch", "batch_dir", type=click.Path(file_okay=False), default=None,
              help="A finished `kfacbound batch` output directory to report on.")
@click.option("--out", "-o", "out", required=True, type=click.Path(file_okay=False),
              help="Report directory: report.md, PNG figures, bounds.csv, layers.csv.")
@click.option("--posterior", type=click.Choice(family_names()), default="diag",
              show_default=True, help="Checkpoints: posterior of the bound.")
@click.option("--iterations", type=int, default=None,
              help="Checkpoints: posterior optimisation steps [default: the bound's default].")
@click.option("--mc-passes", type=int, default=None,
              help="Checkpoints: Monte-Carlo passes of the certificate.")
@click.option("--k", "k", type=int, default=None,
              help="Checkpoints: eigenspace dimension of the structure analysis.")
@click.option("--max-examples", type=int, default=1000, show_default=True,
              help="Checkpoints: exact Hessian blocks of the structure analysis on the first "
              "N training examples.")
@click.option("--no-structure", is_flag=True, help="Checkpoints: bounds only.")
@click.option("--workers", "-j", type=int, default=1, show_default=True,
              help="Checkpoints: analyses run at once.")
@click.option("--trials", type=click.IntRange(min=1), default=None,
              help="--batch: the learnt-prior recipes were chosen among this many settings "
              "certified on the same data; the study page adds the bound paying for it "
              "(bound_after_trials) [default: the spec's recipe_trials].")
@click.option("--progress/--no-progress", default=True, show_default=True)
def command(checkpoints: tuple[str, ...], batch_dir: str | None, out: str, posterior: str,
            iterations: int | None, mc_passes: int | None, k: int | None,
            max_examples: int, no_structure: bool,
            workers: int, trials: int | None, progress: bool) -> None:
    """Networks with and without BatchNorm side by side: certified bound, KL, stochastic-network
    errors, eigenspace overlap, rank-1 ratio, outlier counts, top eigenvalues, with PNG plots on
    one markdown page OUT/report.md.

    Either CHECKPOINTS (bound and structure analyses run now, cached in OUT/batch so a rerun is
    instant) or --batch DIR (numbers taken from a batch, finished or not). With --batch, also
    OUT/study.md: the study page (training plateau, bounds and per-layer KL with seed spread,
    the Dissecting-Hessian claims with verdicts, cost; see kfacbound.batch.study).

    Examples: kfacbound compare --batch smoke-out -o bn-report;
    kfacbound compare a.kfb a_bn.kfb --iterations 2000 -o bn-report
    """
    from ..batch.compare import compare_batch, compare_checkpoints

    if bool(checkpoints) == bool(batch_dir):
        raise KfacboundError("give either checkpoint files or --batch DIR (not both)")
    if batch_dir:
        from ..batch.study import study_page

        path = compare_batch(batch_dir, out)
        click.echo(str(study_page(batch_dir, out, trials=trials)))
    else:
        bound = {"posterior": posterior}
        if iterations is not None:
            bound["iterations"] = iterations
        if mc_passes is not None:
            bound["mc_passes"] = mc_passes
        structure = None if no_structure else {"max_examples": max_examples}
        if structure is not None and k is not None:
            structure["k"] = k
        path = compare_checkpoints(list(checkpoints), out, bound=bound, structure=structure,
                                   workers=workers, progress=progress)
    click.echo(str(path))
