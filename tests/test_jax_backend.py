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
