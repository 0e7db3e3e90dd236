"""The shipped pin recipes, run exactly as the README says, reach their accuracy goals.

Each is a full training run (7 minutes on a slow 2-core CPU), marked ``accuracy``: run them
with ``python -m pytest -q -m accuracy``. Their time is a benchmark's business
(README, ``benchmarks/``), not an assertion that a busy machine would fail.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def _fit(recipe: str, tmp_path: Path) -> dict:
    env = {**os.environ, "KPNET_DATA": str(tmp_path / "data")}
    proc = subprocess.run(
        [sys.executable, "-m", "kpnet.cli", "fit", str(RECIPES / recipe),
         "-o", str(tmp_path / "run")],
        env=env, capture_output=True, text=True, timeout=1500,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((tmp_path / "run" / "metrics.json").read_text())


@pytest.mark.accuracy
def test_quickstart_reaches_two_pixels(tmp_path):
    metrics = _fit("quickstart.yaml", tmp_path)
    assert metrics["overall"]["mean"] <= 2.0


@pytest.mark.accuracy
def test_single_channel_pins_found_within_two_pixels(tmp_path):
    metrics = _fit("two-pin-single-channel.yaml", tmp_path)
    assert metrics["overall"]["mean"] <= 2.0
    pins = metrics["pins"]["overall"]  # Hungarian matching of peaks to true pins
    assert pins["error_mean"] <= 2.0
    assert pins["misses"] <= 0.05 * pins["num_true"]
    assert pins["false_positives"] <= 0.05 * pins["num_true"]
