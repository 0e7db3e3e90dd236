"""Training-pipeline throughput versus pure JPEG decoding, per CPU core, printed as JSON.

Both run in the same process with the same tf.data thread pool (``--cores`` threads, one
thread per op, OpenCV single-threaded), over the same image files: the decode baseline reads
and decodes every image of the training records (``tf.io.decode_jpeg``, full resolution);
the pipeline decodes each image once (its crops' window only, DCT-reduced when all its crops
shrink it enough, unless ``--no-reduced-decode``), warps every instance, augments and
batches. An image of the pipeline yields all its instances; for the baseline, instances/s
counts the instances of the images decoded.

Rates are per CPU-second (process CPU time while timing), which is steady on a shared
machine; ``*_cpu_cores`` is CPU time over wall time (the cores actually used). Cases are
timed in turn ``--repeats`` times (decode, then each pipeline variant) and each rate is the
median; ``*_vs_decode`` is the median of the ratios of the same round.

Usage:
    python benchmarks/pipeline.py --cores 1 --seconds 5 --repeats 3
    python benchmarks/pipeline.py --no-reduced-decode   # full-resolution decodes only
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's kpnet

import cv2  # noqa: E402
import tensorflow as tf  # noqa: E402

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "coco_mini"
OPTIMISATIONS = {
    "roi_decode": "JPEGs decoded only inside the window of the image's crops",
    "reduced_decode": "JPEG DCT scaling 1/2, 1/4, 1/8 when every crop shrinks that much",
    "rgba_warp": "warpAffine on RGBA (OpenCV's 4-channel path, ~2x its 3-channel one)",
    "one_color_transform": "brightness/contrast/saturation as one cv2.transform per crop",
    "epoch_batched_geometry": "all affines, colours, keypoints of an epoch in one graph call",
}


def _options(cores: int) -> tf.data.Options:
    options = tf.data.Options()
    options.threading.private_threadpool_size = cores
    options.threading.max_intra_op_parallelism = 1
    return options


class _Timer:
    """Times a dataset in slices: (images per CPU-second, CPU cores used).

    Each slice gets a fresh iterator (warmed up, then dropped), so no other case's
    background prefetching runs while one case is timed.
    """

    def __init__(self, ds: tf.data.Dataset, count):
        self.ds, self.count = ds, count

    def __call__(self, seconds: float) -> tuple[float, float]:
        it = iter(self.ds)
        for _ in range(3):  # warm-up: function instantiation, thread pools, file cache
            next(it)
        done, start, cpu = 0, time.perf_counter(), time.process_time()
        while time.perf_counter() - start < seconds:
            done += self.count(next(it))
        wall, cpu = time.perf_counter() - start, time.process_time() - cpu
        del it
        gc.collect()
        return done / cpu, cpu / wall


def decode_timer(paths: list[str], cores: int) -> _Timer:
    """Images of read + tf.io.decode_jpeg alone."""
    ds = tf.data.Dataset.from_tensor_slices(paths).repeat()
    ds = ds.map(lambda p: tf.shape(tf.io.decode_jpeg(tf.io.read_file(p), channels=3))[0],
                num_parallel_calls=tf.data.AUTOTUNE).batch(32)  # fmt: skip
    return _Timer(ds.prefetch(2).with_options(_options(cores)), lambda b: int(b.shape[0]))


def pipeline_timer(records, spec, config, cores: int, batch: int) -> _Timer:
    """The training pipeline (instances counted as images: times images per instance)."""
    from kpnet.data.pipeline import build_dataset

    ds = build_dataset(records, spec, config, batch, training=True, repeat=True)
    per_image = len({r.image_path for r in records}) / len(records)
    return _Timer(ds.with_options(_options(cores)), lambda b: int(b[0].shape[0]) * per_image)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="coco_mini directory")
    parser.add_argument("--cores", type=int, default=1, help="tf.data threads (and TF threads)")
    parser.add_argument("--seconds", type=float, default=5.0, help="seconds per timed slice")
    parser.add_argument("--repeats", type=int, default=3, help="rounds of timed slices")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--no-reduced-decode", action="store_true",
                        help="full-resolution decodes only (reduced_decode=False)")  # fmt: skip
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
    per_image = len(records) / len(paths)  # instances per image
    reduced = not args.no_reduced_decode
    no_color = AugmentConfig(brightness=0, contrast=0, saturation=0, hue=0)
    variants = {"pipeline": PipelineConfig(reduced_decode=reduced)}
    if reduced:  # the same run without it, for a side-by-side ratio
        variants["pipeline_full_res_decode"] = PipelineConfig(reduced_decode=False)
    variants["pipeline_no_color"] = PipelineConfig(augment=no_color, reduced_decode=reduced)

    timers = {"decode": decode_timer(paths, args.cores)}
    for name, config in variants.items():
        timers[name] = pipeline_timer(records, spec, config, args.cores, args.batch_size)
    rounds = [{name: timer(args.seconds) for name, timer in timers.items()}
              for _ in range(args.repeats)]  # fmt: skip

    def median(fn) -> float:
        return statistics.median(fn(r) for r in rounds)

    on = {k: v for k, v in OPTIMISATIONS.items() if k != "reduced_decode" or reduced}
    result = {
        "device": "cpu",
        "cores": args.cores,
        "images": len(paths),
        "instances": len(records),
        "input_size": list(PipelineConfig().input_size),
        "seconds_x_repeats": [args.seconds, args.repeats],
        "optimisations_on": on,
    }
    for name in timers:
        images = median(lambda r, n=name: r[n][0])
        result[f"{name}_images_per_cpu_s"] = round(images, 1)
        result[f"{name}_instances_per_cpu_s"] = round(images * per_image, 1)
        result[f"{name}_cpu_cores"] = round(median(lambda r, n=name: r[n][1]), 2)
        if name != "decode":
            ratio = median(lambda r, n=name: r[n][0] / r["decode"][0])
            result[f"{name}_vs_decode_images_per_cpu_s"] = round(ratio, 3)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
