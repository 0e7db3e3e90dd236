"""Video analysis speed of ``kpnet predict VIDEO`` on this machine, printed as JSON.

A 640x480 video of ``--frames`` frames (default 2,000) is written with OpenCV (mp4v) from
the real frames of the shared DeepLabCut project (dlc_reaching, resized, looped). Each model
then runs ``kpnet.predict.predict_inputs`` over it, the exact path of ``kpnet predict``:
frames decoded on a background thread, batches through the model, the DLC CSV + ``.h5``
and the json written. Models (random weights: speed does not depend on them):

* ``dlc_default``: recipes/dlc-project.yaml as shipped (EfficientNet-Lite0 trunk + FPN
  head, 320x416 whole frames), ``model.backbone_weights=null``;
* ``resnet50_cpn``: the same recipe with ``model.backbone=resnet50 model.head=cpn``
  (same input), over the first ``--resnet-frames`` frames (default 300: it is slow on a CPU).

Per model: batch 1 over the whole video, a short search over ``--batches`` on the first
``--search-frames`` frames, then the best batch over the whole video. Frames per second
count every frame from the first decode to the last file written; the model is loaded and
traced for each batch size before the timed runs (``load_s``: building and the first trace).

Usage:
    python benchmarks/video.py                      # about 10 minutes on 2 CPU cores
    python benchmarks/video.py --frames 2000 --models dlc_default --batches 4 8
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's kpnet


ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "dlc_reaching"
RECIPE = ROOT / "recipes" / "dlc-project.yaml"
MODELS = {
    "dlc_default": ["model.backbone_weights=null"],
    "resnet50_cpn": ["model.backbone_weights=null", "model.backbone=resnet50", "model.head=cpn"],
}


def write_video(path: Path, data: Path, frames: int, size=(640, 480), fps: float = 30.0) -> int:
    """Write ``frames`` frames of the project's labelled images (resized, looped)."""
    import cv2

    images = sorted(data.glob("labeled-data/*/*.png"))
    if not images:
        raise SystemExit(f"{data}: no labeled-data/*/*.png (pass --data a DLC project)")
    pictures = [cv2.resize(cv2.imread(str(p)), size, interpolation=cv2.INTER_AREA)
                for p in images]  # fmt: skip
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, size)
    for i in range(frames):
        writer.write(pictures[i % len(pictures)])
    writer.release()
    return len(pictures)


def build(name: str) -> Any:
    """The keypoints model of a benchmarked recipe (random weights), built and traced."""
    from kpnet.data.dlc import dlc_spec
    from kpnet.inference import build_keypoints_model
    from kpnet.recipe import load_recipe
    from kpnet.training import build_model

    recipe = load_recipe(RECIPE, MODELS[name])
    spec = dlc_spec(DEFAULT_DATA) if DEFAULT_DATA.exists() else None
    if spec is None:
        from kpnet.spec import KeypointSpec

        spec = KeypointSpec(names=tuple(f"p{i}" for i in range(5)))
    return build_keypoints_model(build_model(recipe, spec), spec, recipe.codec())


def cut(video: Path, frames: int, out: Path) -> Path:
    """The first ``frames`` frames of ``video`` as another mp4."""
    import cv2

    cap = cv2.VideoCapture(str(video))
    w, h = int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)), int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT))
    writer = cv2.VideoWriter(str(out), cv2.VideoWriter_fourcc(*"mp4v"), 30.0, (w, h))
    for _ in range(frames):
        ok, frame = cap.read()
        if not ok:
            break
        writer.write(frame)
    writer.release()
    cap.release()
    return out


def timed(model: Any, video: Path, batch: int, out: Path) -> dict[str, Any]:
    """Frames per second of predict_inputs over ``video`` at ``batch``."""
    from kpnet.predict import predict_inputs

    start = time.perf_counter()
    summary = predict_inputs(model, [video], out / "p.json", batch_size=batch)
    seconds = time.perf_counter() - start
    return {"batch": batch, "frames": summary["frames"], "seconds": round(seconds, 2),
            "fps": round(summary["frames"] / seconds, 2)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--frames", type=int, default=2000)
    parser.add_argument("--resnet-frames", type=int, default=300)
    parser.add_argument("--search-frames", type=int, default=200)
    parser.add_argument("--batches", type=int, nargs="+", default=[4, 8, 16])
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=list(MODELS))
    args = parser.parse_args()

    import tensorflow as tf

    work = Path(tempfile.mkdtemp(prefix="kpnet-video-"))
    try:
        run(args, work, tf.__version__)
    finally:
        shutil.rmtree(work, ignore_errors=True)  # the videos and tables written


def run(args: argparse.Namespace, work: Path, tf_version: str) -> None:
    """Write the video, time every model, print the JSON."""
    video = work / "reaching_640x480.mp4"
    sources = write_video(video, args.data, args.frames)
    results: dict[str, Any] = {
        "video": {
            "frames": args.frames,
            "size": [640, 480],
            "codec": "mp4v",
            "made_from": f"{sources} dlc_reaching frames, looped",
        },  # fmt: skip
        "cores": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "machine": platform.processor() or platform.machine(),
        "tensorflow": tf_version,
        "models": {},
    }
    for name in args.models:
        frames = args.frames if name == "dlc_default" else min(args.frames, args.resnet_frames)
        clip = video if frames == args.frames else cut(video, frames, work / f"{name}.mp4")
        search = cut(video, min(args.search_frames, frames), work / f"{name}_search.mp4")
        start = time.perf_counter()
        model = build(name)
        warm = cut(video, 2 * max(args.batches), work / "warm.mp4")
        timed(model, warm, 1, work)  # trace batch 1 once
        load_s = round(time.perf_counter() - start, 1)
        runs = {"batch_1": timed(model, clip, 1, work)}
        for b in args.batches:
            timed(model, warm, b, work)  # trace every batch size before timing it
        trials = [timed(model, search, b, work) for b in args.batches]
        best = max(trials, key=lambda r: r["fps"])["batch"]
        runs["best_batch"] = timed(model, clip, best, work)
        results["models"][name] = {
            "params": int(model.count_params()),
            "input_size": list(model.inputs[0].shape[1:3]),
            "load_s": load_s,
            **runs,
            "batch_search": [{k: r[k] for k in ("batch", "frames", "fps")} for r in trials],
        }
        print(json.dumps({name: results["models"][name]}), file=sys.stderr, flush=True)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
