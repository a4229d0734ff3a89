"""``kfacbound import``: wrap a plain state_dict trained elsewhere into a checkpoint."""

from __future__ import annotations

import json

import click

from ..checkpoint import import_state_dict
from ..errors import KfacboundError
from ..models import resolve_spec
from .common import dataset_options, pop_dataset_options


def parse_arch(arch: str) -> str | dict:
    """``--arch``: a name, or a JSON spec when it starts with ``{``."""
    if arch.strip().startswith("{"):
        try:
            spec = json.loads(arch)
        except json.JSONDecodeError as exc:
            raise KfacboundError(f"--arch is not valid JSON: {exc}") from None
        if not isinstance(spec, dict):
            raise KfacboundError("--arch JSON must be an object with an 'arch' key")
        return spec
    return arch


@click.command("import")
@click.argument("state_dict", type=click.Path())
@click.option("--arch", required=True,
              help="Architecture spec: a name (T-600, resnet20, resnet18, wrn-10-2, ...) or a JSON "
              "spec ('{\"arch\": \"fc\", \"widths\": [100]}').")
@click.option("--input-shape", default=None,
              help="Input shape, e.g. 1,28,28 or 784 (default: from --dataset).")
@click.option("--num-outputs", type=int, default=None,
              help="Output logits (default: from --dataset: 1 if binary else C).")
@click.option("--init", "init_path", type=click.Path(), default=None,
              help="State_dict of the initial weights w0 (enables the prior at initialisation).")
@click.option("--loss", type=click.Choice(["ce", "bce", "mse"]), default=None)
@dataset_options(required=False)
@click.option("-o", "--out", required=True, type=click.Path(dir_okay=False))
def command(state_dict, arch, input_shape, num_outputs, init_path, loss, out, **kwargs) -> None:
    """Wrap STATE_DICT (.pt/.pth via torch.load(weights_only=True), or .safetensors).

    A pickle that carries code is refused and never run. torchvision-style ResNet
    state_dicts (conv1.weight, layer1.0.bn1.running_mean, ..., fc.bias) load into the zoo's
    resnet unchanged (a DataParallel 'module.' prefix is stripped); every key and shape is
    checked.

    \b
    Example:
      kfacbound import weights.pt --arch T-600 --dataset mnist5k --binary -o imported.kfb
      kfacbound import tv_resnet18.pt --arch resnet18 --dataset cifar10 -o r18.kfb
    """
    from .common import dataset_from_options

    data_opts = pop_dataset_options(kwargs)
    arch_spec = parse_arch(arch)
    dataset_spec = None
    if data_opts.get("dataset"):
        data = dataset_from_options(data_opts, "train")
        dataset_spec = data.spec
        shape = input_shape or ",".join(map(str, data.input_shape))
        num_outputs = num_outputs or data.num_outputs
    else:
        shape = input_shape
    if shape is None or num_outputs is None:
        raise KfacboundError("give --dataset, or both --input-shape and --num-outputs")
    try:
        shape_list = [int(s) for s in str(shape).split(",")]
    except ValueError:
        raise KfacboundError(
            f"--input-shape must be integers like 1,28,28, not {shape!r}"
        ) from None
    spec = resolve_spec(arch_spec, shape_list, num_outputs)
    meta = {"dataset": dataset_spec}
    if loss:
        meta["loss"] = loss
    elif num_outputs is not None:
        meta["loss"] = "bce" if num_outputs == 1 else "ce"
    ckpt = import_state_dict(state_dict, spec, out, init_path=init_path, **meta)
    click.echo(f"imported {state_dict} as {spec.get('alias', spec['arch'])} "
               f"({'with' if ckpt.init_model is not None else 'without'} w0) -> {out}")
