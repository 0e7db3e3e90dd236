"""Data at scale: TFRecord sets (write, index, stream, shard per worker), ``ram://`` paths
(TensorFlow's in-memory filesystem stands in for gs:// so the URL code path runs here), and
start-up that reads no image file when the annotations give the sizes."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import cv2
import keras
import numpy as np
import pytest
import tensorflow as tf
from click.testing import CliRunner

from kpnet import fs
from kpnet.cli import main
from kpnet.codec import Codec
from kpnet.data import columns
from kpnet.data.augment import AugmentConfig
from kpnet.data.coco import load_coco_records
from kpnet.data.pipeline import PipelineConfig, build_dataset
from kpnet.data.records import DataError, InstanceRecord
from kpnet.data.tfrecord import load_tfrecord_set, read_records, write_tfrecords
from kpnet.spec import KeypointSpec

REPO = Path(__file__).resolve().parents[1]
SPEC = KeypointSpec(names=("left", "right", "tip"), flip_pairs=((0, 1),), skeleton=((0, 2),))
FIXED = AugmentConfig(scale=(1.0, 1.0), rotation=0.0, rotation_prob=0.0, flip=False,
                      brightness=0.0, contrast=0.0, saturation=0.0)  # fmt: skip
NO_AUG = PipelineConfig(codec=Codec((64, 64)), augment=FIXED, shuffle_buffer=8)


def _ram(name: str) -> str:
    return f"ram://kpnet-test-{uuid.uuid4().hex[:8]}/{name}"


def _images(folder: str, n: int, per_image: int = 1) -> list[InstanceRecord]:
    """JPEG (even) and PNG (odd) images with a 3x3 R, G, B marker at each keypoint; written
    through :mod:`kpnet.fs`, so ``folder`` may be a ``ram://`` URL."""
    rng = np.random.default_rng(0)
    records = []
    fs.makedirs(folder)
    for i in range(n):
        img = np.zeros((90, 120, 3), np.uint8)
        ext = ".jpg" if i % 2 == 0 else ".png"
        path = fs.join(folder, f"m{i}{ext}")
        for _ in range(per_image):
            kp = np.zeros((3, 3), np.float32)
            x0, y0 = rng.integers(25, 45), rng.integers(20, 35)
            for k in range(3):
                x, y = x0 + rng.integers(0, 45), y0 + rng.integers(0, 35)
                img[y - 1 : y + 2, x - 1 : x + 2, k] = 255
                kp[k] = (x, y, 2)
            box = (x0 - 5.0, y0 - 5.0, 55.0, 45.0)
            records.append(InstanceRecord(path, box, kp, image_id=i, record_id=len(records),
                                          image_size=(90, 120)))  # fmt: skip
        params = [cv2.IMWRITE_JPEG_QUALITY, 98] if ext == ".jpg" else []
        ok, data = cv2.imencode(ext, img[..., ::-1], params)
        fs.write_atomic(path, data.tobytes())
    return records


def _batches(ds) -> list[list[np.ndarray]]:
    out = []
    for images, keypoints, meta in ds:
        out.append([images.numpy(), keypoints.numpy(), meta["affine"].numpy(),
                    meta["index"].numpy(), meta["image_hw"].numpy()])  # fmt: skip
    return out


def _assert_same(a, b) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        for u, v in zip(x, y, strict=True):
            np.testing.assert_array_equal(u, v)


def test_round_trip_on_ram_matches_the_folder_pipeline(tmp_path):
    records = _images(str(tmp_path), 10, per_image=2)
    out = _ram("set")
    tset = write_tfrecords(records, SPEC, out, shards=3)
    index = json.loads(fs.read_text(fs.join(out, "index.json")))
    assert index["num_records"] == 20 and index["num_images"] == 10
    counts = [s["images"] for s in index["shards"]]  # contiguous runs, balanced by bytes
    assert sum(counts) == 10 and min(counts) > 0 and len(counts) == 3
    assert index["image_sizes"] == [[90, 120, 10]] and index["spec"]["names"] == list(SPEC.names)
    assert sorted(fs.listdir(out)) == ["index.json", *(f"shard-0000{i}-of-00003.tfrecord"
                                                       for i in range(3))]  # fmt: skip
    tset = load_tfrecord_set(out)
    assert len(tset) == 20 and tset.spec == SPEC
    for training in (False, True):  # evaluation crops; training crops without augmentation
        kw = dict(training=training, shuffle=False, with_meta=True, drop_remainder=False)
        folder = _batches(build_dataset(records, SPEC, NO_AUG, 6, **kw))
        streamed = _batches(build_dataset(tset, SPEC, NO_AUG, 6, **kw))
        _assert_same(folder, streamed)
    # a training step on the streamed batch equals one on the folder batch
    batch = [next(iter(build_dataset(r, SPEC, NO_AUG, 8, training=True, shuffle=False)))
             for r in (records, tset)]  # fmt: skip
    losses = []
    for images, keypoints in batch:
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.Input((64, 64, 3)), keras.layers.Rescaling(1 / 255),
                                  keras.layers.Conv2D(2, 3, strides=8),
                                  keras.layers.GlobalAveragePooling2D(),
                                  keras.layers.Dense(9), keras.layers.Reshape((3, 3))])  # fmt: skip
        model.compile(keras.optimizers.SGD(0.1), "mse")
        losses.append(model.train_on_batch(images, keypoints))
    assert losses[0] == losses[1]
    # validation records come back with their images in memory (ram://)
    back = read_records(tset)
    assert [r.record_id for r in back] == [r.record_id for r in records]
    np.testing.assert_array_equal(back[3].keypoints, records[3].keypoints)
    assert back[0].image_path.startswith("ram://") and back[0].image_size == (90, 120)
    folder = _batches(build_dataset(records, SPEC, NO_AUG, 6, training=False, with_meta=True))
    _assert_same(folder, _batches(build_dataset(back, SPEC, NO_AUG, 6, training=False,
                                                with_meta=True)))  # fmt: skip


def test_streamed_augmented_training_is_seeded_and_follows_the_markers(tmp_path):
    records = _images(str(tmp_path), 12)
    tset = write_tfrecords(records, SPEC, str(tmp_path / "tfr"), shards=4)
    augment = AugmentConfig(rotation_prob=1.0, brightness=0.0, contrast=0.0, saturation=0.0)
    config = PipelineConfig(codec=Codec((64, 64)), augment=augment, shuffle_buffer=1)

    def take(seed):
        ds = build_dataset(tset, SPEC, config, 4, training=True, seed=seed, repeat=True,
                           with_meta=True)  # fmt: skip
        return _batches(ds.take(6))  # two epochs

    first, again, other = take(1), take(1), take(2)
    _assert_same(first, again)
    assert not np.array_equal(first[0][0], other[0][0])
    index = np.concatenate([b[3] for b in first])
    assert sorted(index[:12]) == sorted(index[12:]) == list(range(12))  # epoch: all once
    assert not np.array_equal(index[:12], index[12:])  # in another order
    flips = rotations = 0
    for images, kps, affines, _, hw in first:
        assert (hw == (90, 120)).all()
        for im, kp, m in zip(images, kps, affines, strict=True):
            flipped = np.linalg.det(m[:, :2]) < 0
            flips += flipped
            rotations += abs(m[0, 1]) > 0.05
            for j, (x, y, v) in enumerate(kp):
                if v > 0:  # the marker of keypoint j (swapped by a flip) is under it
                    c = [1, 0, 2][j] if flipped else j
                    px = im[int(round(y)), int(round(x))]  # input-crop pixels
                    assert px[c] > 60 and px[c] == px.max(), (j, px)
    assert 0 < flips < 24 and rotations > 0


def test_each_worker_reads_its_own_shards(tmp_path):
    records = _images(str(tmp_path), 8)
    tset = write_tfrecords(records, SPEC, str(tmp_path / "tfr"), shards=3)
    seen = []
    for pid in range(2):
        ctx = tf.distribute.InputContext(num_input_pipelines=2, input_pipeline_id=pid,
                                         num_replicas_in_sync=2)  # fmt: skip
        ds = build_dataset(tset, SPEC, NO_AUG, 4, training=False, with_meta=True,
                           input_context=ctx)  # fmt: skip
        batches = _batches(ds)
        assert all(len(b[0]) <= 2 for b in batches)  # per-replica batch
        seen.append(sorted(np.concatenate([b[3] for b in batches]).tolist()))
    runs = np.split(np.arange(8), np.cumsum(tset.shard_images)[:-1])  # records of each shard
    assert seen == [sorted([*runs[0], *runs[2]]), runs[1].tolist()]  # whole files each
    ctx = tf.distribute.InputContext(num_input_pipelines=4, input_pipeline_id=0)
    with pytest.raises(DataError, match="3 TFRecord shard.*--shards 4 or more"):
        build_dataset(tset, SPEC, NO_AUG, 4, training=True, input_context=ctx)


def test_coco_json_and_images_on_ram(tmp_path):
    root = _ram("coco")
    records = _images(fs.join(root, "images"), 4)
    coco = {
        "images": [{"id": i, "file_name": f"m{i}{'.jpg' if i % 2 == 0 else '.png'}",
                    "height": 90, "width": 120} for i in range(4)],
        "annotations": [{"id": 10 + i, "image_id": i, "category_id": 1, "iscrowd": 0,
                         "bbox": list(r.box), "keypoints": r.keypoints.reshape(-1).tolist()}
                        for i, r in enumerate(records)],
        "categories": [{"id": 1, "name": "part", "keypoints": list(SPEC.names)}],
    }  # fmt: skip
    fs.write_atomic(fs.join(root, "ann.json"), json.dumps(coco))
    spec, loaded = load_coco_records(fs.join(root, "ann.json"), fs.join(root, "images"),
                                     spec=SPEC)  # fmt: skip
    assert [r.image_path for r in loaded] == [r.image_path for r in records]
    assert loaded[0].image_path.startswith("ram://kpnet-test-")  # not ram:/ (pathlib)
    kw = dict(training=False, with_meta=True)
    _assert_same(_batches(build_dataset(records, SPEC, NO_AUG, 4, **kw)),
                 _batches(build_dataset(loaded, SPEC, NO_AUG, 4, **kw)))  # fmt: skip
    missing = {**coco, "images": [*coco["images"], {"id": 9, "file_name": "gone.jpg"}]}
    missing["annotations"] = [*coco["annotations"], {**coco["annotations"][0], "id": 99,
                                                     "image_id": 9}]  # fmt: skip
    fs.write_atomic(fs.join(root, "bad.json"), json.dumps(missing))
    with pytest.raises(DataError, match=r"annotation id 99 \(image ram://.*gone.jpg\): image"):
        load_coco_records(fs.join(root, "bad.json"), fs.join(root, "images"), spec=SPEC)


def test_large_sets_take_sizes_from_the_annotations(tmp_path, monkeypatch):
    records = _images(str(tmp_path), 6)

    def no_open(path):
        raise AssertionError(f"opened {path}")

    monkeypatch.setattr(columns, "_inspect", no_open)
    monkeypatch.setattr(columns, "CHECK_IMAGES_LIMIT", 5)  # 6 files: a "large" set
    kw = dict(training=False, with_meta=True)
    streamed = _batches(build_dataset(records, SPEC, NO_AUG, 4, **kw))
    monkeypatch.undo()
    _assert_same(streamed, _batches(build_dataset(records, SPEC, NO_AUG, 4, **kw)))


def test_bad_sets_get_one_line_errors(tmp_path):
    records = _images(str(tmp_path), 4)
    out = str(tmp_path / "tfr")
    tset = write_tfrecords(records, SPEC, out, shards=2)
    with pytest.raises(DataError, match="already holds a TFRecord set"):
        write_tfrecords(records, SPEC, out)
    with pytest.raises(DataError, match="holds 3 keypoints per instance, the spec has 2"):
        build_dataset(tset, KeypointSpec(names=("a", "b")), NO_AUG, 2, training=True)
    with pytest.raises(DataError, match="no index.json, so not a kpnet TFRecord set"):
        load_tfrecord_set(str(tmp_path))
    Path(tset.files[1]).unlink()
    with pytest.raises(DataError, match="shard file shard-00001-of-00002.tfrecord .* missing"):
        load_tfrecord_set(out)
    Path(records[1].image_path).write_bytes(b"not an image")
    with pytest.raises(DataError, match=r"m1.png.*not a JPEG or PNG"):
        write_tfrecords(records, SPEC, str(tmp_path / "other"))
    skipped = write_tfrecords(records, SPEC, str(tmp_path / "other"), on_error="skip")
    assert len(skipped) == 3 and json.loads(fs.read_text(fs.join(skipped.root, "index.json")))[
        "skipped_records"] == 1  # fmt: skip


def test_a_failed_write_leaves_no_temporary_shard(tmp_path, monkeypatch):
    """An error while a shard is written (disk full, an image gone) leaves no ``.tmp`` file
    and no index, so the folder is not taken for a set."""
    records = _images(str(tmp_path / "images"), 4)
    read = fs.read_bytes
    calls = []

    def fail_on_the_third(path):
        calls.append(path)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        return read(path)

    monkeypatch.setattr(fs, "read_bytes", fail_on_the_third)
    out = tmp_path / "tfr"
    with pytest.raises(OSError, match="No space left"):
        write_tfrecords(records, SPEC, str(out), shards=2)
    assert sorted(p.name for p in out.iterdir()) == ["shard-00000-of-00002.tfrecord"]


@pytest.mark.slow  # about 40 s on 2 cores
def test_cli_convert_to_tfrecord_and_fit_from_it(tmp_path):
    from kpnet.data.synthetic import ensure_synthetic_pins

    paths = ensure_synthetic_pins(tmp_path / "pins", 16, 8, (64, 64), 0)
    runner = CliRunner()
    for split in ("train", "val"):
        ann, images = paths[split]
        result = runner.invoke(main, ["data", "convert", ann, "--images", images, "--to",
                                      "tfrecord", "-o", str(tmp_path / split), "--shards", "2"])
        assert result.exit_code == 0, result.output
    assert "wrote 16 instances in 16 images to 2 TFRecord file(s)" in result.output.replace(
        "8 instances in 8", "16 instances in 16")  # fmt: skip
    again = runner.invoke(main, ["data", "convert", ann, "--to", "tfrecord", "--images", images,
                                 "-o", str(tmp_path / "val")])  # fmt: skip
    assert again.exit_code == 1 and "already holds a TFRecord set" in again.output
    assert "Traceback" not in again.output
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "data: {source: tfrecord, tfrecord: {train: train, val: val}}\n"
        "model: {backbone: tiny, input_size: [64, 64], pyramid_channels: 16}\n"
        "train: {batch_size: 8, epochs: 1, steps_per_epoch: 2, verbose: 0, lr_schedule: "
        "constant, warmup_epochs: 0, precise_bn_batches: 1}\n"
        "evaluation: {flip_test: false}\nexport: {saved_model: false}\n"
    )
    result = runner.invoke(main, ["fit", str(recipe), "-o", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    assert "16 training / 8 validation instances" in result.output
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["overall"]["count"] > 0 and np.isfinite(metrics["overall"]["mean"])


@pytest.mark.slow  # 1-6 min on 2 shared cores: the docs/scaling.md run, two local workers
def test_multi_worker_fit_from_tfrecords(tmp_path):
    """docs/scaling.md end to end: convert, then one ``python -m kpnet.cli fit`` per worker with
    its TF_CONFIG; each worker streams its own shard, the chief writes the run folder."""
    import os
    import socket
    import subprocess
    import sys

    from kpnet.data.synthetic import ensure_synthetic_pins

    paths = ensure_synthetic_pins(tmp_path / "pins", 16, 8, (64, 64), 0)
    for split in ("train", "val"):
        ann, images = paths[split]
        result = CliRunner().invoke(main, ["data", "convert", ann, "--images", images, "--to",
                                           "tfrecord", "-o", str(tmp_path / split),
                                           "--shards", "2"])  # fmt: skip
        assert result.exit_code == 0, result.output
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"data: {{source: tfrecord, tfrecord: {{train: {tmp_path / 'train'}, "
        f"val: {tmp_path / 'val'}}}}}\n"
        "model: {backbone: tiny, input_size: [64, 64], pyramid_channels: 16}\n"
        "train: {batch_size: 8, epochs: 1, steps_per_epoch: 2, verbose: 0, distribute: auto}\n"
        "evaluation: {flip_test: false}\n"
    )
    socks = [socket.socket() for _ in range(2)]
    for s in socks:
        s.bind(("localhost", 0))
    cluster = {"worker": [f"localhost:{s.getsockname()[1]}" for s in socks]}
    for s in socks:
        s.close()
    procs = []
    for index in range(2):
        tf_config = json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}})
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "kpnet.cli", "fit", str(recipe), "-o", str(tmp_path / "run")],
            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={**os.environ, "TF_CONFIG": tf_config, "TF_CPP_MIN_LOG_LEVEL": "2"},
        ))  # fmt: skip
    try:
        outputs = [p.communicate(timeout=500) for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, (stdout, stderr) in zip(procs, outputs, strict=True):
        assert p.returncode == 0, stderr[-3000:]
        assert "16 training / 8 validation instances" in stdout
        assert "2 replica(s), global batch 8" in stdout
    run = tmp_path / "run"
    for name in ("last.keras", "history.csv", "metrics.json", "backup"):
        assert (run / name).exists(), name
    assert (run / ".workers" / "worker-1" / "backup" / "training_metadata.json").is_file()


def test_recipe_keeps_urls_and_checks_them(tmp_path):
    from kpnet.recipe import RecipeError, load_recipe

    root = _ram("recipe")
    fs.write_atomic(fs.join(root, "train", "index.json"), "{}")
    path = tmp_path / "r.yaml"
    path.write_text(
        "data: {source: tfrecord, tfrecord: {train: " + fs.join(root, "train") + ", val: v}}\n"
        "model: {init_from: " + fs.join(root, "best.keras") + "}\n"
    )
    recipe = load_recipe(path)
    assert recipe.data.tfrecord.train == fs.join(root, "train")  # not ram:/...
    assert recipe.data.tfrecord.val == str(tmp_path / "v")  # local: relative to the recipe
    assert recipe.model.init_from == fs.join(root, "best.keras")
    with pytest.raises(RecipeError) as err:
        recipe.check_files()
    assert str(err.value).splitlines() == [
        f"{path}: data.tfrecord.val: file not found: {tmp_path / 'v'}",
        f"{path}: model.init_from: file not found: {fs.join(root, 'best.keras')}",
    ]  # the ram:// training set exists
    coco = load_recipe(path, ["data.source=coco", "data.tfrecord=null",
                              f"data.coco.train_annotations={root}/a.json",
                              "data.coco.train_images=gs://bucket/images"])  # fmt: skip
    assert coco.data.coco.train_images == "gs://bucket/images"
    assert coco.data.coco.train_annotations == f"{root}/a.json"
