"""Phases: the model a recipe builds, which layers train when, the optimizer and the compile.

A run is one or two :class:`Phase` s: ``train.freeze_backbone_epochs`` with the trunk frozen
(a pretrained trunk only), then the rest with it trainable; ``train.backbone_bn`` keeps the
trunk's BatchNorm in inference mode in every phase, ``train.freeze_trunk_stride`` a
pretrained trunk's high-resolution layers frozen.

Precision: ``mixed_float16`` trains with a dynamic ``LossScaleOptimizer``;
``mixed_bfloat16`` needs no loss scaling. The model's heads and the losses stay float32.

Example:
    >>> from kpnet.recipe import load_recipe
    >>> recipe = load_recipe("recipes/quickstart.yaml")               # doctest: +SKIP
    >>> [(p.start, p.end, p.frozen) for p in training_phases(recipe)]  # doctest: +SKIP
    [(0, 30, False)]
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

import keras
import numpy as np

from kpnet import fs
from kpnet.losses import build_losses
from kpnet.models.backbones import BackboneWeightsError, build_backbone
from kpnet.models.heads import build_heatmap_model, head_outputs
from kpnet.models.retarget import transfer_weights
from kpnet.recipe import Recipe
from kpnet.saving import register_keras_objects
from kpnet.spec import KeypointSpec
from kpnet.training.report import log
from kpnet.training.schedules import EpochSchedule


def output_names(recipe: Recipe) -> tuple[str, ...]:
    """The heatmap model's outputs (CPN's five or a single ``"refine"``): targets and losses."""
    return head_outputs(recipe.model.head)


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
        log(
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
    path = recipe.model.init_from
    try:
        register_keras_objects()
        with fs.local_copy(path) as local:  # a URL: through a local temporary copy
            source = keras.saving.load_model(local, compile=False, safe_mode=True)
    except (*fs.io_errors(), ValueError, TypeError) as err:
        raise recipe.error("model.init_from", f"cannot load {path}: {fs.reason(err)}") from None
    report = transfer_weights(source, model)
    log(f"init_from {path}:\n{report.summary()}")
    if not report.loaded:
        raise recipe.error(
            "model.init_from",
            f"no layer of {path} matches this model; give a kpnet heatmap model "
            "(best.keras / last.keras of an earlier run)",
        )


def backbone_layer_names(recipe: Recipe) -> set[str]:
    """Names of the backbone's layers in a model built from ``recipe``."""
    images = keras.Input((*recipe.model.input_size, 3), name="images")
    feats = build_backbone(recipe.model.backbone, images, None, recipe.model.alpha)
    return {layer.name for layer in keras.Model(images, feats).layers if layer.weights}


def early_trunk_layers(model: keras.Model, recipe: Recipe, backbone_names: set[str]) -> set[str]:
    """The trunk layers that ``train.freeze_trunk_stride`` keeps frozen: those whose output
    is at that stride or finer (a pretrained trunk only; none from scratch).

    Example:
        >>> early_trunk_layers(model, recipe, backbone_layer_names(recipe))  # doctest: +SKIP
        {'lite0_stem_conv', 'lite0_stem_bn', 'lite0_block0_dw_conv', ...}
    """
    stride = recipe.train.freeze_trunk_stride
    if not stride or not pretrained(recipe):
        return set()
    height = model.input_shape[1]
    return {
        layer.name
        for layer in model.layers
        if layer.name in backbone_names and height / layer.output.shape[1] <= stride
    }


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
    frozen_bn = backbone_bn_frozen(recipe)
    early = early_trunk_layers(model, recipe, backbone_names)
    for layer in model.layers:
        if layer.name in backbone_names:
            layer.trainable = not (
                phase.frozen
                or layer.name in early
                or (frozen_bn and isinstance(layer, keras.layers.BatchNormalization))
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
        stride=codec.stride,
    )
    model.compile(optimizer=_optimizer(recipe, schedule), loss=losses, loss_weights=weights)
    if not _under_strategy():
        _build_training_state(model, spec)


def configure_main_phase(
    model: keras.Model, recipe: Recipe, spec: KeypointSpec, steps_per_epoch: int = 1
) -> None:
    """:func:`configure_phase` for the recipe's last phase, the one most steps run in (the
    trunk trainable but for what the recipe keeps frozen all run): a step of ``kpnet fit``
    for benchmarks and tests that time or check one.

    Example:
        >>> configure_main_phase(model, recipe, spec)  # doctest: +SKIP
        >>> model.train_on_batch(images, {n: kp for n in model.output_names})  # doctest: +SKIP
    """
    phase = training_phases(recipe)[-1]
    configure_phase(model, recipe, spec, phase, steps_per_epoch, backbone_layer_names(recipe))


def _under_strategy() -> bool:
    """Inside a tf.distribute strategy scope (never without TensorFlow loaded, e.g. under JAX)."""
    tf = sys.modules.get("tensorflow")
    return tf is not None and tf.distribute.has_strategy()


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
