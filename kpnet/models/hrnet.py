"""HRNet (Sun et al., CVPR 2019) as a functional Keras trunk tapping its four branches.

Layout follows the official pose HRNet (leoxiaobin/deep-high-resolution-net.pytorch,
``pose_hrnet.py`` with ``w32_256x192_adam_lr1e-3.yaml``): a stem of two stride-2 3x3 convs,
four bottlenecks, then stages 2..4 with 1 / 4 / 3 modules of 2 / 3 / 4 parallel branches
(4 basic blocks each, widths ``W, 2W, 4W, 8W``) exchanging information through fuse layers.
:func:`hrnet_trunk` returns the four branches of the last module, strides 4 / 8 / 16 / 32, so
they feed CPN's GlobalNet like a ResNet's C2..C5; the paper's own head reads only the first
(stride 4) branch, and a functional model then leaves the unused fuse layers of the last
module out (exactly the published model: 28.5M parameters for W32, 17 keypoints).

Example:
    >>> import keras
    >>> images = keras.Input((64, 64, 3))
    >>> [tuple(f.shape[1:]) for f in hrnet_trunk(images, width=8)]
    [(16, 16, 8), (8, 8, 16), (4, 4, 32), (2, 2, 64)]
"""

from __future__ import annotations

from keras import layers

HRNET_WIDTHS: dict[str, int] = {"hrnet_w32": 32}
#: Modules per stage (stages 2, 3, 4) and basic blocks per branch, as in the W32 config.
STAGE_MODULES: tuple[int, ...] = (1, 4, 3)
BLOCKS_PER_BRANCH = 4
_BN_EPS = 1e-5


def hrnet_trunk(x, width: int = 32, name: str = "hrnet") -> list:
    """HRNet on normalised images ``x``; returns the four branches ``[B1, B2, B3, B4]``.

    Args:
        x: [B, H, W, 3] normalised images (H, W divisible by 32).
        width: channels of the highest-resolution branch (32 for HRNet-W32).
        name: layer name prefix.
    """
    x = _conv_bn(x, 64, 3, 2, f"{name}_stem1", relu=True)
    x = _conv_bn(x, 64, 3, 2, f"{name}_stem2", relu=True)
    for i in range(4):  # layer1: bottlenecks of 64 planes, 256 out
        x = _bottleneck(x, 64, f"{name}_layer1_block{i + 1}", project=i == 0)
    branches = [x]
    for stage, modules in enumerate(STAGE_MODULES, start=2):
        channels = [width * 2**b for b in range(stage)]
        branches = _transition(branches, channels, f"{name}_transition{stage - 1}")
        for m in range(modules):
            branches = _module(branches, channels, f"{name}_stage{stage}_module{m + 1}")
    return branches


def _transition(branches: list, channels: list[int], name: str) -> list:
    """Adapt existing branches' widths and open the new, lower-resolution branch."""
    out = []
    for i, width in enumerate(channels):
        if i < len(branches):
            x = branches[i]
            if int(x.shape[-1]) != width:
                x = _conv_bn(x, width, 3, 1, f"{name}_branch{i + 1}", relu=True)
        else:
            x = _conv_bn(branches[-1], width, 3, 2, f"{name}_branch{i + 1}", relu=True)
        out.append(x)
    return out


def _module(branches: list, channels: list[int], name: str) -> list:
    """One high-resolution module: basic blocks per branch, then an all-to-all fusion."""
    branches = list(branches)
    for b, width in enumerate(channels):
        for k in range(BLOCKS_PER_BRANCH):
            branches[b] = _basic_block(branches[b], width, f"{name}_branch{b + 1}_block{k + 1}")
    fused = []
    for i, width in enumerate(channels):
        terms = []
        for j, x in enumerate(branches):
            where = f"{name}_fuse{i + 1}_from{j + 1}"
            if j > i:  # lower resolution: 1x1 conv, then nearest upsampling
                x = _conv_bn(x, width, 1, 1, where, relu=False)
                x = layers.UpSampling2D(2 ** (j - i), name=f"{where}_up")(x)
            elif j < i:  # higher resolution: i - j stride-2 3x3 convs
                for k in range(i - j):
                    last = k == i - j - 1
                    x = _conv_bn(x, width if last else channels[j], 3, 2, f"{where}_down{k + 1}",
                                 relu=not last)  # fmt: skip
            terms.append(x)
        x = layers.Add(name=f"{name}_fuse{i + 1}_add")(terms)
        fused.append(layers.ReLU(name=f"{name}_fuse{i + 1}_out")(x))
    return fused


def _basic_block(x, width: int, name: str):
    y = _conv_bn(x, width, 3, 1, f"{name}_1", relu=True)
    y = _conv_bn(y, width, 3, 1, f"{name}_2", relu=False)
    return layers.ReLU(name=f"{name}_out")(layers.Add(name=f"{name}_add")([y, x]))


def _bottleneck(x, planes: int, name: str, project: bool):
    shortcut = _conv_bn(x, 4 * planes, 1, 1, f"{name}_proj", relu=False) if project else x
    y = _conv_bn(x, planes, 1, 1, f"{name}_1", relu=True)
    y = _conv_bn(y, planes, 3, 1, f"{name}_2", relu=True)
    y = _conv_bn(y, 4 * planes, 1, 1, f"{name}_3", relu=False)
    return layers.ReLU(name=f"{name}_out")(layers.Add(name=f"{name}_add")([y, shortcut]))


def _conv_bn(x, filters: int, kernel: int, stride: int, name: str, relu: bool):
    x = layers.Conv2D(filters, kernel, strides=stride, padding="same", use_bias=False,
                      name=f"{name}_conv")(x)  # fmt: skip
    x = layers.BatchNormalization(epsilon=_BN_EPS, name=f"{name}_bn")(x)
    return layers.ReLU(name=f"{name}_relu")(x) if relu else x
