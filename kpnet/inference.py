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

import json
from pathlib import Path
from typing import Any

import cv2
import keras
import numpy as np
from keras import ops

from kpnet import codec
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


@keras.saving.register_keras_serializable(package="kpnet")
class KeypointDecoder(keras.layers.Layer):
    """Heatmaps [B, h, w, C] -> {"keypoints": [B, K, 2] input pixels, "scores": [B, K]}.

    Keypoints that share a channel (``spec.shares_channels``) receive that channel's peaks
    (:func:`kpnet.codec.decode_multi_peak`) in order of decreasing score; missing peaks
    have score 0. Other channels use :func:`kpnet.codec.decode_heatmaps`.

    Args:
        spec: the :class:`KeypointSpec` or its ``to_dict()``.
        stride: input pixels per heatmap pixel.
        method: ``"dark"``, ``"quarter"`` or ``"argmax"``.
        sigma: Gaussian sigma of the decoded output (DARK smoothing).
        max_peaks: peaks searched per shared channel (default: its number of keypoints).
        threshold, min_distance: multi-peak options (heatmap value, heatmap pixels).
    """

    def __init__(
        self,
        spec: KeypointSpec | dict[str, Any],
        stride: int = 4,
        method: str = "dark",
        sigma: float = codec.DEFAULT_REFINE_SIGMA,
        max_peaks: int | None = None,
        threshold: float = 0.1,
        min_distance: int = 2,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.spec = spec if isinstance(spec, KeypointSpec) else KeypointSpec.from_dict(spec)
        if method not in codec.DECODE_METHODS:
            raise ValueError(f"KeypointDecoder: method {method!r} not in {codec.DECODE_METHODS}")
        most = max(len(self.spec.keypoints_in_channel(c)) for c in range(self.spec.num_channels))
        if max_peaks is not None and int(max_peaks) < most:
            raise ValueError(
                f"KeypointDecoder: max_peaks={max_peaks} but a channel holds {most} keypoints"
            )
        self.stride, self.method, self.sigma = int(stride), method, float(sigma)
        self.max_peaks = None if max_peaks is None else int(max_peaks)
        self.threshold, self.min_distance = float(threshold), int(min_distance)
        self._num_peaks = (self.max_peaks or most) if self.spec.shares_channels else 0
        self._gather = self._gather_index()

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
        xy, scores = codec.decode_heatmaps(heatmaps, self.method, self.sigma)
        xy, scores = xy[:, :, None], scores[:, :, None]  # [B,C,1,2], [B,C,1]
        if self.spec.shares_channels:
            mxy, msc = codec.decode_multi_peak(
                heatmaps, self._num_peaks, self.threshold, self.min_distance,
                self.method, self.sigma,
            )  # fmt: skip
            xy = ops.concatenate([xy, mxy], axis=2)
            scores = ops.concatenate([scores, msc], axis=2)
        rows = self.spec.num_channels * (1 + self._num_peaks)
        xy = ops.take(ops.reshape(xy, (-1, rows, 2)), self._gather, axis=1)
        scores = ops.take(ops.reshape(scores, (-1, rows)), self._gather, axis=1)
        return {"keypoints": codec.heatmap_to_input(xy, self.stride), "scores": scores}

    def get_config(self) -> dict[str, Any]:
        return {
            **super().get_config(),
            "spec": self.spec.to_dict(),
            "stride": self.stride,
            "method": self.method,
            "sigma": self.sigma,
            "max_peaks": self.max_peaks,
            "threshold": self.threshold,
            "min_distance": self.min_distance,
        }


def build_keypoints_model(
    heatmap_model: keras.Model,
    spec: KeypointSpec,
    method: str = "dark",
    flip_test: bool = False,
    max_peaks: int | None = None,
    threshold: float = 0.1,
    min_distance: int = 2,
    sigma: float = codec.DEFAULT_REFINE_SIGMA,
    output: str = "refine",
) -> keras.Model:
    """Wrap a heatmap model into a model whose ``predict()`` returns keypoints.

    Args:
        heatmap_model: images [B, H, W, 3] -> heatmaps [B, h, w, C] or a dict of them
            (``output`` picks one, default the RefineNet's).
        spec: the keypoint spec (``spec.num_channels`` must equal C).
        flip_test: also run the horizontally flipped batch and average the heatmaps.
        method, max_peaks, threshold, min_distance, sigma: see :class:`KeypointDecoder`.

    Returns:
        A functional model: images (RGB 0..255) -> {"keypoints" [B, K, 2] input pixels,
        "scores" [B, K]}. The heatmap model is ``model.get_layer("heatmaps")``.
    """
    heatmaps_net = _named_heatmap_model(heatmap_model)
    in_shape = tuple(heatmaps_net.inputs[0].shape[1:])
    images = keras.Input(in_shape, name="images")
    heatmaps = _pick_output(heatmaps_net(images), output)
    if int(heatmaps.shape[-1]) != spec.num_channels:
        raise SpecError(
            f"the heatmap model outputs {heatmaps.shape[-1]} channels but the spec has "
            f"{spec.num_channels}; pass the spec the model was trained with"
        )
    if flip_test:
        flipped = _pick_output(heatmaps_net(HorizontalFlip(name="flip_images")(images)), output)
        unflip = HorizontalFlip(list(spec.channel_flip_index), name="unflip_heatmaps")
        heatmaps = keras.layers.Average(name="flip_average")([heatmaps, unflip(flipped)])
    stride = _stride(in_shape, heatmaps.shape)
    decoder = KeypointDecoder(
        spec.to_dict(), stride, method, sigma, max_peaks, threshold, min_distance, name="decode"
    )
    return keras.Model(images, decoder(heatmaps), name="keypoints")


def with_heatmaps(keypoints_model: keras.Model) -> keras.Model:
    """The keypoints model with a third output ``heatmaps`` (the decoder's input).

    Used by ``kpnet predict --heatmaps`` and the SavedModel ``crops`` signature.
    """
    decoder = next(la for la in keypoints_model.layers if isinstance(la, KeypointDecoder))
    outputs = {k: keypoints_model.output[k] for k in ("keypoints", "scores")}
    return keras.Model(
        keypoints_model.inputs, {**outputs, "heatmaps": decoder.input}, name="with_heatmaps"
    )


def load_model(path: str | Path, spec: KeypointSpec | dict | None = None, **options: Any):
    """Load a keypoints model, or a heatmap model and wrap it (see build_keypoints_model).

    Args:
        path: a ``.keras`` file holding a keypoints model or a heatmap model.
        spec: spec of a heatmap model; default: ``spec.json`` beside ``path``.
        **options: decode options of :func:`build_keypoints_model`; given for a keypoints
            model, its heatmap model is re-wrapped with them (other options kept).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"load_model: no model file at {path}")
    _register_model_layers()
    model = keras.saving.load_model(path, compile=False, safe_mode=True)  # inference only
    decoders = [layer for layer in model.layers if isinstance(layer, KeypointDecoder)]
    if decoders:
        if not options:
            return model
        config = decoders[0].get_config()
        kept = {k: config[k] for k in ("method", "sigma", "max_peaks", "threshold", "min_distance")}
        kept["flip_test"] = any(layer.name == "flip_average" for layer in model.layers)
        options = {**kept, **options}
        spec = spec or decoders[0].spec
        model = model.get_layer(HEATMAP_MODEL_NAME)
    spec = _resolve_spec(spec, path)
    return build_keypoints_model(model, spec, **options)


def _resolve_spec(spec: KeypointSpec | dict | None, path: Path) -> KeypointSpec:
    if isinstance(spec, KeypointSpec):
        return spec
    if spec is not None:
        return KeypointSpec.from_dict(spec)
    spec_file = path.with_name("spec.json")
    if not spec_file.is_file():
        raise SpecError(
            f"{path} is a heatmap model and no spec was given: pass spec=... or write the "
            f"KeypointSpec.to_dict() as JSON to {spec_file}"
        )
    try:
        return KeypointSpec.from_dict(json.loads(spec_file.read_text()))
    except (json.JSONDecodeError, SpecError) as err:
        raise SpecError(f"{spec_file}: {err}") from err


def _register_model_layers() -> None:
    """Register kpnet's Keras objects (backbone layers, losses, schedule) before loading."""
    from kpnet.saving import register_keras_objects

    register_keras_objects()


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
) -> np.ndarray:
    """Draw one instance's keypoints [K, 2] and skeleton on a copy of an RGB uint8 image.

    Keypoints scoring below ``threshold`` (and limbs touching them) are skipped.

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
    for i, j in spec.skeleton:
        if ok[i] and ok[j]:
            cv2.line(out, pts[i], pts[j], colors[i], thickness, cv2.LINE_AA)
    for k in np.flatnonzero(ok):
        cv2.circle(out, pts[k], radius, colors[k], -1, cv2.LINE_AA)
        if names:
            org = (pts[k][0] + radius + 1, pts[k][1])
            cv2.putText(out, spec.names[k], org, cv2.FONT_HERSHEY_SIMPLEX, 0.35, colors[k], 1)
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
