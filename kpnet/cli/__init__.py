"""The ``kpnet`` command line: thin click commands that parse, call the API and print.

Each command group lives in its own module; this file only assembles them. The modules of
the light commands (:mod:`kpnet.cli.loop`: filter, plot, outliers) load at once; those that
need TensorFlow load when their command runs (or when ``kpnet --help`` lists them), so
``kpnet filter`` starts in about a second.
"""

from __future__ import annotations

import importlib

import click

from kpnet import __version__

#: Light command modules, loaded with the CLI.
EAGER = ("loop",)
#: Command name -> module, loaded on first use (they import TensorFlow).
LAZY = {"data": "data", "fit": "fit", "evaluate": "evaluate", "predict": "predict",
        "export": "export"}  # fmt: skip


class _Group(click.Group):
    """A group whose TensorFlow commands are imported when first asked for."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(self.commands) | set(LAZY))

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in self.commands and name in LAZY:
            _load(LAZY[name])
        return super().get_command(ctx, name)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="kpnet")
def main() -> None:
    """Train, evaluate, predict with and export CPN keypoint models."""


def _load(module: str) -> None:
    """Add a module's commands. A module that fails to import fails ``kpnet`` with its cause."""
    for command in importlib.import_module(f"kpnet.cli.{module}").COMMANDS:
        main.add_command(command)


def _register() -> None:
    """Add every command now (the lazy ones too)."""
    for module in (*EAGER, *dict.fromkeys(LAZY.values())):
        _load(module)


for _module in EAGER:
    _load(_module)
