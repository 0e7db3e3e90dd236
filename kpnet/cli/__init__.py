"""The ``kpnet`` command line: thin click commands that parse, call the API and print.

Each command group lives in its own module; this file only assembles them. No command
module imports TensorFlow or Keras at import time (they load inside the commands), so
``kpnet --help`` answers at once (tests/test_hardening.py).
"""

from __future__ import annotations

import click

from kpnet import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="kpnet")
def main() -> None:
    """Train, evaluate, predict with and export CPN keypoint models."""


def _register() -> None:
    """Add every command. A module that fails to import fails ``kpnet`` with its cause."""
    import importlib

    for module in ("data", "fit", "evaluate", "predict", "export", "loop"):
        for command in importlib.import_module(f"kpnet.cli.{module}").COMMANDS:
            main.add_command(command)


_register()
