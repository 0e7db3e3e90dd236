"""``kpnet data check / convert / preview`` through click's CliRunner."""

from __future__ import annotations

import json
import os
import sys
import types
import uuid
from pathlib import Path

import pytest
from click.testing import CliRunner

from kpnet.cli import main
from kpnet.data.coco import load_coco_records
from kpnet.data.records import DataError
from kpnet.data.sources import guess_image_dir
from kpnet.data.synthetic import ensure_synthetic_pins

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
COCO_VAL = DATA / "coco_mini" / "annotations" / "person_keypoints_val2017.json"
DLC = DATA / "dlc_reaching"


def _need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"shared data not available: {path}")
    return path


def _run(*args: str):
    return CliRunner().invoke(main, ["data", *args], catch_exceptions=False)


@pytest.fixture(scope="module")
def pins(tmp_path_factory) -> dict:
    return ensure_synthetic_pins(tmp_path_factory.mktemp("pins"), num_train=12, num_val=4)


def test_check_coco_mini_guesses_image_dir():
    result = _run("check", str(_need(COCO_VAL)))
    assert result.exit_code == 0, result.output
    assert "68 records (skipped crowd: 1, no_keypoints: 49)" in result.output
    assert "instances         68" in result.output and "missing files     0" in result.output


def test_check_dlc_json_report():
    result = _run("check", str(_need(DLC)), "--json", "--decode")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["load"]["kept"] == report["instances"] == 55
    assert report["labelled"]["Tongue"] == 15 and report["labelled"]["Joystick1"] == 55
    assert report["unlabelled"] == 5 * 55 - sum(report["labelled"].values())
    assert report["corrupt_images"] == 0


def test_check_reads_a_data_set_at_a_url(pins):
    """A gs://-style data set (TensorFlow's ram:// filesystem stands in for gs:// here) is
    checked as a local one: every image found, decoded and sized through kpnet.fs."""
    from kpnet import fs

    ann, image_dir = pins["val"]
    root = f"ram://kpnet-check-{uuid.uuid4().hex[:8]}"
    for name in sorted(os.listdir(image_dir)):
        fs.write_atomic(fs.join(root, "val", name), Path(image_dir, name).read_bytes())
    fs.write_atomic(fs.join(root, "annotations", "val.json"), Path(ann).read_bytes())
    result = _run("check", fs.join(root, "annotations", "val.json"), "--decode", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["instances"] == 4 and report["missing_files"] == 0
    assert report["corrupt_images"] == 0
    gone = _run("check", fs.join(root, "annotations", "nothing.json"))
    assert gone.exit_code == 1 and "nothing.json: file not found" in gone.output


def test_check_reports_bad_records_with_exit_code(pins):
    ann, image_dir = pins["train"]
    Path(image_dir, "000003.jpg").rename(Path(image_dir, "moved.jpg"))
    try:
        result = _run("check", ann)
        assert result.exit_code == 1
        assert "11 records (skipped missing_image: 1)" in result.output
        assert "000003.jpg" in result.output
        raised = _run("check", ann, "--on-error", "raise")
        assert raised.exit_code == 1 and "000003.jpg): image file not found" in raised.output
        assert "Traceback" not in raised.output
    finally:
        Path(image_dir, "moved.jpg").rename(Path(image_dir, "000003.jpg"))
    assert _run("check", ann).exit_code == 0


def test_guess_image_dir(tmp_path, pins):
    ann, image_dir = pins["val"]
    assert guess_image_dir(Path(ann)) == Path(image_dir)
    (tmp_path / "stuff.json").write_text("{}")
    with pytest.raises(DataError, match="pass --images"):
        guess_image_dir(tmp_path / "stuff.json")
    result = _run("check", str(tmp_path / "stuff.json"))
    assert result.exit_code == 1 and "pass --images DIR" in result.output


def test_convert_dlc(tmp_path):
    out = tmp_path / "out" / "dlc.json"
    result = _run("convert", str(_need(DLC)), "-o", str(out), "--box", "image")
    assert result.exit_code == 0, result.output
    assert "wrote 55 instances in 55 images" in result.output
    spec, records = load_coco_records(out, DLC)
    assert len(records) == 55 and records[0].box == (0.0, 0.0, 832.0, 747.0)
    checked = _run("check", str(out), "--images", str(DLC))
    assert checked.exit_code == 0 and "instances         55" in checked.output


def test_preview_passes_config_to_write_preview(monkeypatch, tmp_path, pins):
    calls = []

    def fake_write_preview(records, spec, pipeline_config, out_dir, n=16, seed=0):
        calls.append((len(records), spec.names, pipeline_config, out_dir, n, seed))
        return Path(out_dir) / "preview.png"

    module = types.ModuleType("kpnet.data.preview")
    module.write_preview = fake_write_preview
    monkeypatch.setitem(sys.modules, "kpnet.data.preview", module)
    ann, image_dir = pins["train"]
    args = ["preview", ann, "--images", image_dir, "--out", str(tmp_path), "-n", "4"]
    result = _run(*args, "--input-size", "128x96", "--mode", "whole", "--seed", "3")
    assert result.exit_code == 0, result.output
    (count, names, config, out_dir, n, seed), = calls  # fmt: skip
    assert count == 12 and names == ("pin_left", "pin_right") and (n, seed) == (4, 3)
    assert tuple(config.input_size) == (128, 96) and config.mode == "whole"
    assert str(tmp_path / "preview.png") in result.output
    bad = _run(*args, "--input-size", "100x96")
    assert bad.exit_code == 2 and "multiples of 32" in bad.output


def test_preview_writes_png(tmp_path, pins):
    import cv2

    ann, _ = pins["val"]
    result = _run("preview", ann, "--out", str(tmp_path), "-n", "4", "--input-size", "128x128")
    assert result.exit_code == 0, result.output
    pngs = list(tmp_path.glob("*.png"))
    assert pngs and cv2.imread(str(pngs[0])) is not None
