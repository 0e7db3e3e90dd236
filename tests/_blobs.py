"""Synthetic test images: one Gaussian blob per colour channel (channel c peaks at points[c])."""

from __future__ import annotations

import numpy as np


def blob_image(points, hw: tuple[int, int], sigma: float) -> np.ndarray:
    """uint8 [H, W, 3] image whose channel c holds a blob of peak 250 at ``points[c]`` (x, y)."""
    yy, xx = np.mgrid[: hw[0], : hw[1]].astype(np.float32)
    image = np.zeros((*hw, 3), np.float32)
    for c, (x, y) in enumerate(points):
        image[..., c] = 250 * np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * sigma**2))
    return np.round(image).astype(np.uint8)


#: Disk colours of :func:`disk_images` (RGB): keypoint 0 red, keypoint 1 blue.
DISK_COLOURS = ((255, 40, 40), (40, 80, 255))


def disk_images(num: int, size: int = 64, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """uint8 [num, size, size, 3] noisy images with a red and a blue anti-aliased disk each,
    and their keypoints [num, 2, 3] (input px, v = 2)."""
    import cv2

    rng = np.random.default_rng(seed)
    images = rng.integers(90, 140, (num, size, size, 3)).astype(np.uint8)
    keypoints = np.zeros((num, 2, 3), np.float32)
    for i in range(num):
        for k, colour in enumerate(DISK_COLOURS):
            xy = rng.uniform(10, size - 11, 2)
            centre = tuple(int(round(v * 16)) for v in xy)  # shift=4: 1/16 px precision
            cv2.circle(images[i], centre, 4 * 16, colour, -1, cv2.LINE_AA, shift=4)
            keypoints[i, k] = (*xy, 2.0)
    return images, keypoints


def save_blob_model(path, spec, input_hw: tuple[int, int]):
    """Save a keypoints model whose channel c is the average-pooled colour channel c / 255
    (it finds :func:`blob_image`'s blobs) at ``path``; returns the path."""
    import keras

    from kpnet.inference import build_keypoints_model

    images = keras.Input((*input_hw, 3))
    pooled = keras.layers.AveragePooling2D(4)(images)
    refine = keras.layers.Conv2D(3, 1, use_bias=False, name="refine")(pooled)
    heatmap_model = keras.Model(images, {"refine": refine})
    heatmap_model.get_layer("refine").set_weights([np.eye(3).reshape(1, 1, 3, 3) / 255.0])
    build_keypoints_model(heatmap_model, spec).save(path)
    return path
