"""The Cascaded Pyramid Network (Chen et al., CVPR 2018) as a functional Keras model.

Layout follows the public PyTorch CPN (GengDavid/pytorch-cpn, ``globalNet.py`` and
``refineNet.py``): a backbone tapping C2..C5, a GlobalNet feature pyramid with one heatmap head
per level, and a RefineNet that upsamples all pyramid levels (after 0/1/2/3 bottlenecks),
concatenates them and predicts the refined heatmaps. Every head outputs float32 heatmaps at
1/4 of the input size, keyed by :data:`kpnet.codec.OUTPUT_NAMES`.

Layer names record the architecture (``conv4_block23_out`` = ResNet-101, ``tiny_*`` = tiny,
``global_lateral_p2_conv.filters`` = pyramid width), which :mod:`kpnet.models.retarget` reads.

The model itself is built by :func:`kpnet.models.heads.build_cpn` (any trunk, this head).

Example:
    >>> images = keras.Input((64, 64, 3))
    >>> feats = [keras.layers.Conv2D(8, 1, strides=s)(images) for s in (4, 8, 16, 32)]
    >>> pyramid, heatmaps = global_net(feats, 2, 16)
    >>> [tuple(h.shape[1:]) for h in heatmaps][0]
    (16, 16, 2)
"""

from __future__ import annotations

from collections.abc import Sequence

import keras
from keras import layers

LEVELS: tuple[int, ...] = (2, 3, 4, 5)  # pyramid levels, finest (stride 4) first
OUTPUT_STRIDE = 4
_BN_EPS = 1e-5
#: Initial scale of the heads' final BatchNormalization (see :func:`_head_bn`).
HEAD_BN_SCALE = 0.1


# --------------------------------------------------------------------------- GlobalNet
def global_net(feats: Sequence, num_channels: int, width: int) -> tuple[list, list]:
    """Feature pyramid over ``[C2..C5]``; returns (pyramid features P2..P5, heatmaps P2..P5)."""
    pyramid: dict[int, object] = {}
    up = None
    for level, feat in reversed(list(zip(LEVELS, feats, strict=True))):
        x = _conv_bn(feat, width, 1, f"global_lateral_p{level}", relu=True)
        if up is not None:
            x = layers.Add(name=f"global_merge_p{level}")([x, up])
        pyramid[level] = x
        if level != LEVELS[0]:
            up = layers.UpSampling2D(2, interpolation="bilinear", name=f"global_up_p{level}")(x)
            up = layers.Conv2D(width, 1, use_bias=True, name=f"global_up_p{level}_conv")(up)
            up = layers.BatchNormalization(epsilon=_BN_EPS, name=f"global_up_p{level}_bn")(up)
    maps = [_global_head(pyramid[lv], lv, num_channels, width) for lv in LEVELS]
    return [pyramid[lv] for lv in LEVELS], maps


def _global_head(x, level: int, num_channels: int, width: int):
    x = _conv_bn(x, width, 1, f"global_predict_p{level}", relu=True)
    x = layers.Conv2D(
        num_channels, 3, padding="same", use_bias=False, name=f"global_p{level}_head_conv"
    )(x)
    x = _upsample(x, level, f"global_p{level}_head")
    return _head_bn(x, f"global_p{level}_head_bn")


# --------------------------------------------------------------------------- RefineNet
def refine_net(pyramid: Sequence, num_channels: int, width: int):
    """RefineNet: level P_l passes through l-2 bottlenecks, all are upsampled and concatenated."""
    branches = []
    for level, x in zip(LEVELS, pyramid, strict=True):
        for i in range(level - LEVELS[0]):
            x = bottleneck(x, width // 2, f"refine_p{level}_block{i + 1}")
        branches.append(_upsample(x, level, f"refine_p{level}"))
    x = layers.Concatenate(name="refine_concat")(branches)
    x = bottleneck(x, width // 2, "refine_final_block")
    x = layers.Conv2D(num_channels, 3, padding="same", use_bias=False, name="refine_head_conv")(x)
    return _head_bn(x, "refine_head_bn")


def _head_bn(x, name: str):
    """The heads' final BN, its scale started at the targets' scale.

    Gaussian targets (peak 1 on a mostly empty map) have a standard deviation of about 0.1,
    while a BN with scale 1 makes the training-mode output unit-variance: the scale then has
    to shrink ten-fold before the L2 loss can fall, which costs hundreds of steps.
    """
    return layers.BatchNormalization(
        epsilon=_BN_EPS, gamma_initializer=keras.initializers.Constant(HEAD_BN_SCALE), name=name
    )(x)


def bottleneck(x, planes: int, name: str):
    """pytorch-cpn's refineNet Bottleneck: 1x1 -> 3x3 -> 1x1 (planes, planes, 2*planes).

    The shortcut is always a 1x1 conv + BN projection, as in pytorch-cpn.
    """
    shortcut = _conv_bn(x, 2 * planes, 1, f"{name}_proj", relu=False)
    y = _conv_bn(x, planes, 1, f"{name}_1", relu=True)
    y = _conv_bn(y, planes, 3, f"{name}_2", relu=True)
    y = _conv_bn(y, 2 * planes, 1, f"{name}_3", relu=False)
    return layers.ReLU(name=f"{name}_out")(layers.Add(name=f"{name}_add")([y, shortcut]))


# --------------------------------------------------------------------------- helpers
def _upsample(x, level: int, name: str):
    """Bilinear resize from stride 2**level to the output stride 4 (identity at P2)."""
    factor = 2**level // OUTPUT_STRIDE
    if factor == 1:
        return x
    return layers.UpSampling2D(factor, interpolation="bilinear", name=f"{name}_up")(x)


def _conv_bn(x, filters: int, kernel: int, name: str, relu: bool):
    x = layers.Conv2D(filters, kernel, padding="same", use_bias=False, name=f"{name}_conv")(x)
    x = layers.BatchNormalization(epsilon=_BN_EPS, name=f"{name}_bn")(x)
    return layers.ReLU(name=f"{name}_relu")(x) if relu else x
