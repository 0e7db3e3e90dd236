"""The CPN and its losses build and train under KERAS_BACKEND=jax (in a subprocess)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

SCRIPT = textwrap.dedent(
    """
    import json
    import keras
    import numpy as np
    from kpnet.codec import OUTPUT_NAMES
    from kpnet.losses import build_losses
    from kpnet.models import build_cpn
    from kpnet.spec import KeypointSpec

    spec = KeypointSpec(names=("a", "b", "c"), channel_map=(0, 0, 1))
    model = build_cpn(spec.num_channels, (64, 64, 3), backbone="tiny", pyramid_channels=16)
    results = {"backend": keras.backend.backend()}
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (2, 64, 64, 3)).astype("uint8")
    keypoints = np.concatenate(
        [rng.uniform(0, 15, (2, 3, 2)), np.full((2, 3, 1), 2.0)], -1).astype("float32")
    y = {name: keypoints for name in OUTPUT_NAMES}
    losses, weights = build_losses(spec)
    model.compile(keras.optimizers.Adam(1e-3), loss=losses, loss_weights=weights)
    before = [np.array(v) for v in model.trainable_weights]
    logs = model.train_on_batch(images, y, return_dict=True)
    changed = [not np.allclose(a, np.array(v)) for a, v in zip(before, model.trainable_weights)]
    results["train"] = {"loss": float(logs["loss"]), "changed": float(np.mean(changed))}

    # The pixel loss on its own (a second whole-step compile would double the run time).
    import jax
    pixel, _ = build_losses(spec, refine_loss="pixel")
    heatmaps = rng.normal(size=(2, 16, 16, 2)).astype("float32")
    value, grad = jax.value_and_grad(lambda h: pixel["refine"](keypoints, h))(heatmaps)
    results["pixel"] = {"loss": float(value), "grad_finite": bool(np.isfinite(grad).all()),
                        "grad_abs": float(np.abs(grad).sum())}
    print("RESULT" + json.dumps(results))
    """
)


@pytest.mark.skipif(
    importlib.util.find_spec("jax") is None, reason="optional dependency not installed: jax"
)
def test_tiny_cpn_trains_one_step_under_jax():
    # Cheap XLA compilation: the whole-step compile drops from ~40 s to ~10 s on 2 cores.
    flags = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
    env = {
        **os.environ,
        "KERAS_BACKEND": "jax",
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} {flags}".strip(),
    }
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT"))
    results = json.loads(line[len("RESULT") :])
    assert results["backend"] == "jax"
    train, pixel = results["train"], results["pixel"]
    assert np.isfinite(train["loss"]) and train["loss"] > 0, results
    assert train["changed"] > 0.9, f"only {train['changed']:.0%} of the weights were updated"
    assert np.isfinite(pixel["loss"]) and pixel["loss"] > 0, results
    assert pixel["grad_finite"] and pixel["grad_abs"] > 0, results


REPO = __import__("pathlib").Path(__file__).resolve().parents[1]
requires_jax = pytest.mark.skipif(
    importlib.util.find_spec("jax") is None, reason="optional dependency not installed: jax"
)
CHEAP_XLA = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


def _jax_env(devices: int = 1) -> dict[str, str]:
    flags = f"{CHEAP_XLA} --xla_force_host_platform_device_count={devices}"
    return {**os.environ, "KERAS_BACKEND": "jax", "JAX_PLATFORMS": "cpu",
            "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} {flags}".strip(),
            "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}


def _jax_fit(out, cache, *overrides: str, devices: int = 1) -> subprocess.CompletedProcess:
    tiny = [
        f"data.synthetic_pins.cache_dir={cache}", "data.synthetic_pins.num_train=24",
        "data.synthetic_pins.num_val=8", "data.synthetic_pins.image_size=[64,64]",
        "model.input_size=[64,64]", "model.pyramid_channels=16", "train.batch_size=8",
        "train.steps_per_epoch=2", "train.verbose=0", "evaluation.flip_test=false",
        "train.lr_schedule=constant", "train.warmup_epochs=0", "train.precise_bn_batches=2",
        *overrides,
    ]  # fmt: skip
    args = [f"--set={item}" for item in tiny]
    return subprocess.run(
        [sys.executable, "-m", "kpnet.cli", "fit", str(REPO / "recipes" / "quickstart.yaml"),
         "-o", str(out), *args], env=_jax_env(devices), capture_output=True, text=True,
        timeout=600, cwd=REPO,
    )  # fmt: skip


@requires_jax
@pytest.mark.slow  # a JAX fit on two devices + export: ~1-2 min on 2 cores (fast suite budget)
def test_kpnet_fit_under_jax_on_two_devices_exports_a_saved_model(tmp_path):
    """`kpnet fit` under JAX: DataParallel over 2 host devices, precise BN, the run folder,
    and a SavedModel (exported by TensorFlow) that gives the keypoints of `kpnet.load_model`."""
    import tensorflow as tf

    import kpnet
    from kpnet.runner import Predictor

    out = tmp_path / "run"
    proc = _jax_fit(out, tmp_path / "pins", "train.epochs=1", "export.saved_model=true",
                    devices=2)  # fmt: skip
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert "2 replica(s)" in proc.stdout, proc.stdout
    for name in ("best.keras", "last.keras", "keypoints.keras", "metrics.json", "history.csv",
                 "backup/latest.weights.h5", "saved_model/saved_model.pb"):  # fmt: skip
        assert (out / name).is_file(), name
    assert json.loads((out / "metrics.json").read_text())["overall"]["count"] == 16

    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (64, 64, 3)).astype("uint8")
    xy, scores = Predictor(kpnet.load_model(out / "keypoints.keras")).predict(image)
    served = tf.saved_model.load(str(out / "saved_model")).signatures["serving_default"](
        images=tf.constant(image[None]), boxes=tf.zeros((1, 4)))
    np.testing.assert_allclose(served["keypoints"].numpy(), xy, atol=0.05)
    np.testing.assert_allclose(served["scores"].numpy(), scores, atol=1e-4)


@requires_jax
@pytest.mark.slow  # two JAX fits, about 2 minutes on 2 cores
def test_kpnet_fit_under_jax_resumes_in_mixed_precision(tmp_path):
    out = tmp_path / "run"
    first = _jax_fit(out, tmp_path / "pins", "train.epochs=1", "export.keypoints_model=false")
    assert first.returncode == 0, (first.stdout + first.stderr)[-3000:]
    again = _jax_fit(out, tmp_path / "pins", "train.epochs=2", "train.precision=mixed_bfloat16")
    assert again.returncode == 0, (again.stdout + again.stderr)[-3000:]
    assert "resuming" in again.stdout and "after epoch 1" in again.stdout
    rows = (out / "history.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == ["0", "1"]
    meta = json.loads((out / "backup" / "training_metadata.json").read_text())
    assert meta["epoch"] == 2 and (out / "keypoints.keras").is_file()


BENCH_STEP = textwrap.dedent(
    """
    import json, sys
    sys.path.insert(0, "benchmarks")
    import train_speed
    records = train_speed.main(["--backbone", "tiny", "--input-size", "64", "64",
                                "--pyramid-channels", "16", "--keypoints", "3",
                                "--cases", "step", "infer", "--steps", "1"])
    print("RESULT" + json.dumps({"records": records, "tf": "tensorflow" in sys.modules}))
    """
)


@pytest.mark.slow  # over 25 s on 2 cores
@requires_jax
def test_train_speed_step_runs_without_tensorflow():
    """The benchmark's step and inference cases import no TensorFlow under JAX."""
    proc = subprocess.run([sys.executable, "-c", BENCH_STEP], env=_jax_env(), cwd=REPO,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT"))
    result = json.loads(line[len("RESULT") :])
    assert result["tf"] is False
    cases = {r["case"]: r for r in result["records"]}
    assert cases["step"]["backend"] == "jax" and cases["step"]["img_s"] > 0
    assert cases["infer_keypoints"]["img_s"] > 0
    assert cases["summary"]["tensorflow_imported"] is False
