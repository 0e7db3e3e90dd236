"""``kpnet evaluate``: COCO keypoint AP of a results file, or all metrics of a model.

Example:
    $ kpnet evaluate --gt person_keypoints_val.json --predictions results.json -o metrics.json
    $ kpnet evaluate runs/pins/model.keras pins.yaml -o runs/pins/eval --set data.batch_size=8
    $ kpnet evaluate runs/coco/best.keras coco.yaml --detections \
        --set data.coco.val_boxes=person_detections_val2017.json --oks-nms 0.9
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from kpnet.spec import COCO17_SIGMAS, SpecError


@click.command("evaluate")
@click.argument("model", required=False, type=click.Path(exists=True))
@click.argument("recipe", required=False, type=click.Path(exists=True, dir_okay=False))
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
    "-o", "--output", type=click.Path(), default=None, help="metrics.json (--gt) or a folder."
)
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Recipe override.")
@click.option("--batch-size", type=int, default=32, show_default=True)
@click.option("--flip-test", is_flag=True, help="Average with the mirrored crops' heatmaps.")
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
    flip_test: bool,
    detections: bool,
) -> None:
    """Evaluate keypoints: `--gt GT --predictions DT`, or `MODEL RECIPE` on the validation data."""
    from kpnet.data.records import DataError

    try:
        if gt or predictions:
            if not (gt and predictions) or model or recipe:
                raise click.UsageError("--gt and --predictions go together, without MODEL RECIPE")
            _evaluate_files(gt, predictions, sigmas, oks_nms, output)
        elif model and recipe:
            _evaluate_model(
                model, recipe, overrides, output, batch_size, flip_test, oks_nms, detections
            )
        else:
            raise click.UsageError("give MODEL RECIPE, or --gt GT.json --predictions DT.json")
    except (DataError, SpecError, FileNotFoundError) as err:
        raise click.ClickException(str(err)) from None


def _evaluate_files(
    gt: str, predictions: str, sigmas: str | None, oks_nms: float | None, output: str | None
) -> None:
    from kpnet.evaluate import coco_keypoint_ap

    result = coco_keypoint_ap(gt, predictions, parse_sigmas(sigmas), oks_nms_threshold=oks_nms)
    click.echo(result["summary"], nl=False)
    if output:
        _write_json(Path(output), {k: v for k, v in result.items() if k != "summary"})
        click.echo(f"wrote {output}")


def _evaluate_model(
    model_path: str,
    recipe_path: str,
    overrides: tuple[str, ...],
    output: str | None,
    batch_size: int,
    flip_test: bool,
    oks_nms: float | None,
    detections: bool,
) -> None:
    from kpnet.evaluate import evaluate_detections, evaluate_model, format_table

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
    """(recipe, keypoints model, (spec, validation records, pipeline config))."""
    from kpnet.inference import load_model
    from kpnet.recipe import RecipeError, load_recipe

    try:
        from kpnet.train import load_validation
    except ImportError as err:
        raise click.ClickException(f"evaluating a model needs kpnet.train ({err})") from None
    try:
        recipe = load_recipe(recipe_path, list(overrides))
        if detections:
            _check_detection_recipe(recipe)
    except RecipeError as err:
        raise click.ClickException(str(err)) from None
    spec, records, config = load_validation(recipe, detections=detections)
    # flip test inside the graph: heatmaps of the mirrored batch are averaged before decoding
    model = load_model(model_path, spec, **({"flip_test": True} if flip_test else {}))
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
    out_dir = Path(output) if output else Path(model_path).resolve().parent / "evaluate"
    _write_json(out_dir / "metrics.json", metrics)
    _write_json(out_dir / "predictions.json", predictions)
    click.echo(f"wrote {out_dir / 'metrics.json'} and {out_dir / 'predictions.json'}")


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


def _write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")


COMMANDS = [evaluate]
