"""``kfacbound datasets``: list the datasets and whether their files are here."""

from __future__ import annotations

import click

from ..data import available, list_datasets


@click.command("datasets")
@click.option("--check/--no-check", default=True, show_default=True,
              help="Check which datasets can be loaded on this machine.")
def command(check: bool) -> None:
    """List dataset names for --dataset.

    \b
    Example:
      kfacbound datasets
    """
    needs_args = {"npz"}
    for name, desc in list_datasets().items():
        status = ""
        if check and name not in needs_args:
            status = "  [available]" if available(name) else "  [files missing]"
        click.echo(f"{name:14s} {desc}{status}")
