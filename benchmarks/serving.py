"""Serving cost of in-graph decoding: SavedModel signatures vs the bare heatmap forward.

Prints JSON: batch-1 latency (median ms) and batch-N throughput (images/s) of

* ``bare``: the heatmap model alone (RefineNet output), saved and loaded like the export;
* ``crops``: kpnet's ``crops`` signature (forward + decoding + heatmaps);
* ``serving_default``: crop from a 480x640 image + forward + decoding + back to image px;

and the overhead of decoding and of the signatures' input checks (``crops`` / ``bare`` - 1;
goal <= 10 %).

Example:
    $ python benchmarks/serving.py --quick            # tiny backbone, a few seconds
    $ python benchmarks/serving.py --backbone resnet50 --iters 10 --batch-iters 3
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import tensorflow as tf

from kpnet.export import export_saved_model
from kpnet.inference import build_keypoints_model
from kpnet.models import build_cpn
from kpnet.spec import KeypointSpec


class _Bare(tf.Module):
    """The heatmap model alone behind one tf.function, saved the same way as the export."""

    def __init__(self, heatmap_model, input_size: tuple[int, int]) -> None:
        super().__init__()
        self.model_variables = [getattr(v, "value", v) for v in heatmap_model.variables]
        forward = lambda x: {"heatmaps": heatmap_model(x, training=False)["refine"]}
        spec = tf.TensorSpec([None, *input_size, 3], tf.float32, name="crops")
        self.heatmaps = tf.function(forward, autograph=False, input_signature=[spec])


def _time(runs: dict, iters: int, warmup: int = 1) -> dict[str, float]:
    """Median seconds per call of each function, interleaved so load changes hit all alike."""
    for fn in runs.values():
        for _ in range(warmup):
            _block(fn())
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(iters):
        for name, fn in runs.items():
            start = time.perf_counter()
            _block(fn())
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def _block(result) -> None:
    for value in result.values():
        value.numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", default="resnet50")
    parser.add_argument("--input-size", type=int, nargs=2, default=(256, 192))
    parser.add_argument("--quick", action="store_true", help="tiny backbone, few iterations")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--iters", type=int, default=10, help="batch-1 timed iterations")
    parser.add_argument("--batch-iters", type=int, default=3, help="batch-N timed iterations")
    args = parser.parse_args()
    if args.quick:
        args.backbone, args.iters, args.batch_iters = "tiny", 5, 2
    size = tuple(args.input_size)
    spec = KeypointSpec.coco17()
    width = 64 if args.backbone == "tiny" else 256
    heatmap_model = build_cpn(spec.num_channels, (*size, 3), args.backbone, None, width)
    keypoints_model = build_keypoints_model(heatmap_model, spec)
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        export_saved_model(keypoints_model, Path(tmp) / "kpnet")
        export_s = time.perf_counter() - start
        tf.saved_model.save(_Bare(heatmap_model, size), str(Path(tmp) / "bare"))
        loaded = [tf.saved_model.load(str(Path(tmp) / name)) for name in ("kpnet", "bare")]
    served, bare = loaded[0].signatures, loaded[1].heatmaps  # keep `loaded`: it owns the weights
    rng = np.random.default_rng(0)
    image = tf.constant(rng.integers(0, 256, (480, 640, 3), dtype=np.uint8))
    result = {"backbone": args.backbone, "input_size": list(size), "batch": args.batch,
              "export_s": round(export_s, 1), "machine": _machine()}  # fmt: skip
    for n, iters, key in ((1, args.iters, "latency_b1_ms"), (args.batch, args.batch_iters, None)):
        crops = tf.constant(rng.uniform(0, 255, (n, *size, 3)).astype(np.float32))
        images = tf.tile(image[None], [n, 1, 1, 1])
        boxes = tf.tile(tf.constant([[200.0, 100.0, 150.0, 300.0]]), [n, 1])
        runs = {
            "bare": lambda crops=crops: bare(crops),
            "crops": lambda crops=crops: served["crops"](crops=crops),
            "serving_default": lambda i=images, b=boxes: served["serving_default"](
                images=i, boxes=b
            ),
        }  # fmt: skip
        for name, median in _time(runs, iters).items():
            if key:
                result.setdefault(key, {})[name] = round(median * 1e3, 2)
            else:
                result.setdefault(f"throughput_b{n}_img_s", {})[name] = round(n / median, 2)
    for key in ("latency_b1_ms", f"throughput_b{args.batch}_img_s"):
        t = result[key]
        slower = (lambda a, b: a / b - 1) if key.startswith("latency") else (lambda a, b: b / a - 1)
        result[f"decode_overhead_{key.split('_')[0]}_{key.split('_')[1]}"] = {
            name: round(slower(t[name], t["bare"]), 4) for name in ("crops", "serving_default")
        }
    print(json.dumps(result, indent=2))


def _machine() -> str:
    cpus = len(tf.config.list_physical_devices("CPU"))
    gpus = len(tf.config.list_physical_devices("GPU"))
    return f"{platform.processor() or platform.machine()}, {cpus} CPU device, {gpus} GPU"


if __name__ == "__main__":
    main()
