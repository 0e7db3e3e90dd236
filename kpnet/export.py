"""TF Serving export: a SavedModel whose signatures return keypoints in image pixels.

Example:
    >>> from kpnet.export import export_saved_model
    >>> path = export_saved_model("runs/pins/best.keras", "exported/pins/1")  # doctest: +SKIP

Signatures (outputs float32 but ``valid``; K = ``spec.num_keypoints``, C = ``spec.num_channels``):

* ``serving_default(images, boxes)``: ``images`` uint8 [N, H, W, 3] RGB of any size (1
  channel, grey, is replicated to RGB; 4, RGBA, loses its alpha), ``boxes`` float32 [N, 4] =
  (x, y, w, h) in image pixels, one box per image row (repeat an image for several boxes). A
  box with ``w <= 0`` or ``h <= 0`` means "the whole image". Returns ``keypoints`` [N, K, 2]
  (x, y) image pixels, ``scores`` [N, K] and ``valid`` bool [N]: false for a box wholly
  outside its image or more than :data:`MAX_BOX_SCALE` times its size, whose keypoints are
  :data:`INVALID_XY` with score 0. A bad request fails with an ``InvalidArgumentError``
  (TF Serving: ``INVALID_ARGUMENT``) whose message names the input and says what is wrong
  (:data:`REQUEST_ERRORS`): images not [N, H, W, C] with C in 1, 3, 4, of height or width 0
  or over :data:`MAX_PIXELS` pixels; boxes not [N, 4], not one row per image, NaN or inf.
  An empty batch (N = 0) returns empty outputs.
* ``whole_image(images)``: the same on whole images (no boxes input).
* ``crops(crops)``: float32 [N, in_h, in_w, 3] RGB 0..255 (1 or 4 channels converted as
  above), already cropped to the model's input size; returns ``keypoints`` [N, K, 2] crop
  pixels, ``scores`` [N, K] and ``heatmaps`` [N, in_h/4, in_w/4, C] (RefineNet output,
  flip-averaged under flip test). Refused: another crop size, NaN or inf pixels. 0 crops:
  empty outputs.
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
from kpnet.data.images import MAX_PIXELS  # most pixels (H x W) a served image may have
from kpnet.inference import codec_of, decoder_of, load_model, with_heatmaps
from kpnet.spec import KeypointSpec

SIGNATURES: tuple[str, ...] = ("serving_default", "whole_image", "crops", "metadata")

#: A box wider (taller) than this many times its image is flagged (``valid`` false), not run.
MAX_BOX_SCALE = 100.0
#: The (x, y) of every keypoint of a flagged row: outside every image (real ones are clipped
#: into the image), with score 0.
INVALID_XY = -1.0
#: The channel counts images and crops may have: grey (replicated to RGB), RGB, RGBA (alpha
#: dropped).
CHANNELS: tuple[int, ...] = (1, 3, 4)

#: The messages of the ``InvalidArgumentError`` (TF Serving: ``INVALID_ARGUMENT``) a bad
#: request raises; ``{}`` is filled with the request's values.
REQUEST_ERRORS: dict[str, str] = {
    "images_rank": "images must be a batch uint8 [N, H, W, 3] (rank 4; add a batch axis for "
    "one image): got shape {}",
    "images_channels": "images must have 3 channels (RGB; 1 grey or 4 RGBA are converted): "
    "got shape {}",
    "image_size": "images must be at least 1x1 pixels (got an image of height or width 0)",
    "image_pixels": f"images must have at most {MAX_PIXELS:,} pixels (height x width): got "
    "{} x {}; downscale the image, or crop it and send crops",
    "boxes_shape": "boxes must have shape [N, 4] (x, y, w, h) in image pixels: got shape {}",
    "boxes_rows": "boxes must have one row per image: boxes [N, 4] for images [N, H, W, 3] "
    "(repeat an image for several boxes)",
    "boxes_finite": "boxes must be finite (no NaN or inf); a box with w <= 0 or h <= 0 means "
    "the whole image",
    "crops_shape": "crops must have shape [N, in_h, in_w, 3] = [N, {}, {}, 3] (float32 RGB "
    "0..255 at the input size of the model, input_size in metadata; 1 grey or 4 RGBA "
    "channels are converted): got shape {}",
    "crops_finite": "crops must be finite (no NaN or inf pixels): send RGB values 0..255",
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

    Every signature checks its request in the graph (:data:`REQUEST_ERRORS`), so TF Serving
    answers a bad one with ``INVALID_ARGUMENT`` and that message; the inputs are declared
    with unknown shapes so that no check is folded away and a wrong rank or channel count
    reaches them.

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
        self._model = lambda crops: model(crops, training=False)
        self.heatmaps_shape = tuple(int(d) for d in model.output["heatmaps"].shape[1:])
        self.codec = codec or codec_of(keypoints_model)
        self.input_size = self.codec.input_size
        self.spec_json = json.dumps(spec.to_dict())
        self.num_keypoints = spec.num_keypoints
        h, w = self.input_size
        any_images = tf.TensorSpec(None, tf.uint8, name="images")  # checked in the graph
        self.forward = tf.function(  # one traced forward for every signature
            self._forward, autograph=False,
            input_signature=[tf.TensorSpec([None, h, w, 3], tf.float32, name="crops")],
        )  # fmt: skip
        self.serving_default = tf.function(
            self._serve, autograph=False,
            input_signature=[any_images, tf.TensorSpec(None, tf.float32, name="boxes")],
        )  # fmt: skip
        self.whole_image = tf.function(
            self._whole_image, autograph=False, input_signature=[any_images]
        )
        self.crops = tf.function(
            self._crops, autograph=False,
            input_signature=[tf.TensorSpec(None, tf.float32, name="crops")],
        )  # fmt: skip
        self.metadata = tf.function(self._metadata, autograph=False, input_signature=[])

    # -- signatures ----------------------------------------------------------------------
    def _serve(self, images: tf.Tensor, boxes: tf.Tensor) -> dict[str, tf.Tensor]:
        """Check the request (:data:`REQUEST_ERRORS`), then crop, run and map back.

        Rows whose box lies wholly outside its image, or is more than
        :data:`MAX_BOX_SCALE` times its size, are not cropped: ``valid`` false, keypoints
        :data:`INVALID_XY`, scores 0 (whole-frame models ignore boxes: every row valid). An
        empty batch returns empty outputs without running the model.
        """
        images = _checked_images(images)
        boxes = _checked_boxes(boxes, tf.shape(images)[0])
        k = self.num_keypoints
        empty = {"keypoints": tf.zeros([0, k, 2]), "scores": tf.zeros([0, k]),
                 "valid": tf.zeros([0], tf.bool)}  # fmt: skip
        n = tf.shape(images)[0]
        return tf.cond(n > 0, lambda: self._serve_batch(images, boxes), lambda: empty)

    def _serve_batch(self, images: tf.Tensor, boxes: tf.Tensor) -> dict[str, tf.Tensor]:
        n = tf.shape(images)[0]
        hw = tf.cast(tf.tile(tf.shape(images)[None, 1:3], tf.stack([n, 1])), tf.float32)
        valid = _usable_boxes(boxes, hw)
        if not self.codec.uses_boxes:  # Codec.regions: boxes are ignored
            valid = tf.ones_like(valid)
        image_box = tf.concat([tf.zeros_like(hw), tf.reverse(hw, [-1])], -1)  # (0, 0, W, H)
        boxes = tf.where(valid[:, None], boxes, image_box)  # never crop an unusable box

        def locate(boxes: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
            matrices = self.codec.crop_matrices(boxes, hw)
            out = self.forward(sample_crops(images, matrices, self.input_size))
            return crop_to_image(out["keypoints"], matrices, hw), out["scores"]

        xy, scores = self.codec.locate(boxes, locate)  # two stages for two-stage models
        return {"keypoints": tf.where(valid[:, None, None], xy, INVALID_XY),
                "scores": tf.where(valid[:, None], scores, 0.0), "valid": valid}  # fmt: skip

    def _whole_image(self, images: tf.Tensor) -> dict[str, tf.Tensor]:
        n = tf.concat([tf.shape(images), [0]], 0)[0]  # no slicing error before the checks
        return self._serve(images, tf.zeros(tf.stack([n, 4]), tf.float32))

    def _crops(self, crops: tf.Tensor) -> dict[str, tf.Tensor]:
        """Check the crops (shape, channels, finite), then run; 0 crops: empty outputs."""
        crops = _checked_crops(crops, self.input_size)
        empty = {"keypoints": tf.zeros([0, self.num_keypoints, 2]),
                 "scores": tf.zeros([0, self.num_keypoints]),
                 "heatmaps": tf.zeros([0, *self.heatmaps_shape])}  # fmt: skip
        n = tf.shape(crops)[0]
        return tf.cond(n > 0, lambda: self.forward(crops), lambda: empty)

    def _forward(self, crops: tf.Tensor) -> dict[str, tf.Tensor]:
        out = self._model(crops)
        return {k: tf.cast(out[k], tf.float32) for k in ("keypoints", "scores", "heatmaps")}

    def _metadata(self) -> dict[str, tf.Tensor]:
        return {
            "spec_json": tf.constant(self.spec_json),
            "codec_json": tf.constant(json.dumps(self.codec.to_dict())),
            "input_size": tf.constant(self.input_size, tf.int32),
            "padding": tf.constant(self.codec.padding, tf.float32),
        }


# --------------------------------------------------------------------------- request checks
def _require(ok: tf.Tensor, key: str, *values: tf.Tensor) -> tf.Operation:
    """An in-graph check: unless ``ok``, an ``InvalidArgumentError`` whose message is
    ``REQUEST_ERRORS[key]`` with its ``{}`` filled by ``values``."""
    message = REQUEST_ERRORS[key]
    text = tf.strings.format(message, list(values)) if values else message
    return tf.debugging.Assert(ok, [text], name=key)


def _after(checks: list[tf.Operation], tensor: tf.Tensor, shape: list) -> tf.Tensor:
    """``tensor`` with the static ``shape``, available only once ``checks`` have passed."""
    with tf.control_dependencies(checks):
        return tf.ensure_shape(tf.identity(tensor), shape)


def _checked_images(images: tf.Tensor) -> tf.Tensor:
    """uint8 [N, H, W, 3] RGB images of a request: rank, channels (grey replicated, RGBA's
    alpha dropped), size and :data:`MAX_PIXELS` checked."""
    shape = tf.shape(images, out_type=tf.int64)
    rank = _require(tf.equal(tf.size(shape), 4), "images_rank", shape)
    images = _after([rank], images, [None, None, None, None])
    shape = tf.shape(images, out_type=tf.int64)
    n, h, w = shape[0], shape[1], shape[2]
    checks = [
        _require(tf.reduce_any(tf.equal(shape[3], CHANNELS)), "images_channels", shape),
        _require((n == 0) | ((h > 0) & (w > 0)), "image_size"),  # 0 images: empty outputs
        _require(h * w <= MAX_PIXELS, "image_pixels", h, w),
    ]
    return _to_rgb(_after(checks, images, [None, None, None, None]))


def _checked_boxes(boxes: tf.Tensor, n: tf.Tensor) -> tf.Tensor:
    """float32 [N, 4] boxes of a request of N images: shape, rows and finiteness checked."""
    shape = tf.shape(boxes, out_type=tf.int64)
    ok = tf.logical_and(tf.equal(tf.size(shape), 2), tf.reduce_all(tf.equal(shape[1:], 4)))
    boxes = _after([_require(ok, "boxes_shape", shape)], boxes, [None, 4])
    checks = [
        _require(tf.equal(tf.shape(boxes)[0], n), "boxes_rows"),
        _require(tf.reduce_all(tf.math.is_finite(boxes)), "boxes_finite"),
    ]
    return _after(checks, boxes, [None, 4])


def _checked_crops(crops: tf.Tensor, input_size: Sequence[int]) -> tf.Tensor:
    """float32 [N, in_h, in_w, 3] crops: shape, channels (converted) and finiteness checked."""
    shape = tf.shape(crops, out_type=tf.int64)
    size = tf.constant(input_size, tf.int64)
    padded = tf.concat([shape, tf.zeros([4], tf.int64)], 0)[:4]  # any rank: no slicing error
    ok = tf.logical_and(tf.equal(tf.size(shape), 4), tf.reduce_all(tf.equal(padded[1:3], size)))
    ok = tf.logical_and(ok, tf.reduce_any(tf.equal(padded[3], CHANNELS)))
    crops = _after([_require(ok, "crops_shape", size[0], size[1], shape)], crops,
                   [None, *input_size, None])  # fmt: skip
    finite = _require(tf.reduce_all(tf.math.is_finite(crops)), "crops_finite")
    return _to_rgb(_after([finite], crops, [None, *input_size, None]))


def _to_rgb(images: tf.Tensor) -> tf.Tensor:
    """[..., C] with C in :data:`CHANNELS` -> [..., 3]: grey replicated, alpha dropped, RGB
    untouched (no copy)."""
    branch = tf.shape(images)[-1] // 2  # 1 -> 0, 3 -> 1, 4 -> 2
    rgb = tf.switch_case(branch, [lambda: tf.tile(images[..., :1], [1, 1, 1, 3]),
                                  lambda: images, lambda: images[..., :3]])  # fmt: skip
    return tf.ensure_shape(rgb, [*images.shape[:-1], 3])


def _usable_boxes(boxes: tf.Tensor, hw: tf.Tensor) -> tf.Tensor:
    """bool [N]: whole-image rows (w or h <= 0), and boxes that overlap their image (pixel
    centres x..x+w-1, y..y+h-1) and are at most :data:`MAX_BOX_SCALE` times its size."""
    x, y, w, h = tf.unstack(boxes, axis=-1)
    img_h, img_w = hw[:, 0], hw[:, 1]
    whole = tf.logical_or(w <= 0, h <= 0)
    inside = (x < img_w) & (y < img_h) & (x + w > 0) & (y + h > 0)
    sane = (w <= MAX_BOX_SCALE * img_w) & (h <= MAX_BOX_SCALE * img_h)
    return whole | (inside & sane)


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
