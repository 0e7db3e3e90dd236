"""Validation during training: the keypoints model fit saves, run as ``kpnet predict`` runs it.

Example:
    >>> evaluator(None, None, [], None) is None   # no validation records: no validation
    True
"""

from __future__ import annotations

from typing import Any

import keras

from kpnet.inference import build_keypoints_model
from kpnet.recipe import Recipe
from kpnet.runner import evaluate_model
from kpnet.spec import KeypointSpec


def keypoints_model(heatmap_model: keras.Model, recipe: Recipe, spec: KeypointSpec):
    """The heatmap model with the recipe's codec inside (decoding, flip test, geometry)."""
    return build_keypoints_model(heatmap_model, spec, recipe.codec())


def evaluator(recipe: Recipe, spec: KeypointSpec, records, config):
    """``evaluate(heatmap_model) -> metrics`` on the validation records, or None.

    Validation runs the keypoints model :func:`keypoints_model` builds (the one fit saves
    as ``keypoints.keras``) through :func:`kpnet.runner.evaluate_model`: the crops, the
    decoding and the mapping back to the image are those of ``kpnet predict``.
    """
    if not records:
        return None
    e = recipe.evaluation
    built: list[tuple[keras.Model, keras.Model]] = []  # reused: one predict trace per model

    def evaluate(heatmap_model: keras.Model) -> dict[str, Any]:
        if not built or built[0][0] is not heatmap_model:
            built[:] = [(heatmap_model, keypoints_model(heatmap_model, recipe, spec))]
        return evaluate_model(
            built[0][1],
            records,
            spec,
            config,
            batch_size=e.batch_size,
            pck_thresholds=tuple(e.pck_thresholds),
        )

    return evaluate
