"""``kfacbound info``: what a checkpoint holds."""

from __future__ import annotations

import json

import click

from ..models import count_parameters, parameters_per_layer
from .common import open_checkpoint


@click.command("info")
@click.argument("checkpoint", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON instead.")
def command(checkpoint: str, as_json: bool) -> None:
    """Print a checkpoint's spec, parameters per layer, dataset and metrics.

    \b
    Example:
      kfacbound info t600.kfb
    """
    ckpt = open_checkpoint(checkpoint)
    layers = parameters_per_layer(ckpt.model)
    if as_json:
        click.echo(json.dumps({
            "spec": ckpt.spec, "params": count_parameters(ckpt.model),
            "layers": [{"name": n, "type": t, "params": p} for n, t, p in layers],
            "has_init": ckpt.init_model is not None, "meta": ckpt.meta,
        }, indent=2))
        return
    click.echo(f"checkpoint   {checkpoint}")
    click.echo(f"architecture {json.dumps(ckpt.spec, sort_keys=True)}")
    click.echo(f"parameters   {count_parameters(ckpt.model):,}")
    for name, kind, p in layers:
        click.echo(f"  {name:12s} {kind:12s} {p:>10,}")
    click.echo(f"initial w0   {'stored' if ckpt.init_model is not None else 'missing'}")
    if ckpt.dataset:
        ds = {k: v for k, v in ckpt.dataset.items() if v not in (None, False)}
        click.echo(f"dataset      {json.dumps(ds, sort_keys=True)}")
    if ckpt.loss:
        click.echo(f"loss         {ckpt.loss}")
    if ckpt.meta.get("training"):
        click.echo(f"training     {json.dumps(ckpt.meta['training'], sort_keys=True)}")
    metrics = {k: v for k, v in ckpt.metrics.items() if k != "history"}
    if metrics:
        click.echo(f"metrics      {json.dumps(metrics, sort_keys=True)}")
