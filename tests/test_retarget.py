"""Re-targeting: a 17-keypoint COCO model fine-tuned to the 5 DeepLabCut body parts.

``kpnet fit`` trains a tiny COCO CPN for two steps on ``shared/data/coco_mini``; the DLC
recipe then starts from it with ``model.init_from`` (``shared/data/dlc_reaching``). Every
layer whose shapes match must be copied unchanged (the trunk), the heatmap heads (17 -> 5
channels) re-initialised and listed in the report, and ``train.freeze_backbone_epochs`` must
leave the backbone untouched while the rest trains.
"""

from __future__ import annotations

import json
from pathlib import Path

import keras
import numpy as np
import pytest
from click.testing import CliRunner

import kpnet
from kpnet.cli import main
from kpnet.data.sources import load_data
from kpnet.recipe import load_recipe
from kpnet.training import backbone_layer_names, build_model

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
COCO, DLC = DATA / "coco_mini", DATA / "dlc_reaching"
TINY = [
    "model.backbone=tiny", "model.head=cpn", "model.backbone_weights=null",
    "model.input_size=[64,64]", "train.backbone_bn=trainable",
    "model.pyramid_channels=16", "train.verbose=0", "train.distribute=one_device",
    "evaluation.flip_test=false", "export.keypoints_model=false", "export.saved_model=false",
]  # fmt: skip
HEADS = {f"{n}_head_{k}" for n in ("global_p2", "global_p3", "global_p4", "global_p5", "refine")
         for k in ("conv", "bn")}  # fmt: skip

pytestmark = pytest.mark.skipif(
    not (COCO.is_dir() and DLC.is_dir()), reason=f"shared data not available: {COCO} and {DLC}"
)


def _fit(recipe: str, out: Path, overrides: list[str]):
    args = ["fit", str(REPO / "recipes" / recipe), "-o", str(out)]
    for item in overrides:
        args += ["--set", item]
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result


@pytest.fixture(scope="module")
def coco_model(tmp_path_factory) -> Path:
    """best.keras of a 17-keypoint CPN trained two steps with the COCO recipe."""
    out = tmp_path_factory.mktemp("coco")
    ann = COCO / "annotations" / "person_keypoints_train2017.json"
    _fit("coco-cpn50-256x192.yaml", out, [
        f"data.coco.train_annotations={ann}", f"data.coco.train_images={COCO / 'train2017'}",
        "data.coco.val_annotations=null", "data.coco.val_images=null",
        "data.coco.val_fraction=0", *TINY, "train.epochs=1", "train.steps_per_epoch=2",
        "train.batch_size=8"])  # fmt: skip
    return out / "best.keras"  # no validation split: the lowest training loss


def _dlc_overrides(source: Path, *extra: str) -> list[str]:
    return [f"data.dlc.project={DLC}", f"model.init_from={source}", *TINY,
            "data.dlc.val_fraction=0", "train.batch_size=4", *extra]  # fmt: skip


def _weights(model: keras.Model, names) -> dict[str, list[np.ndarray]]:
    return {n: [np.asarray(w) for w in model.get_layer(n).get_weights()] for n in names}


def _same(a: list[np.ndarray], b: list[np.ndarray]) -> bool:
    return len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


def test_init_from_loads_trunk_and_reinitializes_heads(coco_model, capsys):
    recipe = load_recipe(REPO / "recipes" / "dlc-project.yaml", _dlc_overrides(coco_model))
    spec = load_data(recipe)[0]
    source = keras.saving.load_model(coco_model, compile=False)
    keras.utils.set_random_seed(0)
    model = build_model(recipe, spec)  # what `kpnet fit` trains, before any step
    log = capsys.readouterr().out
    assert spec.num_keypoints == 5 and model.output["refine"].shape[-1] == 5
    assert source.output["refine"].shape[-1] == 17

    backbone = backbone_layer_names(recipe)
    assert len(backbone) >= 13 and "tiny_stem_conv" in backbone
    for name, values in _weights(source, backbone).items():
        assert _same(values, model.get_layer(name).get_weights()), name
    layers = [layer.name for layer in model.layers if layer.weights]
    shape = lambda m, n: [tuple(w.shape) for w in m.get_layer(n).weights]
    changed = {n for n in layers if shape(model, n) != shape(source, n)}
    assert changed == HEADS
    for name in set(layers) - changed:  # GlobalNet / RefineNet trunk: copied too
        assert _same(source.get_layer(name).get_weights(), model.get_layer(name).get_weights())
    kernel = model.get_layer("refine_head_conv").get_weights()[0]
    old = source.get_layer("refine_head_conv").get_weights()[0][..., :5]
    assert kernel.shape[-1] == 5 and not np.allclose(kernel, old)  # fresh, not a slice

    assert f"init_from {coco_model}" in log
    assert f"loaded {len(layers) - len(HEADS)} layers from the source model" in log
    listed = log.split("re-initialised (shape mismatch): 10 layers: ")[1].splitlines()[0]
    assert set(listed.split(", ")) == HEADS

    same, report = kpnet.retarget(coco_model, num_channels=5)  # the Python entry point
    assert set(report.reinitialized) == HEADS and set(report.loaded) == set(layers) - HEADS
    assert same.input_shape[1:] == (64, 64, 3) and same.output["refine"].shape[-1] == 5
    for name in ("tiny_stem_conv", "refine_final_block_1_conv"):
        assert _same(same.get_layer(name).get_weights(), model.get_layer(name).get_weights())


@pytest.mark.slow  # over 25 s on 2 cores
def test_frozen_backbone_phase_keeps_backbone_fixed(coco_model, tmp_path):
    out = tmp_path / "dlc"
    result = _fit("dlc-project.yaml", out, _dlc_overrides(
        coco_model, "train.epochs=1", "train.freeze_backbone_epochs=1",
        "train.steps_per_epoch=1"))  # fmt: skip
    assert "re-initialised (shape mismatch): 10 layers" in result.output
    recipe = load_recipe(out / "recipe.resolved.yaml")
    backbone = backbone_layer_names(recipe)
    source = keras.saving.load_model(coco_model, compile=False)
    tuned = keras.saving.load_model(out / "last.keras", compile=False)
    assert tuned.output["refine"].shape[-1] == 5
    for name, values in _weights(source, backbone).items():  # kernels AND BN statistics
        assert _same(values, tuned.get_layer(name).get_weights()), name
    trained = [
        n for n in ("global_lateral_p2_conv", "refine_final_block_1_conv")
        if not _same(source.get_layer(n).get_weights(), tuned.get_layer(n).get_weights())
    ]  # fmt: skip
    assert len(trained) == 2  # the rest of the network did train
    meta = json.loads((out / "backup" / "training_metadata.json").read_text())
    assert meta == {"epoch": 1, "phase": 0}


@pytest.mark.slow
def test_unfreeze_after_frozen_phase_lowers_lr(coco_model, tmp_path):
    out = tmp_path / "dlc"
    _fit("dlc-project.yaml", out, _dlc_overrides(
        coco_model, "train.epochs=2", "train.freeze_backbone_epochs=1",
        "train.unfreeze_lr_factor=0.25", "train.lr=1e-3", "train.steps_per_epoch=1"))  # fmt: skip
    source = keras.saving.load_model(coco_model, compile=False)
    tuned = keras.saving.load_model(out / "last.keras")
    weights = lambda m, n: m.get_layer(n).get_weights()
    deep = "tiny_c3_conv1_conv"  # stride 8: unfrozen in the second phase
    assert not _same(weights(source, deep), weights(tuned, deep))
    stem = "tiny_stem_conv"  # stride 2: the recipe's freeze_trunk_stride 4 keeps it all run
    assert _same(weights(source, stem), weights(tuned, stem))
    optimizer = tuned.optimizer
    schedule = getattr(optimizer, "inner_optimizer", optimizer)._learning_rate
    assert schedule.lr == pytest.approx(2.5e-4)  # unfrozen phase: lr x unfreeze_lr_factor
