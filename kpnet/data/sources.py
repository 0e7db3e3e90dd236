"""Training data of a recipe: loading each source, splitting, and the pipeline config.

``kpnet fit`` trains on :func:`load_training`'s records, validates on
:func:`load_validation`'s, and ``kpnet evaluate MODEL RECIPE`` scores the same validation
records.

Example:
    >>> from kpnet.recipe import load_recipe
    >>> spec, train, val = load_data(load_recipe("recipes/quickstart.yaml"))  # doctest: +SKIP
    >>> len(train), len(val)                                                   # doctest: +SKIP
    (512, 64)
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from kpnet import fs
from kpnet.codec import input_size_for
from kpnet.data.augment import AugmentConfig
from kpnet.data.coco import load_coco_records
from kpnet.data.dlc import default_val_fraction, load_dlc_records, split_dlc
from kpnet.data.images import probe
from kpnet.data.pipeline import PipelineConfig
from kpnet.data.records import DataError, InstanceRecord, RecordTable
from kpnet.data.synthetic import ensure_synthetic_pins, pin_spec
from kpnet.data.tfrecord import load_tfrecord_set, read_records
from kpnet.recipe import Recipe
from kpnet.spec import KeypointSpec


def pipeline_config(recipe: Recipe) -> PipelineConfig:
    """The :class:`kpnet.data.pipeline.PipelineConfig` of a recipe: its codec, its
    ``augment`` section as an :class:`AugmentConfig` (field for field) and the pixel limit."""
    section = recipe.augment.model_dump()
    try:
        augment = AugmentConfig(**{**section, "photometric": tuple(section["photometric"])})
    except (ValueError, TypeError, AttributeError) as err:
        raise recipe.error("augment", str(err)) from None
    return PipelineConfig(codec=recipe.codec(), augment=augment, max_pixels=recipe.data.max_pixels)


def load_data(
    recipe: Recipe, detections: bool = False
) -> tuple[KeypointSpec, Sequence[InstanceRecord], Sequence[InstanceRecord]]:
    """(spec, train records, validation records) of a recipe's data section.

    ``detections``: use ``data.coco.val_boxes`` (detector boxes) for the validation records.
    """
    data = recipe.data
    spec = data.keypoint_spec()
    if data.source == "coco":
        return _load_coco(data.coco, spec, data.on_error, detections)
    if data.source == "dlc":
        d = data.dlc
        dlc_spec, records = load_dlc_records(d.project, d.box, d.margin, data.on_error)
        _check_spec(recipe, spec, dlc_spec)
        fraction = d.val_fraction
        if fraction is None:  # not set: 1 - config.yaml's TrainingFraction, else 0.2
            fraction = default_val_fraction(d.project)
        try:
            train, val = split_dlc(records, fraction, d.val_frames, d.val_last, d.split_seed)
        except DataError as err:
            raise recipe.error("data.dlc", str(err)) from None
        return spec or dlc_spec, train, val
    if data.source == "tfrecord":
        return _load_tfrecord(recipe, spec)
    return _load_synthetic(data.synthetic_pins, spec, data.on_error)


def _load_coco(c, spec, on_error: str, detections: bool):
    spec, train = load_coco_records(
        c.train_annotations, c.train_images, spec=spec, on_error=on_error,
        allow_outside_root=c.allow_outside_root,
    )  # fmt: skip
    if c.val_annotations is None:
        return (spec, *split_by_image(train, c.val_fraction, c.split_seed))
    boxes = c.val_boxes if detections else None
    _, val = load_coco_records(
        c.val_annotations,
        c.val_images or c.train_images,
        spec=spec,
        boxes_file=boxes,
        score_threshold=c.score_threshold,
        on_error=on_error,
        allow_outside_root=c.allow_outside_root,
    )
    return spec, train, val


def _load_synthetic(s, spec, on_error: str):
    spec = spec or pin_spec(s.single_channel)
    paths = ensure_synthetic_pins(
        s.cache_dir,
        num_train=s.num_train,
        num_val=s.num_val,
        image_size=tuple(s.image_size),
        seed=s.seed,
        max_rotation=s.max_rotation,
    )
    _, train = load_coco_records(*paths["train"], spec=spec, on_error=on_error)
    _, val = load_coco_records(*paths["val"], spec=spec, on_error=on_error)
    return spec, train, val


def _load_tfrecord(recipe: Recipe, spec: KeypointSpec | None):
    """(spec, the training :class:`~kpnet.data.tfrecord.TFRecordSet` (streamed, nothing
    loaded), validation records (read into memory, images in a ``ram://`` folder))."""
    t = recipe.data.tfrecord
    try:
        train = load_tfrecord_set(t.train)
        val_set = load_tfrecord_set(t.val) if t.val is not None else None
    except DataError as err:
        raise recipe.error("data.tfrecord", str(err)) from None
    _check_spec(recipe, spec, train.spec)
    if val_set is not None and val_set.spec.num_keypoints != train.spec.num_keypoints:
        raise recipe.error("data.tfrecord.val", f"{t.val} holds {val_set.spec.num_keypoints} "
                           f"keypoints, the training set {train.spec.num_keypoints}")  # fmt: skip
    val = read_records(val_set) if val_set is not None else []
    return spec or train.spec, train, val


def _check_spec(recipe: Recipe, spec: KeypointSpec | None, source: KeypointSpec) -> None:
    if spec is not None and spec.num_keypoints != source.num_keypoints:
        raise recipe.error(
            "data.spec",
            f"{spec.num_keypoints} keypoints, but the data source has "
            f"{source.num_keypoints} ({', '.join(source.names)}); fix the spec or drop it",
        )


def split_by_image(
    records: Sequence[InstanceRecord], fraction: float, seed: int
) -> tuple[Sequence[InstanceRecord], Sequence[InstanceRecord]]:
    """Split records into (train, val) by image, ``fraction`` of the images to val (a
    :class:`~kpnet.data.records.RecordTable` into two tables, other sequences into lists).

    Example:
        >>> recs = [InstanceRecord(f"{i}.png", (0, 0, 9, 9), np.zeros((1, 3)), image_id=i)
        ...         for i in range(10)]
        >>> [len(part) for part in split_by_image(recs, 0.2, seed=0)]
        [8, 2]
    """
    table = isinstance(records, RecordTable)
    if table:  # records handed out may have moved to another image: read theirs
        paths = [records.image_paths[j] for j in records.image.tolist()]
        for i, r in records.given():
            paths[i] = r.image_path
    else:
        paths = [r.image_path for r in records]
    images = sorted(set(paths))
    if fraction <= 0 or len(images) < 2:
        return (records if table else list(records)), []
    rng = np.random.default_rng(seed)
    n_val = min(max(1, round(fraction * len(images))), len(images) - 1)
    val_images = set(rng.permutation(images)[:n_val].tolist())
    to_val = np.fromiter((p in val_images for p in paths), bool, len(paths))
    if table:
        return records.take(np.flatnonzero(~to_val)), records.take(np.flatnonzero(to_val))
    train = [r for r, v in zip(records, to_val, strict=True) if not v]
    val = [r for r, v in zip(records, to_val, strict=True) if v]
    return train, val


def load_training(recipe: Recipe):
    """(spec, training records, pipeline config) of a recipe."""
    spec, train, _ = load_data(recipe)
    return spec, train, pipeline_config(resolve_input_size(recipe, train))


def load_validation(recipe: Recipe, detections: bool = False):
    """(spec, validation records, pipeline config); used by ``kpnet evaluate MODEL RECIPE``."""
    spec, train, val = load_data(recipe, detections)
    return spec, val, pipeline_config(resolve_input_size(recipe, train if len(train) else val))


#: How many frames, evenly spaced over a set, ``model.input_size: auto`` reads the size of.
AUTO_SIZE_FRAMES = 200


def resolve_input_size(recipe: Recipe, records: Sequence[InstanceRecord]) -> Recipe:
    """``recipe`` with ``model.input_size: auto`` set to the frames' median aspect (W / H) at
    about ``model.input_pixels`` pixels (:func:`kpnet.codec.input_size_for`), read from the
    headers of up to :data:`AUTO_SIZE_FRAMES` frames of ``records``; other recipes as they are.
    """
    if recipe.model.input_size != "auto":
        return recipe
    picks = np.unique(np.linspace(0, len(records) - 1, min(len(records), AUTO_SIZE_FRAMES)))
    sizes = [hw for hw in (_frame_hw(records[int(i)]) for i in picks) if hw is not None]
    if not sizes:
        raise recipe.error("model.input_size", "auto reads the training frames' sizes, and no "
                           "frame could be read: set [H, W] instead")  # fmt: skip
    aspect = float(np.median([w / h for h, w in sizes]))
    return recipe.with_input_size(input_size_for((1.0, aspect), recipe.model.input_pixels))


def _frame_hw(record: InstanceRecord) -> tuple[int, int] | None:
    """(H, W) of a record's image, from the record or the file's header; None if unreadable."""
    if record.image_size and min(record.image_size) > 0:
        return tuple(record.image_size)
    try:
        return probe(record.image_path).hw
    except DataError:
        return None


# --------------------------------------------------------------------------- a path
def load_source(
    source: str | os.PathLike,
    images: str | os.PathLike | None = None,
    on_error: str = "raise",
    allow_outside_root: bool = False,
) -> tuple[KeypointSpec, Sequence[InstanceRecord]]:
    """The records of a path, as ``kpnet data`` reads it: a COCO json (images from
    ``images``, else :func:`guess_image_dir`), a DeepLabCut project folder or a DLC /
    lightning-pose label CSV; local or a URL (``gs://``, ``ram://``).

    ``allow_outside_root``: a COCO ``file_name`` may leave the image folder.
    """
    path = fs.as_path(source)
    if fs.isfile(fs.join(path, "index.json")):
        raise DataError(
            f"{path}: is a TFRecord set (kpnet data convert --to tfrecord); give the source "
            "it was converted from, or train from it with data.source: tfrecord"
        )
    suffix = os.path.splitext(fs.basename(path))[1].lower()
    if fs.isdir(path) or suffix == ".csv":
        return load_dlc_records(path, on_error=on_error)
    if suffix != ".json":
        raise DataError(
            f"{path}: expected a COCO .json file, a DeepLabCut project folder or a label .csv"
        )
    if not fs.exists(path):
        raise DataError(f"{path}: file not found")
    image_dir = fs.as_path(images) if images else guess_image_dir(path)
    if not fs.isdir(image_dir):
        raise DataError(f"{image_dir}: no such image folder (--images)")
    return load_coco_records(
        path, image_dir, on_error=on_error, allow_outside_root=allow_outside_root
    )


def guess_image_dir(annotation_file: str | os.PathLike) -> str | os.PathLike:
    """``<json dir>/../<split>2017`` (COCO layout) or ``<split>``, split from the file name.

    >>> try:
    ...     guess_image_dir("nowhere/person_keypoints_val2017.json")
    ... except DataError as err:
    ...     print(str(err).split(": ", 1)[1])
    cannot guess the image folder (val2017/ or val/); pass --images DIR
    """
    name = os.path.splitext(fs.basename(annotation_file))[0].lower()
    splits = [s for s in ("train", "val", "test") if s in name]
    folders = [fs.parent(fs.parent(annotation_file)), fs.parent(annotation_file)]
    for split in splits:
        for folder in folders:
            for candidate in (fs.child(folder, f"{split}2017"), fs.child(folder, split)):
                if fs.isdir(candidate):
                    return candidate
    looked = ", ".join(f"{s}2017/ or {s}/" for s in splits) or "no train/val/test in the name"
    raise DataError(
        f"{annotation_file}: cannot guess the image folder ({looked}); pass --images DIR"
    )
