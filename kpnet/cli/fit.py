"""``kpnet fit``: train a recipe; re-running the same command resumes.

Example:
    $ kpnet fit recipes/quickstart.yaml
    $ kpnet fit recipes/dlc-project.yaml -o runs/mouse --set data.dlc.project=~/mouse-dlc
"""

from __future__ import annotations

import json
from pathlib import Path

import click


class FitError(click.ClickException):
    """A clear one-line error (no traceback); exit status 2."""

    exit_code = 2


@click.command("fit")
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.option(
    "-o", "--output", type=click.Path(file_okay=False), default=None,
    help="Output folder (default: runs/<recipe name>). Re-running resumes from it.",
)  # fmt: skip
@click.option(
    "--set", "overrides", multiple=True, metavar="KEY=VALUE",
    help="Override a recipe key, e.g. --set train.epochs=3 (repeatable; values are YAML).",
)  # fmt: skip
def fit(recipe: str, output: str | None, overrides: tuple[str, ...]) -> None:
    """Train the CPN described by RECIPE (a YAML file, see recipes/quickstart.yaml)."""
    from kpnet.data.records import DataError
    from kpnet.recipe import RecipeError, load_recipe
    from kpnet.spec import SpecError

    try:
        loaded = load_recipe(recipe, overrides, check_files=True)
        out = Path(output) if output else Path("runs") / Path(recipe).stem
        from kpnet.train import TrainingError
        from kpnet.train import fit as run_fit

        try:
            result = run_fit(loaded, out)
        except TrainingError as err:
            raise FitError(f"training stopped: {err}") from None
    except (RecipeError, DataError, SpecError) as err:
        raise FitError(str(err)) from None
    click.echo(_summary(result))


def _summary(result: dict) -> str:
    overall = (result.get("metrics") or {}).get("overall") or {}
    lines = [f"kpnet fit: done in {result['seconds']:.0f} s -> {result['output_dir']}"]
    if overall:
        shown = {k: overall[k] for k in ("mean", "median", "p90", "AP") if k in overall}
        lines.append("validation (image px): " + json.dumps(shown))
    if result.get("best_model"):
        lines.append(f"best model: {result['best_model']}")
    return "\n".join(lines)


COMMANDS = [fit]
