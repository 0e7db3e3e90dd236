"""The shared crop sampler (kpnet.crops): exact geometry, anti-aliasing, one result for all."""

from __future__ import annotations

import numpy as np
import pytest

from kpnet.codec import Codec, transform_points
from kpnet.crops import area_reduce, reduction_ratios, sample_crops


def _blob(x: float, y: float, hw=(600, 800), sigma=5.0) -> np.ndarray:
    ys, xs = np.mgrid[: hw[0], : hw[1]]
    g = 255 * np.exp(-((xs - x) ** 2 + (ys - y) ** 2) / (2 * sigma**2))
    return np.round(g)[..., None].repeat(3, -1).astype(np.uint8)


@pytest.mark.parametrize("size, ratio", [(256, 1), (128, 2), (64, 4), (32, 8)])
def test_blobs_land_where_the_codec_says_at_every_reduction(size, ratio):
    rng = np.random.default_rng(size)
    codec = Codec((size, size))
    for _ in range(4):
        x, y = rng.uniform(300, 500), rng.uniform(250, 350)
        m = np.asarray(codec.crop_matrices([[x - 100, y - 100, 200, 200]], [[600, 800]]))
        assert int(reduction_ratios(m)[0]) == ratio
        crop = np.asarray(sample_crops(_blob(x, y)[None], m, (size, size)))[0, ..., 0]
        w = crop.astype(np.float64)
        cy, cx = np.mgrid[:size, :size]
        centroid = np.array([(cx * w).sum(), (cy * w).sum()]) / w.sum()
        target = transform_points(np.array([[x, y]]), m[0])[0]
        assert np.linalg.norm(centroid - target) < 0.05 * max(1, 8 // ratio)


def test_area_reduce_averages_blocks_and_partial_edges():
    image = np.arange(5 * 3, dtype=np.float32).reshape(5, 3, 1)
    out = np.asarray(area_reduce(image, 2))[..., 0]
    np.testing.assert_allclose(out, [[2.0, 3.5], [8.0, 9.5], [12.5, 14.0]])


def test_anti_aliasing_removes_stripes_that_plain_bilinear_keeps():
    stripes = np.zeros((800, 800, 3), np.uint8)
    stripes[:, ::2] = 255  # one-pixel stripes: mean grey 127.5
    m = np.asarray(Codec((64, 64)).crop_matrices([[0, 0, 800, 800]], [[800, 800]]))
    crop = np.asarray(sample_crops(stripes[None], m, (64, 64)))[0, 8:-8, 8:-8]
    assert abs(float(crop.mean()) - 127.5) < 2 and float(crop.std()) < 2


def test_one_image_many_crops_and_fill_outside():
    image = np.full((40, 60, 3), 200, np.uint8)
    codec = Codec((32, 32))
    m = np.asarray(codec.crop_matrices([[0, 0, 0, 0], [50, 30, 40, 40]], [[40, 60]] * 2))
    crops = np.asarray(sample_crops(image[None], m, (32, 32), image_index=[0, 0]))
    assert crops.shape == (2, 32, 32, 3) and crops.dtype == np.float32
    assert crops[0, 16, 16, 0] == 200 and crops[0, 0, 16, 0] == 0  # letterbox rows are fill
    assert crops[1, -1, -1, 0] == 0  # the box reaches past the image corner
