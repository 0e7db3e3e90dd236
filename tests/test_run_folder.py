"""Run folders that nothing can damage (issue 12).

A ``kpnet fit`` validates everything and compares the recipe with the run already in the output
folder before it writes there; a mismatched resume, bad data or a NaN model ends with one
``Error:`` line and leaves every file as it was; outputs are written atomically.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path

import keras
import numpy as np
import pytest
from _runs import QUICKSTART, tiny_overrides
from _runs import fit_cli as _fit_cli
from _runs import leftovers as _leftovers
from _runs import refused as _refused
from _runs import snapshot as _snapshot

from kpnet.data.sources import load_data
from kpnet.recipe import load_recipe
from kpnet.run_folder import RunFolderError
from kpnet.training import check_run_folder, fit, nonfinite_weights


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> list[str]:
    """Overrides that shrink the quickstart recipe (input size left at its 96x96)."""
    return tiny_overrides(tmp_path_factory.mktemp("pins"))


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny) -> Path:
    """A finished one-epoch quickstart run at the recipe's 96x96 input size."""
    out = tmp_path_factory.mktemp("finished") / "quickstart"
    result = _fit_cli(out, tiny)
    assert result.exit_code == 0, result.output
    return out


# --------------------------------------------------------------------------- the run itself
def test_finished_run_has_plain_files_and_no_temporaries(finished):
    assert not _leftovers(finished)
    umask = os.umask(0)
    os.umask(umask)
    for name in ("recipe.resolved.yaml", "spec.json", "codec.json", "metrics.json",
                 "keypoints.keras", "curves.png"):  # fmt: skip
        assert stat.S_IMODE((finished / name).stat().st_mode) == 0o666 & ~umask, name
    assert nonfinite_weights(finished / "best.keras") == []


# --------------------------------------------------------------------------- mismatched resume
@pytest.mark.slow  # over 25 s on 2 cores
def test_quickstart_header_example_is_refused_then_works_in_a_new_folder(finished, tiny, tmp_path):
    """The quickstart header's `--set train.epochs=2 --set model.input_size=[64,64]` on a
    folder holding a 96x96 run: one line (input size differs -> new folder), nothing
    rewritten; with `-o other` it trains."""
    before = _snapshot(finished)
    example = [*tiny, "train.epochs=2", "model.input_size=[64,64]"]
    line = _refused(_fit_cli(finished, example), "model.input_size is [96, 96] there but [64, 64]",
                    "use a new output folder (-o)", f"delete {finished}")  # fmt: skip
    assert str(finished) in line
    assert _snapshot(finished) == before
    other = tmp_path / "other"
    result = _fit_cli(other, example)
    assert result.exit_code == 0, result.output
    assert load_recipe(other / "recipe.resolved.yaml").model.input_size == (64, 64)
    assert json.loads((other / "metrics.json").read_text())["overall"]["count"] > 0


MISMATCHES = [  # (override, what the error line names)
    ("model.pyramid_channels=32", "model.pyramid_channels is 16 there but 32"),
    ("model.backbone=resnet50", 'model.backbone is "tiny" there but "resnet50"'),
    ("data.synthetic_pins.single_channel=true", "data.synthetic_pins.single_channel"),
    ("data.synthetic_pins.num_train=24", "data.synthetic_pins.num_train is 16 there but 24"),
    ("data.mode=whole", "data.mode"),
    ("evaluation.flip_test=true", "evaluation.flip_test is false there but true"),
    ("loss.refine_sigma=2.0", "loss.refine_sigma"),
    ("train.batch_size=4", "train.batch_size is 8 there but 4"),
    ("train.freeze_trunk_stride=4", "train.freeze_trunk_stride is 0 there but 4"),
]


@pytest.mark.parametrize("override,names", MISMATCHES, ids=[m[0] for m in MISMATCHES])
def test_mismatched_resume_is_refused_and_the_folder_untouched(finished, tiny, override, names):
    before = _snapshot(finished)
    result = _fit_cli(finished, [*tiny, "train.epochs=3", override])
    _refused(result, names, "resumes only with the same model, data", "new output folder")
    assert "resuming" not in result.output
    assert _snapshot(finished) == before


def test_several_differences_are_counted_in_one_line(finished, tiny):
    result = _fit_cli(finished, [*tiny, "model.input_size=[64,64]", "model.pyramid_channels=8"])
    _refused(result, "model.input_size", "(and 1 more: model.pyramid_channels)")


def test_settings_that_may_change_on_resume_pass(finished, tiny, capsys):
    free = [
        "train.epochs=5", "train.lr=1e-4", "train.optimizer=sgd", "train.clipnorm=1.0",
        "train.verbose=2", "train.validation_every=2", "train.validation_steps=1",
        "train.backup_every_steps=1", "train.precise_bn_batches=0", "augment.rotation=10",
        "loss.top_k=1", "evaluation.pck_thresholds=[0.2]", "evaluation.batch_size=4",
        "export.saved_model=true", "data.on_error=skip",
    ]  # fmt: skip
    recipe = load_recipe(QUICKSTART, [*tiny, *free])
    check_run_folder(recipe, finished)  # the recipe keys
    log = capsys.readouterr().out
    assert "changed since its last run: " in log and "train.epochs 1 -> 5" in log
    assert "learning-rate schedule restarts" in log  # another optimizer: no saved moments
    check_run_folder(recipe, finished, load_data(recipe)[0])  # spec.json, codec.json


def test_spec_or_codec_file_difference_is_refused(finished, tiny, tmp_path):
    recipe = load_recipe(QUICKSTART, tiny)
    spec = load_data(recipe)[0]
    copy = tmp_path / "copy"
    shutil.copytree(finished, copy)
    check_run_folder(recipe, copy, spec)
    saved = json.loads((copy / "spec.json").read_text())
    (copy / "spec.json").write_text(json.dumps({**saved, "names": ["a", "b"]}))
    with pytest.raises(RunFolderError, match=r"spec.json: names is \[\"a\", \"b\"\] there"):
        check_run_folder(recipe, copy, spec)
    for broken in ("{not json", "", "[1, 2]"):
        (copy / "spec.json").write_text(broken)
        with pytest.raises(RunFolderError, match="spec.json cannot be read"):
            check_run_folder(recipe, copy, spec)
    (copy / "recipe.resolved.yaml").write_bytes(b"\xff\xfe")
    with pytest.raises(RunFolderError, match="recipe.resolved.yaml cannot be read"):
        check_run_folder(recipe, copy)


def test_a_folder_without_a_trained_run_starts_over(tmp_path, tiny):
    """A run that failed before its first backup left only its recipe: any settings go."""
    out = tmp_path / "failed-start"
    out.mkdir()
    load_recipe(QUICKSTART, [*tiny, "model.input_size=[128,128]"]).save(
        out / "recipe.resolved.yaml"
    )
    check_run_folder(load_recipe(QUICKSTART, tiny), out)


# --------------------------------------------------------------------------- failing fits
def test_bad_data_neither_creates_a_folder_nor_touches_a_finished_run(finished, tiny, tmp_path):
    recipe = load_recipe(finished / "recipe.resolved.yaml")
    cache = recipe.data.synthetic_pins.cache_dir
    [annotations] = cache.glob("pins_*/annotations/val.json")
    good = annotations.read_bytes()
    before = _snapshot(finished)
    try:
        annotations.write_text('{"images": [')  # truncated
        _refused(_fit_cli(finished, tiny), str(annotations))  # the finished run, re-finalized
        assert _snapshot(finished) == before  # metrics.json, keypoints.keras, recipe untouched
        fresh = tmp_path / "fresh"
        _refused(_fit_cli(fresh, tiny), str(annotations))
        assert not fresh.exists()  # refused before anything is written
    finally:
        annotations.write_bytes(good)


def test_batch_size_not_dividing_replicas_writes_nothing(tmp_path, tiny, monkeypatch):
    import kpnet.training.loop

    class TwoReplicas:
        num_replicas_in_sync = 2
        cluster_resolver = None

    monkeypatch.setattr(kpnet.training.loop, "make_strategy", lambda kind: TwoReplicas())
    out = tmp_path / "run"
    _refused(_fit_cli(out, [*tiny, "train.batch_size=3"]), "train.batch_size",
             "does not divide over 2 replicas")  # fmt: skip
    assert not out.exists()


def test_nan_weights_are_never_reported_as_a_success(finished, tiny, tmp_path):
    run = tmp_path / "poisoned"
    shutil.copytree(finished, run)
    model = keras.saving.load_model(run / "best.keras", safe_mode=True)
    kernel = model.get_layer("refine_head_conv").kernel
    kernel.assign(np.full(kernel.shape, np.nan, "float32"))
    model.save(run / "best.keras")
    assert nonfinite_weights(run / "best.keras")
    before = {name: (run / name).read_bytes() for name in ("metrics.json", "keypoints.keras")}
    result = _fit_cli(run, tiny)  # finished: only re-finalizes, which must refuse
    line = _refused(result, "NaN/inf", "best.keras", "metrics.json, keypoints.keras were not")
    assert "done" not in result.output and "last.keras is finite" in line
    assert {name: (run / name).read_bytes() for name in before} == before


def test_non_finite_validation_errors_are_refused():
    from kpnet.training import TrainingError
    from kpnet.training.finalize import _check_finite_metrics

    _check_finite_metrics(Path("best.keras"), {"overall": {"mean": 1.5, "AP": None}})
    with pytest.raises(TrainingError, match=r"is nan \(mean\).*not written"):
        _check_finite_metrics(Path("best.keras"), {"overall": {"mean": float("nan")}})


# --------------------------------------------------------------------------- atomic writes
def test_a_failing_save_leaves_the_old_outputs(finished, tiny, tmp_path, monkeypatch):
    run = tmp_path / "copy"
    shutil.copytree(finished, run)
    before = _snapshot(run)

    def broken_save(self, filepath, *args, **kwargs):
        Path(filepath).write_bytes(b"half a model")  # then the disk fills up
        raise OSError("No space left on device")

    monkeypatch.setattr(keras.Model, "save", broken_save)
    with pytest.raises(OSError, match="No space left"):
        fit(load_recipe(QUICKSTART, tiny), run)  # a finished run: re-finalizes
    after = _snapshot(run)
    for name in ("keypoints.keras", "metrics.json", "recipe.resolved.yaml", "spec.json"):
        assert after[name] == before[name], name
    assert not _leftovers(run)


def test_write_atomic_keeps_the_old_file_when_the_rename_fails(tmp_path, monkeypatch):
    from kpnet import fs

    path = tmp_path / "metrics.json"
    path.write_text("old")

    def fail(src, dst):
        raise OSError("rename failed")

    monkeypatch.setattr(fs.os, "replace", fail)
    with pytest.raises(OSError, match="rename failed"):
        fs.write_atomic(path, "new")
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["metrics.json"]
