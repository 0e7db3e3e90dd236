"""tf.distribute: 2 mirrored logical CPUs match one device; 2 local workers fit via TF_CONFIG.

Each case runs in a subprocess: logical devices and TF_CONFIG must be set before TF starts.
"""

from __future__ import annotations

import csv
import json
import math
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

MIRRORED = textwrap.dedent("""
    import json, sys
    import numpy as np
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    import keras
    from kpnet.recipe import load_recipe
    from kpnet.training import build_model, configure_phase, make_strategy, training_phases
    recipe = load_recipe(sys.argv[1], ["model.input_size=[64,64]", "model.pyramid_channels=16",
                                       "train.optimizer=sgd", "train.lr=0.05", "train.momentum=0",
                                       "train.weight_decay=0", "train.lr_schedule=constant",
                                       "train.warmup_epochs=0", "loss.refine=pixel"])
    from kpnet.data.synthetic import pin_spec
    spec = pin_spec(False)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (8, 64, 64, 3)).astype("float32")
    kp = np.concatenate([rng.uniform(2, 13, (8, 2, 2)), np.full((8, 2, 1), 2.0)], -1)
    targets = {n: kp.astype("float32") for n in
               ("global_p2", "global_p3", "global_p4", "global_p5", "refine")}
    out = {}
    for kind in ("one_device", "mirrored"):
        keras.utils.set_random_seed(0)
        strategy = make_strategy(kind)
        with strategy.scope():
            model = build_model(recipe, spec)
            configure_phase(model, recipe, spec, training_phases(recipe)[0], 10, set())
        before = model.evaluate(images, targets, batch_size=8, verbose=0, return_dict=True)
        model.fit(images, targets, batch_size=8, epochs=1, verbose=0, shuffle=False)
        after = model.evaluate(images, targets, batch_size=8, verbose=0, return_dict=True)
        out[kind] = [strategy.num_replicas_in_sync, before["loss"], after["loss"]]
    print("RESULT", json.dumps(out))
""")


def _run(code: str, *args: str, env: dict | None = None, timeout: int = 300):
    full_env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", **(env or {})}
    return subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=REPO,
        env=full_env, timeout=timeout,
    )  # fmt: skip


@pytest.mark.slow  # over 25 s on 2 cores
def test_mirrored_two_cpus_matches_one_device():
    proc = _run(MIRRORED, str(REPO / "recipes" / "quickstart.yaml"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT"))
    res = json.loads(line.split(" ", 1)[1])
    (n1, before1, after1), (n2, before2, after2) = res["one_device"], res["mirrored"]
    assert (n1, n2) == (1, 2)
    assert before2 == pytest.approx(before1, rel=1e-4)  # same weights, same global batch
    # One SGD step: averaged gradients give the same loss drop (summed ones would double it;
    # per-replica batch-norm statistics leave a small difference).
    drop1, drop2 = before1 - after1, before2 - after2
    assert drop1 > 0 and drop2 == pytest.approx(drop1, rel=0.25)


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("localhost", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


WORKER = textwrap.dedent("""
    import sys
    from kpnet.recipe import load_recipe
    from kpnet.training import fit
    recipe = load_recipe(sys.argv[1], sys.argv[3:])
    result = fit(recipe, sys.argv[2])
    print("DONE", result["output_dir"])
""")


def _history(path: Path) -> list[dict[str, str]]:
    with path.open() as f:
        return list(csv.DictReader(f))


@pytest.mark.slow  # about 35 s on 2 cores; flaky when the machine is loaded (heartbeats)
def test_multi_worker_fit_two_local_processes(tmp_path):
    """TF_CONFIG with 2 workers on localhost: both finish, in step, the chief writes outputs."""
    ports = _free_ports(2)
    cluster = {"worker": [f"localhost:{p}" for p in ports]}
    overrides = [
        f"data.synthetic_pins.cache_dir={tmp_path / 'pins'}", "data.synthetic_pins.num_train=16",
        "data.synthetic_pins.num_val=8", "data.synthetic_pins.image_size=[64,64]",
        "model.input_size=[64,64]", "model.pyramid_channels=16", "train.batch_size=8",
        "train.epochs=1", "train.steps_per_epoch=2", "train.verbose=0",
        "train.distribute=auto",  # TF_CONFIG selects MultiWorkerMirroredStrategy
    ]  # fmt: skip
    from kpnet.data.synthetic import ensure_synthetic_pins

    ensure_synthetic_pins(tmp_path / "pins", 16, 8, (64, 64), 0)  # generate once, not twice
    procs = []
    for index in range(2):
        tf_config = json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}})
        procs.append(subprocess.Popen(
            [sys.executable, "-c", WORKER, str(REPO / "recipes" / "quickstart.yaml"),
             str(tmp_path / "run"), *overrides],
            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={**os.environ, "TF_CONFIG": tf_config, "TF_CPP_MIN_LOG_LEVEL": "2"},
        ))  # fmt: skip
    try:
        outputs = [p.communicate(timeout=400) for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, (stdout, stderr) in zip(procs, outputs, strict=True):
        trace = [ln[:300] for ln in stderr.splitlines() if "File" in ln or "Error" in ln]
        assert p.returncode == 0, "\n".join(trace)
        assert "2 replica(s), global batch 8" in stdout and "DONE" in stdout
        assert "each worker reads its 1/2 of the training images" in stdout
    run, worker = tmp_path / "run", tmp_path / "run" / ".workers" / "worker-1"
    for name in ("last.keras", "best.keras", "history.csv", "metrics.json", "backup"):
        assert (run / name).exists(), name  # the chief (worker 0) writes the outputs
    assert list((run / "logs").rglob("events.out.tfevents.*"))
    assert not (worker / "last.keras").exists() and not (worker / "logs").exists()
    assert (worker / "backup" / "training_metadata.json").is_file()  # resumes in step
    chief_rows, worker_rows = _history(run / "history.csv"), _history(worker / "history.csv")
    assert [r["epoch"] for r in chief_rows] == ["0"]
    assert chief_rows == worker_rows  # logs are averaged over the workers: the same on both
    assert math.isfinite(float(chief_rows[0]["loss"])) and float(chief_rows[0]["val_loss"]) > 0
