"""SavedModel export: geometry against kpnet.codec / OpenCV, and TF-only serving == CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import cv2
import keras
import numpy as np
import pytest
import tensorflow as tf
from _blobs import blob_image
from click.testing import CliRunner

from kpnet.cli import main
from kpnet.codec import input_to_heatmap, render_heatmaps
from kpnet.export import SIGNATURES, export_saved_model
from kpnet.inference import build_keypoints_model
from kpnet.spec import KeypointSpec

INPUT = (96, 64)  # (H, W) of the model input: not square, so the aspect rule matters
SPEC = KeypointSpec(names=("red", "green", "blue"), flip_pairs=((0, 1),), skeleton=((0, 1),))

# Runs in a fresh interpreter that imports only TensorFlow (no kpnet, no explicit keras), as
# a TF Serving client would.
SERVING_CLIENT = r"""
import json, sys
import tensorflow as tf

path, image_file, box = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
loaded = tf.saved_model.load(path)
image = tf.io.decode_image(tf.io.read_file(image_file), channels=3, expand_animations=False)[None]

def describe(fn):
    spec = lambda t: [t.dtype.name, t.shape.as_list() if t.shape.rank is not None else None]
    return {"inputs": {k: spec(v) for k, v in fn.structured_input_signature[1].items()},
            "outputs": {k: spec(v) for k, v in fn.structured_outputs.items()}}

serve = loaded.signatures["serving_default"](images=image, boxes=tf.constant([box]))
whole = loaded.signatures["whole_image"](images=image)
sentinel = loaded.signatures["serving_default"](images=image, boxes=tf.zeros([1, 4]))
meta = loaded.signatures["metadata"]()
print(json.dumps({
    "signatures": {name: describe(fn) for name, fn in loaded.signatures.items()},
    "box": serve["keypoints"].numpy()[0].tolist(),
    "box_scores": serve["scores"].numpy()[0].tolist(),
    "whole": whole["keypoints"].numpy()[0].tolist(),
    "sentinel": sentinel["keypoints"].numpy()[0].tolist(),
    "spec": json.loads(meta["spec_json"].numpy().decode()),
    "input_size": meta["input_size"].numpy().tolist(),
    "codec": json.loads(meta["codec_json"].numpy().decode()),
    "kpnet_imported": any(m.split(".")[0] == "kpnet" for m in sys.modules),
}))
"""


# --------------------------------------------------------------------------- export
def _blob_keypoints_model() -> keras.Model:
    """Heatmap channel c = average-pooled colour channel c / 255: peaks where blobs are."""
    images = keras.Input((*INPUT, 3))
    pooled = keras.layers.AveragePooling2D(4)(images)
    refine = keras.layers.Conv2D(3, 1, use_bias=False, name="refine")(pooled)
    heatmap_model = keras.Model(images, {"refine": refine})
    heatmap_model.get_layer("refine").set_weights([np.eye(3).reshape(1, 1, 3, 3) / 255.0])
    return build_keypoints_model(heatmap_model, SPEC)


def _blob_image(points, hw=(300, 400), sigma=14.0) -> np.ndarray:
    return blob_image(points, hw, sigma)


def test_serving_signatures_recover_known_points(tmp_path):
    points = np.array([[150.4, 120.2], [210.7, 180.9], [170.0, 60.5]], np.float32)
    image = _blob_image(points)
    path = export_saved_model(_blob_keypoints_model(), tmp_path / "sm" / "1")
    assert (path / "assets" / "spec.json").is_file()
    loaded = tf.saved_model.load(str(path))
    assert set(SIGNATURES) <= set(loaded.signatures)
    box = tf.constant([[120.0, 40.0, 130.0, 170.0], [0.0, 0.0, -1.0, 0.0]])
    images = tf.constant(np.stack([image, image]))
    out = loaded.signatures["serving_default"](images=images, boxes=box)
    np.testing.assert_allclose(out["keypoints"].numpy()[0], points, atol=0.6)
    np.testing.assert_allclose(out["keypoints"].numpy()[1], points, atol=1.5)  # whole image
    assert (out["scores"].numpy() > 0.5).all()
    crops = loaded.signatures["crops"](crops=tf.zeros([2, *INPUT, 3]))
    assert crops["heatmaps"].shape == (2, INPUT[0] // 4, INPUT[1] // 4, 3)
    meta = loaded.signatures["metadata"]()
    assert json.loads(meta["spec_json"].numpy())["names"] == list(SPEC.names)


def test_export_rejects_heatmap_models(tmp_path):
    images = keras.Input((*INPUT, 3))
    heatmap_model = keras.Model(images, keras.layers.Conv2D(3, 4, strides=4)(images))
    with pytest.raises(ValueError, match="KeypointDecoder"):
        export_saved_model(heatmap_model, tmp_path / "sm")
    assert not (tmp_path / "sm").exists()


# --------------------------------------------------------------------------- acceptance
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """A run folder (best.keras + spec.json) of a tiny CPN whose heads find colour blobs."""
    from kpnet.models import build_cpn

    keras.utils.set_random_seed(3)
    model = build_cpn(3, input_shape=(*INPUT, 3), backbone="tiny", pyramid_channels=16)
    _fit_refine_head(model)
    run = tmp_path_factory.mktemp("run")
    model.save(run / "best.keras")
    (run / "spec.json").write_text(json.dumps(SPEC.to_dict()))
    return run


def _fit_refine_head(model: keras.Model, n: int = 24) -> None:
    """Least-squares fit of the RefineNet head (3x3 conv + BN) on random blob crops, so the
    untrained trunk's features give meaningful, non-degenerate peaks without training."""
    rng = np.random.default_rng(0)
    points = rng.uniform((8, 8), (INPUT[1] - 8, INPUT[0] - 8), (n, 3, 2)).astype(np.float32)
    images = np.stack([_blob_image(p, INPUT, sigma=6.0) for p in points])
    kp = np.concatenate([input_to_heatmap(points, 4), np.full((n, 3, 1), 2.0, np.float32)], -1)
    target = np.asarray(render_heatmaps(kp, (INPUT[0] // 4, INPUT[1] // 4), 1.4)).reshape(-1, 3)
    trunk = keras.Model(model.inputs, model.get_layer("refine_final_block_out").output)
    feats = trunk.predict(images, verbose=0)
    d = feats.shape[-1]
    patches = tf.image.extract_patches(feats, [1, 3, 3, 1], [1] * 4, [1] * 4, "SAME")
    x = np.concatenate([patches.numpy().reshape(-1, 9 * d), np.ones((len(target), 1))], 1)
    w = np.linalg.solve(x.T @ x + 1e-2 * np.eye(x.shape[1]), x.T @ target)
    model.get_layer("refine_head_conv").set_weights([w[:-1].reshape(3, 3, d, 3)])
    bn = model.get_layer("refine_head_bn")  # identity + bias: gamma 1, mean 0, var 1 - eps
    bn.set_weights([np.ones(3), w[-1], np.zeros(3), np.full(3, 1.0 - bn.epsilon)])


def test_saved_model_in_plain_tensorflow_matches_cli(tiny_run, tmp_path):
    image = _blob_image([(60.0, 90.0), (85.0, 130.0), (50.0, 140.0)], (210, 155), sigma=10.0)
    image_file = tmp_path / "17.png"
    cv2.imwrite(str(image_file), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    box = [30.5, 40.0, 80.0, 120.0]
    dets = tmp_path / "dets.json"
    dets.write_text(json.dumps([{"file_name": "17.png", "category_id": 1, "bbox": box,
                                 "score": 0.9}]))  # fmt: skip
    runner = CliRunner()
    sm = tmp_path / "serving" / "1"
    res = runner.invoke(main, ["export", str(tiny_run), "-o", str(sm)])
    assert res.exit_code == 0, res.output
    cli = {}
    for name, extra in (("box", ["--boxes", str(dets)]), ("whole", [])):
        out = tmp_path / f"{name}.json"
        args = ["predict", str(tiny_run), str(image_file), "-o", str(out), *extra]
        res = runner.invoke(main, args)
        assert res.exit_code == 0, res.output
        [pred] = json.loads(out.read_text())
        assert pred["image_id"] == 17 and len(pred["keypoints"]) == 3 * SPEC.num_keypoints
        cli[name] = np.array(pred["keypoints"]).reshape(-1, 3)
    proc = subprocess.run(
        [sys.executable, "-c", SERVING_CLIENT, str(sm), str(image_file), json.dumps(box)],
        capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    served = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not served["kpnet_imported"]  # (tensorflow itself imports keras)
    assert (cli["box"][:, 2] > 0.2).all()  # meaningful peaks, not a flat map
    # the same sampler, codec and decoder: the same keypoints (JSON keeps 3 decimals)
    np.testing.assert_allclose(served["box"], cli["box"][:, :2], atol=0.01)
    np.testing.assert_allclose(served["box_scores"], cli["box"][:, 2], atol=0.002)
    np.testing.assert_allclose(served["whole"], cli["whole"][:, :2], atol=0.01)
    assert served["codec"]["input_size"] == list(INPUT)
    np.testing.assert_allclose(served["sentinel"], served["whole"], atol=1e-4)
    assert served["spec"]["names"] == list(SPEC.names) and served["input_size"] == list(INPUT)
    sigs = served["signatures"]
    assert set(sigs) == set(SIGNATURES)
    assert sigs["serving_default"]["inputs"] == {
        "images": ["uint8", None], "boxes": ["float32", None],  # shapes: checked in the graph
    }  # fmt: skip
    k = SPEC.num_keypoints
    assert sigs["serving_default"]["outputs"] == {
        "keypoints": ["float32", [None, k, 2]], "scores": ["float32", [None, k]],
        "valid": ["bool", [None]],
    }  # fmt: skip
    assert sigs["whole_image"]["inputs"] == {"images": ["uint8", None]}
    assert sigs["crops"]["inputs"] == {"crops": ["float32", None]}
    assert sigs["crops"]["outputs"]["heatmaps"] == ["float32", [None, 24, 16, 3]]


@pytest.mark.slow  # over 25 s on 2 cores
def test_exif_rotated_jpeg_same_keypoints_in_validation_predict_and_saved_model(tiny_run, tmp_path):
    """EXIF orientation is ignored everywhere (the stored pixel grid, which labels refer to)."""
    from PIL import Image

    from kpnet.data.pipeline import PipelineConfig
    from kpnet.data.records import InstanceRecord
    from kpnet.inference import codec_of, load_model
    from kpnet.runner import evaluate_model

    image = _blob_image([(60.0, 90.0), (85.0, 130.0), (50.0, 140.0)], (210, 155), sigma=10.0)
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees to display
    path = tmp_path / "rotated.jpg"
    Image.fromarray(image).save(path, quality=95, exif=exif.tobytes())
    box = [30.5, 40.0, 80.0, 120.0]
    model = load_model(tiny_run)
    record = InstanceRecord(str(path), tuple(box), np.zeros((3, 3), np.float32), 0, 0, 1.0)
    config = PipelineConfig(codec=codec_of(model))
    validation = evaluate_model(model, [record], SPEC, config)["predictions"][0]["keypoints"]
    dets = tmp_path / "dets.json"
    dets.write_text(json.dumps([{"file_name": path.name, "bbox": box, "score": 1.0}]))
    out = tmp_path / "pred.json"
    res = CliRunner().invoke(main, ["predict", str(tiny_run), str(path), "--boxes", str(dets),
                                    "-o", str(out)])  # fmt: skip
    assert res.exit_code == 0, res.output
    predicted = json.loads(out.read_text())[0]["keypoints"]
    sm = tmp_path / "sm"
    export_saved_model(model, sm)
    proc = subprocess.run(
        [sys.executable, "-c", SERVING_CLIENT, str(sm), str(path), json.dumps(box)],
        capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    served = json.loads(proc.stdout.strip().splitlines()[-1])["box"]
    v, p = np.reshape(validation, (-1, 3))[:, :2], np.reshape(predicted, (-1, 3))[:, :2]
    np.testing.assert_allclose(p, v, atol=1e-3)
    np.testing.assert_allclose(served, v, atol=0.01)
    assert (v[:, 1] < 210).all()  # inside the stored 155x210 grid, not a rotated one


# --------------------------------------------------------------------------- bad requests
BAD_REQUESTS = [  # (name, images shape, boxes, message fragment)
    ("more boxes than images", (2, 50, 60), np.zeros((3, 4)), "one row per image"),
    ("one box for two images", (2, 50, 60), np.zeros((1, 4)), "one row per image"),
    ("boxes for an empty batch", (0, 50, 60), np.zeros((1, 4)), "one row per image"),
    ("NaN box", (2, 50, 60), [[np.nan, 0, 10, 10], [0, 0, 10, 10]], "boxes must be finite"),
    ("inf box", (2, 50, 60), [[0, 0, 10, 10], [0, 0, np.inf, 10]], "boxes must be finite"),
    ("0x0 image", (1, 0, 0), np.zeros((1, 4)), "at least 1x1 pixels"),
    ("0-wide image", (1, 40, 0), [[0, 0, 10, 10]], "at least 1x1 pixels"),
]


def _request(images_shape, boxes):
    images = tf.zeros([*images_shape, 3], tf.uint8)
    return images, tf.constant(np.asarray(boxes, np.float32).reshape(-1, 4))


@pytest.fixture(scope="module")
def flip_test_module(tiny_run):
    """The serving module of the tiny CPN with flip test (BatchNorm + flipped batch)."""
    from kpnet.export import KeypointServingModule
    from kpnet.inference import load_model

    return KeypointServingModule(load_model(tiny_run, flip_test=True), SPEC)


@pytest.mark.parametrize("case", BAD_REQUESTS, ids=[c[0] for c in BAD_REQUESTS])
def test_bad_requests_fail_with_a_message_naming_the_input(flip_test_module, case):
    _, shape, boxes, message = case
    with pytest.raises(tf.errors.InvalidArgumentError, match=message):
        flip_test_module.serving_default(*_request(shape, boxes))


def test_empty_batch_returns_empty_outputs(flip_test_module):
    k = SPEC.num_keypoints
    for out in (
        flip_test_module.serving_default(*_request((0, 50, 60), np.zeros((0, 4)))),
        flip_test_module.whole_image(tf.zeros([0, 0, 0, 3], tf.uint8)),
    ):
        assert out["keypoints"].shape == (0, k, 2) and out["scores"].shape == (0, k)


def test_saved_model_keeps_the_request_checks(tmp_path):
    """The checks are in the exported graph: a TF Serving client gets the same messages."""
    path = export_saved_model(_blob_keypoints_model(), tmp_path / "sm" / "1")
    serve = tf.saved_model.load(str(path)).signatures["serving_default"]
    image = np.zeros((2, 50, 60, 3), np.uint8)
    with pytest.raises(tf.errors.InvalidArgumentError, match="one row per image"):
        serve(images=tf.constant(image), boxes=tf.zeros([1, 4]))
    with pytest.raises(tf.errors.InvalidArgumentError, match="boxes must be finite"):
        serve(images=tf.constant(image), boxes=tf.constant([[0, 0, np.nan, 1], [0, 0, 1, 1]]))
    empty = serve(images=tf.zeros([0, 50, 60, 3], tf.uint8), boxes=tf.zeros([0, 4]))
    assert empty["keypoints"].shape == (0, SPEC.num_keypoints, 2)
    good = serve(images=tf.constant(image), boxes=tf.zeros([2, 4]))
    assert np.isfinite(good["keypoints"].numpy()).all()
