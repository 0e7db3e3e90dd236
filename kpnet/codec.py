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

import dataclasses
import functools
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields

import numpy as np

from kpnet.graph_ops import ops

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
#: Box extension (x, y) of top-down crops: tf-cpn's 0.1 / 0.15 per side. The one default.
DEFAULT_PADDING: tuple[float, float] = (1.2, 1.3)
#: Extra extension of top-down crops while training (tf-cpn: 1.25).
DEFAULT_TRAIN_BOX_EXTEND: float = 1.25
#: How a record or a new frame becomes a crop: around its box, the whole frame, or both in
#: turn (``two_stage``: find the subject on the whole frame, refine a crop around it).
CROP_MODES: tuple[str, ...] = ("topdown", "whole", "random_crop", "two_stage")
#: Share of two-stage training crops that are whole frames (the rest: refinement crops).
DEFAULT_WHOLE_FRACTION: float = 0.5


#: Input sizes are multiples of this (the deepest trunk stride).
INPUT_MULTIPLE: int = 32


def input_size_for(frame_hw: Sequence[int], pixels: int) -> tuple[int, int]:
    """The input size (H, W), multiples of 32, of about ``pixels`` pixels with the aspect of
    frames of ``frame_hw`` (H, W): what ``model.input_size: auto`` trains whole frames at, so
    no input pixel is spent on padding whatever the camera's aspect.

    Example:
        >>> input_size_for((480, 640), 320 * 416), input_size_for((747, 832), 320 * 416)
        ((320, 416), (352, 384))
        >>> input_size_for((512, 1536), 320 * 416)  # two views side by side
        (224, 640)
    """
    h, w = (float(v) for v in frame_hw)
    if not (h > 0 and w > 0 and pixels > 0):
        raise ValueError(f"input_size_for: need a positive frame size and pixel count, got "
                         f"{tuple(frame_hw)} and {pixels}")  # fmt: skip
    height = (pixels * h / w) ** 0.5
    m = INPUT_MULTIPLE
    rows = max(m, int(round(height / m)) * m)
    cols = max(m, int(round(height * w / h / m)) * m)
    return rows, cols


def _numpy_in_numpy_out(fn):
    """Return numpy arrays when no argument is a backend tensor (numpy callers get numpy;
    graph callers, e.g. tf.data or the SavedModel, get tensors)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        out = fn(*args, **kwargs)
        if any(ops.is_tensor(a) for a in (*args, *kwargs.values())):
            return out
        if isinstance(out, tuple):
            return tuple(np.asarray(ops.convert_to_numpy(o)) for o in out)
        return np.asarray(ops.convert_to_numpy(out))

    return wrapper


@_numpy_in_numpy_out
def box_to_center_scale(boxes, aspect_ratio: float, padding=DEFAULT_PADDING):
    """Centre and (w, h) of the crop regions of boxes, with the crop's aspect ratio kept.

    The ONE definition of a crop region (pipeline, predict and the SavedModel call it).

    Example:
        >>> c, s = box_to_center_scale((10, 20, 100, 50), 0.75, padding=(1.0, 1.0))
        >>> np.asarray(c).tolist(), np.asarray(s, "float64").round(2).tolist()
        ([59.5, 44.5], [100.0, 133.33])

    Args:
        boxes: (x, y, w, h) [..., 4] in image pixels (x..x+w-1 are the covered centres).
        aspect_ratio: crop width / height (192 / 256 for a 256x192 input).
        padding: multiplicative extension (x, y) [..., 2] or a pair.

    Returns:
        (center [..., 2], size [..., 2]) float32 tensors in image pixels.
    """
    boxes = ops.cast(ops.convert_to_tensor(boxes), "float32")
    wh = ops.maximum(boxes[..., 2:4], 1.0)
    center = boxes[..., 0:2] + (wh - 1.0) * 0.5
    size = wh * ops.cast(ops.convert_to_tensor(padding), "float32")
    w, h = size[..., 0], size[..., 1]
    wide = w > aspect_ratio * h
    size = ops.stack([ops.where(wide, w, h * aspect_ratio), ops.where(wide, w / aspect_ratio, h)],
                     axis=-1)  # fmt: skip
    return center, size


@_numpy_in_numpy_out
def crop_affine(center, size, output_size: Sequence[int], rotation_deg=0.0, flip=False):
    """[..., 2, 3] float32 matrices mapping image pixels into (H, W) crops.

    The region of ``size`` (w, h) around ``center`` maps onto the output of ``output_size``
    (H, W), rotated counter-clockwise by ``rotation_deg`` and optionally mirrored
    horizontally (about the crop's centre). Batched (``center``, ``size`` [..., 2],
    ``rotation_deg``, ``flip`` [...]); the ONE definition of the crop geometry.

    Example:
        >>> m = crop_affine((100.0, 50.0), (48.0, 64.0), (64, 48))
        >>> np.asarray(transform_points(np.array([[100.0, 50.0]]), m)).tolist()
        [[23.5, 31.5]]
    """
    center = ops.cast(ops.convert_to_tensor(center), "float32")
    size = ops.cast(ops.convert_to_tensor(size), "float32")
    out_h, out_w = float(output_size[0]), float(output_size[1])
    sx, sy = out_w / size[..., 0], out_h / size[..., 1]
    a = ops.cast(ops.convert_to_tensor(rotation_deg), "float32") * (np.pi / 180.0)
    cos, sin = ops.cos(a) + 0.0 * sx, ops.sin(a) + 0.0 * sx  # broadcast to the batch
    sign = ops.where(ops.convert_to_tensor(flip), -1.0, 1.0) + 0.0 * sx
    row0 = ops.stack([sign * sx * cos, sign * sx * sin], axis=-1)
    row1 = ops.stack([-sy * sin, sy * cos], axis=-1)
    lin = ops.stack([row0, row1], axis=-2)  # [..., 2, 2]
    crop_c = ops.convert_to_tensor([(out_w - 1) * 0.5, (out_h - 1) * 0.5], "float32")
    t = crop_c - ops.sum(lin * center[..., None, :], axis=-1)
    return ops.concatenate([lin, t[..., None]], axis=-1)


@_numpy_in_numpy_out
def invert_affine(matrix):
    """Inverse of a [2, 3] affine matrix (or a batch [..., 2, 3]), float32."""
    m = ops.cast(ops.convert_to_tensor(matrix), "float32")
    a, b, c, d = m[..., 0, 0], m[..., 0, 1], m[..., 1, 0], m[..., 1, 1]
    det = a * d - b * c
    inv = ops.stack([ops.stack([d, -b], -1), ops.stack([-c, a], -1)], -2) / det[..., None, None]
    t = -ops.sum(inv * m[..., None, :, 2], axis=-1)
    return ops.concatenate([inv, t[..., None]], axis=-1)


@_numpy_in_numpy_out
def transform_points(points, matrix):
    """Apply [2, 3] matrices to points [..., 2] (extra trailing columns are kept).

    ``matrix`` [2, 3] applies to every point; [B, 2, 3] to points [B, ..., 2].
    """
    pts = ops.cast(ops.convert_to_tensor(points), "float32")
    m = ops.cast(ops.convert_to_tensor(matrix), "float32")
    while len(m.shape) > 2 and len(m.shape) - 2 < len(pts.shape) - 1:
        m = ops.expand_dims(m, -3)  # [B, 2, 3] against points [B, K, 2]
    x, y = pts[..., 0], pts[..., 1]
    out_x = m[..., 0, 0] * x + m[..., 0, 1] * y + m[..., 0, 2]
    out_y = m[..., 1, 0] * x + m[..., 1, 1] * y + m[..., 1, 2]
    xy = ops.stack([out_x, out_y], axis=-1)
    return ops.concatenate([xy, pts[..., 2:]], axis=-1) if pts.shape[-1] > 2 else xy


@_numpy_in_numpy_out
def crop_to_image(keypoints, matrices, image_hw):
    """Input-crop keypoints [n, K, 2] -> image pixels, clipped to the images [n, 2] (H, W).

    Every inference path (evaluate, predict, the SavedModel) ends here, so keypoints always
    lie inside the image (a peak at the crop's border maps to the nearest image pixel).

    Example:
        >>> m = crop_affine([[10.0, 10.0]], [[20.0, 20.0]], (40, 40))
        >>> np.asarray(crop_to_image([[[19.5, 19.5], [80.0, -3.0]]], m, [[15, 30]])).tolist()
        [[[10.0, 10.0], [29.0, 0.0]]]
    """
    xy = transform_points(ops.convert_to_tensor(keypoints)[..., :2], invert_affine(matrices))
    hw = ops.cast(ops.convert_to_tensor(image_hw), "float32")
    high = ops.flip(hw, axis=-1)[..., None, :] - 1.0  # (W - 1, H - 1) [n, 1, 2]
    return ops.maximum(ops.minimum(xy, high), 0.0)


@_numpy_in_numpy_out
def keypoint_boxes(xy, valid):
    """Boxes (x, y, w, h) [..., 4] spanning the valid points of xy [..., K, 2].

    The box of two-stage refinement crops, from the labels while training and from the
    first stage's confident keypoints at inference. No valid point: (0, 0, 0, 0), which
    every crop function reads as "the whole image".

    Example:
        >>> xy = [[[10.0, 20.0], [30.0, 60.0], [99.0, 99.0]]]
        >>> keypoint_boxes(xy, [[True, True, False]]).tolist()
        [[10.0, 20.0, 21.0, 41.0]]
        >>> keypoint_boxes(xy, [[False, False, False]]).tolist()
        [[0.0, 0.0, 0.0, 0.0]]
    """
    xy = ops.cast(ops.convert_to_tensor(xy), "float32")[..., :2]
    valid = ops.convert_to_tensor(valid)[..., None]
    big = 3.0e38
    lo = ops.min(ops.where(valid, xy, big), axis=-2, initial=big)  # initial: n = 0 works
    hi = ops.max(ops.where(valid, xy, -big), axis=-2, initial=-big)
    box = ops.concatenate([lo, hi - lo + 1.0], axis=-1)
    return ops.where(ops.any(valid, axis=-2), box, 0.0)


# --------------------------------------------------------------------------- decoding
#: Decoding methods of :func:`decode_heatmaps` and :func:`decode_multi_peak`.
DECODE_METHODS: tuple[str, ...] = ("dark", "quarter", "argmax")
_LOG_EPS = 1e-10


def decode_heatmaps(heatmaps, method: str = "dark", sigma: float = DEFAULT_REFINE_SIGMA):
    """Locate the peak of every channel with sub-pixel refinement.

    Example:
        >>> kp = np.array([[[10.3, 20.7, 2.0]]], "float32")
        >>> xy, scores = decode_heatmaps(render_heatmaps(kp, (64, 48), 2.0), "dark", 2.0)
        >>> np.asarray(xy, "float64").round(3).tolist(), np.asarray(scores).shape
        ([[[10.3, 20.7]]], (1, 1))

    Args:
        heatmaps: [B, H, W, C] numpy array or tensor.
        method: ``"argmax"`` (integer peak), ``"quarter"`` (0.25 px toward the higher
            neighbour, as in tf-cpn / SimpleBaseline) or ``"dark"`` (Zhang et al. 2020:
            Gaussian smoothing, log, second-order Taylor expansion at the peak).
        sigma: Gaussian sigma of the targets in heatmap pixels; DARK smooths with it
            (0 disables the smoothing, which is exact on clean Gaussians).

    Returns:
        (xy float32 [B, C, 2] in heatmap coordinates, scores float32 [B, C] peak values).
        Pure ``keras.ops``: usable inside a Keras layer on any backend.
    """
    _check_method(method)
    maps = _channels_first(heatmaps)  # [B,C,H,W]
    h, w = int(maps.shape[2]), int(maps.shape[3])
    flat = ops.reshape(maps, (-1, maps.shape[1], h * w))
    idx = ops.expand_dims(ops.cast(ops.argmax(flat, axis=-1), "int32"), -1)  # [B,C,1]
    scores = ops.take_along_axis(flat, idx, axis=-1)
    xy = _refine(maps, idx, method, sigma)
    return xy[:, :, 0], scores[:, :, 0]


def decode_multi_peak(
    heatmaps,
    max_peaks: int,
    threshold: float = 0.1,
    min_distance: int = 2,
    method: str = "dark",
    sigma: float = DEFAULT_REFINE_SIGMA,
):
    """Find up to ``max_peaks`` local maxima per channel (for channels shared by keypoints).

    Peaks are local maxima of a ``2 * min_distance + 1`` max-pool window with value
    ``>= threshold``; of two peaks closer than ``min_distance`` (Chebyshev) only the higher
    one is kept. Each peak is refined like :func:`decode_heatmaps` (DARK uses the local
    Taylor expansion around that peak).

    Example:
        >>> kp = np.array([[[10.0, 20.0, 2], [30.25, 40.5, 2]]], "float32")
        >>> hm = render_heatmaps(kp, (64, 48), 2.0, channels=(0, 0))
        >>> xy, sc = decode_multi_peak(hm, max_peaks=3, sigma=2.0)
        >>> np.asarray(xy, "float64").round(3).tolist()
        [[[[10.0, 20.0], [30.25, 40.5], [0.0, 0.0]]]]
        >>> np.asarray(sc, "float64").round(2).tolist()
        [[[1.0, 0.96, 0.0]]]

    Returns:
        (xy float32 [B, C, N, 2] heatmap coordinates, scores float32 [B, C, N]) sorted by
        score; missing peaks have score 0 and xy (0, 0).
    """
    _check_method(method)
    if int(max_peaks) < 1:
        raise ValueError(f"decode_multi_peak: max_peaks must be >= 1, got {max_peaks}")
    if int(min_distance) < 0:
        raise ValueError(f"decode_multi_peak: min_distance must be >= 0, got {min_distance}")
    hm = ops.cast(ops.convert_to_tensor(heatmaps), "float32")
    window = 2 * int(min_distance) + 1
    pooled = ops.max_pool(hm, window, strides=1, padding="same")
    is_peak = ops.logical_and(hm >= pooled, hm >= float(threshold))
    maps = _channels_first(hm)
    c, h, w = int(maps.shape[1]), int(maps.shape[2]), int(maps.shape[3])
    peak_flat = ops.reshape(_channels_first(ops.cast(is_peak, "float32")), (-1, c, h * w))
    flat = ops.reshape(maps, (-1, c, h * w))
    masked = ops.where(peak_flat > 0, flat, -1.0)
    n = min(int(max_peaks), h * w)
    # Suppress among more candidates than wanted: a plateau (a peak at a half-pixel position,
    # or a tie) gives several equal local maxima, which must not crowd out the next peak.
    m = min(h * w, n * _CANDIDATES_PER_PEAK)
    values, idx = ops.top_k(masked, m)  # sorted, [B,C,M]
    idx = ops.cast(idx, "int32")
    keep = _suppress_close(idx, values >= 0, w, int(min_distance))
    kept_values, order = ops.top_k(ops.where(keep, values, -1.0), n)  # best n survivors
    idx = ops.take_along_axis(idx, ops.cast(order, "int32"), axis=-1)
    keep = kept_values >= 0
    scores = ops.where(keep, kept_values, 0.0)
    xy = _refine(maps, idx, method, sigma) * ops.cast(keep, "float32")[..., None]
    if n < int(max_peaks):  # tiny maps: pad to the requested number of peaks
        pad = int(max_peaks) - n
        xy = ops.pad(xy, ((0, 0), (0, 0), (0, pad), (0, 0)))
        scores = ops.pad(scores, ((0, 0), (0, 0), (0, pad)))
    return xy, scores


#: Candidates per wanted peak examined by :func:`decode_multi_peak` before suppression.
_CANDIDATES_PER_PEAK = 4


def _check_method(method: str) -> None:
    if method not in DECODE_METHODS:
        raise ValueError(f"unknown decode method {method!r}; choose one of {DECODE_METHODS}")


def _channels_first(heatmaps):
    hm = ops.cast(ops.convert_to_tensor(heatmaps), "float32")
    if len(hm.shape) != 4:
        raise ValueError(f"heatmaps must be [B, H, W, C], got shape {tuple(hm.shape)}")
    return ops.transpose(hm, (0, 3, 1, 2))


def _suppress_close(idx, valid, width: int, min_distance: int):
    """Drop peaks within ``min_distance`` of a higher-ranked peak (plateaus, ties)."""
    x = ops.cast(idx % width, "int32")
    y = ops.cast(idx // width, "int32")
    dist = ops.maximum(
        ops.abs(x[..., :, None] - x[..., None, :]), ops.abs(y[..., :, None] - y[..., None, :])
    )  # [B,C,N,N]: row j, column i
    n = int(idx.shape[-1])
    earlier = np.tril(np.ones((n, n), bool), k=-1)  # i < j
    close = ops.logical_and(dist <= min_distance, ops.convert_to_tensor(earlier))
    close = ops.logical_and(close, valid[..., None, :])
    return ops.logical_and(valid, ops.logical_not(ops.any(close, axis=-1)))


def _refine(maps, idx, method: str, sigma: float):
    """Sub-pixel positions [B,C,N,2] of the peaks at flat indices ``idx`` [B,C,N]."""
    h, w = int(maps.shape[2]), int(maps.shape[3])
    px = ops.cast(idx % w, "float32")
    py = ops.cast(idx // w, "float32")
    if method == "argmax":
        return ops.stack([px, py], axis=-1)
    if method == "quarter":
        nb = _neighbours(maps, px, py)
        valid_x = ops.cast(ops.logical_and(px >= 1, px <= w - 2), "float32")
        valid_y = ops.cast(ops.logical_and(py >= 1, py <= h - 2), "float32")
        sx = ops.sign(nb[(0, 1)] - nb[(0, -1)]) * valid_x
        sy = ops.sign(nb[(1, 0)] - nb[(-1, 0)]) * valid_y
        return ops.stack([px + 0.25 * sx, py + 0.25 * sy], axis=-1)
    return _dark_refine(maps, px, py, sigma)


def _dark_refine(maps, px, py, sigma: float):
    """DARK: one Newton step on the log of the (smoothed) map around each peak.

    At a border pixel the 3x3 stencil moves one pixel inward (still exact for a quadratic).
    Smoothing needs the Gaussian's tails, which the border cuts off: within ``ceil(3 sigma)``
    pixels of the border the unsmoothed map is used instead.
    """
    h, w = int(maps.shape[2]), int(maps.shape[3])
    cx = ops.clip(px, 1.0, float(w - 2)) if w >= 3 else px
    cy = ops.clip(py, 1.0, float(h - 2)) if h >= 3 else py
    nb = _neighbours(ops.log(ops.maximum(maps, _LOG_EPS)), cx, cy)
    if sigma and sigma > 0:
        r = float(_blur_radius(sigma))
        inner = (px >= r) & (px <= w - 1 - r) & (py >= r) & (py <= h - 1 - r)
        smooth = _neighbours(ops.log(ops.maximum(_blur(maps, sigma), _LOG_EPS)), cx, cy)
        nb = {k: ops.where(inner, smooth[k], v) for k, v in nb.items()}
    ox, oy = _taylor_offset(nb, float(w >= 3), float(h >= 3))
    x = ops.clip(cx + ox, px - 1.0, px + 1.0)
    y = ops.clip(cy + oy, py - 1.0, py + 1.0)
    return ops.stack([x, y], axis=-1)


def _taylor_offset(nb, use_x: float, use_y: float):
    """Newton step ``-H^-1 g`` from the stencil centre; zero where H is not negative definite."""
    dx = 0.5 * (nb[(0, 1)] - nb[(0, -1)]) * use_x
    dy = 0.5 * (nb[(1, 0)] - nb[(-1, 0)]) * use_y
    dxx = (nb[(0, 1)] - 2.0 * nb[(0, 0)] + nb[(0, -1)]) * use_x - (1.0 - use_x)
    dyy = (nb[(1, 0)] - 2.0 * nb[(0, 0)] + nb[(-1, 0)]) * use_y - (1.0 - use_y)
    dxy = 0.25 * (nb[(1, 1)] - nb[(-1, 1)] - nb[(1, -1)] + nb[(-1, -1)]) * use_x * use_y
    det = dxx * dyy - dxy * dxy
    ok = ops.logical_and(det > 1e-12, dxx < 0)
    safe = ops.where(ok, det, 1.0)
    ox = ops.where(ok, -(dyy * dx - dxy * dy) / safe, 0.0)
    oy = ops.where(ok, -(dxx * dy - dxy * dx) / safe, 0.0)
    return ox, oy


def _neighbours(maps, cx, cy) -> dict[tuple[int, int], object]:
    """3x3 neighbourhood values (dy, dx) around pixel (cx, cy) [B,C,N] (zero outside)."""
    c, h, w = int(maps.shape[1]), int(maps.shape[2]), int(maps.shape[3])
    padded = ops.pad(maps, ((0, 0), (0, 0), (1, 1), (1, 1)))
    padded = ops.reshape(padded, (-1, c, (h + 2) * (w + 2)))
    centre = ops.cast(cy + 1.0, "int32") * (w + 2) + ops.cast(cx + 1.0, "int32")
    return {
        (oy, ox): ops.take_along_axis(padded, centre + oy * (w + 2) + ox, axis=-1)
        for oy in (-1, 0, 1)
        for ox in (-1, 0, 1)
    }


def _blur_radius(sigma: float) -> int:
    return max(1, int(np.ceil(3.0 * float(sigma))))


def _blur(maps, sigma: float):
    """Separable Gaussian smoothing of [B,C,H,W] maps (zero padding, as in DARK)."""
    c, h, w = int(maps.shape[1]), int(maps.shape[2]), int(maps.shape[3])
    radius = _blur_radius(sigma)
    t = np.arange(-radius, radius + 1, dtype=np.float64)
    k = np.exp(-0.5 * (t / sigma) ** 2)
    k = (k / k.sum()).astype(np.float32)
    x = ops.reshape(maps, (-1, h, w, 1))
    x = ops.conv(x, ops.convert_to_tensor(k.reshape(-1, 1, 1, 1)), padding="same")
    x = ops.conv(x, ops.convert_to_tensor(k.reshape(1, -1, 1, 1)), padding="same")
    return ops.reshape(x, (-1, c, h, w))


# --------------------------------------------------------------------------- codec object
class CodecError(ValueError):
    """A codec setting is invalid; the message names the field."""


@dataclass(frozen=True)
class Codec:
    """Everything that turns images and keypoints into model inputs and targets and back.

    ONE float32 object, built from the recipe (:meth:`kpnet.recipe.Recipe.codec`), saved in
    the keypoints model (the decoder layer's config, the SavedModel's ``metadata()``) and
    used by every path: the losses encode with its sigmas, the decoder decodes with its
    options, and the pipeline, ``kpnet predict``, ``kpnet evaluate`` and the SavedModel crop
    with its geometry (:meth:`crop_matrices`, :meth:`to_image`).

    Example:
        >>> codec = Codec(input_size=(256, 192), refine_sigma=2.0)
        >>> kp = np.array([[[100.0, 60.0, 2.0]]], "float32")        # input pixels
        >>> xy, scores = codec.decode(codec.encode(kp))
        >>> np.asarray(xy, "float64").round(2).tolist()
        [[[100.0, 60.0]]]
        >>> Codec.from_dict(codec.to_dict()) == codec
        True

    Args:
        input_size: (H, W) of the model input (a CPN needs multiples of 32).
        stride: input pixels per heatmap pixel.
        global_sigmas: Gaussian sigma (heatmap px) of the GlobalNet targets, P2..P5.
        refine_sigma: sigma of the RefineNet target; DARK decoding smooths with it.
        mode: ``"topdown"`` (a crop around each box), ``"whole"`` (the whole frame,
            aspect kept), ``"random_crop"`` (training: a random window holding the box;
            inference: the whole frame) or ``"two_stage"`` (single-subject frames: the
            whole frame finds the subject, then a crop around the found keypoints refines
            it, never magnified beyond the frame's own resolution; see :meth:`locate`).
        padding: (x, y) extension of top-down boxes.
        train_box_extend: extra extension of top-down crops while training.
        whole_fraction: ``two_stage`` training: the share of crops that are whole frames.
        method: decoding, ``"dark"``, ``"quarter"`` or ``"argmax"``.
        flip_test: average the heatmaps with those of the mirrored crop.
        max_peaks: peaks searched per shared channel (None: its number of keypoints).
        threshold, min_distance: shared-channel peaks (heatmap value, heatmap px).
    """

    input_size: tuple[int, int] = (256, 192)
    stride: int = 4
    global_sigmas: tuple[float, ...] = DEFAULT_GLOBAL_SIGMAS
    refine_sigma: float = DEFAULT_REFINE_SIGMA
    mode: str = "topdown"
    padding: tuple[float, float] = DEFAULT_PADDING
    train_box_extend: float = DEFAULT_TRAIN_BOX_EXTEND
    whole_fraction: float = DEFAULT_WHOLE_FRACTION
    method: str = "dark"
    flip_test: bool = False
    max_peaks: int | None = None
    threshold: float = 0.1
    min_distance: int = 2

    def __post_init__(self) -> None:
        fix = functools.partial(object.__setattr__, self)
        fix("input_size", tuple(int(v) for v in self.input_size))
        fix("stride", int(self.stride))
        fix("global_sigmas", tuple(float(s) for s in self.global_sigmas))
        fix("refine_sigma", float(self.refine_sigma))
        fix("padding", tuple(float(v) for v in self.padding))
        fix("train_box_extend", float(self.train_box_extend))
        fix("whole_fraction", float(self.whole_fraction))
        fix("flip_test", bool(self.flip_test))
        fix("max_peaks", None if self.max_peaks is None else int(self.max_peaks))
        fix("threshold", float(self.threshold))
        fix("min_distance", int(self.min_distance))
        self._check()

    def _check(self) -> None:
        h_w = self.input_size
        if len(h_w) != 2 or any(v <= 0 for v in h_w):
            raise CodecError(f"codec.input_size: {list(h_w)} must be 2 sizes > 0 (H, W)")
        if self.stride <= 0 or any(v % self.stride for v in h_w):
            raise CodecError(f"codec.stride: {self.stride} must divide {list(h_w)}")
        if self.mode not in CROP_MODES:
            raise CodecError(f"codec.mode: {self.mode!r} is not one of {CROP_MODES}")
        if self.method not in DECODE_METHODS:
            raise CodecError(f"codec.method: {self.method!r} is not one of {DECODE_METHODS}")
        if len(self.padding) != 2 or min(self.padding) <= 0:
            raise CodecError(f"codec.padding: {list(self.padding)} must be 2 numbers > 0")
        if len(self.global_sigmas) != len(OUTPUT_NAMES) - 1:
            raise CodecError(f"codec.global_sigmas: need 4 values (P2..P5), got "
                             f"{list(self.global_sigmas)}")  # fmt: skip
        numbers = (*self.global_sigmas, self.refine_sigma, self.train_box_extend, self.threshold)
        if not all(np.isfinite(numbers)) or min(*self.global_sigmas, self.refine_sigma) <= 0:
            raise CodecError("codec: sigmas must be finite and > 0, other numbers finite")
        if not 0.0 <= self.whole_fraction <= 1.0:
            raise CodecError(f"codec.whole_fraction: {self.whole_fraction} must be in [0, 1]")
        if self.max_peaks is not None and self.max_peaks < 1 or self.min_distance < 0:
            raise CodecError("codec: max_peaks must be >= 1 and min_distance >= 0")

    # -- serialization -----------------------------------------------------------------
    def to_dict(self) -> dict:
        """Plain JSON-able dict (lists for tuples); :meth:`from_dict` inverts it."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict) -> Codec:
        """A codec from :meth:`to_dict`'s output; unknown keys are refused."""
        unknown = sorted(set(data) - {f.name for f in fields(cls)})
        if unknown:
            raise CodecError(f"codec: unknown keys {unknown}")
        return cls(**data)

    def replace(self, **changes) -> Codec:
        """A copy with some fields changed (validated)."""
        return dataclasses.replace(self, **changes)

    # -- sizes -------------------------------------------------------------------------
    @property
    def heatmap_size(self) -> tuple[int, int]:
        return (self.input_size[0] // self.stride, self.input_size[1] // self.stride)

    @property
    def uses_boxes(self) -> bool:
        """Whether inference crops around boxes (``topdown``, ``two_stage``); ``whole`` and
        ``random_crop`` models see the whole frame whatever box they are given."""
        return self.mode in ("topdown", "two_stage")

    @property
    def aspect_ratio(self) -> float:
        """Input width / height."""
        return self.input_size[1] / self.input_size[0]

    # -- geometry ----------------------------------------------------------------------
    def regions(self, boxes, image_hw, training: bool = False):
        """(center, size) [n, 2] of the crop regions of boxes [n, 4] in images [n, 2] (H, W).

        Top-down and two-stage: the box with ``padding`` (times ``train_box_extend`` when
        training); two-stage crops are at least the input size in image pixels (never
        magnified beyond the frame's resolution). A box with w <= 0 or h <= 0, and every
        box in ``whole`` / ``random_crop`` mode (inference), stands for the whole image,
        letterboxed with the aspect kept.
        """
        boxes = ops.cast(ops.convert_to_tensor(boxes), "float32")
        hw = ops.cast(ops.convert_to_tensor(image_hw), "float32")
        zeros = ops.zeros_like(hw)
        image_box = ops.concatenate([zeros, ops.flip(hw, axis=-1)], axis=-1)  # (0, 0, W, H)
        whole = ops.logical_or(boxes[..., 2] <= 0, boxes[..., 3] <= 0)
        if not self.uses_boxes:
            whole = ops.logical_or(whole, True)
        boxes = ops.where(whole[..., None], image_box, boxes)
        pad = ops.where(whole[..., None], 1.0, ops.convert_to_tensor(self.padding, "float32"))
        center, size = box_to_center_scale(boxes, self.aspect_ratio, pad)
        if self.mode == "two_stage":
            native = ops.convert_to_tensor(self.input_size[::-1], "float32")  # (W, H)
            size = ops.where(whole[..., None], size, ops.maximum(size, native))
        if training and self.mode in ("topdown", "two_stage"):
            extend = ops.where(whole[..., None], 1.0, self.train_box_extend)
            size = size * extend
        return center, size

    def crop_matrices(self, boxes, image_hw):
        """[n, 2, 3] image -> input crop matrices for inference (see :meth:`regions`).

        Example:
            >>> m = Codec((256, 192)).crop_matrices([[0, 0, 0, 0]], [[480, 640]])
            >>> (np.asarray(m, "float64").round(3) + 0.0).tolist()  # whole frame, letterboxed
            [[[0.3, 0.0, -0.35], [0.0, 0.3, 55.65]]]
        """
        center, size = self.regions(boxes, image_hw)
        return crop_affine(center, size, self.input_size)

    def found_boxes(self, xy, scores):
        """Boxes [n, 4] around the keypoints [n, K, 2] scoring at least ``threshold`` (the
        second stage's boxes; none confident: the whole image again)."""
        return keypoint_boxes(xy, ops.convert_to_tensor(scores) >= self.threshold)

    def locate(self, boxes, locate_fn):
        """Keypoints of boxes [n, 4] through ``locate_fn(boxes) -> (xy, scores)`` (one pass
        of the model over the codec's crops, keypoints in image pixels), in two stages when
        the mode is ``two_stage``: rows whose box is the whole image (w or h <= 0) are first
        located on the whole frame, then refined in a crop around their confident keypoints
        (:meth:`found_boxes`). The ONE definition of inference, for ``kpnet predict``,
        evaluation and the SavedModel.

        Example:
            >>> codec = Codec((64, 64), mode="two_stage")
            >>> def locate_fn(boxes):  # a stand-in model: one keypoint at the box's corner
            ...     return np.asarray(boxes)[:, None, :2] + 7.0, np.ones((len(boxes), 1))
            >>> xy, _ = codec.locate(np.zeros((1, 4)), locate_fn)
            >>> xy.tolist()   # found at (7, 7), then refined in a crop around it
            [[[14.0, 14.0]]]
        """
        if self.mode != "two_stage":
            return locate_fn(boxes)
        graph = ops.is_tensor(boxes)
        boxes = ops.cast(ops.convert_to_tensor(boxes), "float32")
        whole = ops.logical_or(boxes[..., 2] <= 0, boxes[..., 3] <= 0)
        xy, scores = locate_fn(ops.zeros_like(boxes) if graph else np.zeros(boxes.shape, "f4"))
        refined = ops.where(whole[..., None], self.found_boxes(xy, scores), boxes)
        return locate_fn(refined if graph else np.asarray(ops.convert_to_numpy(refined)))

    # -- encoding / decoding ------------------------------------------------------------
    def encode(self, keypoints, sigma: float | None = None, channels=None, num_channels=None):
        """[B, K, 3] input-pixel keypoints -> [B, H/s, W/s, C] Gaussian heatmaps (points with
        v > 0; keypoints sharing a channel through ``channels`` combine by their maximum).

        The one encoding: the losses render their targets with it, on the device.
        """
        kp = ops.cast(ops.convert_to_tensor(keypoints), "float32")
        hm_xy = input_to_heatmap(kp[..., :2], self.stride)
        kp = ops.concatenate([hm_xy, kp[..., 2:3]], axis=-1)
        sigma = sigma or self.refine_sigma
        return render_heatmaps(kp, self.heatmap_size, sigma, channels, num_channels=num_channels)

    def decode(self, heatmaps):
        """Heatmaps -> (xy [B, C, 2] input pixels, scores [B, C]) (one peak per channel).

        What the keypoints model's decoder layer runs (:class:`kpnet.inference.KeypointDecoder`).
        """
        xy, scores = decode_heatmaps(heatmaps, self.method, self.refine_sigma)
        return heatmap_to_input(xy, self.stride), scores

    def decode_peaks(self, heatmaps, num_peaks: int):
        """Heatmaps -> (xy [B, C, N, 2] input pixels, scores [B, C, N]): the ``num_peaks``
        highest peaks of each channel (``threshold`` / ``min_distance`` apart), for channels
        shared by several keypoints; missing peaks score 0.

        Example:
            >>> codec = Codec((64, 64), refine_sigma=1.0)
            >>> kp = np.array([[[12.0, 20.0, 2.0], [40.0, 44.0, 2.0]]], "float32")
            >>> xy, scores = codec.decode_peaks(codec.encode(kp, channels=[0, 0]), 2)
            >>> sorted(np.asarray(xy[0, 0], "float64").round(1).tolist())
            [[12.0, 20.0], [40.0, 44.0]]
        """
        xy, scores = decode_multi_peak(heatmaps, num_peaks, self.threshold, self.min_distance,
                                       self.method, self.refine_sigma)  # fmt: skip
        return heatmap_to_input(xy, self.stride), scores
