"""Heatmap models: any backbone with a CPN, SimpleBaseline or HRNet head.

* ``cpn``: GlobalNet + RefineNet over C2..C5 (:mod:`kpnet.models.cpn`); five outputs,
  :data:`kpnet.codec.OUTPUT_NAMES`.
* ``simple_baseline`` (Xiao et al., ECCV 2018): C5, three 4x4 stride-2 deconvolutions
  (``head_channels`` wide, BN + ReLU) and a 1x1 conv to the heatmap channels.
* ``hrnet`` (Sun et al., CVPR 2019): a 1x1 conv on HRNet's highest-resolution branch.
* ``fpn``: a light feature pyramid (Lin et al., CVPR 2017) over C2..C5: 1x1 laterals
  ``head_channels`` wide, top-down bilinear upsampling and sums, two 3x3 conv + BN + ReLU on
  P2 (stride 4) and a 1x1 conv to the heatmaps. Made for small pretrained trunks
  (EfficientNet-Lite) on small data: a fraction of CPN's cost at stride 4.

Single-head models have one output, named ``"refine"`` like CPN's final one, so the losses,
the decoder, export and predict treat every head alike (:func:`head_outputs`). Their last
conv is ``refine_head_conv`` (re-initialised by :func:`kpnet.models.retarget` on a new
channel count).

Example:
    >>> model = build_heatmap_model(3, (64, 64, 3), backbone="tiny", head="simple_baseline",
    ...                             head_channels=16)
    >>> {k: tuple(v.shape[1:]) for k, v in model.output.items()}
    {'refine': (16, 16, 3)}
    >>> head_outputs("simple_baseline"), len(head_outputs("cpn"))
    (('refine',), 5)
"""

from __future__ import annotations

from collections.abc import Sequence

import keras
from keras import layers

from kpnet.codec import OUTPUT_NAMES
from kpnet.models.backbones import DEFAULT_BN_MOMENTUM, build_backbone, set_bn_momentum
from kpnet.models.cpn import LEVELS, global_net, refine_net
from kpnet.models.fused_bn import fuse_batchnorm
from kpnet.models.hrnet import HRNET_WIDTHS

HEADS: tuple[str, ...] = ("cpn", "simple_baseline", "hrnet", "fpn")
#: The output of a single-head model (the one the decoder reads for every head).
REFINE = OUTPUT_NAMES[-1]
_BN_EPS = 1e-5
#: std of the final conv's initial kernel (the official SimpleBaseline / HRNet init).
_FINAL_STD = 1e-3


def head_outputs(head: str) -> tuple[str, ...]:
    """The output names of a ``head``'s model (the keys of its losses and targets)."""
    check_head(head)
    return OUTPUT_NAMES if head == "cpn" else (REFINE,)


def check_head(head: str, backbone: str | None = None) -> None:
    """Refuse an unknown head, or the ``hrnet`` head on a trunk that is not an HRNet."""
    if head not in HEADS:
        raise ValueError(f"unknown head {head!r}; choose one of {list(HEADS)}")
    if head == "hrnet" and backbone is not None and backbone not in HRNET_WIDTHS:
        raise ValueError(
            f"head 'hrnet' reads an HRNet's highest-resolution branch; backbone {backbone!r} "
            f"has none: use backbone {' or '.join(HRNET_WIDTHS)}, or head cpn / simple_baseline"
        )


def build_heatmap_model(
    num_channels: int,
    input_shape: Sequence[int] = (256, 192, 3),
    backbone: str = "resnet50",
    head: str = "cpn",
    backbone_weights: str | None = None,
    head_channels: int = 256,
    alpha: float = 1.0,
    name: str | None = None,
    bn_momentum: float = DEFAULT_BN_MOMENTUM,
) -> keras.Model:
    """Build a heatmap model: images [B, H, W, 3] (RGB 0..255) -> dict of float32 heatmaps.

    Args:
        num_channels: heatmap channels C (``spec.num_channels``).
        input_shape: (H, W, 3); H and W must divide by 32.
        backbone: one of :data:`kpnet.models.backbones.BACKBONES`.
        head: one of :data:`HEADS`.
        backbone_weights: None, ``"imagenet"`` or a local ``.h5``/``.weights.h5`` file.
        head_channels: CPN's pyramid width or SimpleBaseline's deconvolution width (256 in
            the papers); unused by the ``hrnet`` head.
        alpha: MobileNetV2's width multiplier.
        name: model name (default: the head's).
        bn_momentum: moving-average momentum of every BatchNormalization layer.

    Returns:
        A ``keras.Model`` whose outputs ``[B, H/4, W/4, C]`` are keyed by
        :func:`head_outputs`.
    """
    h, w, c = (int(v) for v in input_shape)
    if h % 32 or w % 32 or c != 3:
        raise ValueError(
            f"build_heatmap_model: input_shape {tuple(input_shape)} must be (H, W, 3) with H "
            "and W divisible by 32 (e.g. (256, 192, 3))"
        )
    if int(num_channels) < 1:
        raise ValueError(f"build_heatmap_model: num_channels must be >= 1, got {num_channels}")
    if int(head_channels) < 2 or int(head_channels) % 2:
        raise ValueError(f"build_heatmap_model: head_channels must be even, got {head_channels}")
    check_head(head, backbone)
    images = keras.Input((h, w, 3), name="images")
    feats = build_backbone(backbone, images, backbone_weights, alpha)
    if head == "cpn":
        pyramid, global_maps = global_net(feats, int(num_channels), int(head_channels))
        heads = [*global_maps, refine_net(pyramid, int(num_channels), int(head_channels))]
    elif head == "simple_baseline":
        heads = [simple_baseline_head(feats[-1], int(num_channels), int(head_channels))]
    elif head == "fpn":
        heads = [fpn_head(feats, int(num_channels), int(head_channels))]
    else:
        heads = [_final_conv(feats[0], int(num_channels))]
    outputs = {
        out: layers.Activation("linear", dtype="float32", name=out)(t)
        for out, t in zip(head_outputs(head), heads, strict=True)
    }
    model = keras.Model(images, outputs, name=name or head)
    set_bn_momentum(model, bn_momentum)
    fuse_batchnorm(model)
    return model


def simple_baseline_head(c5, num_channels: int, width: int = 256, deconvs: int = 3):
    """SimpleBaseline: ``deconvs`` x (4x4 stride-2 deconv, BN, ReLU), then a 1x1 conv."""
    x = c5
    for i in range(deconvs):
        x = layers.Conv2DTranspose(width, 4, strides=2, padding="same", use_bias=False,
                                   name=f"simple_deconv{i + 1}_conv")(x)  # fmt: skip
        x = layers.BatchNormalization(epsilon=_BN_EPS, name=f"simple_deconv{i + 1}_bn")(x)
        x = layers.ReLU(name=f"simple_deconv{i + 1}_relu")(x)
    return _final_conv(x, num_channels)


def fpn_head(feats: Sequence, num_channels: int, width: int = 128, smooth: int = 2):
    """Light FPN over ``[C2..C5]`` to stride-4 heatmaps (see the module docstring)."""
    x = None
    for level, feat in reversed(list(zip(LEVELS, feats, strict=True))):
        lateral = layers.Conv2D(width, 1, name=f"fpn_lateral_p{level}_conv")(feat)
        if x is not None:
            up = layers.UpSampling2D(2, interpolation="bilinear", name=f"fpn_up_p{level}")(x)
            lateral = layers.Add(name=f"fpn_merge_p{level}")([lateral, up])
        x = lateral
    for i in range(smooth):
        x = layers.Conv2D(width, 3, padding="same", use_bias=False,
                          name=f"fpn_smooth{i + 1}_conv")(x)  # fmt: skip
        x = layers.BatchNormalization(epsilon=_BN_EPS, name=f"fpn_smooth{i + 1}_bn")(x)
        x = layers.ReLU(name=f"fpn_smooth{i + 1}_relu")(x)
    return _final_conv(x, num_channels)


def _final_conv(x, num_channels: int):
    """1x1 conv with bias to the heatmap channels, started near zero (empty heatmaps)."""
    return layers.Conv2D(
        num_channels, 1, kernel_initializer=keras.initializers.RandomNormal(stddev=_FINAL_STD),
        name="refine_head_conv",
    )(x)  # fmt: skip


def build_cpn(
    num_channels: int,
    input_shape: Sequence[int] = (256, 192, 3),
    backbone: str = "resnet50",
    backbone_weights: str | None = None,
    pyramid_channels: int = 256,
    name: str = "cpn",
    bn_momentum: float = DEFAULT_BN_MOMENTUM,
) -> keras.Model:
    """Build a CPN heatmap model.

    Args:
        num_channels: heatmap channels C (``spec.num_channels``).
        input_shape: (H, W, 3); H and W must divide by 32.
        backbone: one of :data:`kpnet.models.backbones.BACKBONES`.
        backbone_weights: None, ``"imagenet"`` or a local ``.h5``/``.weights.h5`` file.
        pyramid_channels: GlobalNet/RefineNet width (256 in the paper; smaller for tiny models).
        name: model name.
        bn_momentum: moving-average momentum of every BatchNormalization layer, trunk
            (keras.applications ResNets included) and heads.

    Returns:
        A ``keras.Model`` taking RGB 0..255 images [B, H, W, 3] and returning a dict of float32
        heatmaps [B, H/4, W/4, C] keyed by ``OUTPUT_NAMES``.
    """
    if int(pyramid_channels) < 2 or int(pyramid_channels) % 2:
        raise ValueError(f"build_cpn: pyramid_channels must be even, got {pyramid_channels}")
    return build_heatmap_model(
        num_channels, input_shape, backbone, "cpn", backbone_weights, pyramid_channels,
        name=name, bn_momentum=bn_momentum,
    )  # fmt: skip
