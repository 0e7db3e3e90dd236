"""What training tells the user: its console lines, its errors, ``history.csv`` and ``curves.png``.

Example:
    >>> finite_cell({"loss": "0.5", "val_loss": "nan"}, "loss")
    True
    >>> finite_cell({"loss": "0.5", "val_loss": "nan"}, "val_loss")
    False
"""

from __future__ import annotations

import csv
import io
import math
import os
import time
from typing import Any

import keras

from kpnet import fs
from kpnet.run_folder import RunFolderError


class TrainingError(RuntimeError):
    """Training cannot go on (non-finite loss, inconsistent backup); the message says why."""


def log(message: str) -> None:
    """One ``kpnet: ...`` line on standard output, flushed (fit's progress lines)."""
    print(f"kpnet: {message}", flush=True)


def validation_line(epoch: int, epochs: int, overall: dict[str, Any], started: float) -> str:
    """The line fit prints per validation: the error new frames get, and the training time.

    >>> validation_line(4, 20, {"mean": 3.14159, "median": 2.5, "p90": None}, time.time())
    'epoch 5/20 validation: mean 3.14 px, median 2.50 px after 0 s of training'
    """
    parts = [f"{k} {overall[k]:.2f} px" for k in ("mean", "median", "p90")
             if overall.get(k) is not None]  # fmt: skip
    parts += [f"PCK@0.05 {overall['pck@0.05']:.3f}"] if overall.get("pck@0.05") else []
    parts += [f"AP {overall['AP']:.3f}"] if overall.get("AP") is not None else []
    return (
        f"epoch {epoch + 1}/{epochs} validation: {', '.join(parts)} "
        f"after {time.time() - started:.0f} s of training"
    )


class HistoryCSV(keras.callbacks.Callback):
    """One row per epoch in a CSV file, as ``keras.callbacks.CSVLogger(path, append=True)``
    writes it (``epoch`` then the sorted log keys, fixed at the first epoch of each fit).

    The whole file is rewritten atomically after every epoch (:func:`kpnet.fs.write_atomic`)
    instead of appended to: object stores cannot append, Keras' logger fails on a URL, and a
    killed run never leaves half a row.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        super().__init__()
        self.path = os.fspath(path)
        self.keys: list[str] | None = None

    def on_train_begin(self, logs: dict | None = None) -> None:
        self.keys = None

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        logs = logs or {}
        if self.keys is None:
            self.keys = sorted(logs)
            if self.keys and not any(k.startswith("val_") for k in self.keys):
                self.keys += [f"val_{k}" for k in self.keys]  # as CSVLogger does
        old = fs.read_text(self.path) if fs.isfile(self.path) else ""
        text = io.StringIO(newline="")
        text.write(old)
        writer = csv.DictWriter(text, fieldnames=["epoch", *self.keys])
        if not old:
            writer.writeheader()
        writer.writerow({"epoch": epoch, **{k: _cell(logs.get(k, "NA")) for k in self.keys}})
        fs.write_atomic(self.path, text.getvalue())


def _cell(value: Any) -> Any:
    """A log value as CSVLogger writes it (a sequence as ``"[a, b]"``)."""
    if isinstance(value, str) or not hasattr(value, "__iter__") or getattr(value, "ndim", 1) == 0:
        return value
    return f'"[{", ".join(map(str, value))}]"'


def read_history(path: str) -> list[dict[str, str]]:
    """The rows of ``history.csv`` ([] when absent); RunFolderError naming it when it is not
    a history (no whole-number ``epoch`` column, not text)."""
    if not fs.isfile(path):
        return []
    try:
        rows = list(csv.DictReader(io.StringIO(fs.read_text(path), newline="")))
        for row in rows:
            int(row["epoch"])
    except (UnicodeDecodeError, csv.Error, KeyError, TypeError, ValueError) as err:
        raise RunFolderError(
            f"{path} is not a training history ({type(err).__name__}: {fs.reason(err)}); "
            "delete it to start a new one (the run's models and backup are kept), or use a "
            "new output folder (-o)"
        ) from None
    return rows


def prepare_history(out: str, initial: int) -> None:
    """Fresh run: drop an old history; resume: drop rows of epochs not in the backup (a
    history with nothing to drop is left as it is)."""
    path = fs.join(out, "history.csv")
    rows = read_history(path)
    keep = [r for r in rows if initial and int(r["epoch"]) < initial]
    if len(keep) == len(rows) and rows:
        return
    if not keep:
        if fs.exists(path):
            fs.remove(path)
        return
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(keep)
    fs.write_atomic(path, text.getvalue())


def best_so_far(path: str, monitor: str) -> float | None:
    values = []
    for row in read_history(path):
        try:
            values.append(float(row.get(monitor) or "nan"))
        except ValueError:
            continue
    values = [v for v in values if math.isfinite(v)]
    return min(values) if values else None


def plot_curves(out: str) -> str | None:
    rows = read_history(fs.join(out, "history.csv"))
    if not rows:
        return None
    import matplotlib  # lazy: only a finished run draws curves (keeps imports light)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [int(r["epoch"]) + 1 for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, keys in zip(
        axes, (("loss", "val_loss"), ("val_px_mean", "val_px_median")), strict=True
    ):
        for key in keys:
            pts = [(e, float(r[key])) for e, r in zip(epochs, rows, strict=True)
                   if finite_cell(r, key)]  # fmt: skip
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


def finite_cell(row: dict[str, str], key: str) -> bool:
    try:
        return math.isfinite(float(row.get(key) or "nan"))
    except ValueError:
        return False
