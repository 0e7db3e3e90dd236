"""The crop sampler: the ONE way inference paths turn image pixels into model inputs.

Validation in ``kpnet fit``, ``kpnet evaluate``, ``kpnet predict`` and the SavedModel all
call :func:`sample_crops`, so a model sees the same pixels wherever it runs. (Training
crops come from a faster equivalent in :mod:`kpnet.data.pipeline`: DCT-reduced JPEG decoding
and OpenCV warps, with augmentation on top.)

How a crop is sampled from a full-resolution image and an image -> crop matrix:

1. anti-aliasing: when the crop shrinks the image by a factor of at least r in (2, 4, 8)
   (:func:`reduction_ratios`), the image is first reduced by r with an exact box filter
   (reduced pixel j averages image pixels [r j, r j + r), as libjpeg's DCT scaling in
   training approximates);
2. one bilinear warp (``ImageProjectiveTransformV3``; pixel centres at integer
   coordinates, zero fill outside the image), kept in float32: rounding to uint8 would turn
   the last-bit differences between TensorFlow's eager, graph and tf.data execution of the
   same ops into whole grey levels.

Images are decoded the same way everywhere: :func:`kpnet.frames.read_image` and the
pipeline use TensorFlow's decoders, which ignore EXIF orientation: kpnet works on the stored
pixel grid, the grid that COCO and DeepLabCut labels refer to.

Example:
    >>> import numpy as np
    >>> from kpnet.codec import Codec
    >>> image = np.zeros((480, 640, 3), np.uint8)
    >>> m = Codec((256, 192)).crop_matrices([[0, 0, 0, 0]], [[480, 640]])
    >>> crops = sample_crops(image[None], m, (256, 192))
    >>> tuple(crops.shape), crops.dtype.name
    ((1, 256, 192, 3), 'float32')
"""

from __future__ import annotations

from collections.abc import Sequence

import tensorflow as tf

#: Reduction factors of :func:`reduction_ratios` (libjpeg's DCT scaling factors).
RATIOS: tuple[int, ...] = (1, 2, 4, 8)


def max_scale(m: tf.Tensor) -> tf.Tensor:
    """[n] largest singular value of the linear part of [n, 2, 3] affines (crop px / image px)."""
    m = tf.cast(m, tf.float32)
    lin = m[:, :, :2]
    sq = tf.reduce_sum(tf.square(lin), [1, 2])
    det = lin[:, 0, 0] * lin[:, 1, 1] - lin[:, 0, 1] * lin[:, 1, 0]
    return tf.sqrt(0.5 * (sq + tf.sqrt(tf.maximum(sq * sq - 4 * det * det, 0.0))))


def reduction_ratios(m: tf.Tensor) -> tf.Tensor:
    """[n] int32 reduction r in :data:`RATIOS` of each crop: the largest with scale * r <= 1,
    so a reduced image is never upsampled."""
    scale = max_scale(m)
    ratio = tf.ones_like(scale, tf.int32)
    for r in RATIOS[1:]:
        ratio = tf.where(scale * r <= 1.0, r, ratio)
    return ratio


def reduced_matrices(m: tf.Tensor, ratio: tf.Tensor) -> tf.Tensor:
    """[n, 2, 3] float64 matrices from the 1/ratio image to the crop.

    Reduced pixel u is image pixel ``r u + (r - 1) / 2`` (the centre of its r x r block).
    """
    r = tf.cast(ratio, tf.float64)[:, None]
    lin = tf.cast(m[:, :, :2], tf.float64)
    centre = tf.concat([r, r], 1) * 0.5 - 0.5  # (r - 1) / 2 in x and y
    shift = tf.cast(m[:, :, 2], tf.float64) + tf.linalg.matvec(lin, centre)
    return tf.concat([lin * r[:, :, None], shift[:, :, None]], axis=2)


def area_reduce(image: tf.Tensor, r: int) -> tf.Tensor:
    """float32 [ceil(H/r), ceil(W/r), C] box-filtered image: pixel j averages [r j, r j + r)
    (partial blocks at the bottom / right edges average the pixels they hold)."""
    image = tf.cast(image, tf.float32)
    if r == 1:
        return image
    hw = tf.shape(image)[:2]
    pad = (-hw) % r
    paddings = [[0, pad[0]], [0, pad[1]], [0, 0]]
    sums = tf.nn.avg_pool2d(tf.pad(image, paddings)[None], r, r, "VALID")[0]
    ones = tf.pad(tf.ones(tf.concat([hw, [1]], 0), tf.float32), paddings)
    counts = tf.nn.avg_pool2d(ones[None], r, r, "VALID")[0]
    return sums / counts


def sample_crops(
    images: tf.Tensor,
    matrices: tf.Tensor,
    output_size: Sequence[int],
    image_index: tf.Tensor | None = None,
    fill_value: float = 0.0,
) -> tf.Tensor:
    """float32 crops [n, H, W, 3] (0..255): crop i of ``images[image_index[i]]`` by
    ``matrices[i]``.

    Args:
        images: uint8 (or float) [N, H, W, 3] full-resolution images.
        matrices: [n, 2, 3] image -> crop (:meth:`kpnet.codec.Codec.crop_matrices`).
        output_size: (H, W) of the crops.
        image_index: [n] row of ``images`` of each crop (default: crop i from image i).
        fill_value: grey level outside the image.
    """
    images = tf.convert_to_tensor(images)
    m = tf.cast(tf.convert_to_tensor(matrices), tf.float32)
    n = tf.shape(m)[0]
    index = tf.range(n) if image_index is None else tf.cast(image_index, tf.int32)
    ratio = reduction_ratios(m)
    branch = tf.reduce_sum(tf.cast(ratio[:, None] >= RATIOS[1:], tf.int32), 1)
    inverse = _crop_to_reduced(reduced_matrices(m, ratio))  # [n, 8]
    h, w = int(output_size[0]), int(output_size[1])

    def one(args):
        i, b, transform = args
        image = images[i]
        reduced = tf.switch_case(b, [lambda r=r: area_reduce(image, r) for r in RATIOS])
        out = tf.raw_ops.ImageProjectiveTransformV3(
            images=reduced[None], transforms=transform[None], output_shape=[h, w],
            fill_value=float(fill_value), interpolation="BILINEAR", fill_mode="CONSTANT",
        )  # fmt: skip
        return tf.clip_by_value(out[0], 0.0, 255.0)

    spec = tf.TensorSpec([h, w, images.shape[-1]], tf.float32)
    return tf.map_fn(one, (index, branch, inverse), fn_output_signature=spec)


def _crop_to_reduced(m64: tf.Tensor) -> tf.Tensor:
    """[n, 8] ImageProjectiveTransformV3 transforms (crop -> source) of [n, 2, 3] matrices."""
    a, b, c, d = m64[:, 0, 0], m64[:, 0, 1], m64[:, 1, 0], m64[:, 1, 1]
    det = a * d - b * c
    ia, ib, ic, id_ = d / det, -b / det, -c / det, a / det
    tx, ty = m64[:, 0, 2], m64[:, 1, 2]
    zeros = tf.zeros_like(a)
    out = tf.stack([ia, ib, -(ia * tx + ib * ty), ic, id_, -(ic * tx + id_ * ty), zeros, zeros], 1)
    return tf.cast(out, tf.float32)
