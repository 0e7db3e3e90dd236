"""Tests for kpnet.evaluate and ``kpnet evaluate``."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from kpnet.codec import Codec, crop_affine, transform_points
from kpnet.data import pipeline
from kpnet.data.records import DataError, InstanceRecord
from kpnet.evaluate import (
    COCO_STAT_NAMES,
    coco_keypoint_ap,
    evaluate_predictions,
    format_table,
    match_points,
    oks_nms,
    to_coco_results,
)
from kpnet.runner import evaluate_model, predict_records
from kpnet.spec import COCO17_SIGMAS, KeypointSpec

REF = Path(__file__).resolve().parents[2] / "shared" / "data" / "coco_eval_reference"


@pytest.fixture(scope="module")
def ref_files() -> tuple[str, str]:
    if not (REF / "example_coco_preds.json").is_file():
        pytest.skip(f"shared data not available: {REF}")
    return str(REF / "example_coco_val.json"), str(REF / "example_coco_preds.json")


def _reference_stats() -> list[float]:
    text = (REF / "pycocotools_reference_AP.txt").read_text()
    return json.loads(re.search(r"^stats (\[.*\])$", text, re.M).group(1))


def _rec(box, kps, image_id=1, score=1.0) -> InstanceRecord:
    return InstanceRecord(
        "img.png", box=box, keypoints=np.asarray(kps, np.float32), image_id=image_id, score=score
    )


# --------------------------------------------------------------------------- COCO AP
def test_coco_reference_all_ten_stats(ref_files):
    result = coco_keypoint_ap(*ref_files)
    assert result["stats"] == pytest.approx(_reference_stats(), abs=5e-5)
    assert round(result["AP"], 3) == 0.861 and round(result["AP50"], 3) == 0.993
    assert [result[k] for k in COCO_STAT_NAMES] == pytest.approx(result["stats"], abs=1e-6)
    assert "Average Precision" in result["summary"] and result["num_dt"] == 73


def test_coco_in_memory_without_area_and_extra_fields(ref_files):
    gt = json.loads(Path(ref_files[0]).read_text())
    for ann in gt["annotations"]:  # custom datasets: no area -> box w*h
        ann.pop("area")
    dt = json.loads(Path(ref_files[1]).read_text())  # keeps center / scale fields
    result = coco_keypoint_ap(gt, dt, sigmas=COCO17_SIGMAS)
    assert 0.5 < result["AP"] <= 1.0
    assert "center" in dt[0], "the caller's results must not be modified"


def test_custom_sigmas_change_ap(ref_files):
    base = coco_keypoint_ap(*ref_files)["AP"]
    tight = coco_keypoint_ap(*ref_files, sigmas=np.array(COCO17_SIGMAS) / 2)["AP"]
    loose = coco_keypoint_ap(*ref_files, sigmas=np.array(COCO17_SIGMAS) * 2)["AP"]
    assert tight < base - 0.05 and loose > base


def test_coco_clear_errors(ref_files):
    with pytest.raises(DataError, match="0 detections"):
        coco_keypoint_ap(ref_files[0], [])
    with pytest.raises(DataError, match="need 17 positive OKS sigmas"):
        coco_keypoint_ap(*ref_files, sigmas=[0.1, 0.1])
    with pytest.raises(DataError, match="image_id 999"):
        coco_keypoint_ap(ref_files[0], [{"image_id": 999, "keypoints": [0] * 51, "score": 1}])


# --------------------------------------------------------------------------- CLI
def test_cli_gt_mode(ref_files, tmp_path):
    from kpnet.cli import main

    out = tmp_path / "metrics.json"
    args = ["evaluate", "--gt", ref_files[0], "--predictions", ref_files[1], "-o", str(out)]
    result = CliRunner().invoke(main, [*args, "--sigmas", "coco17"])
    assert result.exit_code == 0, result.output
    assert re.search(r"Average Precision  \(AP\) @\[ IoU=0.50:0.95 .* = 0\.861", result.output)
    assert "IoU=0.50      | area=   all | maxDets= 20 ] = 0.993" in result.output
    written = json.loads(out.read_text())
    assert written["stats"] == pytest.approx(_reference_stats(), abs=5e-5)
    assert round(written["AP"], 4) == 0.8609


def test_cli_errors(ref_files, tmp_path):
    from kpnet.cli import main

    empty = tmp_path / "empty.json"
    empty.write_text("[]")
    result = CliRunner().invoke(
        main, ["evaluate", "--gt", ref_files[0], "--predictions", str(empty)]
    )
    assert result.exit_code == 1 and "0 detections" in result.output
    result = CliRunner().invoke(main, ["evaluate", "--gt", ref_files[0]])
    assert result.exit_code == 2 and "--predictions" in result.output


# --------------------------------------------------------------------------- pixel metrics
def test_pixel_errors_and_pck_hand_computed():
    spec = KeypointSpec(names=("a", "b", "c"))
    records = [
        _rec((0, 0, 100, 50), [[10, 10, 2], [20, 20, 2], [0, 0, 0]]),  # box size 100
        _rec((0, 0, 40, 80), [[5, 5, 1], [30, 30, 2], [7, 7, 2]]),  # box size 80
    ]
    pred = np.array([[[13, 14], [20, 20], [99, 99]], [[5, 13], [30, 50], [7, 7]]], float)
    m = evaluate_predictions(pred, np.ones((2, 3)), records, spec)
    # errors over labelled points: 5, 0 | 8, 20, 0
    assert m["overall"]["count"] == 5
    assert m["overall"]["mean"] == pytest.approx(6.6)
    assert m["overall"]["median"] == pytest.approx(5.0)
    assert m["overall"]["p90"] == pytest.approx(15.2)  # 8 + 0.6 * (20 - 8)
    # relative errors 0.05, 0, 0.1, 0.25, 0
    assert m["overall"]["pck@0.05"] == pytest.approx(0.6)
    assert m["overall"]["pck@0.1"] == pytest.approx(0.8)
    a, b, c = m["per_keypoint"]
    assert (a["name"], a["count"], a["mean"], a["pck@0.05"]) == ("a", 2, 6.5, 0.5)
    assert (b["median"], b["p90"]) == (10.0, 18.0)
    assert (c["count"], c["mean"]) == (1, 0.0)
    assert m["coco"] is None and m["pins"] is None  # no sigmas, no shared channels
    table = format_table(m)
    assert "overall" in table and "6.600" in table


def test_oks_ap_from_records_and_rescoring():
    spec = KeypointSpec(names=("a", "b"), sigmas=(0.05, 0.05))
    records = [
        _rec((0, 0, 100, 100), [[20, 20, 2], [80, 80, 2]], image_id=1),
        _rec((0, 0, 100, 100), [[30, 60, 2], [60, 30, 2]], image_id=2, score=0.5),
    ]
    gt_xy = np.stack([r.keypoints[:, :2] for r in records])
    perfect = evaluate_predictions(gt_xy, np.full((2, 2), 0.9), records, spec)
    assert perfect["coco"]["AP"] == pytest.approx(1.0)
    assert perfect["overall"]["AP"] == pytest.approx(1.0)
    # 6 px off on a 100x100 box: OKS = exp(-36 / (2 * 10000 * 0.1**2)) = 0.835
    shifted = evaluate_predictions(gt_xy + [6, 0], np.full((2, 2), 0.9), records, spec)
    assert shifted["coco"]["AP50"] == pytest.approx(1.0)
    assert shifted["coco"]["AP75"] == pytest.approx(1.0)
    assert shifted["coco"]["AP"] == pytest.approx(0.7, abs=1e-6)  # 7 thresholds .5 .. .8 pass
    dt = to_coco_results(records, gt_xy, np.array([[0.9, 0.1], [0.3, 0.5]]))
    assert [d["score"] for d in dt] == pytest.approx([0.9, 0.2])  # mean(>0.2) * record score
    assert dt[1]["keypoints"] == [30, 60, 0.3, 60, 30, 0.5]


# --------------------------------------------------------------------------- pins
def test_hungarian_pin_matching_with_miss_and_false_positive():
    spec = KeypointSpec(names=("pin_a", "pin_b", "pin_c", "tip"), channel_map=(0, 0, 0, 1))
    records = [
        _rec((0, 0, 100, 100), [[10, 10, 2], [50, 50, 2], [90, 90, 2], [5, 5, 2]]),
        _rec((0, 0, 100, 100), [[20, 20, 2], [40, 40, 2], [0, 0, 0], [5, 5, 2]]),
    ]
    # predictions in a shared channel come sorted by score, not by identity
    pred = np.array(
        [[[51, 52], [11, 10], [70, 20], [5, 5]], [[40, 41], [20, 20], [0, 0], [5, 5]]], float
    )
    scores = np.array([[0.9, 0.8, 0.6, 1.0], [0.7, 0.5, 0.05, 1.0]])
    m = evaluate_predictions(pred, scores, records, spec)  # radius 5% of 100 px = 5 px
    pins = m["pins"]["overall"]
    assert (pins["num_true"], pins["matched"], pins["misses"], pins["false_positives"]) == (
        5, 4, 1, 1,
    )  # fmt: skip
    assert pins["error_mean"] == pytest.approx((np.sqrt(5) + 1 + 1 + 0) / 4, abs=1e-6)
    assert (pins["recall"], pins["precision"]) == (0.8, 0.8)
    assert m["pins"]["per_channel"][0]["keypoints"] == ["pin_a", "pin_b", "pin_c"]
    # per-keypoint errors use the Hungarian assignment, not the score order
    per = {row["name"]: row for row in m["per_keypoint"]}
    assert per["pin_a"]["mean"] == pytest.approx(0.5)  # 1 and 0
    assert per["pin_b"]["mean"] == pytest.approx((np.sqrt(5) + 1) / 2, abs=1e-6)
    assert per["pin_c"]["mean"] == pytest.approx(np.hypot(20, 70), abs=1e-6)  # leftover pred
    # a radius of 1 px turns the sqrt(5) px match into a miss plus a false positive
    tight = evaluate_predictions(pred, scores, records, spec, match_radius_px=1.0)["pins"]
    assert (tight["overall"]["misses"], tight["overall"]["false_positives"]) == (2, 2)
    assert "pins: 4/5 matched" in format_table(m)


def test_match_points_radius():
    pairs = match_points(np.array([[0, 0], [10, 0]]), np.array([[9, 0], [1, 1], [50, 50]]), 5.0)
    assert sorted(pairs) == [(0, 1, pytest.approx(np.sqrt(2))), (1, 0, 1.0)]
    assert match_points(np.zeros((0, 2)), np.ones((3, 2))) == []


# --------------------------------------------------------------------------- OKS-NMS
def test_oks_nms_removes_duplicates():
    base = np.array([[10, 10, 1], [40, 10, 1], [25, 50, 1]], float)
    kps = np.stack([base, base + [0.5, 0.5, 0], base + [200, 0, 0]])
    keep = oks_nms(kps, np.array([0.8, 0.9, 0.7]), np.full(3, 2000.0), [0.05] * 3, 0.9)
    assert keep.tolist() == [1, 2]
    keep_all = oks_nms(kps, np.array([0.8, 0.9, 0.7]), np.full(3, 2000.0), [0.05] * 3, 1.0)
    assert keep_all.tolist() == [1, 0, 2]


def test_oks_nms_before_coco_ap():
    person = [[20, 20, 2], [80, 20, 2], [50, 90, 2]]
    other = [[220, 20, 2], [280, 20, 2], [250, 90, 2]]
    records = [_rec((10, 10, 80, 90), person), _rec((210, 10, 80, 90), other)]

    def result(kps, score, dx=0.0):
        kp = np.asarray(kps, float) + [dx, 0, 0]
        kp[:, 2] = 1
        return {"image_id": 1, "keypoints": kp.reshape(-1).tolist(), "score": score}

    # a near-duplicate ranked between the two true detections is a false positive
    dt = [result(person, 0.9), result(person, 0.8, dx=1.0), result(other, 0.7)]
    from kpnet.evaluate import records_to_coco

    gt = records_to_coco(records)
    sigmas = [0.05] * 3
    plain = coco_keypoint_ap(gt, dt, sigmas)
    nms = coco_keypoint_ap(gt, dt, sigmas, oks_nms_threshold=0.9)
    assert plain["AP"] < 0.9 and nms["AP"] == pytest.approx(1.0)
    assert (plain["num_dt"], nms["num_dt"]) == (3, 2)


# --------------------------------------------------------------------------- model evaluation
class ColourPeakModel:
    """Fake keypoints model: keypoint k is the brightest pixel of colour channel k."""

    def __init__(self, num_keypoints: int = 3):
        self.num_keypoints = num_keypoints

    def predict_on_batch(self, images):
        images = np.asarray(images, np.float32)[..., : self.num_keypoints]
        b, h, w, k = images.shape
        flat = images.transpose(0, 3, 1, 2).reshape(b, k, -1)
        idx = flat.argmax(-1)
        xy = np.stack([idx % w, idx // w], -1).astype(np.float32)
        return {"keypoints": xy, "scores": flat.max(-1) / 255.0}


def _crop_batches(records, order, batch_size, input_size=(64, 48)):
    """Hand-made eval batches (images, keypoints, meta) like the pipeline yields."""
    batches = []
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        images = np.zeros((len(idx), *input_size, 3), np.uint8)
        affines = []
        for b, i in enumerate(idx):
            rec = records[i]
            centre = np.array(rec.box[:2]) + (np.array(rec.box[2:]) - 1) / 2
            affine = crop_affine(centre, (rec.box[2] * 1.2, rec.box[3] * 1.2), input_size)
            for k, (x, y) in enumerate(np.rint(transform_points(rec.keypoints[:, :2], affine))):
                images[b, int(y), int(x), k] = 255
            affines.append(affine)
        meta = {"affine": np.stack(affines), "index": np.array(idx, np.int64),
                "image_hw": np.full((len(idx), 2), 1000, np.int32)}  # fmt: skip
        batches.append((images, None, meta))
    return batches


def test_predict_records_maps_back_to_image_in_record_order():
    rng = np.random.default_rng(0)
    records = []
    for i in range(5):
        x, y, s = rng.uniform(0, 300), rng.uniform(0, 300), rng.uniform(60, 150)
        kps = np.c_[rng.uniform([x, y], [x + 0.75 * s, y + s], (2, 2)), [2, 2]]
        records.append(_rec((x, y, 0.75 * s, s), kps, image_id=i))
    batches = _crop_batches(records, [3, 1, 4, 0, 2], batch_size=2)
    xy, scores = predict_records(ColourPeakModel(2), batches, len(records))
    gt = np.stack([r.keypoints[:, :2] for r in records])
    # one crop pixel is box / 40 image pixels here: rounding costs at most half of it
    assert np.abs(xy - gt).max() <= 0.5 * 150 * 1.2 / 40 + 1e-3
    assert scores == pytest.approx(np.ones((5, 2)))
    with pytest.raises(DataError, match="1 of 5 records got no prediction"):
        predict_records(ColourPeakModel(2), batches[:-1], len(records))


@pytest.fixture
def dot_data(tmp_path):
    """Three images with one white dot each, their records, spec and pipeline config."""
    import cv2

    rng = np.random.default_rng(1)
    records = []
    for i in range(3):
        image = np.zeros((240, 320, 3), np.uint8)
        x, y = rng.integers(60, 180, 2)
        cv2.circle(image, (int(x), int(y)), 2, (255, 255, 255), -1)
        path = tmp_path / f"{i}.png"
        cv2.imwrite(str(path), image)
        kps = np.array([[x, y, 2]], np.float32)
        records.append(InstanceRecord(str(path), (x - 40, y - 50, 80, 100), kps, i, i, 1.0))
    spec = KeypointSpec(names=("dot",), sigmas=(0.05,))
    return spec, records, pipeline.PipelineConfig(codec=Codec((64, 64)))


def test_evaluate_model_through_the_pipeline(dot_data):
    spec, records, config = dot_data
    m = evaluate_model(ColourPeakModel(1), records, spec, config, batch_size=2)
    # one crop pixel is about 130 / 64 = 2 image pixels
    assert m["overall"]["count"] == 3 and m["overall"]["mean"] < 1.5
    assert m["overall"]["AP50"] == pytest.approx(1.0)
    assert [p["image_id"] for p in m["predictions"]] == [0, 1, 2]


def test_cli_model_mode(dot_data, tmp_path, monkeypatch):
    import kpnet.data.sources
    import kpnet.inference
    import kpnet.recipe
    from kpnet.cli import main

    fake = lambda recipe, detections=False: dot_data  # noqa: E731 (recipe -> validation data)
    monkeypatch.setattr(kpnet.data.sources, "load_validation", fake)
    seen = {}
    monkeypatch.setattr(kpnet.recipe, "load_recipe", lambda p, o: seen.update(recipe=(p, o)))
    monkeypatch.setattr(kpnet.inference, "load_model", lambda p, spec, **kw: ColourPeakModel(1))
    import keras  # a well-formed .keras file: evaluate checks it before loading any data

    keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)]).save(tmp_path / "model.keras")
    (tmp_path / "recipe.yaml").write_text("")
    args = [str(tmp_path / "model.keras"), str(tmp_path / "recipe.yaml"), "--set", "a.b=1"]
    result = CliRunner().invoke(main, ["evaluate", *args, "-o", str(tmp_path / "ev")])
    assert result.exit_code == 0, result.output
    assert seen["recipe"] == (str(tmp_path / "recipe.yaml"), ["a.b=1"])
    assert re.search(r"^dot +3 ", result.output, re.M) and "= 1.000" in result.output
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert metrics["overall"]["AP"] == pytest.approx(1.0) and metrics["overall"]["count"] == 3
    assert len(json.loads((tmp_path / "ev" / "predictions.json").read_text())) == 3


def test_cli_detections_mode_scores_against_the_whole_ground_truth(dot_data, tmp_path, monkeypatch):
    """Detector boxes: a miss and a false detection count, as in COCO's top-down protocol."""
    import kpnet.inference
    from kpnet.cli import main

    spec, records, _ = dot_data
    images = [
        {"id": r.image_id, "file_name": Path(r.image_path).name, "height": 240, "width": 320}
        for r in records
    ]
    anns = [
        {
            "id": i + 1,
            "image_id": r.image_id,
            "category_id": 1,
            "bbox": [float(v) for v in r.box],
            "area": float(r.box[2]) * float(r.box[3]),
            "iscrowd": 0,
            "num_keypoints": 1,
            "keypoints": r.keypoints.reshape(-1).tolist(),
        }
        for i, r in enumerate(records)
    ]
    gt = {
        "images": images,
        "annotations": anns,
        "categories": [{"id": 1, "name": "dot", "keypoints": ["dot"], "skeleton": []}],
    }
    dets = [
        {
            "image_id": r.image_id,
            "category_id": 1,
            "score": 0.9,
            "bbox": [float(r.box[0]) + 3, float(r.box[1]) - 2, float(r.box[2]), float(r.box[3])],
        }
        for r in records[:2]
    ]
    dets.append({"image_id": 0, "category_id": 1, "score": 0.8, "bbox": [0, 0, 30, 30]})
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    (tmp_path / "dets.json").write_text(json.dumps(dets))
    recipe = {
        "data": {
            "source": "coco",
            "spec": {"names": ["dot"], "sigmas": [0.05]},
            "coco": {
                "train_annotations": str(tmp_path / "gt.json"),
                "train_images": str(tmp_path),
                "val_annotations": str(tmp_path / "gt.json"),
            },
        },
        "model": {"backbone": "tiny", "backbone_weights": None, "input_size": [64, 64]},
    }
    (tmp_path / "recipe.yaml").write_text(json.dumps(recipe))
    monkeypatch.setattr(kpnet.inference, "load_model", lambda p, spec, **kw: ColourPeakModel(1))
    import keras  # a well-formed .keras file: evaluate checks it before loading any data

    keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)]).save(tmp_path / "model.keras")
    args = [
        "evaluate",
        str(tmp_path / "model.keras"),
        str(tmp_path / "recipe.yaml"),
        "--detections",
        "-o",
        str(tmp_path / "ev"),
    ]
    result = CliRunner().invoke(main, args)
    assert result.exit_code != 0 and "data.coco.val_boxes" in result.output
    result = CliRunner().invoke(main, [*args, "--set", f"data.coco.val_boxes={tmp_path}/dets.json"])
    assert result.exit_code == 0, result.output
    assert "3 detections of" in result.output
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    # two dots found, one image without a detection: precision 1 up to recall 2/3, the
    # empty-crop false detection scores 0 (ranked last): AP = 67 of 101 recall points
    assert metrics["coco"]["AP"] == pytest.approx(67 / 101, abs=1e-3)
    assert metrics["coco"]["AR"] == pytest.approx(2 / 3, abs=1e-3)
    predictions = json.loads((tmp_path / "ev" / "predictions.json").read_text())
    assert sorted(p["image_id"] for p in predictions) == [0, 0, 1]
    assert min(p["score"] for p in predictions) == 0.0
