"""The keypoints model: in-graph decoding, shared channels, flip test, save/load, drawing."""

from __future__ import annotations

import json

import keras
import numpy as np
import pytest

from kpnet import codec
from kpnet.inference import (
    KeypointDecoder,
    build_keypoints_model,
    draw_keypoints,
    heatmap_overlay,
    load_model,
)
from kpnet.models import build_cpn
from kpnet.spec import KeypointSpec, SpecError

PINS = KeypointSpec(names=("pin_a", "pin_b", "tip"), channel_map=(0, 0, 1))
MIRROR = KeypointSpec(names=("nose", "left", "right"), flip_pairs=((1, 2),), skeleton=((1, 2),))


def _small_heatmap_model(num_channels: int, input_shape=(64, 48, 3), seed: int = 0):
    """A fast stand-in for CPN: stride 4, dict outputs keyed by codec.OUTPUT_NAMES."""
    keras.utils.set_random_seed(seed)
    images = keras.Input(input_shape)
    x = keras.layers.Rescaling(1.0 / 255.0)(images)
    x = keras.layers.Conv2D(8, 3, strides=2, padding="same", activation="relu")(x)
    x = keras.layers.Conv2D(8, 3, strides=2, padding="same", activation="relu")(x)
    outputs = {n: keras.layers.Conv2D(num_channels, 3, padding="same", name=n)(x)
               for n in codec.OUTPUT_NAMES}  # fmt: skip
    return keras.Model(images, outputs, name="small_cpn")


def _blob_model(input_shape=(128, 96, 3)):
    """Heatmap = 4x4 average of the red channel: exactly mirror-equivariant, stride 4."""
    images = keras.Input(input_shape)
    x = keras.layers.AveragePooling2D(4)(images)
    red = keras.layers.Conv2D(1, 1, use_bias=False, name="refine")
    out = red(x)
    red.set_weights([np.array([1.0, 0.0, 0.0], np.float32).reshape(1, 1, 3, 1) / 255.0])
    return keras.Model(images, {"refine": out})


def _blob_image(center, shape=(128, 96), sigma=8.0) -> np.ndarray:
    ys, xs = np.mgrid[: shape[0], : shape[1]].astype(np.float32)
    g = np.exp(-((xs - center[0]) ** 2 + (ys - center[1]) ** 2) / (2 * sigma**2))
    img = np.zeros((*shape, 3), np.float32)
    img[..., 0] = 255.0 * g
    return img[None]


# --------------------------------------------------------------------------- decoder layer
def test_decoder_puts_keypoints_where_rendered_in_input_pixels():
    spec = KeypointSpec(names=("a", "b", "c"))
    hm_codec = codec.Codec((256, 192), stride=4, refine_sigma=2.0)
    kp = np.array([[[37.3, 101.9, 2], [150.0, 220.6, 2], [2.0, 3.0, 2]]], np.float32)
    out = KeypointDecoder(spec, hm_codec)(hm_codec.encode(kp))
    np.testing.assert_allclose(np.asarray(out["keypoints"]), kp[..., :2], atol=0.02)
    assert np.asarray(out["scores"]).shape == (1, 3) and np.all(np.asarray(out["scores"]) > 0.9)


def test_decoder_hands_shared_channel_peaks_to_its_keypoints_by_score():
    hm_codec = codec.Codec((256, 192), stride=4, refine_sigma=2.0)
    kp = np.array([[[41.5, 61.5, 2], [141.5, 201.5, 2], [101.5, 101.5, 2]]], np.float32)
    hm = np.asarray(hm_codec.encode(kp, channels=PINS.channels)).copy()
    hm[:, :32, :, 0] *= 0.6  # the first pin is the weaker peak: it comes second
    out = KeypointDecoder(PINS.to_dict(), hm_codec.to_dict())(hm)
    xy, scores = np.asarray(out["keypoints"]), np.asarray(out["scores"])
    np.testing.assert_allclose(xy[0], [[141.5, 201.5], [41.5, 61.5], [101.5, 101.5]], atol=0.05)
    np.testing.assert_allclose(scores[0], [1.0, 0.6, 1.0], atol=1e-3)
    # one pin missing: its keypoint gets score 0
    hm[:, 32:, :, 0] = 0.0
    scores = np.asarray(KeypointDecoder(PINS, hm_codec)(hm)["scores"])
    np.testing.assert_allclose(scores[0], [0.6, 0.0, 1.0], atol=1e-3)


def test_decoder_config_round_trip_and_bad_options():
    c = codec.Codec((64, 48), method="quarter", max_peaks=3, threshold=0.2)
    layer = KeypointDecoder(PINS, c)
    clone = KeypointDecoder.from_config(layer.get_config())
    assert clone.get_config() == layer.get_config()
    assert clone.spec == PINS and clone.codec == c
    with pytest.raises(ValueError, match="max_peaks=1"):
        KeypointDecoder(PINS, c.replace(max_peaks=1))
    with pytest.raises(ValueError, match="method"):
        KeypointDecoder(PINS, {**c.to_dict(), "method": "soft"})
    # files of kpnet 0.1 stored the decode options one by one
    legacy = KeypointDecoder.from_config({"spec": PINS.to_dict(), "stride": 4, "sigma": 2.0,
                                          "method": "argmax", "name": "decode"})  # fmt: skip
    assert legacy.codec.refine_sigma == 2.0 and legacy.codec.method == "argmax"


@pytest.mark.slow  # over 25 s on 2 cores
def test_mixed_precision_model_decodes_in_float32(tmp_path):
    """Trained a step under mixed_float16, the keypoints model still decodes in float32:
    two pins of one channel at half-pixel positions, 1e-4 apart in height, both survive."""
    from kpnet.losses import build_losses

    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        cpn = build_cpn(PINS.num_channels, input_shape=(64, 64, 3), backbone="tiny",
                        pyramid_channels=8)  # fmt: skip
        losses, weights = build_losses(PINS)
        cpn.compile(optimizer="adam", loss=losses, loss_weights=weights)
        kp = np.array([[[10.0, 20.0, 2], [40.0, 30.0, 2], [30.0, 50.0, 2]]] * 2, np.float32)
        cpn.train_on_batch(np.zeros((2, 64, 64, 3), np.uint8), {n: kp for n in codec.OUTPUT_NAMES})
        model = build_keypoints_model(cpn, PINS, codec.Codec((64, 64), flip_test=True))
        for name in ("decode", "flip_images", "unflip_heatmaps", "flip_average"):
            assert model.get_layer(name).compute_dtype == "float32", name
        decoder = model.get_layer("decode")
        pins = np.array([[[3.5, 4.0, 2], [10.5, 12.0, 2], [0.0, 0.0, 0]]], np.float32)
        hm = np.array(codec.render_heatmaps(pins, (16, 16), 1.4, PINS.channels, 2))
        hm[:, 8:, :, 0] *= 1.0 - 1e-4  # in float16 the two pins' heights would tie
        out = decoder(hm)
        assert out["keypoints"].dtype == "float32"
        xy = np.asarray(out["keypoints"])[0]
        expected = codec.heatmap_to_input(pins[0, :2, :2], 4)
        np.testing.assert_allclose(xy[:2], expected, atol=0.05)
        assert (np.asarray(out["scores"])[0, :2] > 0.9).all()
    finally:
        keras.mixed_precision.set_global_policy(previous)


# --------------------------------------------------------------------------- keypoints model
def test_keypoints_model_end_to_end_lands_on_the_blob():
    spec = KeypointSpec(names=("blob",))
    model = build_keypoints_model(_blob_model(), spec, method="dark", sigma=2.0)
    out = model.predict(_blob_image((50.3, 70.6)), verbose=0)
    assert out["keypoints"].dtype == np.float32 and out["keypoints"].shape == (1, 1, 2)
    np.testing.assert_allclose(out["keypoints"][0, 0], (50.3, 70.6), atol=0.1)
    assert model.get_layer("heatmaps").output["refine"].shape[1:] == (32, 24, 1)


def test_flip_test_needs_no_pixel_shift():
    """With pixel centres at integers the exact mirror of the heatmap needs no shift."""
    spec = KeypointSpec(names=("blob",))
    image = _blob_image((30.7, 90.2))
    plain = build_keypoints_model(_blob_model(), spec, sigma=2.0).predict(image, verbose=0)
    flip = build_keypoints_model(_blob_model(), spec, sigma=2.0, flip_test=True)
    out = flip.predict(image, verbose=0)
    np.testing.assert_allclose(out["keypoints"], plain["keypoints"], atol=1e-3)
    np.testing.assert_allclose(out["scores"], plain["scores"], atol=1e-5)


def test_flip_test_on_mirror_symmetric_input_gives_mirrored_pairs():
    model = build_keypoints_model(_small_heatmap_model(3), MIRROR, flip_test=True)
    rng = np.random.default_rng(0)
    half = rng.integers(0, 255, (2, 64, 24, 3)).astype(np.float32)
    images = np.concatenate([half, half[:, :, ::-1]], axis=2)  # mirror-symmetric
    out = model.predict(images, verbose=0)
    left, right = out["keypoints"][:, 1], out["keypoints"][:, 2]
    np.testing.assert_allclose(left[:, 0], 47.0 - right[:, 0], atol=1e-3)  # x -> W - 1 - x
    np.testing.assert_allclose(left[:, 1], right[:, 1], atol=1e-3)
    np.testing.assert_allclose(out["scores"][:, 1], out["scores"][:, 2], atol=1e-5)


def test_channel_mismatch_is_a_spec_error():
    with pytest.raises(SpecError, match="outputs 2 channels"):
        build_keypoints_model(_small_heatmap_model(2), MIRROR)


def test_save_load_round_trip_safe_mode(tmp_path):
    model = build_keypoints_model(_small_heatmap_model(2), PINS, flip_test=True, threshold=0.0)
    images = np.random.default_rng(1).integers(0, 255, (2, 64, 48, 3)).astype(np.uint8)
    expected = model.predict(images, verbose=0)
    path = tmp_path / "keypoints.keras"
    model.save(path)
    reloaded = keras.saving.load_model(path, safe_mode=True)
    got = reloaded.predict(images, verbose=0)
    np.testing.assert_array_equal(got["keypoints"], expected["keypoints"])
    np.testing.assert_array_equal(got["scores"], expected["scores"])
    assert isinstance(reloaded.get_layer("decode"), KeypointDecoder)
    rewrapped = load_model(path, method="argmax")
    argmax = rewrapped.predict(images, verbose=0)["keypoints"]
    np.testing.assert_array_equal(argmax % 4, np.full_like(argmax, 1.5))  # pixel centres
    assert rewrapped.get_layer("decode").codec.threshold == 0.0  # other options kept
    assert rewrapped.get_layer("flip_average") is not None


def test_load_model_wraps_a_heatmap_model_with_spec_json(tmp_path):
    heatmap_model = _small_heatmap_model(3)
    path = tmp_path / "heatmaps.keras"
    heatmap_model.save(path)
    with pytest.raises(SpecError, match="spec.json"):
        load_model(path)
    (tmp_path / "spec.json").write_text(json.dumps(MIRROR.to_dict()))
    images = np.full((1, 64, 48, 3), 128, np.uint8)
    from_file = load_model(path, method="quarter").predict(images, verbose=0)
    direct = build_keypoints_model(heatmap_model, MIRROR, method="quarter")
    np.testing.assert_allclose(from_file["keypoints"], direct.predict(images, verbose=0)[
        "keypoints"])  # fmt: skip
    with pytest.raises(FileNotFoundError, match="no model file"):
        load_model(tmp_path / "missing.keras")


@pytest.mark.slow
def test_tiny_cpn_keypoints_model_round_trip(tmp_path):
    cpn = build_cpn(PINS.num_channels, input_shape=(64, 64, 3), backbone="tiny")
    model = build_keypoints_model(cpn, PINS, flip_test=True)
    images = np.random.default_rng(2).integers(0, 255, (2, 64, 64, 3)).astype(np.uint8)
    expected = model.predict(images, verbose=0)
    model.save(tmp_path / "cpn.keras")
    got = load_model(tmp_path / "cpn.keras").predict(images, verbose=0)
    np.testing.assert_array_equal(got["keypoints"], expected["keypoints"])
    assert got["keypoints"].shape == (2, 3, 2)


# --------------------------------------------------------------------------- drawing
def test_draw_keypoints_draws_points_and_limbs_above_threshold():
    image = np.zeros((40, 60, 3), np.uint8)
    kp = np.array([[30.0, 20.0], [10.0, 10.0], [50.0, 10.0]])
    out = draw_keypoints(image, kp, np.array([0.9, 0.9, 0.9]), MIRROR, radius=2)
    assert out[20, 30].any() and out[10, 10].any() and out[10, 30].any()  # limb 1-2
    assert not image.any()  # input untouched
    low = draw_keypoints(image, kp, np.array([0.9, 0.9, 0.1]), MIRROR, threshold=0.5)
    assert low[10, 10].any() and not low[10, 50].any() and not low[10, 30].any()
    with pytest.raises(ValueError, match="spec with 3"):
        draw_keypoints(image, kp[:2], np.ones(2), KeypointSpec(names=("a", "b", "c")))


def test_heatmap_overlay_is_hot_at_the_peak():
    image = np.zeros((64, 48, 3), np.uint8)
    hm = np.asarray(codec.render_heatmaps(np.array([[[5.0, 3.0, 2]]]), (16, 12), 1.0))[0]
    out = heatmap_overlay(image, hm, alpha=1.0)
    assert out.shape == image.shape and out.dtype == np.uint8
    peak = out[13, 21]  # heatmap (5, 3) -> input (21.5, 13.5)
    assert peak[0] > 100 and peak[0] > peak[2]  # JET: red at 1.0
    assert out[60, 2, 2] > out[60, 2, 0]  # blue far away
