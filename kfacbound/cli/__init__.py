"""The ``kfacbound`` command line: a click group, a thin layer over the Python API.

Each subcommand lives in its own module of this package and exposes a click command named
``command``; :data:`SUBCOMMANDS` lists them. Errors of input (:class:`KfacboundError`) print one
line on stderr and exit with code 2.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys

import click

from ..errors import KfacboundError

# module name in kfacbound.cli -> subcommand name
SUBCOMMANDS: dict[str, str] = {
    "datasets": "datasets",
    "train": "train",
    "info": "info",
    "import_": "import",
    "curvature": "curvature",
    "spectrum": "spectrum",
    "bound": "bound",
    "rank": "rank",
    "structure": "structure",
    "spectra": "spectra",
    "batch": "batch",
    "compare": "compare",
}


class _Group(click.Group):
    """Loads subcommand modules on demand (fast ``--help``) and maps user errors to exit 2."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(n for m, n in SUBCOMMANDS.items() if _find(m) is not None)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        for module, cmd in SUBCOMMANDS.items():
            if cmd == name and _find(module) is not None:
                return importlib.import_module(f"{__name__}.{module}").command
        return None

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except KfacboundError as exc:
            click.echo(f"error: {exc}", err=True)
            ctx.exit(2)


def _find(module: str):
    return importlib.util.find_spec(f"{__name__}.{module}")


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="kfacbound")
def main() -> None:
    """kfacbound: certified PAC-Bayes bounds and Hessian-structure reports from K-FAC curvature.

    Pipeline: datasets -> train / import a checkpoint -> curvature (K-FAC, exact) -> bound,
    rank, structure, spectra -> batch and compare. Run `kfacbound COMMAND --help` for each.
    """


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
