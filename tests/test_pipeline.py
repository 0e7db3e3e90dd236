"""Tests of the tf.data pipeline: exact geometry, augmentation, determinism, errors, preview."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import tensorflow as tf

import kpnet  # noqa: F401  (quiet TF logs)
from kpnet import codec
from kpnet.codec import Codec
from kpnet.data.augment import AugmentConfig, apply_color, sample_color
from kpnet.data.columns import _inspect
from kpnet.data.pipeline import PipelineConfig, _decode_ratios, build_dataset
from kpnet.data.preview import write_preview
from kpnet.data.records import DataError, InstanceRecord
from kpnet.spec import KeypointSpec

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
# Three keypoints painted pure red, green and blue on black; 0 <-> 1 swap under a flip.
SPEC = KeypointSpec(names=("left", "right", "tip"), flip_pairs=((0, 1),), skeleton=((0, 2),))
NO_COLOR = dict(brightness=0.0, contrast=0.0, saturation=0.0, hue=0.0)
GEOM = PipelineConfig(
    codec=Codec((64, 64)),
    augment=AugmentConfig(rotation_prob=1.0, **NO_COLOR),
    shuffle_buffer=8,
)


def _marker_images(tmp_path: Path, n: int, size=(90, 120), bg=0) -> list[InstanceRecord]:
    """PNG images with a 3x3 marker (R, G, B) at each keypoint; one instance per image."""
    rng = np.random.default_rng(0)
    records = []
    for i in range(n):
        img = np.full((*size, 3), bg, np.uint8)
        kp = np.zeros((3, 3), np.float32)
        x0, y0 = rng.integers(25, 45), rng.integers(20, 35)
        for k in range(3):
            x, y = x0 + rng.integers(0, 45), y0 + rng.integers(0, 35)
            img[y - 1 : y + 2, x - 1 : x + 2, k] = 255
            kp[k] = (x, y, 2)
        path = tmp_path / f"m{i}.png"
        cv2.imwrite(str(path), img[..., ::-1])
        box = (x0 - 5.0, y0 - 5.0, 55.0, 45.0)
        records.append(InstanceRecord(str(path), box, kp, image_id=i, record_id=i))
    return records


def _collect(ds) -> list[np.ndarray]:
    parts = list(zip(*[(im, kp, m["affine"], m["index"]) for im, kp, m in ds], strict=True))
    return [np.concatenate([np.asarray(t) for t in p]) for p in parts]


def _centroid(channel: np.ndarray) -> np.ndarray:
    w = channel.astype(np.float64)
    ys, xs = np.mgrid[: w.shape[0], : w.shape[1]]
    return np.array([(xs * w).sum(), (ys * w).sum()]) / w.sum()


def test_markers_follow_full_augmentation(tmp_path):
    records = _marker_images(tmp_path, 24)
    ds = build_dataset(records, SPEC, GEOM, 8, training=True, seed=3, with_meta=True)
    images, kps, affines, index = _collect(ds)
    assert images.dtype == np.uint8 and images.shape == (24, 64, 64, 3)
    flipped = np.linalg.det(affines[:, :, :2]) < 0
    angles = np.degrees(np.arctan2(affines[:, 1, 0], affines[:, 1, 1]))
    assert flipped.any() and not flipped.all() and np.abs(angles).max() > 10
    checked = 0
    for im, kp, m, i, f in zip(images, kps, affines, index, flipped, strict=True):
        xy = kp[:, :2]  # input-crop pixels
        expected = codec.transform_points(records[i].keypoints[:, :2], m)
        source = [1, 0, 2] if f else [0, 1, 2]  # flip: returned "left" is the right marker
        for j in range(3):
            target = expected[source[j]]
            inside = (target >= -0.5).all() and (target < 63.5).all()
            assert (kp[j, 2] > 0) == inside  # points leaving the crop become unlabelled
            if not inside:
                assert (kp[j] == 0).all()
                continue
            np.testing.assert_allclose(xy[j], target, atol=1e-3)  # meta affine is the truth
            if (target > 3).all() and (target < 60).all():
                assert np.linalg.norm(_centroid(im[..., source[j]]) - xy[j]) < 1.0
                checked += 1
    assert checked >= 40


def test_deterministic_under_seed(tmp_path):
    records = _marker_images(tmp_path, 10)
    cfg = PipelineConfig(codec=Codec((64, 64)), shuffle_buffer=4)
    runs = [_collect(build_dataset(records, SPEC, cfg, 4, True, seed=s, with_meta=True))
            for s in (5, 5, 6)]  # fmt: skip
    for a, b in zip(runs[0], runs[1], strict=True):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(runs[0][2], runs[2][2])
    # A repeated dataset draws fresh augmentation per epoch.
    rep = build_dataset(records, SPEC, cfg, 4, True, seed=5, repeat=True, with_meta=True)
    epochs = [np.asarray(m["affine"]) for _, _, m in rep.take(4)]
    assert not np.allclose(np.concatenate(epochs[:2]), np.concatenate(epochs[2:]))


def test_warp_matches_opencv_with_roi_jpeg_decode(tmp_path):
    rng = np.random.default_rng(2)
    img = cv2.GaussianBlur(rng.integers(0, 256, (300, 400, 3), dtype=np.uint8), (5, 5), 0)
    path = tmp_path / "big.jpg"
    cv2.imwrite(str(path), img[..., ::-1])
    kp = np.zeros((3, 3), np.float32)
    boxes = [(40.0, 30.0, 60.0, 80.0), (350.0, 250.0, 80.0, 90.0), (150.0, 100.0, 30.0, 40.0)]
    records = [InstanceRecord(str(path), b, kp, record_id=i) for i, b in enumerate(boxes)]
    cfg = PipelineConfig(codec=Codec((64, 64)))
    images, _, affines, index = _collect(build_dataset(records, SPEC, cfg, 2, False,
                                                       with_meta=True))  # fmt: skip
    np.testing.assert_array_equal(index, [0, 1, 2])  # evaluation keeps the record order
    decoded = tf.io.decode_jpeg(tf.io.read_file(str(path))).numpy().astype(np.float32)
    for im, m in zip(images, affines, strict=True):
        ref = cv2.warpAffine(decoded, m, (64, 64), flags=cv2.INTER_LINEAR)
        assert np.abs(im.astype(np.float32) - ref).max() <= 1.0


def _blob_jpegs(tmp_path: Path, n: int, size=(600, 800), sigma=5.0) -> list[InstanceRecord]:
    """JPEGs (4:4:4) with a Gaussian blob in R, G, B at each keypoint; 200x200 boxes."""
    rng = np.random.default_rng(4)
    ys, xs = np.mgrid[: size[0], : size[1]]
    records = []
    for i in range(n):
        img = np.zeros((*size, 3))
        x0, y0 = rng.integers(150, 450), rng.integers(150, 300)
        kp = np.zeros((3, 3), np.float32)
        for k in range(3):
            x, y = x0 + rng.integers(20, 180), y0 + rng.integers(20, 180)
            img[..., k] += 255 * np.exp(-((xs - x) ** 2 + (ys - y) ** 2) / (2 * sigma**2))
            kp[k] = (x, y, 2)
        path = tmp_path / f"b{i}.jpg"
        no_subsampling = [cv2.IMWRITE_JPEG_SAMPLING_FACTOR, cv2.IMWRITE_JPEG_SAMPLING_FACTOR_444]
        cv2.imwrite(str(path), np.round(img[..., ::-1]).astype(np.uint8), no_subsampling)
        records.append(InstanceRecord(str(path), (x0, y0, 200.0, 200.0), kp, record_id=i))
    return records


def test_image_sizes_from_headers_match_decoder(tmp_path):
    img = np.zeros((37, 53, 3), np.uint8)
    files = {"p.png": [], "b.jpg": [], "prog.jpg": [cv2.IMWRITE_JPEG_PROGRESSIVE, 1]}
    for name, params in files.items():
        cv2.imwrite(str(tmp_path / name), img, params)
    with_app = tmp_path / "app.jpg"  # an extra APP segment before the frame header
    data = (tmp_path / "b.jpg").read_bytes()
    with_app.write_bytes(data[:2] + b"\xff\xe5\x00\x06abcd" + data[2:])
    paths = [tmp_path / n for n in files] + [with_app]
    coco = DATA / "coco_mini" / "train2017"
    paths += sorted(coco.glob("*.jpg"))[:20] if coco.exists() else []
    for path in paths:
        why, hw, is_jpeg = _inspect(str(path))
        decoded = tf.io.decode_image(tf.io.read_file(str(path)), channels=3)
        assert why is None and hw == tuple(decoded.shape[:2]), path
        assert is_jpeg == (path.suffix == ".jpg")


def test_decode_ratio_is_largest_factor_not_upsampled():
    def m(*lin):
        return np.array([[[a, b, 5.0], [c, d, 7.0]] for a, b, c, d in lin], np.float32)

    rot = np.array([[np.cos(0.5), np.sin(0.5)], [-np.sin(0.5), np.cos(0.5)]])
    crops = m((0.5, 0, 0, 0.5), (0.51, 0, 0, 0.2), (-0.25, 0, 0, 0.25), (0.125, 0, 0, 0.1),
              (*(0.2 * rot).ravel(),), (0.1, 0.0, 0.0, 0.1), (0.1, 0.0, 0.0, 0.1))  # fmt: skip
    group = tf.range(7)
    is_jpeg = tf.constant([True, True, True, True, True, False, True])
    ratios = _decode_ratios(tf.constant(crops), group, is_jpeg).numpy()
    np.testing.assert_array_equal(ratios, [2, 1, 4, 8, 4, 1, 8])
    both = _decode_ratios(tf.constant(crops[:2]), tf.constant([0, 0]), tf.constant([True]))
    np.testing.assert_array_equal(both, [1])  # an image's ratio suits its largest-scale crop


@pytest.mark.parametrize("size", [32, 64, 128])
def test_reduced_jpeg_decode_keeps_exact_geometry(tmp_path, size):
    """Crops of 1/8, 1/4, 1/2 resolution decodes (scale ~0.12, 0.25, 0.49) put each blob
    where the affine says, as full decodes do (a pixel-centre slip would cost 0.25-0.4 px)."""
    records = _blob_jpegs(tmp_path, 6)
    for training in (False, True):
        runs = {}
        for reduced in (True, False):
            cfg = PipelineConfig(codec=Codec((size, size)), reduced_decode=reduced,
                                 augment=AugmentConfig(rotation_prob=1.0, **NO_COLOR))  # fmt: skip
            ds = build_dataset(records, SPEC, cfg, 4, training, seed=1, with_meta=True)
            runs[reduced] = _collect(ds)
        (images, _, affines, index), full = runs[True], runs[False]
        np.testing.assert_array_equal(affines, full[2])
        # training: the reduced decode was used; evaluation: always the shared sampler
        assert np.array_equal(images, full[0]) != training
        if not training:  # evaluation crops: tests/test_crops.py
            continue
        slips, errors = [], []
        for im, ref, m, i in zip(images, full[0], affines, index, strict=True):
            order = [1, 0, 2] if np.linalg.det(m[:, :2]) < 0 else [0, 1, 2]
            for j in range(3):
                target = codec.transform_points(records[i].keypoints[order[j], :2], m)
                # a blob cut by the crop's edge has a biased centroid: keep 3 sigmas inside
                margin = 3 * 5.0 * np.sqrt(abs(np.linalg.det(m[:, :2]))) + 1
                if (target > margin).all() and (target < size - 1 - margin).all():
                    c = order[j]  # weight: how much this channel exceeds the other two
                    at = [_centroid(np.clip(x[..., c].astype(float)
                                            - np.delete(x, c, -1).max(-1), 0, None))
                          for x in (im, ref)]  # fmt: skip
                    slips.append(at[0] - at[1])
                    errors.append(np.linalg.norm(at[1] - target))
        # The reduced decode puts blobs where the full one does, and both where the affine
        # says. A slip of half a decoded pixel would move every blob by 0.25-0.5 px in one
        # direction; per blob, a nearby blob of another colour can pull a centroid by 0.3 px.
        slips = np.array(slips)
        assert len(slips) >= 8 and np.abs(slips.mean(0)).max() < 0.08
        assert np.median(np.linalg.norm(slips, axis=1)) < 0.15 and np.median(errors) < 0.1


def test_eval_box_crop_and_unlabelled_outside(tmp_path):
    records = _marker_images(tmp_path, 1)
    r = records[0]
    r.keypoints[2] = (2.0, 2.0, 2.0)  # far outside the box crop
    r.keypoints[1, 2] = 0  # unlabelled stays unlabelled
    cfg = PipelineConfig(codec=Codec((64, 64)))
    _, kp, m, _ = _collect(build_dataset(records, SPEC, cfg, 1, False, with_meta=True))
    center, size = codec.box_to_center_scale(r.box, 1.0, cfg.codec.padding)
    np.testing.assert_allclose(m[0], codec.crop_affine(center, size, (64, 64)), atol=1e-4)
    assert kp[0, 0, 2] == 2 and (kp[0, 1:] == 0).all()


@pytest.mark.parametrize("mode", ["whole", "random_crop"])
def test_single_object_modes(tmp_path, mode):
    records = _marker_images(tmp_path, 6)
    aug = AugmentConfig(rotation=0.0, flip=False, **NO_COLOR)
    cfg = PipelineConfig(codec=Codec((64, 96), mode=mode), augment=aug, shuffle_buffer=1)
    _, kp, m, idx = _collect(build_dataset(records, SPEC, cfg, 3, False, with_meta=True))
    corners = codec.transform_points(np.array([[-0.5, -0.5], [119.5, 89.5]]), m[0])
    half_w = 60 * 64 / 90  # height-limited: 90 rows fill 64, 120 columns centred
    np.testing.assert_allclose(corners, [[47.5 - half_w, -0.5], [47.5 + half_w, 63.5]], atol=1e-3)
    assert (kp[..., 2] == 2).all()
    _, kp, m, idx = _collect(build_dataset(records, SPEC, cfg, 3, True, with_meta=True))
    for mi, i in zip(m, idx, strict=True):
        x, y, w, h = records[i].box
        box = codec.transform_points(np.array([[x, y], [x + w - 1, y + h - 1]]), mi)
        assert (box >= -0.5 - 1e-3).all() and (box <= [95.5, 63.5]).all()


@pytest.mark.parametrize("translate", [0.0, 0.2])
def test_translate_moves_the_whole_frame_within_its_range(tmp_path, translate):
    """augment.translate shifts the region's centre by up to translate x its size, in x and y
    independently; the keypoints follow the image (the same matrix); 0 leaves it centred."""
    records = _marker_images(tmp_path, 12)
    aug = AugmentConfig(scale=(1, 1), rotation=0.0, flip=False, translate=translate, **NO_COLOR)
    cfg = PipelineConfig(codec=Codec((64, 96), mode="whole"), augment=aug, shuffle_buffer=1)
    rep = build_dataset(records, SPEC, cfg, 4, True, seed=1, repeat=True, with_meta=True)
    shifts = []
    for _, kp, meta in rep.take(6):
        for ki, mi, i in zip(np.asarray(kp), np.asarray(meta["affine"]),
                             np.asarray(meta["index"]), strict=True):  # fmt: skip
            center = codec.transform_points(np.array([47.5, 31.5]), codec.invert_affine(mi))
            shifts.append((center - [59.5, 44.5]) / [135.0, 90.0])  # region: 135 x 90 pixels
            seen = ki[:, 2] > 0
            expected = codec.transform_points(records[i].keypoints[:, :2], mi)
            np.testing.assert_allclose(ki[seen, :2], expected[seen], atol=1e-3)
    shifts = np.array(shifts)
    assert np.abs(shifts).max() <= translate + 1e-4
    if translate:
        assert np.abs(shifts).max(0).min() > translate / 2  # both axes, not one
        assert np.corrcoef(shifts.T)[0, 1] < 0.9
    else:
        np.testing.assert_allclose(shifts, 0.0, atol=1e-4)


def test_translate_out_of_range_is_refused():
    with pytest.raises(ValueError, match="augment.translate"):
        AugmentConfig(translate=1.5)


def test_half_body_recentres_on_upper_points(tmp_path):
    records = _marker_images(tmp_path, 12)
    aug = AugmentConfig(
        scale=(1, 1),
        rotation=0.0,
        flip=False,
        half_body_prob=1.0,
        half_body_min_keypoints=2,
        upper_body=("left", "right"),
        **NO_COLOR,
    )
    cfg = PipelineConfig(codec=Codec((64, 64)), augment=aug, shuffle_buffer=1)  # fmt: skip
    _, _, m, idx = _collect(build_dataset(records, SPEC, cfg, 4, True, with_meta=True))
    kinds = set()
    for mi, i in zip(m, idx, strict=True):
        center = codec.transform_points(np.array([31.5, 31.5]), codec.invert_affine(mi))
        upper = records[i].keypoints[:2, :2]
        box_center, _ = codec.box_to_center_scale(records[i].box, 1.0)
        if np.allclose(center, (upper.min(0) + upper.max(0)) / 2, atol=1e-3):
            kinds.add("upper")  # the lower half has one point only: no half-body crop
        else:
            np.testing.assert_allclose(center, box_center, atol=1e-3)
            kinds.add("box")
    assert kinds == {"upper", "box"}


def test_sharding_with_input_context(tmp_path):
    records = _marker_images(tmp_path, 10)
    cfg = PipelineConfig(codec=Codec((64, 64)))
    seen = []
    for pid in range(2):
        ctx = tf.distribute.InputContext(2, pid, 2)
        ds = build_dataset(records, SPEC, cfg, 4, False, with_meta=True, input_context=ctx)
        batches = [m["index"].numpy() for _, _, m in ds]
        assert max(len(b) for b in batches) == 2  # per-replica batch
        seen.append(np.concatenate(batches))
    assert sorted(np.concatenate(seen).tolist()) == list(range(10))
    assert not set(seen[0]) & set(seen[1])


def test_photometric_albumentations_and_jitter(tmp_path):
    records = _marker_images(tmp_path, 4, bg=100)
    photo = ({"name": "RandomBrightnessContrast", "p": 1.0, "brightness_limit": 0.5},)
    aug = AugmentConfig(rotation=0.0, scale=(1, 1), flip=False, photometric=photo)
    cfg = PipelineConfig(codec=Codec((64, 64)), augment=aug, shuffle_buffer=1)
    plain = PipelineConfig(codec=Codec((64, 64)), shuffle_buffer=1,
                           augment=AugmentConfig(rotation=0.0, scale=(1, 1), flip=False,
                                                 **NO_COLOR))  # fmt: skip
    a = _collect(build_dataset(records, SPEC, cfg, 4, True, seed=1, with_meta=True))
    b = _collect(build_dataset(records, SPEC, cfg, 4, True, seed=1, with_meta=True))
    c = _collect(build_dataset(records, SPEC, plain, 4, True, seed=1, with_meta=True))
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], c[1])  # geometry unchanged
    assert np.abs(a[0].astype(int) - c[0]).mean() > 1.0
    with pytest.raises(ValueError, match="NoSuchTransform"):
        AugmentConfig(photometric=({"name": "NoSuchTransform"},))


def test_bad_image_files_name_file_and_record(tmp_path):
    records = _marker_images(tmp_path, 3)
    good = tmp_path / "good.jpg"
    cv2.imwrite(str(good), np.full((50, 60, 3), 90, np.uint8))
    (tmp_path / "cut.jpg").write_bytes(good.read_bytes()[:300])
    (tmp_path / "junk.png").write_bytes(b"not an image at all")
    kp = records[0].keypoints
    bad = [InstanceRecord(str(tmp_path / name), (1, 1, 20, 20), kp, record_id=90 + i)
           for i, name in enumerate(["missing.jpg", "cut.jpg", "junk.png"])]  # fmt: skip
    for record in bad:
        name = Path(record.image_path).name
        with pytest.raises(DataError, match=rf"record {record.record_id} .*{name}"):
            build_dataset([*records, record], SPEC, GEOM, 2, False)
    ds = build_dataset([*records, *bad], SPEC, GEOM, 2, False, on_error="skip", with_meta=True)
    assert sorted(_collect(ds)[3].tolist()) == [0, 1, 2]
    wrong = InstanceRecord(str(good), (1, 1, 20, 20), np.zeros((5, 3)), record_id=77)
    with pytest.raises(DataError, match="record 77"):
        build_dataset([wrong], SPEC, GEOM, 1, False)


def test_color_jitter_parameters():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    np.testing.assert_array_equal(apply_color(img, [0.0, 1.0, 1.0, 0.0]), img)
    brighter = apply_color(img, [0.2, 1.0, 1.0, 0.0]).astype(int)
    np.testing.assert_array_equal(brighter, np.minimum(img.astype(int) + 51, 255))
    flat = apply_color(img, [0.0, 0.0, 1.0, 0.0])  # zero contrast: the mean level
    assert np.ptp(flat) == 0 and abs(int(flat[0, 0, 0]) - img.mean()) <= 1
    gray = apply_color(img, [0.0, 1.0, 0.0, 0.0])  # zero saturation: grey
    assert (gray[..., 0] == gray[..., 1]).all() and (gray[..., 1] == gray[..., 2]).all()
    no_saturation = AugmentConfig(saturation=0.0)
    params = sample_color(no_saturation, tf.constant([1, 2], tf.int64), tf.constant(500))
    lo, hi = np.min(params, 0), np.max(params, 0)
    assert -0.2 <= lo[0] < -0.15 and 0.15 < hi[0] <= 0.2 and 0.8 <= lo[1] and hi[1] <= 1.2
    np.testing.assert_array_equal(np.asarray(params)[:, 2:], [[1.0, 0.0]] * 500)


def test_write_preview(tmp_path):
    records = _marker_images(tmp_path, 5)
    path = write_preview(records, SPEC, GEOM, tmp_path / "out", n=4, seed=0)
    grid = cv2.imread(str(path))
    assert grid.shape == (64 * 2 + 2, 64 * 2 + 2, 3)
    assert (grid[64:66, :] == 255).all() and grid[:64, :64].max() > 0


def test_coco_mini_keypoints_follow_affine():
    ann = DATA / "coco_mini" / "annotations" / "person_keypoints_train2017.json"
    if not ann.exists():
        pytest.skip(f"shared data not available: {ann}")
    data = json.loads(ann.read_text())
    files = {im["id"]: im["file_name"] for im in data["images"]}
    records = [
        InstanceRecord(str(ann.parents[1] / "train2017" / files[a["image_id"]]), tuple(a["bbox"]),
                       np.array(a["keypoints"], np.float32).reshape(17, 3), a["image_id"], a["id"])
        for a in sorted(data["annotations"], key=lambda a: a["image_id"])
        if a["num_keypoints"] > 0 and not a["iscrowd"]
    ][:24]  # fmt: skip
    spec = KeypointSpec.coco17()
    ds = build_dataset(records, spec, PipelineConfig(), 8, True, seed=0, with_meta=True)
    images, kps, affines, index = _collect(ds)
    assert images.shape == (24, 256, 192, 3) and images.std() > 10
    for kp, m, i in zip(kps, affines, index, strict=True):
        src = np.asarray(records[i].keypoints)
        if np.linalg.det(m[:, :2]) < 0:
            src = src[list(spec.flip_index)]
        expected = np.asarray(codec.transform_points(src[:, :2], m))
        lab = kp[:, 2] > 0
        assert lab.any()
        np.testing.assert_allclose(kp[lab, :2], expected[lab], atol=1e-3)
        np.testing.assert_array_equal(kp[lab, 2], src[lab, 2])
