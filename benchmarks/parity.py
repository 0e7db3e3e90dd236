"""What is validated is what is served: one model's validation set scored three ways.

Usage:
    python benchmarks/parity.py --case pins [--precision mixed_float16] [--run DIR]
    python benchmarks/parity.py --case coco_mini [--precision float32]

Trains a small model briefly (parity needs agreement, not accuracy; ``--run`` reuses a
trained run folder instead), then predicts its validation records

* (a) ``evaluate``: as ``kpnet evaluate`` and fit's validation do (the evaluation pipeline,
  :func:`kpnet.runner.evaluate_model`);
* (b) ``predict``: as ``kpnet predict`` does on the image files
  (:func:`kpnet.predict.predict_inputs`), with the records' boxes as a detections file
  (top-down) or on whole frames;
* (c) ``saved_model``: the run's SavedModel in a fresh Python process that imports only
  TensorFlow (images decoded with ``tf.io.decode_image``, boxes to ``serving_default``).

Prints JSON: per path the mean pixel error against the labels and OKS AP (when the spec has
OKS sigmas), and per pair of paths the mean and largest per-keypoint difference in pixels.
Goal: the paths agree within 0.05 px mean and 0.002 AP.

Cases: ``pins`` (synthetic two-pin images, recipes/quickstart.yaml in whole-image mode) and
``coco_mini`` (../shared/data/coco_mini, recipes/coco-cpn50-256x192.yaml, top-down with
ground-truth boxes; tiny backbone, 128x96 input).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"

CASES = {
    "pins": (ROOT / "recipes" / "quickstart.yaml", [
        "data.mode=whole", "model.input_size=[64,64]", "data.synthetic_pins.num_train=64",
        "data.synthetic_pins.num_val=24",
    ]),
    "coco_mini": (ROOT / "recipes" / "coco-cpn50-256x192.yaml", [
        f"data.coco.train_annotations={SHARED}/coco_mini/annotations/person_keypoints_train2017.json",
        f"data.coco.train_images={SHARED}/coco_mini/train2017",
        f"data.coco.val_annotations={SHARED}/coco_mini/annotations/person_keypoints_val2017.json",
        f"data.coco.val_images={SHARED}/coco_mini/val2017",
        "model.backbone=tiny", "model.backbone_weights=null", "model.input_size=[128,96]",
        "model.pyramid_channels=32",
    ]),
}  # fmt: skip
QUICK = ["train.epochs=1", "train.steps_per_epoch=3", "train.batch_size=8", "train.verbose=0",
         "export.saved_model=true", "export.keypoints_model=true"]  # fmt: skip

SAVED_MODEL_SCRIPT = r"""
import json, sys
import numpy as np
import tensorflow as tf
saved_model, requests, out = sys.argv[1:4]
serve = tf.saved_model.load(saved_model).signatures["serving_default"]
results = []
for path, box in json.load(open(requests)):
    image = tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False)
    o = serve(images=image[None], boxes=tf.constant([box], tf.float32))
    results.append([o["keypoints"].numpy()[0].tolist(), o["scores"].numpy()[0].tolist()])
json.dump(results, open(out, "w"))
"""


def train(case: str, precision: str, out: Path, extra: list[str]) -> Path:
    """A briefly trained run folder for ``case`` (recipe + quick overrides)."""
    from kpnet.recipe import load_recipe
    from kpnet.training import fit

    recipe_path, overrides = CASES[case]
    recipe = load_recipe(recipe_path, [*overrides, *QUICK, f"train.precision={precision}",
                                       *extra])  # fmt: skip
    if case == "pins":
        recipe.data.synthetic_pins.cache_dir = out.parent / "pins-cache"
    fit(recipe, out)
    return out


def path_evaluate(run: Path):
    """(a) fit's validation / kpnet evaluate: the evaluation pipeline."""
    from kpnet.data.sources import load_validation
    from kpnet.inference import load_model
    from kpnet.recipe import load_recipe
    from kpnet.runner import evaluate_model

    recipe = load_recipe(run / "recipe.resolved.yaml")
    spec, records, config = load_validation(recipe)
    model = load_model(run)
    metrics = evaluate_model(model, records, spec, config, batch_size=8)
    xy, scores = _from_coco(metrics["predictions"], spec.num_keypoints)
    return spec, records, recipe.codec(), xy, scores


def path_predict(run: Path, records, codec, work: Path):
    """(b) kpnet predict on the image files (the records' boxes, or whole frames)."""
    from kpnet.predict import predict_inputs

    files = sorted({r.image_path for r in records})
    out = work / "predict.json"
    boxes = None
    if codec.mode == "topdown":
        boxes = work / "boxes.json"
        dets = [{"file_name": Path(r.image_path).name, "bbox": list(map(float, r.box)),
                 "score": 1.0} for r in records]  # fmt: skip
        boxes.write_text(json.dumps(dets))
    predict_inputs(run, files, out, boxes=boxes, score_threshold=0.0)
    results = json.loads(out.read_text())
    by_name: dict[str, list] = {}
    for r in results:
        by_name.setdefault(r["file_name"], []).append(r)
    ordered = [by_name[Path(r.image_path).name].pop(0) for r in records]  # record order
    return _from_coco(ordered, len(records[0].keypoints))


def path_saved_model(run: Path, records, codec, work: Path):
    """(c) the SavedModel, in a fresh process that imports only TensorFlow."""
    requests = work / "requests.json"
    whole = codec.mode != "topdown"
    requests.write_text(json.dumps(
        [[r.image_path, [0.0] * 4 if whole else list(map(float, r.box))] for r in records]))
    out = work / "saved_model_out.json"
    subprocess.run([sys.executable, "-c", SAVED_MODEL_SCRIPT, str(run / "saved_model"),
                    str(requests), str(out)], check=True)  # fmt: skip
    res = json.loads(out.read_text())
    return np.array([r[0] for r in res], np.float64), np.array([r[1] for r in res], np.float64)


def _from_coco(results, k: int):
    kp = np.array([r["keypoints"] for r in results], np.float64).reshape(-1, k, 3)
    return kp[..., :2], kp[..., 2]


def score(spec, records, xy, scores) -> dict:
    from kpnet.evaluate import evaluate_predictions

    m = evaluate_predictions(xy, scores, records, spec)
    out = {"px_mean": m["overall"]["mean"]}
    if m.get("coco"):
        out["AP"] = m["coco"]["AP"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--case", choices=sorted(CASES), default="pins")
    parser.add_argument("--precision", default="float32",
                        choices=["float32", "mixed_float16", "mixed_bfloat16"])
    parser.add_argument("--run", type=Path, help="a trained run folder (with saved_model/)")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="kpnet-parity-"))
    run = args.run or train(args.case, args.precision, work / "run", args.overrides)
    spec, records, codec, xy_a, sc_a = path_evaluate(run)
    paths = {"evaluate": (xy_a, sc_a),
             "predict": path_predict(run, records, codec, work),
             "saved_model": path_saved_model(run, records, codec, work)}  # fmt: skip
    report = {"case": args.case, "precision": args.precision, "mode": codec.mode,
              "instances": len(records), "paths": {}, "agreement": {}}  # fmt: skip
    for name, (xy, sc) in paths.items():
        report["paths"][name] = score(spec, records, xy, sc)
    names = list(paths)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            d = np.linalg.norm(paths[a][0] - paths[b][0], axis=-1)
            report["agreement"][f"{a}~{b}"] = {
                "mean_px": round(float(d.mean()), 5), "max_px": round(float(d.max()), 5),
                "max_score_diff": round(float(np.abs(paths[a][1] - paths[b][1]).max()), 5),
            }  # fmt: skip
    print(json.dumps(report))


if __name__ == "__main__":
    main()
