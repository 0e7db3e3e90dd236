"""TF Serving export: a SavedModel whose signatures return keypoints in image pixels.

Example:
    >>> from kpnet.export import export_saved_model
    >>> path = export_saved_model("runs/pins/best.keras", "exported/pins/1")  # doctest: +SKIP

Signatures (all outputs float32; K = ``spec.num_keypoints``, C = ``spec.num_channels``):

* ``serving_default(images, boxes)``: ``images`` uint8 [N, H, W, 3] RGB of any size,
  ``boxes`` float32 [N, 4] = (x, y, w, h) in image pixels, one box per image row (repeat an
  image for several boxes). A box with ``w <= 0`` or ``h <= 0`` means "the whole image".
  Returns ``keypoints`` [N, K, 2] (x, y) image pixels and ``scores`` [N, K].
* ``whole_image(images)``: the same on whole images (no boxes input).
* ``crops(crops)``: float32 [N, in_h, in_w, 3] RGB 0..255, already cropped to the model's
  input size; returns ``keypoints`` [N, K, 2] crop pixels, ``scores`` [N, K] and
  ``heatmaps`` [N, in_h/4, in_w/4, C] (RefineNet output, flip-averaged under flip test).
* ``metadata()``: ``spec_json`` (the KeypointSpec as JSON: names, skeleton, flip pairs, ...),
  ``input_size`` int32 [2] = (in_h, in_w) and ``padding`` float32 [2].

The keypoint spec is also stored as the asset ``assets/spec.json``.

Geometry matches :mod:`kpnet.codec` and the evaluation pipeline: a box becomes a crop
region with :func:`kpnet.codec.box_to_center_scale` (``padding``, no training extension),
the whole image becomes the box (0, 0, W, H) with padding (1, 1); crops are bilinear warps
with pixel centres at integer coordinates (as :func:`kpnet.codec.crop_affine` and OpenCV).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import keras
import tensorflow as tf

from kpnet.inference import KeypointDecoder, load_model, with_heatmaps
from kpnet.spec import KeypointSpec, SpecError

#: Box padding of the evaluation crops (tf-cpn: 0.1 / 0.15 per side).
DEFAULT_PADDING: tuple[float, float] = (1.2, 1.3)
#: Padding of the whole-image box (0, 0, W, H): the image itself, letterboxed to the aspect.
WHOLE_IMAGE_PADDING: tuple[float, float] = (1.0, 1.0)
SIGNATURES: tuple[str, ...] = ("serving_default", "whole_image", "crops", "metadata")


def export_saved_model(
    keypoints_model_or_path: keras.Model | str | Path,
    out_dir: str | Path,
    spec: KeypointSpec | None = None,
    input_size: Sequence[int] | None = None,
    padding: Sequence[float] = DEFAULT_PADDING,
    flip_test: bool = False,
) -> Path:
    """Write a TF Serving SavedModel of a keypoints model (signatures: see the module doc).

    Args:
        keypoints_model_or_path: a keypoints model (:func:`kpnet.inference.load_model`) or
            the path of a ``.keras`` keypoints / heatmap model.
        out_dir: SavedModel directory (TF Serving wants ``.../<name>/<version>``); replaced
            only once the new export is complete.
        spec: keypoint spec; default: the one inside the model's decoder layer.
        input_size: (in_h, in_w) crop size; default (and must match) the model's input.
        padding: box padding (x, y) of top-down crops.
        flip_test: (path only) load the model with flip test.

    Returns:
        The SavedModel directory.
    """
    model = _as_keypoints_model(keypoints_model_or_path, spec, flip_test)
    spec = spec or _model_spec(model)
    size = _input_size(model, input_size)
    module = KeypointServingModule(model, spec, size, padding)
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        spec_file = tmp / "spec.json"  # becomes assets/spec.json inside the SavedModel
        spec_file.write_text(json.dumps(spec.to_dict(), indent=2))
        module.spec_asset = tf.saved_model.Asset(str(spec_file))
        signatures = {name: getattr(module, name) for name in SIGNATURES}
        tf.saved_model.save(module, str(tmp / "saved_model"), signatures=signatures)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        (tmp / "saved_model").rename(out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


class KeypointServingModule(tf.Module):
    """The exported object: crop geometry in TF ops around a keypoints model.

    Args:
        keypoints_model: images -> {"keypoints", "scores"} (a :mod:`kpnet.inference` model).
        spec: its keypoint spec.
        input_size: (in_h, in_w) of the model input.
        padding: box padding (x, y).
    """

    def __init__(
        self,
        keypoints_model: keras.Model,
        spec: KeypointSpec,
        input_size: Sequence[int],
        padding: Sequence[float] = DEFAULT_PADDING,
    ) -> None:
        super().__init__(name="kpnet_serving")
        model = with_heatmaps(keypoints_model)
        # Track only the variables: tracking the Keras model makes saving trace its own
        # functions again (3x slower) and stores nothing the signatures need.
        self.model_variables = [getattr(v, "value", v) for v in model.variables]
        self._forward = lambda crops: model(crops, training=False)
        self.input_size = (int(input_size[0]), int(input_size[1]))
        self.padding = (float(padding[0]), float(padding[1]))
        self.spec_json = json.dumps(spec.to_dict())
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
        transforms = crop_transforms(boxes, tf.shape(images)[1:3], self.input_size, self.padding)
        crops = tf.raw_ops.ImageProjectiveTransformV3(
            images=images, transforms=transforms, output_shape=list(self.input_size),
            fill_value=0.0, interpolation="BILINEAR", fill_mode="CONSTANT",
        )  # fmt: skip
        out = self.crops(tf.cast(crops, tf.float32))  # one traced forward for all signatures
        a, b = transforms[:, None, 0:3], transforms[:, None, 3:6]  # crop -> image, [N,1,3]
        x, y = out["keypoints"][..., 0], out["keypoints"][..., 1]
        xy = tf.stack([a[..., 0] * x + a[..., 1] * y + a[..., 2],
                       b[..., 0] * x + b[..., 1] * y + b[..., 2]], axis=-1)  # fmt: skip
        return {"keypoints": xy, "scores": out["scores"]}

    def _whole_image(self, images: tf.Tensor) -> dict[str, tf.Tensor]:
        return self.serving_default(images, tf.zeros([tf.shape(images)[0], 4], tf.float32))

    def _crops(self, crops: tf.Tensor) -> dict[str, tf.Tensor]:
        out = self._forward(tf.cast(crops, tf.float32))
        return {k: tf.cast(out[k], tf.float32) for k in ("keypoints", "scores", "heatmaps")}

    def _metadata(self) -> dict[str, tf.Tensor]:
        return {
            "spec_json": tf.constant(self.spec_json),
            "input_size": tf.constant(self.input_size, tf.int32),
            "padding": tf.constant(self.padding, tf.float32),
        }


def crop_transforms(
    boxes: tf.Tensor,
    image_hw: tf.Tensor,
    input_size: Sequence[int],
    padding: Sequence[float] = DEFAULT_PADDING,
) -> tf.Tensor:
    """Crop -> image projective transforms [N, 8] (ImageProjectiveTransformV3 layout).

    TF twin of ``codec.crop_affine(*codec.box_to_center_scale(box, in_w / in_h, padding),
    input_size)`` inverted; boxes with w <= 0 or h <= 0 use the whole image (padding 1).
    """
    out_h, out_w = float(input_size[0]), float(input_size[1])
    aspect = out_w / out_h
    boxes = tf.cast(boxes, tf.float32)
    hw = tf.cast(image_hw, tf.float32)
    whole = tf.logical_or(boxes[:, 2] <= 0, boxes[:, 3] <= 0)
    full = tf.broadcast_to(tf.stack([0.0, 0.0, hw[1], hw[0]]), tf.shape(boxes))
    boxes = tf.where(whole[:, None], full, boxes)
    pad = tf.where(whole[:, None], tf.constant([WHOLE_IMAGE_PADDING]), tf.constant([padding]))
    wh = tf.maximum(boxes[:, 2:], 1.0)
    center = boxes[:, :2] + (wh - 1.0) * 0.5
    w, h = wh[:, 0] * pad[:, 0], wh[:, 1] * pad[:, 1]
    wider = w > aspect * h
    w, h = tf.where(wider, w, h * aspect), tf.where(wider, w / aspect, h)
    inv_sx, inv_sy = w / out_w, h / out_h  # image pixels per crop pixel
    zeros = tf.zeros_like(w)
    return tf.stack(
        [inv_sx, zeros, center[:, 0] - inv_sx * (out_w - 1.0) * 0.5,
         zeros, inv_sy, center[:, 1] - inv_sy * (out_h - 1.0) * 0.5, zeros, zeros],
        axis=1,
    )  # fmt: skip


# --------------------------------------------------------------------------- helpers
def _as_keypoints_model(model_or_path, spec: KeypointSpec | None, flip_test: bool) -> keras.Model:
    if isinstance(model_or_path, keras.Model):
        if not _decoders(model_or_path):
            raise ValueError(
                f"export_saved_model: model {model_or_path.name!r} has no KeypointDecoder; "
                "wrap heatmap models with kpnet.inference.build_keypoints_model first"
            )
        return model_or_path
    options = {"flip_test": True} if flip_test else {}
    return load_model(model_or_path, spec, **options)


def _decoders(model: keras.Model) -> list[KeypointDecoder]:
    return [layer for layer in model.layers if isinstance(layer, KeypointDecoder)]


def _model_spec(model: keras.Model) -> KeypointSpec:
    decoders = _decoders(model)
    if not decoders:
        raise SpecError(f"model {model.name!r} holds no keypoint spec; pass spec=...")
    return decoders[0].spec


def _input_size(model: keras.Model, input_size: Sequence[int] | None) -> tuple[int, int]:
    h, w = tuple(model.inputs[0].shape[1:3])
    if input_size is None:
        if h is None or w is None:
            raise ValueError(f"model {model.name!r} has no fixed input size; pass input_size")
        return int(h), int(w)
    size = (int(input_size[0]), int(input_size[1]))
    if h is not None and (int(h), int(w)) != size:
        raise ValueError(f"input_size {size} does not match the model input {(h, w)}")
    return size
