"""Distribution: the tf.distribute strategy (or Keras' JAX data parallelism) a recipe trains under.

``train.batch_size`` is the GLOBAL batch; each of R replicas gets ``batch_size / R`` and
gradients are averaged over the global batch (Keras 3 scales each replica's loss by
``1 / R``; tf-cpn summed them). With ``TF_CONFIG`` set (one process per worker, same command
and output folder) training runs under :class:`MultiWorkerStrategy`: the chief (``chief``
task, else worker 0) writes the output folder; every other worker writes
``.workers/worker-<i>/`` there, whose backup and history let a rerun resume it in step.

Example:
    >>> import tensorflow as tf
    >>> num_workers(tf.distribute.get_strategy()), is_chief(tf.distribute.get_strategy())
    (1, True)
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

import keras
import tensorflow as tf

from kpnet.training.report import TrainingError


def make_strategy(kind: str = "auto") -> tf.distribute.Strategy | JaxDataParallel:
    """The tf.distribute strategy for ``train.distribute`` (under JAX: :class:`JaxDataParallel`).

    ``auto``: MultiWorkerMirroredStrategy when TF_CONFIG is set, MirroredStrategy with more
    than one GPU, else the default strategy. ``mirrored`` without GPUs mirrors over the
    logical CPU devices (tests use two).
    """
    if keras.backend.backend() == "jax":
        return JaxDataParallel.for_kind(kind)
    if kind == "multi_worker" or (kind == "auto" and os.environ.get("TF_CONFIG")):
        # before anything lists devices: collectives must be configured at startup
        return MultiWorkerStrategy()
    gpus = tf.config.list_logical_devices("GPU")
    if kind == "auto":
        if len(gpus) <= 1:
            return tf.distribute.get_strategy()
        kind = "mirrored"
    if kind == "mirrored":
        devices = [d.name for d in (gpus or tf.config.list_logical_devices("CPU"))]
        return tf.distribute.MirroredStrategy(devices)
    return tf.distribute.OneDeviceStrategy(gpus[0].name if gpus else "/cpu:0")


class JaxDataParallel:
    """What fit uses for a strategy under ``KERAS_BACKEND=jax``: Keras' own data parallelism.

    With several local devices, ``scope()`` sets ``keras.distribution.DataParallel`` over
    them (variables replicated, each global batch split along its first axis, gradients
    averaged inside the jitted step); with one device it does nothing. tf.data still feeds
    the model. Multi-worker training needs the TensorFlow backend.

    Example:
        >>> strategy = JaxDataParallel(1)
        >>> strategy.num_replicas_in_sync
        1
    """

    cluster_resolver = None

    def __init__(self, num_devices: int) -> None:
        self.num_replicas_in_sync = int(num_devices)

    @classmethod
    def for_kind(cls, kind: str) -> JaxDataParallel:
        """``auto`` / ``mirrored``: every local device; ``one_device``: the first."""
        import jax  # optional: installed with kpnet[jax], needed only under JAX

        if kind == "multi_worker" or (kind == "auto" and os.environ.get("TF_CONFIG")):
            raise TrainingError(
                "train.distribute: multi-worker training needs KERAS_BACKEND=tensorflow; "
                "under JAX fit uses the local devices (train.distribute: auto)"
            )
        return cls(1 if kind == "one_device" else jax.local_device_count())

    def scope(self) -> Any:
        if self.num_replicas_in_sync == 1:
            return contextlib.nullcontext()
        return keras.distribution.DataParallel().scope()


class MultiWorkerStrategy(tf.distribute.MultiWorkerMirroredStrategy):
    """``MultiWorkerMirroredStrategy`` whose ``reduce`` also takes a nest of per-replica values.

    Keras 3 (3.15) ``fit`` / ``evaluate`` first call ``strategy.reduce("MEAN", batch,
    axis=None)`` on the whole first ``(images, {name: keypoints})`` batch, only to read its
    shapes and dtypes for building the loss trackers. tf.distribute's ``reduce`` takes one
    value, not a nest: ``MirroredStrategy`` and single-worker runs happen to pass the nest
    through, but with two or more workers the collective reduce converts the tuple to a
    tensor and fails (``ValueError`` in ``convert_to_eager_tensor``). Here a nest gets each
    leaf's local value (same shapes and dtypes on every worker, no network traffic); single
    values are reduced as usual.
    """

    def reduce(self, reduce_op, value, axis):
        if isinstance(value, (tuple, list, dict)):
            return tf.nest.map_structure(self._local_value, value)
        if axis is not None and getattr(value, "shape", None) is not None:
            if value.shape.rank == 0:  # a scalar log: average over the replicas only
                axis = None
        return super().reduce(reduce_op, value, axis)

    def _local_value(self, value):
        if isinstance(value, tf.distribute.DistributedValues):
            return self.experimental_local_results(value)[0]
        return value


def num_workers(strategy: tf.distribute.Strategy) -> int:
    """Worker processes in the strategy's cluster (chief included); 1 without a cluster."""
    resolver = getattr(strategy, "cluster_resolver", None)
    spec = resolver.cluster_spec() if resolver is not None else None
    if not spec:
        return 1
    return sum(spec.num_tasks(job) for job in ("chief", "worker") if job in spec.jobs) or 1


def is_chief(strategy: tf.distribute.Strategy) -> bool:
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.task_type:
        return True
    if resolver.task_type == "chief":
        return True
    has_chief = "chief" in resolver.cluster_spec().as_dict()
    return resolver.task_type == "worker" and resolver.task_id == 0 and not has_chief
