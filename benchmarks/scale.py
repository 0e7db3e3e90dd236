"""Start-up and throughput at scale: a COCO json + image folder versus TFRecords, as JSON.

For each size (instances) a synthetic dataset is made once under ``--cache``: 64 rendered
two-pin images (128x128 JPEG), hard-linked ``size / 4`` times so that every image entry has
its own file (4 instances per image, boxes jittered; image sizes in the json), its COCO
json, and the same data converted to TFRecords (``kpnet data convert --to tfrecord``;
``--shards`` files). Each case then runs in a fresh process:

- ``first_batch_s``: from loading the source (the json and its records, or the TFRecord
  index) to the first augmented training batch (``build_dataset(..., training=True,
  repeat=True)``), i.e. what ``kpnet fit`` waits before training starts;
  ``first_batch_cpu_s``: the CPU-seconds of the process meanwhile (all threads; steadier
  on a shared machine);
- ``extra_memory_mb``: peak resident memory until the first batch minus the resident
  memory after importing TensorFlow and kpnet (``VmHWM`` / ``VmRSS``, Linux);
- ``images_per_s`` / ``instances_per_s``: steady state, after ``--warmup`` batches, over
  ``--steps`` batches of ``--batch`` crops (input 128x96, the default augmentation), on all
  the cores TensorFlow takes, per wall-clock second and per CPU-second of the process (the
  steadier figure on a shared machine; both are noisy there: compare within one run).

Usage:
    python benchmarks/scale.py --sizes 10000,100000           # a few minutes
    python benchmarks/scale.py --sizes 1000000 --cache /tmp/kpnet-scale
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's kpnet

POOL, PER_IMAGE, IMAGE_SIZE, INPUT_SIZE = 64, 4, (128, 128), (128, 96)


def _memory(key: str) -> int:
    """Bytes of ``VmRSS`` (resident now) or ``VmHWM`` (peak resident) of this process.

    Not ``getrusage``: its peak survives ``exec``, so a case would inherit the parent's.
    """
    with open("/proc/self/status") as f:
        line = next(ln for ln in f if ln.startswith(key + ":"))
    return int(line.split()[1]) * 1024


def _paths(cache: Path, size: int) -> dict[str, Path]:
    root = cache / f"n{size}"
    return {"root": root, "json": root / "train.json", "images": root / "images",
            "tfrecord": root / "tfrecord", "done": root / "done"}  # fmt: skip


def make(cache: Path, size: int, shards: int) -> dict[str, float]:
    """Write the folder dataset and its TFRecords (once); seconds spent on each."""
    import cv2
    import numpy as np

    from kpnet.data.coco import load_coco_records
    from kpnet.data.synthetic import PIN_NAMES, pin_spec, render_pins
    from kpnet.data.tfrecord import write_tfrecords

    p = _paths(cache, size)
    if p["done"].is_file():
        return json.loads(p["done"].read_text())
    start = time.perf_counter()
    pool = cache / "pool"
    pool.mkdir(parents=True, exist_ok=True)
    samples = []
    for i in range(POOL):
        s = render_pins(np.random.default_rng([7, i]), IMAGE_SIZE)
        if not (pool / f"{i}.jpg").is_file():
            cv2.imwrite(str(pool / f"{i}.jpg"), s.image[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, 90])
        samples.append(s)
    p["images"].mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    images, anns = [], []
    for g in range(size // PER_IMAGE):
        name = f"{g:07d}.jpg"
        target = p["images"] / name
        if not target.exists():
            os.link(pool / f"{g % POOL}.jpg", target)
        images.append({"id": g, "file_name": name, "height": IMAGE_SIZE[0],
                       "width": IMAGE_SIZE[1]})  # fmt: skip
        s = samples[g % POOL]
        kp = [round(float(v), 2) for v in s.keypoints.reshape(-1)]
        for _ in range(PER_IMAGE):
            box = [round(float(v), 2) for v in np.asarray(s.box) + rng.uniform(-2, 2, 4)]
            anns.append({"id": len(anns), "image_id": g, "category_id": 1, "iscrowd": 0,
                         "bbox": box, "keypoints": kp})  # fmt: skip
    category = {"id": 1, "name": "part", "keypoints": list(PIN_NAMES), "skeleton": [[1, 2]]}
    with open(p["json"], "w") as f:
        json.dump({"images": images, "annotations": anns, "categories": [category]}, f)
    del images, anns
    folder_s = time.perf_counter() - start
    start = time.perf_counter()
    spec, records = load_coco_records(p["json"], p["images"], spec=pin_spec())
    write_tfrecords(records, spec, p["tfrecord"], shards=shards, source=str(p["json"]))
    times = {"make_folder_s": round(folder_s, 1),
             "convert_s": round(time.perf_counter() - start, 1)}  # fmt: skip
    p["done"].write_text(json.dumps(times))
    return times


def case(cache: Path, size: int, source: str, batch: int, warmup: int, steps: int) -> dict:
    """One measurement (run in a fresh process)."""
    import tensorflow as tf

    from kpnet.codec import Codec
    from kpnet.data.coco import load_coco_records
    from kpnet.data.pipeline import PipelineConfig, build_dataset
    from kpnet.data.synthetic import pin_spec
    from kpnet.data.tfrecord import load_tfrecord_set

    tf.constant(0)  # initialise the runtime before the baseline
    p = _paths(cache, size)
    base = _memory("VmRSS")
    start, start_cpu = time.perf_counter(), time.process_time()
    if source == "coco":
        spec, data = load_coco_records(p["json"], p["images"], spec=pin_spec())
    else:
        data = load_tfrecord_set(p["tfrecord"])
        spec = data.spec
    config = PipelineConfig(codec=Codec(INPUT_SIZE))
    ds = build_dataset(data, spec, config, batch, training=True, repeat=True, seed=0)
    it = iter(ds)
    next(it)
    first, first_cpu = time.perf_counter() - start, time.process_time() - start_cpu
    peak = _memory("VmHWM")
    for _ in range(warmup):
        next(it)
    t0, cpu0 = time.perf_counter(), time.process_time()
    for _ in range(steps):
        next(it)
    rate = steps * batch / (time.perf_counter() - t0)
    per_cpu = steps * batch / PER_IMAGE / (time.process_time() - cpu0)
    return {"first_batch_s": round(first, 2), "first_batch_cpu_s": round(first_cpu, 2),
            "extra_memory_mb": round((peak - base) / 2**20),
            "instances_per_s": round(rate, 1), "images_per_s": round(rate / PER_IMAGE, 1),
            "images_per_cpu_s": round(per_cpu, 1)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="10000,100000,1000000",
                        help="instances per dataset, comma-separated")  # fmt: skip
    parser.add_argument("--cache", default="/tmp/kpnet-scale", help="datasets are kept here")
    parser.add_argument("--shards", type=int, default=16)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--sources", default="coco,tfrecord")
    parser.add_argument("--case", nargs=2, metavar=("SIZE", "SOURCE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    cache = Path(args.cache)
    if args.case:
        size, source = int(args.case[0]), args.case[1]
        print(json.dumps(case(cache, size, source, args.batch, args.warmup, args.steps)))
        return
    results = []
    for size in (int(s) for s in args.sizes.split(",")):
        row: dict = {"instances": size, "images": size // PER_IMAGE}
        row.update(make(cache, size, args.shards))
        for source in args.sources.split(","):
            cmd = [sys.executable, __file__, "--case", str(size), source, "--cache", str(cache),
                   "--batch", str(args.batch), "--warmup", str(args.warmup),
                   "--steps", str(args.steps)]  # fmt: skip
            out = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if out.returncode:
                row[source] = {"error": out.stderr.strip().splitlines()[-1:]}
            else:
                row[source] = json.loads(out.stdout.strip().splitlines()[-1])
        if "images_per_s" in row.get("coco", {}) and "images_per_s" in row.get("tfrecord", {}):
            for key in ("images_per_s", "images_per_cpu_s"):
                row[f"tfrecord_vs_coco_{key}"] = round(
                    row["tfrecord"][key] / row["coco"][key], 2)  # fmt: skip
        results.append(row)
        print(json.dumps(row), flush=True)
    config = {"input_size": INPUT_SIZE, "image_size": IMAGE_SIZE, "instances_per_image": PER_IMAGE,
              "batch": args.batch, "shards": args.shards, "cpus": os.cpu_count()}  # fmt: skip
    print(json.dumps({"benchmark": "scale", "config": config, "results": results}, indent=1))


if __name__ == "__main__":
    main()
