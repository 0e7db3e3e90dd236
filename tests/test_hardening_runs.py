"""Hostile conditions a run folder meets (issue 24 items 2, 3 and part of 6).

* Disk full and interrupted writes: every file fit writes (Keras checkpoints and TensorBoard
  events included) goes to a temporary name first; a write error is one ``Error:`` line
  naming the file and the free space, and no file already there is replaced by a partial
  one. Simulated (``OSError(ENOSPC)`` at each write site) always, on a real size-limited
  tmpfs when the tests run as root and mounting works.
* Corrupt files a resume or a load reads (the backup, the history, ``.keras`` models): one
  line naming the file, what is wrong and what to do, before anything is written.
* fit names each set's skip count once; ``metrics.json`` numbers epochs from 1.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shutil
import subprocess
import zipfile
from pathlib import Path

import h5py
import keras
import numpy as np
import pytest
import yaml
from _runs import QUICKSTART, fit_cli, invoke, leftovers, refused, snapshot, tiny_overrides

from kpnet import fs
from kpnet.data.sources import load_data
from kpnet.recipe import load_recipe
from kpnet.run_folder import check_model_file
from kpnet.training.callbacks import (
    Backup,
    GuardedCheckpoint,
    NaNGuard,
    StagedTensorBoard,
)
from kpnet.training.report import HistoryCSV

FULL = os.strerror(errno.ENOSPC)  # "No space left on device"


class _Lines(logging.Handler):
    """The warnings one logger emits (after its filters)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> list[str]:
    """The tiny quickstart recipe, with one unusable training image skipped (data.on_error)."""
    cache = tmp_path_factory.mktemp("pins")
    overrides = [*tiny_overrides(cache), "data.on_error=skip"]
    load_data(load_recipe(QUICKSTART, overrides))  # renders the images
    first = sorted(cache.glob("pins_*/train/*.jpg"))[0]
    first.write_bytes(b"not an image")
    return overrides


@pytest.fixture(scope="module")
def fitted(tmp_path_factory, tiny) -> tuple[Path, list[str]]:
    """(a finished one-epoch run, the warnings kpnet logged during its fit)."""
    out = tmp_path_factory.mktemp("finished") / "quickstart"
    handler, logger = _Lines(), logging.getLogger("kpnet")
    logger.addHandler(handler)
    try:
        result = fit_cli(out, tiny)
    finally:
        logger.removeHandler(handler)
    assert result.exit_code == 0, result.output
    return out, handler.lines


@pytest.fixture(scope="module")
def finished(fitted) -> Path:
    return fitted[0]


@pytest.fixture
def run(finished, tmp_path) -> Path:
    """A copy of the finished run to damage."""
    return Path(shutil.copytree(finished, tmp_path / "run"))


def _full_disk_at(monkeypatch, site: str) -> None:
    """The disk fills up while kpnet writes a file whose name holds ``site``: the temporary
    file is cut short, then ``OSError(ENOSPC)`` (every kpnet write goes through fs.staged)."""
    real = fs.staged

    @contextlib.contextmanager
    def staged(path):
        with real(path) as tmp:
            yield tmp
            if site in fs.basename(path):
                if os.path.exists(tmp):
                    os.truncate(tmp, os.path.getsize(tmp) // 2)
                raise OSError(errno.ENOSPC, FULL)

    monkeypatch.setattr(fs, "staged", staged)


def _disk_full_line(result, path: Path) -> str:
    return refused(result, f"cannot write {path}: {FULL}", f"free in {path.parent}",
                   "no file already there was replaced",
                   "re-run the same command to resume")  # fmt: skip


# --------------------------------------------------------------------------- disk full: fs
@pytest.mark.parametrize("code,advice", [
    (errno.ENOSPC, "free in"), (errno.EDQUOT, "free in"),
    (errno.EROFS, "write to another folder"), (errno.EACCES, "check the rights on"),
], ids=["ENOSPC", "EDQUOT", "EROFS", "EACCES"])  # fmt: skip
def test_write_error_names_the_file_the_reason_and_the_free_space(tmp_path, monkeypatch, code,
                                                                  advice):  # fmt: skip
    path = tmp_path / "metrics.json"
    path.write_text("old")

    class Failing:
        def __init__(self, name, mode):
            Path(name).write_bytes(b"half")  # the temporary file, then the error

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def write(self, data):
            raise OSError(code, os.strerror(code))

    monkeypatch.setattr(fs, "open", Failing, raising=False)
    with pytest.raises(fs.WriteError) as caught:
        fs.write_atomic(path, "new")
    message = str(caught.value)
    assert message.startswith(f"cannot write {path}: {os.strerror(code)}")
    assert advice in message and "\n" not in message and caught.value.errno == code
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == [path.name]


def test_staged_folder_keeps_the_old_folder_on_a_full_disk(tmp_path):
    """The SavedModel is written through fs.staged_folder: a full disk keeps the old one."""
    old = tmp_path / "saved_model"
    old.mkdir()
    (old / "saved_model.pb").write_bytes(b"old")
    with pytest.raises(fs.WriteError, match=f"cannot write {old}: {FULL}"):
        with fs.staged_folder(old) as tmp:
            Path(tmp, "saved_model.pb").write_bytes(b"ha")
            raise OSError(errno.ENOSPC, FULL)
    assert snapshot(tmp_path) == {"saved_model/saved_model.pb": b"old"}


# --------------------------------------------------------------------------- disk full: callbacks
def _train(folder: Path, epochs: int) -> None:
    """Epochs of a tiny model with fit's writing callbacks (checkpoint, history, TensorBoard,
    backup), into ``folder``."""
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    model.compile("sgd", "mse")
    guard = NaNGuard()
    callbacks = [
        GuardedCheckpoint(str(folder / "last.keras"), guard), HistoryCSV(folder / "history.csv"),
        StagedTensorBoard(folder / "logs", write_graph=False), Backup(folder / "backup", 0, guard),
    ]  # fmt: skip
    x, y = np.ones((8, 4), "float32"), np.zeros((8, 2), "float32")
    model.fit(x, y, epochs=epochs, verbose=0, callbacks=callbacks)


SITES = ["last.keras", "history.csv", "events.out.tfevents", "latest.weights.h5",
         "training_metadata.json"]  # fmt: skip


@pytest.mark.parametrize("site", SITES)
def test_callbacks_never_leave_a_partial_file(tmp_path, monkeypatch, site):
    folder = tmp_path / "run"
    _train(folder, 1)
    before = snapshot(folder)
    assert {"last.keras", "history.csv", "backup/latest.weights.h5"} <= set(before)
    assert any(name.startswith("logs/train/events.out.tfevents") for name in before)
    _full_disk_at(monkeypatch, site)
    with pytest.raises(fs.WriteError, match=f"{site}.*: {FULL} .*free in"):
        _train(folder, 2)
    after = snapshot(folder)
    hit = [name for name in before if site in name]
    assert hit and all(after[name] == before[name] for name in hit), hit
    assert not leftovers(folder)
    check_model_file(folder / "last.keras")


# --------------------------------------------------------------------------- disk full: fit
def test_disk_full_before_training_writes_no_partial_file(tiny, tmp_path, monkeypatch):
    out = tmp_path / "fresh"
    _full_disk_at(monkeypatch, "recipe.resolved.yaml")
    _disk_full_line(fit_cli(out, tiny), out / "recipe.resolved.yaml")
    assert snapshot(out) == {}


def test_disk_full_in_a_resumed_epoch_keeps_the_last_checkpoint(run, tiny, monkeypatch):
    before = snapshot(run)
    _full_disk_at(monkeypatch, "last.keras")
    _disk_full_line(fit_cli(run, [*tiny, "train.epochs=2"]), run / "last.keras")
    after = snapshot(run)
    changed = {name for name in before if after.get(name) != before[name]}
    # best.keras may have been replaced by the new epoch's (whole) model before last.keras
    assert changed <= {"recipe.resolved.yaml", "best.keras"}, changed
    assert yaml.safe_load(after["recipe.resolved.yaml"])["train"]["epochs"] == 2
    check_model_file(run / "best.keras")
    assert set(after) == set(before) and not leftovers(run)


@pytest.mark.parametrize("site", ["curves.png", "keypoints.keras", "metrics.json"])
def test_disk_full_while_finishing_keeps_every_file_whole(run, tiny, monkeypatch, site):
    """A finished run re-run re-finalizes (curves, keypoints.keras, then metrics.json): a
    full disk at any of them keeps that file as it was; only a file written before it (a new
    keypoints.keras, whole) may differ."""
    before = snapshot(run)
    _full_disk_at(monkeypatch, site)
    _disk_full_line(fit_cli(run, tiny), run / site)
    after = snapshot(run)
    changed = {name for name in before if after[name] != before[name]}
    assert changed <= ({"keypoints.keras"} if site == "metrics.json" else set()), changed
    assert set(after) == set(before) and not leftovers(run)
    check_model_file(run / "keypoints.keras")


def test_rerun_of_a_finished_run_rewrites_no_settings_checkpoint_or_history(run, tiny):
    before = snapshot(run)
    result = fit_cli(run, tiny)
    assert result.exit_code == 0, result.output
    assert "already holds 1 trained epochs" in result.output
    after = snapshot(run)
    kept = [n for n in before if n.startswith(("backup/", "logs/")) or n in (
        "recipe.resolved.yaml", "spec.json", "codec.json", "best.keras", "last.keras",
        "history.csv")]  # fmt: skip
    assert len(kept) >= 9 and all(after[n] == before[n] for n in kept)


# --------------------------------------------------------------------------- disk full: tmpfs
@pytest.fixture
def tmpfs(tmp_path):
    """``mount_tmpfs(size)``: a size-limited tmpfs under tmp_path (root only, else skip)."""
    mounted: list[Path] = []

    def mount_tmpfs(size: str) -> Path:
        if os.geteuid() != 0 or not shutil.which("mount"):
            pytest.skip("mounting a tmpfs needs root")
        point = tmp_path / f"tmpfs-{len(mounted)}"
        point.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs",
                               str(point)], capture_output=True, text=True)  # fmt: skip
        if done.returncode:
            pytest.skip(f"cannot mount a tmpfs: {done.stderr.strip()}")
        mounted.append(point)
        return point

    yield mount_tmpfs
    for point in mounted:
        subprocess.run(["umount", "-l", str(point)], capture_output=True)


def test_fresh_fit_on_a_tiny_filesystem(tmpfs, tiny):
    """3 MB: the settings fit, best.keras (about 5 MB) does not: one line, and no model file
    under its real name."""
    out = tmpfs("3m") / "run"
    _disk_full_line(fit_cli(out, tiny), out / "best.keras")
    assert sorted(snapshot(out)) == ["codec.json", "recipe.resolved.yaml", "spec.json"]


def test_finished_run_on_a_nearly_full_filesystem(tmpfs, finished, tiny):
    disk = tmpfs("32m")
    run = Path(shutil.copytree(finished, disk / "run"))
    free = shutil.disk_usage(disk).free
    (disk / "filler").write_bytes(bytes(free - 300_000))  # 300 kB left: no keypoints.keras
    before = snapshot(run)
    line = _disk_full_line(fit_cli(run, tiny), run / "keypoints.keras")
    assert " kB free in " in line
    assert snapshot(run) == before and not leftovers(run)


# --------------------------------------------------------------------------- corrupt backup
def _not_keras_weights(path: Path) -> None:
    path.unlink()
    with h5py.File(path, "w") as f:
        f["x"] = np.zeros(3)


WEIGHTS = {  # how backup/latest.weights.h5 is damaged -> what the line says
    "truncated": (lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]),
                  "truncated file"),
    "empty": (lambda p: p.write_bytes(b""), "cannot be read"),
    "random": (lambda p: p.write_bytes(np.random.default_rng(0).bytes(4096)), "cannot be read"),
    "not keras": (_not_keras_weights, "is not a Keras weights file (no 'layers' group)"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(WEIGHTS))
def test_damaged_backup_weights_are_refused_before_any_write(run, tiny, case):
    damage, says = WEIGHTS[case]
    damage(run / "backup" / "latest.weights.h5")
    before = snapshot(run)
    refused(fit_cli(run, [*tiny, "train.epochs=2"]), f"{run / 'backup' / 'latest.weights.h5'}",
            says, f"delete {run / 'backup'} to train this run again from epoch 1",
            "new output folder (-o)")  # fmt: skip
    assert snapshot(run) == before  # recipe.resolved.yaml (epochs 2) not written either


META = {  # backup/training_metadata.json -> what the line says
    "empty": ("", "training_metadata.json is not JSON"),
    "not json": ("{epoch: 1", "training_metadata.json is not JSON"),
    "wrong fields": ('{"epoch": "one", "phase": 0}', 'is not {"epoch": N, "phase": N}'),
    "a list": ("[1, 0]", 'is not {"epoch": N, "phase": N}'),
    "no weights": (None, "latest.weights.h5 is missing"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(META))
def test_damaged_backup_metadata_is_refused_before_any_write(run, tiny, case):
    text, says = META[case]
    if text is None:
        (run / "backup" / "latest.weights.h5").unlink()
    else:
        (run / "backup" / "training_metadata.json").write_text(text)
    before = snapshot(run)
    refused(fit_cli(run, [*tiny, "train.epochs=2"]), says, f"delete {run / 'backup'}")
    assert snapshot(run) == before


def test_damaged_history_is_refused(run, tiny):
    (run / "history.csv").write_bytes(b"\x00\xff garbage")
    before = snapshot(run)
    refused(fit_cli(run, tiny), f"{run / 'history.csv'} is not a training history",
            "delete it to start a new one")  # fmt: skip
    assert snapshot(run) == before


def test_damaged_best_model_stops_a_rerun_before_any_write(run, tiny):
    best = run / "best.keras"
    best.write_bytes(best.read_bytes()[:1000])
    before = snapshot(run)
    refused(fit_cli(run, tiny), f"{best}: not a whole .keras archive", "complete copy")
    assert snapshot(run) == before


# --------------------------------------------------------------------------- corrupt .keras
def _rezip(source: Path, target: Path, change) -> None:
    """``source``'s members into ``target``, each through ``change(name, data) -> data | None``."""
    with zipfile.ZipFile(source) as old, zipfile.ZipFile(target, "w") as new:
        for name in old.namelist():
            data = change(name, old.read(name))
            if data is not None:
                new.writestr(name, data)


MODELS = {  # how a .keras file is damaged -> what the line says
    "truncated": (lambda s, t: t.write_bytes(s.read_bytes()[: s.stat().st_size // 2]),
                  "not a whole .keras archive"),
    "empty": (lambda s, t: t.write_bytes(b""), "the file is empty"),
    "random": (lambda s, t: t.write_bytes(np.random.default_rng(0).bytes(9000)),
               "not a whole .keras archive"),
    "broken config.json": (lambda s, t: _rezip(s, t, lambda n, d: d[:40] if n == "config.json"
                                               else d), "its config.json is not valid JSON"),
    "no weights": (lambda s, t: _rezip(s, t, lambda n, d: None if n == "model.weights.h5"
                                       else d), "no model.weights.h5 inside"),
    "weights cut": (lambda s, t: _rezip(s, t, lambda n, d: d[: len(d) // 2]
                                        if n == "model.weights.h5" else d),
                    "cannot be loaded as a Keras model"),
}  # fmt: skip


@pytest.fixture(scope="module")
def damaged(tmp_path_factory, finished) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("damaged")
    paths = {}
    for case, (damage, _) in MODELS.items():
        paths[case] = folder / f"{case.replace(' ', '_')}.keras"
        damage(finished / "keypoints.keras", paths[case])
    return paths


@pytest.mark.parametrize("command", ["predict", "export", "evaluate"])
@pytest.mark.parametrize("case", list(MODELS))
def test_damaged_model_file_is_one_line(damaged, finished, tiny, tmp_path, command, case):
    model = damaged[case]
    cache = load_recipe(QUICKSTART, tiny).data.synthetic_pins.cache_dir
    image = sorted(Path(cache).glob("pins_*/val/*.jpg"))[0]
    out = tmp_path / "out"
    args = {"predict": [image, "-o", out / "p.json"], "export": ["-o", out],
            "evaluate": [finished / "recipe.resolved.yaml", "-o", out]}[command]  # fmt: skip
    refused(invoke(command, model, *args), f"{model}", MODELS[case][1], "complete copy")
    assert not out.exists()


def test_damaged_keypoints_model_of_a_run_folder_points_to_best(run):
    (run / "keypoints.keras").write_bytes(b"")
    refused(invoke("export", run, "-o", run / "serving"), f"{run / 'keypoints.keras'}",
            f"delete it to use {run}'s best.keras", f"re-run kpnet fit -o {run}")  # fmt: skip


# --------------------------------------------------------------------------- fit's report
def test_each_sets_skip_count_is_printed_once_and_named(fitted):
    """One unusable training image: one line, naming the training set (the training, precise
    BN and validation pipelines each check their files; only the first reports them)."""
    _, lines = fitted
    skips = [line for line in lines if "unusable image files" in line]
    assert len(skips) == 1, lines
    assert skips[0].startswith("training set: skipping 1 records of 1 unusable image files")


def test_metrics_json_numbers_epochs_from_one(finished):
    metrics = json.loads((finished / "metrics.json").read_text())
    assert metrics["best_epoch"] == 1 and metrics["last_epoch"]["epoch"] == 1
    assert (finished / "history.csv").read_text().splitlines()[1].startswith("0,")
