"""``kpnet fit``: train a recipe; re-running the same command resumes.

Example:
    $ kpnet fit recipes/quickstart.yaml
    $ kpnet fit recipes/dlc-project.yaml -o runs/mouse --set data.dlc.project=~/mouse-dlc
    $ kpnet fit gs://bucket/recipes/pins.yaml -o gs://bucket/runs/pins   # URLs: see kpnet.fs

The output folder is validated before anything is written into it: the recipe, the data,
the keypoint spec and the batch size (against the replicas) are checked first, so a failing
command leaves the folder as it was. Every file is written atomically (a temporary file
renamed over the old one).

Resuming: when the folder already holds a trained run (a backup, ``last.keras``,
``best.keras``, ``keypoints.keras`` or ``metrics.json``), the recipe is compared with its
``recipe.resolved.yaml``, ``spec.json`` and ``codec.json`` first. Keys that define the model
or its data (:data:`kpnet.run_folder.LOCKED_KEYS`) must be the same: every ``data.*`` key but
``data.on_error`` (source, paths, spec, crop mode, padding), every ``model.*`` key (backbone,
head, alpha, weights, input size, pyramid channels, init_from, bn_momentum), the codec's sigmas and
decoding (``loss.global_sigmas``, ``loss.refine_sigma``, ``evaluation.decode`` /
``flip_test`` / ``max_peaks`` / ``threshold`` / ``min_distance``), and ``train.batch_size``
and ``train.steps_per_epoch`` (the learning-rate schedule and the backup count optimizer
steps). Otherwise the command stops with one line naming the first difference: use a new
output folder (``-o``) or delete the old one to start over. Everything else may change on
resume: ``train.epochs`` (more epochs extend the run; fewer only re-finalize it), the
optimizer, learning rate and schedule, ``clipnorm``, precision, ``distribute``,
``validation_every`` / ``validation_steps``, ``backup_every_steps``, ``precise_bn_batches``,
``verbose``, ``augment.*``, the loss weights and hard mining, ``evaluation.pck_thresholds`` /
``batch_size``, ``export.*`` and ``data.on_error``. A folder whose earlier run stopped before
its first backup holds nothing to resume and starts over with any settings. A resume logs
the settings that changed; with another optimizer or precision Keras cannot restore the
optimizer state (moments, step count), so the learning-rate schedule restarts.

A file that cannot be written (disk full, quota, read-only folder) stops the command with one
line naming it and the free space of its folder; every file is written to a temporary name
first, so no file already there is replaced by a partial one, and re-running the same command
resumes from the last complete backup.

A run never reports NaN as a success: when best.keras or last.keras holds NaN/inf weights,
or the validation errors are not finite, the command fails without writing ``metrics.json``
or ``keypoints.keras``.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from kpnet import fs


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
        _check_weights(loaded)  # before loading any data
        out = output or Path("runs") / Path(recipe).stem  # -o may be a URL: kept a string
        from kpnet.run_folder import RunFolderError
        from kpnet.training import TrainingError
        from kpnet.training import fit as run_fit

        try:
            result = run_fit(loaded, out)
        except RunFolderError as err:  # nothing was trained or written
            raise FitError(str(err)) from None
        except TrainingError as err:
            raise FitError(f"training stopped: {err}") from None
        except fs.WriteError as err:  # disk full, read-only: every file whole, none partial
            full = err.errno in fs.FULL_ERRNOS
            raise FitError(f"{err}{', then re-run the same command to resume' * full}") from None
    except (RecipeError, DataError, SpecError) as err:
        raise FitError(str(err)) from None
    click.echo(_summary(result))


def _check_weights(recipe) -> None:
    """Fail fast, naming the key, when the backbone weights cannot be found."""
    from kpnet.models.backbones import BackboneWeightsError, resolve_weights

    try:
        m = recipe.model
        resolve_weights(m.backbone, m.backbone_weights, m.alpha)
    except BackboneWeightsError as err:
        raise recipe.error("model.backbone_weights", str(err)) from None


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
