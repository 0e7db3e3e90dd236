"""Accuracy on a real custom-keypoint project, measured as a user would meet it.

Usage:
    python benchmarks/custom_accuracy.py [--variant shipped ...] [--set KEY=VALUE ...]

On ../shared/data/dlc_reaching (a DeepLabCut project: 55 labelled frames, 5 body parts,
some unlabelled) the last 10 frames in file order are held out (``data.dlc.val_last=10``;
``--split random``: 20 % of the frames drawn at random instead). ``--step-time``: only the
seconds of a compiled training step of each variant, timed in alternation. ``--score RUN``:
only the held-out errors of a run folder this script trained (``--out``).
``recipes/dlc-project.yaml`` is trained **as shipped** with ``kpnet fit`` (an ImageNet
EfficientNet-Lite0 from its PyPI package, nothing downloaded); then the held-out frames are
predicted as a user predicts new frames, with ``kpnet predict`` on the image files (no labels,
no boxes), and compared with their labels in original pixels.

The held-out frames never choose the model: they are predicted with ``last.keras``, the
weights at the end of the budget (the recipe's cosine schedule anneals to zero there).
``kpnet fit`` validates on the held-out frames and its ``best.keras`` (what a run folder's
``keypoints.keras`` holds) is the best of several validations on those same frames: scored
on them it is the best of N noisy draws, not a test. Validating on frames kept apart from
the test frames instead would train on 10 fewer of 45 frames, a different recipe from the
one a user runs. What best-checkpoint selection would have reported is printed beside
(``best_epoch``, ``best_mean_px``) to show the size of that bias.

Prints JSON, one line per variant: mean / median / p90 pixel error over the labelled
held-out points, the fraction within 5 px, the constant-predictor floor (each body part at
its mean training position), per body part the mean error and the mean offset (dx, dy) of
prediction minus label (a shared offset is a bias, or labels that moved, not scatter),
seconds of training (``kpnet fit``'s own clock, on this machine's cores) and the settings.
Each variant changes one choice of the shipped recipe:
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
PROJECT = ROOT.parent / "shared" / "data" / "dlc_reaching"
HOLD_OUT = 10
BASE = [f"data.dlc.project={PROJECT}", "train.verbose=0"]
#: which frames are held out: the last 10 in file order (later in the video than every
#: training frame), or 20 % drawn at random (seed 0) from the whole video
SPLITS: dict[str, list[str]] = {
    "last": [f"data.dlc.val_last={HOLD_OUT}"],
    "random": ["data.dlc.val_last=0", "data.dlc.val_fraction=0.2", "data.dlc.split_seed=0"],
}
VARIANTS: dict[str, list[str]] = {
    "shipped": [],
    # trunk BatchNorm
    "bn_trainable": ["train.backbone_bn=trainable"],
    "bn_trainable_no_precise": ["train.backbone_bn=trainable", "train.precise_bn_batches=0"],
    # the trunk's high-resolution layers train too (the recipe keeps stride <= 4 frozen)
    "trunk_all_trainable": ["train.freeze_trunk_stride=0"],
    # freezing the whole trunk first
    "freeze_5_epochs": ["train.freeze_backbone_epochs=5"],
    "frozen_trunk": ["train.freeze_backbone_epochs=1000"],  # only the head trains
    # learning rate and schedule
    "lr_5e-4": ["train.lr=5.0e-4"],
    "lr_2e-3": ["train.lr=2.0e-3"],
    "constant_lr": ["train.lr_schedule=constant"],
    # input size (H, W)
    "input_256x320": ["model.input_size=[256,320]"],
    "input_384x448": ["model.input_size=[384,448]"],
    "input_512x576": ["model.input_size=[512,576]"],
    # whole frame to find, a crop at up to the frame's resolution to refine
    "two_stage": ["data.mode=two_stage"],
    # head
    "head_cpn": ["model.head=cpn"],
    "head_simple_baseline": ["model.head=simple_baseline"],
    # trunk
    "lite2": ["model.backbone=efficientnet_lite2"],
    "scratch": ["model.backbone_weights=null"],
    # budget
    "half_steps": ["train.epochs=10"],
    "double_steps": ["train.epochs=40"],
    # kpnet's DLC recipe before pretrained trunks (ResNet-50 CPN from scratch is ~20 s a
    # step here: the small `tiny` trunk, as its README row did)
    "old_tiny_scratch": [
        "model.backbone=tiny", "model.head=cpn", "model.pyramid_channels=64",
        "model.backbone_weights=null", "model.input_size=[384,416]", "train.lr=5.0e-4",
        "train.backbone_bn=trainable",
    ],
}
__doc__ += "".join(f"\n* ``{k}``: {' '.join(v) or 'the recipe as shipped'}"
                   for k, v in VARIANTS.items())  # fmt: skip


def run_variant(name: str, extra: list[str], work: Path, split: str = "last") -> dict:
    """Train variant ``name`` with ``kpnet fit`` into ``work / name``, then :func:`score` it."""
    from kpnet.recipe import load_recipe
    from kpnet.training import fit

    overrides = [*BASE, *SPLITS[split], *VARIANTS[name], *extra]
    recipe = load_recipe(ROOT / "recipes" / "dlc-project.yaml", overrides)
    seconds = fit(recipe, work / name)["seconds"]  # training only: no data loading or export
    return score(work / name, name, extra, split) | {"train_seconds": round(seconds, 1)}


def score(run: Path, name: str, extra: list[str], split: str = "last") -> dict:
    """The held-out errors of a trained run folder (its ``last.keras``), as JSON fields."""
    from kpnet.data.sources import load_data
    from kpnet.recipe import load_recipe

    overrides = [*BASE, *SPLITS[split], *VARIANTS[name], *extra]
    spec, train, val = load_data(load_recipe(ROOT / "recipes" / "dlc-project.yaml", overrides))
    files = [r.image_path for r in val]
    out = run.parent / f"{run.name}-predictions.json"
    truth = np.stack([r.keypoints for r in val])
    labelled = truth[..., 2] > 0
    offsets = _predict(run / "last.keras", files, out) - truth[..., :2]
    errors = np.linalg.norm(offsets, axis=-1)
    err = errors[labelled]
    best_epoch, last_epoch = _epochs(run)
    best = err  # best.keras is last.keras when the best validation was the last one
    if best_epoch != last_epoch:  # keypoints.keras (best.keras)
        best = np.linalg.norm(_predict(run, files, out) - truth[..., :2], axis=-1)[labelled]
    parts = [(k, part) for k, part in enumerate(spec.names) if labelled[:, k].any()]
    train_kp = np.stack([r.keypoints for r in train])
    mean_pos = np.array([train_kp[train_kp[:, k, 2] > 0, k, :2].mean(0)
                         for k in range(spec.num_keypoints)])  # fmt: skip
    floor = np.linalg.norm(mean_pos[None] - truth[..., :2], axis=-1)[labelled]
    return {
        "variant": name,
        "split": split,
        "held_out_frames": len(files),
        "labelled_points": int(labelled.sum()),
        "mean_px": round(float(err.mean()), 2),
        "median_px": round(float(np.median(err)), 2),
        "p90_px": round(float(np.percentile(err, 90)), 2),
        "within_5px": round(float((err <= 5).mean()), 3),
        "constant_floor_mean_px": round(float(floor.mean()), 2),
        "mean_vs_floor": round(float(err.mean() / floor.mean()), 3),
        "per_part_mean_px": {
            part: round(float(errors[labelled[:, k], k].mean()), 2) for k, part in parts
        },
        # mean (dx, dy) of prediction - label: a shared offset is a bias (or labels that
        # moved), not scatter
        "per_part_offset_px": {
            part: [round(float(v), 1) for v in offsets[labelled[:, k], k].mean(0)]
            for k, part in parts
        },
        "best_epoch": best_epoch,
        "best_mean_px": round(float(best.mean()), 2),
        "cores": os.cpu_count(),
        "train_frames": len(train),
        "settings": [*VARIANTS[name], *extra],
    }


def step_seconds(names: list[str], extra: list[str], rounds: int = 2, steps: int = 8) -> dict:
    """Seconds per compiled training step of each variant (fit's own compile, one batch of
    training frames from the recipe's pipeline), the variants timed in alternation
    ``rounds`` times so that a shared machine's changes of speed hit them alike."""
    import keras

    from kpnet.data.pipeline import build_dataset
    from kpnet.data.sources import load_data, pipeline_config, resolve_input_size
    from kpnet.recipe import load_recipe
    from kpnet.training import build_model, configure_main_phase

    times: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(rounds):
        for name in names:
            recipe = load_recipe(ROOT / "recipes" / "dlc-project.yaml",
                                 [*BASE, *SPLITS["last"], *VARIANTS[name], *extra])  # fmt: skip
            spec, train, _ = load_data(recipe)
            recipe = resolve_input_size(recipe, train)
            batch = recipe.train.batch_size
            images, kp = next(iter(build_dataset(train, spec, pipeline_config(recipe), batch,
                                                 training=True, seed=0)))  # fmt: skip
            keras.utils.clear_session()
            model = build_model(recipe, spec)
            configure_main_phase(model, recipe, spec)
            targets = {n: kp for n in model.output_names}
            for _ in range(3):  # compile and warm up
                model.train_on_batch(images, targets)
            start = time.perf_counter()
            for _ in range(steps):
                model.train_on_batch(images, targets)
            times[name].append((time.perf_counter() - start) / steps)
    return {name: [round(t, 3) for t in ts] for name, ts in times.items()}


def _predict(model: Path, files: list[str], out: Path) -> np.ndarray:
    """[N, K, 2] keypoints that ``kpnet predict`` with ``model`` finds on the image ``files``."""
    from kpnet.predict import predict_inputs

    predict_inputs(model, files, out)
    results = {r["file_name"]: r for r in json.loads(out.read_text())}
    return np.stack([np.reshape(results[Path(f).name]["keypoints"], (-1, 3))[:, :2]
                     for f in files])  # fmt: skip


def _epochs(run: Path) -> tuple[int | None, int | None]:
    """The epochs ``best.keras`` and ``last.keras`` were saved at (metrics.json)."""
    metrics = json.loads((run / "metrics.json").read_text())
    return metrics.get("best_epoch"), (metrics.get("last_epoch") or {}).get("epoch")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variant", action="append", choices=list(VARIANTS))
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        help="extra recipe override for every variant")  # fmt: skip
    parser.add_argument("--split", choices=list(SPLITS), default="last",
                        help="the last 10 frames (default) or 20%% at random")  # fmt: skip
    parser.add_argument("--out", type=Path, help="keep the runs here (default: a temp dir)")
    parser.add_argument("--step-time", action="store_true",
                        help="only time a training step of each variant")  # fmt: skip
    parser.add_argument("--score", type=Path, metavar="RUN",
                        help="only score a run folder this script trained (--variant names "
                        "it, --split / --set as it was trained)")  # fmt: skip
    args = parser.parse_args()
    if not PROJECT.is_dir():
        raise SystemExit(f"{PROJECT}: the dlc_reaching project is not here")
    if args.step_time:
        steps = step_seconds(args.variant or ["shipped"], args.overrides)
        print(json.dumps({"step_seconds_per_round": steps, "cores": os.cpu_count()}))
        return
    if args.score:
        name = (args.variant or ["shipped"])[0]
        print(json.dumps(score(args.score, name, args.overrides, args.split)))
        return
    work = args.out or Path(tempfile.mkdtemp(prefix="kpnet-custom-"))
    for name in args.variant or ["shipped"]:
        print(json.dumps(run_variant(name, args.overrides, work, args.split)), flush=True)


if __name__ == "__main__":
    main()
