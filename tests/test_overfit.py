"""A tiny CPN overfits a handful of synthetic images (two coloured blobs = two keypoints)."""

from __future__ import annotations

import keras
import numpy as np
import pytest
from _blobs import disk_images

import kpnet  # noqa: F401  (sets TF log level)
from kpnet import codec
from kpnet.losses import build_losses
from kpnet.models import build_cpn
from kpnet.spec import KeypointSpec

SIZE, STRIDE, NUM_IMAGES = 64, 4, 6


def make_images(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Images uint8 [N,64,64,3] with two blobs each, keypoints [N,2,3] in input pixels."""
    return disk_images(NUM_IMAGES, SIZE, seed)


def decode(heatmaps: np.ndarray) -> np.ndarray:
    """Heatmap-coordinate peaks [B,C,2] from kpnet's own decoder."""
    xy, _ = codec.decode_heatmaps(heatmaps, method="dark")
    return np.asarray(xy)


@pytest.mark.slow  # over 25 s on 2 cores
def test_tiny_cpn_overfits_two_blobs():
    keras.utils.set_random_seed(0)
    images, keypoints = make_images()
    targets = keypoints  # input pixels: the losses encode them with the codec
    spec = KeypointSpec(names=("red", "blue"))
    model = build_cpn(2, (SIZE, SIZE, 3), backbone="tiny", pyramid_channels=32)
    losses, weights = build_losses(spec)
    # jit_compile=False: XLA compilation of this graph costs more than the whole run on CPU.
    model.compile(keras.optimizers.Adam(1e-2), loss=losses, loss_weights=weights, jit_compile=False)
    y = {name: targets for name in codec.OUTPUT_NAMES}
    history = model.fit(images, y, batch_size=NUM_IMAGES, epochs=80, verbose=0)
    loss = history.history["loss"]
    assert loss[-1] * 10 <= loss[0], f"loss fell only from {loss[0]:.4g} to {loss[-1]:.4g}"
    # Evaluate on the training batch with batch statistics (BN moving means need more steps).
    refine = np.asarray(model(images, training=True)["refine"])
    pred = codec.heatmap_to_input(decode(refine), STRIDE)
    error = np.linalg.norm(pred - keypoints[..., :2], axis=-1)
    assert error.max() <= 1.0, f"decoded errors (input px): {np.round(error, 2)}"
