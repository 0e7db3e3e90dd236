"""Training augmentation: random affine parameters, exact affine matrices, photometric jitter.

Everything geometric is expressed as ONE [2, 3] matrix per sample (image -> input crop,
built by :func:`kpnet.codec.crop_affine`) that the pipeline applies to the
image and to the keypoints alike, so the two cannot disagree. Randomness is stateless and
keyed by a seed tensor, so a pipeline is reproducible under a seed whatever its parallelism.

Example:
    >>> import tensorflow as tf
    >>> scale, rot, flip, _ = sample_geometry(AugmentConfig(), tf.constant([1, 2]), 4)
    >>> tuple(scale.shape), rot.dtype.name, flip.dtype.name
    ((4,), 'float32', 'bool')

Choices (documented defaults):

* scale: the crop region's size is multiplied by ``s ~ U(scale)`` (s > 1 zooms out).
* translate: the crop region's centre moves by ``U(-translate, translate)`` times its size in
  x and in y (0 by default; whole-frame models need it: without it each point of the frame
  always lands near the same input pixel, and the model learns positions, not looks).
* rotation: ``U(-rotation, rotation)`` degrees, applied with probability ``rotation_prob``
  (0.6 as in SimpleBaselines / HRNet; tf-cpn rotates every sample, set 1.0 for that).
* flip: horizontal mirror with probability 0.5, part of the matrix; the keypoint order is
  permuted with ``spec.flip_index``.
* half body (HRNet): with probability ``half_body_prob``, for instances with at least
  ``half_body_min_keypoints`` labelled points, the crop is re-centred on the labelled points
  of the upper or the lower body.
* photometric: built-in colour jitter (brightness / contrast / saturation as ONE OpenCV
  colour transform, ~0.02 ms a 256x192 crop; brightness and contrast on by default; hue
  shifts in HSV cost ~0.15 ms more, off by default) and/or
  albumentations transforms named in ``photometric``; both run on the uint8 input crop
  after the geometric warp.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np
import tensorflow as tf

from kpnet.codec import box_to_center_scale
from kpnet.spec import COCO17_NAMES, KeypointSpec

#: COCO-17 upper body for half-body augmentation (nose .. wrists).
COCO_UPPER_BODY: tuple[str, ...] = COCO17_NAMES[:11]


@dataclass(frozen=True)
class AugmentConfig:
    """Training augmentation settings (ignored when the pipeline is not training).

    Args:
        scale: range of the random crop-size factor (s > 1 zooms out).
        translate: maximum shift of the crop region's centre, as a fraction of its size.
        rotation: maximum absolute rotation in degrees.
        rotation_prob: probability of rotating a sample at all.
        flip: random horizontal flips (uses ``spec.flip_index``).
        half_body_prob: probability of a half-body crop (0 disables).
        half_body_min_keypoints: labelled keypoints an instance needs for a half-body crop.
        upper_body: names of upper-body keypoints; None uses the COCO upper body when the spec
            has those names (half body is then unavailable for other specs).
        brightness: max brightness delta as a fraction of 255 (0 disables).
        contrast: contrast factor drawn from [1 - contrast, 1 + contrast] (0 disables).
        saturation: saturation factor drawn from [1 - saturation, 1 + saturation].
        hue: max hue delta in [0, 0.5].
        photometric: albumentations transforms, each ``{"name": "Blur", **kwargs}``, built
            with ``getattr(albumentations, name)(**kwargs)``.
    """

    scale: tuple[float, float] = (0.7, 1.35)
    translate: float = 0.0
    rotation: float = 45.0
    rotation_prob: float = 0.6
    flip: bool = True
    half_body_prob: float = 0.0
    half_body_min_keypoints: int = 8
    upper_body: tuple[str, ...] | None = None
    brightness: float = 0.2
    contrast: float = 0.2
    saturation: float = 0.2
    hue: float = 0.0
    photometric: tuple[Mapping[str, Any], ...] = field(default=())

    def __post_init__(self) -> None:
        object.__setattr__(self, "scale", tuple(float(s) for s in self.scale))
        for key in ("translate", "rotation", "rotation_prob", "half_body_prob", "brightness",
                    "contrast", "saturation", "hue"):  # fmt: skip
            object.__setattr__(self, key, float(getattr(self, key)))
        object.__setattr__(self, "photometric", tuple(dict(t) for t in self.photometric or ()))
        if len(self.scale) != 2 or not 0 < self.scale[0] <= self.scale[1]:
            raise ValueError(f"augment.scale: need 0 < low <= high, got {self.scale}")
        for key in ("rotation_prob", "half_body_prob"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise ValueError(f"augment.{key}: must be in [0, 1], got {getattr(self, key)}")
        if not 0.0 <= self.translate <= 1.0:
            raise ValueError(f"augment.translate: must be in [0, 1], got {self.translate}")
        if not 0.0 <= self.hue <= 0.5:
            raise ValueError(f"augment.hue: must be in [0, 0.5], got {self.hue}")
        build_albumentations(self.photometric)  # fail early on unknown names / bad kwargs

    def upper_body_index(self, spec: KeypointSpec) -> np.ndarray | None:
        """Boolean [K] mask of upper-body keypoints, or None when half body is unavailable."""
        names = self.upper_body
        if names is None:
            if not set(COCO_UPPER_BODY) <= set(spec.names):
                return None
            names = COCO_UPPER_BODY
        unknown = sorted(set(names) - set(spec.names))
        if unknown:
            raise ValueError(f"augment.upper_body: unknown keypoint names {unknown}")
        return np.array([n in names for n in spec.names])


# --------------------------------------------------------------------------- random params
def sample_geometry(
    config: AugmentConfig, seed: tf.Tensor, n: tf.Tensor
) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor, tf.Tensor]:
    """Random (scale [n], rotation_deg [n], flip [n] bool, half-body uniforms [n, 2])."""
    u = tf.random.stateless_uniform(tf.stack([n, 6]), seed=seed)
    lo, hi = config.scale
    scale = lo + u[:, 0] * (hi - lo)
    rot = (u[:, 1] * 2.0 - 1.0) * config.rotation
    rot = tf.where(u[:, 2] < config.rotation_prob, rot, tf.zeros_like(rot))
    flip = u[:, 3] < (0.5 if config.flip else 0.0)
    return scale, rot, flip, u[:, 4:6]


def shift_centers(config: AugmentConfig, seed: tf.Tensor, center: tf.Tensor,
                  size: tf.Tensor) -> tf.Tensor:
    """Centres [n, 2] moved by ``U(-translate, translate) * size`` (unchanged at 0).

    Example:
        >>> import tensorflow as tf
        >>> c = shift_centers(AugmentConfig(translate=0.1), tf.constant([1, 2]),
        ...                   tf.zeros([3, 2]), tf.fill([3, 2], 100.0))
        >>> bool(tf.reduce_all(tf.abs(c) <= 10.0))
        True
    """
    if config.translate == 0.0:
        return center
    u = tf.random.stateless_uniform(tf.shape(center), seed=seed, minval=-1.0, maxval=1.0)
    return center + u * config.translate * size


def half_body(
    keypoints: tf.Tensor,
    center: tf.Tensor,
    size: tf.Tensor,
    uniforms: tf.Tensor,
    upper: np.ndarray,
    config: AugmentConfig,
    aspect_ratio: float,
) -> tuple[tf.Tensor, tf.Tensor]:
    """HRNet's half-body crop: re-centre on the upper or lower body's labelled points."""
    labelled = keypoints[..., 2] > 0  # [n, K]
    want_upper = (uniforms[:, 1] < 0.5)[:, None]
    part = labelled & tf.where(want_upper, upper[None, :], ~upper[None, :])
    count = tf.reduce_sum(tf.cast(part, tf.int32), axis=1)
    enough = tf.reduce_sum(tf.cast(labelled, tf.int32), 1) >= config.half_body_min_keypoints
    apply = (uniforms[:, 0] < config.half_body_prob) & enough & (count >= 2)
    big = tf.constant(1e9)
    xy = keypoints[..., :2]
    lo = tf.reduce_min(tf.where(part[..., None], xy, big), axis=1)
    hi = tf.reduce_max(tf.where(part[..., None], xy, -big), axis=1)
    hb_center = (lo + hi) * 0.5
    hb_box = tf.concat([lo, tf.maximum(hi - lo, 1.0)], axis=-1)
    _, hb_size = box_to_center_scale(hb_box, aspect_ratio, (1.5, 1.5))
    return (
        tf.where(apply[:, None], hb_center, center),
        tf.where(apply[:, None], hb_size, size),
    )


# --------------------------------------------------------------------------- photometric
def sample_color(config: AugmentConfig, seed: tf.Tensor, n: tf.Tensor) -> tf.Tensor:
    """Random colour parameters [n, 4]: (brightness delta, contrast, saturation, hue delta)."""
    u = tf.random.stateless_uniform(tf.stack([n, 4]), seed=seed, minval=-1.0, maxval=1.0)
    spread = tf.constant([config.brightness, config.contrast, config.saturation, config.hue])
    return u * spread + tf.constant([0.0, 1.0, 1.0, 0.0])


#: OpenCV's RGB -> grey weights (``cv2.COLOR_RGB2GRAY``).
GRAY_WEIGHTS = np.array([0.299, 0.587, 0.114])


def color_matrices(params: tf.Tensor) -> tf.Tensor:
    """[n, 3, 4] float64 affine colour maps (brightness, contrast, saturation) for a mean
    level of 0, from ``params`` [n, 4] as in :func:`apply_color`.

    Saturation blends with ``GRAY_WEIGHTS`` grey, which is linear in RGB, so the three
    jitters compose into ONE matrix (rounded and clipped once); :func:`jitter_color` adds
    ``(1 - contrast) * mean`` to column 3 for a crop's mean level.
    """
    p = tf.cast(tf.reshape(params, [-1, 4]), tf.float64)
    delta, contrast, saturation = p[:, 0, None, None], p[:, 1, None, None], p[:, 2, None, None]
    eye, gray = tf.eye(3, dtype=tf.float64), tf.constant(GRAY_WEIGHTS)[None, None, :]
    mix = saturation * eye + (1.0 - saturation) * gray
    offset = tf.broadcast_to(delta * 255.0, tf.stack([tf.shape(p)[0], 3, 1]))
    return tf.concat([contrast * mix, offset], axis=2)


def jitter_color(image: np.ndarray, matrix: np.ndarray, contrast: float, hue: float) -> None:
    """Colour jitter of a uint8 RGB crop IN PLACE, given ``matrix`` (a [3, 4] slice of
    :func:`color_matrices`, changed in place), the contrast factor and the hue delta."""
    if contrast != 1.0:
        mean = sum(cv2.sumElems(image)[:3]) / image[..., :3].size  # cv2.mean costs 2x
        matrix[:, 3] += (1.0 - contrast) * mean
    cv2.transform(image, matrix, dst=image)
    if hue != 0.0:
        hsv = cv2.cvtColor(image, cv2.COLOR_RGB2HSV)
        shift = int(round(hue * 180.0)) % 180
        hsv[..., 0] = ((hsv[..., 0].astype(np.int16) + shift) % 180).astype(np.uint8)
        cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB, dst=image)


def apply_color(image: np.ndarray, params: Sequence[float]) -> np.ndarray:
    """Colour jitter of a uint8 RGB crop: one OpenCV colour transform (+ HSV shift for hue).

    ``params`` = (brightness delta in [-1, 1] of 255, contrast factor, saturation factor,
    hue delta in turns); contrast scales about the mean level, saturation blends with the
    grey image (as torchvision's ColorJitter). Returns a new array.

    Example:
        >>> img = np.full((2, 2, 3), 100, np.uint8)
        >>> int(apply_color(img, [0.2, 1.0, 1.0, 0.0])[0, 0, 0])  # + 0.2 * 255
        151
    """
    out = np.array(image, np.uint8)
    matrix = color_matrices(tf.constant([params], tf.float64)).numpy()[0]
    jitter_color(out, matrix, float(params[1]), float(params[3]))
    return out


def build_albumentations(transforms: Sequence[Mapping[str, Any]]):
    """``albumentations.Compose`` of ``[{"name": ..., **kwargs}, ...]``; None when empty."""
    if not transforms:
        return None
    import albumentations as A

    built = []
    for i, spec in enumerate(transforms):
        kwargs = dict(spec)
        name = kwargs.pop("name", None)
        cls = getattr(A, str(name), None) if name else None
        if cls is None or not isinstance(cls, type):
            raise ValueError(
                f"augment.photometric[{i}]: unknown albumentations transform {name!r} "
                "(use a class name such as 'RandomBrightnessContrast')"
            )
        try:
            built.append(cls(**kwargs))
        except Exception as err:  # albumentations raises pydantic / type errors
            raise ValueError(f"augment.photometric[{i}] ({name}): bad arguments: {err}") from err
    return A.Compose(built)


class AlbumentationsOp:
    """Seeded albumentations on uint8 crops, callable from ``tf.numpy_function``.

    Each thread keeps its own ``Compose`` (tf.data calls it from several threads), reseeded
    per sample, so results depend only on the sample's seed.
    """

    def __init__(self, transforms: Sequence[Mapping[str, Any]]):
        self.transforms = tuple(dict(t) for t in transforms)
        self._local = threading.local()

    def __call__(self, image: np.ndarray, seed: np.ndarray) -> np.ndarray:
        compose = getattr(self._local, "compose", None)
        if compose is None:
            compose = self._local.compose = build_albumentations(self.transforms)
        compose.set_random_seed(int(seed) % (2**31 - 1))
        out = compose(image=np.ascontiguousarray(image))["image"]
        return np.asarray(out, np.uint8).reshape(image.shape)

    def apply(self, image: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
        """Graph op: run on a uint8 [H, W, 3] image with an int64 scalar seed."""
        out = tf.numpy_function(self, [image, seed], tf.uint8, stateful=False)
        return tf.ensure_shape(out, image.shape)
