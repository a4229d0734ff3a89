"""``kfacbound train``: train a network from the zoo and write a checkpoint."""

from __future__ import annotations

import click

from ..models import ACTIVATIONS, INITS, POOLS
from ..train import SCHEDULES, TrainConfig, train_model
from .common import (
    dataset_from_options,
    dataset_options,
    device_option,
    progress_option,
    with_dataset,
)


def _widths(value: str | None) -> list[int] | None:
    if value is None:
        return None
    try:
        return [int(w) for w in value.split(",") if w.strip()]
    except ValueError:
        raise click.BadParameter("widths are comma-separated integers, e.g. 300,300") from None


@click.command("train")
@click.option("--arch", required=True,
              help="fc, lenet5, cnn, resnet, wrn, a name (T-600, T-1200, T-300-300, T-600-600, "
              "resnet8, resnet20, resnet18, wrn-10-2, resnet8-nobn, ...) or a JSON spec "
              "('{\"arch\": \"resnet\", \"blocks\": [1, 1], \"channels\": [8, 16]}').")
@dataset_options(required=True)
@click.option("--widths", default=None, help="Hidden widths for fc/cnn heads, e.g. 600 or 300,300.")
@click.option("--channels", default=None,
              help="cnn: conv channels, e.g. 16,32; resnet: width of each stage, e.g. 16,32,64.")
@click.option("--kernel", type=int, default=None, help="cnn: conv kernel size (default 3).")
@click.option("--pool", type=click.Choice(POOLS), default=None,
              help="lenet5/cnn: pooling after each conv (default max).")
@click.option("--activation", type=click.Choice(ACTIVATIONS), default=None)
@click.option("--bias/--no-bias", default=None, help="Biases in Linear/Conv layers.")
@click.option("--bn/--no-bn", default=None,
              help="BatchNorm after each hidden layer (resnet/wrn: on by default).")
@click.option("--init", type=click.Choice(INITS), default=None,
              help="default (PyTorch), glorot, dr (Dziugaite & Roy).")
@click.option("--epochs", type=int, default=20, show_default=True)
@click.option("--lr", type=float, default=0.01, show_default=True)
@click.option("--momentum", type=float, default=0.9, show_default=True)
@click.option("--batch-size", type=int, default=100, show_default=True)
@click.option("--weight-decay", type=float, default=0.0, show_default=True)
@click.option("--schedule", type=click.Choice(SCHEDULES), default="constant", show_default=True,
              help="Learning rate: constant, or cosine decay to 0 over the run (ends on a "
                   "plateau of the training loss).")
@click.option("--loss", type=click.Choice(["ce", "bce", "mse"]), default=None,
              help="Default: bce for binary data (one logit), ce otherwise.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--save-every", type=int, default=None,
              help="Also write OUT-epochNNN.kfb every K epochs (spectra over training).")
@device_option
@progress_option
@click.option("-o", "--out", required=True, type=click.Path(dir_okay=False),
              help="Checkpoint file to write (.kfb).")
@with_dataset
def command(data_opts, arch, widths, channels, kernel, pool, activation, bias, bn, init, epochs,
            lr, momentum,
            batch_size, weight_decay, schedule, loss, seed, save_every, device, progress,
            out) -> None:
    """Train ARCH on a dataset with SGD + momentum (Dziugaite & Roy's defaults).

    \b
    Example:
      kfacbound train --arch T-600 --dataset mnist5k --binary --epochs 20 --seed 0 -o t600.kfb
      kfacbound train --arch lenet5 --dataset fashion-mnist --bn --epochs 5 -o lenet_bn.kfb
      kfacbound train --arch resnet8 --dataset fashion-mnist --subset 5000 --epochs 5 -o r8.kfb
    """
    from .import_ import parse_arch

    arch = parse_arch(arch)
    train = dataset_from_options(data_opts, "train")
    test = dataset_from_options(data_opts, "test")
    config = TrainConfig(epochs=epochs, lr=lr, momentum=momentum, batch_size=batch_size,
                         weight_decay=weight_decay, seed=seed, loss=loss, device=device,
                         schedule=schedule)
    channels_list = _widths(channels)
    _, _, metrics = train_model(
        arch, train, test, config, out=out, save_every=save_every, progress=progress,
        widths=_widths(widths), channels=channels_list, kernel=kernel, pool=pool,
        activation=activation, bias=bias, bn=bn,
        init=init,
    )
    click.echo(
        f"train error {metrics['train_error']:.4f}  test error {metrics['test_error']:.4f}  "
        f"(n_train {metrics['n_train']}, n_test {metrics['n_test']}) -> {out}"
    )
