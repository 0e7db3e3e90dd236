"""The shipped pin recipes, run exactly as the README says, reach their accuracy goals.

Slow (a few minutes each on a 2-core CPU): ``python -m pytest -q -m slow``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def _fit(recipe: str, tmp_path: Path) -> tuple[dict, float]:
    env = {**os.environ, "KPNET_DATA": str(tmp_path / "data")}
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "kpnet.cli", "fit", str(RECIPES / recipe),
         "-o", str(tmp_path / "run")],
        env=env, capture_output=True, text=True, timeout=1500,
    )  # fmt: skip
    seconds = time.perf_counter() - start
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((tmp_path / "run" / "metrics.json").read_text()), seconds


@pytest.mark.slow
def test_quickstart_reaches_two_pixels_within_ten_minutes(tmp_path):
    metrics, seconds = _fit("quickstart.yaml", tmp_path)
    assert metrics["overall"]["mean"] <= 2.0
    assert seconds <= 600


@pytest.mark.slow
def test_single_channel_pins_found_within_two_pixels(tmp_path):
    metrics, _ = _fit("two-pin-single-channel.yaml", tmp_path)
    assert metrics["overall"]["mean"] <= 2.0
    pins = metrics["pins"]["overall"]  # Hungarian matching of peaks to true pins
    assert pins["error_mean"] <= 2.0
    assert pins["misses"] <= 0.05 * pins["num_true"]
    assert pins["false_positives"] <= 0.05 * pins["num_true"]
