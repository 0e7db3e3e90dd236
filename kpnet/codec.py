"""The heatmap codec: keypoints <-> Gaussian heatmaps, and crop <-> image geometry.

One module owns encoding (training targets) and decoding (inference) so the two can never
drift apart.

Coordinate conventions (used everywhere in kpnet):

* Pixel centres sit at integer coordinates in every frame (image, input crop, heatmap):
  the top-left pixel covers [-0.5, 0.5) and its centre is (0, 0), as in OpenCV's warpAffine.
* Input crop -> heatmap with stride s: ``x_hm = (x_in + 0.5) / s - 0.5`` (same for y).
* Keypoints are arrays [..., K, 3] of (x, y, v): v = 0 unlabelled, 1 labelled but occluded,
  2 visible (COCO). Only v > 0 points are rendered into targets; losses decide what else
  (see :mod:`kpnet.losses`).
* Affine matrices are float [2, 3] mapping *image* pixels to *crop* pixels.

Example:
    >>> import numpy as np
    >>> kp = np.array([[[10.3, 20.7, 2.0]]], "float32")       # [B=1, K=1, 3] heatmap coords
    >>> hm = np.asarray(render_heatmaps(kp, (64, 48), sigma=2.0))
    >>> hm.shape, round(float(hm.max()), 2)
    ((1, 64, 48, 1), 0.98)
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from keras import ops

#: tf-cpn's blur kernels 15/11/9/7 at 64x48 expressed as sigmas (cv2: 0.3*((k-1)/2-1)+0.8),
#: for GlobalNet levels P2 (finest) .. P5 (coarsest). RefineNet uses the smallest.
DEFAULT_GLOBAL_SIGMAS: tuple[float, float, float, float] = (1.4, 1.7, 2.0, 2.6)
DEFAULT_REFINE_SIGMA: float = 1.4
#: Output names of the CPN heatmap model, GlobalNet levels then RefineNet.
OUTPUT_NAMES: tuple[str, ...] = ("global_p2", "global_p3", "global_p4", "global_p5", "refine")


# --------------------------------------------------------------------------- coordinates
def input_to_heatmap(xy, stride: float):
    """Map input-crop pixel coordinates to heatmap coordinates (works on numpy or tensors)."""
    return (xy + 0.5) / stride - 0.5


def heatmap_to_input(xy, stride: float):
    """Inverse of :func:`input_to_heatmap`."""
    return (xy + 0.5) * stride - 0.5


# --------------------------------------------------------------------------- encoding
def render_heatmaps(
    keypoints,
    heatmap_shape: Sequence[int],
    sigma: float,
    channels: Sequence[int] | None = None,
    num_channels: int | None = None,
):
    """Render unnormalised Gaussians (peak 1 at the exact sub-pixel keypoint).

    Args:
        keypoints: [B, K, 3] (x, y, v) in heatmap coordinates; only v > 0 points are drawn.
        heatmap_shape: (H, W).
        sigma: Gaussian standard deviation in heatmap pixels.
        channels: channel of each keypoint (default identity); keypoints sharing a channel
            are combined with a maximum.
        num_channels: number of output channels (default ``max(channels) + 1``).

    Returns:
        float32 tensor [B, H, W, C]. Pure ``keras.ops``: runs inside a loss on any backend.
    """
    keypoints = ops.cast(ops.convert_to_tensor(keypoints), "float32")
    h, w = int(heatmap_shape[0]), int(heatmap_shape[1])
    x = keypoints[..., 0][:, None, None, :]  # [B,1,1,K]
    y = keypoints[..., 1][:, None, None, :]
    vis = ops.cast(keypoints[..., 2] > 0, "float32")[:, None, None, :]
    xs = ops.arange(w, dtype="float32")[None, None, :, None]
    ys = ops.arange(h, dtype="float32")[None, :, None, None]
    inv = 1.0 / (2.0 * float(sigma) ** 2)
    # Separable: exp(-dx^2) * exp(-dy^2), broadcast to [B,H,W,K].
    g = ops.exp(-ops.square(xs - x) * inv) * ops.exp(-ops.square(ys - y) * inv) * vis
    k = int(keypoints.shape[1])
    if channels is None or list(channels) == list(range(k)):
        return g
    channels = [int(c) for c in channels]
    c_out = int(num_channels) if num_channels is not None else max(channels) + 1
    maps = []
    for c in range(c_out):
        members = [i for i, ci in enumerate(channels) if ci == c]
        if not members:
            maps.append(ops.zeros_like(g[..., 0]))
        elif len(members) == 1:
            maps.append(g[..., members[0]])
        else:
            maps.append(ops.max(ops.stack([g[..., i] for i in members], axis=-1), axis=-1))
    return ops.stack(maps, axis=-1)


# --------------------------------------------------------------------------- crop geometry
def box_to_center_scale(
    box: Sequence[float],
    aspect_ratio: float,
    padding: tuple[float, float] = (1.2, 1.3),
) -> tuple[np.ndarray, np.ndarray]:
    """Centre and (w, h) of the crop region for a box, with the crop's aspect ratio kept.

    Args:
        box: (x, y, w, h) in image pixels.
        aspect_ratio: crop width / height (192 / 256 for a 256x192 input).
        padding: multiplicative extension in (x, y); tf-cpn's 0.1 / 0.15 per side gives
            (1.2, 1.3). Training multiplies the result by 1.25 more (see the pipeline).

    Returns:
        (center [2], size [2]) in image pixels.
    """
    x, y, w, h = (float(v) for v in box)
    w, h = max(w, 1.0), max(h, 1.0)
    center = np.array([x + (w - 1) * 0.5, y + (h - 1) * 0.5], np.float32)
    w, h = w * padding[0], h * padding[1]
    if w > aspect_ratio * h:
        h = w / aspect_ratio
    else:
        w = h * aspect_ratio
    return center, np.array([w, h], np.float32)


def crop_affine(
    center: Sequence[float],
    size: Sequence[float],
    output_size: Sequence[int],
    rotation_deg: float = 0.0,
    flip: bool = False,
) -> np.ndarray:
    """The [2, 3] matrix mapping image pixels into an (H, W) crop.

    The region of ``size`` (w, h) around ``center`` maps onto the output of
    ``output_size`` (H, W), rotated counter-clockwise by ``rotation_deg`` and optionally
    mirrored horizontally (about the crop's centre).
    """
    out_h, out_w = float(output_size[0]), float(output_size[1])
    sx, sy = out_w / float(size[0]), out_h / float(size[1])
    a = np.deg2rad(rotation_deg)
    cos, sin = np.cos(a), np.sin(a)
    # image -> centred -> rotate -> scale -> (flip) -> shift to crop centre
    rot = np.array([[cos, sin], [-sin, cos]], np.float64)
    lin = np.diag([sx, sy]) @ rot
    if flip:
        lin = np.diag([-1.0, 1.0]) @ lin
    crop_c = np.array([(out_w - 1) * 0.5, (out_h - 1) * 0.5])
    t = crop_c - lin @ np.asarray(center, np.float64)
    return np.concatenate([lin, t[:, None]], axis=1).astype(np.float32)


def invert_affine(matrix: np.ndarray) -> np.ndarray:
    """Inverse of a [2, 3] affine matrix (or a batch [..., 2, 3])."""
    m = np.asarray(matrix, np.float64)
    lin, t = m[..., :2], m[..., 2:]
    inv = np.linalg.inv(lin)
    return np.concatenate([inv, -inv @ t], axis=-1).astype(np.float32)


def transform_points(points: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """Apply a [2, 3] affine matrix to points [..., 2] (extra trailing columns are kept)."""
    pts = np.asarray(points, np.float32)
    m = np.asarray(matrix, np.float32)
    xy = pts[..., :2] @ m[:, :2].T + m[:, 2]
    return np.concatenate([xy, pts[..., 2:]], axis=-1) if pts.shape[-1] > 2 else xy
