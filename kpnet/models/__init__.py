"""Heatmap models: backbones, the CPN, SimpleBaseline and HRNet heads, head re-targeting."""

from kpnet.models.backbones import BACKBONES, BackboneWeightsError, build_backbone
from kpnet.models.heads import HEADS, build_cpn, build_heatmap_model, head_outputs
from kpnet.models.retarget import RetargetReport, retarget, transfer_weights

__all__ = [
    "BACKBONES",
    "HEADS",
    "BackboneWeightsError",
    "RetargetReport",
    "build_backbone",
    "build_cpn",
    "build_heatmap_model",
    "head_outputs",
    "retarget",
    "transfer_weights",
]
