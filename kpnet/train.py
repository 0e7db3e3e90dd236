"""Training: ``fit(recipe, output_dir)`` runs a recipe end to end and can be re-run to resume.

Example:
    >>> from kpnet.recipe import load_recipe
    >>> recipe = load_recipe("recipes/quickstart.yaml")        # doctest: +SKIP
    >>> result = fit(recipe, "runs/quickstart")                 # doctest: +SKIP
    >>> result["metrics"]["overall"]["mean"]                    # doctest: +SKIP
    0.8

Output folder: ``recipe.resolved.yaml``, ``spec.json``, ``backup/`` (weights + optimizer
state, for resuming), ``last.keras``, ``best.keras`` (lowest validation pixel error, else
validation loss), ``keypoints.keras`` (decoding inside the graph), ``history.csv``,
``logs/`` (TensorBoard), ``curves.png`` and ``metrics.json``.

Distribution: ``train.batch_size`` is the GLOBAL batch; each of R replicas gets
``batch_size / R`` and gradients are averaged over the global batch (Keras 3 scales each
replica's loss by ``1 / R``; tf-cpn summed them). When you grow the global batch, scale the
learning rate with the linear rule ``lr * batch_size / base_batch_size`` yourself or set
``train.lr_scaling: linear``. With ``TF_CONFIG`` set (one process per worker, same command
and output folder) training runs under :class:`MultiWorkerStrategy`: the chief (``chief``
task, else worker 0) writes the output folder; every other worker writes
``.workers/worker-<i>/`` there, whose backup and history let a rerun resume it in step.

Resuming: the backup is written atomically after every epoch (and every
``train.backup_every_steps``), so a process killed at any point (even ``kill -9``) loses at
most the epoch it was in. Nothing is written into the output folder before the recipe, the
data and the batch size are validated and the recipe is compared with the run already there
(:func:`check_run_folder`: a run of another model or data is refused, see
:data:`LOCKED_KEYS`); every output file is written atomically, and NaN/inf weights or
validation errors stop fit before ``metrics.json`` / ``keypoints.keras`` are written.

Precision: ``mixed_float16`` trains with a dynamic ``LossScaleOptimizer``;
``mixed_bfloat16`` needs no loss scaling. The model's heads and the losses stay float32.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from kpnet import fs
from kpnet.callbacks import (
    Backup,
    GuardedCheckpoint,
    HistoryCSV,
    KeypointMetrics,
    NaNGuard,
    read_backup,
)
from kpnet.data.records import InstanceRecord, RecordTable
from kpnet.data.sources import (
    load_data,
    load_training,
    load_validation,
    pipeline_config,
    split_by_image,
)
from kpnet.models.fused_bn import fuse_batchnorm
from kpnet.recipe import Recipe
from kpnet.saving import register_keras_objects
from kpnet.schedules import EpochSchedule
from kpnet.spec import KeypointSpec


class TrainingError(RuntimeError):
    """Training cannot go on (non-finite loss, inconsistent backup); the message says why."""


def _log(message: str) -> None:
    print(f"kpnet: {message}", flush=True)


# --------------------------------------------------------------------------- strategy
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
        import jax

        if kind == "multi_worker" or (kind == "auto" and os.environ.get("TF_CONFIG")):
            raise TrainingError(
                "train.distribute: multi-worker training needs KERAS_BACKEND=tensorflow; "
                "under JAX fit uses the local devices (train.distribute: auto)"
            )
        return cls(1 if kind == "one_device" else jax.local_device_count())

    def scope(self) -> Any:
        import contextlib

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


def _num_workers(strategy: tf.distribute.Strategy) -> int:
    """Worker processes in the strategy's cluster (chief included); 1 without a cluster."""
    resolver = getattr(strategy, "cluster_resolver", None)
    spec = resolver.cluster_spec() if resolver is not None else None
    if not spec:
        return 1
    return sum(spec.num_tasks(job) for job in ("chief", "worker") if job in spec.jobs) or 1


def _is_chief(strategy: tf.distribute.Strategy) -> bool:
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.task_type:
        return True
    if resolver.task_type == "chief":
        return True
    has_chief = "chief" in resolver.cluster_spec().as_dict()
    return resolver.task_type == "worker" and resolver.task_id == 0 and not has_chief


def output_names(recipe: Recipe) -> tuple[str, ...]:
    """The heatmap model's outputs (CPN's five or a single ``"refine"``): targets and losses."""
    from kpnet.models.heads import head_outputs

    return head_outputs(recipe.model.head)


def _targets(recipe: Recipe):
    """``(images, keypoints) -> (images, {output: keypoints})`` for the recipe's model."""
    names = output_names(recipe)
    return lambda images, keypoints: (images, {name: keypoints for name in names})


def _datasets(recipe, spec, train, val, config, strategy: tf.distribute.Strategy | None):
    """(training, validation) datasets; under multi-worker training each worker builds the
    pipeline of its own share of the images (``distribute_datasets_from_function``), so no
    worker reads or augments another's images."""
    from kpnet.data.pipeline import build_dataset

    t = recipe.train
    on_error = recipe.data.on_error

    def train_dataset(context: tf.distribute.InputContext | None = None) -> tf.data.Dataset:
        return build_dataset(
            train, spec, config, t.batch_size, training=True, seed=t.seed, repeat=True,
            on_error=on_error, input_context=context,
        ).map(_targets(recipe))  # fmt: skip

    val_ds = None
    if val:
        val_ds = build_dataset(
            val, spec, config, t.batch_size, training=False, on_error=on_error
        ).map(_targets(recipe))
    if strategy is None:
        return train_dataset(), val_ds
    train_ds = strategy.distribute_datasets_from_function(train_dataset)
    if val_ds is not None:  # a known, finite length: split batch-wise over the workers
        options = tf.data.Options()
        options.experimental_distribute.auto_shard_policy = (
            tf.data.experimental.AutoShardPolicy.DATA
        )
        val_ds = val_ds.with_options(options)
    return train_ds, val_ds


# --------------------------------------------------------------------------- model
@dataclass(frozen=True)
class Phase:
    """One ``model.fit`` call: epochs [start, end) with the backbone frozen or not."""

    index: int
    start: int
    end: int
    frozen: bool
    lr_factor: float = 1.0


def training_phases(recipe: Recipe) -> list[Phase]:
    """Frozen-backbone phase (if any) then the unfrozen phase.

    Only a pretrained trunk is frozen: with ``model.backbone_weights`` and
    ``model.init_from`` both null, ``train.freeze_backbone_epochs`` is skipped (warning).
    """
    t = recipe.train
    frozen = min(t.freeze_backbone_epochs, t.epochs)
    if frozen and not pretrained(recipe):
        _log(
            f"train.freeze_backbone_epochs={t.freeze_backbone_epochs} skipped: the backbone "
            "is not pretrained (model.backbone_weights and model.init_from are null), so the "
            "whole network trains from the first epoch"
        )
        frozen = 0
    phases = [Phase(0, 0, frozen, True)] if frozen else []
    if t.epochs > frozen:
        factor = t.unfreeze_lr_factor if frozen else 1.0
        phases.append(Phase(len(phases), frozen, t.epochs, False, factor))
    return phases


def pretrained(recipe: Recipe) -> bool:
    """True when the trunk starts from weights (``backbone_weights`` or ``init_from``)."""
    return recipe.model.backbone_weights is not None or recipe.model.init_from is not None


def backbone_bn_frozen(recipe: Recipe) -> bool:
    """Whether the trunk's BatchNorm layers run in inference mode for the whole run."""
    mode = recipe.train.backbone_bn
    return mode == "frozen" or (mode == "auto" and pretrained(recipe))


def build_model(recipe: Recipe, spec: KeypointSpec, init: bool = True) -> keras.Model:
    """The heatmap model of a recipe, re-targeted from ``model.init_from`` if set."""
    from kpnet.models.backbones import BackboneWeightsError
    from kpnet.models.heads import build_heatmap_model

    m = recipe.model
    try:
        model = build_heatmap_model(
            spec.num_channels,
            input_shape=(*m.input_size, 3),
            backbone=m.backbone,
            head=m.head,
            backbone_weights=m.backbone_weights,
            head_channels=m.pyramid_channels,
            alpha=m.alpha,
            name="cpn" if m.head == "cpn" else m.head,
            bn_momentum=m.bn_momentum,
        )
    except BackboneWeightsError as err:
        raise recipe.error("model.backbone_weights", str(err)) from None
    if init and m.init_from is not None:
        _init_from(recipe, model)
    return model


def _init_from(recipe: Recipe, model: keras.Model) -> None:
    from kpnet.models.retarget import transfer_weights

    path = recipe.model.init_from
    try:
        register_keras_objects()
        with fs.local_copy(path) as local:  # a URL: through a local temporary copy
            source = keras.saving.load_model(local, compile=False, safe_mode=True)
    except (*fs.io_errors(), ValueError, TypeError) as err:
        raise recipe.error("model.init_from", f"cannot load {path}: {fs.reason(err)}") from None
    report = transfer_weights(source, model)
    _log(f"init_from {path}:\n{report.summary()}")
    if not report.loaded:
        raise recipe.error(
            "model.init_from",
            f"no layer of {path} matches this model; give a kpnet heatmap model "
            "(best.keras / last.keras of an earlier run)",
        )


def backbone_layer_names(recipe: Recipe) -> set[str]:
    """Names of the backbone's layers in a model built from ``recipe``."""
    from kpnet.models.backbones import build_backbone

    images = keras.Input((*recipe.model.input_size, 3), name="images")
    feats = build_backbone(recipe.model.backbone, images, None, recipe.model.alpha)
    return {layer.name for layer in keras.Model(images, feats).layers if layer.weights}


def _optimizer(recipe: Recipe, schedule: EpochSchedule) -> keras.optimizers.Optimizer:
    t = recipe.train
    kwargs: dict[str, Any] = {"learning_rate": schedule, "clipnorm": t.clipnorm}
    if t.weight_decay:
        kwargs["weight_decay"] = t.weight_decay
    if t.optimizer == "sgd":
        opt = keras.optimizers.SGD(momentum=t.momentum, **kwargs)
    elif t.optimizer == "adamw":
        opt = keras.optimizers.AdamW(**kwargs)
    else:
        opt = keras.optimizers.Adam(**kwargs)
    if t.weight_decay:
        opt.exclude_from_weight_decay(var_names=["bias", "gamma", "beta"])
    if t.precision == "mixed_float16":
        opt = keras.optimizers.LossScaleOptimizer(opt)
    return opt


def _base_lr(recipe: Recipe) -> float:
    t = recipe.train
    scale = t.batch_size / t.base_batch_size if t.lr_scaling == "linear" else 1.0
    return t.lr * scale


def configure_phase(
    model: keras.Model,
    recipe: Recipe,
    spec: KeypointSpec,
    phase: Phase,
    steps_per_epoch: int,
    backbone_names: set[str],
) -> None:
    """Freeze / unfreeze the backbone and compile with this phase's optimizer and losses.

    With :func:`backbone_bn_frozen`, the trunk's BatchNorm layers stay frozen (inference mode:
    the pretrained statistics, no update) in every phase.
    """
    from kpnet.losses import build_losses

    frozen_bn = backbone_bn_frozen(recipe)
    for layer in model.layers:
        if layer.name in backbone_names:
            layer.trainable = not phase.frozen and not (
                frozen_bn and isinstance(layer, keras.layers.BatchNormalization)
            )
    t, lo = recipe.train, recipe.loss
    schedule = EpochSchedule(
        _base_lr(recipe) * phase.lr_factor,
        steps_per_epoch,
        kind=t.lr_schedule,
        epochs=t.epochs,
        warmup_epochs=t.warmup_epochs,
        step_every=t.step_every,
        milestones=t.milestones,
        gamma=t.gamma,
        start_step=phase.start * steps_per_epoch,
    )
    codec = recipe.codec()  # the losses encode with the codec the decoder decodes with
    losses, weights = build_losses(
        spec,
        refine_loss=lo.refine,
        top_k=lo.top_k,
        global_sigmas=codec.global_sigmas,
        refine_sigma=codec.refine_sigma,
        global_weight=lo.global_weight,
        refine_weight=lo.refine_weight,
        pixel_ratio=lo.pixel_ratio,
        outputs=output_names(recipe),
    )
    model.compile(optimizer=_optimizer(recipe, schedule), loss=losses, loss_weights=weights)
    if not tf.distribute.has_strategy():
        _build_training_state(model, spec)


def _build_training_state(model: keras.Model, spec: KeypointSpec) -> None:
    """Create the optimizer variables and the per-output loss trackers now.

    Without a strategy Keras 3 creates them while tracing the first train step, and a
    ``tf.function`` that creates variables is traced twice (about half the start-up time of a
    short run). Under a strategy Keras builds them itself before tracing.
    """
    model.optimizer.build(model.trainable_variables)
    images = np.zeros((1, *model.input_shape[1:]), "float32")
    keypoints = np.zeros((1, spec.num_keypoints, 3), "float32")
    y_pred = model(images, training=False)
    model.compute_loss(x=images, y={n: keypoints for n in y_pred}, y_pred=y_pred)
    model.reset_metrics()


# --------------------------------------------------------------------------- evaluation
def _keypoints_model(heatmap_model: keras.Model, recipe: Recipe, spec: KeypointSpec):
    """The heatmap model with the recipe's codec inside (decoding, flip test, geometry)."""
    from kpnet.inference import build_keypoints_model

    return build_keypoints_model(heatmap_model, spec, recipe.codec())


def _evaluator(recipe: Recipe, spec: KeypointSpec, records, config):
    """``evaluate(heatmap_model) -> metrics`` on the validation records, or None.

    Validation runs the keypoints model :func:`_keypoints_model` builds (the one fit saves
    as ``keypoints.keras``) through :func:`kpnet.runner.evaluate_model`: the crops, the
    decoding and the mapping back to the image are those of ``kpnet predict``.
    """
    if not records:
        return None
    from kpnet.runner import evaluate_model

    e = recipe.evaluation
    built: list[tuple[keras.Model, keras.Model]] = []  # reused: one predict trace per model

    def evaluate(heatmap_model: keras.Model) -> dict[str, Any]:
        if not built or built[0][0] is not heatmap_model:
            built[:] = [(heatmap_model, _keypoints_model(heatmap_model, recipe, spec))]
        return evaluate_model(
            built[0][1],
            records,
            spec,
            config,
            batch_size=e.batch_size,
            pck_thresholds=tuple(e.pck_thresholds),
        )

    return evaluate


# --------------------------------------------------------------------------- run folder
class RunFolderError(TrainingError):
    """The output folder holds a run this recipe cannot resume (another model or data)."""


#: Recipe keys that define the model, its data or its codec (a dotted prefix covers every key
#: under it): a run folder resumes only with the same values. Every other key may change on
#: resume; see :func:`fit`.
LOCKED_KEYS: tuple[str, ...] = (
    "data", "model", "loss.global_sigmas", "loss.refine_sigma", "evaluation.decode",
    "evaluation.flip_test", "evaluation.max_peaks", "evaluation.threshold",
    "evaluation.min_distance", "train.batch_size", "train.steps_per_epoch",
)  # fmt: skip
_FREE_KEYS = ("data.on_error",)  # under a locked prefix, yet free to change
#: Files whose presence means the folder holds a trained run, not only a failed start.
_TRAINED = ("backup/training_metadata.json", "last.keras", "best.keras", "keypoints.keras",
            "metrics.json")  # fmt: skip


def _locked(key: str) -> bool:
    def under(prefixes: Sequence[str]) -> bool:
        return any(key == p or key.startswith(p + ".") for p in prefixes)

    return under(LOCKED_KEYS) and not under(_FREE_KEYS)


def _differences(old: Any, new: Any, key: str = "") -> list[tuple[str, Any, Any]]:
    """(dotted key, old value, new value) of the leaves that differ; keys that only one side
    has are skipped (a key added to or removed from the recipe schema is not a setting)."""
    if isinstance(old, dict) and isinstance(new, dict):
        found = []
        for name in old:
            if name in new:
                found += _differences(old[name], new[name], f"{key}.{name}" if key else name)
        return found
    return [] if old == new else [(key, old, new)]


def _as_json(value: Any) -> Any:
    return json.loads(json.dumps(value))


def _read_run_file(out: str, name: str) -> Any:
    """The parsed ``out/name`` (YAML or JSON), None when absent; RunFolderError if unreadable."""
    import yaml

    path = fs.join(out, name)
    if not fs.isfile(path):
        return None
    try:
        data = yaml.safe_load(fs.read_text(path))  # JSON is YAML
        if not isinstance(data, dict):
            raise ValueError("not a mapping")
        return data
    except (*fs.io_errors(), UnicodeDecodeError, ValueError, yaml.YAMLError) as err:
        raise RunFolderError(
            f"{path} cannot be read ({fs.reason(err)}), so {out} cannot be resumed: use a new "
            f"output folder (-o) or delete {out} to start over"
        ) from None


def check_run_folder(recipe: Recipe, out: str | Path, spec: KeypointSpec | None = None) -> None:
    """Refuse (:class:`RunFolderError`, one line) to resume a run made with another model or data.

    Without ``spec``: compares the recipe's :data:`LOCKED_KEYS` with ``recipe.resolved.yaml``;
    with ``spec`` (after loading the data): compares the spec and the recipe's codec with
    ``spec.json`` and ``codec.json``. A folder without a trained run passes (a fresh start).
    Writes nothing.
    """
    out = _run_dir(out)
    if not any(fs.exists(fs.join(out, name)) for name in _TRAINED):
        return
    changed: list[tuple[str, Any, Any]] = []  # keys free to change that did
    if spec is None:
        old = _read_run_file(out, "recipe.resolved.yaml")
        new = _as_json(recipe.model_dump(mode="json"))
        diffs = _differences(old, new) if old is not None else []
        found = [d for d in diffs if _locked(d[0])]
        changed = [d for d in diffs if not _locked(d[0])]
    else:
        found = []
        for name, new in (("spec.json", spec.to_dict()), ("codec.json", recipe.codec().to_dict())):
            old = _read_run_file(out, name)
            if old is not None:
                found += [(f"{name}: {k}", o, n) for k, o, n in _differences(old, _as_json(new))]
    if found:
        key, old, new = found[0]
        more = f" (and {len(found) - 1} more: {', '.join(d[0] for d in found[1:4])})"
        raise RunFolderError(
            f"{out} holds a run with other settings: {key} is {_short(old)} there but "
            f"{_short(new)} now{more if len(found) > 1 else ''}; a run resumes only with the "
            "same model, data, codec and batch size: use a new output folder (-o) or delete "
            f"{out} to start over"
        )
    if changed:
        shown = ", ".join(f"{k} {_short(o, 24)} -> {_short(n, 24)}" for k, o, n in changed[:6])
        note = " ..." if len(changed) > 6 else ""
        if {"train.optimizer", "train.precision"} & {d[0] for d in changed}:
            note += (
                "; the optimizer state (moments, step count) is not restored for another "
                "optimizer or precision, so the learning-rate schedule restarts"
            )
        _log(f"{out}: changed since its last run: {shown}{note}")


def _short(value: Any, width: int = 60) -> str:
    text = json.dumps(value)
    return text if len(text) <= width else text[: width - 3] + "..."


def _run_dir(path: str | os.PathLike) -> str:
    """A run folder as a string: a URL as given (no trailing ``/``), a local path normalised."""
    return os.fspath(fs.as_path(path))


def _save_model_atomic(model: keras.Model, path: str) -> None:
    """``model.save(path)`` through :func:`kpnet.fs.staged` (a complete file or none)."""
    with fs.staged(path) as tmp:
        model.save(tmp)


def _write_run_files(recipe: Recipe, out: str, spec: KeypointSpec) -> None:
    """``recipe.resolved.yaml``, ``spec.json`` and ``codec.json``, each written atomically."""
    fs.makedirs(out)
    recipe.save(fs.join(out, "recipe.resolved.yaml"))
    fs.write_atomic(fs.join(out, "spec.json"), json.dumps(spec.to_dict(), indent=2))
    fs.write_atomic(fs.join(out, "codec.json"), json.dumps(recipe.codec().to_dict(), indent=2))


def nonfinite_weights(path: str | Path) -> list[str]:
    """Names of the float variables of a ``.keras`` file holding NaN or inf (optimizer included).

    Reads the weights file inside the archive (a local path or a URL) with h5py; builds no
    model.
    """
    import zipfile

    import h5py

    bad: list[str] = []

    def visit(name: str, obj: Any) -> None:
        if isinstance(obj, h5py.Dataset) and obj.dtype.kind == "f":
            if not np.isfinite(obj[()]).all():
                bad.append(name)

    with fs.local_copy(path) as local, zipfile.ZipFile(local) as archive:
        if "model.weights.h5" not in archive.namelist():
            return bad
        data = io.BytesIO(archive.read("model.weights.h5"))
    with h5py.File(data, "r") as weights:
        weights.visititems(visit)
    return bad


# --------------------------------------------------------------------------- fit
@dataclass
class _Run:
    """Everything one ``fit`` call shares between its phases."""

    recipe: Recipe
    out: str
    spec: KeypointSpec
    steps_per_epoch: int
    validation: Any
    evaluate: Any
    monitor: str
    guard: NaNGuard
    train_records: Sequence[InstanceRecord] = ()  # for precise BN statistics
    started: float = 0.0  # time.time() when training began (for the validation lines)

    def report_validation(self, epoch: int, overall: dict[str, Any]) -> None:
        """One line per validation: the error new frames get, and the training time so far."""
        parts = [f"{k} {overall[k]:.2f} px" for k in ("mean", "median", "p90")
                 if overall.get(k) is not None]  # fmt: skip
        parts += [f"PCK@0.05 {overall['pck@0.05']:.3f}"] if overall.get("pck@0.05") else []
        parts += [f"AP {overall['AP']:.3f}"] if overall.get("AP") is not None else []
        _log(
            f"epoch {epoch + 1}/{self.recipe.train.epochs} validation: {', '.join(parts)} "
            f"after {time.time() - self.started:.0f} s of training"
        )


def fit(recipe: Recipe, output_dir: str | Path) -> dict[str, Any]:
    """Train ``recipe`` into ``output_dir``; rerunning the same call resumes from the backup.

    Returns:
        ``{"output_dir", "initial_epoch", "epochs", "seconds", "best_model", "metrics"}``.

    Raises:
        RecipeError: bad recipe or missing files. DataError / SpecError: bad data.
        TrainingError: the loss, the weights or the validation errors became NaN / inf (the
            last good checkpoints are kept).
        RunFolderError: ``output_dir`` holds a run of another model or data (nothing written).
    """
    recipe.check_files()
    previous_policy = keras.mixed_precision.global_policy()
    strategy = make_strategy(recipe.train.distribute)  # first: multi-worker needs it early
    keras.utils.set_random_seed(recipe.train.seed)
    keras.mixed_precision.set_global_policy(recipe.train.precision)
    try:
        return _fit(recipe, _run_dir(output_dir), strategy)
    finally:
        keras.mixed_precision.set_global_policy(previous_policy)


def _fit(recipe: Recipe, out: str, strategy: Any) -> dict[str, Any]:
    chief = _is_chief(strategy)
    if not chief:  # every worker saves (saving may sync variables); only the chief's count
        out = fs.join(out, ".workers", f"worker-{strategy.cluster_resolver.task_id}")
    # Validate everything and compare with the run already in `out` BEFORE writing there.
    t = recipe.train
    replicas = strategy.num_replicas_in_sync
    if t.batch_size % replicas:
        raise recipe.error(
            "train.batch_size", f"{t.batch_size} does not divide over {replicas} replicas"
        )
    check_run_folder(recipe, out)  # cheap: before loading the data
    spec, train, val = load_data(recipe)
    if not train:
        raise recipe.error("data", "no training records (check the data paths and split)")
    check_run_folder(recipe, out, spec)  # the data's keypoint spec and the codec
    config = pipeline_config(recipe)
    steps = t.steps_per_epoch or max(1, len(train) // t.batch_size)  # may exceed one pass
    multi_worker = isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)
    train_ds, val_ds = _datasets(recipe, spec, train, val, config,
                                 strategy if multi_worker else None)  # fmt: skip
    evaluate = None if multi_worker else _evaluator(recipe, spec, val, config)
    from kpnet.runner import crop_source

    monitor = "val_px_mean" if evaluate else ("val_loss" if val else "loss")
    run = _Run(recipe, out, spec, steps, val_ds, evaluate, monitor, NaNGuard(), train)
    _log(
        f"{len(train)} training / {len(val)} validation instances, {spec.num_keypoints} "
        f"keypoints in {spec.num_channels} channels; {replicas} replica(s), global batch "
        f"{t.batch_size}, {steps} steps per epoch, precision {t.precision}"
        + (f"; validation crops: {crop_source(config.codec)}" if val else "")
        + (
            f"; each worker reads its 1/{_num_workers(strategy)} of the training images"
            if multi_worker
            else ""
        )
    )
    start = run.started = time.time()
    backup = read_backup(fs.join(out, "backup"))
    initial = backup["epoch"] if backup else 0
    if initial >= t.epochs:
        _log(f"{out} already holds {initial} trained epochs (train.epochs={t.epochs})")
    else:
        with strategy.scope():
            model = build_model(recipe, spec, init=backup is None)
            _write_run_files(recipe, out, spec)  # every check passed: the folder changes now
            _prepare_history(out, initial)
            _train_phases(run, model, train_ds, backup, initial)
    seconds = time.time() - start
    result = {"output_dir": out, "initial_epoch": initial, "epochs": t.epochs}
    result["seconds"] = round(seconds, 1)
    if chief:
        result.update(_finalize(run, val))
    else:
        _drop_worker_copies(out)
    return result


def _drop_worker_copies(out: str) -> None:
    """Delete a non-chief worker's model copies and logs; its backup and history stay.

    Like the temporary folders of TF's multi-worker guide, except that the backup is kept
    so a rerun resumes this worker at the same epoch as the chief.
    """
    for name in ("best.keras", "last.keras"):
        if fs.exists(fs.join(out, name)):
            fs.remove(fs.join(out, name))
    fs.rmtree(fs.join(out, "logs"))


def _train_phases(run: _Run, model, train_ds, backup, initial: int) -> None:
    recipe = run.recipe
    phases = training_phases(recipe)
    freeze = any(p.frozen for p in phases) or backbone_bn_frozen(recipe)
    names = backbone_layer_names(recipe) if freeze else set()
    current = None
    if backup:
        current = _restore(model, run, phases, backup, names)
    for phase in phases:
        if phase.end <= initial:
            continue
        if current != phase:
            configure_phase(model, recipe, run.spec, phase, run.steps_per_epoch, names)
            current = phase
        with warnings.catch_warnings():
            # A validation set of unknown length (data.on_error: skip) ends with this Keras
            # warning; the training set repeats, so it never means training stopped early.
            warnings.filterwarnings("ignore", message="Your input ran out of data")
            model.fit(
                train_ds,
                epochs=phase.end,
                initial_epoch=max(initial, phase.start),
                steps_per_epoch=run.steps_per_epoch,
                validation_data=run.validation,
                validation_steps=recipe.train.validation_steps,
                validation_freq=recipe.train.validation_every,
                callbacks=_callbacks(run, phase),
                verbose=recipe.train.verbose,
                shuffle=False,  # the pipeline shuffles
            )
        if run.guard.triggered:
            raise _nan_error(run)


def _restore(model, run: _Run, phases: list[Phase], backup: dict, names: set[str]) -> Phase:
    by_index = {p.index: p for p in phases}
    phase = by_index.get(backup["phase"])
    if phase is None or backup["epoch"] > phase.end and phase != phases[-1]:
        raise TrainingError(
            f"{fs.join(run.out, 'backup')} was written by a run with other train.epochs / "
            "freeze_backbone_epochs; use a new output folder or delete that backup"
        )
    configure_phase(model, run.recipe, run.spec, phase, run.steps_per_epoch, names)
    if not model.optimizer.built:
        model.optimizer.build(model.trainable_variables)
    try:
        with fs.local_copy(backup["weights"]) as weights:
            model.load_weights(weights)
    except ValueError as err:  # e.g. a backup of another input size or keypoint count
        raise RunFolderError(
            f"{fs.join(run.out, 'backup')} does not fit this model ({fs.reason(err)}); "
            f"use a new output folder (-o) or delete {run.out} to start over"
        ) from None
    _log(f"resuming from {fs.join(run.out, 'backup')} after epoch {backup['epoch']}")
    return phase


def _callbacks(run: _Run, phase: Phase) -> list[keras.callbacks.Callback]:
    t, out = run.recipe.train, run.out
    cbs: list[keras.callbacks.Callback] = [run.guard]
    precise_bn = _precise_bn(run)
    if precise_bn is not None:  # before val_loss, metrics and checkpoints of each epoch
        cbs.append(precise_bn)
    if run.evaluate is not None:
        cbs.append(KeypointMetrics(run.evaluate, t.validation_every, t.epochs - 1, run.guard,
                                   report=run.report_validation))  # fmt: skip
    best = _best_so_far(fs.join(out, "history.csv"), run.monitor)
    cbs += [  # the checkpoints and TensorBoard write URLs through tf.io.gfile themselves
        GuardedCheckpoint(
            fs.join(out, "best.keras"), run.guard, best, monitor=run.monitor, mode="min",
            save_best_only=True,
        ),
        GuardedCheckpoint(fs.join(out, "last.keras"), run.guard),
        HistoryCSV(fs.join(out, "history.csv")),
        keras.callbacks.TensorBoard(fs.join(out, "logs"), write_graph=False),
        Backup(fs.join(out, "backup"), phase.index, run.guard, t.backup_every_steps),
    ]  # fmt: skip
    return cbs


def _precise_bn(run: _Run) -> keras.callbacks.Callback | None:
    """Precise BN (``train.precise_bn_batches``): population statistics of the training
    crops as the model trains on them (augmented), at most one pass per epoch; None when off.

    Measured (quickstart, 30 epochs, validation mean px): moving averages 0.681, precise BN on
    augmented crops 0.683, on inference-geometry crops 0.937 (top-down training crops are
    1.25x wider and rescaled: statistics of other crops shift every layer); on whole frames
    of a DLC project both precise variants measured alike (44.0 / 44.1 px)."""
    from kpnet.batchnorm import PreciseBN
    from kpnet.data.pipeline import build_dataset
    from kpnet.data.tfrecord import TFRecordSet

    t, records = run.recipe.train, run.train_records
    if not isinstance(records, (TFRecordSet, RecordTable)):  # a set streams: no subset to pick
        records = list(records)
    if not t.precise_bn_batches or not records:
        return None
    batches = min(t.precise_bn_batches, math.ceil(len(records) / t.batch_size))
    cap = 4 * batches * t.batch_size  # a large set: a fixed random subset, checked once
    if len(records) > cap and not isinstance(records, TFRecordSet):
        keep = sorted(np.random.default_rng(t.seed).choice(len(records), cap, replace=False))
        records = (records.take(keep) if isinstance(records, RecordTable)
                   else [records[i] for i in keep])  # fmt: skip
    config = pipeline_config(run.recipe)

    def dataset() -> tf.data.Dataset:
        return build_dataset(
            records, run.spec, config, t.batch_size, training=True, shuffle=True,
            repeat=True, seed=t.seed, on_error=run.recipe.data.on_error, drop_remainder=True,
        ).map(lambda images, keypoints: images)  # fmt: skip

    return PreciseBN(dataset, batches)


def _nan_error(run: _Run) -> TrainingError:
    epoch, batch = run.guard.where or (0, 0)
    backup = read_backup(fs.join(run.out, "backup"))
    kept = (
        f"the last good checkpoints are kept: {fs.join(run.out, 'last.keras')} and the backup "
        f"after epoch {backup['epoch']}"
        if backup
        else "no epoch finished before, so there is no checkpoint"
    )
    return TrainingError(
        f"the loss became NaN/inf at epoch {epoch + 1}, batch {batch + 1}; training stopped "
        f"and {kept}. Lower train.lr, set train.clipnorm, or use precision float32, then "
        "re-run the same command to resume"
    )


# --------------------------------------------------------------------------- history
def _read_history(path: str) -> list[dict[str, str]]:
    if not fs.isfile(path):
        return []
    return list(csv.DictReader(io.StringIO(fs.read_text(path), newline="")))


def _prepare_history(out: str, initial: int) -> None:
    """Fresh run: drop an old history; resume: drop rows of epochs not in the backup."""
    path = fs.join(out, "history.csv")
    rows = _read_history(path)
    keep = [r for r in rows if initial and int(r["epoch"]) < initial]
    if not keep:
        if fs.exists(path):
            fs.remove(path)
        return
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(keep)
    fs.write_atomic(path, text.getvalue())


def _best_so_far(path: str, monitor: str) -> float | None:
    values = []
    for row in _read_history(path):
        try:
            values.append(float(row.get(monitor) or "nan"))
        except ValueError:
            continue
    values = [v for v in values if math.isfinite(v)]
    return min(values) if values else None


def _plot_curves(out: str) -> str | None:
    rows = _read_history(fs.join(out, "history.csv"))
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [int(r["epoch"]) + 1 for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, keys in zip(
        axes, (("loss", "val_loss"), ("val_px_mean", "val_px_median")), strict=True
    ):
        for key in keys:
            pts = [(e, float(r[key])) for e, r in zip(epochs, rows, strict=True) if _num(r, key)]
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", label=key)
        ax.set_xlabel("epoch")
        if ax.get_lines():  # no validation yet: an empty panel, no legend
            ax.legend()
        ax.grid(alpha=0.3)
    axes[0].set_title("loss")
    axes[1].set_title("validation pixel error (image px)")
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, dpi=100, format="png")
    plt.close(fig)
    fs.write_atomic(fs.join(out, "curves.png"), png.getvalue())
    return fs.join(out, "curves.png")


def _num(row: dict[str, str], key: str) -> bool:
    try:
        return math.isfinite(float(row.get(key) or "nan"))
    except ValueError:
        return False


# --------------------------------------------------------------------------- finalize
def _finalize(run: _Run, val: list[InstanceRecord]) -> dict[str, Any]:
    """Curves, then (all finite) ``metrics.json`` and ``keypoints.keras``, each atomically."""
    out = run.out
    best = fs.join(out, "best.keras")
    if not fs.exists(best):
        best = fs.join(out, "last.keras")
    found = fs.exists(best)
    result: dict[str, Any] = {"best_model": best if found else None}
    if found:
        _check_finite_weights(run, best)  # before anything is written
    _plot_curves(out)
    if not found:
        return result
    register_keras_objects()  # a finished run re-run in a new process has built no model
    with fs.local_copy(best) as local:
        model = keras.saving.load_model(local, safe_mode=True)
    fuse_batchnorm(model)
    metrics = _final_metrics(run, model, val)
    _check_finite_metrics(run, best, metrics)
    result["metrics"] = metrics
    kp_model = None
    if run.recipe.export.keypoints_model or run.recipe.export.saved_model:
        kp_model = _keypoints_model(model, run.recipe, run.spec)
        _save_model_atomic(kp_model, fs.join(out, "keypoints.keras"))
        result["keypoints_model"] = fs.join(out, "keypoints.keras")
    fs.write_atomic(fs.join(out, "metrics.json"), json.dumps(metrics, indent=2))
    if kp_model is not None and run.recipe.export.saved_model:
        from kpnet.export import export_saved_model

        tf_backend = keras.backend.backend() == "tensorflow"
        source = kp_model if tf_backend else fs.join(out, "keypoints.keras")
        export_saved_model(source, fs.join(out, "saved_model"), run.spec)  # atomic itself
    return result


def _check_finite_weights(run: _Run, best: str) -> None:
    """TrainingError when best.keras or last.keras holds NaN / inf weights."""
    checked = dict.fromkeys([best, fs.join(run.out, "last.keras")])
    bad = {path: nonfinite_weights(path) for path in checked if fs.isfile(path)}
    poisoned = [path for path, names in bad.items() if names]
    if not poisoned:
        return
    path, names = poisoned[0], bad[poisoned[0]]
    finite = [fs.basename(p) for p in bad if p not in poisoned]
    kept = f"; {', '.join(finite)} is finite" if finite else ""
    raise TrainingError(
        f"the weights became NaN/inf: {path} holds {len(names)} non-finite variable(s) "
        f"(e.g. {names[0]}){kept}; {', '.join(_FINAL_FILES)} were not written. Lower "
        "train.lr, set train.clipnorm or use precision float32, and train again in a new "
        "output folder (-o)"
    )


def _check_finite_metrics(run: _Run, best: str, metrics: dict) -> None:
    """TrainingError when the validation pixel errors of ``best`` are NaN / inf."""
    overall = metrics.get("overall") or {}
    bad = [
        k for k in ("mean", "median", "p90")
        if overall.get(k) is not None and not math.isfinite(float(overall[k]))
    ]  # fmt: skip
    if bad:
        raise TrainingError(
            f"the validation pixel error of {best} is {overall[bad[0]]} ({bad[0]}): the model "
            f"predicts NaN/inf; {', '.join(_FINAL_FILES)} were not written. Lower train.lr, "
            "set train.clipnorm or use precision float32, and train again in a new output "
            "folder (-o)"
        )


_FINAL_FILES = ("metrics.json", "keypoints.keras")


def _final_metrics(run: _Run, model: keras.Model, val: list[InstanceRecord]) -> dict:
    history = _read_history(fs.join(run.out, "history.csv"))
    metrics: dict[str, Any] = {"model": fs.join(run.out, "best.keras"), "monitor": run.monitor}
    scores = [(float(r[run.monitor]), int(r["epoch"]) + 1) for r in history if _num(r, run.monitor)]
    if scores:
        metrics["best_epoch"] = min(scores)[1]
    if history:
        last = history[-1]
        metrics["last_epoch"] = {k: float(v) for k, v in last.items() if _num(last, k)}
    if run.evaluate is not None:
        full = run.evaluate(model)
        full.pop("predictions", None)
        metrics.update(full)
    return metrics


__all__ = [
    "LOCKED_KEYS",
    "EpochSchedule",
    "JaxDataParallel",
    "MultiWorkerStrategy",
    "Phase",
    "RunFolderError",
    "TrainingError",
    "backbone_layer_names",
    "build_model",
    "check_run_folder",
    "configure_phase",
    "fit",
    "load_data",
    "load_training",
    "load_validation",
    "make_strategy",
    "nonfinite_weights",
    "output_names",
    "pipeline_config",
    "split_by_image",
    "training_phases",
]
