"""One bad file does not sink a batch job (issue 24, item 5).

``kpnet predict`` skips an input file it cannot read (undecodable, unreadable, over the pixel
limit, a video that cannot be opened or ends before the frame count its header announces)
with a warning naming it, writes everything else, and ends with a summary line and exit
status 3. Every input bad: one error line, exit status 1, no file written or changed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import cv2
import pytest
from _blobs import blob_image, save_blob_model
from click.testing import CliRunner
from test_hardening_images import huge_png

from kpnet.cli import main
from kpnet.cli.predict import EXIT_SKIPPED
from kpnet.data.dlc_output import read_dlc_csv
from kpnet.spec import KeypointSpec

SPEC = KeypointSpec(names=("red", "green", "blue"))
POINTS = [(70.3, 60.6), (100.8, 95.2), (55.5, 110.1)]
FRAMES = 30


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> Path:
    return save_blob_model(tmp_path_factory.mktemp("model") / "keypoints.keras", SPEC, (64, 64))


@pytest.fixture(scope="module")
def video_bytes(tmp_path_factory) -> tuple[bytes, list[int]]:
    """A 30-frame MJPG AVI, and the byte offset of each frame's chunk."""
    path = tmp_path_factory.mktemp("video") / "clip.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10.0, (200, 160))
    for i in range(FRAMES):
        points = [(x + 2 * i, y) for x, y in POINTS]
        writer.write(cv2.cvtColor(blob_image(points, (160, 200), 9.0), cv2.COLOR_RGB2BGR))
    writer.release()
    data = path.read_bytes()
    movi = data.index(b"movi")
    starts = [i for i in range(movi, len(data) - 4) if data[i : i + 4] == b"00dc"]
    assert len(starts) >= FRAMES  # the frames, then the index (idx1) repeats the tags
    return data, starts[:FRAMES]


def _cut_video(path: Path, video_bytes, frames: int) -> Path:
    """The video cut just before frame ``frames`` (its header still announces 30), or whole."""
    data, starts = video_bytes
    path.write_bytes(data[: starts[frames]] if frames < FRAMES else data)
    return path


def _image(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), cv2.cvtColor(blob_image(POINTS, (160, 200), 9.0), cv2.COLOR_RGB2BGR))
    return path


def _fake_jpeg(path: Path) -> Path:
    path.write_bytes(b"\xff\xd8\xff\xe0" + b"not really a jpeg" * 10)
    return path


def _predict(model_file: Path, *args) -> object:
    return CliRunner().invoke(main, ["predict", str(model_file), *map(str, args)])


def _warnings(result) -> list[str]:
    return [ln for ln in result.output.splitlines() if ln.startswith("Warning: skipping ")]


def _skipped_ok(result, skipped: list[str], inputs: int) -> list[str]:
    """A run that wrote its outputs and skipped ``skipped`` (file names): exit 3, one
    warning per file naming it, and the summary as the last line."""
    assert result.exit_code == EXIT_SKIPPED == 3, result.output
    assert "Traceback" not in result.output and "Error:" not in result.output, result.output
    warnings = _warnings(result)
    assert len(warnings) == len(skipped), result.output
    for line, name in zip(warnings, skipped, strict=True):
        assert f"{os.sep}{name}: " in line, (name, line)
    summary = result.output.strip().splitlines()[-1]
    assert summary == (f"{len(skipped)} of {inputs} inputs skipped (see the warnings above): "
                       f"{', '.join(skipped)}"), summary  # fmt: skip
    return warnings


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


# --------------------------------------------------------------------------- images
def test_one_undecodable_image_does_not_sink_the_folder(model_file, tmp_path):
    folder = tmp_path / "images"
    for stem in ("5", "9"):
        _image(folder / f"{stem}.png")
    _fake_jpeg(folder / "fake.jpg")
    (folder / "notes.txt").write_text("not an input")
    (folder / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    out, draw = tmp_path / "out" / "p.json", tmp_path / "draw"
    result = _predict(model_file, folder, "-o", out, "--draw", draw)
    [line] = _skipped_ok(result, ["fake.jpg"], inputs=3)
    assert "cannot decode the image (corrupt or truncated" in line
    assert [r["file_name"] for r in json.loads(out.read_text())] == ["5.png", "9.png"]
    assert read_dlc_csv(out.with_suffix(".csv")).frame_names == ("5.png", "9.png")
    assert _files(draw) == {"5.jpg", "9.jpg"}


def test_huge_image_is_skipped_by_its_header(model_file, tmp_path):
    good, huge = _image(tmp_path / "5.png"), huge_png(tmp_path / "huge.png")
    out = tmp_path / "p.json"
    result = _predict(model_file, huge, good, "-o", out)  # decoding it would take 1.2 GB
    [line] = _skipped_ok(result, ["huge.png"], inputs=2)
    assert "20000x20000 = 400,000,000 pixels, over the limit of 178,956,970 (--max-pixels)" in line
    assert [r["file_name"] for r in json.loads(out.read_text())] == ["5.png"]
    assert not (tmp_path / "p_huge.csv").exists() and (tmp_path / "p_5.csv").is_file()
    lowered = _predict(model_file, good, "-o", out, "--max-pixels", "1000")
    assert lowered.exit_code == 1 and "200x160 = 32,000 pixels" in lowered.output


def _unreadable(path: Path) -> Path:
    """A file whose read fails: no read permission, or (as root, who reads anything) a link
    to /proc/self/mem, whose first page no process may read (EIO)."""
    if os.geteuid() == 0:
        path.symlink_to("/proc/self/mem")
    else:
        _image(path).chmod(0)
    return path


def test_unreadable_image_is_skipped(model_file, tmp_path):
    good, locked = _image(tmp_path / "5.png"), _unreadable(tmp_path / "locked.png")
    result = _predict(model_file, locked, good, "-o", tmp_path / "p.json")
    [line] = _skipped_ok(result, ["locked.png"], inputs=2)
    assert "cannot read the image file" in line


def test_every_input_bad_is_one_line_and_changes_nothing(model_file, tmp_path):
    bad = _fake_jpeg(tmp_path / "fake.jpg")
    out, draw = tmp_path / "out" / "p.json", tmp_path / "draw"
    out.parent.mkdir()
    out.write_text("old results")
    before = _files(tmp_path)
    result = _predict(model_file, bad, "-o", out, "--draw", draw)
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    errors = [ln for ln in result.output.splitlines() if ln.startswith("Error:")]
    assert len(errors) == 1 and "Traceback" not in result.output, result.output
    assert "no input could be read, nothing written" in errors[0] and "fake.jpg" in errors[0]
    assert out.read_text() == "old results" and _files(tmp_path) - before <= {"draw"}


# --------------------------------------------------------------------------- videos
def test_truncated_video_says_so_and_exits_non_zero(model_file, video_bytes, tmp_path):
    cut = _cut_video(tmp_path / "cut.avi", video_bytes, 13)
    good = _image(tmp_path / "5.png")
    out, draw = tmp_path / "out" / "p.json", tmp_path / "draw"
    result = _predict(model_file, cut, good, "-o", out, "--draw", draw, "--batch-size", "4")
    [line] = _skipped_ok(result, ["cut.avi"], inputs=2)
    assert "the video stops after 13 of the 30 frames its header announces" in line
    assert [r["file_name"] for r in json.loads(out.read_text())] == ["5.png"]
    assert _files(out.parent) == {"p.json", "p_5.csv", "p_5.h5"}  # nothing of cut.avi
    assert _files(draw) == {"5.jpg"}  # no labelled video, no temporary file


def test_video_short_by_the_tolerance_is_accepted(model_file, video_bytes, tmp_path):
    """A header overestimating by at most 1 % or 2 frames is accepted silently, as before."""
    cut = _cut_video(tmp_path / "short.avi", video_bytes, FRAMES - 2)
    out = tmp_path / "p.json"
    result = _predict(model_file, cut, "-o", out)
    assert result.exit_code == 0 and not _warnings(result), result.output
    assert len(read_dlc_csv(out.with_suffix(".csv")).frame_names) == FRAMES - 2


def test_video_opencv_cannot_open_is_skipped(model_file, video_bytes, tmp_path):
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"\x00" * 64)
    good = _cut_video(tmp_path / "whole.avi", video_bytes, FRAMES)
    out = tmp_path / "p.json"
    result = _predict(model_file, broken, good, "-o", out)
    [line] = _skipped_ok(result, ["broken.mp4"], inputs=2)
    assert "OpenCV cannot open this video" in line
    assert len(read_dlc_csv(tmp_path / "p_whole.csv").frame_names) == FRAMES
    empty = tmp_path / "empty.mp4"  # a copy that never started: said as such
    empty.write_bytes(b"")
    result = _predict(model_file, empty, good, "-o", out)
    [line] = _skipped_ok(result, ["empty.mp4"], inputs=2)
    assert line.endswith("empty.mp4: the video file is empty (0 bytes)"), line


def test_predict_inputs_reports_skips_to_its_caller(model_file, tmp_path):
    from kpnet.predict import predict_inputs

    good, bad = _image(tmp_path / "5.png"), _fake_jpeg(tmp_path / "fake.jpg")
    heard: list[str] = []
    summary = predict_inputs(model_file, [good, bad], tmp_path / "p.json", warn=heard.append)
    assert summary["inputs"] == 2 and summary["frames"] == 1
    [(path, why)] = summary["skipped"]
    assert path == str(bad) and why.startswith(f"{bad}: cannot decode the image")
    assert heard == [f"skipping {why}"]
