"""``kfacbound rank``: numerical rank of H, H_O, H_F against the deep-linear-network formulas."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click
import torch

from ..analysis.rank import measure_ranks, plot_sweep, sweep_ranks, write_csv
from ..errors import KfacboundError
from ..losses import LOSSES
from ..models import ACTIVATIONS, build_model, resolve_spec
from .common import (
    dataset_from_options,
    dataset_options,
    device_option,
    open_checkpoint,
    progress_option,
    with_dataset,
    write_json,
)


def _ints(value: str | None, what: str) -> list[int] | None:
    if value is None:
        return None
    try:
        out = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"{what} are comma-separated integers, e.g. 8,6") from None
    if any(v < 1 for v in out):
        raise click.BadParameter(f"{what} must be positive")
    return out


def _num_outputs(ds, loss: str) -> int:
    return 1 if loss == "bce" else int(ds.num_classes)


def _load(data_opts: dict[str, Any], seed: int, ckpt=None, n: int | None = None):
    opts = dict(data_opts)
    if opts.get("data_seed") is None and ckpt is None:
        opts["data_seed"] = seed
    if n is not None:
        if (opts.get("dataset") or "") == "gaussian":
            opts["n"] = n
        else:
            opts["subset"] = n
    return dataset_from_options(opts, split="train", ckpt=ckpt)


def _print_result(res: dict[str, Any]) -> None:
    click.echo(f"params {res['params']}  n {res['n']}  K {res['K']}  loss {res['loss']}  "
               f"r {res['r']}  q {res['q']}  prediction: {res['prediction']}")
    click.echo(f"{'':5} {'rank':>7} {'pred':>7} {'tol':>10} {'σ kept':>10} {'σ dropped':>10} "
               f"{'gap':>9}")
    for key in ("H", "H_O", "H_F"):
        s = res["svd"][key]
        pred = res["predicted"][key]

        def fmt(v, width=10):
            return f"{'-':>{width}}" if v is None else f"{v:{width}.3e}"
        click.echo(f"{key:5} {res['rank'][key]:7d} {('-' if pred is None else pred):>7} "
                   f"{s['tol']:10.3e} {fmt(s['sigma_kept'])} {fmt(s['sigma_dropped'])} "
                   f"{fmt(s['gap'], 9)}")
    click.echo(res["note"])


@click.command("rank")
@click.argument("ckpt", required=False, type=click.Path(exists=True, dir_okay=False))
@click.option("--arch", default="fc", show_default=True,
              help="Architecture at initialisation when no CKPT is given (fc for the theory).")
@click.option("--widths", default=None,
              help="Hidden widths, e.g. 8,6. In --sweep mode: the list of widths w (hidden "
                   "layers [w]*depth).")
@click.option("--activation", type=click.Choice(ACTIVATIONS), default="linear",
              show_default=True)
@click.option("--bias/--no-bias", default=False, show_default=True)
@click.option("--init", default="glorot", show_default=True,
              help="Initialisation (glorot as in the Hessian-rank papers).")
@dataset_options(required=False)
@click.option("--loss", type=click.Choice(LOSSES), default=None,
              help="Default: the checkpoint's, else ce.")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed of the initialisation (and of the data when --data-seed is not given).")
@click.option("--tol", type=float, default=None,
              help="Rank tolerance on singular values (default σ_max·p·eps).")
@click.option("--method", type=click.Choice(["svd", "eigh"]), default="svd", show_default=True,
              help="Singular values by SVD, or |eigenvalues| (same numbers, faster).")
@click.option("--max-params", type=int, default=6000, show_default=True,
              help="Refuse dense Hessians larger than this.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None,
              help="Write the result as JSON (keys params, rank, predicted, r, q, ...).")
@click.option("--sweep", "sweep_dir", type=click.Path(file_okay=False), default=None,
              help="Sweep mode: write rank_sweep.csv and rank_sweep.png to this directory.")
@click.option("--depths", default=None, help="--sweep: numbers of hidden layers, e.g. 1,2,3.")
@click.option("--ns", default=None, help="--sweep: sample sizes, e.g. 20,40,100.")
@device_option
@progress_option
@with_dataset
def command(data_opts, ckpt, arch, widths, activation, bias, init, loss, seed, tol, method,
            max_params, json_path, sweep_dir, depths, ns, device, progress) -> None:
    """Numerical rank of the Hessian H, its GGN part H_O and H_F = H − H_O (dense, float64, SVD
    with tolerance σ_max·p·eps) beside the deep-linear-network predictions (Singh et al. 2021).

    Example: kfacbound rank --arch fc --widths 8,6 --activation linear --no-bias
    --dataset gaussian --n 40 --input-dim 16 --classes 5 --loss mse --seed 0 --json out.json
    """
    width_list = _ints(widths, "widths")
    if sweep_dir is not None:
        if ckpt is not None:
            raise KfacboundError("--sweep builds networks itself; do not pass a checkpoint")
        if arch != "fc":
            raise KfacboundError("--sweep supports --arch fc only")
        if not width_list:
            raise KfacboundError("--sweep needs --widths, e.g. 4,8,16")
        if data_opts.get("dataset") is None:
            raise KfacboundError("--sweep needs --dataset")
        loss = loss or "ce"
        depth_list = _ints(depths, "depths") or [2]
        n_list = _ints(ns, "ns") or [None]

        def data_fn(n):
            ds = _load(data_opts, seed, n=n)
            return ds.X.reshape(len(ds.X), -1).to(torch.float64), ds.y, _num_outputs(ds, loss)

        rows = sweep_ranks(data_fn, width_list, depth_list, n_list, activation=activation,
                           bias=bias, loss=loss, seed=seed, tol=tol, method=method,
                           max_params=max_params, progress=progress,
                           extra={"dataset": data_opts.get("dataset")})
        for row in rows:
            if row.get("n") is None:
                row["n"] = len(data_fn(None)[0])
        out = Path(sweep_dir)
        csv_path = write_csv(rows, out / "rank_sweep.csv")
        png = plot_sweep(rows, out / "rank_sweep.png",
                         title=f"{data_opts.get('dataset')}, {activation}, {loss}")
        for row in rows:
            click.echo(", ".join(f"{k}={row.get(k)}" for k in
                                 ("depth", "width", "n", "params", "rank_H", "pred_H", "rank_H_O",
                                  "pred_H_O", "rank_H_F", "pred_H_F", "skipped") if k in row))
        click.echo(f"wrote {csv_path} and {png}")
        return

    if ckpt is not None:
        ck = open_checkpoint(ckpt)
        model = ck.model
        loss = loss or ck.loss or "ce"
        ds = _load(data_opts, seed, ckpt=ck)
    else:
        if data_opts.get("dataset") is None:
            raise KfacboundError("give a checkpoint or --dataset (e.g. --dataset gaussian)")
        loss = loss or "ce"
        ds = _load(data_opts, seed)
        spec = resolve_spec({"arch": arch}, input_shape=list(ds.X.shape[1:]),
                            num_outputs=_num_outputs(ds, loss), widths=width_list,
                            activation=activation, bias=bias, init=init)
        model = build_model(spec, seed=seed)
    res = measure_ranks(model, ds.X.to(torch.float64), ds.y, loss, tol, method=method,
                        max_params=max_params, device=device, progress=progress)
    res["dataset"] = getattr(ds, "spec", None)
    _print_result(res)
    if json_path:
        write_json(json_path, res)
        click.echo(f"wrote {json_path}")
