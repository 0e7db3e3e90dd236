"""The training loop: ``fit(recipe, output_dir)`` runs a recipe end to end and resumes on a re-run.

Example:
    >>> from kpnet.recipe import load_recipe
    >>> recipe = load_recipe("recipes/quickstart.yaml")        # doctest: +SKIP
    >>> result = fit(recipe, "runs/quickstart")                 # doctest: +SKIP
    >>> result["metrics"]["overall"]["mean"]                    # doctest: +SKIP
    0.8

Output folder: see :mod:`kpnet.run_folder` (``best.keras`` has the lowest validation pixel
error, else validation loss).

Resuming: the backup is written atomically after every epoch (and every
``train.backup_every_steps``), so a process killed at any point (even ``kill -9``) loses at
most the epoch it was in. Nothing is written into the output folder before the recipe, the
data and the batch size are validated and the recipe is compared with the run already there
(:meth:`kpnet.run_folder.RunFolder.check_settings`: a run of another model or data is
refused); every output file is written atomically, and NaN/inf weights or validation errors
stop fit before ``metrics.json`` / ``keypoints.keras`` are written.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from kpnet import fs
from kpnet.data.columns import usable_records
from kpnet.data.pipeline import build_dataset
from kpnet.data.records import InstanceRecord, RecordTable
from kpnet.data.sources import load_data, pipeline_config, resolve_input_size
from kpnet.data.tfrecord import TFRecordSet
from kpnet.recipe import Recipe
from kpnet.run_folder import RunFolder, RunFolderError, short
from kpnet.runner import crop_source
from kpnet.spec import KeypointSpec
from kpnet.training.callbacks import (
    Backup,
    GuardedCheckpoint,
    KeypointMetrics,
    NaNGuard,
    StagedTensorBoard,
    read_backup,
)
from kpnet.training.distribute import is_chief, make_strategy, num_workers
from kpnet.training.finalize import finalize
from kpnet.training.phases import (
    Phase,
    backbone_bn_frozen,
    backbone_layer_names,
    build_model,
    configure_phase,
    output_names,
    training_phases,
)
from kpnet.training.precise_bn import PreciseBN
from kpnet.training.report import (
    HistoryCSV,
    TrainingError,
    best_so_far,
    log,
    prepare_history,
    validation_line,
)
from kpnet.training.validation import evaluator


class _SkipLines(logging.Filter):
    """fit's lines about unusable image files. The data pipeline warns each time a pipeline
    is built over a set; fit reports them when it first builds each set's pipeline, naming
    the set (``training set: skipping ...``), and later pipelines over the same records
    (precise BN, validation) stay quiet. Other warnings pass unchanged."""

    MARK = "unusable image files"

    def __init__(self) -> None:
        super().__init__()
        self.current: str | None = None

    @classmethod
    @contextlib.contextmanager
    def installed(cls) -> Iterator[_SkipLines]:
        """The filter on every ``kpnet.data`` logger (a logger's filters see only its own
        records, not those its children propagate)."""
        skips = cls()
        names = [n for n in logging.root.manager.loggerDict if n.startswith("kpnet.data")]
        loggers = [logging.getLogger(n) for n in names]
        for logger in loggers:
            logger.addFilter(skips)
        try:
            yield skips
        finally:
            for logger in loggers:
                logger.removeFilter(skips)

    @contextlib.contextmanager
    def named(self, name: str) -> Iterator[None]:
        """Report the skips of the pipelines built in the block as ``name``'s."""
        self.current = name
        try:
            yield
        finally:
            self.current = None

    def filter(self, record: logging.LogRecord) -> bool:
        if self.MARK not in str(record.msg):
            return True
        if self.current is None:
            return False
        record.msg = f"{self.current}: {record.msg}"
        return True


def _targets(recipe: Recipe):
    """``(images, keypoints) -> (images, {output: keypoints})`` for the recipe's model."""
    names = output_names(recipe)
    return lambda images, keypoints: (images, {name: keypoints for name in names})


def _datasets(recipe, spec, train, val, config, strategy: tf.distribute.Strategy | None,
              skips: _SkipLines):  # fmt: skip
    """(training, validation) datasets; under multi-worker training each worker builds the
    pipeline of its own share of the images (``distribute_datasets_from_function``), so no
    worker reads or augments another's images. Each set's unusable image files are reported
    here, once, naming the set (``skips``)."""
    t = recipe.train
    on_error = recipe.data.on_error

    def train_dataset(context: tf.distribute.InputContext | None = None) -> tf.data.Dataset:
        return build_dataset(
            train, spec, config, t.batch_size, training=True, seed=t.seed, repeat=True,
            on_error=on_error, input_context=context,
        ).map(_targets(recipe))  # fmt: skip

    val_ds = None
    if val:
        with skips.named("validation set"):
            val_ds = build_dataset(
                val, spec, config, t.batch_size, training=False, on_error=on_error
            ).map(_targets(recipe))
    with skips.named("training set"):
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


@dataclass
class Run:
    """Everything one ``fit`` call shares between its phases."""

    recipe: Recipe
    folder: RunFolder
    spec: KeypointSpec
    steps_per_epoch: int
    validation: Any
    evaluate: Any
    monitor: str
    guard: NaNGuard
    train_records: Sequence[InstanceRecord] = ()  # for precise BN statistics
    started: float = 0.0  # time.time() when training began (for the validation lines)

    @property
    def out(self) -> str:
        return self.folder.path

    def report_validation(self, epoch: int, overall: dict[str, Any]) -> None:
        """One line per validation: the error new frames get, and the training time so far."""
        log(validation_line(epoch, self.recipe.train.epochs, overall, self.started))


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
        with _SkipLines.installed() as skips:
            return _fit(recipe, RunFolder(output_dir), strategy, skips)
    finally:
        keras.mixed_precision.set_global_policy(previous_policy)


def _fit(recipe: Recipe, folder: RunFolder, strategy: Any, skips: _SkipLines) -> dict[str, Any]:
    chief = is_chief(strategy)
    if not chief:  # every worker saves (saving may sync variables); only the chief's count
        folder = RunFolder(folder.file(f".workers/worker-{strategy.cluster_resolver.task_id}"))
    # Validate everything and compare with the run already in the folder BEFORE writing there.
    t = recipe.train
    replicas = strategy.num_replicas_in_sync
    if t.batch_size % replicas:
        raise recipe.error(
            "train.batch_size", f"{t.batch_size} does not divide over {replicas} replicas"
        )
    check_run_folder(recipe, folder)  # cheap: before loading the data
    backup = read_backup(folder.backup)  # a bad backup: refused before anything is written
    spec, train, val = load_data(recipe)
    if not train:
        raise recipe.error("data", "no training records (check the data paths and split)")
    auto_size = recipe.model.input_size == "auto"
    recipe = resolve_input_size(recipe, train)  # the run folder saves the [H, W] it picks
    check_run_folder(recipe, folder, spec)  # the data's keypoint spec and the codec
    config = pipeline_config(recipe)
    if val and recipe.data.on_error == "skip":  # validation predicts every record it is given
        with skips.named("validation set"):
            val = usable_records(val, spec, "skip", config.max_pixels)
    steps = t.steps_per_epoch or max(1, len(train) // t.batch_size)  # may exceed one pass
    multi_worker = isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)
    train_ds, val_ds = _datasets(recipe, spec, train, val, config,
                                 strategy if multi_worker else None, skips)  # fmt: skip
    evaluate = None if multi_worker else evaluator(recipe, spec, val, config)
    monitor = "val_px_mean" if evaluate else ("val_loss" if val else "loss")
    run = Run(recipe, folder, spec, steps, val_ds, evaluate, monitor, NaNGuard(), train)
    log(
        f"{len(train)} training / {len(val)} validation instances, {spec.num_keypoints} "
        f"keypoints in {spec.num_channels} channels; {replicas} replica(s), global batch "
        f"{t.batch_size}, {steps} steps per epoch, precision {t.precision}"
        + (f"; input {'x'.join(map(str, recipe.model.input_size))} (auto: the frames' aspect)"
           if auto_size else "")
        + (f"; validation crops: {crop_source(config.codec)}" if val else "")
        + (
            f"; each worker reads its 1/{num_workers(strategy)} of the training images"
            if multi_worker
            else ""
        )
    )
    start = run.started = time.time()
    initial = backup["epoch"] if backup else 0
    if initial >= t.epochs:
        log(f"{folder.path} already holds {initial} trained epochs (train.epochs={t.epochs})")
    else:
        with strategy.scope():
            model = build_model(recipe, spec, init=backup is None)
            phase = _restore(model, run, backup) if backup else None
            # every check passed and the backup loaded: the folder changes now
            folder.write_settings(recipe.to_yaml(), spec.to_dict(), recipe.codec().to_dict())
            prepare_history(folder.path, initial)
            _train_phases(run, model, train_ds, phase, initial)
    seconds = time.time() - start
    result = {"output_dir": folder.path, "initial_epoch": initial, "epochs": t.epochs}
    result["seconds"] = round(seconds, 1)
    if chief:
        result.update(finalize(folder, recipe, spec, monitor, evaluate))
    else:
        _drop_worker_copies(folder)
    return result


def check_run_folder(
    recipe: Recipe, folder: RunFolder | str | Path, spec: KeypointSpec | None = None
) -> None:
    """Refuse (RunFolderError, one line) to resume a run made with another model or data.

    Without ``spec``: compares the recipe's locked keys with ``recipe.resolved.yaml`` and
    prints the free keys that changed; with ``spec`` (after loading the data): compares the
    spec and the recipe's codec with ``spec.json`` and ``codec.json``. A folder without a
    trained run passes (a fresh start). Writes nothing.
    """
    folder = folder if isinstance(folder, RunFolder) else RunFolder(folder)
    if spec is not None:
        folder.check_data(spec.to_dict(), recipe.codec().to_dict())
        return
    # input_size auto: compared as the [H, W] it resolves to, in codec.json, once data loads
    later = ("model.input_size",) if recipe.model.input_size == "auto" else ()
    changed = folder.check_settings(recipe.model_dump(mode="json"), resolved_later=later)
    if not changed:
        return
    shown = ", ".join(f"{k} {short(o, 24)} -> {short(n, 24)}" for k, o, n in changed[:6])
    note = " ..." if len(changed) > 6 else ""
    if {"train.optimizer", "train.precision"} & {d[0] for d in changed}:
        note += (
            "; the optimizer state (moments, step count) is not restored for another "
            "optimizer or precision, so the learning-rate schedule restarts"
        )
    log(f"{folder.path}: changed since its last run: {shown}{note}")


def _drop_worker_copies(folder: RunFolder) -> None:
    """Delete a non-chief worker's model copies and logs; its backup and history stay.

    Like the temporary folders of TF's multi-worker guide, except that the backup is kept
    so a rerun resumes this worker at the same epoch as the chief.
    """
    for name in ("best.keras", "last.keras"):
        if fs.exists(folder.file(name)):
            fs.remove(folder.file(name))
    fs.rmtree(folder.file("logs"))


def _frozen_names(recipe: Recipe, phases: list[Phase]) -> set[str]:
    """The backbone's layer names when some phase freezes it (or its BN, or its early
    layers), else none."""
    t = recipe.train
    freeze = any(p.frozen for p in phases) or backbone_bn_frozen(recipe) or t.freeze_trunk_stride
    return backbone_layer_names(recipe) if freeze else set()


def _train_phases(run: Run, model, train_ds, current: Phase | None, initial: int) -> None:
    """Train the phases not finished yet; ``current``: the phase the backup restored."""
    recipe = run.recipe
    phases = training_phases(recipe)
    names = _frozen_names(recipe, phases)
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


def _restore(model, run: Run, backup: dict) -> Phase:
    """Configure the backup's phase and load its weights and optimizer state (nothing of the
    run folder is written before this succeeded)."""
    phases = training_phases(run.recipe)
    names = _frozen_names(run.recipe, phases)
    by_index = {p.index: p for p in phases}
    phase = by_index.get(backup["phase"])
    if phase is None or backup["epoch"] > phase.end and phase != phases[-1]:
        raise TrainingError(
            f"{run.folder.backup} was written by a run with other train.epochs / "
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
            f"{run.folder.backup} does not fit this model ({fs.reason(err)}); "
            f"use a new output folder (-o) or delete {run.out} to start over"
        ) from None
    except (OSError, KeyError, TypeError) as err:  # damaged inside, past its header
        raise RunFolderError(
            f"{backup['weights']} cannot be read ({fs.reason(err)}), so the run cannot resume "
            f"from its backup; delete {run.folder.backup} to train this run again from epoch "
            "1, or use a new output folder (-o)"
        ) from None
    log(f"resuming from {run.folder.backup} after epoch {backup['epoch']}")
    return phase


def _callbacks(run: Run, phase: Phase) -> list[keras.callbacks.Callback]:
    t, folder = run.recipe.train, run.folder
    cbs: list[keras.callbacks.Callback] = [run.guard]
    precise_bn = _precise_bn(run)
    if precise_bn is not None:  # before val_loss, metrics and checkpoints of each epoch
        cbs.append(precise_bn)
    if run.evaluate is not None:
        cbs.append(KeypointMetrics(run.evaluate, t.validation_every, t.epochs - 1, run.guard,
                                   report=run.report_validation))  # fmt: skip
    best = best_so_far(folder.file("history.csv"), run.monitor)
    cbs += [  # the checkpoints and TensorBoard write URLs through tf.io.gfile themselves
        GuardedCheckpoint(
            folder.file("best.keras"), run.guard, best, monitor=run.monitor, mode="min",
            save_best_only=True,
        ),
        GuardedCheckpoint(folder.file("last.keras"), run.guard),
        HistoryCSV(folder.file("history.csv")),
        StagedTensorBoard(folder.file("logs"), write_graph=False),
        Backup(folder.backup, phase.index, run.guard, t.backup_every_steps),
    ]  # fmt: skip
    return cbs


def _precise_bn(run: Run) -> keras.callbacks.Callback | None:
    """Precise BN (``train.precise_bn_batches``): population statistics of the training
    crops as the model trains on them (augmented), at most one pass per epoch; None when off.

    Measured (quickstart, 30 epochs, validation mean px): moving averages 0.681, precise BN on
    augmented crops 0.683, on inference-geometry crops 0.937 (top-down training crops are
    1.25x wider and rescaled: statistics of other crops shift every layer); on whole frames
    of a DLC project both precise variants measured alike (44.0 / 44.1 px)."""
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

    def dataset() -> tf.data.Dataset:  # a subset of the training set: reported already
        return build_dataset(
            records, run.spec, config, t.batch_size, training=True, shuffle=True,
            repeat=True, seed=t.seed, on_error=run.recipe.data.on_error, drop_remainder=True,
        ).map(lambda images, keypoints: images)  # fmt: skip

    return PreciseBN(dataset, batches)


def _nan_error(run: Run) -> TrainingError:
    epoch, batch = run.guard.where or (0, 0)
    backup = read_backup(run.folder.backup)
    kept = (
        f"the last good checkpoints are kept: {run.folder.file('last.keras')} and the backup "
        f"after epoch {backup['epoch']}"
        if backup
        else "no epoch finished before, so there is no checkpoint"
    )
    return TrainingError(
        f"the loss became NaN/inf at epoch {epoch + 1}, batch {batch + 1}; training stopped "
        f"and {kept}. Lower train.lr, set train.clipnorm, or use precision float32, then "
        "re-run the same command to resume"
    )
