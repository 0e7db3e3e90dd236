"""``kpnet export``: write a TF Serving SavedModel (signatures: see :mod:`kpnet.export`).

Example:
    $ kpnet export runs/pins -o serving/pins/1
    $ saved_model_cli show --dir serving/pins/1 --all
"""

from __future__ import annotations

from pathlib import Path

import click

from kpnet.data.records import DataError
from kpnet.spec import SpecError


@click.command("export")
@click.argument("model", type=click.Path(exists=True, path_type=Path))
@click.option("-o", "--output", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="SavedModel folder (TF Serving: <models>/<name>/<version>).")  # fmt: skip
@click.option("--flip-test/--no-flip-test", default=None,
              help="Flip test in the signatures (default: as the model was saved).")
@click.option("--padding", type=float, nargs=2, default=None,
              help="Box extension (x, y) of serving_default's crops (default: the model's).")
def export(model: Path, output: Path, flip_test: bool | None, padding) -> None:
    """Export MODEL (.keras or a run folder) as a SavedModel for TF Serving."""
    from kpnet.export import SIGNATURES, export_saved_model

    try:
        path = export_saved_model(model, output, padding=padding, flip_test=flip_test)
    except (DataError, SpecError, FileNotFoundError, ValueError) as err:
        raise click.ClickException(str(err)) from None
    click.echo(f"wrote SavedModel {path} (signatures: {', '.join(SIGNATURES)})")


COMMANDS = [export]
