"""Filtering a track over time (``kpnet filter``): error against the truth, printed as JSON.

A smooth 300-frame track of two body parts gets 2 px jitter, 5 % confident spikes of 60 px
and 10 % dropouts (random positions at likelihood 0.05), seeded. Printed: the RMS error
against the true track of the raw table, the median filter (window 5), Savitzky-Golay
(window 7), and the median filter that ignores likelihoods (``pcutoff`` 0: dropouts
averaged in), plus the jitter alone.

Usage:
    python benchmarks/filter.py [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's kpnet

from kpnet.tracks import Tracks, filter_tracks  # noqa: E402

FRAMES, SPIKES, DROPOUTS, JITTER_PX, SPIKE_PX = 300, 15, 30, 2.0, 60.0


def synthetic_track(seed: int = 0) -> tuple[Tracks, np.ndarray]:
    """(noisy :class:`Tracks`, true xy [300, 2, 2]): jitter, confident spikes, dropouts."""
    rng = np.random.default_rng(seed)
    t = np.arange(FRAMES)
    truth = np.stack([np.stack([200 + 80 * np.sin(t / 25), 150 + 60 * np.cos(t / 40)], -1),
                      np.stack([100 + 0.5 * t, 120 + 30 * np.sin(t / 15)], -1)], 1)  # fmt: skip
    xy = truth + rng.normal(0, JITTER_PX, truth.shape)
    lik = np.full(truth.shape[:2], 0.95)
    spikes = rng.choice(FRAMES, SPIKES, replace=False)
    xy[spikes] += rng.choice([-1, 1], (SPIKES, 2, 2)) * SPIKE_PX
    dropouts = rng.choice(np.setdiff1d(t, spikes), DROPOUTS, replace=False)
    xy[dropouts] = rng.uniform(0, 400, (DROPOUTS, 2, 2))
    lik[dropouts] = 0.05
    return Tracks("s", ("nose", "tail"), tuple(range(FRAMES)), xy, lik), truth


def rmse(xy: np.ndarray, truth: np.ndarray) -> float:
    """Root mean square point error in pixels."""
    return float(np.sqrt(np.mean(np.sum((xy - truth) ** 2, -1))))


def measure(seed: int = 0) -> dict[str, float]:
    """The RMS errors of the raw and filtered tracks (px)."""
    tracks, truth = synthetic_track(seed)
    rng = np.random.default_rng(seed)
    return {
        "raw": rmse(tracks.xy, truth),
        "jitter_alone": rmse(truth + rng.normal(0, JITTER_PX, truth.shape), truth),
        "median": rmse(filter_tracks(tracks, "median", window=5).xy, truth),
        "savgol": rmse(filter_tracks(tracks, "savgol", window=7).xy, truth),
        "median_ignoring_likelihood": rmse(
            filter_tracks(tracks, "median", window=5, pcutoff=0.0).xy, truth),
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    seed = parser.parse_args().seed
    rmse_px = {k: round(v, 2) for k, v in measure(seed).items()}
    print(json.dumps({"frames": FRAMES, "seed": seed, "rmse_px": rmse_px}))


if __name__ == "__main__":
    main()
