"""Helpers for tests that run ``kpnet fit`` on a tiny quickstart recipe and check its run folder.

Shared by tests/test_run_folder.py and tests/test_hardening_runs.py.
"""

from __future__ import annotations

from pathlib import Path

from _cli import invoke, refused, snapshot  # noqa: F401  (re-exported for the run tests)

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


def fit_cli(out: Path, overrides: list[str], recipe: Path = QUICKSTART):
    args: list[str | Path] = ["fit", recipe, "-o", out]
    for item in overrides:
        args += ["--set", item]
    return invoke(*args)


def leftovers(folder: Path) -> list[str]:
    """Temporary files left under ``folder`` (kpnet's ``.tmp.*`` names, ``tmp*``)."""
    return [p.name for p in folder.rglob("*") if ".tmp" in p.name or p.name.startswith("tmp")]
