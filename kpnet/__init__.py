"""kpnet: Cascaded Pyramid Network keypoint models for your own keypoints (Keras 3).

Example:
    >>> import kpnet
    >>> spec = kpnet.KeypointSpec(names=("pin_a", "pin_b"), channel_map=(0, 0))
    >>> spec.num_channels
    1
"""

import os as _os

_os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from kpnet.spec import KeypointSpec, SpecError  # noqa: E402

__version__ = "0.1.0"
__all__ = ["KeypointSpec", "SpecError", "__version__"]
