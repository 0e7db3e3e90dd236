"""Precise BatchNorm: recompute BN moving statistics from training data before validating.

With a few steps per epoch (tens to hundreds of labelled frames) an exponential moving
average of the batch statistics lags far behind the weights, and the inference-mode model
(which normalises with the moving mean / variance) is not the model that was trained: its
heatmaps can be flat where the training-mode ones peak. Precise BN (Wu & Johnson,
"Rethinking 'Batch' in BatchNorm", 2021; detectron2's ``PreciseBN`` hook) replaces the moving
statistics of every trainable BatchNormalization layer by the average, over N batches, of
the per-batch mean and variance of that layer's input in training mode.

Example:
    >>> import keras, numpy as np
    >>> inputs = keras.Input((4,))
    >>> model = keras.Model(inputs, keras.layers.BatchNormalization()(inputs))
    >>> x = np.arange(32, dtype="float32").reshape(8, 4)
    >>> recompute_bn_statistics(model, [x[:4], x[4:]], num_batches=2)  # batches used
    2
    >>> bn = model.layers[1]
    >>> bn.moving_mean.numpy().tolist(), bn.moving_variance.numpy().tolist()
    ([14.0, 15.0, 16.0, 17.0], [20.0, 20.0, 20.0, 20.0])
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable, Iterable
from typing import Any

import keras
import numpy as np
from keras import ops

from kpnet.models.backbones import set_bn_momentum


def bn_layers(model: keras.Layer, trainable_only: bool = True) -> list[keras.layers.Layer]:
    """Every BatchNormalization layer of ``model``, nested models included, once each.

    ``trainable_only``: only the layers that update their statistics in training mode
    (``trainable=False`` layers, e.g. a frozen pretrained trunk, run in inference mode).
    """
    found = [
        layer
        for layer in model._flatten_layers(include_self=True, recursive=True)
        if isinstance(layer, keras.layers.BatchNormalization) and not layer.renorm
    ]
    return [layer for layer in found if layer.trainable or not trainable_only]


class _Recorder:
    """Swaps the ``call`` of BN layers for one that records float32 batch statistics.

    The swapped call normalises with the batch statistics exactly as Keras' training mode
    does, but assigns nothing: the forward pass has no side effects. Statistics are kept
    per thread, since MirroredStrategy runs each replica's function in its own thread.
    """

    def __init__(self, layers: list[keras.layers.Layer]) -> None:
        self.layers = layers
        self.local = threading.local()

    def __enter__(self) -> _Recorder:
        self._saved = [layer.__dict__.get("call") for layer in self.layers]
        for index, layer in enumerate(self.layers):
            object.__setattr__(layer, "call", self._call(index, layer, layer.call))
        return self

    def __exit__(self, *exc: object) -> None:
        for layer, saved in zip(self.layers, self._saved, strict=True):
            if saved is None:
                object.__delattr__(layer, "call")
            else:
                object.__setattr__(layer, "call", saved)

    def _call(self, index: int, layer, original: Callable) -> Callable:
        def call(inputs, training=None, mask=None):
            if not (training and layer.trainable) or mask is not None:
                return original(inputs, training=training, mask=mask)
            x = ops.cast(inputs, "float32")
            axis = layer.axis % len(x.shape)
            axes = [i for i in range(len(x.shape)) if i != axis]
            mean, var = ops.moments(x, axes=axes, synchronized=layer.synchronized)
            self.local.stats[index].append((mean, var))
            out = ops.batch_normalization(
                x,
                mean,
                var,
                axis=axis,
                offset=ops.cast(layer.beta, "float32") if layer.center else None,
                scale=ops.cast(layer.gamma, "float32") if layer.scale else None,
                epsilon=layer.epsilon,
            )
            return ops.cast(out, layer.compute_dtype)

        return call

    def statistics(self, model: keras.Layer, images, state: tuple | None = None):
        """One replica's flat float32 [mean_0, var_0, mean_1, var_1, ...] for ``images``;
        ``state``: (trainable, non-trainable) values for a stateless call (JAX)."""
        self.local.stats = [[] for _ in self.layers]
        if state is None:
            model(images, training=True)
        else:
            model.stateless_call(*state, images, training=True)
        parts = []
        for layer, calls in zip(self.layers, self.local.stats, strict=True):
            if not calls:
                raise ValueError(
                    f"BatchNormalization layer {layer.name!r} was not called in training mode "
                    "by the model's forward pass; cannot recompute its statistics"
                )
            parts += [sum(m for m, _ in calls) / len(calls), sum(v for _, v in calls) / len(calls)]
        return ops.concatenate(parts, axis=0)


class _Statistics:
    """A traced ``batch -> averaged statistics`` function for one model and set of layers."""

    def __init__(self, model: keras.Model, strategy: Any) -> None:
        self.model = model
        self.strategy = strategy
        self.layers = bn_layers(model)
        self.recorder = _Recorder(self.layers)
        if keras.backend.backend() == "jax":
            self.step = self._jax_step()
            return
        import tensorflow as tf

        def replica_fn(batch):
            images = batch[0] if isinstance(batch, (tuple, list)) else batch
            return self.recorder.statistics(model, images)

        def step(batch):
            per_replica = strategy.run(replica_fn, args=(batch,))
            return strategy.reduce(tf.distribute.ReduceOp.MEAN, per_replica, axis=None)

        self.step = tf.function(step)

    def _jax_step(self) -> Callable:
        """``batch -> statistics`` jitted once: a stateless training-mode forward pass on the
        current variable values (replicated or sharded as the Keras distribution says)."""
        import jax

        model = self.model
        traced = jax.jit(lambda trainable, non_trainable, images: self.recorder.statistics(
            model, images, (trainable, non_trainable)))  # fmt: skip

        def step(batch):
            images = batch[0] if isinstance(batch, (tuple, list)) else batch
            return traced([v.value for v in model.trainable_variables],
                          [v.value for v in model.non_trainable_variables],
                          np.asarray(images))  # fmt: skip

        return step

    def stale(self) -> bool:
        """True when the set of trainable BN layers changed since tracing (freeze / unfreeze)."""
        return [id(x) for x in bn_layers(self.model)] != [id(x) for x in self.layers]

    def __call__(self, batches: Iterable, num_batches: int) -> int:
        total, seen = None, 0
        with self.recorder:  # a (re)trace must see the recording calls too
            for batch in batches:
                values = np.asarray(self.step(batch)).astype(np.float64)
                total = values if total is None else total + values
                seen += 1
                if seen >= num_batches:
                    break
        if not seen:
            raise ValueError("recompute_bn_statistics: the dataset yielded no batch")
        self._assign(total / seen)
        return seen

    def _assign(self, values: np.ndarray) -> None:
        offset = 0
        for layer in self.layers:
            size = int(layer.moving_mean.shape[0])
            mean, var = values[offset : offset + size], values[offset + size : offset + 2 * size]
            offset += 2 * size
            # from cross-replica context: a mirrored variable gets the value on every replica
            layer.moving_mean.assign(mean.astype(layer.moving_mean.dtype))
            layer.moving_variance.assign(var.astype(layer.moving_variance.dtype))


def _strategy(model: keras.Model) -> Any:
    """The model's tf.distribute strategy; None under JAX (Keras distributions shard there)."""
    if keras.backend.backend() == "jax":
        return None
    import tensorflow as tf

    strategy = getattr(model, "distribute_strategy", None)
    return strategy if strategy is not None else tf.distribute.get_strategy()


def _batches(dataset: Any, strategy: Any) -> Iterable:
    tf = sys.modules.get("tensorflow")
    if strategy is None or tf is None or not isinstance(dataset, tf.data.Dataset):
        return dataset  # an iterator / list of batches, or an already distributed dataset
    options = tf.data.Options()  # global batches, split batch-wise over replicas and workers
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return strategy.experimental_distribute_dataset(dataset.with_options(options))


def recompute_bn_statistics(model: keras.Model, dataset: Any, num_batches: int) -> int:
    """Set the moving mean / variance of every trainable BatchNormalization layer of ``model``
    to the average over ``num_batches`` batches of its input's per-batch statistics.

    The forward passes run in training mode without gradients and change nothing else; BN
    layers with ``trainable=False`` (frozen, running in inference mode) are left alone.
    Statistics are computed in float32 (also under mixed precision). Under a
    ``tf.distribute`` strategy each replica computes the statistics of its share of the
    batch (as in training) and they are averaged over the replicas.

    Args:
        model: a Keras model; BN layers of nested models count too.
        dataset: a ``tf.data.Dataset`` (or iterable) of image batches, or of tuples whose
            first element is the images (kpnet fit uses its augmented training crops).
        num_batches: batches to average over (at most what the dataset yields).

    Returns:
        The number of batches used (0 when the model has no trainable BN layer).
    """
    if num_batches < 1:
        raise ValueError(f"num_batches must be >= 1, got {num_batches}")
    strategy = _strategy(model)
    stats = _Statistics(model, strategy)
    if not stats.layers:
        return 0
    return stats(_batches(dataset, strategy), num_batches)


class PreciseBN(keras.callbacks.Callback):
    """Recompute BN statistics on the last training batch of every epoch.

    It runs in ``on_train_batch_end`` of the epoch's last step, so before Keras computes
    ``val_loss`` and before the metrics and checkpoint callbacks of ``on_epoch_end``: every
    validation figure and every saved model uses the recomputed statistics. Put it after
    a NaN guard that sets ``model.stop_training``: a stopped epoch is skipped.

    Args:
        dataset_fn: ``() -> tf.data.Dataset`` of image batches (training crops); called
            once, on first use, and iterated on across epochs (make it repeat).
        num_batches: batches averaged per epoch.

    Example:
        >>> import numpy as np
        >>> cb = PreciseBN(lambda: iter(lambda: np.zeros((2, 4), "float32"), None), 4)
        >>> cb.num_batches
        4
    """

    def __init__(self, dataset_fn: Callable[[], Any], num_batches: int) -> None:
        super().__init__()
        if num_batches < 1:
            raise ValueError(f"PreciseBN: num_batches must be >= 1, got {num_batches}")
        self.dataset_fn = dataset_fn
        self.num_batches = int(num_batches)
        self._iterator = None
        self._stats: _Statistics | None = None

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        steps = self.params.get("steps")
        if steps is None or batch + 1 < steps or getattr(self.model, "stop_training", False):
            return
        self.recompute()

    def recompute(self) -> int:
        """Recompute the statistics now; returns the number of batches used."""
        strategy = _strategy(self.model)
        if self._stats is None or self._stats.model is not self.model or self._stats.stale():
            self._stats = _Statistics(self.model, strategy)
        if not self._stats.layers:
            return 0
        if self._iterator is None:
            self._iterator = iter(_batches(self.dataset_fn(), strategy))
        return self._stats(self._iterator, self.num_batches)


__all__ = ["PreciseBN", "bn_layers", "recompute_bn_statistics", "set_bn_momentum"]
