"""CPN model: shapes, dtypes, parameter count, backbone weights and re-targeting."""

from __future__ import annotations

import time

import keras
import numpy as np
import pytest

import kpnet  # noqa: F401  (sets TF log level)
from kpnet.codec import OUTPUT_NAMES
from kpnet.models import BackboneWeightsError, build_backbone, build_cpn, retarget
from kpnet.models import backbones as backbones_module
from kpnet.models.backbones import Preprocess, imagenet_cache_path
from kpnet.models.cpn import HEAD_BN_SCALE
from kpnet.models.retarget import infer_architecture, transfer_weights


def tiny(num_channels: int = 3, input_shape=(64, 64, 3), **kwargs) -> keras.Model:
    return build_cpn(num_channels, input_shape, backbone="tiny", pyramid_channels=32, **kwargs)


@pytest.fixture
def float_policy():
    yield
    keras.mixed_precision.set_global_policy("float32")


# --------------------------------------------------------------------------- shapes
@pytest.mark.parametrize("input_shape", [(256, 192, 3), (384, 288, 3)])
def test_tiny_cpn_output_dict_shapes(input_shape):
    model = tiny(5, input_shape)
    images = np.random.default_rng(0).integers(0, 256, (2, *input_shape), dtype=np.uint8)
    out = model(images, training=False)
    assert list(out) == list(OUTPUT_NAMES)
    expected = (2, input_shape[0] // 4, input_shape[1] // 4, 5)
    for value in out.values():
        assert tuple(value.shape) == expected
        assert keras.backend.standardize_dtype(value.dtype) == "float32"
        assert np.all(np.isfinite(np.asarray(value)))
    # uint8 and float inputs give the same result (the model casts inside)
    again = model(images.astype(np.float32), training=False)
    np.testing.assert_allclose(np.asarray(again["refine"]), np.asarray(out["refine"]), atol=1e-5)


def test_outputs_are_float32_under_mixed_precision(float_policy):
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    model = tiny(2)
    out = model(np.zeros((1, 64, 64, 3), np.uint8))
    assert model.get_layer("refine_head_conv").compute_dtype == "bfloat16"
    assert {keras.backend.standardize_dtype(v.dtype) for v in out.values()} == {"float32"}


def test_bad_input_shape_and_channels():
    with pytest.raises(ValueError, match="divisible by 32"):
        build_cpn(2, (100, 64, 3), backbone="tiny")
    with pytest.raises(ValueError, match="unknown backbone"):
        build_cpn(2, (64, 64, 3), backbone="vgg")
    with pytest.raises(ValueError, match="num_channels"):
        build_cpn(0, (64, 64, 3), backbone="tiny")


def test_resnet50_parameter_count_matches_reference_cpn():
    model = build_cpn(17, (256, 192, 3), backbone="resnet50")
    assert abs(model.count_params() - 27_406_826) / 27_406_826 < 0.01
    names = {layer.name for layer in model.layers}
    assert {"conv2_block3_out", "conv5_block3_out", "refine_final_block_out"} <= names


def test_resnet101_cpn_differs_from_resnet50_by_the_trunk_alone():
    """Same GlobalNet / RefineNet on C2..C5 of the deeper trunk: only the trunk grows."""
    cpn50 = build_cpn(17, (128, 96, 3), backbone="resnet50")
    cpn101 = build_cpn(17, (128, 96, 3), backbone="resnet101")
    trunk = keras.applications.ResNet101(include_top=False, weights=None).count_params()
    trunk -= keras.applications.ResNet50(include_top=False, weights=None).count_params()
    assert cpn101.count_params() - cpn50.count_params() == trunk == 19_070_464
    assert "conv4_block23_out" in {layer.name for layer in cpn101.layers}
    assert infer_architecture(cpn101)["backbone"] == "resnet101"
    out = cpn101(np.zeros((1, 128, 96, 3), np.float32))
    assert tuple(out["refine"].shape) == (1, 32, 24, 17)


def test_caffe_preprocessing_matches_keras_applications():
    images = np.random.default_rng(1).uniform(0, 255, (2, 4, 4, 3)).astype(np.float32)
    expected = keras.applications.resnet.preprocess_input(images.copy())
    np.testing.assert_allclose(np.asarray(Preprocess("caffe")(images)), expected, atol=1e-4)
    np.testing.assert_allclose(
        np.asarray(Preprocess("scale")(images)), images / 127.5 - 1, atol=1e-6
    )


def test_keras_file_round_trip_safe_mode(tmp_path):
    model = tiny(2)
    path = tmp_path / "cpn.keras"
    model.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    x = np.random.default_rng(2).integers(0, 256, (1, 64, 64, 3)).astype(np.uint8)
    np.testing.assert_allclose(
        np.asarray(loaded(x)["refine"]), np.asarray(model(x)["refine"]), atol=1e-5
    )


# --------------------------------------------------------------------------- weights
def test_imagenet_offline_fails_fast_with_instructions(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    start = time.perf_counter()
    with pytest.raises(BackboneWeightsError, match="backbone_weights=/path/to/resnet50_"):
        build_cpn(17, backbone="resnet50", backbone_weights="imagenet")
    assert time.perf_counter() - start < 2.0  # nothing built, nothing downloaded


def test_imagenet_uses_keras_cache_file(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    cached = imagenet_cache_path("resnet101")
    assert cached.name == "resnet101_weights_tf_dim_ordering_tf_kernels_notop.h5"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"")
    assert backbones_module.resolve_weights("resnet101", "imagenet") == str(cached)
    with pytest.raises(BackboneWeightsError, match="no ImageNet weights"):
        backbones_module.resolve_weights("tiny", "imagenet")


def test_imagenet_cache_file_is_loaded_into_the_trunk(tmp_path, monkeypatch):
    import h5py  # a dependency of keras, as is its legacy HDF5 writer
    from keras.src.legacy.saving import legacy_h5_format as legacy
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    app = keras.applications.ResNet50(include_top=False, weights=None, input_shape=(None, None, 3))
    _randomise(app)
    cached = imagenet_cache_path("resnet50")
    cached.parent.mkdir(parents=True)
    with h5py.File(cached, "w") as f:  # the keras-applications notop file format
        legacy.save_weights_to_hdf5_group(f, app)
    model = build_cpn(17, backbone="resnet50", backbone_weights="imagenet")
    for name in ("conv1_conv", "conv5_block3_3_bn"):
        for a, b in zip(
            model.get_layer(name).get_weights(), app.get_layer(name).get_weights(), strict=True
        ):
            np.testing.assert_array_equal(a, b)


def test_missing_local_weights_file_is_named(tmp_path):
    missing = tmp_path / "resnet50_notop.h5"
    with pytest.raises(BackboneWeightsError, match="resnet50_notop.h5.*does not exist"):
        build_cpn(17, backbone="resnet50", backbone_weights=missing)


def test_tiny_backbone_weights_file_is_loaded(tmp_path):
    images = keras.Input((64, 64, 3))
    trunk = keras.Model(images, build_backbone("tiny", images), name="tiny_backbone")
    for var in trunk.weights:
        var.assign(np.random.default_rng(3).normal(size=var.shape).astype(np.float32))
    path = tmp_path / "tiny_backbone.weights.h5"
    trunk.save_weights(path)
    model = tiny(2, backbone_weights=str(path))
    for name in ("tiny_stem_conv", "tiny_c5_conv2_bn"):
        for a, b in zip(
            model.get_layer(name).get_weights(), trunk.get_layer(name).get_weights(), strict=True
        ):
            np.testing.assert_array_equal(a, b)


# --------------------------------------------------------------------------- retarget
HEADS = {f"{out}_head_{part}" for out in OUTPUT_NAMES for part in ("conv", "bn")}


def _randomise(model: keras.Model) -> None:
    rng = np.random.default_rng(4)
    for var in model.weights:
        var.assign(rng.normal(size=var.shape).astype(np.float32))


def _assert_trunk_equal(source: keras.Model, target: keras.Model) -> None:
    compared = 0
    for layer in target.layers:
        if layer.weights and layer.name not in HEADS:
            for a, b in zip(
                layer.get_weights(), source.get_layer(layer.name).get_weights(), strict=True
            ):
                np.testing.assert_array_equal(a, b)
                compared += 1
    assert compared > 100


def test_retarget_17_to_5_keeps_trunk_and_reinitialises_heads():
    source = tiny(17)
    _randomise(source)
    target, report = retarget(source, 5)
    assert target.output["refine"].shape[-1] == 5
    assert infer_architecture(target) == {**infer_architecture(source), "num_channels": 5}
    _assert_trunk_equal(source, target)
    assert set(report.reinitialized) == HEADS and not report.missing
    assert len(report.loaded) + len(HEADS) == sum(1 for la in target.layers if la.weights)
    head = target.get_layer("refine_head_bn").get_weights()
    np.testing.assert_allclose(head[0], np.full(5, HEAD_BN_SCALE), rtol=1e-6)  # fresh gamma
    assert "re-initialised (shape mismatch): 10 layers" in report.summary()


@pytest.mark.parametrize("suffix", [".keras", ".weights.h5"])
def test_retarget_from_file(tmp_path, suffix):
    source = tiny(17)
    _randomise(source)
    path = tmp_path / f"source{suffix}"
    source.save(path) if suffix == ".keras" else source.save_weights(path)
    target, report = retarget(path, 2, input_shape=(64, 64, 3))
    _assert_trunk_equal(source, target)
    assert set(report.reinitialized) == HEADS


def test_transfer_weights_reports_missing_layers():
    source = tiny(4)
    target = build_cpn(4, (64, 64, 3), backbone="tiny", pyramid_channels=64)
    report = transfer_weights(source, target)
    assert "tiny_stem_conv" in report.loaded  # backbone unchanged
    assert "global_lateral_p2_conv" in report.reinitialized  # wider pyramid
    with pytest.raises(FileNotFoundError, match="nowhere.keras"):
        retarget("/nonexistent/nowhere.keras", 2)
