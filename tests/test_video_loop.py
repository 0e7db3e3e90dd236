"""The DeepLabCut user's loop on short OpenCV-written videos: predict (CSV + h5, filtered,
drawn), filter, plot, outliers into a project, and the project read back as fit reads it."""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
from _benchmarks import load_benchmark
from _blobs import blob_image, save_blob_model
from click.testing import CliRunner

from kpnet.cli import main
from kpnet.spec import KeypointSpec
from kpnet.tracks import filter_tracks, read_tracks

INPUT = (64, 64)
SPEC = KeypointSpec(names=("red", "green", "blue"), skeleton=((0, 1), (1, 2)))
FRAMES = 40
BLANK = (10, 11, 12)  # no blobs: the model is unsure there
JUMP = 25  # the blobs leap 40 px for one frame


def _points(i: int) -> np.ndarray:
    """Blob centres (x, y) of frame i: a slow drift, the JUMP frame displaced."""
    base = np.array([(70.0, 60.0), (100.0, 95.0), (55.0, 110.0)])
    shift = np.array([1.5 * i, 0.5 * i])
    return base + shift + (np.array([40.0, 0.0]) if i == JUMP else 0.0)


def _write_video(path: Path, frames: int = FRAMES) -> Path:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10.0, (200, 160))
    for i in range(frames):
        rgb = blob_image([] if i in BLANK else list(map(tuple, _points(i))), (160, 200), 9.0)
        writer.write(cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    writer.release()
    return path


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> Path:
    """A keypoints model whose channel c is the average-pooled colour channel c / 255."""
    return save_blob_model(tmp_path_factory.mktemp("model") / "keypoints.keras", SPEC, INPUT)


@pytest.fixture(scope="module")
def predicted(model_file, tmp_path_factory) -> dict[str, Path]:
    """`kpnet predict clip.avi --filter median --draw ... --trail 3` once for the module."""
    root = tmp_path_factory.mktemp("loop")
    video = _write_video(root / "clip.avi")
    out = root / "out" / "clip.json"
    args = [
        "predict",
        str(model_file),
        str(video),
        "-o",
        str(out),
        "--filter",
        "median",
        "--draw",
        str(root / "draw"),
        "--trail",
        "3",
        "--pcutoff",
        "0.3",
        "--batch-size",
        "8",
    ]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    return {"root": root, "video": video, "csv": out.with_suffix(".csv"), "output": res.output}


def _one_line_error(res) -> str:
    assert res.exit_code != 0 and "Traceback" not in res.output
    assert isinstance(res.exception, SystemExit), res.exception  # a click error, not a crash
    lines = [line for line in res.output.splitlines() if line.startswith("Error:")]
    assert len(lines) == 1, res.output
    return lines[0]


# --------------------------------------------------------------------------- predict
def test_predict_writes_dlc_csv_h5_filtered_and_a_labelled_video(predicted):
    csv_path = predicted["csv"]
    frame = pd.read_csv(csv_path, header=[0, 1, 2], index_col=0)  # DLC's own reading
    assert frame.shape == (FRAMES, 9)
    assert list(dict.fromkeys(frame.columns.get_level_values(1))) == list(SPEC.names)
    assert list(frame.columns.get_level_values(2)[:3]) == ["x", "y", "likelihood"]
    h5 = pd.read_hdf(csv_path.with_suffix(".h5"), "df_with_missing")
    assert list(h5.columns.names) == ["scorer", "bodyparts", "coords"]
    np.testing.assert_allclose(h5.to_numpy(), frame.to_numpy(), atol=1e-3)
    tracks = read_tracks(csv_path.with_suffix(".h5"))
    for i in (0, 20, JUMP, 39):
        np.testing.assert_allclose(tracks.xy[i], _points(i), atol=3.0)
    assert tracks.likelihood[list(BLANK)].max() < 0.1 < tracks.likelihood[0].min()
    filtered = read_tracks(csv_path.with_name("clip_filtered.csv"))
    assert (csv_path.with_name("clip_filtered.h5")).is_file()
    assert np.abs(filtered.xy[JUMP] - _points(JUMP - 1)).max() < 8  # the jump is filtered out
    labelled = cv2.VideoCapture(str(predicted["root"] / "draw" / "clip_labelled.mp4"))
    assert int(labelled.get(cv2.CAP_PROP_FRAME_COUNT)) == FRAMES
    assert "40/40 frames" in predicted["output"] and "fps" in predicted["output"]


# --------------------------------------------------------------------------- filter
def test_filters_beat_the_raw_track_on_spikes_and_dropouts(tmp_path):
    bench = load_benchmark("filter")  # the README's filter figures come from it
    tracks, truth = bench.synthetic_track()
    rmse = lambda xy: bench.rmse(xy, truth)  # noqa: E731
    raw = rmse(tracks.xy)
    median = rmse(filter_tracks(tracks, "median", window=5).xy)
    savgol = rmse(filter_tracks(tracks, "savgol", window=7).xy)
    naive = rmse(filter_tracks(tracks, "median", window=5, pcutoff=0.0).xy)  # averages dropouts
    print(f"rmse px: raw {raw:.1f}, median {median:.2f}, savgol {savgol:.2f}, naive {naive:.1f}")
    # python benchmarks/filter.py prints these errors (README)
    assert raw > 30 and median < 4.0 and median < raw / 10
    assert savgol < raw / 3  # spikes leak into the polynomial fit
    assert median < naive / 3  # likelihood-aware: dropouts bridged, not averaged in
    # the command: same numbers through the files
    from kpnet.tracks import write_tracks

    write_tracks(tmp_path / "t.csv", tracks)
    res = CliRunner().invoke(
        main, ["filter", str(tmp_path / "t.h5"), "-o", str(tmp_path / "t_filtered.csv")]
    )
    assert res.exit_code == 0, res.output
    back = read_tracks(tmp_path / "t_filtered.h5")
    assert rmse(back.xy) == pytest.approx(median, abs=1e-3)
    np.testing.assert_allclose(back.likelihood, tracks.likelihood)


# --------------------------------------------------------------------------- plot
def test_plot_writes_the_pictures(predicted, tmp_path):
    out = tmp_path / "plots"
    args = [
        "plot",
        str(predicted["csv"]),
        "-o",
        str(out),
        "--video",
        str(predicted["video"]),
        "--pcutoff",
        "0.3",
    ]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    names = sorted(p.name for p in out.iterdir())
    assert names == ["clip_hist.png", "clip_likelihood.png", "clip_trajectory.png", "clip_xy.png"]
    trajectory = cv2.imread(str(out / "clip_trajectory.png"))
    assert trajectory.shape[:2] == (160, 200)  # drawn over the first frame, its size


# --------------------------------------------------------------------------- outliers
CONFIG = """\
# Project definitions (do not edit)
Task: blobs
scorer: me
video_sets:
  /somewhere/old.avi:
    crop: 0, 200, 0, 160
bodyparts:
- red
- green
- blue
skeleton: [[red, green]]
iteration: 0
TrainingFraction:
- 0.8
"""


def _tiny_project(root: Path, bodyparts=("red", "green", "blue")) -> Path:
    """config.yaml + labeled-data/old/ (2 labelled frames, CSV)."""
    folder = root / "labeled-data" / "old"
    folder.mkdir(parents=True)
    header = [
        ["scorer"] + ["me"] * 6,
        ["bodyparts"] + [b for b in bodyparts for _ in "xy"],
        ["coords"] + ["x", "y"] * 3,
    ]
    rows = [",".join(r) for r in header]
    for i in (3, 7):
        rgb = blob_image(list(map(tuple, _points(i))), (160, 200), 9.0)
        cv2.imwrite(str(folder / f"img{i:02d}.png"), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
        values = ",".join(f"{v:.2f}" for v in _points(i).reshape(-1))
        rows.append(f"labeled-data/old/img{i:02d}.png,{values}")
    (folder / "CollectedData_me.csv").write_text("\n".join(rows) + "\n")
    config = CONFIG.replace("- red\n- green\n- blue", "\n".join(f"- {b}" for b in bodyparts))
    (root / "config.yaml").write_text(config)
    return root


def test_outliers_into_a_project_and_fit_reads_the_merged_labels(predicted, tmp_path):
    from kpnet.data.sources import load_data
    from kpnet.recipe import load_recipe

    project = _tiny_project(tmp_path / "proj")
    video = predicted["video"]
    args = [
        "outliers",
        str(predicted["csv"]),
        str(video),
        "--project",
        str(project),
        "-n",
        "4",
        "--pcutoff",
        "0.3",
    ]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    folder = project / "labeled-data" / "clip"
    images = sorted(p.name for p in folder.glob("img*.png"))
    assert len(images) == 4 and all(len(n) == len("img00.png") for n in images)  # 40 frames
    picked = sorted(int(n[3:5]) for n in images)
    assert set(picked) & set(BLANK) and {JUMP, JUMP + 1} & set(picked)  # unsure, and the jump
    assert picked == sorted(set(picked)) and max(picked) - min(picked) >= 10  # spread out
    machine = pd.read_hdf(folder / "machinelabels-iter0.h5", "df_with_missing")
    assert list(machine.columns.names) == ["scorer", "bodyparts", "coords"]
    assert machine.index[0][:2] == ("labeled-data", "clip") and machine.shape == (4, 9)
    assert (folder / "machinelabels.csv").is_file()
    config = (project / "config.yaml").read_text()
    assert config.startswith("# Project definitions (do not edit)\n")  # comments kept
    import yaml

    sets = yaml.safe_load(config)["video_sets"]
    assert set(sets) == {"/somewhere/old.avi", str(video.resolve())}
    assert sets[str(video.resolve())] == {"crop": "0, 200, 0, 160"}
    # the labeller corrects the guesses and saves CollectedData_me.h5 only (DLC's GUI)
    labels = machine.drop(columns="likelihood", level="coords")
    labels.columns = labels.columns.set_levels(["me"], level="scorer")
    labels.to_hdf(folder / "CollectedData_me.h5", key="df_with_missing", mode="w")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"data:\n  source: dlc\n  dlc:\n    project: {project}\n    val_fraction: 0.0\n"
    )
    spec, train, _ = load_data(load_recipe(recipe))
    assert spec.names == SPEC.names and len(train) == 2 + 4
    merged = {Path(r.image_path).name: r for r in train if "clip" in r.image_path}
    np.testing.assert_allclose(
        merged[images[0]].keypoints[:, :2],
        machine.iloc[0].to_numpy().reshape(3, 3)[:, :2],
        atol=1e-4,
    )
    # a second run leaves the frames already extracted out
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    assert len(list(folder.glob("img*.png"))) > 4
    assert len(pd.read_hdf(folder / "machinelabels-iter0.h5")) == len(list(folder.glob("img*")))


# --------------------------------------------------------------------------- bad input
def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def test_bad_input_gives_one_line_and_writes_nothing(model_file, predicted, tmp_path):
    # a truncated video: header says 40 frames, 24 decode
    whole = _write_video(tmp_path / "whole.avi").read_bytes()
    (tmp_path / "cut.avi").write_bytes(whole[: int(len(whole) * 0.6)])
    out = tmp_path / "out"
    before = _files(tmp_path)
    res = CliRunner().invoke(
        main,
        [
            "predict",
            str(model_file),
            str(tmp_path / "cut.avi"),
            "-o",
            str(out / "p.json"),
            "--draw",
            str(out),
        ],
    )
    line = _one_line_error(res)
    assert "cut.avi" in line and "truncated" in line
    assert _files(tmp_path) - before <= {"out"}  # no json, csv, h5, video, temp file
    # a video with 0 frames
    cv2.VideoWriter(
        str(tmp_path / "empty.avi"), cv2.VideoWriter_fourcc(*"MJPG"), 10.0, (200, 160)
    ).release()
    res = CliRunner().invoke(
        main, ["predict", str(model_file), str(tmp_path / "empty.avi"), "-o", str(out / "p.json")]
    )
    assert "empty.avi" in _one_line_error(res) and not (out / "p.csv").exists()
    # a table from another project (other body parts)
    other = _tiny_project(tmp_path / "other", bodyparts=("Hand", "Finger1", "Tongue"))
    before = _files(other)
    args = ["outliers", str(predicted["csv"]), str(predicted["video"]), "--project", str(other)]
    line = _one_line_error(CliRunner().invoke(main, args))
    assert "body parts" in line and "Hand" in line
    assert _files(other) == before and "clip" not in (other / "config.yaml").read_text()
    # a project folder that does not exist
    args[-1] = str(tmp_path / "nowhere")
    assert "no such DeepLabCut project" in _one_line_error(CliRunner().invoke(main, args))
    assert not (tmp_path / "nowhere").exists()
    # a truncated video for outliers (frames picked past its end), and plot / filter
    project = _tiny_project(tmp_path / "p2")
    before = _files(project)
    args = [
        "outliers",
        str(predicted["csv"]),
        str(tmp_path / "cut.avi"),
        "--project",
        str(project),
        "-n",
        "40",
        "--pcutoff",
        "1.0",
    ]
    assert "cut.avi" in _one_line_error(CliRunner().invoke(main, args))
    assert _files(project) == before
    res = CliRunner().invoke(main, ["plot", str(tmp_path / "gone.csv"), "-o", str(out)])
    assert "gone.csv" in _one_line_error(res)
    (tmp_path / "labels.csv").write_text("scorer,me,me\nbodyparts,a,a\ncoords,x,y\n0,1,2\n")
    res = CliRunner().invoke(main, ["filter", str(tmp_path / "labels.csv")])
    assert "label file" in _one_line_error(res)
    res = CliRunner().invoke(main, ["filter", str(predicted["csv"]), "--window", "4"])
    assert "odd" in _one_line_error(res)
    assert not [p for p in tmp_path.rglob(".tmp.*")] and os.path.isdir(tmp_path)


# --------------------------------------------------------------------------- helpers
def test_prefetch_hands_on_the_producers_error_in_order():
    from kpnet.data.records import DataError
    from kpnet.frames import prefetch

    def frames():
        yield from range(3)
        raise DataError("clip.mp4: the video stops after 3 of the 40 frames")

    got = []
    with pytest.raises(DataError, match="stops after 3"):
        for item in prefetch(frames(), size=1):
            got.append(item)
    assert got == [0, 1, 2]
    stream = prefetch(iter(range(1000)), size=2)  # closed early: the thread stops
    assert next(stream) == 0
    stream.close()


@pytest.mark.parametrize(
    "video_sets",
    ["video_sets: {}\n", "video_sets:\n", "video_sets: {/a.mp4: {crop: '0, 4, 0, 3'}}\n", ""],
)
def test_add_video_set_keeps_the_rest_of_config_yaml(video_sets):
    import yaml

    from kpnet.outliers import add_video_set

    text = f"# top comment\nTask: t\n{video_sets}bodyparts:\n- a\niteration: 2\n"
    new = add_video_set(text, "/data/my clip.mp4", 640, 480)
    config = yaml.safe_load(new)
    assert config["video_sets"]["/data/my clip.mp4"] == {"crop": "0, 640, 0, 480"}
    assert config["bodyparts"] == ["a"] and config["iteration"] == 2 and config["Task"] == "t"
    if "{/a.mp4" not in video_sets:  # flow style with entries is rewritten as plain YAML
        assert new.startswith("# top comment\n")
    assert add_video_set(new, "/data/my clip.mp4", 640, 480) == new  # already there


@pytest.mark.slow
def test_fit_trains_on_the_merged_project(predicted, tmp_path):
    """One tiny epoch of `kpnet fit` on old labels + the outlier frames (h5-only labels)."""
    from kpnet.recipe import load_recipe
    from kpnet.training import fit

    project = _tiny_project(tmp_path / "proj")
    args = ["outliers", str(predicted["csv"]), str(predicted["video"]), "--project",
            str(project), "-n", "4", "--pcutoff", "0.3"]  # fmt: skip
    assert CliRunner().invoke(main, args).exit_code == 0
    folder = project / "labeled-data" / "clip"
    machine = pd.read_hdf(folder / "machinelabels-iter0.h5")
    labels = machine.drop(columns="likelihood", level="coords")
    labels.columns = labels.columns.set_levels(["me"], level="scorer")
    labels.to_hdf(folder / "CollectedData_me.h5", key="df_with_missing", mode="w")
    recipe = load_recipe(Path(__file__).resolve().parents[1] / "recipes" / "dlc-project.yaml", [
        f"data.dlc.project={project}", "model.backbone=tiny", "model.backbone_weights=null",
        "model.input_size=[64,64]", "model.pyramid_channels=16", "train.epochs=1",
        "train.batch_size=2", "train.steps_per_epoch=2", "data.dlc.val_last=1",
        "train.validation_every=1", "train.verbose=0"])  # fmt: skip
    result = fit(recipe, tmp_path / "run")
    assert (tmp_path / "run" / "best.keras").exists()
    assert result["metrics"]["num_instances"] == 2  # the last frame of each video folder
