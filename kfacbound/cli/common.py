"""Options shared by subcommands: the dataset options, device, output paths, JSON output."""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from ..checkpoint import Checkpoint, load_checkpoint
from ..data import DOWNSAMPLE_MODES, KDataset, list_datasets, resolve_dataset
from ..io import json_default, write_json_atomic

DATASET_KEYS = ("dataset", "binary", "subset", "subset_mode", "downsample", "downsample_mode",
                "flatten", "standardize", "data_seed", "data_dir", "n", "input_dim", "classes",
                "npz_path", "train_size")


def dataset_options(required: bool = False) -> Callable:
    """Decorator adding --dataset and its options; read them back with :func:`dataset_from_options`.

    With ``required=False`` a missing --dataset means "the dataset recorded in the checkpoint".
    """

    def decorate(f: Callable) -> Callable:
        opts = [
            click.option("--dataset", required=required, default=None,
                         help=f"Dataset name: {', '.join(list_datasets())}."
                         + ("" if required else " Default: the checkpoint's training data.")),
            click.option("--binary/--no-binary", default=None,
                         help="Labels 0-4 -> 0, 5-9 -> 1 (Dziugaite & Roy)."),
            click.option("--subset", type=int, default=None, help="Use N examples."),
            click.option("--subset-mode", type=click.Choice(["first", "random"]), default=None,
                         help="First N examples or a seeded random N (default first)."),
            click.option("--downsample", type=int, default=None, help="Resize images to S x S."),
            click.option("--downsample-mode", type=click.Choice(DOWNSAMPLE_MODES), default=None,
                         help="Interpolation for --downsample (default nearest)."),
            click.option("--flatten/--no-flatten", default=None, help="Flatten inputs to vectors."),
            click.option("--standardize/--no-standardize", default=None,
                         help="Per-feature mean/std of the training split."),
            click.option("--data-seed", type=int, default=None,
                         help="Seed for random subsets and synthetic data (default 0)."),
            click.option("--data-dir", type=click.Path(), default=None, envvar="KFACBOUND_DATA",
                         help="Directory with dataset files (env KFACBOUND_DATA)."),
            click.option("--n", "n", type=int, default=None, help="gaussian: number of examples."),
            click.option("--input-dim", type=int, default=None, help="gaussian: input dimension."),
            click.option("--classes", type=int, default=None, help="gaussian: number of classes."),
            click.option("--npz-path", type=click.Path(), default=None,
                         help="npz: file with arrays X and y."),
            click.option("--train-size", type=int, default=None,
                         help="mnist5k: training examples of the 5,000 (default 4,000)."),
        ]
        for opt in reversed(opts):
            f = opt(f)
        return f

    return decorate


def pop_dataset_options(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Remove the dataset options from a command's kwargs and return them."""
    return {k: kwargs.pop(k) for k in DATASET_KEYS if k in kwargs}


def dataset_from_options(opts: dict[str, Any], split: str = "train",
                         ckpt: Checkpoint | None = None) -> KDataset:
    """The dataset the options describe; a missing --dataset takes the checkpoint's, with the
    options given on the command line overriding what the checkpoint recorded."""
    given = {k: v for k, v in opts.items() if v is not None}
    name = given.pop("dataset", None)
    if "data_seed" in given:
        given["seed"] = given.pop("data_seed")
    if "npz_path" in given:
        given["path"] = given.pop("npz_path")
    return resolve_dataset(name, split, default=ckpt.dataset if ckpt is not None else None,
                           missing="no --dataset given and the checkpoint records none", **given)


def open_checkpoint(path: str) -> Checkpoint:
    return load_checkpoint(path)


def write_json(path: str | Path, obj: Any) -> None:
    """Pretty JSON written atomically (numpy values as numbers, other objects as strings)."""
    write_json_atomic(path, obj, indent=2, sort_keys=False, default=json_default)


def device_option(f: Callable) -> Callable:
    return click.option("--device", default="cpu", show_default=True,
                        help="torch device: cpu, cuda, cuda:1, ...")(f)


def dtype_option(f: Callable) -> Callable:
    """``--dtype float64|float32``: precision of exact curvature products."""
    from ..analysis.compare import DTYPES  # only the curvature commands, which load it anyway

    return click.option("--dtype", type=click.Choice(DTYPES), default="float64",
                        show_default=True,
                        help="Precision of the exact curvature products (float32: faster for "
                             "convs).")(f)


def progress_option(f: Callable) -> Callable:
    return click.option("--progress/--no-progress", default=True, show_default=True,
                        help="Show progress bars on stderr.")(f)


def with_dataset(f: Callable) -> Callable:
    """Wrap a command so its dataset options arrive as one dict argument ``data_opts``."""

    @functools.wraps(f)
    def wrapper(**kwargs: Any):
        return f(data_opts=pop_dataset_options(kwargs), **kwargs)

    return wrapper
