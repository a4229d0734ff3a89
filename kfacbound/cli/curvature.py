"""``kfacbound curvature``: layer-wise K-FAC factors of a checkpoint, written to safetensors."""

from __future__ import annotations

import json

import click

from ..curvature.kfac import BACKENDS, BIAS_MODES, METHODS, compute_kfac
from ..losses import LOSSES, default_loss
from .common import (
    dataset_from_options,
    dataset_options,
    device_option,
    open_checkpoint,
    progress_option,
    with_dataset,
)


@click.command("curvature")
@click.argument("checkpoint", type=click.Path())
@dataset_options(required=False)
@click.option("--split", type=click.Choice(["train", "test"]), default="train", show_default=True,
              help="Which split of the dataset the curvature is averaged over.")
@click.option("--method", type=click.Choice(METHODS), default="kflr", show_default=True,
              help="kflr: exact GGN factors; kfac: Monte-Carlo sampled; kfra: recursive.")
@click.option("--mc-samples", type=int, default=1, show_default=True,
              help="kfac: sampled labels per example.")
@click.option("--batch-size", type=int, default=256, show_default=True)
@click.option("--loss", type=click.Choice(LOSSES), default=None,
              help="Default: the checkpoint's training loss (else ce, or bce for one logit).")
@click.option("--bias", "bias_mode", type=click.Choice(BIAS_MODES), default="homogeneous",
              show_default=True,
              help="homogeneous: one block G ⊗ Ã on [W | b]; separate: G_bias for the bias.")
@click.option("--backend", type=click.Choice(BACKENDS), default="auto", show_default=True,
              help="native (hooks + batched backward) or BackPACK; auto: native except kfra.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of kfac's MC labels.")
@device_option
@progress_option
@click.option("-o", "--out", required=True, type=click.Path(dir_okay=False),
              help="Factor file to write (.safetensors).")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary instead of a table.")
@with_dataset
def command(data_opts, checkpoint, split, method, mc_samples, batch_size, loss, bias_mode,
            backend, seed, device, progress, out, as_json) -> None:
    """K-FAC factors G, A of every Linear/Conv2d layer of CHECKPOINT.

    G ⊗ A approximates the layer's GGN block of the mean loss over the dataset (default: the
    checkpoint's training data). Tensors are named `<module path>.G` and `<module path>.A`
    (A in homogeneous coordinates, size in+1, when the layer has a bias); BatchNorm layers get
    their exact GGN diagonal as `<path>.ggn_diag_weight` / `<path>.ggn_diag_bias`. Conv layers
    use Grosse & Martens' KFC convention (recorded as conv_convention = kfc-expand).

    \b
    Example:
      kfacbound curvature t600.kfb --method kflr -o t600.kflr.safetensors
      kfacbound curvature lenet.kfb --dataset fashion-mnist --subset 10000 --method kfac \\
          --mc-samples 4 -o lenet.kfac.safetensors
    """
    ckpt = open_checkpoint(checkpoint)
    data = dataset_from_options(data_opts, split, ckpt=ckpt)
    num_outputs = int(ckpt.spec.get("num_outputs", 0)) or None
    if loss is None:
        loss = ckpt.loss or default_loss(num_outputs or data.num_classes)
    result = compute_kfac(ckpt.model, data, loss=loss, method=method, mc_samples=mc_samples,
                          batch_size=batch_size, device=device, bias=bias_mode, backend=backend,
                          progress=progress, seed=seed)
    result.meta.update({
        "checkpoint": str(checkpoint), "checkpoint_sha256": ckpt.sha256(),
        "dataset": getattr(data, "spec", None), "arch": ckpt.spec,
    })
    result.save(out)
    rows = [{"layer": name, "type": L.module_type, "G": list(L.G.shape), "A": list(L.A.shape),
             "params": L.dim, "lambda_max": float(L.eig("G")[0][0] * L.eig("A")[0][0]),
             "trace": float(L.G.trace() * L.A.trace())} for name, L in result.items()]
    if as_json:
        click.echo(json.dumps({"out": str(out), "meta": result.meta, "layers": rows,
                               "bn": list(result.bn_diag)}, indent=2, default=str))
        return
    click.echo(f"{method} factors over n={result.meta['n']} examples, loss {loss} -> {out}")
    click.echo(f"  {'layer':12s} {'type':8s} {'G':>11s} {'A':>11s} {'λ_max':>11s} {'trace':>11s}")
    for r in rows:
        g = "x".join(map(str, r["G"]))
        a = "x".join(map(str, r["A"]))
        click.echo(f"  {r['layer']:12s} {r['type']:8s} {g:>11s} {a:>11s} "
                   f"{r['lambda_max']:11.4g} {r['trace']:11.4g}")
    if result.bn_diag:
        click.echo(f"  BatchNorm GGN diagonals: {', '.join(result.bn_diag)}")
