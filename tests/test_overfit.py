"""A tiny CPN overfits a handful of synthetic images (two coloured blobs = two keypoints)."""

from __future__ import annotations

import cv2
import keras
import numpy as np

import kpnet  # noqa: F401  (sets TF log level)
from kpnet import codec
from kpnet.losses import build_losses
from kpnet.models import build_cpn
from kpnet.spec import KeypointSpec

SIZE, STRIDE, NUM_IMAGES = 64, 4, 6
COLOURS = ((255, 40, 40), (40, 80, 255))  # RGB: keypoint 0 red, keypoint 1 blue


def make_images(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Images uint8 [N,64,64,3] with two blobs each, keypoints [N,2,3] in input pixels."""
    rng = np.random.default_rng(seed)
    images = rng.integers(90, 140, (NUM_IMAGES, SIZE, SIZE, 3)).astype(np.uint8)
    keypoints = np.zeros((NUM_IMAGES, 2, 3), np.float32)
    for i in range(NUM_IMAGES):
        for k, colour in enumerate(COLOURS):
            xy = rng.uniform(10, SIZE - 11, 2)
            # anti-aliased disk centred at a sub-pixel position (shift=4: 1/16 px precision)
            centre = tuple(int(round(v * 16)) for v in xy)
            cv2.circle(images[i], centre, 4 * 16, colour, -1, cv2.LINE_AA, shift=4)
            keypoints[i, k] = (*xy, 2.0)
    return images, keypoints


def decode(heatmaps: np.ndarray) -> np.ndarray:
    """Heatmap-coordinate peaks [B,C,2] from kpnet's own decoder."""
    xy, _ = codec.decode_heatmaps(heatmaps, method="dark")
    return np.asarray(xy)


def test_tiny_cpn_overfits_two_blobs():
    keras.utils.set_random_seed(0)
    images, keypoints = make_images()
    targets = keypoints.copy()
    targets[..., :2] = codec.input_to_heatmap(keypoints[..., :2], STRIDE)
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
