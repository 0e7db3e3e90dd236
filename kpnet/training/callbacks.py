"""Keras callbacks used by :func:`kpnet.training.fit`: backups, history, NaN guard, metrics.

Every file they write goes through :mod:`kpnet.fs`, so the run folder may be a URL, and is
written under a temporary name then renamed (Keras' checkpoints and TensorBoard's event
files included): a full disk stops fit with :class:`kpnet.fs.WriteError` and never leaves a
partial file under a real name.

Example:
    >>> guard = NaNGuard()
    >>> guard.triggered
    False
"""

from __future__ import annotations

import json
import math
import os
import uuid
from collections.abc import Callable, Sequence
from typing import Any

import h5py
import keras

from kpnet import fs
from kpnet.run_folder import RunFolderError

BACKUP_WEIGHTS = "latest.weights.h5"
BACKUP_META = "training_metadata.json"


def _finite(logs: dict | None, key: str | None = None) -> bool:
    """The loss (or ``key``, which must then be present) is finite."""
    if key is not None:
        value = (logs or {}).get(key)
        return value is not None and math.isfinite(float(value))
    loss = (logs or {}).get("loss")
    return loss is None or math.isfinite(float(loss))


class NaNGuard(keras.callbacks.Callback):
    """Stop training at the first non-finite loss and remember where it happened.

    Unlike ``keras.callbacks.TerminateOnNaN`` it records the epoch and batch, so the caller
    can raise a clear error; the checkpoint callbacks skip the poisoned epoch.
    """

    def __init__(self) -> None:
        super().__init__()
        self.triggered = False
        self.where: tuple[int, int] | None = None
        self._epoch = 0

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self._epoch = epoch

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        if not self.triggered and not _finite(logs):
            self.triggered = True
            self.where = (self._epoch, batch)
            self.model.stop_training = True


class Backup(keras.callbacks.Callback):
    """Back up weights + optimizer state and the epoch count, so a rerun resumes.

    Like ``keras.callbacks.BackupAndRestore`` but phase-aware (a frozen-backbone phase and
    an unfrozen phase train different variables) and never deleting its backup; restoring
    is done by the caller (:func:`read_backup` + ``model.load_weights``).

    Args:
        backup_dir: folder (or URL) for ``latest.weights.h5`` and ``training_metadata.json``.
        phase: index of the training phase this fit call runs.
        guard: backups are skipped once the guard saw a non-finite loss.
        every_steps: also back up every N training steps (the epoch restarts on resume).
    """

    def __init__(
        self, backup_dir: str | os.PathLike, phase: int, guard: NaNGuard,
        every_steps: int | None = None,
    ) -> None:  # fmt: skip
        super().__init__()
        self.dir = os.fspath(backup_dir)
        self.phase = phase
        self.guard = guard
        self.every_steps = every_steps
        self._epoch = 0
        self._steps = 0

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self._epoch = epoch

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        self._steps += 1
        if self.every_steps and self._steps % self.every_steps == 0 and not self.guard.triggered:
            self._save(self._epoch)

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        if not self.guard.triggered and _finite(logs):
            self._save(epoch + 1)

    def _save(self, completed_epochs: int) -> None:
        # each file atomic (kpnet.fs): a kill -9 never leaves half a file; the weights first
        with fs.staged(fs.join(self.dir, BACKUP_WEIGHTS)) as tmp:
            self.model.save_weights(tmp, overwrite=True)
        meta = {"epoch": completed_epochs, "phase": self.phase}
        fs.write_atomic(fs.join(self.dir, BACKUP_META), json.dumps(meta))


def read_backup(backup_dir: str | os.PathLike) -> dict[str, Any] | None:
    """``{"epoch": completed epochs, "phase": i, "weights": path}`` or None when absent.

    ``backup_dir`` may be a URL; ``weights`` is then a URL too (load it through
    :func:`kpnet.fs.local_copy`). Both files are checked here, before a resume writes
    anything: a metadata file that is not ``{"epoch": int, "phase": int}``, metadata without
    its weights, or a weights file that is not a whole Keras weights file (HDF5 with its
    ``layers`` group) is a :class:`~kpnet.run_folder.RunFolderError` naming the file.
    """
    meta_path = fs.join(backup_dir, BACKUP_META)
    weights = fs.join(backup_dir, BACKUP_WEIGHTS)
    if not fs.isfile(meta_path):
        return None  # no backup yet (weights alone: killed between the two writes)
    meta = _backup_meta(meta_path, backup_dir)
    if not fs.isfile(weights):
        raise _backup_error(weights, "is missing (its training_metadata.json is there)",
                            backup_dir)  # fmt: skip
    problem = _weights_problem(weights)
    if problem:
        raise _backup_error(weights, problem, backup_dir)
    return {**meta, "weights": weights}


def _backup_meta(path: str, backup_dir: str | os.PathLike) -> dict[str, int]:
    try:
        meta = json.loads(fs.read_text(path))
        epoch, phase = meta["epoch"], meta["phase"]
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0
                   for v in (epoch, phase)):  # fmt: skip
            raise ValueError("epoch and phase must be whole numbers >= 0")
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise _backup_error(path, f"is not JSON ({err})", backup_dir) from None
    except (ValueError, KeyError, TypeError) as err:
        raise _backup_error(path, f'is not {{"epoch": N, "phase": N}} ({err})',
                            backup_dir) from None  # fmt: skip
    return {"epoch": epoch, "phase": phase}


def _weights_problem(path: str) -> str | None:
    """What keeps ``path`` from being a whole Keras ``.weights.h5`` file, or None."""
    try:
        with fs.local_copy(path) as local, h5py.File(local, "r") as f:
            if "layers" not in f:
                return "is not a Keras weights file (no 'layers' group)"
    except OSError as err:  # h5py: truncated, not HDF5, empty
        return f"cannot be read ({fs.reason(err)})"
    return None


def _backup_error(path: str, problem: str, backup_dir: str | os.PathLike) -> RunFolderError:
    return RunFolderError(
        f"{path} {problem}, so the run cannot resume from its backup; delete "
        f"{os.fspath(fs.as_path(backup_dir))} to train this run again from epoch 1, or use a "
        "new output folder (-o)"
    )


class GuardedCheckpoint(keras.callbacks.ModelCheckpoint):
    """``ModelCheckpoint`` that skips epochs with a non-finite loss or a missing monitor.

    ``best`` may be seeded (e.g. from history.csv) so a resumed run keeps its best model.
    """

    def __init__(self, filepath: str, guard: NaNGuard, best: float | None = None, **kwargs):
        super().__init__(filepath, **kwargs)
        self.guard = guard
        if best is not None:
            self.best = best

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        if self.guard.triggered or not _finite(logs):
            return
        if self.save_best_only and not _finite(logs, self.monitor):
            return  # no validation this epoch (NaN placeholder) or a non-finite score
        super().on_epoch_end(epoch, logs)

    def _save_model(self, epoch: int, batch: int | None, logs: dict | None) -> None:
        """As Keras saves, but to a temporary file renamed over the checkpoint
        (:func:`kpnet.fs.staged`): a full disk leaves the previous checkpoint whole."""
        filepath = self._get_file_path(epoch, batch, logs)
        if self._should_save_model(epoch, batch, logs, filepath):
            with fs.staged(filepath) as tmp:
                self.model.save(tmp, overwrite=True)


class StagedTensorBoard(keras.callbacks.TensorBoard):
    """``TensorBoard`` whose event files are written in memory (TensorFlow's ``ram://``) and
    copied into ``log_dir`` after every epoch, each under a temporary name then renamed
    (:func:`kpnet.fs.write_atomic`): no partial event file on a full disk, URLs work too."""

    def __init__(self, log_dir: str | os.PathLike, **kwargs: Any) -> None:
        self.target = os.fspath(log_dir)
        self.staging = f"ram://kpnet-tensorboard/{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._copied: dict[str, int] = {}
        super().__init__(self.staging, **kwargs)

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        super().on_epoch_end(epoch, logs)
        for writer in self._writers.values():
            writer.flush()
        self._publish()

    def on_train_end(self, logs: dict | None = None) -> None:
        super().on_train_end(logs)  # closes (and flushes) the writers
        self._publish()
        fs.rmtree(self.staging)

    def _publish(self) -> None:
        """Copy every staged event file that grew into ``log_dir``."""
        for rel in fs.files_under(self.staging):
            data = fs.read_bytes(f"{self.staging}/{rel}")
            if self._copied.get(rel) != len(data):
                fs.write_atomic(fs.join(self.target, *rel.split("/")), data)
                self._copied[rel] = len(data)


class KeypointMetrics(keras.callbacks.Callback):
    """Decode the validation set every ``every`` epochs and add ``val_*`` pixel metrics.

    Args:
        evaluate: ``evaluate(heatmap_model) -> metrics dict`` (see :mod:`kpnet.evaluate`).
        every: evaluate every N epochs (and always on the last epoch).
        last_epoch: index of the final epoch (0-based).
        guard: evaluation is skipped once the guard saw a non-finite loss.
        report: called with ``(epoch, overall metrics)`` after each evaluation (fit prints
            one line with the elapsed training time).
    """

    def __init__(
        self,
        evaluate: Callable[[keras.Model], dict[str, Any]],
        every: int,
        last_epoch: int,
        guard: NaNGuard,
        keys: Sequence[str] = ("mean", "median", "p90", "pck@0.05", "pck@0.1", "AP"),
        report: Callable[[int, dict[str, Any]], None] | None = None,
    ) -> None:
        super().__init__()
        self.evaluate = evaluate
        self.every = every
        self.last_epoch = last_epoch
        self.guard = guard
        self.keys = tuple(keys)
        self.report = report

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        if logs is None or self.guard.triggered or not _finite(logs):
            return
        if (epoch + 1) % self.every and epoch != self.last_epoch:
            # NaN placeholders: HistoryCSV fixes its columns at the first epoch
            overall = {}
        else:
            overall = self.evaluate(self.model)["overall"]
            if self.report is not None:
                self.report(epoch, overall)
        for key in self.keys:
            name = key.replace("@", "_")
            log_key = f"val_px_{name}" if key in ("mean", "median", "p90") else f"val_{name}"
            if overall.get(key) is not None:
                logs[log_key] = float(overall[key])
            elif not overall:
                logs[log_key] = float("nan")
