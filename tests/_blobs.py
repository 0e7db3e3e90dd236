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
