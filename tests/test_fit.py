"""End-to-end ``kpnet fit`` on tiny synthetic data: outputs, resume, kill -9, NaN, precisions."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import keras
import pytest
from click.testing import CliRunner

from kpnet.cli import main
from kpnet.recipe import load_recipe
from kpnet.training import EpochSchedule, fit

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "recipes" / "quickstart.yaml"
DLC = REPO.parent / "shared" / "data" / "dlc_reaching"
OUTPUTS = ("recipe.resolved.yaml", "spec.json", "best.keras", "last.keras", "keypoints.keras",
           "history.csv", "curves.png", "metrics.json", "backup/latest.weights.h5")  # fmt: skip


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> list[str]:
    """Overrides that shrink the quickstart recipe to seconds per epoch."""
    cache = tmp_path_factory.mktemp("pins")
    return [
        f"data.synthetic_pins.cache_dir={cache}", "data.synthetic_pins.num_train=24",
        "data.synthetic_pins.num_val=8", "data.synthetic_pins.image_size=[64,64]",
        "model.input_size=[64,64]", "model.pyramid_channels=16", "train.batch_size=8",
        "train.steps_per_epoch=2", "train.verbose=0", "evaluation.flip_test=false",
        "train.lr_schedule=constant", "train.warmup_epochs=0",
    ]  # fmt: skip


def _fit_cli(out: Path, overrides: list[str]):
    args = ["fit", str(QUICKSTART), "-o", str(out)]
    for item in overrides:
        args += ["--set", item]
    return CliRunner().invoke(main, args, catch_exceptions=False)


def _history(out: Path) -> list[dict[str, str]]:
    with (out / "history.csv").open() as f:
        return list(csv.DictReader(f))


@pytest.mark.slow  # over 25 s on 2 cores
def test_fit_writes_outputs_resumes_and_stops_on_nan(tmp_path, tiny):
    out = tmp_path / "run"
    first = _fit_cli(out, [*tiny, "train.epochs=1"])
    assert first.exit_code == 0, first.output
    for name in OUTPUTS:
        assert (out / name).is_file(), name
    for part in ("train", "validation"):  # TensorBoard
        assert list((out / "logs" / part).glob("events.out.tfevents.*")), part
    model = keras.saving.load_model(out / "best.keras", safe_mode=True)
    assert set(model.output) == {"global_p2", "global_p3", "global_p4", "global_p5", "refine"}
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["overall"]["count"] == 16 and metrics["overall"]["mean"] > 0
    assert len(json.loads((out / "spec.json").read_text())["names"]) == 2
    fresh = subprocess.run(  # a user's new process: plain Keras after registering, kpnet.load_model
        [sys.executable, "-c", "import sys, keras, kpnet, numpy as np; "
         "kpnet.register_keras_objects(); "
         "print(type(keras.saving.load_model(sys.argv[1]).optimizer).__name__); "
         "m = kpnet.load_model(sys.argv[1]); "
         "print(m.predict(np.zeros((1, 64, 64, 3), 'uint8'), verbose=0)['keypoints'].shape)",
         str(out / "best.keras")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert fresh.returncode == 0, fresh.stderr[-2000:]
    assert "Adam" in fresh.stdout and "(1, 2, 2)" in fresh.stdout
    args = [f"--set={item}" for item in [*tiny, "train.epochs=1"]]
    again = subprocess.run(  # re-running a finished run in a new process only re-finalizes it
        [sys.executable, "-m", "kpnet.cli", "fit", str(QUICKSTART), "-o", str(out), *args],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert again.returncode == 0, again.stderr[-2000:]
    assert "already holds 1 trained epochs" in again.stdout and "best model:" in again.stdout
    assert [r["epoch"] for r in _history(out)] == ["0"]

    last_bytes = (out / "last.keras").read_bytes()
    nan = _fit_cli(out, [*tiny, "train.epochs=2", "train.lr=1e30"])  # resumes, then NaN
    assert nan.exit_code == 2
    assert "resuming" in nan.output and "after epoch 1" in nan.output
    assert "NaN" in nan.output and "epoch 2" in nan.output and "Traceback" not in nan.output
    assert (out / "last.keras").read_bytes() == last_bytes  # last good checkpoint kept
    assert json.loads((out / "backup" / "training_metadata.json").read_text())["epoch"] == 1
    rows = _history(out)  # the NaN epoch is logged for the record; a resume drops it
    assert [r["epoch"] for r in rows] == ["0", "1"] and rows[1]["loss"] == "nan"


def test_cli_reports_recipe_errors_without_traceback(tmp_path, tiny):
    result = _fit_cli(tmp_path / "x", [*tiny, "train.epcohs=1"])
    assert result.exit_code == 2
    assert "train.epcohs: unknown key (did you mean 'epochs'?)" in result.output
    assert "Traceback" not in result.output
    missing = _fit_cli(tmp_path / "y", ["data.source=dlc", f"data.dlc.project={tmp_path}/nope"])
    assert missing.exit_code == 2 and "data.dlc.project: file not found" in missing.output


KILLED_FIT = textwrap.dedent("""
    import sys
    from kpnet.cli import main
    main(["fit", sys.argv[1], "-o", sys.argv[2], *sys.argv[3:]])
""")


@pytest.mark.slow  # about 45 s on 2 cores
def test_kill_9_mid_epoch_loses_at_most_that_epoch(tmp_path, tiny):
    """SIGKILL during epoch 2: the same command resumes at epoch 2, epoch 1 is untouched."""
    out = tmp_path / "killed"
    overrides = [*tiny, "train.epochs=2", "export.keypoints_model=false"]
    args = [arg for item in overrides for arg in ("--set", item)]
    proc = subprocess.Popen(
        [sys.executable, "-c", KILLED_FIT, str(QUICKSTART), str(out), *args], cwd=REPO,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
    )  # fmt: skip
    meta = out / "backup" / "training_metadata.json"
    deadline = time.monotonic() + 300
    try:  # epoch 1's backup is the last thing written before epoch 2 starts
        while not (meta.is_file() and json.loads(meta.read_text() or "{}").get("epoch") == 1):
            assert proc.poll() is None, "fit ended before epoch 1's backup appeared"
            assert time.monotonic() < deadline, "no backup after 300 s"
            time.sleep(0.02)
        time.sleep(0.3)  # inside epoch 2
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert json.loads(meta.read_text())["epoch"] == 1  # killed before epoch 2 ended
    before = _history(out)
    assert [r["epoch"] for r in before] == ["0"]

    again = _fit_cli(out, overrides)  # the same command resumes at epoch 2
    assert again.exit_code == 0, again.output
    assert "resuming" in again.output and "after epoch 1" in again.output
    rows = _history(out)
    assert [r["epoch"] for r in rows] == ["0", "1"] and rows[0] == before[0]
    assert float(rows[1]["val_px_mean"]) > 0
    assert json.loads(meta.read_text())["epoch"] == 2


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["mixed_float16", "mixed_bfloat16"])
def test_mixed_precision_fit_runs(tmp_path, tiny, precision):
    recipe = load_recipe(QUICKSTART, [*tiny, "train.epochs=1", f"train.precision={precision}",
                                      "export.keypoints_model=false"])  # fmt: skip
    result = fit(recipe, tmp_path / precision)
    assert keras.mixed_precision.global_policy().name == "float32"  # restored afterwards
    row = _history(tmp_path / precision)[0]
    assert float(row["loss"]) > 0 and result["metrics"]["overall"]["mean"] > 0
    model = keras.saving.load_model(tmp_path / precision / "last.keras", safe_mode=True)
    if precision == "mixed_float16":
        assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)


@pytest.mark.slow
def test_freeze_backbone_then_unfreeze(tmp_path, tiny):
    from kpnet.models.backbones import build_backbone

    images = keras.Input((64, 64, 3))  # a "pretrained" trunk: only those are frozen
    keras.Model(images, build_backbone("tiny", images)).save_weights(tmp_path / "t.weights.h5")
    recipe = load_recipe(QUICKSTART, [*tiny, "train.epochs=2", "train.freeze_backbone_epochs=1",
                                      "train.unfreeze_lr_factor=0.5", "train.steps_per_epoch=1",
                                      "export.keypoints_model=false",
                                      f"model.backbone_weights={tmp_path / 't.weights.h5'}"])
    fit(recipe, tmp_path / "frozen")
    assert [r["epoch"] for r in _history(tmp_path / "frozen")] == ["0", "1"]
    meta = json.loads((tmp_path / "frozen" / "backup" / "training_metadata.json").read_text())
    assert meta == {"epoch": 2, "phase": 1}


def test_epoch_schedule_matches_tf_cpn_halving_and_cosine():
    step = EpochSchedule(5e-4, steps_per_epoch=100, kind="step", step_every=24, gamma=0.5)
    assert [float(step(s)) for s in (0, 2399, 2400, 4800)] == pytest.approx(
        [5e-4, 5e-4, 2.5e-4, 1.25e-4]
    )
    cos = EpochSchedule(1.0, steps_per_epoch=10, kind="cosine", epochs=10, warmup_epochs=1)
    assert float(cos(0)) == pytest.approx(0.1) and float(cos(9)) == pytest.approx(1.0)
    assert float(cos(55)) == pytest.approx(0.5 * (1 + __import__("math").cos(3.14159265 * 0.5)))
    assert float(cos(100)) == pytest.approx(0.0, abs=1e-7)
    restored = EpochSchedule.from_config(step.get_config())
    assert float(restored(2400)) == pytest.approx(2.5e-4)


@pytest.mark.slow
def test_fit_dlc_project(tmp_path):
    if not DLC.is_dir():
        pytest.skip(f"shared data not available: {DLC}")
    recipe = load_recipe(REPO / "recipes" / "dlc-project.yaml", [
        f"data.dlc.project={DLC}", "model.backbone=tiny", "model.backbone_weights=null",
        "model.input_size=[64,64]", "model.pyramid_channels=16", "train.epochs=2",
        "train.freeze_backbone_epochs=1", "train.batch_size=4", "train.steps_per_epoch=2",
        "data.dlc.val_last=10", "train.validation_every=1", "train.verbose=0"])  # fmt: skip
    result = fit(recipe, tmp_path / "dlc")
    assert result["metrics"]["num_instances"] == 10 and (tmp_path / "dlc" / "best.keras").exists()
    assert result["metrics"]["crops"].startswith("whole frames")  # what predict sees
