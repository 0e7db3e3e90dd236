"""Registering kpnet's Keras objects, so plain ``keras.saving.load_model`` opens kpnet files.

``kpnet.load_model`` does this itself; call :func:`register_keras_objects` when you load a
kpnet ``.keras`` file (``best.keras``, ``last.keras``, ``keypoints.keras``) with Keras
directly, for example to go on training it with your own loop.

Example:
    >>> import keras, kpnet
    >>> kpnet.register_keras_objects()
    >>> model = keras.saving.load_model("runs/quickstart/best.keras")  # doctest: +SKIP
"""

from __future__ import annotations


def register_keras_objects() -> None:
    """Import the modules defining kpnet's layers, losses and schedules (registering them)."""
    # imported here, not above: `import kpnet.saving` stays light, and the registry may name
    # the training layer's schedule without serving importing training
    import kpnet.inference  # noqa: F401  keypoint decoding layers
    import kpnet.losses  # noqa: F401  GlobalNet L2, OHKM, pixel OHKM (training compile state)
    import kpnet.models  # noqa: F401  backbone preprocessing
    import kpnet.training.schedules  # noqa: F401  the learning-rate schedule (compile state)
