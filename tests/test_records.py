"""RecordTable (records as columns) and the COCO loader's array path."""

from __future__ import annotations

import json
import os
from pathlib import Path

import cv2
import numpy as np
import pytest

from kpnet import fs
from kpnet.codec import Codec
from kpnet.data import coco, columns
from kpnet.data import pipeline as pl
from kpnet.data.coco import load_coco_records
from kpnet.data.pipeline import PipelineConfig, build_dataset
from kpnet.data.records import DataError, InstanceRecord, RecordTable
from kpnet.data.sources import split_by_image
from kpnet.spec import KeypointSpec

SPEC = KeypointSpec(names=("tip_l", "tip_r"), flip_pairs=((0, 1),))
EVAL = PipelineConfig(codec=Codec((32, 32)))


def _coco(tmp_path: Path, n_images: int, anns: list[dict] | None = None, **image) -> Path:
    """A 2-keypoint COCO json over ``n_images`` 40x50 JPEGs; by default 2 plain annotations
    per image; ``image`` entries are added to every image entry."""
    folder = tmp_path / "images"
    folder.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(folder / "000.jpg"), np.full((40, 50, 3), 128, np.uint8))
    for i in range(1, n_images):
        os.link(folder / "000.jpg", folder / f"{i:03d}.jpg")
    images = [{"id": i, "file_name": f"{i:03d}.jpg", "height": 40, "width": 50, **image}
              for i in range(n_images)]  # fmt: skip
    if anns is None:
        anns = [{"id": 10 * i + j, "image_id": i, "category_id": 1, "iscrowd": 0,
                 "bbox": [5 + j, 5, 20, 20], "keypoints": [10 + j, 10, 2, 20, 20, 1]}
                for i in range(n_images) for j in range(2)]  # fmt: skip
    cat = {"id": 1, "name": "part", "keypoints": list(SPEC.names)}
    path = tmp_path / "ann.json"
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": [cat]}))
    return path


def _fields(records) -> list[tuple]:
    return [(r.image_path, r.box, r.keypoints.tolist(), r.image_id, r.record_id, r.score,
             r.image_size, r.source) for r in records]  # fmt: skip


def _as_dicts(monkeypatch) -> None:
    """Make the loader take every annotation as a dict, checked one by one (the old path)."""
    monkeypatch.setattr(coco._Annotations, "hook", lambda self, obj: obj)


# --------------------------------------------------------------------------- RecordTable
def test_table_is_a_sequence_of_records_that_keeps_what_it_hands_out():
    records = [InstanceRecord(f"{i % 2}.jpg", (i, 0.0, 4.0, 4.0),
                              np.full((2, 3), i, np.float32), image_id=i % 2, record_id=7 + i,
                              score=0.5, image_size=(8, 9) if i else None, source=f"s{i}")
               for i in range(3)]  # fmt: skip
    table = RecordTable.from_records(records)
    assert len(table) == 3 and len(table.image_paths) == 2
    assert _fields(table) == _fields(records)
    tail = table[1:]
    assert table[-1] is table[2] and tail[0] is table[1] and tail[1] is table[2]
    with pytest.raises(IndexError):
        table[3]
    table[0].box = (1.0, 1.0, 2.0, 2.0)  # a record handed out is the record
    assert table[0].box == (1.0, 1.0, 2.0, 2.0) and [i for i, _ in table.given()] == [0, 1, 2]
    sub = table.take([2, 0])
    assert sub[0] is table[2] and sub[1] is table[0] and [r.record_id for r in sub] == [9, 7]
    with pytest.raises(DataError, match="record_id 36893488147419103232 does not fit"):
        RecordTable.from_records([InstanceRecord("a.jpg", (0, 0, 1, 1), np.zeros((2, 3)),
                                                 record_id=2**65)])  # fmt: skip


def test_pipeline_reads_a_table_and_the_records_changed_through_it(tmp_path):
    _, table = load_coco_records(_coco(tmp_path, 6), tmp_path / "images", spec=SPEC)
    assert isinstance(table, RecordTable)

    def batches(records):
        ds = build_dataset(records, SPEC, EVAL, 4, training=False, with_meta=True)
        return [np.concatenate([np.asarray(b[0]) for b in ds]),
                np.concatenate([np.asarray(b[2]["index"]) for b in ds])]  # fmt: skip

    as_list = list(table)  # the same record objects
    as_list[3].keypoints = as_list[3].keypoints + 2.0
    as_list[5].image_path = as_list[0].image_path
    for a, b in zip(batches(table), batches(as_list), strict=True):
        np.testing.assert_array_equal(a, b)
    table[4].keypoints = np.zeros((3, 3), np.float32)
    with pytest.raises(DataError, match=r"record 20 of image .*002.jpg .*must be finite float"):
        build_dataset(table, SPEC, EVAL, 4, training=False)


def test_split_by_image_splits_a_table_like_a_list(tmp_path):
    _, table = load_coco_records(_coco(tmp_path, 10), tmp_path / "images", spec=SPEC)
    table[0].image_path = table[19].image_path  # moved to the last image: follows it
    train, val = split_by_image(table, 0.3, seed=1)
    ref_train, ref_val = split_by_image(list(table), 0.3, seed=1)
    assert isinstance(train, RecordTable) and isinstance(val, RecordTable)
    assert _fields(train) == _fields(ref_train) and _fields(val) == _fields(ref_val)
    assert any(r is table[0] for r in train) and not any(r is table[0] for r in val)


# --------------------------------------------------------------------------- COCO arrays
def test_coco_array_path_matches_one_by_one_checks(tmp_path, monkeypatch):
    """Plain and unusual annotations mixed: the same records, counts, messages and first
    error as when every annotation is checked one by one."""
    plain = {"image_id": 1, "category_id": 1, "iscrowd": 0, "bbox": [5, 5, 20, 20],
             "keypoints": [10, 10, 2, 20, 20, 2]}  # fmt: skip
    odd = [
        {"keypoints": [10, float("nan"), 2, 20, 20, 2]}, {"keypoints": [1, 1, 3, 2, 2, 2]},
        {"keypoints": [1, 2, 2]}, {"iscrowd": 1}, {"category_id": 2}, {"image_id": 99},
        {"keypoints": [0, 0, 0, 0, 0, 0]}, {"bbox": [5, 5, 0, 20]}, {"bbox": None},
        {"bbox": [1, 2, 3]}, {"keypoints": [[10, 10, 2], [20, 20, 2]]}, {"id": 5.0},
        {"keypoints": ["10", "10", "2", "20", "20", "2"]}, {"image_id": 3}, {"iscrowd": "no"},
    ]  # fmt: skip
    anns = []
    for i in range(60):
        anns.append({**plain, "id": i, "image_id": i % 5})
        if i < len(odd):
            anns.append({**plain, "id": 100 + i, **odd[i]})
    path = _coco(tmp_path, 5, anns)
    (tmp_path / "images" / "003.jpg").unlink()
    images = tmp_path / "images"
    fast = [load_coco_records(path, images, spec=SPEC, on_error="skip")[1]]
    with pytest.raises(DataError) as fast_error:
        load_coco_records(path, images, spec=SPEC)
    _as_dicts(monkeypatch)
    slow = [load_coco_records(path, images, spec=SPEC, on_error="skip")[1]]
    with pytest.raises(DataError) as slow_error:
        load_coco_records(path, images, spec=SPEC)
    assert str(fast_error.value) == str(slow_error.value)
    assert "annotation id 100" in str(fast_error.value)  # the first bad one, in file order
    (a,), (b,) = fast, slow
    assert _fields(a) == _fields(b) and len(a) > 40
    assert a.report.skipped == b.report.skipped and a.report.examples == b.report.examples
    assert set(a.report.skipped) >= {"nan", "visibility", "keypoint_count", "crowd",
                                     "other_category", "unknown_image", "missing_image",
                                     "no_keypoints", "zero_area"}  # fmt: skip


def test_coco_json_is_parsed_once_and_odd_files_as_before(tmp_path, monkeypatch):
    path = _coco(tmp_path, 4)
    calls = []
    parse = coco._parse
    monkeypatch.setattr(coco, "_parse", lambda *a, **k: calls.append(a[1]) or parse(*a, **k))
    _, records = load_coco_records(path, tmp_path / "images", spec=SPEC)
    assert calls == [path] and len(records) == 8
    data = json.loads(path.read_text())  # an image entry with an image_id: parsed again
    data["images"][0]["image_id"] = 0
    path.write_text(json.dumps(data))
    _, again = load_coco_records(path, tmp_path / "images", spec=SPEC)
    assert _fields(again) == _fields(records) and len(calls) == 3
    del data["annotations"][2]["category_id"]  # pycocotools' error, as before
    for image_id in (0, None):  # parsed again, and not
        if image_id is None:
            del data["images"][0]["image_id"]
        path.write_text(json.dumps(data))
        with pytest.raises(DataError, match=r"malformed COCO json \(missing key 'category_id'"):
            load_coco_records(path, tmp_path / "images", spec=SPEC)


def test_coco_sizes_from_the_json_and_one_listing_per_folder(tmp_path, monkeypatch):
    """A folder holding many of the images is listed once: no image file is opened or
    probed unless the listing lacks it; the pipeline takes the sizes from the json."""
    n = coco.LIST_FOLDER_FILES + 4
    path = _coco(tmp_path, n)
    folder = tmp_path / "images"
    (folder / "005.jpg").unlink()
    (folder / "005.jpg").mkdir()  # a folder is not an image file
    (folder / "007.jpg").unlink()
    (folder / "007.jpg").symlink_to(folder / "000.jpg")  # a link to one is
    asked = []
    isfile = fs.isfile
    monkeypatch.setattr(fs, "isfile", lambda p: asked.append(os.fspath(p)) or isfile(p))
    monkeypatch.setattr(columns, "_inspect", lambda p: pytest.fail(f"opened {p}"))
    monkeypatch.setattr(columns, "CHECK_IMAGES_LIMIT", 10)
    with pytest.raises(DataError, match=r"annotation id 50 \(image .*005.jpg\): image file not"):
        load_coco_records(path, folder, spec=SPEC)
    asked.clear()
    _, records = load_coco_records(path, folder, spec=SPEC, on_error="skip")
    assert asked == [str(path), str(folder / "005.jpg")]  # the json, and the one not listed
    assert records.report.skipped == {"missing_image": 2} and len(records) == 2 * (n - 1)
    ds = build_dataset(records, SPEC, EVAL, 64, training=False, with_meta=True)
    hw = np.concatenate([np.asarray(m["image_hw"]) for _, _, m in ds])
    assert (hw == [40, 50]).all() and len(hw) == len(records)


# --------------------------------------------------------------------------- chunks
def test_epochs_in_chunks_crop_the_same_and_cover_every_record(tmp_path, monkeypatch):
    _, table = load_coco_records(_coco(tmp_path, 9), tmp_path / "images", spec=SPEC)
    train = PipelineConfig(codec=Codec((32, 32)), shuffle_buffer=1)

    def run(training: bool, **kw) -> list[np.ndarray]:
        ds = build_dataset(table, SPEC, train, 4, training=training, with_meta=True, seed=2,
                           drop_remainder=False, **kw)  # fmt: skip
        out = [(im, kp, m["affine"], m["index"]) for im, kp, m in ds]
        return [np.concatenate([np.asarray(t) for t in part]) for part in zip(*out, strict=True)]

    whole, whole_train = run(False), run(True)
    monkeypatch.setattr(pl, "CHUNK_IMAGES", 2)  # 9 images: 5 chunks
    chunked = run(False)
    for a, b in zip(whole, chunked, strict=True):  # evaluation draws nothing
        np.testing.assert_array_equal(a, b)
    first, again = run(True), run(True)
    assert sorted(first[3].tolist()) == list(range(len(table)))  # each record once
    for a, b in zip(first, again, strict=True):  # reproducible
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(first[2], whole_train[2])  # draws keyed by chunk too
