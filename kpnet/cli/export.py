"""``kpnet export``: write a TF Serving SavedModel (signatures: see :mod:`kpnet.export`).

Example:
    $ kpnet export runs/pins -o serving/pins/1
    $ saved_model_cli show --dir serving/pins/1 --all
    $ kpnet export gs://bucket/runs/pins -o gs://bucket/serving/pins/1
"""

from __future__ import annotations

import click

from kpnet import fs
from kpnet.data.records import DataError
from kpnet.spec import SpecError


@click.command("export")
@click.argument("model", type=click.Path())  # may be a URL: checked by load_model
@click.option("-o", "--output", required=True, type=click.Path(file_okay=False),
              help="SavedModel folder (TF Serving: <models>/<name>/<version>); may be a "
                   "URL.")  # fmt: skip
@click.option("--flip-test/--no-flip-test", default=None,
              help="Flip test in the signatures (default: as the model was saved).")
@click.option("--padding", type=float, nargs=2, default=None,
              help="Box extension (x, y) of serving_default's crops (default: the model's).")
def export(model: str, output: str, flip_test: bool | None, padding) -> None:
    """Export MODEL (.keras or a run folder, local or a URL) as a SavedModel for TF Serving."""
    from kpnet.export import SIGNATURES, export_saved_model

    try:
        path = export_saved_model(model, output, padding=padding, flip_test=flip_test)
    except (DataError, SpecError, FileNotFoundError, ValueError) as err:
        raise click.ClickException(str(err)) from None
    except fs.io_errors() as err:  # e.g. a URL that cannot be reached
        raise click.ClickException(fs.reason(err)) from None
    click.echo(f"wrote SavedModel {path} (signatures: {', '.join(SIGNATURES)})")


COMMANDS = [export]
