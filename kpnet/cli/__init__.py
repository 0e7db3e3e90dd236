"""The ``kpnet`` command line: thin click commands that parse, call the API and print.

Each command group lives in its own module; this file only assembles them.
"""

from __future__ import annotations

import click

from kpnet import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="kpnet")
def main() -> None:
    """Train, evaluate, predict with and export CPN keypoint models."""


def _register() -> None:
    import importlib

    for module in ("data", "fit", "evaluate", "predict", "export"):
        try:
            mod = importlib.import_module(f"kpnet.cli.{module}")
        except ModuleNotFoundError as err:  # a command module not written yet
            if err.name == f"kpnet.cli.{module}":
                continue
            raise
        for command in mod.COMMANDS:
            main.add_command(command)


_register()
