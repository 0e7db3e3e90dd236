"""Learning-rate schedules of kpnet recipes (``train.lr_schedule``).

Example:
    >>> s = EpochSchedule(1e-3, steps_per_epoch=10, kind="cosine", epochs=4)
    >>> round(float(s(0)), 6), round(float(s(20)), 6), round(float(s(40)), 6)
    (0.001, 0.0005, 0.0)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="kpnet")
class EpochSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """Learning rate as a function of the (fractional) epoch: constant, cosine or step.

    Example:
        >>> s = EpochSchedule(1e-3, steps_per_epoch=10, kind="step", step_every=2, gamma=0.5)
        >>> [round(float(s(i)), 6) for i in (0, 19, 20, 40)]
        [0.001, 0.001, 0.0005, 0.00025]

    Args:
        lr: peak learning rate.
        steps_per_epoch: optimizer steps in one epoch.
        kind: "constant", "cosine" (to 0 at ``epochs``) or "step" (x ``gamma`` every
            ``step_every`` epochs and at each of ``milestones``).
        epochs: total epochs (cosine).
        warmup_epochs: linear warm-up from 0.
        start_step: steps already taken before this optimizer existed (second fit phase).
    """

    def __init__(
        self,
        lr: float,
        steps_per_epoch: int,
        kind: str = "constant",
        epochs: int = 1,
        warmup_epochs: float = 0.0,
        step_every: float | None = None,
        milestones: Sequence[float] = (),
        gamma: float = 0.5,
        start_step: int = 0,
    ) -> None:
        self.lr = float(lr)
        self.steps_per_epoch = int(steps_per_epoch)
        self.kind = kind
        self.epochs = int(epochs)
        self.warmup_epochs = float(warmup_epochs)
        self.step_every = None if step_every is None else float(step_every)
        self.milestones = [float(m) for m in milestones]
        self.gamma = float(gamma)
        self.start_step = int(start_step)

    def __call__(self, step):
        step = ops.cast(step, "float32") + float(self.start_step)
        epoch = step / float(self.steps_per_epoch)
        factor = ops.ones_like(epoch)
        if self.kind == "cosine":
            span = max(self.epochs - self.warmup_epochs, 1e-6)
            progress = ops.clip((epoch - self.warmup_epochs) / span, 0.0, 1.0)
            factor = 0.5 * (1.0 + ops.cos(math.pi * progress))
        elif self.kind == "step":
            n = ops.zeros_like(epoch)
            if self.step_every:
                n = ops.floor(epoch / self.step_every)
            for m in self.milestones:
                n = n + ops.cast(epoch >= m, "float32")
            factor = ops.power(self.gamma, n)
        if self.warmup_epochs > 0:
            warm = (epoch + 1.0 / self.steps_per_epoch) / self.warmup_epochs
            factor = factor * ops.minimum(1.0, warm)
        return self.lr * factor

    def get_config(self) -> dict[str, Any]:
        return {
            "lr": self.lr,
            "steps_per_epoch": self.steps_per_epoch,
            "kind": self.kind,
            "epochs": self.epochs,
            "warmup_epochs": self.warmup_epochs,
            "step_every": self.step_every,
            "milestones": self.milestones,
            "gamma": self.gamma,
            "start_step": self.start_step,
        }
