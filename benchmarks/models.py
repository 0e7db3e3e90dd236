"""Heads and trunks compared: size, CPU speed and held-out error under one training budget.

Usage:
    python benchmarks/models.py [--quick] [--models NAME ...] [--steps N] [--out DIR]

For every model (``--models``, default :data:`DEFAULT_MODELS`; all: :data:`MODELS`) prints
one JSON line:

* ``params``: parameters (trainable + BatchNorm statistics) at 256x192, 17 keypoints, and
  ``published_m`` where the paper gives a figure (trainable parameters, millions);
* ``train_step_s`` / ``infer_s``: median CPU seconds of one compiled training step
  (Adam, L2 / OHKM loss) and of one ``predict_on_batch`` at batch 8, 256x192, after a warm-up
  call (``--timing-steps`` timed calls);
* ``pins`` / ``dlc``: held-out error (mean and median pixels, PCK@0.05) after the same budget:
  ``kpnet fit`` for ``--steps`` steps of batch 8 from random weights (no ImageNet file can be
  downloaded here), on the synthetic pins (``recipes/quickstart.yaml``, 96x96 crops) and on
  ``../shared/data/dlc_reaching`` (``recipes/dlc-project.yaml``, whole frames at 128x128, the
  last 10 frames of each video held out), scored by fit's validation (the crops and decoding
  of ``kpnet predict``; no flip test, no precise BN). With so few steps these compare how fast
  each model starts to learn from scratch, not converged accuracy.

``--quick``: 1 timed step and 30 training steps (a smoke run; about 23 minutes for the five default
models on a quiet 2-core machine, mostly ``kpnet fit``'s fixed costs).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DLC = ROOT.parent / "shared" / "data" / "dlc_reaching"

#: name -> (backbone, head, alpha, published trainable parameters in millions or None).
MODELS: dict[str, tuple[str, str, float, float | None]] = {
    "cpn-resnet50": ("resnet50", "cpn", 1.0, None),
    "simple_baseline-resnet50": ("resnet50", "simple_baseline", 1.0, 34.0),
    "hrnet-w32": ("hrnet_w32", "hrnet", 1.0, 28.5),
    "cpn-hrnet-w32": ("hrnet_w32", "cpn", 1.0, None),
    "simple_baseline-mobilenetv2": ("mobilenetv2", "simple_baseline", 1.0, None),
    "simple_baseline-mobilenetv2-0.35": ("mobilenetv2", "simple_baseline", 0.35, None),
    "cpn-efficientnetb0": ("efficientnetb0", "cpn", 1.0, None),
}
DEFAULT_MODELS = ("cpn-resnet50", "simple_baseline-resnet50", "hrnet-w32",
                  "simple_baseline-mobilenetv2", "cpn-efficientnetb0")  # fmt: skip
BATCH = 8


def model_overrides(name: str) -> list[str]:
    backbone, head, alpha, _ = MODELS[name]
    loss = "ohkm" if head == "cpn" else "l2"
    return [f"model.backbone={backbone}", f"model.head={head}", f"model.alpha={alpha}",
            "model.backbone_weights=null", "model.pyramid_channels=256",
            f"loss.refine={loss}"]  # fmt: skip


def size_and_speed(name: str, timing_steps: int) -> dict:
    """Parameters at 256x192 / K=17 and median CPU seconds of a train step and inference."""
    import keras

    from kpnet.losses import build_losses
    from kpnet.models import build_heatmap_model, head_outputs
    from kpnet.spec import KeypointSpec

    backbone, head, alpha, published = MODELS[name]
    keras.utils.set_random_seed(0)
    model = build_heatmap_model(17, (256, 192, 3), backbone, head, alpha=alpha)
    trainable = sum(int(np.prod(w.shape)) for w in model.trainable_weights)
    losses, weights = build_losses(KeypointSpec.coco17(), "ohkm" if head == "cpn" else "l2",
                                   outputs=head_outputs(head))  # fmt: skip
    model.compile(keras.optimizers.Adam(1e-4), loss=losses, loss_weights=weights)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (BATCH, 256, 192, 3)).astype(np.uint8)
    kp = np.concatenate([rng.uniform(8, 180, (BATCH, 17, 2)), np.full((BATCH, 17, 1), 2.0)], -1)
    targets = {n: kp.astype(np.float32) for n in model.output}

    def timed(fn) -> float:
        fn()  # trace / compile
        times = []
        for _ in range(timing_steps):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return round(statistics.median(times), 3)

    return {
        "params": model.count_params(),
        "trainable_m": round(trainable / 1e6, 2),
        "published_m": published,
        "train_step_s": timed(lambda: model.train_on_batch(images, targets)),
        "infer_s": timed(lambda: model.predict_on_batch(images)),
    }


def held_out(name: str, dataset: str, steps: int, work: Path) -> dict:
    """Train ``steps`` steps with ``kpnet fit`` and return the held-out pixel errors."""
    from kpnet.recipe import load_recipe
    from kpnet.training import fit

    common = [*model_overrides(name), "train.epochs=1", f"train.steps_per_epoch={steps}",
              f"train.batch_size={BATCH}", "train.verbose=0", "train.distribute=one_device",
              "train.freeze_backbone_epochs=0", "train.lr_schedule=constant",
              "train.precise_bn_batches=0", "export.saved_model=false",
              "export.keypoints_model=false", "evaluation.flip_test=false"]  # fmt: skip
    if dataset == "pins":
        recipe = load_recipe(ROOT / "recipes" / "quickstart.yaml", [
            *common, f"data.synthetic_pins.cache_dir={work / 'pins-cache'}",
            "data.synthetic_pins.num_train=256", "data.synthetic_pins.num_val=32"])  # fmt: skip
    else:
        if not DLC.is_dir():
            return {"skipped": f"no data at {DLC}"}
        recipe = load_recipe(ROOT / "recipes" / "dlc-project.yaml", [
            *common, f"data.dlc.project={DLC}", "data.dlc.val_fraction=null",
            "data.dlc.val_last=10", "model.input_size=[128,128]"])  # fmt: skip
    start = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):  # fit's log: stdout is the JSON lines
        result = fit(recipe, work / f"{name}-{dataset}")
    overall = result["metrics"]["overall"]
    return {
        "mean_px": round(float(overall["mean"]), 2),
        "median_px": round(float(overall["median"]), 2),
        "pck@0.05": round(float(overall["pck@0.05"]), 3),
        "fit_s": round(time.perf_counter() - start, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=DEFAULT_MODELS)
    parser.add_argument("--steps", type=int, default=200, help="training steps per data set")
    parser.add_argument("--timing-steps", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="1 timed step, 30 training steps")
    parser.add_argument("--out", type=Path, default=None, help="keep the runs here")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.timing_steps = 30, 1
    work = args.out or Path(tempfile.mkdtemp(prefix="kpnet-models-"))
    settings = {"steps": args.steps, "batch_size": BATCH, "timing_steps": args.timing_steps,
                "timing_input": [256, 192], "pins_input": [96, 96], "dlc_input": [128, 128],
                "weights": "random (no ImageNet)", "lr": "recipe's, constant",
                "precise_bn": False, "flip_test": False}  # fmt: skip
    print(json.dumps({"settings": settings}), flush=True)
    for name in args.models:
        row = {"model": name, **size_and_speed(name, args.timing_steps)}
        for dataset in ("pins", "dlc"):
            row[dataset] = held_out(name, dataset, args.steps, work)
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
