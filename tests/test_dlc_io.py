"""DeepLabCut-grade I/O: frame sources (images, folders, videos), DLC output CSV, label CSVs,
TrainingFraction / held-out frame splits and left/right flip-pair guessing."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import cv2
import numpy as np
import pytest

from kpnet.data.coco import guess_flip_pairs
from kpnet.data.dlc import (
    default_val_fraction,
    dlc_to_coco,
    load_dlc_records,
    load_label_csv,
    split_dlc,
)
from kpnet.data.dlc_output import h5_available, read_dlc_csv, write_dlc_csv, write_dlc_h5
from kpnet.data.records import DataError
from kpnet.frames import (
    Progress,
    VideoWriter,
    count_frames,
    iter_frames,
    list_inputs,
    natural_key,
    read_image,
)

DLC = Path(__file__).resolve().parents[2] / "shared" / "data" / "dlc_reaching"


def _need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"shared data not available: {path}")
    return path


def _write_video(path: Path, n: int = 12, fourcc: str = "MJPG", fps: float = 10.0) -> None:
    """n frames of 64x48, frame i a flat grey of level 20 * i (order is visible in the pixels)."""
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*fourcc), fps, (64, 48))
    assert writer.isOpened()
    for i in range(n):
        writer.write(np.full((48, 64, 3), 20 * i, np.uint8))
    writer.release()


def _write_png(path: Path, h: int = 40, w: int = 50, value: int = 128) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), np.full((h, w, 3), value, np.uint8))


# --------------------------------------------------------------------------- frames
@pytest.mark.parametrize("name,fourcc", [("clip.avi", "MJPG"), ("clip.mp4", "mp4v")])
def test_iter_frames_reads_a_video_in_order(tmp_path, name, fourcc):
    video = tmp_path / name
    _write_video(video, 12, fourcc)
    assert count_frames([video]) == 12
    frames = list(iter_frames([video]))
    assert len(frames) == 12
    assert [f.index for f in frames] == list(range(12))
    assert frames[3].name == f"{name}#000003" and frames[3].source == video
    assert all(f.image.shape == (48, 64, 3) and f.image.dtype == np.uint8 for f in frames)
    assert all(f.is_video and f.fps == pytest.approx(10.0) for f in frames)
    levels = [float(f.image.mean()) for f in frames]
    np.testing.assert_allclose(levels, [20 * i for i in range(12)], atol=4)


def test_iter_frames_folder_natural_order_and_single_image(tmp_path):
    folder = tmp_path / "frames"
    for i, name in enumerate(["img10.png", "img2.png", "img1.jpg"]):
        _write_png(folder / name, 20, 30, value=50 * i)
    (folder / "CollectedData_me.csv").write_text("not a frame")
    (folder / "sub").mkdir()
    _write_png(folder / "sub" / "ignored.png")
    frames = list(iter_frames([folder, folder / "img2.png"]))
    assert [(f.name, f.index) for f in frames] == [
        ("img1.jpg", 0), ("img2.png", 1), ("img10.png", 2), ("img2.png", 0)
    ]  # fmt: skip
    assert frames[0].input == folder and frames[3].input == folder / "img2.png"
    assert all(f.image.shape == (20, 30, 3) and not f.is_video for f in frames)
    assert count_frames([folder, folder / "img2.png"]) == 4
    assert sorted(["b10", "b9", "a"], key=natural_key) == ["a", "b9", "b10"]


def test_folder_with_a_video_yields_its_frames(tmp_path):
    _write_png(tmp_path / "a.png", 48, 64)
    _write_video(tmp_path / "b.avi", 3)
    frames = list(iter_frames([tmp_path]))
    assert [f.name for f in frames] == ["a.png", "b.avi#000000", "b.avi#000001", "b.avi#000002"]
    assert count_frames([tmp_path]) == 4


def test_bad_inputs_fail_with_one_line_naming_the_file(tmp_path):
    (tmp_path / "notes.txt").write_text("hi")
    (tmp_path / "empty").mkdir()
    (tmp_path / "broken.avi").write_bytes(b"\x00" * 1000)
    for bad, why in [
        (tmp_path / "gone.mp4", "no such file"),
        (tmp_path / "notes.txt", "not an image or video"),
        (tmp_path / "empty", "no image or video files"),
    ]:
        with pytest.raises(DataError, match=why) as err:
            list_inputs([bad])
        assert str(bad) in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(DataError, match="broken.avi: OpenCV cannot open"):
        list(iter_frames([tmp_path / "broken.avi"]))
    with pytest.raises(DataError, match="broken.avi"):
        count_frames([tmp_path / "broken.avi"])
    # a missing last input fails before the first frame is decoded
    _write_png(tmp_path / "ok.png")
    with pytest.raises(DataError, match="gone.png"):
        next(iter_frames([tmp_path / "ok.png", tmp_path / "gone.png"]))


def test_read_image_keeps_the_stored_pixel_grid_of_exif_rotated_jpegs(tmp_path):
    from PIL import Image

    stored = np.zeros((20, 40, 3), np.uint8)  # 20 high, 40 wide; left half red
    stored[:, :20, 0] = 255
    stored[:, 20:, 2] = 255
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 CW to display
    path = tmp_path / "phone.jpg"
    Image.fromarray(stored).save(path, exif=exif.tobytes(), quality=95)
    displayed = cv2.imread(str(path), cv2.IMREAD_COLOR)  # OpenCV's default applies EXIF
    assert displayed.shape[:2] == (40, 20)
    image = read_image(path)
    assert image.shape == (20, 40, 3) and image.dtype == np.uint8
    assert image[10, 5, 0] > 200 and image[10, 35, 2] > 200  # red left, blue right: not rotated


def test_read_image_formats_and_errors(tmp_path):
    from PIL import Image

    pixels = np.random.default_rng(0).integers(0, 255, (12, 16, 3), dtype=np.uint8)
    for suffix in ("png", "bmp", "tiff"):  # TIFF: TensorFlow cannot, OpenCV decodes
        Image.fromarray(pixels).save(tmp_path / f"x.{suffix}")
        np.testing.assert_array_equal(read_image(tmp_path / f"x.{suffix}"), pixels)
    grey = tmp_path / "grey.png"
    Image.fromarray(pixels[..., 0]).save(grey)
    assert read_image(grey).shape == (12, 16, 3)
    png = (tmp_path / "x.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(png[:60])
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "text.tif").write_text("not an image")
    for name, why in [
        ("cut.png", "cannot decode"),
        ("empty.jpg", "empty"),
        ("text.tif", "cannot decode"),
        ("gone.png", "not found"),
    ]:
        with pytest.raises(DataError, match=why) as err:
            read_image(tmp_path / name)
        assert name in str(err.value) and "\n" not in str(err.value)


def test_video_writer_round_trip_and_atomic_failure(tmp_path):
    out = tmp_path / "out" / "labelled.mp4"
    with VideoWriter(out, fps=12.5) as writer:
        for i in range(5):
            writer.write(np.full((48, 64, 3), 40 * i, np.uint8))
    assert writer.frames == 5 and out.is_file()
    frames = list(iter_frames([out]))
    assert len(frames) == 5 and frames[0].image.shape == (48, 64, 3)
    assert frames[0].fps == pytest.approx(12.5)
    assert list(out.parent.iterdir()) == [out]  # no temporary file left

    failed = tmp_path / "failed.avi"
    with pytest.raises(RuntimeError), VideoWriter(failed) as writer:
        writer.write(np.zeros((48, 64, 3), np.uint8))
        raise RuntimeError("drawing failed")
    assert not failed.exists() and not list(tmp_path.glob(".failed*"))

    with pytest.raises(ValueError, match="frame 1 is 32x48"), VideoWriter(failed) as writer:
        writer.write(np.zeros((48, 64, 3), np.uint8))
        writer.write(np.zeros((48, 32, 3), np.uint8))
    with pytest.raises(DataError, match=r"labelled.gif: cannot write a \.gif video"):
        VideoWriter(tmp_path / "labelled.gif")


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_reports_frames_and_fps():
    log = io.StringIO()
    with Progress(10, "predict", stream=log) as bar:
        for _ in range(10):
            bar.update()
    text = log.getvalue()
    assert text.count("\n") == 1 and "\r" not in text  # not a terminal: the final line only
    assert text.startswith("predict: 10/10 frames (100%)") and " fps" in text

    tty = _Tty()
    bar = Progress(None, "clip.avi", stream=tty, interval=0.0)
    for _ in bar.iterate(range(3)):
        pass
    bar.close()
    bar.close()  # once only
    assert tty.getvalue().count("\r") == 3 and tty.getvalue().count("\n") == 1
    assert "clip.avi: 3 frames" in tty.getvalue().splitlines()[-1].split("\r")[-1]


# --------------------------------------------------------------------------- DLC output
def test_dlc_csv_written_with_three_header_rows_and_read_back(tmp_path):
    rng = np.random.default_rng(0)
    n, parts = 12, ["snout", "leftear", "rightear"]
    xy = rng.uniform(0, 64, (n, 3, 2))
    xy[4, 1] = np.nan  # no estimate: empty cells
    likelihood = rng.uniform(0, 1, (n, 3))
    path = write_dlc_csv(tmp_path / "clipDLC_kpnet.csv", "kpnet_m", parts, range(n), xy, likelihood)
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["scorer"] + ["kpnet_m"] * 9
    assert rows[1] == ["bodyparts"] + [p for p in parts for _ in range(3)]
    assert rows[2] == ["coords"] + ["x", "y", "likelihood"] * 3
    assert len(rows) == 3 + n and [r[0] for r in rows[3:]] == [str(i) for i in range(n)]
    assert rows[7][4:6] == ["", ""]
    back = read_dlc_csv(path)
    assert back.scorer == "kpnet_m" and back.bodyparts == tuple(parts)
    assert back.frame_names == tuple(str(i) for i in range(n))
    np.testing.assert_allclose(back.xy, xy, atol=1e-4, equal_nan=True)
    np.testing.assert_allclose(back.likelihood, likelihood, atol=1e-6)
    assert ((back.likelihood >= 0) & (back.likelihood <= 1)).all()
    assert list(tmp_path.iterdir()) == [path]  # written atomically: no temporary file left


def test_dlc_csv_rejects_bad_arrays_and_reads_label_files(tmp_path):
    xy, lik = np.zeros((2, 1, 2)), np.full((2, 1), 0.5)
    with pytest.raises(ValueError, match="likelihood must lie in 0..1"):
        write_dlc_csv(tmp_path / "a.csv", "s", ["a"], [0, 1], xy, lik + 1.0)
    with pytest.raises(ValueError, match="keypoints: shape"):
        write_dlc_csv(tmp_path / "a.csv", "s", ["a", "b"], [0, 1], xy, lik)
    assert not (tmp_path / "a.csv").exists()
    labels = tmp_path / "CollectedData_me.csv"
    labels.write_text(
        "scorer,,,me,me\nbodyparts,,,a,a\ncoords,,,x,y\nlabeled-data,v,img0.png,1.5,2\n"
    )
    table = read_dlc_csv(labels)
    assert table.likelihood is None and table.frame_names == ("labeled-data/v/img0.png",)
    np.testing.assert_allclose(table.xy, [[[1.5, 2.0]]])
    (tmp_path / "bad.csv").write_text("frame,x,y\n0,1,2\n")
    with pytest.raises(DataError, match="bad.csv: not a DeepLabCut CSV"):
        read_dlc_csv(tmp_path / "bad.csv")


def test_dlc_h5_is_optional(tmp_path):
    args = ("s", ["a", "b"], ["img0.png"], np.ones((1, 2, 2)), np.full((1, 2), 0.5))
    written = write_dlc_h5(tmp_path / "p.h5", *args)
    if not h5_available():
        assert written is None and not (tmp_path / "p.h5").exists()
        return
    import pandas as pd

    frame = pd.read_hdf(written, "df_with_missing")
    assert list(frame.columns.names) == ["scorer", "bodyparts", "coords"]
    assert frame.shape == (1, 6)


# --------------------------------------------------------------------------- label CSVs
def _lp_project(root: Path, csv_dir: str = ".") -> Path:
    """A lightning-pose-style project: CollectedData.csv + labeled-data/vid/img{0,1}.png."""
    for i in range(2):
        _write_png(root / "labeled-data" / "vid" / f"img{i}.png", 40, 50)
    csv_path = root / csv_dir / "CollectedData.csv"
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    rows = [
        ["scorer", "lp", "lp", "lp", "lp", "lp", "lp"],
        ["bodyparts", "nose", "nose", "ear_L", "ear_L", "ear_R", "ear_R"],
        ["coords", "x", "y", "x", "y", "x", "y"],
        ["labeled-data/vid/img0.png", "10", "12", "5", "6", "20", "6.5"],
        ["labeled-data/vid/img1.png", "11", "13", "NaN", "NaN", "21", "7"],
    ]
    with open(csv_path, "w", newline="") as f:
        csv.writer(f).writerows(rows)
    return csv_path


@pytest.mark.parametrize("csv_dir", [".", "labels"])
def test_lightning_pose_csv_is_read_without_a_config(tmp_path, csv_dir):
    csv_path = _lp_project(tmp_path, csv_dir)
    spec, records = load_dlc_records(csv_path)  # data.dlc.project may name a CSV
    assert spec.names == ("nose", "ear_L", "ear_R") and spec.flip_pairs == ((1, 2),)
    assert [Path(r.image_path) for r in records] == [
        tmp_path / "labeled-data" / "vid" / f"img{i}.png" for i in range(2)
    ]
    np.testing.assert_allclose(records[1].keypoints, [[11, 13, 2], [0, 0, 0], [21, 7, 2]])
    assert records[0].image_size == (40, 50) and records.report.kept == 2
    coco = dlc_to_coco(csv_path, tmp_path / "coco.json")
    assert coco["images"][0]["file_name"] == "labeled-data/vid/img0.png"
    assert default_val_fraction(csv_path) == 0.2


def test_label_csv_errors_name_the_file_and_row(tmp_path):
    csv_path = _lp_project(tmp_path)
    text = csv_path.read_text().replace("img1.png", "gone.png")
    csv_path.write_text(text)
    with pytest.raises(DataError, match=r"CollectedData.csv:5: image .*gone.png not found"):
        load_label_csv(csv_path)
    _, records = load_label_csv(csv_path, on_error="skip")
    assert len(records) == 1 and records.report.skipped == {"missing_image": 1}
    csv_path.write_text("image,nose_x,nose_y\na.png,1,2\n")
    with pytest.raises(DataError, match="CollectedData.csv: not a DeepLabCut CSV"):
        load_dlc_records(csv_path)


# --------------------------------------------------------------------------- splits
def _tmp_project(root: Path, training_fraction: str | None = "[0.8]") -> Path:
    """Two video folders, 5 labelled frames each (img8..img12: natural order matters)."""
    config = "Task: t\nbodyparts: [a, b]\n"
    if training_fraction is not None:
        config += f"TrainingFraction: {training_fraction}\n"
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.yaml").write_text(config)
    for video in ("v1", "v2"):
        rows = [["scorer", "me", "me", "me", "me"], ["bodyparts", "a", "a", "b", "b"],
                ["coords", "x", "y", "x", "y"]]  # fmt: skip
        for i in (12, 8, 9, 10, 11):  # CSV order is not file order
            _write_png(root / "labeled-data" / video / f"img{i}.png", 20, 30)
            rows.append([f"labeled-data/{video}/img{i}.png", "3", "4", "10", "12"])
        with open(root / "labeled-data" / video / "CollectedData_me.csv", "w", newline="") as f:
            csv.writer(f).writerows(rows)
    return root


def _names(records) -> list[str]:
    return sorted("/".join(Path(r.image_path).parts[-2:]) for r in records)


def test_split_on_a_tmp_project(tmp_path):
    project = _tmp_project(tmp_path / "proj")
    _, records = load_dlc_records(project)
    assert len(records) == 10 and default_val_fraction(project) == pytest.approx(0.2)
    train, val = split_dlc(records, default_val_fraction(project), seed=3)
    assert (len(train), len(val)) == (8, 2)
    assert {r.image_path for r in train}.isdisjoint(r.image_path for r in val)
    assert split_dlc(records, 0.2, seed=3) == (train, val)  # deterministic
    _, val = split_dlc(records, val_last=2)
    assert _names(val) == ["v1/img11.png", "v1/img12.png", "v2/img11.png", "v2/img12.png"]
    _, val = split_dlc(records, val_frames=["labeled-data/v1/img8.png", "v2/img1?.png"], val_last=1)
    assert _names(val) == ["v1/img12.png", "v1/img8.png", "v2/img10.png", "v2/img11.png",
                           "v2/img12.png"]  # fmt: skip
    _, val = split_dlc(records, val_frames=["img9.png"])  # a bare name: in every folder
    assert _names(val) == ["v1/img9.png", "v2/img9.png"]
    with pytest.raises(DataError, match="'v3/\\*' matches no labelled frame"):
        split_dlc(records, val_frames=["v3/*"])
    with pytest.raises(DataError, match="none is left for training"):
        split_dlc(records, val_last=5)
    assert split_dlc(records, 0.0) == (list(records), [])
    assert default_val_fraction(_tmp_project(tmp_path / "no_tf", None)) == 0.2
    with pytest.raises(DataError, match="config.yaml: TrainingFraction"):
        default_val_fraction(_tmp_project(tmp_path / "bad", "[1.5]"))


def test_split_on_dlc_reaching():
    project = _need(DLC)
    _, records = load_dlc_records(project)
    assert len(records) == 55
    fraction = default_val_fraction(project)  # TrainingFraction: [0.95]
    assert fraction == pytest.approx(0.05)
    train, val = split_dlc(records, fraction)
    assert (len(train), len(val)) == (52, 3)  # DLC trains on round(0.95 * 55) = 52 frames
    train, val = split_dlc(records, val_last=10)
    names = sorted((Path(r.image_path).name for r in records), key=natural_key)
    assert sorted(Path(r.image_path).name for r in val) == sorted(names[-10:])
    assert len(train) == 45
    _, val = split_dlc(records, val_frames=["labeled-data/reachingvideo1/img005.png", "img02*"])
    assert sorted(Path(r.image_path).name for r in val) == ["img005.png", "img020.png",
                                                            "img023.png", "img028.png"]  # fmt: skip


def test_recipe_keys_drive_the_dlc_split(tmp_path):
    from kpnet.data.sources import load_data
    from kpnet.recipe import RecipeError, load_recipe

    project = _tmp_project(tmp_path / "proj", "[0.7]")
    recipe_path = tmp_path / "r.yaml"
    recipe_path.write_text("data:\n  source: dlc\n  dlc:\n    project: proj\n")
    _, train, val = load_data(load_recipe(recipe_path))
    assert (len(train), len(val)) == (7, 3)  # 1 - TrainingFraction
    _, train, val = load_data(load_recipe(recipe_path, ["data.dlc.val_fraction=0.5"]))
    assert (len(train), len(val)) == (5, 5)
    _, train, val = load_data(load_recipe(recipe_path, ["data.dlc.val_last=1"]))
    assert _names(val) == ["v1/img12.png", "v2/img12.png"]
    _, _, val = load_data(load_recipe(recipe_path, ["data.dlc.val_frames=[v2/img8.png]"]))
    assert _names(val) == ["v2/img8.png"]
    with pytest.raises(RecipeError, match="data.dlc: val_frames: 'v9.png' matches no"):
        load_data(load_recipe(recipe_path, ["data.dlc.val_frames=[v9.png]"]))
    with pytest.raises(RecipeError, match="val_fraction and val_frames / val_last both set"):
        load_recipe(recipe_path, ["data.dlc.val_fraction=0.1", "data.dlc.val_last=2"])
    csv_recipe = tmp_path / "csv.yaml"
    csv_path = _lp_project(tmp_path / "lp")
    csv_recipe.write_text(f"data:\n  source: dlc\n  dlc:\n    project: {csv_path}\n")
    spec, train, val = load_data(load_recipe(csv_recipe))
    assert spec.names == ("nose", "ear_L", "ear_R") and (len(train), len(val)) == (1, 1)
    assert project.is_dir()


# --------------------------------------------------------------------------- flip pairs
@pytest.mark.parametrize(
    "names,pairs",
    [
        (["leftear", "rightear"], ((0, 1),)),
        (["left_ear", "right_ear"], ((0, 1),)),
        (["l_ear", "r_ear"], ((0, 1),)),
        (["ear_l", "ear_r"], ((0, 1),)),
        (["earL", "earR"], ((0, 1),)),
        (["EarLeft", "EarRight"], ((0, 1),)),
        (["LeftEar", "RightEar"], ((0, 1),)),
        (["L Ear", "R Ear"], ((0, 1),)),
        (["LEar", "REar"], ((0, 1),)),
        (["LEFT_EAR", "right-ear"], ((0, 1),)),
        (["ear-L", "Ear_R"], ((0, 1),)),
        (["frontLeftPaw", "frontRightPaw", "hindLeftPaw", "hindRightPaw"], ((0, 1), (2, 3))),
        (["paw_l_1", "paw_r_1", "paw_l_2", "paw_r_2"], ((0, 1), (2, 3))),
        (["nose", "left_eye", "right_eye", "pin_l", "pin_r"], ((1, 2), (3, 4))),
        (["right_hand", "snout", "left_hand"], ((0, 2),)),
        (["l", "r"], ((0, 1),)),
        # no side word: never paired
        (["lip", "rip"], ()),
        (["Leg", "Reg"], ()),
        (["lear", "rear"], ()),
        (["Lid", "Rid"], ()),
        (["tail_base", "tail_tip", "snout"], ()),
        (["LF", "RF", "LH", "RH"], ()),  # abbreviations are left to an explicit spec
        # one partner only, and no pair without the mirror name
        (["left_ear", "l_ear", "r_ear"], ((1, 2),)),
        (["left_ear", "nose"], ()),
    ],
)
def test_guess_flip_pairs(names, pairs):
    assert guess_flip_pairs(names) == pairs
