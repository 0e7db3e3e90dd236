"""CPN models: backbones, the CPN itself and head re-targeting to new keypoint sets."""

from kpnet.models.backbones import BACKBONES, BackboneWeightsError, build_backbone
from kpnet.models.cpn import build_cpn
from kpnet.models.retarget import RetargetReport, retarget, transfer_weights

__all__ = [
    "BACKBONES",
    "BackboneWeightsError",
    "RetargetReport",
    "build_backbone",
    "build_cpn",
    "retarget",
    "transfer_weights",
]
