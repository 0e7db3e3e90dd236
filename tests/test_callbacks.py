"""Checkpoint callbacks: epochs without validation never become the best model."""

from __future__ import annotations

import keras
import numpy as np

from kpnet.training.callbacks import GuardedCheckpoint, NaNGuard


def test_best_checkpoint_skips_epochs_without_validation(tmp_path):
    inputs = keras.Input((2,))
    model = keras.Model(inputs, keras.layers.Dense(1)(inputs))
    path = tmp_path / "best.keras"
    cb = GuardedCheckpoint(str(path), NaNGuard(), monitor="val_px_mean", mode="min",
                           save_best_only=True)  # fmt: skip
    cb.set_model(model)
    cb.on_epoch_end(0, {"loss": 1.0, "val_px_mean": float("nan")})  # not validated
    assert not path.exists()
    cb.on_epoch_end(1, {"loss": 1.0, "val_px_mean": 5.0})
    assert path.exists()
    saved = path.stat().st_mtime_ns
    model.layers[1].set_weights([np.ones((2, 1)), np.ones(1)])
    cb.on_epoch_end(2, {"loss": 1.0, "val_px_mean": 7.0})  # worse: kept
    cb.on_epoch_end(3, {"loss": 1.0, "val_px_mean": float("nan")})
    assert path.stat().st_mtime_ns == saved
    cb.on_epoch_end(4, {"loss": 1.0, "val_px_mean": 4.0})  # better: replaced
    assert path.stat().st_mtime_ns != saved
