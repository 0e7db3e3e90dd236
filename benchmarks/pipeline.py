"""Training-pipeline throughput versus pure JPEG decoding, per CPU core, printed as JSON.

Both run in the same process with the same tf.data thread pool (``--cores`` threads, one
thread per op, OpenCV single-threaded), over the same image files: the decode baseline reads
and decodes every image of the training records (``tf.io.decode_jpeg``); the pipeline decodes
each image once (its instance windows only), warps every instance, augments and batches. The
ratio compares images/s (an image of the pipeline yields all its instances). ``*_cpu_cores``
is the process CPU time over wall time while timing (the cores actually used); on a shared
machine ``*_per_cpu_s`` (work per CPU-second) is the steadier comparison.

Usage:
    python benchmarks/pipeline.py --cores 1 --seconds 10
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import cv2  # noqa: E402
import tensorflow as tf  # noqa: E402

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "coco_mini"


def _options(cores: int) -> tf.data.Options:
    options = tf.data.Options()
    options.threading.private_threadpool_size = cores
    options.threading.max_intra_op_parallelism = 1
    return options


def _rate(ds: tf.data.Dataset, count, seconds: float) -> tuple[float, float]:
    """(elements per second, CPU cores used) after a warm-up; ``count`` counts an element."""
    it = iter(ds)
    for _ in range(3):
        next(it)
    done, start, cpu = 0, time.perf_counter(), time.process_time()
    while time.perf_counter() - start < seconds:
        done += count(next(it))
    wall = time.perf_counter() - start
    return done / wall, (time.process_time() - cpu) / wall


def decode_rate(paths: list[str], cores: int, seconds: float) -> tuple[float, float]:
    """(images/s, cores used) of read + tf.io.decode_jpeg alone."""
    ds = tf.data.Dataset.from_tensor_slices(paths).repeat()
    ds = ds.map(lambda p: tf.shape(tf.io.decode_jpeg(tf.io.read_file(p), channels=3))[0],
                num_parallel_calls=tf.data.AUTOTUNE).batch(32)  # fmt: skip
    return _rate(ds.prefetch(2).with_options(_options(cores)), lambda b: int(b.shape[0]), seconds)


def pipeline_rate(records, spec, config, cores: int, seconds: float, batch: int):
    """(instances/s, cores used) of the training pipeline."""
    from kpnet.data.pipeline import build_dataset

    ds = build_dataset(records, spec, config, batch, training=True, repeat=True)
    return _rate(ds.with_options(_options(cores)), lambda b: int(b[0].shape[0]), seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="coco_mini directory")
    parser.add_argument("--cores", type=int, default=1, help="tf.data threads (and TF threads)")
    parser.add_argument("--seconds", type=float, default=10.0, help="timed seconds per case")
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    tf.config.threading.set_inter_op_parallelism_threads(args.cores)
    tf.config.threading.set_intra_op_parallelism_threads(1)
    cv2.setNumThreads(1)  # OpenCV's own pool would add cores beyond --cores

    from kpnet.data.augment import AugmentConfig
    from kpnet.data.coco import load_coco_records
    from kpnet.data.pipeline import PipelineConfig

    ann = args.data / "annotations" / "person_keypoints_train2017.json"
    spec, records = load_coco_records(ann, args.data / "train2017")
    paths = sorted({r.image_path for r in records})
    ratio = len(paths) / len(records)  # images per instance
    decode, decode_cpu = decode_rate(paths, args.cores, args.seconds)
    result = {
        "device": "cpu",
        "cores": args.cores,
        "images": len(paths),
        "instances": len(records),
        "input_size": [256, 192],
        "decode_images_per_s_per_core": round(decode / args.cores, 1),
        "decode_cpu_cores": round(decode_cpu, 2),
        "decode_images_per_cpu_s": round(decode / decode_cpu, 1),
    }
    variants = {
        "pipeline": PipelineConfig(),
        "pipeline_no_color": PipelineConfig(
            augment=AugmentConfig(brightness=0, contrast=0, saturation=0, hue=0)
        ),
    }
    for name, config in variants.items():
        inst, cpu = pipeline_rate(records, spec, config, args.cores, args.seconds, args.batch_size)
        result[f"{name}_instances_per_s_per_core"] = round(inst / args.cores, 1)
        result[f"{name}_images_per_s_per_core"] = round(inst * ratio / args.cores, 1)
        result[f"{name}_vs_decode_images_ratio"] = round(inst * ratio / decode, 3)
        result[f"{name}_cpu_cores"] = round(cpu, 2)
        result[f"{name}_images_per_cpu_s"] = round(inst * ratio / cpu, 1)
        result[f"{name}_vs_decode_images_per_cpu_s_ratio"] = round(
            inst * ratio / cpu / (decode / decode_cpu), 3
        )
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
