"""The keypoints model: heatmap model + in-graph decoding (+ flip test), loading and drawing.

``predict()`` on a keypoints model returns keypoints, not heatmaps. The heatmap model is a
named sub-model: ``keypoints_model.get_layer("heatmaps")``.

Example:
    >>> import keras, numpy as np
    >>> from kpnet.spec import KeypointSpec
    >>> spec = KeypointSpec(names=("a", "b"))
    >>> images = keras.Input((64, 48, 3))
    >>> hm = keras.layers.Conv2D(2, 4, strides=4, name="refine")(images)
    >>> heatmap_model = keras.Model(images, {"refine": hm})
    >>> model = build_keypoints_model(heatmap_model, spec, flip_test=True)
    >>> out = model.predict(np.zeros((1, 64, 48, 3), "uint8"), verbose=0)
    >>> out["keypoints"].shape, out["scores"].shape
    ((1, 2, 2), (1, 2))
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path
from typing import Any

import cv2
import keras
import numpy as np
from keras import ops

from kpnet import codec as codec_lib
from kpnet import (
    fs,
    models,  # noqa: F401  registers the backbones' layers for loading
)
from kpnet.models.fused_bn import fuse_batchnorm
from kpnet.run_folder import (
    SPEC,
    ModelFileError,
    RunFolder,
    check_model_file,
    model_file_advice,
    model_path,
)
from kpnet.spec import KeypointSpec, SpecError

HEATMAP_MODEL_NAME = "heatmaps"


@keras.saving.register_keras_serializable(package="kpnet")
class HorizontalFlip(keras.layers.Layer):
    """Mirror [B, H, W, C] tensors left-right and optionally permute the channels.

    With ``channel_index=spec.channel_flip_index`` it maps heatmaps of a flipped image back
    onto the original one. Pixel centres sit at integer coordinates, so ``x -> W - 1 - x``
    is the exact mirror in the input and in the heatmap frame alike (no one-pixel shift).
    """

    def __init__(self, channel_index: list[int] | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.channel_index = None if channel_index is None else [int(c) for c in channel_index]

    def call(self, inputs):
        x = ops.flip(inputs, axis=2)
        if self.channel_index is not None and self.channel_index != sorted(self.channel_index):
            x = ops.take(x, self.channel_index, axis=3)
        return x

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "channel_index": self.channel_index}


#: Decoding options of :class:`kpnet.codec.Codec` that ``load_model(**options)`` may change.
DECODE_OPTIONS: tuple[str, ...] = ("method", "flip_test", "max_peaks", "threshold",
                                   "min_distance", "refine_sigma")  # fmt: skip


@keras.saving.register_keras_serializable(package="kpnet")
class KeypointDecoder(keras.layers.Layer):
    """Heatmaps [B, h, w, C] -> {"keypoints": [B, K, 2] input pixels, "scores": [B, K]}.

    Decodes with the model's :class:`kpnet.codec.Codec` (stored in this layer's config, so
    a saved keypoints model carries its codec), always in float32, whatever the global
    mixed-precision policy. Keypoints that share a channel (``spec.shares_channels``)
    receive that channel's peaks (:func:`kpnet.codec.decode_multi_peak`) in order of
    decreasing score; missing peaks have score 0. Other channels use
    :func:`kpnet.codec.decode_heatmaps`.

    Scores are the heatmap's peak value clipped to [0, 1]: the training target peaks at 1
    on a keypoint, so ~1 means a confident, well-placed peak and ~0 that nothing was found
    (like DeepLabCut's likelihood, not a calibrated probability).

    Args:
        spec: the :class:`KeypointSpec` or its ``to_dict()``.
        codec: the :class:`kpnet.codec.Codec` or its ``to_dict()``.
    """

    def __init__(
        self,
        spec: KeypointSpec | dict[str, Any],
        codec: codec_lib.Codec | dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        legacy = {k: kwargs.pop(k) for k in _LEGACY_KEYS if k in kwargs}  # kpnet <= 0.1 files
        kwargs["dtype"] = "float32"
        super().__init__(**kwargs)
        self.spec = spec if isinstance(spec, KeypointSpec) else KeypointSpec.from_dict(spec)
        self.codec = _as_codec(codec, legacy)
        most = max(len(self.spec.keypoints_in_channel(c)) for c in range(self.spec.num_channels))
        max_peaks = self.codec.max_peaks
        if max_peaks is not None and max_peaks < most:
            raise ValueError(
                f"KeypointDecoder: max_peaks={max_peaks} but a channel holds {most} keypoints"
            )
        self._num_peaks = (max_peaks or most) if self.spec.shares_channels else 0
        self._gather = self._gather_index()

    @property
    def stride(self) -> int:
        return self.codec.stride

    def _gather_index(self) -> list[int]:
        """Index of each keypoint in the flattened [C, 1 + N] table (single peak, then N)."""
        spec, width = self.spec, 1 + self._num_peaks
        out = []
        for k, c in enumerate(spec.channels):
            members = spec.keypoints_in_channel(c)
            rank = 0 if len(members) == 1 else 1 + members.index(k)
            out.append(c * width + rank)
        return out

    def call(self, heatmaps):
        heatmaps = ops.cast(heatmaps, "float32")
        xy, scores = self.codec.decode(heatmaps)  # input pixels
        xy, scores = xy[:, :, None], scores[:, :, None]  # [B,C,1,2], [B,C,1]
        if self.spec.shares_channels:
            mxy, msc = self.codec.decode_peaks(heatmaps, self._num_peaks)
            xy = ops.concatenate([xy, mxy], axis=2)
            scores = ops.concatenate([scores, msc], axis=2)
        rows = self.spec.num_channels * (1 + self._num_peaks)
        xy = ops.take(ops.reshape(xy, (-1, rows, 2)), self._gather, axis=1)
        scores = ops.take(ops.reshape(scores, (-1, rows)), self._gather, axis=1)
        return {"keypoints": xy, "scores": ops.clip(scores, 0.0, 1.0)}

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "spec": self.spec.to_dict(), "codec": self.codec.to_dict()}


_LEGACY_KEYS = ("stride", "method", "sigma", "max_peaks", "threshold", "min_distance")


def _as_codec(codec, legacy: dict[str, Any]) -> codec_lib.Codec:
    if isinstance(codec, codec_lib.Codec):
        return codec
    if isinstance(codec, dict):
        return codec_lib.Codec.from_dict(codec)
    if "sigma" in legacy:
        legacy["refine_sigma"] = legacy.pop("sigma")
    return codec_lib.Codec(**legacy)


def build_keypoints_model(
    heatmap_model: keras.Model,
    spec: KeypointSpec,
    codec: codec_lib.Codec | None = None,
    output: str = "refine",
    **decode_options: Any,
) -> keras.Model:
    """Wrap a heatmap model into a model whose ``predict()`` returns keypoints.

    Args:
        heatmap_model: images [B, H, W, 3] -> heatmaps [B, h, w, C] or a dict of them
            (``output`` picks one, default the RefineNet's).
        spec: the keypoint spec (``spec.num_channels`` must equal C).
        codec: the model's :class:`kpnet.codec.Codec` (default: one for its input size);
            its ``flip_test`` also runs the horizontally flipped batch and averages the
            heatmaps, in float32.
        **decode_options: codec fields to change (:data:`DECODE_OPTIONS`; ``sigma`` is
            ``refine_sigma``).

    Returns:
        A functional model: images (RGB 0..255) -> {"keypoints" [B, K, 2] input pixels,
        "scores" [B, K]}. The heatmap model is ``model.get_layer("heatmaps")``.
    """
    heatmaps_net = _named_heatmap_model(heatmap_model)
    in_shape = tuple(heatmaps_net.inputs[0].shape[1:])
    codec = _with_options(codec or codec_lib.Codec(input_size=in_shape[:2]), decode_options)
    images = keras.Input(in_shape, name="images")
    heatmaps = _pick_output(heatmaps_net(images), output)
    if int(heatmaps.shape[-1]) != spec.num_channels:
        raise SpecError(
            f"the heatmap model outputs {heatmaps.shape[-1]} channels but the spec has "
            f"{spec.num_channels}; pass the spec the model was trained with"
        )
    stride = _stride(in_shape, heatmaps.shape)
    if tuple(in_shape[:2]) != codec.input_size or stride != codec.stride:
        raise ValueError(
            f"the codec's input size {codec.input_size} / stride {codec.stride} do not match "
            f"the heatmap model's {tuple(in_shape[:2])} / {stride}"
        )
    if codec.flip_test:
        flipped = HorizontalFlip(name="flip_images", dtype="float32")(images)
        flipped = _pick_output(heatmaps_net(flipped), output)
        unflip = HorizontalFlip(list(spec.channel_flip_index), name="unflip_heatmaps",
                                dtype="float32")  # fmt: skip
        heatmaps = keras.layers.Average(name="flip_average", dtype="float32")(
            [heatmaps, unflip(flipped)]
        )
    decoder = KeypointDecoder(spec.to_dict(), codec.to_dict(), name="decode")
    return keras.Model(images, decoder(heatmaps), name="keypoints")


def _with_options(codec: codec_lib.Codec, options: dict[str, Any]) -> codec_lib.Codec:
    options = dict(options)
    if "sigma" in options:
        options["refine_sigma"] = options.pop("sigma")
    unknown = sorted(set(options) - set(DECODE_OPTIONS))
    if unknown:
        raise ValueError(f"unknown decode options {unknown}; choose from {DECODE_OPTIONS}")
    return codec.replace(**options) if options else codec


def decoder_of(keypoints_model: keras.Model) -> KeypointDecoder:
    """The :class:`KeypointDecoder` layer of a keypoints model (ValueError if none)."""
    for layer in keypoints_model.layers:
        if isinstance(layer, KeypointDecoder):
            return layer
    raise ValueError(
        f"model {keypoints_model.name!r} has no KeypointDecoder; wrap heatmap models with "
        "kpnet.inference.build_keypoints_model first"
    )


def codec_of(keypoints_model: keras.Model) -> codec_lib.Codec:
    """The codec a keypoints model decodes (and crops) with."""
    return decoder_of(keypoints_model).codec


def with_heatmaps(keypoints_model: keras.Model) -> keras.Model:
    """The keypoints model with a third output ``heatmaps`` (the decoder's input).

    Used by ``kpnet predict --heatmaps`` and the SavedModel ``crops`` signature.
    """
    decoder = next(la for la in keypoints_model.layers if isinstance(la, KeypointDecoder))
    outputs = {k: keypoints_model.output[k] for k in ("keypoints", "scores")}
    return keras.Model(
        keypoints_model.inputs, {**outputs, "heatmaps": decoder.input}, name="with_heatmaps"
    )


def load_model(
    path: str | Path,
    spec: KeypointSpec | dict | None = None,
    codec: codec_lib.Codec | None = None,
    **options: Any,
):
    """Load a keypoints model, or a heatmap model and wrap it (see build_keypoints_model).

    Args:
        path: a ``.keras`` file holding a keypoints model or a heatmap model, or a run
            folder (its ``keypoints.keras``, else ``best.keras`` / ``last.keras``); local or
            a URL (``gs://...``, copied to a local temporary file to load).
        spec: spec of a heatmap model; default: ``spec.json`` beside ``path``.
        codec: codec of a heatmap model; default: ``codec.json`` beside ``path`` (written
            by ``kpnet fit``), else the defaults for the model's input size.
        **options: decode options (:data:`DECODE_OPTIONS`); given for a keypoints model,
            its heatmap model is re-wrapped with its codec so changed.
    """
    path = model_path(path)
    model = load_keras_file(path, compile=False)  # inference only
    fuse_batchnorm(model)
    decoders = [layer for layer in model.layers if isinstance(layer, KeypointDecoder)]
    if decoders:
        if not options and codec is None:
            return model
        spec, codec = spec or decoders[0].spec, codec or decoders[0].codec
        model = model.get_layer(HEATMAP_MODEL_NAME)
    folder = RunFolder.of(path)
    spec = _resolve_spec(spec, path, folder)
    codec = codec or folder.saved_codec()
    return build_keypoints_model(model, spec, codec, **options)


def load_keras_file(path: str | Path, **kwargs: Any) -> keras.Model:
    """``keras.saving.load_model(path, safe_mode=True, **kwargs)`` for a local path or a URL;
    a file that is not a whole Keras model (empty, cut short, a broken ``config.json``) or
    that Keras cannot rebuild is one :class:`~kpnet.run_folder.ModelFileError` naming it."""
    with fs.local_copy(path) as local:
        check_model_file(local, name=path)
        try:
            return keras.saving.load_model(local, safe_mode=True, **kwargs)
        except (ValueError, KeyError, TypeError, OSError, EOFError, zipfile.BadZipFile) as err:
            raise ModelFileError(
                f"{path} cannot be loaded as a Keras model ({fs.reason(err)}); "
                f"{model_file_advice(os.fspath(path))}"
            ) from None


def _resolve_spec(spec: KeypointSpec | dict | None, path, folder: RunFolder) -> KeypointSpec:
    if isinstance(spec, KeypointSpec):
        return spec
    if spec is not None:
        return KeypointSpec.from_dict(spec)
    saved = folder.saved_spec()
    if saved is None:
        raise SpecError(
            f"{path} is a heatmap model and no spec was given: pass spec=... or write the "
            f"KeypointSpec.to_dict() as JSON to {folder.file(SPEC)}"
        )
    return saved


def _named_heatmap_model(model: keras.Model) -> keras.Model:
    """The heatmap model as a functional model named "heatmaps" (layers and weights shared)."""
    if model.name == HEATMAP_MODEL_NAME:
        return model
    if model.__class__.__name__ == "Functional":
        return keras.Model(model.inputs, model.output, name=HEATMAP_MODEL_NAME)
    try:
        images = keras.Input(tuple(model.inputs[0].shape[1:]))
    except (AttributeError, IndexError, TypeError) as err:
        raise ValueError(
            f"heatmap model {model.name!r} has no known input shape; build it first"
        ) from err
    return keras.Model(images, model(images), name=HEATMAP_MODEL_NAME)


def _pick_output(outputs, output: str):
    if isinstance(outputs, dict):
        if output not in outputs:
            raise ValueError(f"heatmap model has outputs {sorted(outputs)}, not {output!r}")
        return outputs[output]
    if isinstance(outputs, (list, tuple)):
        return outputs[-1]
    return outputs


def _stride(input_shape: tuple, heatmap_shape: tuple) -> int:
    h, hh = int(input_shape[0]), int(heatmap_shape[1])
    if h % hh:
        raise ValueError(f"input height {h} is not a multiple of heatmap height {hh}")
    return h // hh


# --------------------------------------------------------------------------- drawing
def draw_keypoints(
    image: np.ndarray,
    keypoints: np.ndarray,
    scores: np.ndarray,
    spec: KeypointSpec,
    threshold: float = 0.3,
    names: bool = False,
    radius: int = 3,
    thickness: int = 2,
    skeleton: bool = True,
) -> np.ndarray:
    """Draw one instance's keypoints [K, 2] and skeleton on a copy of an RGB uint8 image.

    Keypoints scoring below ``threshold`` (and limbs touching them) are skipped;
    ``skeleton=False`` draws the points only.

    Example:
        >>> img = np.zeros((32, 32, 3), np.uint8)
        >>> out = draw_keypoints(img, np.array([[8.0, 8.0]]), np.array([0.9]),
        ...                      KeypointSpec(names=("a",)))
        >>> bool(out[8, 8].any()), bool(img.any())
        (True, False)
    """
    out = np.ascontiguousarray(image, dtype=np.uint8).copy()
    kp = np.asarray(keypoints, np.float32).reshape(-1, 2)
    sc = np.asarray(scores, np.float32).reshape(-1)
    if len(kp) != spec.num_keypoints or len(sc) != spec.num_keypoints:
        raise ValueError(
            f"draw_keypoints: got {len(kp)} keypoints / {len(sc)} scores for a spec "
            f"with {spec.num_keypoints}"
        )
    colors = _palette(spec.num_keypoints)
    ok = np.isfinite(kp).all(-1) & (sc >= threshold)
    pts = [(int(round(x)), int(round(y))) for x, y in np.nan_to_num(kp)]
    for i, j in spec.skeleton if skeleton else ():
        if ok[i] and ok[j]:
            cv2.line(out, pts[i], pts[j], colors[i], thickness, cv2.LINE_AA)
    for k in np.flatnonzero(ok):
        cv2.circle(out, pts[k], radius, colors[k], -1, cv2.LINE_AA)
        if names:
            org = (pts[k][0] + radius + 1, pts[k][1])
            cv2.putText(out, spec.names[k], org, cv2.FONT_HERSHEY_SIMPLEX, 0.35, colors[k], 1)
    return out


def draw_trails(
    image: np.ndarray, history: np.ndarray, valid: np.ndarray, thickness: int = 1
) -> np.ndarray:
    """Draw each keypoint's recent path on an RGB uint8 image (in place; returned).

    ``history`` [T, K, 2] holds the last T positions (oldest first), ``valid`` [T, K] which
    of them to connect (confident ones); colours are :func:`draw_keypoints`' own.

    Example:
        >>> img = np.zeros((20, 20, 3), np.uint8)
        >>> pts = np.array([[[2.0, 2.0]], [[15.0, 2.0]]])
        >>> bool(draw_trails(img, pts, np.ones((2, 1), bool))[2, 8].any())
        True
    """
    out = np.ascontiguousarray(image, dtype=np.uint8)
    hist = np.asarray(history, np.float64)
    colors = _palette(hist.shape[1])
    for k in range(hist.shape[1]):
        for t in range(1, hist.shape[0]):
            a, b = hist[t - 1, k], hist[t, k]
            if valid[t - 1, k] and valid[t, k] and np.isfinite(a).all() and np.isfinite(b).all():
                p, q = (int(round(a[0])), int(round(a[1]))), (int(round(b[0])), int(round(b[1])))
                cv2.line(out, p, q, colors[k], thickness, cv2.LINE_AA)
    return out


def heatmap_overlay(image: np.ndarray, heatmaps: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Blend the channel-wise maximum of heatmaps [h, w, C] (JET colours) over an RGB image."""
    img = np.ascontiguousarray(image, dtype=np.uint8)
    hm = np.asarray(heatmaps, np.float32)
    hm = hm.max(axis=-1) if hm.ndim == 3 else hm
    hm = cv2.resize(hm, (img.shape[1], img.shape[0]), interpolation=cv2.INTER_LINEAR)
    hm = np.clip(hm, 0.0, 1.0)
    color = cv2.cvtColor(cv2.applyColorMap((hm * 255).astype(np.uint8), cv2.COLORMAP_JET),
                         cv2.COLOR_BGR2RGB)  # fmt: skip
    return cv2.addWeighted(img, 1.0 - alpha, color, alpha, 0.0)


def _palette(n: int) -> list[tuple[int, int, int]]:
    hsv = np.stack([np.linspace(0, 179, n, endpoint=False), np.full(n, 220), np.full(n, 255)], -1)
    rgb = cv2.cvtColor(hsv.astype(np.uint8)[None], cv2.COLOR_HSV2RGB)[0]
    return [tuple(int(v) for v in c) for c in rgb]
