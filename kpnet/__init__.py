"""kpnet: Cascaded Pyramid Network keypoint models for your own keypoints (Keras 3).

Example:
    >>> import kpnet
    >>> spec = kpnet.KeypointSpec(names=("pin_a", "pin_b"), channel_map=(0, 0))
    >>> spec.num_channels
    1

Heavy parts (Keras, TensorFlow) load on first use, so ``import kpnet`` and ``kpnet --help``
stay fast.
"""

import importlib as _importlib
import os as _os

_os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from kpnet.spec import KeypointSpec, SpecError  # noqa: E402

__version__ = "0.1.0"

_LAZY = {
    "build_cpn": "kpnet.models",
    "build_heatmap_model": "kpnet.models",
    "retarget": "kpnet.models",
    "transfer_weights": "kpnet.models.retarget",
    "load_model": "kpnet.inference",
    "register_keras_objects": "kpnet.saving",
    "build_keypoints_model": "kpnet.inference",
    "KeypointDecoder": "kpnet.inference",
    "draw_keypoints": "kpnet.inference",
    "Codec": "kpnet.codec",
    "load_recipe": "kpnet.recipe",
    "RecipeError": "kpnet.recipe",
    "fit": "kpnet.training",
    "export_saved_model": "kpnet.export",
    "evaluate_predictions": "kpnet.evaluate",
    "coco_keypoint_ap": "kpnet.evaluate",
}

__all__ = ["KeypointSpec", "SpecError", "__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(_importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'kpnet' has no attribute {name!r}")
