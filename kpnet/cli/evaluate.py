"""``kpnet evaluate``: COCO keypoint AP of a results file, or all metrics of a model.

Example:
    $ kpnet evaluate --gt person_keypoints_val.json --predictions results.json -o metrics.json
    $ kpnet evaluate runs/pins                      # a run folder: its model and its recipe
    $ kpnet evaluate runs/pins/best.keras pins.yaml -o runs/pins/eval --no-flip-test
    $ kpnet evaluate runs/coco/best.keras coco.yaml --detections \
        --set data.coco.val_boxes=person_detections_val2017.json --oks-nms 0.9
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import click

from kpnet import fs
from kpnet.codec import CodecError
from kpnet.run_folder import RunFolder, RunFolderError, check_model_file
from kpnet.run_folder import model_path as resolve_model
from kpnet.spec import COCO17_SIGMAS, SpecError


@click.command("evaluate")
@click.argument("model", required=False, type=click.Path())  # local or a URL, checked later
@click.argument("recipe", required=False, type=click.Path(dir_okay=False))
@click.option("--gt", type=click.Path(exists=True, dir_okay=False), help="COCO ground truth.")
@click.option(
    "--predictions", type=click.Path(exists=True, dir_okay=False), help="COCO results json."
)
@click.option(
    "--sigmas",
    default=None,
    help="OKS sigmas: 'coco17', comma-separated numbers, or a JSON/YAML file holding a list "
    "or a mapping with 'sigmas' (default: COCO's 17).",
)
@click.option(
    "--oks-nms", type=float, default=None, help="Apply OKS-NMS per image at this threshold."
)
@click.option(
    "-o", "--output", type=click.Path(), default=None,
    help="metrics.json (--gt) or a folder (may be a URL).",
)
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Recipe override.")
@click.option("--batch-size", type=int, default=32, show_default=True)
@click.option("--flip-test/--no-flip-test", default=None,
              help="Average with the mirrored crops' heatmaps (default: the recipe's "
                   "evaluation.flip_test).")
@click.option(
    "--detections",
    is_flag=True,
    help="Crop the detector boxes of data.coco.val_boxes and score OKS AP against the whole "
    "ground truth (data.coco.val_annotations), as the CPN paper does.",
)
def evaluate(
    model: str | None,
    recipe: str | None,
    gt: str | None,
    predictions: str | None,
    sigmas: str | None,
    oks_nms: float | None,
    output: str | None,
    overrides: tuple[str, ...],
    batch_size: int,
    flip_test: bool | None,
    detections: bool,
) -> None:
    """Evaluate keypoints: `--gt GT --predictions DT`, or `MODEL [RECIPE]` on the validation
    data (MODEL: a .keras file or a run folder, local or a URL; RECIPE: default the run's
    resolved recipe).

    The validation crops, decoding and flip test are the recipe's (its codec), as in
    `kpnet fit` and `kpnet predict`."""
    from kpnet.data.records import DataError

    try:
        if gt or predictions:
            if not (gt and predictions) or model or recipe:
                raise click.UsageError("--gt and --predictions go together, without MODEL RECIPE")
            _evaluate_files(gt, predictions, sigmas, oks_nms, output)
        elif model:
            _evaluate_model(
                model, recipe, overrides, output, batch_size, flip_test, oks_nms, detections
            )
        else:
            raise click.UsageError("give MODEL [RECIPE], or --gt GT.json --predictions DT.json")
    except (DataError, SpecError, CodecError, FileNotFoundError, RunFolderError) as err:
        raise click.ClickException(str(err)) from None
    except fs.io_errors() as err:  # e.g. a URL that cannot be reached, a full disk
        raise click.ClickException(fs.reason(err)) from None


def _evaluate_files(
    gt: str, predictions: str, sigmas: str | None, oks_nms: float | None, output: str | None
) -> None:
    from kpnet.evaluate import coco_keypoint_ap

    result = coco_keypoint_ap(gt, predictions, parse_sigmas(sigmas), oks_nms_threshold=oks_nms)
    click.echo(result["summary"], nl=False)
    if output:
        _write_json(output, {k: v for k, v in result.items() if k != "summary"})
        click.echo(f"wrote {output}")


def _evaluate_model(
    model_path: str,
    recipe_path: str | None,
    overrides: tuple[str, ...],
    output: str | None,
    batch_size: int,
    flip_test: bool | None,
    oks_nms: float | None,
    detections: bool,
) -> None:
    from kpnet.evaluate import format_table
    from kpnet.runner import evaluate_detections, evaluate_model

    recipe, model, (spec, records, config) = _load(
        model_path, recipe_path, overrides, flip_test, detections
    )
    if detections:
        gt = recipe.data.coco.val_annotations
        metrics = evaluate_detections(model, records, spec, config, gt, batch_size,
                                      oks_nms_threshold=oks_nms)  # fmt: skip
        click.echo(metrics["coco"].pop("summary"), nl=False)
        click.echo(f"{metrics['num_detections']} detections of {recipe.data.coco.val_boxes}")
    else:
        metrics = evaluate_model(model, records, spec, config, batch_size,
                                 oks_nms_threshold=oks_nms)  # fmt: skip
        if metrics.get("coco"):
            click.echo(metrics["coco"].pop("summary"), nl=False)
        click.echo(format_table(metrics))
    _write_results(metrics, output, model_path)


def _load(model_path, recipe_path, overrides, flip_test, detections: bool = False):
    """(recipe, keypoints model, (spec, validation records, pipeline config)).

    The model is wrapped with the recipe's codec (decoding, flip test, crop geometry), with
    ``flip_test`` (when not None) overriding the recipe's ``evaluation.flip_test``.
    """
    from kpnet.data.sources import load_validation
    from kpnet.inference import load_model
    from kpnet.recipe import RecipeError, load_recipe
    # FileNotFoundError / ModelFileError naming the model, before the data loads
    check_model_file(resolve_model(model_path))
    if recipe_path is None:
        recipe_path = RunFolder.of(model_path).recipe_file()
        if recipe_path is None:
            raise click.UsageError(
                f"{model_path}: no recipe.resolved.yaml beside the model; give RECIPE"
            )
    try:
        recipe = load_recipe(recipe_path, list(overrides))
        if detections:
            _check_detection_recipe(recipe)
    except RecipeError as err:
        raise click.ClickException(str(err)) from None
    spec, records, config = load_validation(recipe, detections=detections)
    if not records:
        raise click.ClickException(f"{recipe_path}: the recipe has no validation records")
    codec = config.codec if flip_test is None else config.codec.replace(flip_test=flip_test)
    config = dataclasses.replace(config, codec=codec)
    model = load_model(model_path, spec, codec=codec)
    return recipe, model, (spec, records, config)


def _check_detection_recipe(recipe) -> None:
    """RecipeError unless the recipe names a COCO ground truth and a detections file."""
    if recipe.data.source != "coco":
        source = recipe.data.source
        raise recipe.error("data.source", f"--detections needs a coco source, not {source!r}")
    for key in ("val_annotations", "val_boxes"):
        if getattr(recipe.data.coco, key) is None:
            raise recipe.error(
                f"data.coco.{key}",
                f"--detections needs it (set it in the recipe or with --set data.coco.{key}=PATH)",
            )


def _write_results(metrics: dict[str, Any], output: str | None, model_path: str) -> None:
    """metrics.json and predictions.json (COCO results) into ``output`` or beside the model."""
    predictions = metrics.pop("predictions")
    if not fs.is_url(model_path):
        model_path = str(Path(model_path).resolve())
    out_dir = output or RunFolder.of(model_path).file("evaluate")
    _write_json(fs.join(out_dir, "metrics.json"), metrics)
    _write_json(fs.join(out_dir, "predictions.json"), predictions)
    click.echo(f"wrote {fs.join(out_dir, 'metrics.json')} and "
               f"{fs.join(out_dir, 'predictions.json')}")  # fmt: skip


def parse_sigmas(value: str | None) -> list[float] | None:
    """``None``, ``"coco17"``, ``"0.05,0.05"`` or a JSON/YAML file -> a list of sigmas."""
    if value is None:
        return None
    if value.lower() == "coco17":
        return list(COCO17_SIGMAS)
    path = Path(value)
    if not path.is_file():
        try:
            return [float(v) for v in value.split(",")]
        except ValueError:
            raise click.BadParameter(
                f"{value!r} is neither 'coco17', a list of numbers nor an existing file",
                param_hint="--sigmas",
            ) from None
    import yaml

    data: Any = yaml.safe_load(path.read_text())  # YAML also reads JSON
    if isinstance(data, dict):
        spec = data.get("spec")
        data = data.get("sigmas", spec.get("sigmas") if isinstance(spec, dict) else None)
    if not isinstance(data, list) or not all(isinstance(v, (int, float)) for v in data):
        raise click.BadParameter(
            f"{path}: expected a list of numbers or a mapping with 'sigmas'", param_hint="--sigmas"
        )
    return [float(v) for v in data]


def _write_json(path: str, data: Any) -> None:
    fs.write_atomic(path, json.dumps(data, indent=2) + "\n")


COMMANDS = [evaluate]
