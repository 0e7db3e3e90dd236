"""Run folders, recipes and DeepLabCut projects at URLs (issue 14): ``ram://``, TensorFlow's
in-memory filesystem, stands in for ``gs://`` / ``s3://``.

One tiny ``kpnet fit`` reads its recipe and a DLC project from ``ram://`` and writes its run
folder there; ``kpnet evaluate`` / ``predict`` / ``export`` then read that folder and write
their outputs to ``ram://`` too (about 60 s in all), and a second fit resumes it (slow).
``ram://`` lives in this process only, so every command runs in-process (``CliRunner``).
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from click.testing import CliRunner
from test_dlc_io import _tmp_project

import kpnet
from kpnet import fs
from kpnet.cli import main
from kpnet.data.dlc import default_val_fraction, load_dlc_records
from kpnet.recipe import RecipeError, load_recipe

RECIPE = """\
data:
  source: dlc
  dlc: {project: proj, val_last: 1}   # relative: against the recipe's ram:// folder
  mode: whole
model: {backbone: tiny, input_size: [64, 64], pyramid_channels: 16}
augment: {flip: false}
train: {epochs: 1, batch_size: 4, steps_per_epoch: 2, verbose: 0, lr_schedule: constant,
        warmup_epochs: 0, precise_bn_batches: 1}
evaluation: {flip_test: false}
export: {saved_model: true}
"""
RUN_FILES = ("recipe.resolved.yaml", "spec.json", "codec.json", "best.keras", "last.keras",
             "keypoints.keras", "history.csv", "curves.png", "metrics.json",
             "backup/latest.weights.h5", "backup/training_metadata.json",
             "saved_model/saved_model.pb")  # fmt: skip


def _ram(name: str) -> str:
    return f"ram://kpnet-test-{uuid.uuid4().hex[:8]}/{name}"


def _upload(folder: Path, url: str) -> None:
    """Copy a local folder to ``url`` through :mod:`kpnet.fs`."""
    for root, _, names in os.walk(folder):
        for name in names:
            rel = os.path.relpath(os.path.join(root, name), folder)
            fs.write_atomic(fs.join(url, *Path(rel).parts), Path(root, name).read_bytes())


def _files(url: str) -> list[str]:
    """Every file under ``url``, relative to it."""
    return sorted(
        os.path.relpath(fs.join(root, n), url) for root, _, names in tf.io.gfile.walk(url)
        for n in names
    )  # fmt: skip


def _cli(*args: str):
    result = CliRunner().invoke(main, list(args), catch_exceptions=False)
    assert "Traceback" not in result.output, result.output
    return result


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> tuple[Path, str]:
    """A tiny DLC project (two videos, five frames each) on disk and its copy at a URL."""
    local = _tmp_project(tmp_path_factory.mktemp("dlc") / "proj")
    root = _ram("data")
    _upload(local, fs.join(root, "proj"))
    fs.write_atomic(fs.join(root, "recipe.yaml"), RECIPE)
    return local, root


@pytest.fixture(scope="module")
def run(project) -> str:
    """``kpnet fit ram://.../recipe.yaml -o ram://.../run``: one epoch."""
    _, root = project
    out = fs.join(root, "run")
    result = _cli("fit", fs.join(root, "recipe.yaml"), "-o", out)
    assert result.exit_code == 0, result.output
    assert f"-> {out}" in result.output
    return out


def test_recipe_and_dlc_project_are_read_from_urls(project):
    local, root = project
    recipe = load_recipe(fs.join(root, "recipe.yaml"), check_files=True)
    assert recipe.data.dlc.project == fs.join(root, "proj")  # a string, not ram:/...
    spec, records = load_dlc_records(recipe.data.dlc.project)
    _, expected = load_dlc_records(local)
    assert spec.names == ("a", "b") and len(records) == len(expected) == 10
    assert records[0].image_path == fs.join(root, "proj", "labeled-data", "v1", "img12.png")
    assert [r.image_size for r in records] == [r.image_size for r in expected]
    np.testing.assert_array_equal(records[3].keypoints, expected[3].keypoints)
    assert default_val_fraction(recipe.data.dlc.project) == pytest.approx(0.2)


def test_url_recipe_errors_are_one_line(project):
    _, root = project
    missing = _cli("fit", fs.join(root, "gone.yaml"), "-o", fs.join(root, "x"))
    assert missing.exit_code == 2
    assert f"Error: {fs.join(root, 'gone.yaml')}: recipe file not found" in missing.output
    fs.write_atomic(fs.join(root, "pins.yaml"),
                    "data: {source: synthetic_pins, synthetic_pins: {cache_dir: cache}}\n")
    with pytest.raises(RecipeError, match="synthetic_pins.cache_dir: 'cache' is relative to a "
                       "recipe at a URL, but must be a local path"):  # fmt: skip
        load_recipe(fs.join(root, "pins.yaml"))


def test_fit_writes_its_run_folder_at_a_url(run):
    files = _files(run)
    for name in RUN_FILES:
        assert name in files, name
    assert any(f.startswith("logs/train/events.out.tfevents") for f in files)  # TensorBoard
    assert not [f for f in files if ".tmp" in f]  # every temporary file renamed or removed
    metrics = json.loads(fs.read_text(fs.join(run, "metrics.json")))
    assert metrics["num_instances"] == 2 and metrics["model"] == fs.join(run, "best.keras")
    assert fs.read_text(fs.join(run, "history.csv")).startswith("epoch,")
    model = kpnet.load_model(run)  # the run folder at a URL: keypoints.keras via a local copy
    out = model.predict(np.zeros((1, 64, 64, 3), "uint8"), verbose=0)
    assert out["keypoints"].shape == (1, 2, 2)
    served = tf.saved_model.load(fs.join(run, "saved_model"))
    meta = served.signatures["metadata"]()
    assert json.loads(meta["spec_json"].numpy())["names"] == ["a", "b"]
    whole = served.signatures["whole_image"](images=tf.zeros([1, 20, 30, 3], tf.uint8))
    assert whole["keypoints"].shape == (1, 2, 2)


def test_evaluate_predict_and_export_read_and_write_urls(run, project):
    local, root = project
    evaluated = _cli("evaluate", run, "-o", fs.join(root, "eval"))
    assert evaluated.exit_code == 0, evaluated.output
    assert json.loads(fs.read_text(fs.join(root, "eval", "metrics.json")))["num_instances"] == 2
    image = str(local / "labeled-data" / "v1" / "img8.png")
    pred, draw = fs.join(root, "out", "pred.json"), fs.join(root, "draw")
    predicted = _cli("predict", fs.join(run, "best.keras"), image, "-o", pred, "--draw", draw)
    assert predicted.exit_code == 0, predicted.output
    assert len(json.loads(fs.read_text(pred))) == 1
    assert fs.read_text(fs.join(root, "out", "pred.csv")).startswith("scorer,kpnet_best")
    assert _files(draw) == ["img8.jpg"]
    exported = _cli("export", run, "-o", fs.join(root, "serving", "1"))
    assert exported.exit_code == 0, exported.output
    assert f"wrote SavedModel {fs.join(root, 'serving', '1')} " in exported.output
    served = tf.saved_model.load(fs.join(root, "serving", "1"))
    assert set(served.signatures) == {"serving_default", "whole_image", "crops", "metadata"}
    assert not [f for f in _files(root) if ".tmp" in f]
    gone = _cli("predict", fs.join(root, "nothing.keras"), image)
    assert gone.exit_code == 1 and f"no model file at {fs.join(root, 'nothing.keras')}" in (
        gone.output
    )


@pytest.mark.slow  # about 30 s on 2 cores, on top of the module's first fit
def test_fit_resumes_a_run_folder_at_a_url(run, project):
    """Runs last: it extends the module's run to two epochs."""
    _, root = project
    result = _cli("fit", fs.join(root, "recipe.yaml"), "-o", run, "--set", "train.epochs=2",
                  "--set", "export.saved_model=false")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert f"resuming from {fs.join(run, 'backup')} after epoch 1" in result.output
    meta = json.loads(fs.read_text(fs.join(run, "backup", "training_metadata.json")))
    assert meta["epoch"] == 2
    rows = fs.read_text(fs.join(run, "history.csv")).splitlines()
    assert [r.split(",")[0] for r in rows] == ["epoch", "0", "1"]


# --------------------------------------------------------------------------- kpnet.fs
@pytest.mark.parametrize("where", ["local", "ram"])
def test_staged_files_and_folders_replace_whole_or_not_at_all(tmp_path, where):
    base = str(tmp_path) if where == "local" else _ram("fs")
    path = fs.join(base, "sub", "model.keras")
    fs.write_atomic(path, b"old")
    with pytest.raises(RuntimeError), fs.staged(path) as tmp:
        Path(tmp).write_bytes(b"half")
        raise RuntimeError("the disk filled up")
    assert fs.read_bytes(path) == b"old"
    with fs.staged(path) as tmp:
        assert tmp.endswith("model.keras") and not fs.is_url(tmp)  # a local file, same ending
        Path(tmp).write_bytes(b"new")
    with fs.local_copy(path) as local:
        assert Path(local).read_bytes() == b"new"
    if where == "ram":
        assert not os.path.exists(local)  # a URL's local copy is deleted
    folder = fs.join(base, "sm")
    fs.write_atomic(fs.join(folder, "stale.pb"), b"old")
    with pytest.raises(RuntimeError), fs.staged_folder(folder) as tmp:
        fs.write_atomic(fs.join(tmp, "saved_model.pb"), b"x")
        raise RuntimeError("export failed")
    assert _files(folder) == ["stale.pb"]
    with fs.staged_folder(folder) as tmp:
        fs.write_atomic(fs.join(tmp, "variables", "v.index"), b"v")
        fs.write_atomic(fs.join(tmp, "saved_model.pb"), b"pb")
    assert fs.read_bytes(fs.join(folder, "variables", "v.index")) == b"v"
    assert not fs.exists(fs.join(folder, "stale.pb"))
    assert _files(base) == ["sm/saved_model.pb", "sm/variables/v.index", "sub/model.keras"]
