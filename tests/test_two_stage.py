"""Two-stage models: find the subject on the whole frame, refine a crop around it.

The same two passes in training geometry, ``kpnet predict`` (Predictor), evaluation and the
SavedModel, and the point of it: a subject small in a large frame is located at the frame's
own resolution instead of the whole frame's.
"""

from __future__ import annotations

import cv2
import keras
import numpy as np
import pytest
import tensorflow as tf
from _blobs import blob_image

from kpnet import codec
from kpnet.codec import Codec
from kpnet.data.augment import AugmentConfig
from kpnet.data.pipeline import PipelineConfig, build_dataset
from kpnet.data.records import InstanceRecord
from kpnet.export import export_saved_model
from kpnet.inference import build_keypoints_model
from kpnet.runner import Predictor, evaluate_model
from kpnet.spec import KeypointSpec

INPUT = (96, 64)  # (H, W)
SPEC = KeypointSpec(names=("red", "green", "blue"))
FRAME = (900, 1200)  # (H, W): the subject is small in it
POINTS = np.array([[700.3, 400.6], [760.8, 452.2], [731.5, 371.9]], np.float32)


def _blob_model(mode: str) -> keras.Model:
    """Heatmap channel c = average-pooled colour channel c / 255: peaks where blobs are."""
    images = keras.Input((*INPUT, 3))
    pooled = keras.layers.AveragePooling2D(4)(images)
    refine = keras.layers.Conv2D(3, 1, use_bias=False, name="refine")(pooled)
    heatmap_model = keras.Model(images, {"refine": refine})
    heatmap_model.get_layer("refine").set_weights([np.eye(3).reshape(1, 1, 3, 3) / 255.0])
    return build_keypoints_model(heatmap_model, SPEC, Codec(INPUT, mode=mode, refine_sigma=3.0))


@pytest.fixture(scope="module")
def frame() -> np.ndarray:
    return blob_image(POINTS, FRAME, sigma=16.0)


def test_codec_regions_refine_crops_never_magnify():
    c = Codec(INPUT, mode="two_stage", padding=(1.0, 1.0))
    boxes = np.array([[500, 300, 10, 10], [100, 100, 400, 600], [0, 0, 0, 0]], np.float32)
    hw = np.array([FRAME] * 3, np.float32)
    center, size = c.regions(boxes, hw)
    np.testing.assert_allclose(size[0], [64, 96])  # a small box: native resolution
    np.testing.assert_allclose(size[1], [400, 600])  # a large one: its own extent
    np.testing.assert_allclose(size[2], [1200, 1800])  # no box: the whole frame, letterboxed
    np.testing.assert_allclose(center[0], [504.5, 304.5])
    _, train_size = c.regions(boxes, hw, training=True)
    np.testing.assert_allclose(train_size[:2], size[:2] * c.train_box_extend)
    np.testing.assert_allclose(train_size[2], size[2])


def test_two_stages_locate_a_small_subject_at_full_resolution(frame):
    whole = Predictor(_blob_model("whole")).predict(frame)[0][0]
    two_stage = Predictor(_blob_model("two_stage")).predict(frame)[0][0]
    whole_err = np.linalg.norm(whole - POINTS, axis=-1)
    two_err = np.linalg.norm(two_stage - POINTS, axis=-1)
    assert two_err.max() < 0.5, two_err
    assert whole_err.mean() > 4 * two_err.mean(), (whole_err, two_err)


def test_user_boxes_skip_the_first_stage(frame):
    model = _blob_model("two_stage")
    calls = []
    predictor = Predictor(model)
    original = predictor.crops

    def counting(image, boxes=None):
        calls.append(np.array(boxes))
        return original(image, boxes)

    predictor.crops = counting
    box = np.array([[650, 340, 160, 160]], np.float32)
    xy, _ = predictor.predict(frame, box)
    assert len(calls) == 2  # both passes run (batched); the given box is kept in the second
    np.testing.assert_allclose(calls[1], box)
    np.testing.assert_allclose(xy[0], POINTS, atol=0.5)


def test_no_confident_keypoint_refines_the_whole_frame():
    c = Codec(INPUT, mode="two_stage")
    xy = np.array([[[10.0, 10.0], [20.0, 20.0]]], np.float32)
    np.testing.assert_allclose(c.found_boxes(xy, np.array([[0.01, 0.05]])), [[0, 0, 0, 0]])
    np.testing.assert_allclose(c.found_boxes(xy, np.array([[0.9, 0.05]])), [[10, 10, 1, 1]])


def test_predict_evaluate_and_saved_model_agree(frame, tmp_path):
    path = tmp_path / "frame.png"
    cv2.imwrite(str(path), cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
    model = _blob_model("two_stage")
    expected, _ = Predictor(model).predict(frame)
    kp = np.concatenate([POINTS, np.full((3, 1), 2.0, np.float32)], axis=1)
    record = InstanceRecord(str(path), (600.0, 300.0, 250.0, 250.0), kp, record_id=0)
    metrics = evaluate_model(model, [record], SPEC, PipelineConfig(codec=model_codec(model)))
    assert "two stages" in metrics["crops"]
    evaluated = np.reshape(metrics["predictions"][0]["keypoints"], (-1, 3))[:, :2]
    np.testing.assert_allclose(evaluated, expected[0], atol=1e-3)
    loaded = tf.saved_model.load(str(export_saved_model(model, tmp_path / "sm" / "1")))
    served = loaded.signatures["whole_image"](images=tf.constant(frame[None]))
    np.testing.assert_allclose(served["keypoints"].numpy()[0], expected[0], atol=2e-3)
    assert np.abs(expected[0] - POINTS).max() < 0.5


def model_codec(model: keras.Model) -> Codec:
    from kpnet.inference import codec_of

    return codec_of(model)


def _frames(tmp_path, n: int) -> list[InstanceRecord]:
    rng = np.random.default_rng(0)
    records = []
    for i in range(n):
        pts = rng.uniform(50, 400, (3, 2)).astype(np.float32)
        path = tmp_path / f"f{i}.png"
        cv2.imwrite(str(path), np.zeros((480, 640, 3), np.uint8))
        kp = np.concatenate([pts, np.full((3, 1), 2.0, np.float32)], axis=1)
        kp[2, 2] = 0 if i % 2 else 2  # an unlabelled point is not in the box
        records.append(InstanceRecord(str(path), (0.0, 0.0, 640.0, 480.0), kp, record_id=i))
    return records


def test_training_mixes_whole_frames_and_refine_crops(tmp_path):
    records = _frames(tmp_path, 40)
    aug = AugmentConfig(scale=(1.0, 1.0), rotation=0.0, flip=False, brightness=0.0,
                        contrast=0.0, saturation=0.0)  # fmt: skip
    cfg = PipelineConfig(codec=Codec(INPUT, mode="two_stage", whole_fraction=0.3), augment=aug,
                         shuffle_buffer=1)  # fmt: skip
    ds = build_dataset(records, SPEC, cfg, 40, training=True, with_meta=True)
    _, _, meta = next(iter(ds.as_numpy_iterator()))
    whole_scale = INPUT[1] / 640  # width-limited letterbox of a 640x480 frame
    scale = np.abs(meta["affine"][:, 0, 0])
    is_whole = np.isclose(scale, whole_scale, rtol=1e-4)
    assert 0.1 < is_whole.mean() < 0.55  # ~ whole_fraction of 40
    for m, i in zip(meta["affine"][~is_whole], meta["index"][~is_whole], strict=True):
        kp = records[i].keypoints
        labelled = kp[:, 2] > 0
        inside = codec.transform_points(kp[labelled, :2], m)
        assert (inside >= 0).all() and (inside <= [INPUT[1] - 1, INPUT[0] - 1]).all()
        c, s = cfg.codec.regions(codec.keypoint_boxes(kp[None, :, :2], labelled[None]),
                                 np.array([[480, 640]], np.float32), training=True)  # fmt: skip
        np.testing.assert_allclose(m, codec.crop_affine(c, s, INPUT)[0], atol=1e-3)
        assert np.abs(m[0, 0]) <= 1 / cfg.codec.train_box_extend + 1e-6  # never magnified


def test_an_image_without_boxes_gives_no_instances(frame):
    out = list(Predictor(_blob_model("two_stage")).run([(0, frame, np.zeros((0, 4))),
                                                       (1, frame, None)]))  # fmt: skip
    assert [xy.shape for _, xy, _, _ in out] == [(0, 3, 2), (1, 3, 2)]
    np.testing.assert_allclose(out[1][1][0], POINTS, atol=0.5)
