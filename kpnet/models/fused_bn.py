"""BatchNormalization through TensorFlow's fused kernel (same math, fewer passes).

Keras 3 computes a BatchNormalization layer under TensorFlow as separate ops (moments, then
``tf.nn.batch_normalization``) and differentiates through each of them: several passes
over every activation, forward and backward. TensorFlow's ``FusedBatchNormV3`` (oneDNN on
CPUs, cuDNN on GPUs) does the same normalisation in one kernel each way, and in inference
mode lets Grappler fold it into the preceding convolution. :func:`fuse_batchnorm` makes a
model's BN layers call it; variables, configs and saved files are unchanged (a loaded model
is plain Keras), and layers it cannot take (masks, renorm, synchronized, not 4-D
channels-last, epsilon under cuDNN's 1e-5) keep Keras' own call. Under JAX it does
nothing: XLA fuses those ops itself.

Example:
    >>> import keras, numpy as np
    >>> inputs = keras.Input((4, 4, 3))
    >>> model = keras.Model(inputs, keras.layers.BatchNormalization()(inputs))
    >>> fuse_batchnorm(model) == (keras.backend.backend() == "tensorflow")
    True
    >>> x = np.random.default_rng(0).normal(2.0, 3.0, (8, 4, 4, 3)).astype("float32")
    >>> y = keras.ops.convert_to_numpy(model(x, training=True))
    >>> bool(abs(y.mean((0, 1, 2))).max() < 1e-5), bool(abs(y.std((0, 1, 2)) - 1).max() < 1e-3)
    (True, True)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import keras

#: cuDNN's smallest BN epsilon (CUDNN_BN_MIN_EPSILON); smaller ones keep Keras' call.
MIN_EPSILON = 1e-5


def fuse_batchnorm(model: keras.Layer) -> int:
    """Route every eligible BatchNormalization layer of ``model`` (nested ones too) through
    ``FusedBatchNormV3``; returns how many were switched (0 under non-TensorFlow backends).

    Calling it again is harmless (already-fused layers are skipped).
    """
    if keras.backend.backend() != "tensorflow":
        return 0
    count = 0
    for layer in model._flatten_layers(include_self=True, recursive=True):
        if (isinstance(layer, keras.layers.BatchNormalization)
                and "call" not in layer.__dict__ and _eligible(layer)):  # fmt: skip
            object.__setattr__(layer, "call", _fused_call(layer, layer.call))
            count += 1
    return count


def _eligible(layer: keras.layers.BatchNormalization) -> bool:
    shape = getattr(layer, "input_spec", None)
    ndim = getattr(shape, "ndim", None) if shape is not None else None
    axis = layer.axis if isinstance(layer.axis, int) else None
    return (
        not layer.renorm
        and not layer.synchronized
        and layer.epsilon >= MIN_EPSILON
        and ndim == 4
        and axis is not None
        and axis % 4 == 3
    )


def _fused_call(layer: keras.layers.BatchNormalization, original: Callable) -> Callable:
    import tensorflow as tf

    def call(inputs: Any, training: Any = None, mask: Any = None) -> Any:
        if mask is not None or inputs.shape.rank != 4:
            return original(inputs, training=training, mask=mask)
        x = tf.convert_to_tensor(inputs)
        if x.dtype not in (tf.float32, tf.bfloat16, tf.float16):
            x = tf.cast(x, tf.float32)
        channels = layer.moving_mean.shape[0]
        gamma = tf.cast(layer.gamma, tf.float32) if layer.scale else tf.ones([channels])
        beta = tf.cast(layer.beta, tf.float32) if layer.center else tf.zeros([channels])
        train = bool(training) and layer.trainable
        y, mean, variance, *_ = tf.raw_ops.FusedBatchNormV3(
            x=x,
            scale=gamma,
            offset=beta,
            mean=tf.constant([], tf.float32) if train else tf.cast(layer.moving_mean, tf.float32),
            variance=(
                tf.constant([], tf.float32) if train else tf.cast(layer.moving_variance, tf.float32)
            ),  # fmt: skip
            epsilon=layer.epsilon,
            data_format="NHWC",
            is_training=train,
        )
        if train:
            # the kernel returns the Bessel-corrected variance; Keras averages the biased one
            shape = tf.shape(x)
            n = tf.cast(shape[0] * shape[1] * shape[2], tf.float32)
            variance = variance * (n - 1.0) / tf.maximum(n, 1.0)
            m = layer.momentum
            layer.moving_mean.assign(layer.moving_mean * m + tf.cast(mean, layer.moving_mean.dtype)
                                     * (1.0 - m))  # fmt: skip
            layer.moving_variance.assign(layer.moving_variance * m
                                         + tf.cast(variance, layer.moving_variance.dtype)
                                         * (1.0 - m))  # fmt: skip
        return tf.cast(y, layer.compute_dtype)

    return call
