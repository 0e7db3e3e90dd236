"""A training run's folder: the one owner of its file names, its compatibility check and its model.

``kpnet fit`` writes into it, ``kpnet predict`` / ``evaluate`` / ``export`` and
:func:`kpnet.load_model` read from it; all of them name its files through :class:`RunFolder`
(local path or URL)::

    recipe.resolved.yaml  spec.json  codec.json   settings, written before training starts
    backup/               weights + optimizer state (resume)
    last.keras  best.keras  keypoints.keras       models (keypoints.keras decodes in-graph)
    history.csv  logs/  curves.png  metrics.json  saved_model/

Example:
    >>> run = RunFolder("runs/pins")
    >>> run.file("best.keras")
    'runs/pins/best.keras'
    >>> RunFolder.of("runs/pins/best.keras").path
    'runs/pins'
    >>> is_locked("model.backbone"), is_locked("train.lr"), is_locked("data.on_error")
    (True, False, False)
"""

from __future__ import annotations

import json
import os
import zipfile
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from kpnet import fs
from kpnet.codec import Codec
from kpnet.spec import KeypointSpec, SpecError


class RunFolderError(RuntimeError):
    """The folder holds a run that cannot be resumed or read (another model or data, a bad file)."""


class ModelFileError(RunFolderError, ValueError):
    """A model file that cannot be loaded (empty, cut short, not a Keras archive); one line
    naming it. A ValueError too, as the commands that load models report those."""


#: Recipe keys that define the model, its data or its codec (a dotted prefix covers every key
#: under it): a run folder resumes only with the same values. Every other key may change on
#: resume (see ``kpnet fit --help``).
LOCKED_KEYS: tuple[str, ...] = (
    "data", "model", "loss.global_sigmas", "loss.refine_sigma", "evaluation.decode",
    "evaluation.flip_test", "evaluation.max_peaks", "evaluation.threshold",
    "evaluation.min_distance", "train.batch_size", "train.steps_per_epoch",
    "train.freeze_trunk_stride",  # which weights train: the optimizer state's own layout
)  # fmt: skip
_FREE_KEYS = ("data.on_error",)  # under a locked prefix, yet free to change
#: Model files of a run folder, in order of preference.
MODEL_FILES: tuple[str, ...] = ("keypoints.keras", "best.keras", "last.keras")
#: Files whose presence means the folder holds a trained run, not only a failed start.
TRAINED_FILES = ("backup/training_metadata.json", "last.keras", "best.keras",
                 "keypoints.keras", "metrics.json")  # fmt: skip
RECIPE, SPEC, CODEC = "recipe.resolved.yaml", "spec.json", "codec.json"


def is_locked(key: str) -> bool:
    """Whether a dotted recipe key must keep its value for a run to resume (:data:`LOCKED_KEYS`)."""

    def under(prefixes: Sequence[str]) -> bool:
        return any(key == p or key.startswith(p + ".") for p in prefixes)

    return under(LOCKED_KEYS) and not under(_FREE_KEYS)


class RunFolder:
    """The folder of one training run (a local path or a URL such as ``gs://bucket/run``)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = os.fspath(fs.as_path(path))  # a URL as given, a local path normalised

    @classmethod
    def of(cls, model_or_folder: str | os.PathLike) -> RunFolder:
        """The run folder holding a model file, or the folder itself."""
        path = fs.as_path(model_or_folder)
        return cls(path if fs.isdir(path) else fs.parent(path))

    def __repr__(self) -> str:
        return f"RunFolder({self.path!r})"

    def file(self, name: str) -> str:
        """The path (or URL) of ``name`` inside the folder."""
        return fs.join(self.path, name)

    @property
    def backup(self) -> str:
        return self.file("backup")

    def holds_trained_run(self) -> bool:
        """True once a run trained here (a backup, a model or metrics), not after a failed start."""
        return any(fs.exists(self.file(name)) for name in TRAINED_FILES)

    # ------------------------------------------------------------------ models
    def model(self) -> str:
        """The run's model: ``keypoints.keras``, else ``best.keras``, else ``last.keras``."""
        for name in MODEL_FILES:
            if fs.isfile(self.file(name)):
                return self.file(name)
        raise FileNotFoundError(f"{self.path}: a run folder needs one of {', '.join(MODEL_FILES)}")

    def best_model(self) -> str | None:
        """``best.keras`` (lowest validation error), else ``last.keras``; None before any epoch."""
        for name in ("best.keras", "last.keras"):
            if fs.exists(self.file(name)):
                return self.file(name)
        return None

    # ------------------------------------------------------------------ settings
    def read(self, name: str) -> dict[str, Any] | None:
        """The parsed ``name`` (YAML or JSON), None when absent; RunFolderError if unreadable."""
        path = self.file(name)
        if not fs.isfile(path):
            return None
        try:
            data = yaml.safe_load(fs.read_text(path))  # JSON is YAML
            if not isinstance(data, dict):
                raise ValueError("not a mapping")
            return data
        except (*fs.io_errors(), UnicodeDecodeError, ValueError, yaml.YAMLError) as err:
            raise RunFolderError(
                f"{path} cannot be read ({fs.reason(err)}), so {self.path} cannot be resumed: "
                f"use a new output folder (-o) or delete {self.path} to start over"
            ) from None

    def recipe_file(self) -> str | None:
        """``recipe.resolved.yaml`` when the folder has one."""
        return self.file(RECIPE) if fs.isfile(self.file(RECIPE)) else None

    def saved_spec(self) -> KeypointSpec | None:
        """The :class:`KeypointSpec` in ``spec.json``, None when absent; SpecError if bad."""
        data = self._json(SPEC)
        try:
            return None if data is None else KeypointSpec.from_dict(data)
        except SpecError as err:
            raise SpecError(f"{self.file(SPEC)}: {err}") from None

    def saved_codec(self) -> Codec | None:
        """The :class:`Codec` in ``codec.json`` (written by fit), None when absent."""
        data = self._json(CODEC)
        try:
            return None if data is None else Codec.from_dict(data)
        except (TypeError, ValueError) as err:
            raise SpecError(f"{self.file(CODEC)}: not a kpnet codec ({err})") from None

    def _json(self, name: str) -> Any:
        if not fs.isfile(self.file(name)):
            return None
        try:
            return json.loads(fs.read_text(self.file(name)))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise SpecError(f"{self.file(name)}: not JSON ({err}); re-run kpnet fit") from None

    def write_settings(self, recipe_yaml: str, spec: dict, codec: dict) -> None:
        """``recipe.resolved.yaml``, ``spec.json`` and ``codec.json``, each written atomically;
        a file that already holds the same text is left alone (a resume rewrites nothing it
        does not change)."""
        fs.makedirs(self.path)
        for name, text in ((RECIPE, recipe_yaml), (SPEC, json.dumps(spec, indent=2)),
                           (CODEC, json.dumps(codec, indent=2))):  # fmt: skip
            if not self._holds(name, text):
                fs.write_atomic(self.file(name), text)

    def _holds(self, name: str, text: str) -> bool:
        path = self.file(name)
        try:
            return fs.isfile(path) and fs.read_bytes(path) == text.encode("utf-8")
        except fs.io_errors():
            return False

    def check_settings(
        self, settings: dict[str, Any], resolved_later: Sequence[str] = ()
    ) -> list[tuple[str, Any, Any]]:
        """Refuse (RunFolderError, one line) a run whose locked recipe keys differ.

        ``settings`` is the resolved recipe as JSON-like data. Returns the keys free to
        change that did, as ``(key, old, new)``; a folder without a trained run passes.
        ``resolved_later``: keys not compared here (``auto`` values, checked once resolved).
        """
        if not self.holds_trained_run():
            return []
        old = self.read(RECIPE)
        diffs = differences(old, _as_json(settings)) if old is not None else []
        diffs = [d for d in diffs if d[0] not in resolved_later]
        self._refuse([d for d in diffs if is_locked(d[0])])
        return [d for d in diffs if not is_locked(d[0])]

    def check_data(self, spec: dict, codec: dict) -> None:
        """Refuse (RunFolderError) a run whose ``spec.json`` / ``codec.json`` differ."""
        if not self.holds_trained_run():
            return
        found = []
        for name, new in ((SPEC, spec), (CODEC, codec)):
            old = self.read(name)
            if old is not None:
                found += [(f"{name}: {k}", o, n) for k, o, n in differences(old, _as_json(new))]
        self._refuse(found)

    def _refuse(self, found: list[tuple[str, Any, Any]]) -> None:
        if not found:
            return
        key, old, new = found[0]
        more = f" (and {len(found) - 1} more: {', '.join(d[0] for d in found[1:4])})"
        raise RunFolderError(
            f"{self.path} holds a run with other settings: {key} is {short(old)} there but "
            f"{short(new)} now{more if len(found) > 1 else ''}; a run resumes only with the "
            "same model, data, codec and batch size: use a new output folder (-o) or delete "
            f"{self.path} to start over"
        )


def differences(old: Any, new: Any, key: str = "") -> list[tuple[str, Any, Any]]:
    """(dotted key, old value, new value) of the leaves that differ; keys that only one side
    has are skipped (a key added to or removed from the recipe schema is not a setting).

    >>> differences({"a": {"b": 1, "c": 2}}, {"a": {"b": 1, "c": 3}, "d": 0})
    [('a.c', 2, 3)]
    """
    if isinstance(old, dict) and isinstance(new, dict):
        found = []
        for name in old:
            if name in new:
                found += differences(old[name], new[name], f"{key}.{name}" if key else name)
        return found
    return [] if old == new else [(key, old, new)]


def short(value: Any, width: int = 60) -> str:
    """``value`` as JSON, cut to ``width`` characters."""
    text = json.dumps(value)
    return text if len(text) <= width else text[: width - 3] + "..."


def _as_json(value: Any) -> Any:
    return json.loads(json.dumps(value))


#: What a ``.keras`` archive must hold to be loaded.
KERAS_MEMBERS = ("config.json", "model.weights.h5")
_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


def check_model_file(path: str | os.PathLike, name: str | os.PathLike | None = None) -> None:
    """ModelFileError (one line naming the file, what is wrong and what to do) unless
    ``path`` is a whole ``.keras`` archive: a zip holding a JSON ``config.json`` and an HDF5
    ``model.weights.h5``. Reads the zip's directory, the config and 8 bytes of the weights.

    ``name``: how messages call the file (the original URL of a local copy).
    """
    with fs.local_copy(path) as local:
        problem = _archive_problem(local)
    if problem is not None:
        shown = os.fspath(name if name is not None else path)
        raise ModelFileError(f"{shown}: {problem}; {model_file_advice(shown)}")


def model_file_advice(path: str) -> str:
    """What to do about a model file that cannot be loaded."""
    if fs.basename(path) == "keypoints.keras":
        folder = fs.dirname(path) or "."
        return (f"delete it to use {folder}'s best.keras, or re-run kpnet fit -o {folder} "
                "to write it again")  # fmt: skip
    return "replace it with a complete copy (a .keras model is a zip archive written by Keras)"


def _archive_problem(local: str) -> str | None:
    """What keeps the local file ``local`` from being a Keras archive, or None."""
    if os.path.getsize(local) == 0:
        return "the file is empty (0 bytes)"
    try:
        with zipfile.ZipFile(local) as archive:
            names = set(archive.namelist())
            missing = [m for m in KERAS_MEMBERS if m not in names]
            if missing:
                return f"not a Keras model archive (no {missing[0]} inside)"
            try:
                json.loads(archive.read("config.json"))
            except (UnicodeDecodeError, json.JSONDecodeError) as err:
                return f"its config.json is not valid JSON ({err})"
            with archive.open("model.weights.h5") as weights:
                if weights.read(len(_HDF5_SIGNATURE)) != _HDF5_SIGNATURE:
                    return "its model.weights.h5 is not an HDF5 file"
    except (zipfile.BadZipFile, EOFError, zlib.error, NotImplementedError) as err:
        return f"not a whole .keras archive: cut short, damaged or another kind of file ({err})"
    return None


def model_path(path: str | Path) -> str | Path:
    """A ``.keras`` file as is; a run folder -> its model (:data:`MODEL_FILES` order).

    A local path comes back as a ``Path``, a URL as a string."""
    path = fs.as_path(path)
    if fs.isdir(path):
        return fs.as_path(RunFolder(path).model())
    if not fs.isfile(path):
        raise FileNotFoundError(f"no model file at {path}")
    if not fs.basename(path).endswith(".keras"):
        raise FileNotFoundError(f"{path}: a model must be a .keras file or a run folder")
    return path
