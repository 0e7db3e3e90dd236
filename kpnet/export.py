"""TF Serving export: a SavedModel whose signatures return keypoints in image pixels.

Example:
    >>> from kpnet.export import export_saved_model
    >>> path = export_saved_model("runs/pins/best.keras", "exported/pins/1")  # doctest: +SKIP

Signatures (all outputs float32; K = ``spec.num_keypoints``, C = ``spec.num_channels``):

* ``serving_default(images, boxes)``: ``images`` uint8 [N, H, W, 3] RGB of any size,
  ``boxes`` float32 [N, 4] = (x, y, w, h) in image pixels, one box per image row (repeat an
  image for several boxes). A box with ``w <= 0`` or ``h <= 0`` means "the whole image".
  Returns ``keypoints`` [N, K, 2] (x, y) image pixels and ``scores`` [N, K]. A bad request
  fails with an ``InvalidArgumentError`` whose message says what is wrong
  (:data:`REQUEST_ERRORS`): boxes not one row per image, a NaN or inf in the boxes, an image
  of height or width 0. An empty batch (N = 0) returns empty outputs.
* ``whole_image(images)``: the same on whole images (no boxes input).
* ``crops(crops)``: float32 [N, in_h, in_w, 3] RGB 0..255, already cropped to the model's
  input size; returns ``keypoints`` [N, K, 2] crop pixels, ``scores`` [N, K] and
  ``heatmaps`` [N, in_h/4, in_w/4, C] (RefineNet output, flip-averaged under flip test).
* ``metadata()``: ``spec_json`` (the KeypointSpec as JSON: names, skeleton, flip pairs, ...),
  ``codec_json`` (the :class:`kpnet.codec.Codec`: input size, sigmas, crop geometry,
  decoding), ``input_size`` int32 [2] = (in_h, in_w) and ``padding`` float32 [2].

The keypoint spec is also stored as the asset ``assets/spec.json``.

The crops are those of validation and ``kpnet predict``: the model's codec places them
(:meth:`kpnet.codec.Codec.crop_matrices`: the box with the codec's padding; the whole image,
letterboxed, for a box with w or h <= 0 and for whole-frame models; two-stage models run
twice, :meth:`kpnet.codec.Codec.locate`: the whole image, then a crop around the keypoints
found there), the shared sampler
makes them (:func:`kpnet.crops.sample_crops`: anti-aliased, bilinear) and
:func:`kpnet.codec.crop_to_image` maps the keypoints back, clipped to the image.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Sequence
from pathlib import Path

import keras
import tensorflow as tf

from kpnet import fs
from kpnet.codec import Codec, crop_to_image
from kpnet.crops import sample_crops
from kpnet.inference import codec_of, decoder_of, load_model, with_heatmaps
from kpnet.spec import KeypointSpec

SIGNATURES: tuple[str, ...] = ("serving_default", "whole_image", "crops", "metadata")

#: The messages of the ``InvalidArgumentError`` a bad ``serving_default`` request raises.
REQUEST_ERRORS: dict[str, str] = {
    "boxes_rows": "boxes must have one row per image: boxes [N, 4] for images [N, H, W, 3] "
    "(repeat an image for several boxes)",
    "boxes_finite": "boxes must be finite (no NaN or inf); a box with w <= 0 or h <= 0 means "
    "the whole image",
    "image_size": "images must be at least 1x1 pixels (got an image of height or width 0)",
}


def export_saved_model(
    keypoints_model_or_path: keras.Model | str | Path,
    out_dir: str | Path,
    spec: KeypointSpec | None = None,
    input_size: Sequence[int] | None = None,
    padding: Sequence[float] | None = None,
    flip_test: bool | None = None,
) -> str | Path:
    """Write a TF Serving SavedModel of a keypoints model (signatures: see the module doc).

    Args:
        keypoints_model_or_path: a keypoints model (:func:`kpnet.inference.load_model`) or
            the path (or URL) of a ``.keras`` keypoints / heatmap model or of a run folder.
        out_dir: SavedModel directory (TF Serving wants ``.../<name>/<version>``), local or
            a URL (``gs://...``); replaced only once the new export is complete
            (:func:`kpnet.fs.staged_folder`).
        spec: keypoint spec; default: the one inside the model's decoder layer.
        input_size: (in_h, in_w) crop size; default (and must match) the model's input.
        padding: box padding (x, y) of top-down crops; default: the model's codec's.
        flip_test: (path only) change the model's flip test.

    Returns:
        The SavedModel directory (a ``Path``, or a string for a URL).
    """
    if keras.backend.backend() != "tensorflow":
        return _export_with_tensorflow(keypoints_model_or_path, out_dir, spec, input_size,
                                       padding, flip_test)  # fmt: skip
    model = _as_keypoints_model(keypoints_model_or_path, spec, flip_test)
    spec = spec or decoder_of(model).spec
    codec = codec_of(model)
    if padding is not None:
        codec = codec.replace(padding=tuple(padding))
    _check_input_size(model, input_size)
    module = KeypointServingModule(model, spec, codec)
    out_dir = fs.as_path(out_dir)
    with tempfile.TemporaryDirectory(prefix="kpnet-export-") as local:
        spec_file = Path(local) / "spec.json"  # becomes assets/spec.json inside the SavedModel
        spec_file.write_text(json.dumps(spec.to_dict(), indent=2))
        module.spec_asset = tf.saved_model.Asset(str(spec_file))
        signatures = {name: getattr(module, name) for name in SIGNATURES}
        with fs.staged_folder(out_dir) as tmp:  # tf.saved_model writes URLs itself
            tf.saved_model.save(module, tmp, signatures=signatures)
    return out_dir


def _export_with_tensorflow(
    model_or_path, out_dir, spec, input_size, padding, flip_test
) -> str | Path:
    """Export from another Keras backend (JAX): the model is saved as ``.keras`` (if not a
    path already) and exported by a ``KERAS_BACKEND=tensorflow`` subprocess, since SavedModel
    signatures are TensorFlow graphs. The weights are the same file, so the keypoints are too.
    """
    import os
    import subprocess
    import sys

    with tempfile.TemporaryDirectory(prefix="kpnet-export-") as tmp:
        path = model_or_path
        if isinstance(model_or_path, keras.Model):
            path = Path(tmp) / "keypoints.keras"
            model_or_path.save(path)
        args = {"path": str(path), "out": str(out_dir), "input_size": input_size,
                "padding": padding, "flip_test": flip_test,
                "spec": None if spec is None else spec.to_dict()}  # fmt: skip
        root = str(Path(__file__).resolve().parents[1])  # this kpnet, not another install
        env = {**os.environ, "KERAS_BACKEND": "tensorflow",
               "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
        proc = subprocess.run([sys.executable, "-c", _EXPORT_SCRIPT, json.dumps(args)],
                              env=env, capture_output=True, text=True)  # fmt: skip
    if proc.returncode != 0:
        lines = (proc.stderr or proc.stdout).strip().splitlines() or ["no output"]
        raise ValueError(f"export_saved_model: the TensorFlow export of {path} failed: {lines[-1]}")
    return fs.as_path(out_dir)


_EXPORT_SCRIPT = """
import json, sys
from kpnet.export import export_saved_model
from kpnet.spec import KeypointSpec
a = json.loads(sys.argv[1])
spec = None if a["spec"] is None else KeypointSpec.from_dict(a["spec"])
export_saved_model(a["path"], a["out"], spec, a["input_size"], a["padding"], a["flip_test"])
"""


class KeypointServingModule(tf.Module):
    """The exported object: the codec's crop geometry and sampler around a keypoints model.

    Args:
        keypoints_model: images -> {"keypoints", "scores"} (a :mod:`kpnet.inference` model).
        spec: its keypoint spec.
        codec: the codec to crop with (default: the model's).
    """

    def __init__(
        self, keypoints_model: keras.Model, spec: KeypointSpec, codec: Codec | None = None
    ) -> None:
        super().__init__(name="kpnet_serving")
        model = with_heatmaps(keypoints_model)
        # Track only the variables: tracking the Keras model makes saving trace its own
        # functions again (3x slower) and stores nothing the signatures need.
        self.model_variables = [getattr(v, "value", v) for v in model.variables]
        self._forward = lambda crops: model(crops, training=False)
        self.codec = codec or codec_of(keypoints_model)
        self.input_size = self.codec.input_size
        self.spec_json = json.dumps(spec.to_dict())
        self.num_keypoints = spec.num_keypoints
        h, w = self.input_size
        self.serving_default = tf.function(
            self._serve,
            autograph=False,
            input_signature=[
                tf.TensorSpec([None, None, None, 3], tf.uint8, name="images"),
                tf.TensorSpec([None, 4], tf.float32, name="boxes"),
            ],
        )
        self.whole_image = tf.function(
            self._whole_image,
            autograph=False,
            input_signature=[tf.TensorSpec([None, None, None, 3], tf.uint8, name="images")],
        )
        self.crops = tf.function(
            self._crops,
            autograph=False,
            input_signature=[tf.TensorSpec([None, h, w, 3], tf.float32, name="crops")],
        )
        self.metadata = tf.function(self._metadata, autograph=False, input_signature=[])

    def _serve(self, images: tf.Tensor, boxes: tf.Tensor) -> dict[str, tf.Tensor]:
        """Check the request (:data:`REQUEST_ERRORS`), then crop, run and map back.

        An empty batch returns empty outputs without running the model.
        """
        n = tf.shape(images)[0]
        checks = [
            tf.debugging.assert_equal(tf.shape(boxes)[0], n, message=REQUEST_ERRORS["boxes_rows"]),
            tf.debugging.assert_all_finite(boxes, REQUEST_ERRORS["boxes_finite"]),
        ]
        k = self.num_keypoints
        empty = {"keypoints": tf.zeros([0, k, 2]), "scores": tf.zeros([0, k])}
        with tf.control_dependencies(checks):
            return tf.cond(n > 0, lambda: self._serve_batch(images, boxes), lambda: empty)

    def _serve_batch(self, images: tf.Tensor, boxes: tf.Tensor) -> dict[str, tf.Tensor]:
        n = tf.shape(images)[0]
        size = tf.debugging.assert_positive(
            tf.shape(images)[1:3], message=REQUEST_ERRORS["image_size"]
        )
        with tf.control_dependencies([size]):
            hw = tf.cast(tf.tile(tf.shape(images)[None, 1:3], tf.stack([n, 1])), tf.float32)

        def locate(boxes: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
            matrices = self.codec.crop_matrices(boxes, hw)
            crops = sample_crops(images, matrices, self.input_size)
            out = self.crops(tf.cast(crops, tf.float32))  # one traced forward for all
            return crop_to_image(out["keypoints"], matrices, hw), out["scores"]

        xy, scores = self.codec.locate(boxes, locate)  # two stages for two-stage models
        return {"keypoints": xy, "scores": scores}

    def _whole_image(self, images: tf.Tensor) -> dict[str, tf.Tensor]:
        return self.serving_default(images, tf.zeros([tf.shape(images)[0], 4], tf.float32))

    def _crops(self, crops: tf.Tensor) -> dict[str, tf.Tensor]:
        out = self._forward(tf.cast(crops, tf.float32))
        return {k: tf.cast(out[k], tf.float32) for k in ("keypoints", "scores", "heatmaps")}

    def _metadata(self) -> dict[str, tf.Tensor]:
        return {
            "spec_json": tf.constant(self.spec_json),
            "codec_json": tf.constant(json.dumps(self.codec.to_dict())),
            "input_size": tf.constant(self.input_size, tf.int32),
            "padding": tf.constant(self.codec.padding, tf.float32),
        }


# --------------------------------------------------------------------------- helpers
def _as_keypoints_model(model_or_path, spec: KeypointSpec | None, flip_test) -> keras.Model:
    if isinstance(model_or_path, keras.Model):
        decoder_of(model_or_path)  # ValueError with what to do when it is a heatmap model
        return model_or_path
    options = {} if flip_test is None else {"flip_test": bool(flip_test)}
    return load_model(model_or_path, spec, **options)


def _check_input_size(model: keras.Model, input_size: Sequence[int] | None) -> None:
    h, w = tuple(model.inputs[0].shape[1:3])
    if input_size is not None and (int(h), int(w)) != tuple(int(v) for v in input_size):
        raise ValueError(f"input_size {tuple(input_size)} does not match the model input {(h, w)}")
