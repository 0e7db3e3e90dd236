"""Round-trip accuracy of heatmap decoding: render clean Gaussians, decode, measure the error.

Usage:
    python benchmarks/codec.py [--samples 4000] [--sigma 2.0] [--height 64] [--width 48]

Prints JSON: mean / p90 / max error in heatmap pixels per method (argmax, quarter, DARK),
the number of samples and the sigma. Positions are uniform over the whole map, borders
included (pixel centres at integers, so x in [-0.5, W - 0.5)).
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from kpnet import codec


def round_trip_errors(
    samples: int, sigma: float, shape: tuple[int, int], seed: int = 0
) -> dict[str, dict[str, float]]:
    """Per-method error statistics (heatmap pixels) for ``samples`` random sub-pixel peaks."""
    rng = np.random.default_rng(seed)
    h, w = shape
    xy = np.stack([rng.uniform(-0.5, w - 0.5, samples), rng.uniform(-0.5, h - 0.5, samples)], -1)
    kp = np.concatenate([xy, np.full((samples, 1), 2.0)], -1)[:, None].astype(np.float32)
    heatmaps = codec.render_heatmaps(kp, shape, sigma)
    out = {}
    for method in codec.DECODE_METHODS[::-1]:
        start = time.perf_counter()
        pred, _ = codec.decode_heatmaps(heatmaps, method, sigma)
        seconds = time.perf_counter() - start
        err = np.linalg.norm(np.asarray(pred)[:, 0] - xy, axis=-1)
        out[method] = {
            "mean_px": float(err.mean()),
            "p90_px": float(np.percentile(err, 90)),
            "max_px": float(err.max()),
            "decode_ms_per_map": 1000.0 * seconds / samples,
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=4000)
    parser.add_argument("--sigma", type=float, default=2.0)
    parser.add_argument("--height", type=int, default=64)
    parser.add_argument("--width", type=int, default=48)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    shape = (args.height, args.width)
    result = {
        "samples": args.samples,
        "sigma": args.sigma,
        "heatmap_size": list(shape),
        "methods": round_trip_errors(args.samples, args.sigma, shape, args.seed),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
