"""Silent data problems (issue 24, item 6): each is now said in one line naming the file,
the record or the key, before anything is trained or written."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml
from _cli import invoke, refused

REPO = Path(__file__).resolve().parents[1]


def _dlc_project(root: Path, bodyparts: list[str], labelled: list[str]) -> Path:
    """A DLC project whose config lists ``bodyparts`` and whose CSV has columns for
    ``labelled`` only (three 64x64 frames)."""
    folder = root / "labeled-data" / "v1"
    folder.mkdir(parents=True)
    (root / "config.yaml").write_text(yaml.safe_dump({"bodyparts": bodyparts, "scorer": "me"}))
    rows = [["scorer"] + ["me"] * 2 * len(labelled),
            ["bodyparts"] + [b for b in labelled for _ in "xy"],
            ["coords"] + ["x", "y"] * len(labelled)]  # fmt: skip
    for i in range(3):
        cv2.imwrite(str(folder / f"img{i}.png"), np.full((64, 64, 3), 40 * i, np.uint8))
        values = [str(10 + 5 * j) for j in range(2 * len(labelled))]
        rows.append([f"labeled-data/v1/img{i}.png", *values])
    (folder / "CollectedData_me.csv").write_text("\n".join(",".join(r) for r in rows) + "\n")
    return root


def test_a_body_part_without_columns_is_named_by_check_and_fit(tmp_path):
    project = _dlc_project(tmp_path / "proj", ["nose", "tail", "paw"], ["nose", "tail"])
    csv = project / "labeled-data" / "v1" / "CollectedData_me.csv"
    refused(invoke("data", "check", project), str(csv), "'paw'", "bodyparts")
    out = tmp_path / "run"
    result = invoke("fit", REPO / "recipes" / "dlc-project.yaml", "-o", out,
                    "--set", f"data.dlc.project={project}")  # fmt: skip
    refused(result, str(csv), "'paw'")
    assert not out.exists()


def test_a_project_with_every_body_part_loads(tmp_path):
    project = _dlc_project(tmp_path / "proj", ["nose", "tail"], ["nose", "tail"])
    result = invoke("data", "check", project)
    assert result.exit_code == 0, result.output
    assert "3 records" in result.output


def _coco(tmp_path: Path, annotation: dict) -> Path:
    images = tmp_path / "images"
    images.mkdir()
    cv2.imwrite(str(images / "a.jpg"), np.zeros((40, 50, 3), np.uint8))
    ann = {"id": 7, "image_id": 1, "category_id": 1, "iscrowd": 0, "bbox": [5, 5, 20, 20],
           "keypoints": [10, 10, 2, 20, 20, 2], **annotation}  # fmt: skip
    data = {"images": [{"id": 1, "file_name": "a.jpg", "height": 40, "width": 50}],
            "annotations": [ann],
            "categories": [{"id": 1, "name": "p", "keypoints": ["l", "r"]}]}  # fmt: skip
    path = tmp_path / "train.json"
    path.write_text(json.dumps(data))  # Python writes Infinity / NaN as JSON allows
    return path


@pytest.mark.parametrize(
    "annotation,says",
    [
        ({"keypoints": [10, float("inf"), 2, 20, 20, 2]}, "infinite keypoint coordinates"),
        ({"keypoints": [10, float("nan"), 2, 20, 20, 2]}, "NaN keypoint coordinates"),
        ({"bbox": [5, 5, -3, 20]}, "negative width (-3)"),
        ({"bbox": [5, 5, 10, 0]}, "zero-area bbox"),
    ],
)
def test_bad_coco_values_are_called_what_they_are(tmp_path, annotation, says):
    ann = _coco(tmp_path, annotation)
    result = invoke("data", "check", ann, "--images", tmp_path / "images", "--on-error", "raise")
    refused(result, "annotation id 7", says)


@pytest.mark.parametrize(
    "size,says",
    [("[64, 0]", "must be positive multiples of 32"), ("[-64, 64]", "positive multiples"),
     ("[100, 64]", "must divide by 32")],  # fmt: skip
)
def test_input_size_errors_say_what_is_wrong(tmp_path, size, says):
    out = tmp_path / "run"
    result = invoke("fit", REPO / "recipes" / "quickstart.yaml", "-o", out,
                    "--set", f"model.input_size={size}")  # fmt: skip
    refused(result, "model", "input_size", says)
    assert not out.exists()
