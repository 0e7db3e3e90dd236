"""The synthetic two-pin dataset: geometry of the labels, determinism and the cache."""

from __future__ import annotations

import json
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from kpnet.data.coco import load_coco_records
from kpnet.data.synthetic import ensure_synthetic_pins, pin_spec, render_pins


def test_pin_spec_single_and_two_channel():
    one, two = pin_spec(True), pin_spec(False)
    assert one.names == two.names == ("pin_left", "pin_right")
    assert one.channel_map == (0, 0) and one.num_channels == 1 and one.shares_channels
    assert two.num_channels == 2 and two.flip_index == (1, 0)
    assert one.sigmas is not None and len(one.sigmas) == 2


@pytest.mark.parametrize("seed", range(8))
def test_render_labels_are_the_pin_tips(seed):
    s = render_pins(np.random.default_rng(seed), (128, 128))
    assert s.image.shape == (128, 128, 3) and s.image.dtype == np.uint8
    tips = s.keypoints[:, :2]
    assert (s.keypoints[:, 2] == 2).all()
    assert np.linalg.norm(tips[0] - tips[1]) >= 12.0
    x, y, w, h = s.box
    assert x >= 0 and y >= 0 and x + w <= 128 and y + h <= 128
    assert ((tips >= (x, y)) & (tips <= (x + w - 1, y + h - 1))).all()
    # The tip centre is on the pin; a few pixels further out along the pin it is not.
    centre = np.array([x + (w - 1) / 2, y + (h - 1) / 2])
    for tip in tips:
        assert s.pin_mask[int(round(tip[1])), int(round(tip[0]))] > 0.9
        away = tip + (tip - centre) / np.linalg.norm(tip - centre) * 5.0
        ax, ay = np.clip(np.round(away).astype(int), 0, 127)
        assert s.pin_mask[ay, ax] < 0.1
    # pin_left is left of pin_right in the part's frame: pins point "up", away from the body.
    up = (tips.mean(axis=0) - centre) / np.linalg.norm(tips.mean(axis=0) - centre)
    right = np.array([-up[1], up[0]])
    assert float(np.dot(tips[1] - tips[0], right)) > 0


def test_render_is_deterministic_and_varied():
    a = render_pins(np.random.default_rng([3, 0, 1]))
    b = render_pins(np.random.default_rng([3, 0, 1]))
    c = render_pins(np.random.default_rng([3, 0, 2]))
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.keypoints, b.keypoints)
    assert not np.array_equal(a.keypoints, c.keypoints)
    assert np.abs(a.image.astype(int) - c.image.astype(int)).mean() > 10


def test_render_scales_with_image_size():
    s = render_pins(np.random.default_rng(0), (192, 256))
    assert s.image.shape == (192, 256, 3)
    assert s.box[2] > 44 and s.box[0] + s.box[2] <= 256 and s.box[1] + s.box[3] <= 192


def test_ensure_synthetic_pins_writes_coco_and_caches(tmp_path):
    start = time.perf_counter()
    paths = ensure_synthetic_pins(tmp_path, num_train=24, num_val=8, image_size=(96, 128), seed=1)
    elapsed = time.perf_counter() - start
    assert elapsed < 10.0  # ~600 images must take well under 30 s
    spec, train = load_coco_records(*paths["train"], spec=pin_spec(True))
    _, val = load_coco_records(*paths["val"], spec=pin_spec(True))
    assert len(train) == 24 and len(val) == 8
    assert train[0].image_size == (96, 128)
    image = cv2.imread(train[0].image_path)
    assert image.shape == (96, 128, 3)
    # The json's labels are those of the renderer (image i uses default_rng([seed, split, i])).
    sample = render_pins(np.random.default_rng([1, 1, 3]), (96, 128))
    np.testing.assert_allclose(val[3].keypoints, sample.keypoints, atol=1e-3)
    # Derived spec from the json category: names, skeleton and the left/right flip pair.
    derived, _ = load_coco_records(*paths["train"])
    assert derived.names == spec.names and derived.flip_pairs == ((0, 1),)
    # Second call: cached (nothing rewritten); another parameter: a new dataset.
    ann = Path(paths["train"][0])
    mtime = ann.stat().st_mtime_ns
    assert ensure_synthetic_pins(tmp_path, 24, 8, (96, 128), seed=1) == paths
    assert ann.stat().st_mtime_ns == mtime
    other = ensure_synthetic_pins(tmp_path, 24, 8, (96, 128), seed=2)
    assert other["train"][0] != paths["train"][0]
    a, b = json.loads(ann.read_text()), json.loads(Path(other["train"][0]).read_text())
    assert a["annotations"][0]["keypoints"] != b["annotations"][0]["keypoints"]
    assert not list(tmp_path.glob(".pins_*"))  # no temporary folders left behind


def test_ensure_synthetic_pins_is_reproducible(tmp_path):
    a = ensure_synthetic_pins(tmp_path / "a", num_train=3, num_val=2, seed=5)
    b = ensure_synthetic_pins(tmp_path / "b", num_train=3, num_val=2, seed=5)
    for split in ("train", "val"):
        assert Path(a[split][0]).read_text() == Path(b[split][0]).read_text()
        first = Path(a[split][1]) / "000000.jpg"
        assert first.read_bytes() == (Path(b[split][1]) / "000000.jpg").read_bytes()
