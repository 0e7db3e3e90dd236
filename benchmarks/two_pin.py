"""Two pins in ONE heatmap channel (pixel hard mining) vs two channels (keypoint OHKM).

Usage:
    python benchmarks/two_pin.py [--quick] [--epochs N] [--num-train N] [--out DIR]

Trains ``recipes/two-pin-single-channel.yaml`` and ``recipes/quickstart.yaml`` (the same
synthetic data, model, schedule and epochs; only the channel map, the refine loss and the
decoding differ) with ``kpnet.fit``, then scores both on the same validation images with the
same protocol: predictions are matched to the true pins by the Hungarian algorithm (pins are
interchangeable) within 0.05 x the box size, predictions scoring >= the recipe's threshold
count. Prints JSON: settings, and per variant train seconds, mean / median / p90 pixel error
of matched pins, per-pin error, misses, false positives, recall and precision.

Defaults are the recipes' own settings; ``--quick`` trains 2 epochs on 128 images (a smoke
run, not a result).
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import keras

from kpnet.data.sources import load_data, pipeline_config
from kpnet.data.synthetic import pin_spec
from kpnet.inference import build_keypoints_model
from kpnet.recipe import Recipe, load_recipe
from kpnet.runner import evaluate_model
from kpnet.training import fit

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
VARIANTS = {
    "one_channel_pixel_mining": RECIPES / "two-pin-single-channel.yaml",
    "two_channels_ohkm": RECIPES / "quickstart.yaml",
}
MATCH_RADIUS = 0.05  # x max(box w, h)


def load_variants(overrides: list[str]) -> dict[str, Recipe]:
    """Both recipes with ``overrides``; raises if their data or schedule differ."""
    recipes = {name: load_recipe(path, overrides) for name, path in VARIANTS.items()}
    a, b = (r.model_dump(mode="json") for r in recipes.values())
    a["data"]["synthetic_pins"].pop("single_channel")
    b["data"]["synthetic_pins"].pop("single_channel")
    for section in ("data", "model", "augment", "train"):
        if a[section] != b[section]:
            diff = {k: (v, b[section][k]) for k, v in a[section].items() if b[section][k] != v}
            raise SystemExit(f"recipes differ in {section}: {diff}; align them first")
    return recipes


def score(recipe: Recipe, model_path: Path) -> dict:
    """Hungarian pin matching of the model's predictions on the validation records."""
    own_spec, _, val = load_data(recipe)
    e = recipe.evaluation
    heatmaps = keras.saving.load_model(model_path, compile=False)
    model = build_keypoints_model(heatmaps, own_spec, recipe.codec())
    # the shared-channel spec makes both variants go through the same pin matching
    metrics = evaluate_model(model, val, pin_spec(single_channel=True), pipeline_config(recipe),
                             batch_size=e.batch_size, pin_score_threshold=e.threshold,
                             match_radius=MATCH_RADIUS)  # fmt: skip
    pins = metrics["pins"]["overall"]
    return {
        "mean_px_error": pins["error_mean"],
        "median_px_error": pins["error_median"],
        "p90_px_error": pins["error_p90"],
        "per_pin_px_error": {p["name"]: p["mean"] for p in metrics["per_keypoint"]},
        "num_true_pins": pins["num_true"],
        "misses": pins["misses"],
        "false_positives": pins["false_positives"],
        "recall": pins["recall"],
        "precision": pins["precision"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 epochs on 128 images")
    parser.add_argument("--epochs", type=int, help="override train.epochs of both recipes")
    parser.add_argument("--num-train", type=int, help="override the training image count")
    parser.add_argument("--out", type=Path, help="keep the runs here (default: a temp dir)")
    args = parser.parse_args()
    overrides = ["train.verbose=0", "export.keypoints_model=false"]
    if args.quick:
        overrides += ["train.epochs=2", "data.synthetic_pins.num_train=128"]
    if args.epochs:
        overrides.append(f"train.epochs={args.epochs}")
    if args.num_train:
        overrides.append(f"data.synthetic_pins.num_train={args.num_train}")
    recipes = load_variants(overrides)
    out = args.out or Path(tempfile.mkdtemp(prefix="kpnet-two-pin-"))
    first = next(iter(recipes.values()))
    s, t = first.data.synthetic_pins, first.train
    result: dict = {
        "settings": {
            "epochs": t.epochs, "num_train": s.num_train, "num_val": s.num_val,
            "image_size": list(s.image_size), "input_size": list(first.model.input_size),
            "backbone": first.model.backbone, "batch_size": t.batch_size, "lr": t.lr,
            "match_radius": f"{MATCH_RADIUS} x box size", "quick": args.quick,
        },
        "variants": {},
    }  # fmt: skip
    for name, recipe in recipes.items():
        run_dir = out / name
        shutil.rmtree(run_dir, ignore_errors=True)  # a fresh run, never a resume
        run = fit(recipe, run_dir)
        result["variants"][name] = {
            "recipe": VARIANTS[name].name,
            "channels": 1 if recipe.data.synthetic_pins.single_channel else 2,
            "refine_loss": recipe.loss.refine,
            "train_seconds": run["seconds"],
            **score(recipe, Path(run["best_model"])),
        }
    if args.out is None:
        shutil.rmtree(out, ignore_errors=True)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
