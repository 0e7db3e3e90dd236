"""``keras.ops`` that also work inside TensorFlow graphs (tf.data) under any Keras backend.

The codec (:mod:`kpnet.codec`) is written once in ``keras.ops`` and runs in three places: the
model and the losses (the Keras backend: TensorFlow or JAX), the tf.data pipeline and the
SavedModel (always TensorFlow graphs). Under ``KERAS_BACKEND=tensorflow`` plain ``keras.ops``
serve all three. Under JAX, ``keras.ops`` are JAX functions and cannot take the symbolic
tensors of a tf.data trace: :data:`ops` here is ``keras.ops`` except while TensorFlow traces a
graph (``tf.inside_function()``, e.g. ``Dataset.map``), where each op runs Keras' TensorFlow
implementation of the same op (``keras.src.backend.tensorflow``, as Keras' own tf.data
preprocessing layers do). TensorFlow is never imported here: it is only consulted when
something else already imported it, so a JAX-only process stays TensorFlow-free.

Example:
    >>> import numpy as np
    >>> float(ops.sum(ops.convert_to_tensor(np.ones(3, "float32"))))
    3.0
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from typing import Any

#: Modules of Keras' TensorFlow backend searched, in order, for an op's implementation.
_TF_MODULES = ("numpy", "core", "math", "nn", "linalg", "image")


def in_tf_graph() -> bool:
    """True while TensorFlow traces a graph (tf.data map, ``tf.function``), if TF is loaded."""
    tf = sys.modules.get("tensorflow")
    return tf is not None and hasattr(tf, "inside_function") and tf.inside_function()


def _tf_op(name: str) -> Callable:
    for module in _TF_MODULES:
        mod = importlib.import_module(f"keras.src.backend.tensorflow.{module}")
        fn = getattr(mod, name, None)
        if callable(fn):
            return fn
    raise AttributeError(f"kpnet.graph_ops: no TensorFlow implementation of keras.ops.{name}")


class _Ops:
    """``keras.ops`` with a TensorFlow fallback inside TF graphs (see the module doc)."""

    def __getattr__(self, name: str) -> Any:
        import keras  # on first use: importing the codec (e.g. by `kpnet --help`) stays light

        op = getattr(keras.ops, name)
        if keras.backend.backend() == "tensorflow" or not callable(op):
            setattr(self, name, op)  # plain keras.ops: no wrapper, no cost
            return op
        found: list[Callable] = []

        def dispatch(*args: Any, **kwargs: Any) -> Any:
            if in_tf_graph():
                if not found:
                    found.append(_tf_op(name))
                return found[0](*args, **kwargs)
            return op(*args, **kwargs)

        dispatch.__name__ = dispatch.__qualname__ = name
        setattr(self, name, dispatch)
        return dispatch


#: Use as ``from kpnet.graph_ops import ops`` instead of ``from keras import ops``.
ops = _Ops()

__all__ = ["in_tf_graph", "ops"]
