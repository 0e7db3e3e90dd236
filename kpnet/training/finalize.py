"""The end of a run: finite checks, ``metrics.json``, ``keypoints.keras`` and the SavedModel.

Nothing is written unless the chosen model's weights and validation errors are finite; each
file is written atomically.

Example:
    >>> nonfinite_weights("runs/quickstart/best.keras")     # doctest: +SKIP
    []
"""

from __future__ import annotations

import io
import json
import math
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import h5py
import keras
import numpy as np

from kpnet import fs
from kpnet.export import export_saved_model
from kpnet.inference import load_keras_file
from kpnet.models.fused_bn import fuse_batchnorm
from kpnet.recipe import Recipe
from kpnet.run_folder import RunFolder, check_model_file
from kpnet.saving import register_keras_objects
from kpnet.spec import KeypointSpec
from kpnet.training.report import TrainingError, finite_cell, plot_curves, read_history
from kpnet.training.validation import keypoints_model


def nonfinite_weights(path: str | Path) -> list[str]:
    """Names of the float variables of a ``.keras`` file holding NaN or inf (optimizer included).

    Reads the weights file inside the archive (a local path or a URL) with h5py; builds no
    model.
    """
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




def finalize(
    folder: RunFolder,
    recipe: Recipe,
    spec: KeypointSpec,
    monitor: str,
    evaluate: Callable[[keras.Model], dict[str, Any]] | None,
) -> dict[str, Any]:
    """Curves, then (all finite) ``metrics.json`` and ``keypoints.keras``, each atomically.

    Returns ``{"best_model": path or None, "metrics": ..., "keypoints_model": path}``.
    """
    best = folder.best_model()
    result: dict[str, Any] = {"best_model": best}
    if best is not None:
        _check_finite_weights(folder, best)  # before anything is written
    plot_curves(folder.path)
    if best is None:
        return result
    register_keras_objects()  # a finished run re-run in a new process has built no model
    model = load_keras_file(best)
    fuse_batchnorm(model)
    metrics = _final_metrics(folder, monitor, evaluate, model)
    _check_finite_metrics(best, metrics)
    result["metrics"] = metrics
    kp_model = None
    if recipe.export.keypoints_model or recipe.export.saved_model:
        kp_model = keypoints_model(model, recipe, spec)
        save_model_atomic(kp_model, folder.file("keypoints.keras"))
        result["keypoints_model"] = folder.file("keypoints.keras")
    fs.write_atomic(folder.file("metrics.json"), json.dumps(metrics, indent=2))
    if kp_model is not None and recipe.export.saved_model:
        tf_backend = keras.backend.backend() == "tensorflow"
        source = kp_model if tf_backend else folder.file("keypoints.keras")
        export_saved_model(source, folder.file("saved_model"), spec)  # atomic itself
    return result


def save_model_atomic(model: keras.Model, path: str) -> None:
    """``model.save(path)`` through :func:`kpnet.fs.staged` (a complete file or none)."""
    with fs.staged(path) as tmp:
        model.save(tmp)


def _check_finite_weights(folder: RunFolder, best: str) -> None:
    """TrainingError when best.keras or last.keras holds NaN / inf weights."""
    checked = [p for p in dict.fromkeys([best, folder.file("last.keras")]) if fs.isfile(p)]
    for path in checked:  # ModelFileError naming a damaged file
        check_model_file(path)
    bad = {path: nonfinite_weights(path) for path in checked}
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


def _check_finite_metrics(best: str, metrics: dict) -> None:
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


def _final_metrics(folder: RunFolder, monitor: str, evaluate, model: keras.Model) -> dict:
    """``metrics.json``: epochs numbered from 1 (``best_epoch``, ``last_epoch.epoch``), as
    fit's lines number them (``history.csv`` keeps Keras' 0-based ``epoch`` column)."""
    history = read_history(folder.file("history.csv"))
    metrics: dict[str, Any] = {"model": folder.file("best.keras"), "monitor": monitor}
    scores = [(float(r[monitor]), int(r["epoch"]) + 1) for r in history if finite_cell(r, monitor)]
    if scores:
        metrics["best_epoch"] = min(scores)[1]
    if history:
        last = history[-1]
        metrics["last_epoch"] = {k: float(v) for k, v in last.items() if finite_cell(last, k)}
        metrics["last_epoch"]["epoch"] = int(last["epoch"]) + 1
    if evaluate is not None:
        full = evaluate(model)
        full.pop("predictions", None)
        metrics.update(full)
    return metrics
