"""Re-target a trained heatmap model to a new keypoint set: same trunk, fresh heatmap heads.

:func:`transfer_weights` copies every layer whose weights all match by layer name and shape;
the heatmap heads (their shapes depend on the channel count) keep their fresh initialisation.
:func:`retarget` rebuilds the source's architecture (any backbone and head of
:mod:`kpnet.models.heads`) with a new channel count and transfers.

Example:
    >>> from kpnet.models import build_cpn
    >>> coco = build_cpn(17, input_shape=(64, 64, 3), backbone="tiny", pyramid_channels=32)
    >>> mouse, report = retarget(coco, num_channels=4)
    >>> mouse.output["refine"].shape[-1], "refine_head_conv" in report.reinitialized
    (4, True)
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import keras

from kpnet.models.backbones import LIGHT_TAPS, RESNET_TAPS
from kpnet.models.efficientnet_lite import LITE_VARIANTS, prefix
from kpnet.models.heads import build_cpn, build_heatmap_model

#: Number of Conv2D layers in a CPN per backbone (backbone convs + 44 CPN convs); used to
#: recognise the architecture stored in a bare ``.weights.h5`` file.
_CPN_HEAD_CONVS = 44
_BACKBONE_CONVS = {"tiny": 13, "resnet50": 53, "resnet101": 104}


@dataclass
class RetargetReport:
    """What :func:`transfer_weights` did, by layer name."""

    loaded: list[str] = field(default_factory=list)
    reinitialized: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """One line per category, e.g. for logging after a re-target."""
        lines = [f"loaded {len(self.loaded)} layers from the source model"]
        for label, names in (
            ("re-initialised (shape mismatch)", self.reinitialized),
            ("missing in the source", self.missing),
        ):
            if names:
                lines.append(f"{label}: {len(names)} layers: {', '.join(names)}")
        return "\n".join(lines)


def transfer_weights(source_model: keras.Model, target_model: keras.Model) -> RetargetReport:
    """Copy weights layer by layer (matched by name) where every weight's shape agrees."""
    report = RetargetReport()
    for layer in target_model.layers:
        if not layer.weights:
            continue
        try:
            src = source_model.get_layer(layer.name)
        except ValueError:
            report.missing.append(layer.name)
            continue
        src_values = src.get_weights()
        shapes = [tuple(w.shape) for w in layer.weights]
        if [tuple(v.shape) for v in src_values] != shapes:
            report.reinitialized.append(layer.name)
            continue
        layer.set_weights(src_values)
        report.loaded.append(layer.name)
    return report


def retarget(
    source: keras.Model | str | os.PathLike,
    num_channels: int,
    *,
    input_shape: Sequence[int] | None = None,
    backbone: str | None = None,
    pyramid_channels: int | None = None,
    name: str | None = None,
) -> tuple[keras.Model, RetargetReport]:
    """Rebuild ``source``'s model with ``num_channels`` heatmap channels and transfer weights.

    Args:
        source: a kpnet heatmap ``keras.Model`` (any head), or a ``.keras`` file of one, or a
            ``.weights.h5`` file of a CPN.
        num_channels: channels of the new model (``spec.num_channels``).
        input_shape, backbone, pyramid_channels, name: override what is inferred from the
            source (a bare ``.weights.h5`` carries no input shape: default (256, 192, 3)).

    Returns:
        (new model, :class:`RetargetReport`).
    """
    model = _load_source(source, backbone, pyramid_channels)
    arch = infer_architecture(model)
    target = build_heatmap_model(
        num_channels,
        input_shape=tuple(input_shape or arch["input_shape"]),
        backbone=backbone or arch["backbone"],
        head=arch["head"],
        head_channels=int(pyramid_channels or arch["pyramid_channels"]),
        alpha=arch["alpha"],
        name=name or model.name,
    )
    return target, transfer_weights(model, target)


#: A layer that only the named backbone has, checked in this order.
_BACKBONE_MARKERS: tuple[tuple[str, str], ...] = (
    (RESNET_TAPS["resnet101"][2], "resnet101"),
    (RESNET_TAPS["resnet50"][2], "resnet50"),
    ("hrnet_stem1_conv", "hrnet_w32"),
    (LIGHT_TAPS["mobilenetv2"][2], "mobilenetv2"),
    (LIGHT_TAPS["efficientnetb0"][2], "efficientnetb0"),
    ("tiny_stem_conv", "tiny"),
    *((f"{prefix(v)}_stem_conv", v) for v in LITE_VARIANTS),
)


def infer_architecture(model: keras.Model) -> dict:
    """Backbone, head, input shape, head width, width multiplier and channel count of a model.

    ``pyramid_channels`` is CPN's pyramid width or SimpleBaseline's deconvolution width
    (256 for the ``hrnet`` head, which has neither).
    """
    names = {layer.name for layer in model.layers}
    backbone = next((b for marker, b in _BACKBONE_MARKERS if marker in names), None)
    if backbone is None:
        raise ValueError(f"model {model.name!r} is not a kpnet model (no known backbone layers)")
    if "refine_head_conv" not in names:
        raise ValueError(f"model {model.name!r} is not a kpnet heatmap model (no head)")
    if "global_lateral_p2_conv" in names:
        head, width = "cpn", model.get_layer("global_lateral_p2_conv").filters
    elif "simple_deconv1_conv" in names:
        head, width = "simple_baseline", model.get_layer("simple_deconv1_conv").filters
    elif "fpn_lateral_p2_conv" in names:
        head, width = "fpn", model.get_layer("fpn_lateral_p2_conv").filters
    else:
        head, width = "hrnet", 256
    alpha = 1.0
    if backbone == "mobilenetv2":  # block 16 projects to make_divisible(320 * alpha, 8)
        alpha = round(model.get_layer("block_16_project").filters / 320, 2)
    return {
        "backbone": backbone,
        "head": head,
        "input_shape": tuple(int(v) for v in model.input_shape[1:]),
        "pyramid_channels": int(width),
        "alpha": alpha,
        "num_channels": int(model.get_layer("refine_head_conv").filters),
    }


def _load_source(source, backbone: str | None, pyramid_channels: int | None) -> keras.Model:
    if isinstance(source, keras.Model):
        return source
    path = Path(source).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"retarget: source model file {str(path)!r} does not exist")
    if path.name.endswith(".keras"):
        return keras.saving.load_model(path, compile=False)
    if path.name.endswith(".weights.h5"):
        arch = _architecture_from_weights(path)
        model = build_cpn(
            arch["num_channels"],
            backbone=backbone or arch["backbone"],
            pyramid_channels=int(pyramid_channels or arch["pyramid_channels"]),
        )
        model.load_weights(path)
        return model
    raise ValueError(f"retarget: {str(path)!r} must be a keras.Model, .keras or .weights.h5 file")


def _architecture_from_weights(path: Path) -> dict:
    """Recognise a CPN in a Keras 3 ``.weights.h5`` file (layers stored by class-based name)."""
    import h5py

    with h5py.File(path, "r") as f:
        group = f.get("layers")
        convs = sorted(
            (k for k in (group.keys() if group is not None else []) if k.startswith("conv2d")),
            key=lambda k: int(k.rpartition("_")[2]) if k != "conv2d" else 0,
        )
        by_count = {n + _CPN_HEAD_CONVS: b for b, n in _BACKBONE_CONVS.items()}
        if len(convs) not in by_count:
            raise ValueError(
                f"retarget: {str(path)!r} does not hold kpnet CPN weights ({len(convs)} conv "
                "layers); pass the .keras file or the model instead"
            )
        kernel = f["layers"][convs[-1]]["vars"]["0"].shape  # refine_head_conv: (3, 3, P, C)
    return {
        "backbone": by_count[len(convs)],
        "pyramid_channels": int(kernel[2]),
        "num_channels": int(kernel[3]),
    }
