"""SimpleBaseline and HRNet heads, HRNet-W32 / MobileNetV2 / EfficientNet-B0 trunks.

Parameter counts against the published figures (they do not depend on the input size, so the
models are built at 64x64), one eager training step per head and trunk on a small input,
re-targeting, recipe errors, and the SavedModel of a single-head model against ``kpnet
predict``. HRNet feeding CPN and the JAX runs are ``slow``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap

import cv2
import keras
import numpy as np
import pytest
from click.testing import CliRunner

import kpnet  # noqa: F401  (sets TF log level)
from kpnet.cli import main
from kpnet.losses import build_losses
from kpnet.models import BackboneWeightsError, build_cpn, build_heatmap_model, head_outputs
from kpnet.models.backbones import imagenet_cache_path, resolve_weights
from kpnet.models.retarget import infer_architecture, retarget, transfer_weights
from kpnet.recipe import RecipeError, load_recipe
from kpnet.spec import KeypointSpec

SPEC = KeypointSpec(names=("a", "b", "c"), flip_pairs=((0, 1),))
SMALL = (64, 64, 3)


def _trainable(model: keras.Model) -> int:
    return sum(int(np.prod(w.shape)) for w in model.trainable_weights)


def _one_step(model: keras.Model, head: str, refine: str = "l2") -> tuple[float, float]:
    """One eager Adam step on random images; (loss, fraction of trainable tensors changed)."""
    losses, weights = build_losses(SPEC, refine, outputs=head_outputs(head))
    model.compile(keras.optimizers.Adam(1e-3), loss=losses, loss_weights=weights)
    model.run_eagerly = True  # tracing a step costs more than running one on a CPU
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (2, *SMALL)).astype(np.uint8)
    kp = np.concatenate([rng.uniform(1, 14, (2, 3, 2)), np.full((2, 3, 1), 2.0)], -1)
    before = [w.numpy().copy() for w in model.trainable_weights]
    logs = model.train_on_batch(images, {n: kp.astype(np.float32) for n in model.output},
                                return_dict=True)  # fmt: skip
    changed = [not np.array_equal(b, w.numpy()) for b, w in zip(before, model.trainable_weights,
                                                                 strict=True)]  # fmt: skip
    return float(logs["loss"]), float(np.mean(changed))


def _check_outputs(model: keras.Model, head: str) -> None:
    assert tuple(model.output) == head_outputs(head)
    for out in model.output.values():
        assert tuple(out.shape[1:]) == (SMALL[0] // 4, SMALL[1] // 4, SPEC.num_channels)


# --------------------------------------------------------------------------- heads and trunks
def _with_17_channels(model: keras.Model) -> int:
    """Trainable parameters of the same model with 17 heatmap channels (final 1x1 conv)."""
    width = model.get_layer("refine_head_conv").kernel.shape[2]
    return _trainable(model) + (17 - SPEC.num_channels) * (width + 1)


def test_simple_baseline_resnet50_matches_published_parameters_and_trains():
    """Xiao et al. 2018: ResNet-50, 256x192, 17 keypoints: 34.0M parameters."""
    model = build_heatmap_model(3, SMALL, "resnet50", "simple_baseline")
    assert abs(_with_17_channels(model) - 34.0e6) / 34.0e6 < 0.01
    _check_outputs(model, "simple_baseline")
    assert model.get_layer("simple_deconv3_conv").strides == (2, 2)
    loss, changed = _one_step(model, "simple_baseline")
    assert np.isfinite(loss) and loss > 0 and changed > 0.9


def test_hrnet_w32_matches_published_parameters_and_trains():
    """Sun et al. 2019: HRNet-W32, 256x192, 17 keypoints: 28.5M parameters."""
    model = build_heatmap_model(3, SMALL, "hrnet_w32", "hrnet")
    assert abs(_with_17_channels(model) - 28.5e6) / 28.5e6 < 0.01
    _check_outputs(model, "hrnet")
    assert infer_architecture(model)["head"] == "hrnet"
    loss, changed = _one_step(model, "hrnet", refine="ohkm")
    # the last module's lower-resolution fusions feed nothing and are not in the model
    assert np.isfinite(loss) and loss > 0 and changed == 1.0


def test_mobilenetv2_trunk_with_width_multiplier_trains_simple_baseline():
    trunk = keras.applications.MobileNetV2(include_top=False, weights=None, alpha=0.35)
    assert trunk.count_params() == 410_208  # keras.applications' published no-top figure
    model = build_heatmap_model(3, SMALL, "mobilenetv2", "simple_baseline", alpha=0.35,
                                head_channels=32)  # fmt: skip
    _check_outputs(model, "simple_baseline")
    assert infer_architecture(model)["alpha"] == 0.35
    loss, changed = _one_step(model, "simple_baseline")
    assert np.isfinite(loss) and loss > 0 and changed > 0.9


def test_efficientnetb0_trunk_trains_cpn():
    model = build_heatmap_model(3, SMALL, "efficientnetb0", "cpn", head_channels=16)
    _check_outputs(model, "cpn")
    trunk = keras.applications.EfficientNetB0(include_top=False, weights=None)
    assert trunk.count_params() == 4_049_571  # keras.applications' published no-top figure
    loss, changed = _one_step(model, "cpn")
    assert np.isfinite(loss) and loss > 0 and changed > 0.9


@pytest.mark.slow
def test_hrnet_branches_feed_cpn():
    model = build_heatmap_model(3, SMALL, "hrnet_w32", "cpn", head_channels=16)
    _check_outputs(model, "cpn")
    assert infer_architecture(model)["backbone"] == "hrnet_w32"
    loss, changed = _one_step(model, "cpn")
    assert np.isfinite(loss) and loss > 0 and changed > 0.9


def test_bad_head_backbone_and_alpha_are_refused():
    with pytest.raises(ValueError, match="head 'hrnet' reads an HRNet"):
        build_heatmap_model(3, SMALL, "tiny", "hrnet")
    with pytest.raises(ValueError, match="unknown head"):
        build_heatmap_model(3, SMALL, "tiny", "deeplab")
    with pytest.raises(ValueError, match="alpha applies to mobilenetv2 only"):
        build_heatmap_model(3, SMALL, "resnet50", "cpn", alpha=0.5)


# --------------------------------------------------------------------------- weights
@pytest.mark.parametrize(("backbone", "alpha", "file"), [
    ("mobilenetv2", 0.35, "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_0.35_224_no_top.h5"),
    ("efficientnetb0", 1.0, "efficientnetb0_notop.h5"),
])  # fmt: skip
def test_light_trunk_imagenet_offline_fails_fast(tmp_path, monkeypatch, backbone, alpha, file):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    with pytest.raises(BackboneWeightsError, match=f"--set model.backbone_weights=/path/to/{file}"):
        build_heatmap_model(3, SMALL, backbone, "simple_baseline", "imagenet", alpha=alpha)
    assert imagenet_cache_path(backbone, alpha).name == file
    with pytest.raises(BackboneWeightsError, match="no ImageNet weights"):
        resolve_weights("hrnet_w32", "imagenet")
    with pytest.raises(BackboneWeightsError, match="alpha in"):
        resolve_weights("mobilenetv2", "imagenet", 0.6)


def test_mobilenetv2_imagenet_file_is_loaded_into_the_trunk(tmp_path):
    """A keras-applications no-top file (legacy HDF5) given as a local path."""
    import h5py
    from keras.src.legacy.saving import legacy_h5_format as legacy

    app = keras.applications.MobileNetV2(include_top=False, weights=None, alpha=0.35,
                                         input_shape=(None, None, 3))  # fmt: skip
    rng = np.random.default_rng(5)
    for var in app.weights:
        var.assign(rng.normal(size=var.shape).astype(np.float32))
    path = tmp_path / "mobilenet_v2_notop.h5"
    with h5py.File(path, "w") as f:
        legacy.save_weights_to_hdf5_group(f, app)
    model = build_heatmap_model(3, SMALL, "mobilenetv2", "simple_baseline", str(path), alpha=0.35)
    for name in ("Conv1", "block_16_project_BN"):
        for a, b in zip(model.get_layer(name).get_weights(), app.get_layer(name).get_weights(),
                        strict=True):  # fmt: skip
            np.testing.assert_array_equal(a, b)


def test_efficientnet_imagenet_file_normalises_like_keras_download(tmp_path):
    """keras-applications files store the std as the variance; kpnet squares it on load."""
    import h5py
    from keras.src.legacy.saving import legacy_h5_format as legacy

    app = keras.applications.EfficientNetB0(include_top=False, weights=None)
    norm = next(la for la in app.layers if isinstance(la, keras.layers.Normalization))
    std = np.array([0.229, 0.224, 0.225], np.float32)
    norm.adapt_mean.assign([0.485, 0.456, 0.406])
    norm.adapt_variance.assign(std)  # what the published file holds
    path = tmp_path / "efficientnetb0_notop.h5"
    with h5py.File(path, "w") as f:
        legacy.save_weights_to_hdf5_group(f, app)
    model = build_heatmap_model(3, SMALL, "efficientnetb0", "cpn", str(path), head_channels=16)
    loaded = next(la for la in model.layers if isinstance(la, keras.layers.Normalization))
    np.testing.assert_allclose(np.asarray(loaded.adapt_variance), std**2, rtol=1e-6)
    white = loaded(np.ones((1, 1, 1, 3), np.float32))  # after Rescaling(1/255): 255 -> 1
    np.testing.assert_allclose(np.asarray(white)[0, 0, 0], (1 - norm.adapt_mean.numpy()) / std,
                               rtol=1e-5)  # fmt: skip


# --------------------------------------------------------------------------- retarget
def test_retarget_single_head_keeps_trunk_and_reinitialises_the_final_conv():
    source = build_heatmap_model(17, SMALL, "mobilenetv2", "simple_baseline", alpha=0.35,
                                 head_channels=32)  # fmt: skip
    rng = np.random.default_rng(4)
    for var in source.weights:
        var.assign(rng.normal(size=var.shape).astype(np.float32))
    target, report = retarget(source, 5)
    assert infer_architecture(target) == {**infer_architecture(source), "num_channels": 5}
    assert report.reinitialized == ["refine_head_conv"] and not report.missing
    for name in ("Conv1", "block_16_project", "simple_deconv3_conv", "simple_deconv3_bn"):
        for a, b in zip(target.get_layer(name).get_weights(),
                        source.get_layer(name).get_weights(), strict=True):  # fmt: skip
            np.testing.assert_array_equal(a, b)


def test_cpn_initialises_a_simple_baseline_trunk():
    """``model.init_from`` across heads: the trunk is copied, the new head starts fresh."""
    source = build_cpn(17, SMALL, backbone="tiny", pyramid_channels=16)
    target = build_heatmap_model(3, SMALL, "tiny", "simple_baseline", head_channels=16)
    report = transfer_weights(source, target)
    assert "tiny_stem_conv" in report.loaded and "tiny_c5_conv2_bn" in report.loaded
    assert "simple_deconv1_conv" in report.missing
    assert "refine_head_conv" in report.reinitialized


# --------------------------------------------------------------------------- recipes
@pytest.mark.parametrize(("overrides", "key", "message"), [
    (["model.backbone=tiny", "model.head=hrnet"], "model.head", "reads an HRNet"),
    (["model.backbone=resnet50", "model.alpha=0.5"], "model.alpha", "mobilenetv2 only"),
    (["model.backbone=hrnet_w32", "model.backbone_weights=imagenet"], "model.backbone_weights",
     "no ImageNet weights"),
    (["model.backbone=mobilenetv2", "model.alpha=0.6", "model.backbone_weights=imagenet"],
     "model.backbone_weights", "alpha in"),
    (["model.head=simple"], "model.head", "simple_baseline"),
])  # fmt: skip
def test_recipe_errors_name_the_key(tmp_path, overrides, key, message):
    path = tmp_path / "r.yaml"
    path.write_text("data: {source: synthetic_pins, synthetic_pins: {cache_dir: c}}")
    with pytest.raises(RecipeError) as err:
        load_recipe(path, overrides)
    text = str(err.value)
    assert f"{key}: " in text and message in text and "\n" not in text.strip(), text


# --------------------------------------------------------------------------- export
def test_single_head_saved_model_matches_kpnet_predict(tmp_path):
    """A SimpleBaseline run folder: the SavedModel and ``kpnet predict`` give one answer."""
    keras.utils.set_random_seed(7)
    model = build_heatmap_model(3, (96, 64, 3), "tiny", "simple_baseline", head_channels=16)
    kernel, bias = model.get_layer("refine_head_conv").get_weights()  # structured maps
    rng = np.random.default_rng(0)
    model.get_layer("refine_head_conv").set_weights(
        [rng.normal(0, 0.2, kernel.shape).astype(np.float32), bias])
    run = tmp_path / "run"
    run.mkdir()
    model.save(run / "best.keras")
    (run / "spec.json").write_text(json.dumps(SPEC.to_dict()))
    image = rng.integers(0, 256, (150, 100, 3)).astype(np.uint8)
    image_file = tmp_path / "3.png"
    cv2.imwrite(str(image_file), image[..., ::-1])
    runner = CliRunner()
    sm = tmp_path / "sm"
    res = runner.invoke(main, ["export", str(run), "-o", str(sm)])
    assert res.exit_code == 0, res.output
    out = tmp_path / "pred.json"
    res = runner.invoke(main, ["predict", str(run), str(image_file), "-o", str(out)])
    assert res.exit_code == 0, res.output
    [pred] = json.loads(out.read_text())
    cli = np.array(pred["keypoints"]).reshape(-1, 3)
    import tensorflow as tf

    served = tf.saved_model.load(str(sm)).signatures["whole_image"](images=image[None])
    np.testing.assert_allclose(served["keypoints"].numpy()[0], cli[:, :2], atol=0.01)
    np.testing.assert_allclose(served["scores"].numpy()[0], cli[:, 2], atol=0.002)


# --------------------------------------------------------------------------- JAX
JAX_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import keras
    import numpy as np
    from kpnet.losses import build_losses
    from kpnet.models import build_heatmap_model, head_outputs
    from kpnet.spec import KeypointSpec

    spec = KeypointSpec(names=("a", "b", "c"))
    backbone, head, kwargs = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    model = build_heatmap_model(3, (64, 64, 3), backbone, head, **kwargs)
    losses, weights = build_losses(spec, "l2", outputs=head_outputs(head))
    model.compile(keras.optimizers.Adam(1e-3), loss=losses, loss_weights=weights)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (2, 64, 64, 3)).astype("uint8")
    kp = np.concatenate([rng.uniform(1, 14, (2, 3, 2)), np.full((2, 3, 1), 2.0)], -1)
    before = [np.array(v) for v in model.trainable_weights]
    logs = model.train_on_batch(images, {n: kp.astype("float32") for n in model.output},
                                return_dict=True)
    changed = np.mean([not np.array_equal(b, np.array(v))
                       for b, v in zip(before, model.trainable_weights)])
    print("RESULT" + json.dumps({"backend": keras.backend.backend(), "loss": float(logs["loss"]),
                                 "changed": float(changed), "params": model.count_params()}))
    """
)


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("jax") is None, reason="optional dependency not installed: jax"
)
@pytest.mark.parametrize(("backbone", "head", "kwargs"), [
    ("mobilenetv2", "simple_baseline", {"alpha": 0.35, "head_channels": 32}),
    ("efficientnetb0", "cpn", {"head_channels": 16}),
    ("hrnet_w32", "hrnet", {}),
])  # fmt: skip
def test_heads_and_trunks_train_one_step_under_jax(backbone, head, kwargs):
    flags = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
    env = {**os.environ, "KERAS_BACKEND": "jax", "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} {flags}".strip()}  # fmt: skip
    proc = subprocess.run(
        [sys.executable, "-c", JAX_SCRIPT, backbone, head, json.dumps(kwargs)],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT"))
    result = json.loads(line[len("RESULT"):])
    tf_model = build_heatmap_model(3, (64, 64, 3), backbone, head, **kwargs)
    assert result["backend"] == "jax" and result["params"] == tf_model.count_params()
    assert np.isfinite(result["loss"]) and result["loss"] > 0 and result["changed"] > 0.9
