"""Losses vs NumPy references (tf-cpn formulas), clamping, gradients and serialisation."""

from __future__ import annotations

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

import kpnet  # noqa: F401  (sets TF log level)
from kpnet.codec import Codec, render_heatmaps
from kpnet.losses import GlobalNetL2Loss, OHKMLoss, PixelOHKMLoss, build_losses
from kpnet.spec import KeypointSpec

H, W = 16, 12  # heatmap size
STRIDE = 4  # input pixels per heatmap pixel: the losses' default, the codec's


# --------------------------------------------------------------------------- references
def to_input(kp: np.ndarray) -> np.ndarray:
    """Heatmap-pixel keypoints [..., 3] -> input pixels (x_in = STRIDE (x_hm + 0.5) - 0.5)."""
    out = np.array(kp, np.float32)
    out[..., :2] = STRIDE * (out[..., :2] + 0.5) - 0.5
    return out


def np_render(kp: np.ndarray, sigma: float, channels=None, num_channels=None) -> np.ndarray:
    """Independent NumPy Gaussian rendering: [B,K,3] input-pixel keypoints -> [B,H,W,C]
    heatmaps (x_hm = (x_in + 0.5) / STRIDE - 0.5), max over shared channels."""
    b, k, _ = kp.shape
    channels = list(range(k)) if channels is None else list(channels)
    c = num_channels or max(channels) + 1
    ys, xs = np.mgrid[0:H, 0:W].astype(np.float64)
    out = np.zeros((b, H, W, c))
    for i in range(b):
        for j in range(k):
            x, y, v = kp[i, j]
            x, y = (x + 0.5) / STRIDE - 0.5, (y + 0.5) / STRIDE - 0.5
            if v > 0:
                g = np.exp(-((xs - x) ** 2 + (ys - y) ** 2) / (2 * sigma**2))
                out[i, :, :, channels[j]] = np.maximum(out[i, :, :, channels[j]], g)
    return out


def np_tfcpn_ohkm(pred, kp, sigma, top_k=8) -> float:
    """tf-cpn: mean over pixels per channel, * (valid > 0.1), sum of top-k / top_k, batch mean."""
    loss = ((pred - np_render(kp, sigma)) ** 2).mean(axis=(1, 2)) * (kp[..., 2] > 0.1)
    return float(np.mean([np.sort(row)[::-1][:top_k].sum() / top_k for row in loss]))


def np_ohkm_clamped(pred, kp, sigma, top_k=8) -> np.ndarray:
    """kpnet's documented variant: k = min(top_k, C, #labelled), at least 1."""
    labelled = kp[..., 2] > 0
    loss = ((pred - np_render(kp, sigma)) ** 2).mean(axis=(1, 2)) * labelled
    out = []
    for row, lab in zip(loss, labelled, strict=True):
        k = max(1, min(top_k, row.size, int(lab.sum())))
        out.append(np.sort(row)[::-1][:k].sum() / k)
    return np.array(out)


def np_global_l2(pred, kp, sigma) -> np.ndarray:
    visible = kp.copy()
    visible[..., 2] = (kp[..., 2] > 1.1).astype(np.float32)
    return ((pred - np_render(visible, sigma)) ** 2).mean(axis=(1, 2, 3))


def np_pixel_ohkm(pred, kp, sigma, channels, n, threshold) -> np.ndarray:
    target = np_render(kp, sigma, channels, pred.shape[-1])
    out = []
    for p, t in zip(pred, target, strict=True):
        err, t = ((p - t) ** 2).ravel(), t.ravel()
        if threshold is None:
            out.append(np.sort(err)[::-1][:n].mean())
            continue
        pos = t >= threshold
        neg = np.sort(err[~pos])[::-1][:n]
        out.append((err[pos].sum() + neg.sum()) / (pos.sum() + neg.size))
    return np.array(out)


def random_case(b: int, k: int, c: int | None = None, seed: int = 0):
    rng = np.random.default_rng(seed)
    kp = np.stack(
        [rng.uniform(0, W * STRIDE - 1, (b, k)), rng.uniform(0, H * STRIDE - 1, (b, k)),
         np.full((b, k), 2.0)],
        axis=-1,
    ).astype(np.float32)
    pred = rng.normal(0.2, 0.4, (b, H, W, c or k)).astype(np.float32)
    return kp, pred


# --------------------------------------------------------------------------- rendering
def test_rendered_peak_sits_at_subpixel_keypoint():
    kp = np.array([[[5.3, 9.7, 2.0], [2.0, 3.0, 0.0]]], np.float32)
    hm = np.asarray(render_heatmaps(kp, (H, W), sigma=1.5))
    np.testing.assert_allclose(hm, np_render(to_input(kp), 1.5), atol=1e-6)
    encoded = Codec((H * STRIDE, W * STRIDE), stride=STRIDE).encode(to_input(kp), sigma=1.5)
    np.testing.assert_allclose(np.asarray(encoded), hm, atol=1e-6)  # what the losses render
    assert hm[..., 1].max() == 0.0  # v == 0 is not drawn
    g = np.log(hm[0, :, :, 0])
    y, x = np.unravel_index(np.argmax(g), g.shape)
    # The log of a Gaussian is an exact parabola: its vertex is the sub-pixel peak.
    dx = 0.5 * (g[y, x - 1] - g[y, x + 1]) / (g[y, x - 1] - 2 * g[y, x] + g[y, x + 1])
    dy = 0.5 * (g[y - 1, x] - g[y + 1, x]) / (g[y - 1, x] - 2 * g[y, x] + g[y + 1, x])
    np.testing.assert_allclose([x + dx, y + dy], [5.3, 9.7], atol=1e-3)


# --------------------------------------------------------------------------- OHKM
def test_ohkm_matches_tfcpn_all_labelled():
    kp, pred = random_case(3, 17, seed=1)
    loss = OHKMLoss(top_k=8, sigma=1.4)
    assert float(loss(kp, pred)) == pytest.approx(np_tfcpn_ohkm(pred, kp, 1.4), rel=1e-5)
    per_sample = np.asarray(loss.call(kp, pred))
    assert per_sample.shape == (3,)
    np.testing.assert_allclose(per_sample, np_ohkm_clamped(pred, kp, 1.4), rtol=1e-5)


def test_ohkm_matches_tfcpn_with_unlabelled_points():
    kp, pred = random_case(4, 17, seed=2)
    rng = np.random.default_rng(3)
    for i in range(4):  # 5 unlabelled and 3 occluded per sample: still >= 8 labelled
        idx = rng.permutation(17)
        kp[i, idx[:5], 2] = 0.0
        kp[i, idx[5:8], 2] = 1.0
    got = float(OHKMLoss(top_k=8, sigma=1.4)(kp, pred))
    assert got == pytest.approx(np_tfcpn_ohkm(pred, kp, 1.4), rel=1e-5)


def test_ohkm_clamps_k_to_labelled_channels():
    kp, pred = random_case(3, 17, seed=4)
    kp[0, 3:, 2] = 0.0  # 3 labelled
    kp[1, :, 2] = 0.0  # none labelled -> 0, not NaN
    got = np.asarray(OHKMLoss(top_k=8, sigma=1.4).call(kp, pred))
    np.testing.assert_allclose(got, np_ohkm_clamped(pred, kp, 1.4), rtol=1e-5)
    assert got[1] == 0.0
    # sample 0: the mean over its 3 labelled channels, not their sum / 8 as in tf-cpn
    per_channel = ((pred[0] - np_render(kp[:1], 1.4)[0]) ** 2).mean(axis=(0, 1))[:3]
    assert got[0] == pytest.approx(per_channel.mean(), rel=1e-5)


@pytest.mark.parametrize("k", [1, 2])
def test_ohkm_small_k_finite_values_and_gradients(k):
    kp, pred = random_case(2, k, seed=5)
    kp[1, :, 2] = 0.0
    pred = tf.Variable(pred)
    with tf.GradientTape() as tape:
        value = OHKMLoss(top_k=8)(kp, pred)
    grad = tape.gradient(value, pred).numpy()
    assert np.isfinite(float(value)) and float(value) > 0
    assert np.all(np.isfinite(grad)) and np.abs(grad[0]).sum() > 0
    assert np.abs(grad[1]).sum() == 0  # nothing labelled: no gradient
    expected = np_ohkm_clamped(pred.numpy(), kp, 1.4).mean()
    assert float(value) == pytest.approx(expected, rel=1e-5)


# --------------------------------------------------------------------------- GlobalNet L2
def test_global_l2_matches_reference_visible_only():
    kp, pred = random_case(3, 5, seed=6)
    kp[0, 1, 2] = 1.0  # occluded: target 0 for the GlobalNet
    kp[1, 2, 2] = 0.0
    loss = GlobalNetL2Loss(sigma=2.0)
    np.testing.assert_allclose(
        np.asarray(loss.call(kp, pred)), np_global_l2(pred, kp, 2.0), rtol=1e-5
    )
    with_occluded = kp.copy()
    with_occluded[0, 1, 2] = 2.0
    assert not np.allclose(loss.call(kp, pred), loss.call(with_occluded, pred))


def test_global_l2_shared_channels():
    kp, pred = random_case(2, 3, c=2, seed=7)
    loss = GlobalNetL2Loss(sigma=1.7, channels=[0, 0, 1])
    visible = kp.copy()
    expected = ((pred - np_render(visible, 1.7, [0, 0, 1], 2)) ** 2).mean(axis=(1, 2, 3))
    np.testing.assert_allclose(np.asarray(loss.call(kp, pred)), expected, rtol=1e-5)


# --------------------------------------------------------------------------- pixel OHKM
@pytest.mark.parametrize("threshold", [0.1, None])
def test_pixel_ohkm_matches_reference(threshold):
    kp, pred = random_case(3, 2, c=1, seed=8)
    kp[2, :, 2] = 0.0  # no positives in sample 2
    loss = PixelOHKMLoss(ratio=0.1, sigma=1.4, channels=[0, 0], positive_threshold=threshold)
    n = math.ceil(0.1 * H * W)
    expected = np_pixel_ohkm(pred, kp, 1.4, [0, 0], n, threshold)
    np.testing.assert_allclose(np.asarray(loss.call(kp, pred)), expected, rtol=1e-5)
    fixed = PixelOHKMLoss(top_k=7, channels=[0, 0], positive_threshold=threshold)
    np.testing.assert_allclose(
        np.asarray(fixed.call(kp, pred)),
        np_pixel_ohkm(pred, kp, 1.4, [0, 0], 7, threshold),
        rtol=1e-5,
    )


def test_pixel_ohkm_gradient_reaches_every_peak():
    kp = np.array([[[2.0, 3.0, 2.0], [8.0, 12.0, 2.0]]], np.float32)
    target = np_render(kp, 1.4, [0, 0], 1).astype(np.float32)
    pred = tf.Variable(target.copy())
    pred[0, 3, 2, 0].assign(0.0)  # first peak wrong by 1, a far pixel wrong by 2: both mined
    pred[0, 0, 11, 0].assign(2.0)
    with tf.GradientTape() as tape:
        value = PixelOHKMLoss(top_k=1, channels=[0, 0])(kp, pred)
    grad = tape.gradient(value, pred).numpy()
    assert grad[0, 3, 2, 0] < 0 and grad[0, 0, 11, 0] > 0


# --------------------------------------------------------------------------- config / build
@pytest.mark.parametrize(
    "loss",
    [
        GlobalNetL2Loss(sigma=2.0, channels=[0, 0, 1]),
        OHKMLoss(top_k=4, sigma=1.7),
        PixelOHKMLoss(top_k=None, ratio=0.2, sigma=1.4, channels=[0, 0], positive_threshold=None),
    ],
)
def test_get_config_round_trip(loss):
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(loss))
    assert type(restored) is type(loss)
    assert restored.get_config() == loss.get_config()
    k = len(loss.channels) if loss.channels else 2
    kp, pred = random_case(2, k, c=max(loss.channels or [k - 1]) + 1, seed=9)
    assert float(restored(kp, pred)) == pytest.approx(float(loss(kp, pred)))


def test_build_losses_weights_and_types():
    losses, weights = build_losses(KeypointSpec.coco17())
    assert list(losses) == list(weights) == list(kpnet.codec.OUTPUT_NAMES)
    assert [losses[f"global_p{i}"].sigma for i in (2, 3, 4, 5)] == [1.4, 1.7, 2.0, 2.6]
    assert sum(weights[f"global_p{i}"] for i in (2, 3, 4, 5)) == pytest.approx(0.5)
    assert isinstance(losses["refine"], OHKMLoss) and losses["refine"].top_k == 8
    pins = KeypointSpec(names=("a", "b"), channel_map=(0, 0))
    losses, _ = build_losses(pins, refine_loss="pixel", pixel_ratio=0.05)
    assert isinstance(losses["refine"], PixelOHKMLoss)
    assert losses["refine"].channels == [0, 0] and losses["refine"].ratio == 0.05
    with pytest.raises(ValueError, match="refine_loss"):
        build_losses(pins, refine_loss="focal")


def test_heatmaps_as_targets_give_clear_error():
    with pytest.raises(ValueError, match=r"keypoints \[B, K, 3\]"):
        OHKMLoss()(np.zeros((1, H, W, 2), np.float32), np.zeros((1, H, W, 2), np.float32))


def test_pixel_loss_traces_with_unknown_batch_size():
    """Inside model.fit the batch dimension is unknown: the loss must still trace."""
    loss = PixelOHKMLoss(ratio=0.1, sigma=1.4, channels=[0, 0])
    fn = tf.function(
        loss,
        input_signature=[
            tf.TensorSpec([None, 2, 3], tf.float32),
            tf.TensorSpec([None, 16, 12, 1], tf.float32),
        ],
    )
    kp = np.array([[[4.0, 5.0, 2.0], [8.0, 9.0, 2.0]]], "float32")
    pred = np.zeros((1, 16, 12, 1), "float32")
    np.testing.assert_allclose(float(fn(kp, pred)), float(loss(kp, pred)), rtol=1e-6)
