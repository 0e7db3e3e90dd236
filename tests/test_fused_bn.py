"""Fused BatchNorm (TensorFlow): the same numbers as Keras' own BatchNormalization, forward,
backward and moving statistics, in every precision; saved files stay plain Keras."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from kpnet.models.fused_bn import fuse_batchnorm
from kpnet.models.heads import build_heatmap_model
from kpnet.training.precise_bn import recompute_bn_statistics

pytestmark = pytest.mark.skipif(keras.backend.backend() != "tensorflow",
                                reason="fused BatchNorm is TensorFlow-only")  # fmt: skip


@pytest.fixture
def policy(request):
    keras.mixed_precision.set_global_policy(request.param)
    yield request.param
    keras.mixed_precision.set_global_policy("float32")


def _net() -> keras.Model:
    keras.utils.set_random_seed(0)
    i = keras.Input((16, 12, 8))
    x = keras.layers.Conv2D(8, 3, padding="same", use_bias=False)(i)
    x = keras.layers.BatchNormalization(epsilon=1e-5, momentum=0.9)(x)
    x = keras.layers.ReLU()(x)
    x = keras.layers.Conv2D(8, 3, padding="same", use_bias=False)(x)
    x = keras.layers.BatchNormalization(epsilon=1.001e-5, momentum=0.8, center=False)(x)
    x = keras.layers.BatchNormalization(axis=1)(x)  # not channels-last: keeps Keras' call
    return keras.Model(i, keras.layers.Activation("linear", dtype="float32")(x))


def _train_step(model, x, w):
    with tf.GradientTape() as tape:
        y = model(x, training=True)
        loss = tf.reduce_sum(y * w)
    grads = tape.gradient(loss, model.trainable_variables)
    stats = [v.numpy() for v in model.non_trainable_variables]
    return y.numpy(), [g.numpy() for g in grads], stats, model(x, training=False).numpy()


@pytest.mark.parametrize("policy", ["float32", "mixed_bfloat16", "mixed_float16"],
                         indirect=True)  # fmt: skip
def test_fused_matches_keras(policy):
    plain, fused = _net(), _net()
    assert fuse_batchnorm(fused) == 2 and fuse_batchnorm(fused) == 0  # idempotent
    rng = np.random.default_rng(0)
    x = tf.constant(rng.normal(1, 2, (4, 16, 12, 8)).astype("float32"))
    w = tf.constant(rng.normal(0, 1, (4, 16, 12, 8)).astype("float32"))
    (ya, ga, sa, ia), (yb, gb, sb, ib) = _train_step(plain, x, w), _train_step(fused, x, w)
    tol = {"float32": 1e-5, "mixed_bfloat16": 2e-2, "mixed_float16": 5e-3}[policy]
    np.testing.assert_allclose(yb, ya, atol=tol * 10)
    np.testing.assert_allclose(ib, ia, atol=tol * 10)
    for a, b in zip(ga, gb, strict=True):
        np.testing.assert_allclose(b, a, atol=tol * np.abs(a).max())
    for a, b in zip(sa, sb, strict=True):  # moving mean / variance after one update
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)
    assert not np.allclose(sb[1], 1.0)  # the update happened


def test_fused_model_saves_as_plain_keras(tmp_path):
    model = build_heatmap_model(2, input_shape=(64, 64, 3), backbone="tiny", head_channels=16)
    bn = [
        layer
        for layer in model._flatten_layers()
        if isinstance(layer, keras.layers.BatchNormalization)
    ]
    assert bn and all("call" in layer.__dict__ for layer in bn)  # fused at build time
    x = np.random.default_rng(1).uniform(0, 255, (2, 64, 64, 3)).astype("float32")
    model.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras", compile=False)
    assert all(type(layer) is keras.layers.BatchNormalization for layer in loaded._flatten_layers()
               if isinstance(layer, keras.layers.BatchNormalization))  # fmt: skip
    for out in ("refine",):
        np.testing.assert_allclose(loaded(x)[out], model(x)[out], atol=1e-4)


def test_precise_bn_on_fused_layers_keeps_fused_call():
    model = _net()
    fuse_batchnorm(model)
    fused_calls = {id(layer): layer.__dict__.get("call") for layer in model.layers}
    x = np.random.default_rng(2).normal(3, 2, (8, 16, 12, 8)).astype("float32")
    assert recompute_bn_statistics(model, [x], num_batches=1) == 1
    bn = model.layers[2]
    conv = model.layers[1](x).numpy()
    np.testing.assert_allclose(bn.moving_mean.numpy(), conv.mean((0, 1, 2)), atol=1e-4)
    assert {id(layer): layer.__dict__.get("call") for layer in model.layers} == fused_calls
