"""A PNG grid of pipeline samples with their keypoints and skeleton drawn: see what trains.

Example:
    >>> from kpnet.data.preview import write_preview
    >>> write_preview(records, spec, PipelineConfig(), "runs/exp1")  # doctest: +SKIP
    PosixPath('runs/exp1/preview.png')
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np

from kpnet import fs
from kpnet.data.pipeline import PipelineConfig, build_dataset
from kpnet.data.records import InstanceRecord
from kpnet.frames import write_image
from kpnet.spec import KeypointSpec


def keypoint_colors(num: int) -> list[tuple[int, int, int]]:
    """One distinct RGB colour per keypoint (evenly spaced hues)."""
    hsv = np.array([[[int(180 * i / max(num, 1)), 255, 255] for i in range(num)]], np.uint8)
    return [tuple(int(c) for c in rgb) for rgb in cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)[0]]


def draw_keypoints(
    image: np.ndarray, keypoints: np.ndarray, spec: KeypointSpec, radius: int = 3
) -> np.ndarray:
    """Draw labelled keypoints [K, 3] (input-crop pixels) and the skeleton on an RGB copy."""
    out = np.ascontiguousarray(image, np.uint8).copy()
    colors = keypoint_colors(spec.num_keypoints)
    pts = [(int(round(x)), int(round(y))) for x, y in keypoints[:, :2]]
    for i, j in spec.skeleton:
        if keypoints[i, 2] > 0 and keypoints[j, 2] > 0:
            cv2.line(out, pts[i], pts[j], colors[i], 1, cv2.LINE_AA)
    for k, (p, v) in enumerate(zip(pts, keypoints[:, 2], strict=True)):
        if v > 0:
            cv2.circle(out, p, radius, colors[k], -1 if v >= 2 else 1, cv2.LINE_AA)
    return out


def tile(images: Sequence[np.ndarray], cols: int | None = None, gap: int = 2) -> np.ndarray:
    """Arrange equal-sized [H, W, 3] images in a grid (white gaps)."""
    n = len(images)
    cols = cols or math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    h, w = images[0].shape[:2]
    grid = np.full((rows * (h + gap) - gap, cols * (w + gap) - gap, 3), 255, np.uint8)
    for i, im in enumerate(images):
        r, c = divmod(i, cols)
        grid[r * (h + gap) : r * (h + gap) + h, c * (w + gap) : c * (w + gap) + w] = im
    return grid


def write_preview(
    records: Sequence[InstanceRecord],
    spec: KeypointSpec,
    pipeline_config: PipelineConfig,
    out_dir: str | Path,
    n: int = 16,
    seed: int = 0,
    training: bool = True,
) -> str | Path:
    """Write ``out_dir/preview.png`` (``out_dir`` may be a URL): ``n`` pipeline crops
    (augmented when ``training``)."""
    ds = build_dataset(records, spec, pipeline_config, batch_size=n, training=training,
                       seed=seed, drop_remainder=False)  # fmt: skip
    images, keypoints = (np.asarray(t) for t in next(iter(ds.take(1))))
    drawn = [draw_keypoints(im, kp, spec) for im, kp in zip(images, keypoints, strict=True)]
    path = fs.child(out_dir, "preview.png")
    write_image(path, tile(drawn))
    return path
