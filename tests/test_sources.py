"""COCO and DeepLabCut sources -> instance records, bad-record handling, data checks."""

from __future__ import annotations

import contextlib
import csv
import io
import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from kpnet.data.check import check_records, format_check
from kpnet.data.coco import guess_flip_pairs, load_coco_records, spec_from_category
from kpnet.data.dlc import dlc_to_coco, load_dlc_records
from kpnet.data.records import DataError
from kpnet.spec import COCO17_NAMES, KeypointSpec

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
COCO_MINI = DATA / "coco_mini"
DLC = DATA / "dlc_reaching"


def _need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"shared data not available: {path}")
    return path


# --------------------------------------------------------------------------- tiny COCO sets
def _write_image(path: Path, h: int = 40, w: int = 50) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), np.full((h, w, 3), 128, np.uint8))


def _tiny_coco(tmp_path: Path, anns: list[dict], n_images: int = 2) -> tuple[Path, Path]:
    """A 2-keypoint COCO json over n 40x50 images; anns get ids and defaults filled in."""
    images = [
        {"id": i + 1, "file_name": f"{i:03d}.jpg", "height": 40, "width": 50}
        for i in range(n_images)
    ]
    for img in images:
        _write_image(tmp_path / "images" / img["file_name"])
    full = []
    for i, ann in enumerate(anns):
        base = {"id": 100 + i, "image_id": 1, "category_id": 1, "iscrowd": 0,
                "bbox": [5, 5, 20, 20], "keypoints": [10, 10, 2, 20, 20, 2]}  # fmt: skip
        full.append({**base, **ann})
    cat = {"id": 1, "name": "part", "keypoints": ["tip_l", "tip_r"], "skeleton": [[1, 2]]}
    path = tmp_path / "ann.json"
    path.write_text(json.dumps({"images": images, "annotations": full, "categories": [cat]}))
    return path, tmp_path / "images"


# --------------------------------------------------------------------------- COCO
@pytest.mark.parametrize("split,expected", [("train", 86), ("val", 68)])
def test_coco_mini_counts_match_pycocotools(split, expected):
    from pycocotools.coco import COCO

    ann = _need(COCO_MINI / "annotations" / f"person_keypoints_{split}2017.json")
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(ann))
    reference = {
        a["id"] for a in coco.loadAnns(coco.getAnnIds()) if not a["iscrowd"] and a["num_keypoints"]
    }
    spec, records = load_coco_records(ann, COCO_MINI / f"{split}2017")
    assert len(records) == len(reference) == expected
    assert {r.record_id for r in records} == reference
    assert spec == KeypointSpec.coco17()
    assert records.report.kept == expected and records.report.skipped["crowd"] > 0
    first = coco.anns[records[0].record_id]
    np.testing.assert_array_equal(records[0].keypoints.reshape(-1), first["keypoints"])
    assert records[0].box == tuple(first["bbox"])
    img = coco.imgs[first["image_id"]]
    assert records[0].image_size == (img["height"], img["width"])
    assert Path(records[0].image_path).is_file()


def test_spec_from_category_converts_skeleton_and_guesses_flips():
    spec = spec_from_category({"name": "hand", "keypoints": ["wrist", "left_tip", "right_tip"],
                               "skeleton": [[1, 2], [1, 3]]})  # fmt: skip
    assert spec.skeleton == ((0, 1), (0, 2))
    assert spec.flip_pairs == ((1, 2),)
    assert guess_flip_pairs(["pin_left", "pin_right", "l_ear", "r_ear", "lid"]) == ((0, 1), (2, 3))
    assert spec_from_category({"name": "person", "keypoints": list(COCO17_NAMES)}) == \
        KeypointSpec.coco17()
    for name in ("car", "person"):  # a nameless person category is not silently COCO-17
        with pytest.raises(DataError, match="x.json: category .* no keypoint names.*data.spec"):
            spec_from_category({"name": name}, "x.json")


def test_coco_filters_crowd_and_unlabelled(tmp_path):
    ann, images = _tiny_coco(tmp_path, [{}, {"iscrowd": 1}, {"keypoints": [0, 0, 0, 0, 0, 0]}])
    spec, records = load_coco_records(ann, images)
    assert spec.names == ("tip_l", "tip_r") and spec.flip_pairs == ((0, 1),)
    assert [r.record_id for r in records] == [100]
    assert records.report.skipped == {"crowd": 1, "no_keypoints": 1}


@pytest.mark.parametrize(
    "bad,reason,match",
    [
        ({"image_id": 2}, "missing_image", "001.jpg"),
        ({"keypoints": [10, 10, 2]}, "keypoint_count", "3 keypoint values"),
        ({"keypoints": [10, float("nan"), 2, 20, 20, 2]}, "nan", "NaN"),
        ({"bbox": [5, 5, 0, 20]}, "zero_area", "zero-area"),
        ({"image_id": 9}, "unknown_image", "image id 9"),
    ],
)
def test_coco_bad_record_raises_or_is_counted(tmp_path, bad, reason, match):
    ann, images = _tiny_coco(tmp_path, [{}, bad])
    (images / "001.jpg").unlink()
    with pytest.raises(DataError, match=match) as err:
        load_coco_records(ann, images)
    assert "annotation id 101" in str(err.value) and str(ann) in str(err.value)
    _, records = load_coco_records(ann, images, on_error="skip")
    assert [r.record_id for r in records] == [100]
    assert records.report.skipped == {reason: 1}
    assert "annotation id 101" in records.report.examples[reason][0]


def test_coco_detection_boxes_give_unlabelled_test_records(tmp_path):
    ann, images = _tiny_coco(tmp_path, [{}])
    dets = [
        {"image_id": 1, "category_id": 1, "bbox": [1, 2, 30, 20], "score": 0.9},
        {"image_id": 2, "category_id": 1, "bbox": [3, 4, 10, 10], "score": 0.2},
        {"image_id": 2, "category_id": 3, "bbox": [3, 4, 10, 10], "score": 0.99},
    ]
    boxes = tmp_path / "dets.json"
    boxes.write_text(json.dumps(dets))
    _, records = load_coco_records(ann, images, boxes_file=boxes, score_threshold=0.5)
    assert len(records) == 1
    r = records[0]
    assert r.box == (1, 2, 30, 20) and r.score == pytest.approx(0.9) and r.num_labelled == 0
    assert r.image_path.endswith("000.jpg") and r.keypoints.shape == (2, 3)
    assert records.report.skipped == {"low_score": 1, "other_category": 1}
    boxes.write_text(json.dumps([{"image_id": 7, "bbox": [1, 1, 5, 5], "score": 1}]))
    with pytest.raises(DataError, match="detection #0.*image id 7"):
        load_coco_records(ann, images, boxes_file=boxes)


def test_coco_unreadable_files_are_named(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_coco_records(tmp_path / "nope.json", tmp_path)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(DataError, match="bad.json: not valid json"):
        load_coco_records(tmp_path / "bad.json", tmp_path)
    with pytest.raises(ValueError, match="on_error"):
        load_coco_records(tmp_path / "bad.json", tmp_path, on_error="ignore")


# --------------------------------------------------------------------------- DLC
def test_dlc_reaching_records_match_csv_cells():
    spec, records = load_dlc_records(_need(DLC))
    assert spec.names == ("Hand", "Finger1", "Tongue", "Joystick1", "Joystick2")
    assert spec.skeleton == ((0, 1), (3, 4))
    assert len(records) == 55 and records.report.kept == 55
    by_name = {Path(r.image_path).name: r for r in records}
    assert by_name["img005.png"].keypoints[2].tolist() == [0, 0, 0]  # empty Tongue cells
    np.testing.assert_allclose(by_name["img020.png"].keypoints[2], [586.5966352, 294.6546635, 2])
    np.testing.assert_allclose(by_name["img005.png"].keypoints[0], [185.2517350, 610.3622761, 2])
    assert by_name["img227.png"].keypoints[0, 2] == 0  # the one frame without Hand
    with open(DLC / "labeled-data" / "reachingvideo1" / "CollectedData_Mackenzie.csv") as f:
        rows = list(csv.reader(f))[3:]
    empty = np.array([[cell == "" for cell in row[1::2]] for row in rows])
    assert (np.stack([r.keypoints[:, 2] == 0 for r in records]) == empty).all()


def test_dlc_boxes_cover_keypoints_inside_image():
    _, records = load_dlc_records(_need(DLC), margin=0.1)
    for r in records:
        h, w = r.image_size
        x, y, bw, bh = r.box
        pts = r.keypoints[r.keypoints[:, 2] > 0, :2]
        assert (pts >= (x, y)).all() and (pts <= (x + bw - 1, y + bh - 1)).all()
        assert x >= 0 and y >= 0 and x + bw <= w and y + bh <= h
    assert records[0].image_size == (747, 832)
    _, whole = load_dlc_records(DLC, box="image")
    assert whole[0].box == (0.0, 0.0, 832.0, 747.0)


def test_dlc_to_coco_round_trips(tmp_path):
    coco = dlc_to_coco(_need(DLC), tmp_path / "dlc.json")
    assert coco["categories"][0]["skeleton"] == [[1, 2], [4, 5]]
    assert coco["categories"][0]["name"] == "Reaching"
    spec, back = load_coco_records(tmp_path / "dlc.json", DLC)
    orig_spec, orig = load_dlc_records(DLC)
    assert spec.names == orig_spec.names and spec.skeleton == orig_spec.skeleton
    assert len(back) == len(orig) == 55
    for a, b in zip(orig, back, strict=True):
        assert a.image_path == b.image_path and a.image_size == b.image_size
        np.testing.assert_allclose(a.keypoints, b.keypoints, atol=1e-3)
        np.testing.assert_allclose(a.box, b.box, atol=1e-2)


def _tiny_dlc(tmp_path: Path, rows: list[list[str]], new_style: bool = False) -> Path:
    project = tmp_path / "proj"
    folder = project / "labeled-data" / "vid"
    (project / "config.yaml").parent.mkdir(parents=True, exist_ok=True)
    (project / "config.yaml").write_text("Task: t\nbodyparts:\n- a\n- b\nskeleton: [[a, b]]\n")
    _write_image(folder / "f0.png")
    pad = ["", ""] if new_style else []
    header = [["scorer", *pad] + ["me"] * 4, ["bodyparts", *pad, "a", "a", "b", "b"],
              ["coords", *pad, "x", "y", "x", "y"]]  # fmt: skip
    with open(folder / "CollectedData_me.csv", "w", newline="") as f:
        csv.writer(f).writerows(header + rows)
    return project


def test_dlc_new_style_index_columns(tmp_path):
    project = _tiny_dlc(tmp_path, [["labeled-data", "vid", "f0.png", "3", "4", "", ""]], True)
    spec, records = load_dlc_records(project)
    assert spec.skeleton == ((0, 1),)
    np.testing.assert_array_equal(records[0].keypoints, [[3, 4, 2], [0, 0, 0]])
    assert records[0].box == (0.0, 0.0, 50.0, 40.0)  # one point: no extent -> whole image


@pytest.mark.parametrize(
    "row,reason,match",
    [
        (["labeled-data/vid/gone.png", "1", "2", "3", "4"], "missing_image", "gone.png"),
        (["labeled-data/vid/f0.png", "1", "", "3", "4"], "bad_row",
         "columns 2-3: keypoint 0 has an x but no y; give both"),
        (["labeled-data/vid/f0.png", "1", "2", "3"], "bad_row",
         r"columns 4-5: keypoint 1 has an x but no y \(the row has 4 cells\)"),
        (["labeled-data/vid/f0.png", "1", "zz", "3", "4"], "bad_row", "'zz' is not a number"),
    ],
)
def test_dlc_bad_rows_raise_or_are_counted(tmp_path, row, reason, match):
    good = ["labeled-data/vid/f0.png", "1", "2", "30", "20"]
    project = _tiny_dlc(tmp_path, [good, row, ["labeled-data/vid/f0.png", "", "", "", ""]])
    with pytest.raises(DataError, match=match) as err:
        load_dlc_records(project)
    assert "CollectedData_me.csv:5" in str(err.value)
    _, records = load_dlc_records(project, on_error="skip")
    assert len(records) == 1
    assert records.report.skipped == {reason: 1, "no_keypoints": 1}


def test_dlc_refuses_unsupported_layouts(tmp_path):
    project = _tiny_dlc(tmp_path, [])
    csv_path = project / "labeled-data" / "vid" / "CollectedData_me.csv"
    csv_path.write_text("scorer,me,me\nindividuals,m1,m1\nbodyparts,a,a\ncoords,x,y\n")
    with pytest.raises(DataError, match="multi-animal"):
        load_dlc_records(project)
    csv_path.rename(csv_path.with_suffix(".h5"))
    with pytest.raises(DataError, match="CollectedData_me.h5: cannot read this .h5 label"):
        load_dlc_records(project)
    with pytest.raises(DataError, match="config.yaml: not found"):
        load_dlc_records(tmp_path)
    (project / "config.yaml").write_text("bodyparts: [a, b\n  :::\n")
    with pytest.raises(DataError) as err:
        load_dlc_records(project)
    assert str(err.value).endswith(
        "config.yaml: not valid YAML: expected ',' or ']', but got ':' (line 2, column 5)"
    )  # one line: what and where


# --------------------------------------------------------------------------- checks
def test_check_records_counts_problems(tmp_path):
    anns = [{}, {"keypoints": [60, 10, 2, 0, 0, 0], "bbox": [30, 5, 40, 20]}, {"image_id": 2}]
    ann, images = _tiny_coco(tmp_path, anns, n_images=3)
    spec, records = load_coco_records(ann, images)
    (images / "001.jpg").unlink()
    report = check_records(records, spec)
    assert report["images"] == 2 and report["instances"] == 3
    assert report["labelled"] == {"tip_l": 3, "tip_r": 2}
    assert report["coverage"]["tip_r"] == pytest.approx(2 / 3, abs=1e-3)
    assert report["unlabelled"] == 1 and report["visible"] == 5
    assert report["out_of_image"] == 1 and report["boxes_out_of_image"] == 1
    assert report["missing_files"] == 1 and report["corrupt_images"] is None
    assert "tip_l" in report["examples"]["out_of_image"][0]
    text = format_check(report, spec)
    assert "001.jpg" in text and "not checked" in text
    (images / "003.jpg").write_bytes(b"\xff\xd8\xff truncated")
    records[2].image_path = str(images / "003.jpg")
    decoded = check_records(records, spec, decode=True)
    assert decoded["corrupt_images"] == 1 and decoded["examples"]["corrupt_images"]
