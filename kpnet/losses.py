"""CPN losses. Targets are keypoints; Gaussians are rendered inside the loss.

Every loss takes ``y_true`` = keypoints [B, K, 3] (x, y, v) in input pixels (what the
pipeline yields) and ``y_pred`` = heatmaps [B, H, W, C], renders targets with
:meth:`kpnet.codec.Codec.encode` (peak 1; the codec's ``stride`` maps input pixels to heatmap
pixels) and returns one value per sample [B] from ``call``, computed in float32. The standard
Keras reduction (``sum_over_batch_size``) then gives the batch mean, and Keras 3's
distribution scaling the global-batch mean under ``tf.distribute``.

* :class:`GlobalNetL2Loss`: GlobalNet levels (tf-cpn semantics, visible points only).
* :class:`OHKMLoss`: RefineNet, online hard keypoint mining over channels (tf-cpn).
* :class:`PixelOHKMLoss`: RefineNet for shared channels (several keypoints in one channel),
  hard mining over pixels.

Example:
    >>> import numpy as np
    >>> kp = np.array([[[17.5, 21.5, 2.0], [2.0, 3.0, 0.0]]], "float32")   # B=1, K=2
    >>> pred = np.zeros((1, 16, 12, 2), "float32")
    >>> loss = OHKMLoss(top_k=8, sigma=1.4)
    >>> round(float(loss(kp, pred)), 4)   # one labelled channel: its mean squared target
    0.0321
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import keras
from keras import ops

from kpnet.codec import DEFAULT_GLOBAL_SIGMAS, DEFAULT_REFINE_SIGMA, OUTPUT_NAMES, Codec

DEFAULT_STRIDE = Codec().stride

_REDUCTION = "sum_over_batch_size"


class _HeatmapLoss(keras.losses.Loss):
    """Shared parts: channel map, Gaussian rendering, float32 casts, config."""

    def __init__(
        self,
        sigma: float,
        channels: Sequence[int] | None = None,
        name: str | None = None,
        reduction: str | None = _REDUCTION,
        dtype: str | None = None,
        stride: int = DEFAULT_STRIDE,
    ) -> None:
        super().__init__(name=name, reduction=reduction, dtype=dtype or "float32")
        if float(sigma) <= 0:
            raise ValueError(f"{type(self).__name__}: sigma must be > 0, got {sigma}")
        self.sigma = float(sigma)
        self.channels = None if channels is None else [int(c) for c in channels]
        self.stride = int(stride)

    def _inputs(self, y_true, y_pred):
        keypoints = ops.cast(y_true, "float32")
        heatmaps = ops.cast(y_pred, "float32")
        if keypoints.shape[-1] != 3 or len(keypoints.shape) != 3:
            raise ValueError(
                f"{type(self).__name__}: y_true must be keypoints [B, K, 3], got "
                f"{keypoints.shape} (did you pass heatmaps as targets?)"
            )
        return keypoints, heatmaps

    def _render(self, keypoints, heatmaps):
        """Gaussians [B, H, W, C] matching the prediction's shape (v > 0 points only),
        encoded by the codec of that heatmap size."""
        h, w, c = (int(v) for v in heatmaps.shape[1:])
        codec = Codec(input_size=(h * self.stride, w * self.stride), stride=self.stride)
        return codec.encode(keypoints, self.sigma, self.channels, num_channels=c)

    def _channel_labelled(self, keypoints, num_channels: int):
        """float32 [B, C]: 1 where any keypoint of the channel has v > 0."""
        k = int(keypoints.shape[1])
        channels = self.channels if self.channels is not None else list(range(k))
        onehot = ops.one_hot(ops.convert_to_tensor(channels, "int32"), num_channels)  # [K, C]
        labelled = ops.cast(keypoints[..., 2] > 0, "float32")  # [B, K]
        return ops.cast(ops.matmul(labelled, onehot) > 0, "float32")

    def get_config(self) -> dict:
        return {**super().get_config(), "sigma": self.sigma, "channels": self.channels,
                "stride": self.stride}  # fmt: skip


@keras.saving.register_keras_serializable(package="kpnet")
class GlobalNetL2Loss(_HeatmapLoss):
    """L2 loss of a GlobalNet level, with tf-cpn's semantics.

    Gaussians are drawn only for VISIBLE points (v == 2; tf-cpn's ``valid > 1.1``); occluded
    and unlabelled points get an all-zero target, and every pixel of every channel counts, so
    the GlobalNet is pushed to 0 wherever no visible keypoint is. (This is tf-cpn's choice: the
    GlobalNet learns the easy, visible points; the RefineNet's :class:`OHKMLoss` handles the
    occluded ones.) Per sample: mean over H, W and C of the squared error.

    Example:
        >>> import numpy as np
        >>> kp = np.array([[[3.0, 3.0, 1.0]]], "float32")     # occluded: target is all zero
        >>> float(GlobalNetL2Loss(sigma=2.0)(kp, np.ones((1, 8, 8, 1), "float32")))
        1.0
    """

    def __init__(self, sigma: float = DEFAULT_GLOBAL_SIGMAS[0], channels=None, **kwargs) -> None:
        super().__init__(sigma, channels, **{"name": "global_l2", **kwargs})

    def call(self, y_true, y_pred):
        keypoints, heatmaps = self._inputs(y_true, y_pred)
        visible = ops.cast(keypoints[..., 2] > 1.1, "float32")
        target = self._render(
            ops.concatenate([keypoints[..., :2], visible[..., None]], -1), heatmaps
        )
        return ops.mean(ops.square(heatmaps - target), axis=(1, 2, 3))


@keras.saving.register_keras_serializable(package="kpnet")
class OHKMLoss(_HeatmapLoss):
    """Online hard keypoint mining (tf-cpn's RefineNet loss).

    Targets: Gaussians for labelled points (v > 0). Per sample and channel, the MSE over pixels,
    zeroed for channels with no labelled keypoint; the loss is the mean of the ``top_k`` largest
    channel losses. ``k`` is clamped to C statically and to the number of labelled channels per
    sample (at least 1, so a sample without labels gives 0). With >= ``top_k`` labelled
    channels this equals tf-cpn's ``ohkm(loss, 8)`` exactly; with fewer it averages over the
    labelled ones instead of dividing by 8.
    """

    def __init__(
        self, top_k: int = 8, sigma: float = DEFAULT_REFINE_SIGMA, channels=None, **kwargs
    ) -> None:
        super().__init__(sigma, channels, **{"name": "ohkm", **kwargs})
        if int(top_k) < 1:
            raise ValueError(f"OHKMLoss: top_k must be >= 1, got {top_k}")
        self.top_k = int(top_k)

    def call(self, y_true, y_pred):
        keypoints, heatmaps = self._inputs(y_true, y_pred)
        c = int(heatmaps.shape[-1])
        target = self._render(keypoints, heatmaps)
        labelled = self._channel_labelled(keypoints, c)  # [B, C]
        per_channel = ops.mean(ops.square(heatmaps - target), axis=(1, 2)) * labelled
        k = min(self.top_k, c)
        hardest, _ = ops.top_k(per_channel, k, sorted=True)  # [B, k], descending
        k_eff = ops.clip(ops.sum(labelled, axis=-1, keepdims=True), 1.0, float(k))  # [B, 1]
        rank = ops.arange(k, dtype="float32")[None, :]
        return ops.sum(hardest * ops.cast(rank < k_eff, "float32"), axis=-1) / k_eff[:, 0]

    def get_config(self) -> dict:
        return {**super().get_config(), "top_k": self.top_k}


@keras.saving.register_keras_serializable(package="kpnet")
class PixelOHKMLoss(_HeatmapLoss):
    """Pixel-level hard mining, for specs where several keypoints share a channel.

    Keypoint-level OHKM cannot separate keypoints that share a channel (one channel = one
    loss). Here, per sample, the squared error of every pixel of every channel is ranked and
    the loss is the mean over a hard set of pixels:

    * all *positive* pixels (target >= ``positive_threshold``, i.e. the Gaussian peaks) are
      always in the set. Without this, once the background errors grow the peaks of well
      learned keypoints drop out of the set and the net is free to let them fade; forcing them
      in keeps every labelled keypoint supervised, like keypoint OHKM keeps every hard channel.
      ``positive_threshold=None`` disables it (pure top-n);
    * plus the ``n`` hardest remaining pixels, ``n = top_k`` or ``ceil(ratio * H * W * C)``:
      false-positive blobs (e.g. a second peak where there is no pin) are mined here.

    Targets: Gaussians for labelled points (v > 0), shared channels combined with a maximum.
    """

    def __init__(
        self,
        top_k: int | None = None,
        ratio: float = 0.1,
        sigma: float = DEFAULT_REFINE_SIGMA,
        channels=None,
        positive_threshold: float | None = 0.1,
        **kwargs,
    ) -> None:
        super().__init__(sigma, channels, **{"name": "pixel_ohkm", **kwargs})
        if top_k is None and not 0.0 < float(ratio) <= 1.0:
            raise ValueError(f"PixelOHKMLoss: ratio must be in (0, 1], got {ratio}")
        if top_k is not None and int(top_k) < 1:
            raise ValueError(f"PixelOHKMLoss: top_k must be >= 1, got {top_k}")
        self.top_k = None if top_k is None else int(top_k)
        self.ratio = float(ratio)
        self.positive_threshold = None if positive_threshold is None else float(positive_threshold)

    def num_hard(self, num_pixels: int) -> int:
        """How many hard (non-positive) pixels are mined out of ``num_pixels``."""
        n = self.top_k if self.top_k is not None else math.ceil(self.ratio * num_pixels)
        return max(1, min(int(n), num_pixels))

    def call(self, y_true, y_pred):
        keypoints, heatmaps = self._inputs(y_true, y_pred)
        target = self._render(keypoints, heatmaps)
        num_pixels = math.prod(int(d) for d in heatmaps.shape[1:])  # static H*W*C
        err = ops.reshape(ops.square(heatmaps - target), (-1, num_pixels))  # [B, N]
        n = self.num_hard(num_pixels)
        if self.positive_threshold is None:
            hardest, _ = ops.top_k(err, n, sorted=False)
            return ops.mean(hardest, axis=-1)
        pos = ops.cast(ops.reshape(target, (-1, num_pixels)) >= self.positive_threshold, "float32")
        hardest, _ = ops.top_k(err * (1.0 - pos), n, sorted=False)
        n_neg = ops.minimum(float(n), ops.sum(1.0 - pos, axis=-1))
        total = ops.sum(err * pos, axis=-1) + ops.sum(hardest, axis=-1)
        return total / ops.maximum(ops.sum(pos, axis=-1) + n_neg, 1.0)

    def get_config(self) -> dict:
        return {
            **super().get_config(),
            "top_k": self.top_k,
            "ratio": self.ratio,
            "positive_threshold": self.positive_threshold,
        }


def build_losses(
    spec,
    refine_loss: str = "ohkm",
    top_k: int = 8,
    global_sigmas: Sequence[float] = DEFAULT_GLOBAL_SIGMAS,
    refine_sigma: float = DEFAULT_REFINE_SIGMA,
    global_weight: float = 0.5,
    refine_weight: float = 1.0,
    pixel_ratio: float = 0.1,
    outputs: Sequence[str] = OUTPUT_NAMES,
    stride: int = DEFAULT_STRIDE,
) -> tuple[dict[str, keras.losses.Loss], dict[str, float]]:
    """Losses and loss weights for ``model.compile``, keyed by the model's ``outputs``.

    ``outputs``: the model's output names (``kpnet.models.head_outputs(head)``): CPN's
    :data:`kpnet.codec.OUTPUT_NAMES`, or ``("refine",)`` for a single-head model.
    ``global_weight`` is split equally over the four GlobalNet levels (tf-cpn: sum over the
    levels / 4 / 2 with the default 0.5). ``refine_loss``: ``"ohkm"`` (keypoint level, top
    ``top_k`` channels), ``"pixel"`` (:class:`PixelOHKMLoss` with ``pixel_ratio``) or ``"l2"``
    (SimpleBaseline / HRNet: the mean squared error over every labelled channel, i.e.
    :class:`OHKMLoss` with ``top_k`` = C).

    Example:
        >>> from kpnet.spec import KeypointSpec
        >>> losses, weights = build_losses(KeypointSpec.coco17())
        >>> type(losses["refine"]).__name__, weights["global_p2"], weights["refine"]
        ('OHKMLoss', 0.125, 1.0)
        >>> losses, weights = build_losses(KeypointSpec.coco17(), "l2", outputs=("refine",))
        >>> list(losses), losses["refine"].top_k, weights
        (['refine'], 17, {'refine': 1.0})
    """
    if refine_loss not in ("ohkm", "pixel", "l2"):
        raise ValueError(
            f"build_losses: refine_loss must be 'ohkm', 'pixel' or 'l2', got {refine_loss!r}"
        )
    if len(global_sigmas) != len(OUTPUT_NAMES) - 1:
        raise ValueError(
            f"build_losses: global_sigmas needs {len(OUTPUT_NAMES) - 1} values "
            f"(P2..P5), got {list(global_sigmas)}"
        )
    unknown = sorted(set(outputs) - set(OUTPUT_NAMES))
    if unknown or OUTPUT_NAMES[-1] not in outputs:
        raise ValueError(
            f"build_losses: outputs {list(outputs)} must include 'refine' and be among "
            f"{list(OUTPUT_NAMES)}"
        )
    channels = list(spec.channels)
    losses: dict[str, keras.losses.Loss] = {
        out: GlobalNetL2Loss(sigma=s, channels=channels, name=f"{out}_l2", stride=stride)
        for out, s in zip(OUTPUT_NAMES[:-1], global_sigmas, strict=True)
    }
    if refine_loss == "ohkm":
        losses["refine"] = OHKMLoss(top_k=top_k, sigma=refine_sigma, channels=channels,
                                    stride=stride)  # fmt: skip
    elif refine_loss == "l2":
        losses["refine"] = OHKMLoss(
            top_k=spec.num_channels, sigma=refine_sigma, channels=channels, name="l2",
            stride=stride,
        )  # fmt: skip
    else:
        losses["refine"] = PixelOHKMLoss(ratio=pixel_ratio, sigma=refine_sigma,
                                         channels=channels, stride=stride)  # fmt: skip
    weights = {out: float(global_weight) / len(global_sigmas) for out in OUTPUT_NAMES[:-1]}
    weights["refine"] = float(refine_weight)
    return {k: losses[k] for k in outputs}, {k: weights[k] for k in outputs}
