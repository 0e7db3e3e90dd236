"""`kpnet predict`: image ids, detections, top-down keypoints in image pixels, errors."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from _blobs import blob_image, save_blob_model
from click.testing import CliRunner

from kpnet.cli import main
from kpnet.data.dlc_output import read_dlc_csv
from kpnet.data.records import DataError
from kpnet.predict import _detections as read_detections
from kpnet.predict import _image_ids as image_ids
from kpnet.predict import coco_result
from kpnet.run_folder import model_path as resolve_model_path
from kpnet.spec import KeypointSpec

INPUT = (64, 64)
SPEC = KeypointSpec(names=("red", "green", "blue"), skeleton=((0, 1), (1, 2)))
POINTS = {  # image stem -> blob centres (x, y) in image pixels, one per colour
    "5": [(70.3, 60.6), (100.8, 95.2), (55.5, 110.1)],
    "9": [(140.0, 40.4), (120.6, 75.9), (160.2, 90.0)],
}
BOXES = {"5": [40.0, 40.0, 80.0, 90.0], "9": [100.0, 20.0, 80.0, 90.0]}


def _blob_image(points, hw=(160, 200), sigma=9.0) -> np.ndarray:
    return blob_image(points, hw, sigma)


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> Path:
    """A keypoints model whose channel c is the average-pooled colour channel c / 255."""
    return save_blob_model(tmp_path_factory.mktemp("model") / "keypoints.keras", SPEC, INPUT)


@pytest.fixture()
def image_dir(tmp_path) -> Path:
    folder = tmp_path / "images"
    folder.mkdir()
    for stem, points in POINTS.items():
        rgb = _blob_image(points)
        cv2.imwrite(str(folder / f"{stem}.png"), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    return folder


def _detections(path: Path, unknown: bool = False) -> Path:
    dets = [
        {"image_id": int(s), "category_id": 3, "bbox": b, "score": 0.8} for s, b in BOXES.items()
    ]
    dets.append({"image_id": 5, "category_id": 3, "bbox": [0, 0, 10, 10], "score": 0.1})  # low
    if unknown:
        dets.append({"image_id": 77, "category_id": 3, "bbox": [0, 0, 50, 50], "score": 0.9})
    path.write_text(json.dumps(dets))
    return path


def _images_json(path: Path) -> Path:
    images = [{"id": int(s), "file_name": f"{s}.png"} for s in POINTS]
    path.write_text(json.dumps({"images": images + [{"id": 77, "file_name": "77.png"}]}))
    return path


# --------------------------------------------------------------------------- end to end
def test_predict_on_detections_finds_blobs_in_image_pixels(model_file, image_dir, tmp_path):
    out, draw = tmp_path / "preds.json", tmp_path / "draw"
    dets, ids = _detections(tmp_path / "d.json"), _images_json(tmp_path / "images.json")
    args = ["predict", str(model_file), str(image_dir), "--boxes", str(dets), "-o", str(out),
            "--images-json", str(ids), "--draw", str(draw), "--heatmaps", "--batch-size", "1"]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    preds = {p["image_id"]: p for p in json.loads(out.read_text())}
    assert sorted(preds) == [5, 9]  # the low-score detection is dropped
    assert not out.with_suffix(".csv").exists()  # several boxes per frame: no DLC table
    for stem, points in POINTS.items():
        p = preds[int(stem)]
        kp = np.array(p["keypoints"]).reshape(-1, 3)
        np.testing.assert_allclose(kp[:, :2], points, atol=0.5)
        confident = kp[kp[:, 2] > 0.2, 2]
        assert p["score"] == pytest.approx(0.8 * confident.mean(), abs=1e-3)
        assert p["category_id"] == 3 and p["bbox"] == BOXES[stem]
        assert (draw / f"{stem}.jpg").is_file() and (draw / f"{stem}_heatmap0.jpg").is_file()


def test_predict_whole_images_with_flip_test(model_file, image_dir, tmp_path):
    out = tmp_path / "whole.json"
    args = ["predict", str(model_file), str(image_dir / "9.png"), "-o", str(out), "--flip-test"]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    [p] = json.loads(out.read_text())
    assert p["image_id"] == 9 and p["category_id"] == 1 and p["bbox"] is None
    kp = np.array(p["keypoints"]).reshape(-1, 3)
    np.testing.assert_allclose(kp[:, :2], POINTS["9"], atol=1.0)  # coarser: 64 px for 200


def test_unreadable_image_is_named_and_skipped(model_file, image_dir, tmp_path):
    bad = image_dir / "bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0" + b"not really a jpeg" * 10)  # passes the header check
    out, draw = tmp_path / "preds.json", tmp_path / "draw"
    out.write_text("old results")
    args = ["predict", str(model_file), str(image_dir / "5.png"), str(bad), "-o", str(out),
            "--draw", str(draw), "--batch-size", "1"]  # fmt: skip
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 3 and "bad.jpg" in res.output and "Traceback" not in res.output
    assert [p["file_name"] for p in json.loads(out.read_text())] == ["5.png"]  # issue 24
    assert (draw / "5.jpg").is_file() and not (draw / "bad.jpg").exists()
    (image_dir / "notes.jpg").write_text("plain text")
    res = CliRunner().invoke(main, ["predict", str(model_file), str(image_dir / "notes.jpg")])
    assert res.exit_code != 0 and "notes.jpg" in res.output


def test_boxes_match_images_by_file_name_or_fail(model_file, image_dir, tmp_path):
    dets = _detections(tmp_path / "d.json")
    base = ["predict", str(model_file), str(image_dir), "--boxes", str(dets)]
    res = CliRunner().invoke(main, [*base, "-o", str(tmp_path / "p.json")])
    assert res.exit_code != 0 and "--images-json" in res.output  # ids alone match nothing
    unknown = _detections(tmp_path / "u.json", unknown=True)
    ids = _images_json(tmp_path / "images.json")
    res = CliRunner().invoke(main, ["predict", str(model_file), str(image_dir), "--boxes",
                                    str(unknown), "--images-json", str(ids)])  # fmt: skip
    assert res.exit_code != 0 and "77.png" in res.output and "Traceback" not in res.output


def test_predict_video_writes_a_dlc_csv_and_a_labelled_video(model_file, tmp_path):
    video = tmp_path / "clip.avi"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 10.0, (200, 160))
    shifts = [(3.0 * i, 2.0 * i) for i in range(6)]
    for dx, dy in shifts:
        points = [(x + dx, y + dy) for x, y in POINTS["5"]]
        writer.write(cv2.cvtColor(_blob_image(points), cv2.COLOR_RGB2BGR))
    writer.release()
    out, draw = tmp_path / "out" / "predictions.json", tmp_path / "draw"
    res = CliRunner().invoke(main, ["predict", str(model_file), str(video), "-o", str(out),
                                    "--draw", str(draw)])  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "6 frames" in res.output
    table = read_dlc_csv(out.with_suffix(".csv"))
    assert list(table.bodyparts) == list(SPEC.names) and len(table.frame_names) == 6
    assert [int(f) for f in table.frame_names] == list(range(6))
    assert table.likelihood.min() >= 0.0 and table.likelihood.max() <= 1.0
    for i, (dx, dy) in enumerate(shifts):  # whole 200x160 frames on a 64x64 input
        expected = np.array(POINTS["5"]) + (dx, dy)
        np.testing.assert_allclose(table.xy[i], expected, atol=2.0)
    results = json.loads(out.read_text())
    assert [r["file_name"] for r in results][:2] == ["clip.avi#000000", "clip.avi#000001"]
    labelled = cv2.VideoCapture(str(draw / "clip_labelled.mp4"))
    assert int(labelled.get(cv2.CAP_PROP_FRAME_COUNT)) == 6


# --------------------------------------------------------------------------- inputs
def test_image_id_rules(tmp_path):
    numeric = [Path("a/000000000139.jpg"), Path("b/7.png")]
    assert list(image_ids(numeric, None).values()) == [139, 7]
    assert list(image_ids([Path("x/7.png"), Path("frame_a.png")], None).values()) == [0, 1]
    coco = tmp_path / "coco.json"
    coco.write_text(json.dumps({"images": [{"id": 42, "file_name": "val/frame_a.png"}]}))
    assert list(image_ids([Path("elsewhere/frame_a.png")], coco).values()) == [42]
    with pytest.raises(DataError, match="coco.json.*frame_b.png"):
        image_ids([Path("frame_b.png")], coco)


def test_detections_are_validated_with_file_and_index(tmp_path):
    files = [Path("5.png"), Path("9.png")]
    ids = _images_json(tmp_path / "images.json")
    found = read_detections(_detections(tmp_path / "d.json"), ids, files, 0.5)
    assert {name: [d["bbox"] for d in dets] for name, dets in found.items()} == {
        "5.png": [BOXES["5"]], "9.png": [BOXES["9"]],
    }  # fmt: skip
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"file_name": "5.png", "bbox": [0, 0, 5, 5]}, {"image_id": 2}]))
    with pytest.raises(DataError, match=r"bad.json: detection 1 needs a bbox"):
        read_detections(bad, None, files, 0.0)


def test_model_path_resolution(tmp_path):
    (tmp_path / "last.keras").write_text("")
    assert resolve_model_path(tmp_path) == tmp_path / "last.keras"
    (tmp_path / "best.keras").write_text("")
    assert resolve_model_path(tmp_path) == tmp_path / "best.keras"
    (tmp_path / "keypoints.keras").write_text("")
    assert resolve_model_path(tmp_path) == tmp_path / "keypoints.keras"
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty: a run folder needs one of"):
        resolve_model_path(tmp_path / "empty")
    (tmp_path / "model.h5").write_text("")
    with pytest.raises(FileNotFoundError, match=r"\.keras file or a run folder"):
        resolve_model_path(tmp_path / "model.h5")


def test_coco_result_rescoring():
    det = {"bbox": (1.0, 2.0, 3.0, 4.0), "score": 0.5, "category_id": 2}
    r = coco_result(np.array([[1.0, 2.0], [3.0, 4.0]]), np.array([0.9, 0.1]), det, 12, "12.jpg")
    assert r["keypoints"] == [1.0, 2.0, 0.9, 3.0, 4.0, 0.1]
    assert r["score"] == pytest.approx(0.45) and r["image_id"] == 12 and r["category_id"] == 2
