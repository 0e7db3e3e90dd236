"""Every shipped recipe loads, validates and trains: one step each (fast), ``kpnet fit`` (slow).

The fast test runs the recipe's own data source, pipeline, model, losses, optimizer and
precision for one optimizer step, eagerly (tracing the train step costs ~20 s per model on a
2-core CPU); the slow test runs ``kpnet fit`` end to end for one step. Sizes are shrunk with
``--set``-style overrides; COCO recipes read ``shared/data/coco_mini``, the DLC recipe
``shared/data/dlc_reaching``, and the multi-GPU recipe keeps its precision on one device.
Every recipe trains its own head; ResNet recipes on the tiny trunk, the light-trunk recipes
(MobileNetV2, EfficientNet-B0) on their own trunk, the HRNet recipe on HRNet-W32 (slow: its
eager step takes ~20 s; tests/test_models_heads.py trains HRNet in the default suite).
"""

from __future__ import annotations

import json
from pathlib import Path

import keras
import numpy as np
import pytest
from click.testing import CliRunner

from kpnet import training as kt
from kpnet.cli import main
from kpnet.data.sources import load_data, pipeline_config
from kpnet.recipe import Recipe, load_recipe

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted((REPO / "recipes").glob("*.yaml"))
#: Recipes that keep their own trunk (light, or needed by the head), not the tiny one.
OWN_TRUNK = {p for p in RECIPES if load_recipe(p).model.backbone not in ("resnet50", "resnet101")}
SLOW = {p for p in RECIPES if load_recipe(p).model.head == "hrnet"}  # HRNet: ~20 s a step
PARAMS = [pytest.param(p, id=p.stem, marks=[pytest.mark.slow] if p in SLOW else [])
          for p in RECIPES]  # fmt: skip
DATA = REPO.parent / "shared" / "data"
COCO = DATA / "coco_mini"
DLC = DATA / "dlc_reaching"
TINY = [
    "model.backbone=tiny", "model.backbone_weights=null", "model.input_size=[64,64]",
    "model.pyramid_channels=16", "train.epochs=1", "train.steps_per_epoch=1",
    "train.batch_size=4", "train.distribute=one_device", "train.verbose=0",
    "train.validation_steps=1", "evaluation.flip_test=false", "export.saved_model=false",
]  # fmt: skip


@pytest.fixture(scope="module")
def synthetic_cache(tmp_path_factory) -> Path:
    """One synthetic-pins cache shared by every synthetic recipe (generated once)."""
    return tmp_path_factory.mktemp("pins")


def source_overrides(path: Path, cache: Path) -> list[str]:
    """Overrides that point a recipe's data source at small local data (skip if absent)."""
    source = load_recipe(path).data.source
    if source == "synthetic_pins":
        return [
            f"data.synthetic_pins.cache_dir={cache}", "data.synthetic_pins.num_train=8",
            "data.synthetic_pins.num_val=4", "data.synthetic_pins.image_size=[64,64]",
        ]  # fmt: skip
    if source == "coco":
        if not COCO.is_dir():
            pytest.skip(f"shared data not available: {COCO}")
        ann = COCO / "annotations"
        return [
            f"data.coco.train_annotations={ann / 'person_keypoints_train2017.json'}",
            f"data.coco.train_images={COCO / 'train2017'}",
            f"data.coco.val_annotations={ann / 'person_keypoints_val2017.json'}",
            f"data.coco.val_images={COCO / 'val2017'}",
        ]
    if not DLC.is_dir():
        pytest.skip(f"shared data not available: {DLC}")
    return [f"data.dlc.project={DLC}"]


def tiny_overrides(path: Path) -> list[str]:
    """TINY, keeping the trunk of the recipes in :data:`OWN_TRUNK`."""
    own = path in OWN_TRUNK
    return [o for o in TINY if not (own and o.startswith("model.backbone="))]


def _load(path: Path, cache: Path, extra: tuple[str, ...] = ()) -> Recipe:
    overrides = [*source_overrides(path, cache), *tiny_overrides(path), *extra]
    return load_recipe(path, overrides, check_files=True)


def _one_step(recipe: Recipe) -> tuple[keras.Model, dict, list, list, set[str]]:
    """One eager optimizer step of the recipe's first phase; (model, logs, before, after)."""
    from kpnet.data.pipeline import build_dataset

    spec, train, _ = load_data(recipe)
    t = recipe.train
    ds = build_dataset(train[: 2 * t.batch_size], spec, pipeline_config(recipe), t.batch_size,
                       training=True, seed=t.seed, repeat=True)  # fmt: skip
    names = kt.output_names(recipe)
    ds = ds.map(lambda images, kp: (images, {name: kp for name in names}))
    phase = kt.training_phases(recipe)[0]
    names = kt.backbone_layer_names(recipe) if phase.frozen else set()
    keras.utils.set_random_seed(t.seed)
    with kt.make_strategy(t.distribute).scope():
        model = kt.build_model(recipe, spec)
        kt.configure_phase(model, recipe, spec, phase, 1, names)
        model.run_eagerly = True
        before = [w.numpy().copy() for w in model.weights]
        history = model.fit(ds, epochs=1, steps_per_epoch=1, verbose=0)
    after = [w.numpy() for w in model.weights]
    return model, {k: v[-1] for k, v in history.history.items()}, before, after, names


@pytest.mark.parametrize("path", PARAMS)
def test_recipe_trains_one_step(path, synthetic_cache):
    recipe = _load(path, synthetic_cache)
    assert recipe.model.input_size == (64, 64) and recipe.train.distribute == "one_device"
    previous = keras.mixed_precision.global_policy().name
    keras.mixed_precision.set_global_policy(recipe.train.precision)
    try:
        model, logs, before, after, frozen = _one_step(recipe)
    finally:
        keras.mixed_precision.set_global_policy(previous)
    spec = recipe.data.keypoint_spec() or load_data(recipe)[0]
    outputs = kt.output_names(recipe)
    assert tuple(model.output) == outputs
    assert all(model.output[n].shape[-1] == spec.num_channels for n in outputs)
    assert np.isfinite(logs["loss"]) and logs["loss"] > 0, logs
    changed = {
        w.path.split("/")[0]
        for w, b, a in zip(model.weights, before, after, strict=True)
        if not np.array_equal(b, a)
    }
    assert not changed & frozen  # nothing in a frozen backbone moved
    optimizer = model.optimizer
    scaled = isinstance(optimizer, keras.optimizers.LossScaleOptimizer)
    if scaled and "refine_head_conv" not in changed:
        # float16 overflow at the initial loss scale: the step is skipped and the scale halved
        assert float(optimizer.dynamic_scale) < optimizer.initial_scale
    else:
        assert "refine_head_conv" in changed  # the step updated the heads
    if recipe.train.precision != "float32":
        compute = recipe.train.precision.removeprefix("mixed_")
        assert model.get_layer("tiny_stem_conv").compute_dtype == compute
        assert all(model.output[n].dtype == "float32" for n in outputs)
        if recipe.train.precision == "mixed_float16":
            assert isinstance(optimizer, keras.optimizers.LossScaleOptimizer)


@pytest.mark.slow
@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_kpnet_fit_runs_recipe(path, synthetic_cache, tmp_path):
    args = ["fit", str(path), "-o", str(tmp_path / "run")]
    for item in [*source_overrides(path, synthetic_cache), *tiny_overrides(path)]:
        args += ["--set", item]
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["overall"]["count"] > 0 and metrics["overall"]["mean"] > 0
    recipe = load_recipe(path)
    if recipe.evaluation.max_peaks:  # shared channel: detection-style pin report
        pins = metrics["pins"]["overall"]
        assert pins["num_true"] == pins["matched"] + pins["misses"]


# --------------------------------------------------------------------------- the DLC recipe
DLC_RECIPE = REPO / "recipes" / "dlc-project.yaml"


def grey_mirror_project(root: Path, frames: int = 6, hw: tuple[int, int] = (48, 160)) -> Path:
    """A DeepLabCut project like a two-view mirror one: grey (1-channel) PNG frames wider
    than the recipe's input aspect, 17 body parts, about half of the labels missing."""
    from PIL import Image

    names = [f"part{i}_{view}" for view in ("side", "mirror") for i in range(9)][:17]
    folder = root / "labeled-data" / "video1"
    folder.mkdir(parents=True)
    (root / "config.yaml").write_text(
        "Task: mirror\nscorer: me\nbodyparts:\n" + "".join(f"- {n}\n" for n in names)
        + "TrainingFraction:\n- 0.67\n"
    )  # fmt: skip
    rng = np.random.default_rng(0)
    header = [["scorer", "", "", *["me"] * 34], ["bodyparts", "", "", *np.repeat(names, 2)],
              ["coords", "", "", *["x", "y"] * 17]]  # fmt: skip
    rows = []
    for f in range(frames):
        Image.fromarray(rng.integers(0, 255, hw, np.uint8), mode="L").save(folder / f"img{f}.png")
        xy = rng.uniform(2, [hw[1] - 2, hw[0] - 2], (17, 2))
        cells = [[f"{x:.1f}", f"{y:.1f}"] if rng.random() > 0.5 else ["", ""] for x, y in xy]
        rows.append(["labeled-data", "video1", f"img{f}.png", *sum(cells, [])])
    (folder / "CollectedData_me.csv").write_text("\n".join(",".join(r) for r in header + rows))
    return root


def test_dlc_recipe_takes_grey_frames_missing_labels_17_parts(tmp_path):
    """The DLC recipe on the hidden projects' shapes: grey frames come in as RGB, missing
    labels are unlabelled (v=0), 17 channels, a frame of another aspect letterboxed; one
    training step, then a grey frame predicted inside the frame."""
    from kpnet.data.pipeline import build_dataset
    from kpnet.frames import read_image
    from kpnet.inference import build_keypoints_model
    from kpnet.runner import Predictor

    project = grey_mirror_project(tmp_path / "mirror")
    recipe = load_recipe(DLC_RECIPE, [f"data.dlc.project={project}", *tiny_overrides(DLC_RECIPE)])
    spec, train, val = load_data(recipe)
    assert spec.num_keypoints == 17 and spec.num_channels == 17
    assert len(val) == 2 and len(train) == 4  # 1 - TrainingFraction held out
    ds = build_dataset(train, spec, pipeline_config(recipe), 2, training=True, seed=0)
    images, keypoints = next(iter(ds))
    assert images.shape == (2, 64, 64, 3) and images.dtype == "uint8"
    assert (keypoints[..., 2].numpy() == 0).any() and (keypoints[..., 2].numpy() > 0).any()
    model, logs, _, _, _ = _one_step(recipe)
    assert np.isfinite(logs["loss"]) and model.output["refine"].shape[-1] == 17
    image = read_image(train[0].image_path)
    assert image.shape == (48, 160, 3)
    xy, _ = Predictor(build_keypoints_model(model, spec, recipe.codec())).predict(image)
    assert xy.shape == (1, 17, 2)
    assert (xy >= -0.5).all() and (xy[..., 0] <= 159.5).all() and (xy[..., 1] <= 47.5).all()


@pytest.mark.slow  # over 25 s on 2 cores
def test_dlc_recipe_sizes_its_input_to_the_frames(tmp_path):
    """``model.input_size: auto`` (the DLC recipe's): frames 3.3x wider than tall train at an
    input of their aspect, saved in the run folder; the same command resumes (auto is not a
    change), predict and a resume with another size use / refuse it."""
    from tests._cli import invoke, refused

    project = grey_mirror_project(tmp_path / "mirror")
    assert load_recipe(DLC_RECIPE).model.input_size == "auto"
    sets = [f"data.dlc.project={project}", "model.input_pixels=2048",
            *[o for o in tiny_overrides(DLC_RECIPE) if not o.startswith("model.input_size")]]
    args = ["fit", DLC_RECIPE, "-o", tmp_path / "run", *sum((["--set", o] for o in sets), [])]
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    assert "input 32x96 (auto: the frames' aspect)" in result.output
    codec = json.loads((tmp_path / "run" / "codec.json").read_text())
    assert codec["input_size"] == [32, 96]
    saved = load_recipe(tmp_path / "run" / "recipe.resolved.yaml")
    assert saved.model.input_size == (32, 96) and saved.codec().input_size == (32, 96)
    again = invoke(*args)
    assert again.exit_code == 0 and "already holds 1 trained epochs" in again.output
    frame = project / "labeled-data" / "video1" / "img0.png"
    out = tmp_path / "pred.json"
    assert invoke("predict", tmp_path / "run", frame, "-o", out).exit_code == 0
    xy = np.reshape(json.loads(out.read_text())[0]["keypoints"], (-1, 3))[:, :2]
    assert xy.shape == (17, 2) and (xy[:, 0] <= 159.5).all() and (xy[:, 1] <= 47.5).all()
    other = invoke(*args, "--set", "model.input_pixels=8192")
    refused(other, "input_pixels")
    with pytest.raises(ValueError, match="model.input_size: auto"):
        load_recipe(DLC_RECIPE, [f"data.dlc.project={project}"]).codec()


def test_dlc_recipe_keeps_the_final_weights():
    """One validation, at the end: the model a run folder serves (best.keras) is the one the
    annealed schedule ends on, not the luckiest of several scores on a few held-out frames."""
    t = load_recipe(DLC_RECIPE).train
    assert t.validation_every >= t.epochs and t.lr_schedule == "cosine"
