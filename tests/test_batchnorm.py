"""BatchNorm on small data: precise BN statistics, BN momentum, freezing only what is pretrained,
and one-line errors for backbone weights that cannot be had."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf
from _blobs import disk_images
from click.testing import CliRunner

from kpnet import codec
from kpnet.cli import main
from kpnet.losses import build_losses
from kpnet.models import build_cpn
from kpnet.recipe import RecipeError, load_recipe
from kpnet.spec import KeypointSpec
from kpnet.training import build_model, training_phases
from kpnet.training.precise_bn import PreciseBN, bn_layers, recompute_bn_statistics

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "recipes" / "quickstart.yaml"
EPS = 1e-3  # keras' BatchNormalization default


# --------------------------------------------------------------------------- unit
def _toy_model() -> keras.Model:
    """conv -> BN (gamma 2, beta 0.5) -> relu -> nested [conv -> BN] -> frozen BN."""
    inner_in = keras.Input((8, 8, 4))
    inner_out = keras.layers.BatchNormalization(name="inner_bn")(
        keras.layers.Conv2D(3, 3, padding="same", name="inner_conv")(inner_in)
    )
    inner = keras.Model(inner_in, inner_out, name="inner")
    images = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(4, 3, padding="same", name="conv")(images)
    x = keras.layers.BatchNormalization(
        gamma_initializer=keras.initializers.Constant(2.0),
        beta_initializer=keras.initializers.Constant(0.5),
        name="bn",
    )(x)
    x = keras.layers.ReLU()(x)
    x = inner(x)
    frozen = keras.layers.BatchNormalization(name="frozen_bn")
    frozen.trainable = False
    return keras.Model(images, frozen(x))


def _expected_statistics(model: keras.Model, batches: list[np.ndarray]) -> dict[str, np.ndarray]:
    """numpy: per-batch mean / var of each trainable BN layer's input, averaged over batches."""
    conv, bn = model.get_layer("conv"), model.get_layer("bn")
    inner_conv = model.get_layer("inner").get_layer("inner_conv")
    sums: dict[str, np.ndarray] = {}
    for x in batches:
        h1 = np.asarray(conv(x), np.float64)
        m1, v1 = h1.mean((0, 1, 2)), h1.var((0, 1, 2))
        gamma, beta = bn.gamma.numpy(), bn.beta.numpy()
        a1 = np.maximum(gamma * (h1 - m1) / np.sqrt(v1 + EPS) + beta, 0).astype(np.float32)
        h2 = np.asarray(inner_conv(a1), np.float64)
        for key, value in {"bn_mean": m1, "bn_var": v1, "inner_bn_mean": h2.mean((0, 1, 2)),
                           "inner_bn_var": h2.var((0, 1, 2))}.items():  # fmt: skip
            sums[key] = sums.get(key, 0) + value
    return {k: v / len(batches) for k, v in sums.items()}


def test_recompute_matches_numpy_nested_and_leaves_frozen_layers_alone():
    keras.utils.set_random_seed(0)
    model = _toy_model()
    frozen = model.get_layer("frozen_bn")
    frozen.moving_mean.assign(np.full(3, 7.0, "float32"))
    before = frozen.moving_variance.numpy().copy()
    rng = np.random.default_rng(0)
    batches = [rng.normal(3.0, 2.0, (6, 8, 8, 3)).astype("float32") for _ in range(3)]
    gamma = model.get_layer("bn").gamma.numpy().copy()

    used = recompute_bn_statistics(model, tf.data.Dataset.from_tensor_slices(np.stack(batches)), 3)

    assert used == 3
    assert [layer.name for layer in bn_layers(model)] == ["bn", "inner_bn"]  # nested found
    expected = _expected_statistics(model, batches)
    for name, layer in (("bn", model.get_layer("bn")),
                        ("inner_bn", model.get_layer("inner").get_layer("inner_bn"))):  # fmt: skip
        np.testing.assert_allclose(layer.moving_mean.numpy(), expected[f"{name}_mean"], rtol=1e-4,
                                   atol=1e-5)  # fmt: skip
        np.testing.assert_allclose(layer.moving_variance.numpy(), expected[f"{name}_var"],
                                   rtol=1e-4)  # fmt: skip
        assert "call" not in layer.__dict__  # the recording call is gone again
    np.testing.assert_array_equal(frozen.moving_mean.numpy(), 7.0)  # trainable=False: untouched
    np.testing.assert_array_equal(frozen.moving_variance.numpy(), before)
    np.testing.assert_array_equal(model.get_layer("bn").gamma.numpy(), gamma)  # forward only


def test_recompute_under_mixed_float16_keeps_float32_statistics():
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        keras.utils.set_random_seed(0)
        images = keras.Input((8, 8, 3))
        conv = keras.layers.Conv2D(4, 3, padding="same")
        bn = keras.layers.BatchNormalization()
        model = keras.Model(images, bn(conv(images)))
        x = np.random.default_rng(1).normal(300.0, 50.0, (2, 4, 8, 8, 3)).astype("float32")
        assert recompute_bn_statistics(model, list(x), 2) == 2
        h = np.stack([np.asarray(conv(b), np.float32) for b in x])  # float16 layer inputs
        assert bn.moving_mean.dtype == "float32" and conv.compute_dtype == "float16"
        np.testing.assert_allclose(bn.moving_mean.numpy(), h.mean((1, 2, 3)).mean(0), rtol=1e-3)
        expected_var = h.var((1, 2, 3), dtype=np.float64).mean(0)  # per batch, then averaged
        np.testing.assert_allclose(bn.moving_variance.numpy(), expected_var, rtol=1e-2)
    finally:
        keras.mixed_precision.set_global_policy(previous)


MIRRORED = textwrap.dedent("""
    import json
    import numpy as np
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    import keras
    from kpnet.training.precise_bn import recompute_bn_statistics
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    with strategy.scope():
        inputs = keras.Input((4,))
        bn = keras.layers.BatchNormalization()
        model = keras.Model(inputs, bn(inputs))
    x = np.random.default_rng(0).normal(2.0, 3.0, (2, 8, 4)).astype("float32")
    used = recompute_bn_statistics(model, tf.data.Dataset.from_tensor_slices(x), 2)
    halves = x.reshape(2, 2, 4, 4)  # batch, replica, sample, feature: each replica its half
    expected = [halves.mean(2).mean((0, 1)).tolist(), halves.var(2).mean((0, 1)).tolist()]
    local = [[v.numpy().tolist() for v in strategy.experimental_local_results(var.value)]
             for var in (bn.moving_mean, bn.moving_variance)]
    print("RESULT", json.dumps({"used": used, "expected": expected, "local": local}))
""")


def test_recompute_under_mirrored_strategy_two_cpus():
    import json

    proc = subprocess.run(
        [sys.executable, "-c", MIRRORED], capture_output=True, text=True, cwd=REPO, timeout=180,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
    )  # fmt: skip
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    result = json.loads(lines[0].removeprefix("RESULT "))
    assert result["used"] == 2
    for expected, replicas in zip(result["expected"], result["local"], strict=True):
        assert len(replicas) == 2  # every replica holds the recomputed statistics
        for values in replicas:
            np.testing.assert_allclose(values, expected, rtol=1e-5)


def test_precise_bn_runs_on_the_last_batch_before_validation():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((4,))
    model = keras.Model(inputs, keras.layers.Dense(1)(keras.layers.BatchNormalization()(inputs)))
    model.compile(keras.optimizers.SGD(0.01), "mse", jit_compile=False)
    rng = np.random.default_rng(0)
    x, y = rng.normal(5.0, 2.0, (32, 4)).astype("float32"), rng.normal(size=(32, 1))
    calls: list[int] = []

    class Counting(PreciseBN):
        def recompute(self) -> int:
            calls.append(self.params["steps"])
            return super().recompute()

    precise = Counting(lambda: tf.data.Dataset.from_tensor_slices(x).batch(8).repeat(), 4)
    history = model.fit(x, y, batch_size=8, epochs=2, validation_data=(x, y), verbose=0,
                        callbacks=[precise])  # fmt: skip
    assert calls == [4, 4]  # once per epoch
    bn = model.layers[1]
    np.testing.assert_allclose(bn.moving_mean.numpy(), x.mean(0), rtol=1e-5)
    # val_loss was computed after the recomputation: evaluating again gives the same number
    val_loss = model.evaluate(x, y, batch_size=8, verbose=0)
    np.testing.assert_allclose(history.history["val_loss"][-1], val_loss, rtol=1e-5)


# --------------------------------------------------------------------------- acceptance
SIZE, NUM, BATCH = 64, 24, 8


def _blobs(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    return disk_images(NUM, SIZE, seed)


def _peaks(model: keras.Model, images: np.ndarray, training: bool):
    """Per image and channel: refine heatmap peak value and (row, col), in training batches."""
    maps = np.concatenate([np.asarray(model(images[i : i + BATCH], training=training)["refine"])
                           for i in range(0, len(images), BATCH)])  # fmt: skip
    flat = maps.reshape(len(images), -1, maps.shape[-1])
    return flat.max(1), np.stack(np.unravel_index(flat.argmax(1), maps.shape[1:3]), -1)


def _inference_vs_training(model: keras.Model, images: np.ndarray):
    """(peak value ratios inference / training mode, max peak distance in heatmap px)."""
    bns = bn_layers(model)
    saved = [(b.moving_mean.numpy(), b.moving_variance.numpy()) for b in bns]
    value_inf, loc_inf = _peaks(model, images, training=False)
    value_train, loc_train = _peaks(model, images, training=True)  # updates the moving stats:
    for b, (mean, var) in zip(bns, saved, strict=True):  # put them back
        b.moving_mean.assign(mean)
        b.moving_variance.assign(var)
    return value_inf / value_train, np.abs(loc_inf - loc_train).max()


@pytest.mark.slow  # over 25 s on 2 cores
def test_precise_bn_makes_inference_heatmaps_match_training_mode():
    """36 steps on 24 images: Keras' lagging moving averages (momentum 0.99) give inference
    heatmaps far from the training-mode ones; after precise BN they match in peak and place."""
    keras.utils.set_random_seed(0)
    images, keypoints = _blobs()
    targets = keypoints  # input pixels: the losses encode them with the codec
    model = build_cpn(2, (SIZE, SIZE, 3), backbone="tiny", pyramid_channels=16, bn_momentum=0.99)
    losses, weights = build_losses(KeypointSpec(names=("red", "blue")))
    model.compile(keras.optimizers.Adam(1e-2), loss=losses, loss_weights=weights,
                  jit_compile=False)  # fmt: skip
    history = model.fit(images, {n: targets for n in codec.OUTPUT_NAMES}, batch_size=BATCH,
                        epochs=12, verbose=0)  # fmt: skip
    assert history.history["loss"][-1] * 4 < history.history["loss"][0]  # it learned

    ratio, _ = _inference_vs_training(model, images)
    assert abs(np.median(ratio) - 1) > 0.3, np.round(np.quantile(ratio, [0, 0.5, 1]), 3)

    precise = PreciseBN(
        lambda: tf.data.Dataset.from_tensor_slices(images).shuffle(NUM, seed=1).repeat()
        .batch(BATCH), num_batches=NUM // BATCH,
    )  # fmt: skip
    precise.set_model(model)
    assert precise.recompute() == 3
    ratio, distance = _inference_vs_training(model, images)
    assert abs(np.median(ratio) - 1) < 0.1, np.round(np.quantile(ratio, [0, 0.5, 1]), 3)
    assert np.quantile(np.abs(ratio - 1), 0.9) < 0.25, np.round(np.sort(ratio), 3)
    assert distance <= 1  # heatmap px


# --------------------------------------------------------------------------- recipe / fit
def test_bn_momentum_reaches_every_batchnorm_layer():
    recipe = load_recipe(QUICKSTART, ["model.bn_momentum=0.8", "model.input_size=[64,64]",
                                      "model.pyramid_channels=16"])  # fmt: skip
    model = build_model(recipe, KeypointSpec(names=("a", "b")))
    momenta = {layer.momentum for layer in bn_layers(model, trainable_only=False)}
    assert momenta == {0.8} and len(bn_layers(model)) > 20
    resnet = build_cpn(1, (64, 64, 3), "resnet50", pyramid_channels=16, bn_momentum=0.7)
    assert {b.momentum for b in bn_layers(resnet)} == {0.7}  # keras.applications layers too
    assert {b.momentum for b in bn_layers(build_cpn(1, (64, 64, 3), "tiny", pyramid_channels=16))
            } == {0.9}  # fmt: skip
    with pytest.raises(RecipeError, match="model.bn_momentum"):
        load_recipe(QUICKSTART, ["model.bn_momentum=1.0"])
    assert load_recipe(QUICKSTART).train.precise_bn_batches == 16


def test_fit_adds_precise_bn_after_the_nan_guard(tmp_path):
    import kpnet.training.loop as kt
    from kpnet.data.sources import load_data
    from kpnet.run_folder import RunFolder
    from kpnet.training.callbacks import NaNGuard

    base = [f"data.synthetic_pins.cache_dir={tmp_path / 'pins'}",
            "data.synthetic_pins.num_train=20", "data.synthetic_pins.num_val=2",
            "data.synthetic_pins.image_size=[64,64]", "model.input_size=[64,64]",
            "train.batch_size=8"]  # fmt: skip
    recipe = load_recipe(QUICKSTART, [*base, "train.precise_bn_batches=16"])
    spec, train, _ = load_data(recipe)
    phase = training_phases(recipe)[0]
    run = kt.Run(recipe, RunFolder(tmp_path), spec, 2, None, None, "loss", NaNGuard(), train)
    callbacks = kt._callbacks(run, phase)
    assert isinstance(callbacks[0], NaNGuard) and isinstance(callbacks[1], PreciseBN)
    assert callbacks[1].num_batches == 3  # at most one pass over the 20 training images
    images = next(iter(callbacks[1].dataset_fn()))
    assert tuple(images.shape) == (8, 64, 64, 3)  # images only, no keypoints
    off_recipe = load_recipe(QUICKSTART, [*base, "train.precise_bn_batches=0"])
    off = kt.Run(off_recipe, RunFolder(tmp_path), spec, 2, None, None, "loss", NaNGuard(), train)
    assert not any(isinstance(cb, PreciseBN) for cb in kt._callbacks(off, phase))


def test_freeze_only_a_pretrained_backbone(tmp_path, capsys):
    frozen = ["train.freeze_backbone_epochs=3", "train.epochs=10"]
    phases = training_phases(load_recipe(QUICKSTART, frozen))  # backbone_weights: null
    assert [(p.start, p.end, p.frozen, p.lr_factor) for p in phases] == [(0, 10, False, 1.0)]
    out = capsys.readouterr().out
    assert out.count("\n") == 1
    assert out.startswith("kpnet: train.freeze_backbone_epochs=3 skipped")
    weights = tmp_path / "tiny.weights.h5"
    weights.write_bytes(b"")
    init = tmp_path / "model.keras"
    init.write_bytes(b"")
    for pretrained in (f"model.backbone_weights={weights}", f"model.init_from={init}"):
        phases = training_phases(load_recipe(QUICKSTART, [*frozen, pretrained]))
        assert [(p.start, p.end, p.frozen) for p in phases] == [(0, 3, True), (3, 10, False)]
    assert capsys.readouterr().out == ""


# --------------------------------------------------------------------------- errors
def _fit_cli(overrides: list[str], recipe: Path = QUICKSTART, tmp: Path | None = None):
    args = ["fit", str(recipe), "-o", str(tmp or "unused")]
    for item in overrides:
        args += ["--set", item]
    return CliRunner().invoke(main, args)


def _one_line_error(result) -> str:
    assert result.exit_code == 2, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert "Traceback" not in result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    return lines[0]


def test_tiny_backbone_with_imagenet_weights_is_one_recipe_error(tmp_path):
    line = _one_line_error(_fit_cli(["model.backbone_weights=imagenet"], tmp=tmp_path / "r"))
    assert "model.backbone_weights: backbone 'tiny' has no ImageNet weights" in line
    assert not (tmp_path / "r").exists()


def test_missing_imagenet_weights_fail_fast_in_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "empty-keras-home"))
    line = _one_line_error(_fit_cli(["model.backbone=resnet50", "model.backbone_weights=imagenet",
                                     "data.synthetic_pins.cache_dir=/nonexistent/never-made"],
                                    tmp=tmp_path / "r"))  # fmt: skip
    assert "model.backbone_weights: ImageNet weights for resnet50 (resnet50_weights" in line
    assert "--set model.backbone_weights=/path/to/resnet50_weights_tf_dim_ordering" in line
    assert not Path("/nonexistent/never-made").exists()  # failed before generating any data
    missing = _one_line_error(_fit_cli([f"model.backbone_weights={tmp_path / 'no.weights.h5'}"]))
    assert "model.backbone_weights: file not found" in missing


def test_unloadable_weights_file_is_one_line(tmp_path):
    bad = tmp_path / "tiny.weights.h5"
    bad.write_bytes(b"not an h5 file")
    overrides = [
        f"model.backbone_weights={bad}", f"data.synthetic_pins.cache_dir={tmp_path / 'pins'}",
        "data.synthetic_pins.num_train=8", "data.synthetic_pins.num_val=2",
        "data.synthetic_pins.image_size=[64,64]", "model.input_size=[64,64]",
    ]  # fmt: skip
    result = _fit_cli(overrides, tmp=tmp_path / "run")
    assert result.exit_code == 2, result.output
    errors = [ln for ln in result.output.splitlines() if ln.startswith("Error: ")]
    assert len(errors) == 1 and "Traceback" not in result.output, result.output
    assert "model.backbone_weights: cannot load backbone weights" in errors[0]
