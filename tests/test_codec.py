"""Heatmap decoding accuracy, multi-peak search and crop geometry (kpnet.codec)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from _benchmarks import load_benchmark

from kpnet import codec


def _load_benchmark():
    return load_benchmark("codec")


def _kp(*points) -> np.ndarray:
    return np.array([[[x, y, 2.0] for x, y in points]], np.float32)


# --------------------------------------------------------------------------- single peak
def test_round_trip_benchmark_dark_beats_quarter_beats_argmax():
    stats = _load_benchmark().round_trip_errors(600, 2.0, (64, 48), seed=1)
    assert stats["dark"]["mean_px"] <= 0.05
    assert stats["dark"]["max_px"] <= 0.05  # borders included
    assert stats["quarter"]["mean_px"] < stats["argmax"]["mean_px"]
    # uniform sub-pixel offsets: argmax error ~0.38 px, quarter ~0.2 px
    assert 0.3 < stats["argmax"]["mean_px"] < 0.45
    assert 0.15 < stats["quarter"]["mean_px"] < 0.25


@pytest.mark.parametrize("point", [(-0.4, 30.2), (0.3, 0.2), (47.3, 63.4), (46.6, 10.7)])
def test_dark_is_exact_at_the_border(point):
    hm = codec.render_heatmaps(_kp(point), (64, 48), 2.0)
    xy, scores = codec.decode_heatmaps(hm, "dark", sigma=2.0)
    np.testing.assert_allclose(np.asarray(xy)[0, 0], point, atol=1e-3)
    assert 0.8 < float(np.asarray(scores)[0, 0]) <= 1.0


def test_quarter_and_argmax_values():
    hm = codec.render_heatmaps(_kp((10.3, 20.8)), (64, 48), 1.5)
    xy_a, s_a = codec.decode_heatmaps(hm, "argmax")
    xy_q, _ = codec.decode_heatmaps(hm, "quarter")
    np.testing.assert_allclose(np.asarray(xy_a)[0, 0], (10.0, 21.0))
    np.testing.assert_allclose(np.asarray(xy_q)[0, 0], (10.25, 20.75))
    expected = np.exp(-(0.3**2 + 0.2**2) / (2 * 1.5**2))
    np.testing.assert_allclose(np.asarray(s_a)[0, 0], expected, rtol=1e-5)


def test_dark_smoothing_helps_on_noisy_maps():
    rng = np.random.default_rng(0)
    pts = np.stack([rng.uniform(8, 40, 300), rng.uniform(8, 56, 300)], -1)
    kp = np.concatenate([pts, np.full((300, 1), 2.0)], -1)[:, None].astype(np.float32)
    hm = np.asarray(codec.render_heatmaps(kp, (64, 48), 2.0))
    noisy = hm + rng.normal(0.0, 0.03, hm.shape).astype(np.float32)
    err = {}
    for name, method, sigma in [("dark", "dark", 2.0), ("raw", "dark", 0.0), ("q", "quarter", 2)]:
        xy, _ = codec.decode_heatmaps(noisy, method, sigma)
        err[name] = np.linalg.norm(np.asarray(xy)[:, 0] - pts, axis=-1).mean()
    assert err["dark"] < err["raw"] and err["dark"] < err["q"]


def test_decode_rejects_bad_input():
    with pytest.raises(ValueError, match="unknown decode method"):
        codec.decode_heatmaps(np.zeros((1, 8, 8, 1), np.float32), "softargmax")
    with pytest.raises(ValueError, match=r"\[B, H, W, C\]"):
        codec.decode_heatmaps(np.zeros((8, 8, 1), np.float32))


# --------------------------------------------------------------------------- multi peak
@pytest.mark.parametrize("method", ["dark", "quarter"])
def test_multi_peak_finds_both_peaks_in_one_channel(method):
    points = [(10.3, 20.6), (30.2, 45.4)]
    kp = np.concatenate([_kp(*points), _kp((24.0, 32.0))], axis=1)
    hm = np.asarray(codec.render_heatmaps(kp, (64, 48), 2.0, channels=(0, 0, 1))).copy()
    hm[..., 0] *= np.where(np.arange(48) < 20, 1.0, 0.7)[None, None, :]  # second peak lower
    xy, scores = codec.decode_multi_peak(hm, max_peaks=3, threshold=0.1, method=method, sigma=2)
    xy, scores = np.asarray(xy), np.asarray(scores)
    assert xy.shape == (1, 2, 3, 2) and scores.shape == (1, 2, 3)
    tol = 0.1 if method == "dark" else 0.4
    np.testing.assert_allclose(xy[0, 0, :2], points, atol=tol)  # sorted by score
    np.testing.assert_allclose(xy[0, 1, 0], (24.0, 32.0), atol=tol)
    top = np.exp(-(0.3**2 + 0.4**2) / 8)
    np.testing.assert_allclose(scores[0, 0], [top, 0.7 * np.exp(-(0.2**2 + 0.4**2) / 8), 0], 1e-4)
    np.testing.assert_allclose(scores[0, 1], [1.0, 0.0, 0.0], atol=1e-6)
    np.testing.assert_array_equal(xy[0, 1, 1:], 0.0)  # missing peaks


def test_multi_peak_respects_threshold_and_min_distance():
    kp = _kp((10.0, 10.0), (15.0, 10.0))
    hm = np.asarray(codec.render_heatmaps(kp, (64, 48), 1.0, channels=(0, 0))).copy()
    hm[0, 50, 30, 0] = 0.2  # a weak isolated peak
    _, s = codec.decode_multi_peak(hm, 4, threshold=0.1, min_distance=2, method="argmax")
    np.testing.assert_allclose(np.asarray(s)[0, 0], [1.0, 1.0, 0.2, 0.0])
    _, s = codec.decode_multi_peak(hm, 4, threshold=0.3, min_distance=2, method="argmax")
    np.testing.assert_allclose(np.asarray(s)[0, 0], [1.0, 1.0, 0.0, 0.0])
    # 5 px apart: a 2 * 5 + 1 window keeps only one of the two
    xy, s = codec.decode_multi_peak(hm, 4, threshold=0.3, min_distance=5, method="argmax")
    np.testing.assert_allclose(np.asarray(s)[0, 0], [1.0, 0.0, 0.0, 0.0])


def test_multi_peak_plateau_gives_one_peak():
    hm = codec.render_heatmaps(_kp((10.5, 20.0)), (64, 48), 2.0)  # two equal maxima
    xy, s = codec.decode_multi_peak(hm, 2, sigma=2.0)
    assert np.asarray(s)[0, 0, 1] == 0.0
    np.testing.assert_allclose(np.asarray(xy)[0, 0, 0], (10.5, 20.0), atol=1e-3)


# --------------------------------------------------------------------------- codec object
def test_codec_round_trip_in_input_pixels():
    c = codec.Codec(input_size=(256, 192), stride=4, refine_sigma=2.0)
    kp = _kp((37.3, 101.9), (150.0, 220.6))
    hm = c.encode(kp, channels=(0, 1))
    assert tuple(hm.shape) == (1, 64, 48, 2)
    xy, scores = c.decode(hm)
    np.testing.assert_allclose(np.asarray(xy)[0], kp[0, :, :2], atol=0.01)
    assert np.all(np.asarray(scores) > 0.9)


def test_codec_serializes_and_refuses_bad_fields():
    c = codec.Codec((128, 96), mode="whole", padding=(1.1, 1.4), flip_test=True, max_peaks=3)
    assert codec.Codec.from_dict(json.loads(json.dumps(c.to_dict()))) == c
    with pytest.raises(codec.CodecError, match="input_size"):
        codec.Codec((0, 96))
    with pytest.raises(codec.CodecError, match="mode"):
        codec.Codec(mode="sideways")
    with pytest.raises(codec.CodecError, match="unknown keys"):
        codec.Codec.from_dict({"input_size": [64, 64], "sigma": 2.0})


def test_codec_crop_matrices_whole_frame_and_box():
    c = codec.Codec((256, 192))
    m = np.asarray(c.crop_matrices([[0, 0, 0, 0], [100, 50, 60, 80]], [[480, 640]] * 2))
    # whole frame: 640 px wide onto 192 px, letterboxed vertically, centre to centre
    np.testing.assert_allclose(m[0], [[0.3, 0, -0.35], [0, 0.3, 55.65]], atol=1e-4)
    centre, size = codec.box_to_center_scale((100, 50, 60, 80), 0.75, codec.DEFAULT_PADDING)
    np.testing.assert_allclose(m[1], codec.crop_affine(centre, size, (256, 192)), atol=1e-5)
    whole = codec.Codec((256, 192), mode="whole")  # whole-frame models ignore the boxes
    np.testing.assert_allclose(whole.crop_matrices([[100, 50, 60, 80]], [[480, 640]])[0], m[0])


def test_crop_to_image_inverts_and_clips():
    m = codec.crop_affine([[50.0, 40.0]], [[20.0, 20.0]], (40, 40))
    crop_xy = np.asarray(codec.transform_points(np.array([[[45.0, 35.0]]]), m))
    back = np.asarray(codec.crop_to_image(crop_xy, m, [[60, 80]]))
    np.testing.assert_allclose(back, [[[45.0, 35.0]]], atol=1e-4)
    out = np.asarray(codec.crop_to_image([[[-500.0, 500.0]]], m, [[60, 80]]))
    np.testing.assert_allclose(out, [[[0.0, 59.0]]])


# --------------------------------------------------------------------------- geometry
def test_input_heatmap_round_trip_and_pixel_centres():
    xy = np.array([[0.0, 0.0], [1.5, 3.5], [191.0, 255.0]], np.float32)
    hm = codec.input_to_heatmap(xy, 4)
    np.testing.assert_allclose(codec.heatmap_to_input(hm, 4), xy, atol=1e-5)
    # the centre of heatmap pixel 0 is the centre of input pixels 0..3
    np.testing.assert_allclose(codec.heatmap_to_input(np.zeros(2), 4), [1.5, 1.5])
    np.testing.assert_allclose(hm[2], [47.375, 63.375])


def test_box_to_center_scale_keeps_aspect_ratio():
    center, size = map(np.asarray, codec.box_to_center_scale((10, 20, 100, 50), 0.75, (1, 1)))
    np.testing.assert_allclose(center, [59.5, 44.5])
    np.testing.assert_allclose(size, [100.0, 100.0 / 0.75])  # too wide: height grows
    size = np.asarray(codec.box_to_center_scale((0, 0, 30, 200), 0.75, padding=(1.2, 1.3))[1])
    np.testing.assert_allclose(size, [200 * 1.3 * 0.75, 260.0])
    assert size[0] / size[1] == pytest.approx(0.75)


def test_crop_affine_maps_box_onto_crop():
    m = codec.crop_affine((100.0, 50.0), (48.0, 64.0), (64, 48))
    corners = codec.transform_points(np.array([[100.0, 50.0], [124.0, 82.0]]), m)
    np.testing.assert_allclose(corners, [[23.5, 31.5], [47.5, 63.5]], atol=1e-4)
    np.testing.assert_allclose(codec.transform_points(corners, codec.invert_affine(m)),
                               [[100.0, 50.0], [124.0, 82.0]], atol=1e-4)  # fmt: skip


def test_crop_affine_rotation_and_flip():
    center, size, out = (100.0, 50.0), (48.0, 64.0), (64, 48)
    rot = codec.crop_affine(center, size, out, rotation_deg=90.0)
    # counter-clockwise by 90 deg: a point right of the centre moves above it
    p = codec.transform_points(np.array([[110.0, 50.0]]), rot)
    np.testing.assert_allclose(p, [[23.5, 31.5 - 10.0]], atol=1e-4)
    flip = codec.crop_affine(center, size, out, flip=True)
    plain = codec.crop_affine(center, size, out)
    pts = np.array([[90.0, 40.0], [120.0, 70.0]])
    a, b = codec.transform_points(pts, plain), codec.transform_points(pts, flip)
    np.testing.assert_allclose(b[:, 0], 47.0 - a[:, 0], atol=1e-4)  # x -> W - 1 - x
    np.testing.assert_allclose(b[:, 1], a[:, 1], atol=1e-4)


def test_transform_points_keeps_extra_columns_and_batches_invert():
    m = codec.crop_affine((10.0, 10.0), (20.0, 20.0), (40, 40), rotation_deg=30.0)
    pts = np.array([[1.0, 2.0, 2.0], [3.0, 4.0, 0.0]], np.float32)
    out = codec.transform_points(pts, m)
    assert out.shape == (2, 3)
    np.testing.assert_array_equal(out[:, 2], [2.0, 0.0])
    inv = codec.invert_affine(np.stack([m, m]))
    np.testing.assert_allclose(codec.transform_points(out, inv[1])[:, :2], pts[:, :2], atol=1e-4)
