"""Training: ``fit(recipe, output_dir)`` and the parts it is made of, one concept per module.

========================  ==================================================================
:mod:`.loop`              ``fit``: datasets, phases, callbacks, resume, NaN stop
:mod:`.phases`            model build, freezing, optimizer and compile per phase
:mod:`.distribute`        tf.distribute strategies (JAX data parallelism under JAX)
:mod:`.callbacks`         backup, guarded checkpoints, NaN guard, validation metrics
:mod:`.precise_bn`        precise BatchNorm statistics
:mod:`.schedules`         the learning-rate schedule
:mod:`.validation`        the keypoints model validated as ``kpnet predict`` runs it
:mod:`.report`            console lines, errors, ``history.csv``, ``curves.png``
:mod:`.finalize`          finite checks, ``metrics.json``, ``keypoints.keras``, SavedModel
========================  ==================================================================

The run folder's files belong to :mod:`kpnet.run_folder`.

Example:
    >>> from kpnet.training import fit, TrainingError
    >>> issubclass(TrainingError, RuntimeError)
    True
"""

import importlib as _importlib

#: Loaded on first use, so ``kpnet.training.phases`` or ``.precise_bn`` import without
#: TensorFlow (a JAX-only process trains a step with them).
_LAZY = {
    "LOCKED_KEYS": "kpnet.run_folder",
    "RunFolder": "kpnet.run_folder",
    "RunFolderError": "kpnet.run_folder",
    "JaxDataParallel": "kpnet.training.distribute",
    "MultiWorkerStrategy": "kpnet.training.distribute",
    "make_strategy": "kpnet.training.distribute",
    "nonfinite_weights": "kpnet.training.finalize",
    "fit": "kpnet.training.loop",
    "check_run_folder": "kpnet.training.loop",
    "Phase": "kpnet.training.phases",
    "backbone_layer_names": "kpnet.training.phases",
    "build_model": "kpnet.training.phases",
    "configure_main_phase": "kpnet.training.phases",
    "configure_phase": "kpnet.training.phases",
    "output_names": "kpnet.training.phases",
    "training_phases": "kpnet.training.phases",
    "TrainingError": "kpnet.training.report",
    "EpochSchedule": "kpnet.training.schedules",
}


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(_importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'kpnet.training' has no attribute {name!r}")


__all__ = [
    "LOCKED_KEYS",
    "EpochSchedule",
    "JaxDataParallel",
    "MultiWorkerStrategy",
    "Phase",
    "RunFolder",
    "RunFolderError",
    "TrainingError",
    "backbone_layer_names",
    "build_model",
    "check_run_folder",
    "configure_main_phase",
    "configure_phase",
    "fit",
    "make_strategy",
    "nonfinite_weights",
    "output_names",
    "training_phases",
]
