"""The SavedModel's signatures check their inputs in the graph (issue 24): loaded as TF Serving
loads it (``tf.saved_model.load`` + ``signatures``), a bad request fails with one message
naming the input, odd but usable ones are converted or flagged, never silently wrong."""

from __future__ import annotations

import re

import numpy as np
import pytest
import tensorflow as tf
from _blobs import blob_image, save_blob_model

from kpnet.export import INVALID_XY, MAX_PIXELS, export_saved_model
from kpnet.spec import KeypointSpec

INPUT = (96, 64)  # (H, W) of the model input
SPEC = KeypointSpec(names=("red", "green", "blue"), flip_pairs=((0, 1),), skeleton=((0, 1),))
POINTS = np.array([[150.4, 120.2], [210.7, 180.9], [170.0, 60.5]], np.float32)
IMAGE = blob_image(POINTS, (300, 400), 14.0)  # H 300, W 400
BOX = [120.0, 40.0, 130.0, 170.0]  # around the three blobs


@pytest.fixture(scope="module")
def signatures(tmp_path_factory):
    """The signatures of one exported blob-finding model (its ``loaded`` kept alive)."""
    tmp = tmp_path_factory.mktemp("serving")
    model = save_blob_model(tmp / "blobs.keras", SPEC, INPUT)
    loaded = tf.saved_model.load(str(export_saved_model(model, tmp / "sm" / "1")))
    yield loaded.signatures
    del loaded


def _serve(signatures, images, boxes):
    boxes = tf.constant(np.asarray(boxes, np.float32))
    out = signatures["serving_default"](images=tf.constant(images), boxes=boxes)
    return {k: v.numpy() for k, v in out.items()}


def _refused(fn, message: str, **inputs) -> str:
    """The InvalidArgumentError ``fn(**inputs)`` raises; ``message`` is in it."""
    with pytest.raises(tf.errors.InvalidArgumentError, match=re.escape(message)) as err:
        fn(**{k: tf.constant(v) for k, v in inputs.items()})
    return str(err.value)


# --------------------------------------------------------------------------- images
def test_grey_and_rgba_images_are_converted_as_opencv_users_expect(signatures):
    """Grey is replicated to RGB, RGBA loses its alpha: the keypoints of the RGB image."""
    grey = IMAGE[..., :1]
    rgba = np.concatenate([IMAGE, np.full_like(grey, 7)], -1)
    expected_grey = _serve(signatures, np.repeat(grey, 3, -1)[None], [BOX])
    rgb = _serve(signatures, IMAGE[None], [BOX])
    for image, expected in ((grey, expected_grey), (rgba, rgb)):
        out = _serve(signatures, image[None], [BOX])
        np.testing.assert_allclose(out["keypoints"], expected["keypoints"], atol=1e-4)
        np.testing.assert_allclose(out["scores"], expected["scores"], atol=1e-6)
    np.testing.assert_allclose(rgb["keypoints"][0], POINTS, atol=0.6)


@pytest.mark.parametrize("channels", [2, 5])
def test_images_with_other_channel_counts_are_refused_naming_images(signatures, channels):
    images = np.zeros((1, 40, 50, channels), np.uint8)
    _refused(signatures["whole_image"], f"images must have 3 channels (RGB; 1 grey or 4 RGBA "
             f"are converted): got shape [1 40 50 {channels}]", images=images)  # fmt: skip


def test_an_image_without_its_batch_axis_is_blamed_on_images_not_boxes(signatures):
    message = _refused(signatures["serving_default"], "images must be a batch uint8 [N, H, W, 3] "
                       "(rank 4; add a batch axis for one image): got shape [300 400 3]",
                       images=IMAGE, boxes=np.array([BOX], np.float32))  # fmt: skip
    assert "one row per image" not in message


def test_images_over_the_pixel_limit_are_refused_before_any_work(signatures):
    images = tf.zeros([1, 1, MAX_PIXELS + 1, 1], tf.uint8)  # one row: 179 MB, grey
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match=f"images must have at most {MAX_PIXELS:,} pixels \\(height x "
                             f"width\\): got 1 x {MAX_PIXELS + 1}; downscale"):  # fmt: skip
        signatures["whole_image"](images=images)


def test_images_of_another_dtype_are_refused_by_tensorflow_naming_the_dtype(signatures):
    """The dtype is part of the signature: TensorFlow (and TF Serving) refuse it before the
    graph runs; its message gives the input's position and the dtype wanted."""
    with pytest.raises(tf.errors.InvalidArgumentError, match="expected to be a uint8 tensor"):
        signatures["whole_image"](images=tf.zeros([1, 40, 50, 3], tf.float32))


# --------------------------------------------------------------------------- boxes
@pytest.mark.parametrize("boxes", [np.zeros((1, 3)), np.zeros((1, 5)), np.zeros(4)],
                         ids=["N3", "N5", "flat"])  # fmt: skip
def test_boxes_of_the_wrong_shape_are_refused_naming_boxes(signatures, boxes):
    shape = " ".join(str(d) for d in boxes.shape)
    _refused(signatures["serving_default"], "boxes must have shape [N, 4] (x, y, w, h) in image "
             f"pixels: got shape [{shape}]", images=IMAGE[None], boxes=boxes.astype(np.float32))


def test_boxes_outside_the_image_are_flagged_not_clipped_to_a_corner(signatures):
    """Rows whose box misses the 400x300 image: valid false, score 0, keypoints (-1, -1);
    the other rows of the batch are untouched."""
    boxes = [
        BOX,
        [400.0, 10.0, 50.0, 50.0],  # starts at the right edge
        [-50.0, 10.0, 50.0, 50.0],  # ends at the left edge
        [10.0, 300.0, 20.0, 20.0],  # below
        [-1e6, -1e6, 10.0, 10.0],
        [0.0, 0.0, 1e30, 1e30],  # finite but absurd: 1e28 times the image
        [390.0, 290.0, 50.0, 50.0],  # overlaps the corner: cropped as usual
        [0.0, 0.0, 0.0, 0.0],  # the whole image
    ]
    out = _serve(signatures, np.repeat(IMAGE[None], len(boxes), 0), boxes)
    flagged = np.array([False, True, True, True, True, True, False, False])
    np.testing.assert_array_equal(out["valid"], ~flagged)
    assert (out["keypoints"][flagged] == INVALID_XY).all() and (out["scores"][flagged] == 0).all()
    np.testing.assert_allclose(out["keypoints"][0], POINTS, atol=0.6)
    kept = out["keypoints"][~flagged]
    assert np.isfinite(kept).all() and (kept >= 0).all() and (kept[..., 0] <= 399).all()
    assert (out["scores"][[0, 7]] > 0.3).all()


@pytest.mark.parametrize("mode", ["two_stage", "whole"])
def test_flags_follow_the_crop_mode(tmp_path, mode):
    """Two-stage models flag a box outside the image as top-down ones do; whole-frame models
    ignore boxes (every row is the whole image), so no row is flagged."""
    from kpnet.export import KeypointServingModule
    from kpnet.inference import codec_of, load_model

    model = load_model(save_blob_model(tmp_path / "blobs.keras", SPEC, INPUT))
    module = KeypointServingModule(model, SPEC, codec_of(model).replace(mode=mode))
    boxes = tf.constant([[0.0, 0.0, 0.0, 0.0], [1000.0, 0.0, 10.0, 10.0], BOX])
    out = module.serving_default(tf.constant(np.stack([IMAGE] * 3)), boxes)
    flagged = mode == "two_stage"
    np.testing.assert_array_equal(out["valid"].numpy(), [True, not flagged, True])
    assert (out["scores"].numpy()[1] == 0).all() == flagged
    np.testing.assert_allclose(out["keypoints"].numpy()[[0, 2]], [POINTS, POINTS], atol=1.5)


# --------------------------------------------------------------------------- empty batches
def test_empty_batches_return_empty_outputs(signatures):
    k = SPEC.num_keypoints
    served = _serve(signatures, np.zeros((0, 50, 60, 3), np.uint8), np.zeros((0, 4)))
    whole = signatures["whole_image"](images=tf.zeros([0, 50, 60, 3], tf.uint8))
    for out in (served, whole):
        assert out["keypoints"].shape == (0, k, 2) and out["scores"].shape == (0, k)
        assert out["valid"].shape == (0,)
    crops = signatures["crops"](crops=tf.zeros([0, *INPUT, 3]))
    assert crops["keypoints"].shape == (0, k, 2) and crops["scores"].shape == (0, k)
    assert crops["heatmaps"].shape == (0, INPUT[0] // 4, INPUT[1] // 4, SPEC.num_channels)


# --------------------------------------------------------------------------- crops
@pytest.mark.parametrize("shape", [(1, 64, 64, 3), (1, 96, 64, 2), (96, 64, 3)])
def test_crops_of_the_wrong_shape_are_refused_naming_crops(signatures, shape):
    got = " ".join(str(d) for d in shape)
    _refused(signatures["crops"], "crops must have shape [N, in_h, in_w, 3] = [N, 96, 64, 3] "
             f"(float32 RGB 0..255 at the input size of the model, input_size in metadata; 1 "
             f"grey or 4 RGBA channels are converted): got shape [{got}]",
             crops=np.zeros(shape, np.float32))  # fmt: skip


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_crops_with_nan_or_inf_pixels_are_refused(signatures, bad):
    crops = np.full((2, *INPUT, 3), 100.0, np.float32)
    crops[1, 5, 7, 2] = bad
    _refused(signatures["crops"], "crops must be finite (no NaN or inf pixels): send RGB "
             "values 0..255", crops=crops)  # fmt: skip


def test_grey_crops_are_replicated_to_rgb(signatures):
    crop = IMAGE[None, 40:136, 120:184].astype(np.float32)  # the 96x64 input size
    grey = signatures["crops"](crops=tf.constant(crop[..., :1]))
    rgb = signatures["crops"](crops=tf.constant(np.repeat(crop[..., :1], 3, -1)))
    for key in ("keypoints", "scores", "heatmaps"):
        np.testing.assert_allclose(grey[key].numpy(), rgb[key].numpy(), atol=1e-6)


def test_signatures_declare_dtypes_and_leave_shapes_to_the_checks(signatures):
    """Shapes are declared unknown, so no check is folded away by the graph optimiser."""
    declared = {name: {k: (v.dtype, v.shape.rank) for k, v in
                       signatures[name].structured_input_signature[1].items()}
                for name in ("serving_default", "whole_image", "crops")}  # fmt: skip
    assert declared == {
        "serving_default": {"images": (tf.uint8, None), "boxes": (tf.float32, None)},
        "whole_image": {"images": (tf.uint8, None)},
        "crops": {"crops": (tf.float32, None)},
    }
    outputs = signatures["serving_default"].structured_outputs
    assert {k: v.dtype for k, v in outputs.items()} == {
        "keypoints": tf.float32, "scores": tf.float32, "valid": tf.bool,
    }  # fmt: skip
