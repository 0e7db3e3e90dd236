"""Helpers for tests that run ``kpnet fit`` on a tiny quickstart recipe and check its run folder.

Shared by tests/test_run_folder.py and tests/test_hardening_runs.py.
"""

from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner

from kpnet.cli import main

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "recipes" / "quickstart.yaml"


def tiny_overrides(cache: Path) -> list[str]:
    """Overrides that shrink the quickstart recipe (input size left at its 96x96)."""
    return [
        f"data.synthetic_pins.cache_dir={cache}", "data.synthetic_pins.num_train=16",
        "data.synthetic_pins.num_val=8", "data.synthetic_pins.image_size=[64,64]",
        "model.pyramid_channels=16", "train.batch_size=8", "train.steps_per_epoch=2",
        "train.epochs=1", "train.verbose=0", "evaluation.flip_test=false",
        "train.lr_schedule=constant", "train.warmup_epochs=0",
    ]  # fmt: skip


def invoke(*args: str | Path):
    """``kpnet ARGS`` in-process; catch_exceptions=False: an exception kpnet does not turn
    into a message fails the test."""
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def fit_cli(out: Path, overrides: list[str], recipe: Path = QUICKSTART):
    args: list[str | Path] = ["fit", recipe, "-o", out]
    for item in overrides:
        args += ["--set", item]
    return invoke(*args)


def refused(result, *needles: str) -> str:
    """The one error line of a refused command; it holds every needle."""
    assert result.exit_code not in (0, None), result.output
    assert "Traceback" not in result.output, result.output
    errors = [ln for ln in result.output.splitlines() if ln.startswith("Error:")]
    assert len(errors) == 1, result.output
    for needle in needles:
        assert needle in errors[0], (needle, result.output)
    return errors[0]


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (names and bytes)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def leftovers(folder: Path) -> list[str]:
    """Temporary files left under ``folder`` (kpnet's ``.tmp.*`` names, ``tmp*``)."""
    return [p.name for p in folder.rglob("*") if ".tmp" in p.name or p.name.startswith("tmp")]
