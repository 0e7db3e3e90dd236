"""Training speed of kpnet's CPN, printed as JSON lines (one per configuration).

Cases (``--cases``, run in this order in ONE process, so their ratios are side by side):

* ``step``: the training step alone, exactly the compiled function ``model.fit`` runs
  (``model.train_function``: forward, the five losses rendering their Gaussian targets from
  keypoints, backward, optimizer), fed uint8 images and float32 keypoints already on the
  device. Reports ``loss_ms``: the five losses and their gradient alone (targets included).
  Needs only Keras + the backend: under ``KERAS_BACKEND=jax`` TensorFlow is never imported.
* ``fit``: the same model through ``kpnet fit``'s own path: the COCO recipe, its tf.data
  pipeline (decode, crop, augment; ``--data``: a COCO folder, default shared coco_mini) and
  ``model.fit``; step time from a callback after ``--warmup`` steps, so the gap between the
  step and the whole loop shows (needs TensorFlow for tf.data).
* ``infer``: the heatmap model and the keypoints model (decoding inside the graph, no flip
  test) through ``predict_on_batch`` on device-resident uint8 images.
* ``torch``: a PyTorch CPN-50 (pytorch-cpn's layout: ResNet-50, GlobalNet, RefineNet with
  OHKM top 8, heatmap targets precomputed as pytorch-cpn's loader does, Adam), float32 or,
  for ``mixed_bfloat16``, bf16 autocast; channels-last on the CPU; skipped (one line saying
  so) when torch is not installed.

Every record has ``img_s`` (images per second) and ``step_ms`` (median over ``--steps``
timed steps, after ``--warmup`` untimed ones), the backend, device and precision.
``step_vs_torch`` (in ``summary``) is kpnet's step time over the PyTorch CPN's, same batch
and precision;
with both ``step`` and ``torch``, a ``paired`` record times the two steps in alternation
(``--paired-rounds``) and gives the median per-round ratio, the figure to quote on a shared
machine.

Usage:
    python benchmarks/train_speed.py                                    # CPU defaults
    KERAS_BACKEND=jax python benchmarks/train_speed.py --cases step infer \\
        --precision mixed_bfloat16 --batch 128 --steps 20               # a GPU under JAX
    python benchmarks/train_speed.py --cases step torch --batch 8 --steps 3

Example (a tiny model, seconds on a CPU):
    >>> import subprocess, sys                                          # doctest: +SKIP
    >>> subprocess.run([sys.executable, "benchmarks/train_speed.py", "--backbone", "tiny",
    ...                 "--input-size", "64", "64", "--cases", "step"])  # doctest: +SKIP
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's kpnet

import keras  # noqa: E402
import numpy as np  # noqa: E402

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "coco_mini"
PRECISIONS = ("float32", "mixed_bfloat16", "mixed_float16")
CASES = ("step", "fit", "infer", "torch")
#: Timed step functions kept for the paired rounds: (case, precision, batch) -> step.
_STEPS: dict[tuple, Callable[[], Any]] = {}


def device_name() -> str:
    """The backend's first device in words (``cpu``, ``NVIDIA H100 80GB HBM3``, ...)."""
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        dev = jax.devices()[0]
        if dev.platform != "cpu":
            return f"{dev.platform}:{dev.device_kind} x{jax.local_device_count()}"
    if backend == "tensorflow":
        import tensorflow as tf

        gpus = tf.config.list_physical_devices("GPU")
        if gpus:
            return "gpu:" + tf.config.experimental.get_device_details(gpus[0]).get(
                "device_name", "gpu"
            )
    return f"cpu:{_cpu_model()} x{os.cpu_count()} cores"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _timed(fn: Callable[[], Any], warmup: int, steps: int) -> tuple[float, float]:
    """(seconds of the first call, median seconds of ``steps`` calls after ``warmup``)."""
    start = time.perf_counter()
    fn()
    first = time.perf_counter() - start
    for _ in range(max(0, warmup - 1)):
        fn()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return first, statistics.median(times)


def _record(case: str, args, precision: str, batch: int, seconds: float, **extra) -> dict:
    return {
        "case": case,
        "backend": keras.backend.backend(),
        "device": device_name(),
        "model": f"cpn-{args.backbone}",
        "input": list(args.input_size),
        "keypoints": args.keypoints,
        "precision": precision,
        "batch": batch,
        "img_s": round(batch / seconds, 2),
        "step_ms": round(1000 * seconds, 1),
        **({"bn": getattr(args, "bn", "fused")} if keras.backend.backend() == "tensorflow" else {}),
        **extra,
    }


def synthetic_batch(batch: int, input_size, keypoints: int, seed: int = 0):
    """uint8 images [B, H, W, 3] and keypoints [B, K, 3] (input pixels, all visible)."""
    rng = np.random.default_rng(seed)
    h, w = input_size
    images = rng.integers(0, 256, (batch, h, w, 3), dtype=np.uint8)
    xy = rng.uniform(8, [w - 12, h - 12], (batch, keypoints, 2))
    vis = np.full((batch, keypoints, 1), 2.0)
    return images, np.concatenate([xy, vis], -1).astype("float32")


def build(args, spec, weights: bool = False):
    """kpnet's CPN and its compile (the loss and optimizer settings of the COCO recipe)."""
    from kpnet.losses import build_losses
    from kpnet.models import build_cpn

    model = build_cpn(spec.num_channels, (*args.input_size, 3), backbone=args.backbone,
                      pyramid_channels=args.pyramid_channels)  # fmt: skip
    if getattr(args, "bn", "fused") == "keras":  # undo kpnet.models.fused_bn: Keras' own BN
        for layer in model._flatten_layers():
            layer.__dict__.pop("call", None)
    return model, build_losses(spec)


def _jit(args) -> bool | str:
    return {"auto": "auto", "true": True, "false": False}[args.jit_compile]


def _compile(model, losses, precision: str, jit_compile: bool | str = "auto") -> None:
    optimizer = keras.optimizers.Adam(5e-4)
    if precision == "mixed_float16":
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    model.compile(optimizer=optimizer, loss=losses[0], loss_weights=losses[1],
                  jit_compile=jit_compile)  # fmt: skip


def _on_device(data):
    """``data`` as backend tensors on the default device (GPU when there is one)."""
    return keras.tree.map_structure(keras.ops.convert_to_tensor, data)


def _step_fn(model, data) -> Callable[[], Any]:
    """One call of the compiled training function ``model.fit`` uses, on ``data``."""
    backend = keras.backend.backend()
    model.make_train_function()
    if backend == "jax":
        import jax

        state = [model._get_jax_state(trainable_variables=True, non_trainable_variables=True,
                                      optimizer_variables=True, metrics_variables=True)]

        def step():
            logs, state[0] = model.train_function(state[0], iter([data]))
            jax.block_until_ready(logs)
            return logs

        return step

    def step():
        logs = model.train_function(iter([data]))
        return float(logs["loss"])

    return step


def _loss_fn(losses, spec, batch: int, args, keypoints) -> Callable[[], Any]:
    """The five weighted losses and their gradient w.r.t. the heatmaps (rendering included)."""
    from kpnet.codec import OUTPUT_NAMES

    fns, weights = losses
    h, w = args.input_size[0] // 4, args.input_size[1] // 4
    heatmaps = _on_device(np.random.default_rng(1).normal(
        0, 0.1, (len(OUTPUT_NAMES), batch, h, w, spec.num_channels)).astype("float32"))  # fmt: skip

    def total(maps):
        return sum(weights[n] * keras.ops.mean(fns[n].call(keypoints, maps[i]))
                   for i, n in enumerate(OUTPUT_NAMES))  # fmt: skip

    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        grad = jax.jit(jax.value_and_grad(total))
        return lambda: jax.block_until_ready(grad(heatmaps))
    if backend == "tensorflow":
        import tensorflow as tf

        @tf.function
        def grad_tf(maps):
            with tf.GradientTape() as tape:
                tape.watch(maps)
                value = total(maps)
            return value, tape.gradient(value, maps)

        return lambda: grad_tf(heatmaps)[0].numpy()
    return lambda: None


def run_step(args, spec, precision: str, batch: int) -> dict:
    model, losses = build(args, spec)
    _compile(model, losses, precision, _jit(args))
    from kpnet.codec import OUTPUT_NAMES

    images, keypoints = synthetic_batch(batch, args.input_size, args.keypoints)
    model.train_on_batch(images, {n: keypoints for n in OUTPUT_NAMES})  # builds all state
    data = _on_device((images, {n: keypoints for n in OUTPUT_NAMES}))
    step = _step_fn(model, data)
    compile_s, step_s = _timed(step, args.warmup, args.steps)
    _STEPS[("step", precision, batch)] = step
    loss_s = _timed(_loss_fn(losses, spec, batch, args, data[1]["refine"]), 1, args.steps)[1]
    return _record("step", args, precision, batch, step_s, first_call_s=round(compile_s, 1),
                   loss_ms=round(1000 * loss_s, 1),
                   jit_compile=bool(model.jit_compile))  # fmt: skip


def run_infer(args, spec, precision: str, batch: int) -> list[dict]:
    from kpnet.inference import build_keypoints_model

    model, _ = build(args, spec)
    keypoints_model = build_keypoints_model(model, spec)
    images = _on_device(synthetic_batch(batch, args.input_size, args.keypoints)[0])
    out = []
    for name, m in (("infer_heatmaps", model), ("infer_keypoints", keypoints_model)):
        first, seconds = _timed(lambda m=m: m.predict_on_batch(images), args.warmup, args.steps)
        out.append(_record(name, args, precision, batch, seconds,
                           first_call_s=round(first, 1)))  # fmt: skip
    return out


def run_fit(args, spec, precision: str, batch: int) -> dict:
    """``kpnet fit``'s path: recipe -> tf.data pipeline -> compiled model -> ``model.fit``."""
    from kpnet.data.sources import load_data, pipeline_config
    from kpnet.recipe import load_recipe
    from kpnet.training.loop import _datasets
    from kpnet.training.phases import Phase, build_model, configure_phase

    recipe_path = Path(__file__).resolve().parents[1] / "recipes" / "coco-cpn50-256x192.yaml"
    data = Path(args.data)
    if not (data / "annotations").is_dir():
        raise SystemExit(f"train_speed: --data {data} has no annotations/ (a COCO folder)")
    steps = args.warmup + args.steps
    recipe = load_recipe(recipe_path, [
        f"data.coco.train_annotations={data}/annotations/person_keypoints_train2017.json",
        f"data.coco.train_images={data}/train2017", "data.coco.val_annotations=null",
        "data.coco.val_images=null", f"model.backbone={args.backbone}",
        "model.backbone_weights=null", f"model.input_size={list(args.input_size)}",
        f"model.pyramid_channels={args.pyramid_channels}", f"train.batch_size={batch}",
        f"train.precision={precision}", f"train.steps_per_epoch={steps}",
    ])  # fmt: skip
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(precision)
    try:
        data_spec, train, _ = load_data(recipe)
        train_ds, _ = _datasets(recipe, data_spec, train, [], pipeline_config(recipe), None)
        model = build_model(recipe, data_spec)
        configure_phase(model, recipe, data_spec, Phase(0, 0, 1, False), steps, set())
        model.steps_per_execution = args.steps_per_execution
        if args.jit_compile != "auto":
            model.jit_compile = _jit(args)
        times: list[float] = []

        class Timer(keras.callbacks.Callback):
            def on_train_batch_end(self, batch_index, logs=None):
                times.append(time.perf_counter())

        start = time.perf_counter()
        model.fit(train_ds, epochs=1, steps_per_epoch=steps, verbose=0, callbacks=[Timer()])
    finally:
        keras.mixed_precision.set_global_policy(previous)
    per_step = np.diff([start, *times]) / max(1, args.steps_per_execution)
    timed = per_step[args.warmup // max(1, args.steps_per_execution):]
    return _record("fit", args, precision, batch, float(np.median(timed)),
                   first_call_s=round(float(per_step[0]), 1),
                   jit_compile=bool(model.jit_compile), keypoints_in_data=data_spec.num_keypoints,
                   steps_per_execution=args.steps_per_execution)  # fmt: skip


def run_torch(args, batch: int, precision: str = "float32") -> dict:
    """A PyTorch CPN-50 training step (CPU; float32, or bf16 autocast for mixed_bfloat16),
    pytorch-cpn's losses and loop."""
    try:
        import torch
    except ImportError:
        return {"case": "torch", "skipped": "torch is not installed (pip install torch)"}
    from torch_cpn import build_torch_cpn, torch_step  # benchmarks/torch_cpn.py

    torch.manual_seed(0)
    model = build_torch_cpn(args.keypoints, tuple(args.input_size))
    model = model.to(memory_format=torch.channels_last)
    step = torch_step(model, batch, tuple(args.input_size), args.keypoints, precision)
    first, seconds = _timed(step, args.warmup, args.steps)
    _STEPS[("torch", precision, batch)] = step
    return {
        "case": "torch", "backend": f"torch {torch.__version__}",
        "device": f"cpu:{_cpu_model()} x{os.cpu_count()} cores",
        "model": "pytorch-cpn-resnet50", "input": list(args.input_size),
        "keypoints": args.keypoints, "precision": precision, "batch": batch,
        "img_s": round(batch / seconds, 2), "step_ms": round(1000 * seconds, 1),
        "first_call_s": round(first, 1), "threads": torch.get_num_threads(),
    }  # fmt: skip


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", choices=CASES, default=["step", "infer"])
    parser.add_argument("--precision", nargs="+", choices=PRECISIONS, default=["float32"])
    parser.add_argument("--batch", nargs="+", type=int, default=[8])
    parser.add_argument("--steps", type=int, default=3, help="timed steps per configuration")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps (compile) first")
    parser.add_argument("--backbone", default="resnet50")
    parser.add_argument("--input-size", nargs=2, type=int, default=[256, 192])
    parser.add_argument("--keypoints", type=int, default=17)
    parser.add_argument("--pyramid-channels", type=int, default=256)
    parser.add_argument("--paired-rounds", type=int, default=3,
                        help="with step and torch: rounds of the two steps in alternation")
    parser.add_argument("--steps-per-execution", type=int, default=1, help="fit case only")
    parser.add_argument("--jit-compile", choices=("auto", "true", "false"), default="auto",
                        help="XLA for the step (auto: Keras' choice, off for TF on a CPU)")
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="COCO folder (fit case)")
    parser.add_argument("--bn", choices=("fused", "keras"), default="fused",
                        help="BatchNorm under TensorFlow, step and infer cases: kpnet's fused "
                             "kernel (default) or Keras 3's own ops (the before of that change)")
    args = parser.parse_args(argv)
    from kpnet.spec import KeypointSpec

    spec = (KeypointSpec.coco17() if args.keypoints == 17
            else KeypointSpec(names=tuple(f"k{i}" for i in range(args.keypoints))))  # fmt: skip
    records: list[dict] = []

    def emit(rec: dict) -> None:
        records.append(rec)
        print(json.dumps(rec), flush=True)

    for case in args.cases:
        for batch in args.batch:
            if case == "torch":
                for precision in args.precision:
                    if precision != "mixed_float16":  # no float16 autocast on a CPU
                        emit(run_torch(args, batch, precision))
                continue
            for precision in args.precision:
                keras.mixed_precision.set_global_policy(precision)
                try:
                    if case == "step":
                        emit(run_step(args, spec, precision, batch))
                    elif case == "infer":
                        for rec in run_infer(args, spec, precision, batch):
                            emit(rec)
                    else:
                        emit(run_fit(args, spec, precision, batch))
                finally:
                    keras.mixed_precision.set_global_policy("float32")
    for batch in args.batch:
        if args.paired_rounds:
            for precision in args.precision:
                if ("step", precision, batch) in _STEPS and ("torch", precision, batch) in _STEPS:
                    emit(paired(precision, batch, args.paired_rounds))
    emit(summary(records))
    return records


def paired(precision: str, batch: int, rounds: int) -> dict:
    """kpnet's step and the PyTorch CPN's step timed in alternation, ``rounds`` times: the
    median of the per-round ratios is steady on a shared machine, where load drifts."""
    kp, pt = _STEPS["step", precision, batch], _STEPS["torch", precision, batch]
    ratios, kp_s, pt_s = [], [], []
    for _ in range(rounds):
        kp_s.append(_timed(kp, 0, 1)[1])
        pt_s.append(_timed(pt, 0, 1)[1])
        ratios.append(kp_s[-1] / pt_s[-1])
    return {"case": "paired", "precision": precision, "batch": batch, "rounds": rounds,
            "kpnet_step_ms": [round(1000 * t, 1) for t in kp_s],
            "torch_step_ms": [round(1000 * t, 1) for t in pt_s],
            "step_vs_torch_median": round(statistics.median(ratios), 3)}  # fmt: skip


def summary(records: list[dict]) -> dict:
    """Ratios of the records of this run: kpnet step / torch step, fit / step, keypoints /
    heatmaps inference, per (precision, batch)."""
    out: dict[str, Any] = {"case": "summary", "tensorflow_imported": "tensorflow" in sys.modules}
    by = {(r["case"], r.get("precision"), r.get("batch")): r for r in records if "step_ms" in r}
    for (case, precision, batch), rec in list(by.items()):
        key = f"{precision}_b{batch}"
        torch_rec = by.get(("torch", precision, batch))
        if case == "step" and torch_rec:
            out[f"step_vs_torch_{key}"] = round(rec["step_ms"] / torch_rec["step_ms"], 3)
        if case == "fit" and ("step", precision, batch) in by:
            out[f"fit_vs_step_{key}"] = round(rec["step_ms"] / by["step", precision, batch]
                                              ["step_ms"], 3)  # fmt: skip
        if case == "infer_keypoints" and ("infer_heatmaps", precision, batch) in by:
            heat = by["infer_heatmaps", precision, batch]
            out[f"keypoints_vs_heatmaps_{key}"] = round(rec["step_ms"] / heat["step_ms"], 3)
    return out


if __name__ == "__main__":
    main()
