"""Training recipes: one validated YAML file describes data, model, loss and schedule.

Example:
    >>> import tempfile, pathlib
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "r.yaml"
    >>> _ = path.write_text("data: {source: synthetic_pins, synthetic_pins: {cache_dir: c}}")
    >>> recipe = load_recipe(path, ["train.epochs=3", "model.backbone=tiny"])
    >>> recipe.train.epochs, recipe.model.backbone, recipe.data.synthetic_pins.cache_dir.name
    (3, 'tiny', 'c')
    >>> try:
    ...     load_recipe(path, ["train.epcohs=3"])
    ... except RecipeError as err:
    ...     print(str(err).split(": ", 1)[1])
    train.epcohs: unknown key (did you mean 'epochs'?)

Every section forbids unknown keys, numbers must be finite (no ``.inf`` / ``.nan``) and a
boolean is not a number (``epochs: true`` is refused). Relative paths are resolved against the
recipe file's folder (paths given with ``--set`` against the working directory), and string
values may use ``${VAR}`` / ``${VAR:-default}`` environment expansion (e.g.
``${KPNET_COCO:-datasets/coco}``).
"""

from __future__ import annotations

import difflib
import math
import os
import re
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    StringConstraints,
    ValidationError,
    field_validator,
    model_validator,
)

from kpnet import fs
from kpnet.codec import (
    DEFAULT_GLOBAL_SIGMAS,
    DEFAULT_PADDING,
    DEFAULT_REFINE_SIGMA,
    DEFAULT_TRAIN_BOX_EXTEND,
    DEFAULT_WHOLE_FRACTION,
    Codec,
)
from kpnet.data.images import MAX_PIXELS
from kpnet.models.backbones import BACKBONES, IMAGENET_BACKBONES, MOBILENET_ALPHAS
from kpnet.models.heads import HEADS, check_head
from kpnet.spec import KeypointSpec, SpecError

#: The codec's defaults are the recipe's (input size, decoding): defined once, in Codec.
_CODEC = Codec()


class RecipeError(ValueError):
    """A recipe is invalid; the message names the file and the key path."""


class _Strict(BaseModel):
    # allow_inf_nan=False: `lr: .inf` trains to NaN weights; refuse it at load instead.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_or_non_finite(cls, value: Any, info: Any) -> Any:
        """Refuse booleans where numbers are expected (``epochs: true``) and inf / NaN anywhere.

        pydantic would take ``true`` as 1; YAML's ``.inf`` / ``.nan`` are floats too.
        """
        problem = _bad_value(cls.model_fields[info.field_name].annotation, value)
        if problem:
            raise ValueError(problem)
        return value


def _admits_bool(annotation: Any) -> bool:
    if annotation is bool or annotation is Any:
        return True
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Literal:
        return any(isinstance(a, bool) for a in args)
    if origin in (typing.Union, types.UnionType, typing.Annotated):
        return any(_admits_bool(a) for a in args)
    return False


def _bad_value(annotation: Any, value: Any) -> str | None:
    """Why ``value`` is refused for ``annotation`` (a bool for a number, inf / NaN), or None."""
    if isinstance(value, bool):
        return None if _admits_bool(annotation) else "expected a number, not a boolean"
    if isinstance(value, float):
        return None if math.isfinite(value) else "must be a finite number"
    if isinstance(value, dict):
        if _model_in(annotation) is not None:
            return None  # a section: its own fields check their values
        items = [(f"key {k!r}", Any, v) for k, v in value.items()]
    elif isinstance(value, (list, tuple)):
        items = [(f"item {i}", _item_annotation(annotation, i), v) for i, v in enumerate(value)]
    else:
        return None
    for where, item_annotation, item in items:
        problem = _bad_value(item_annotation, item)
        if problem:
            return f"{where}: {problem}"
    return None


def _item_annotation(annotation: Any, index: int) -> Any:
    """The annotation of item ``index`` of a list / tuple annotation (Any when unknown)."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        sequences = [a for a in args if typing.get_origin(a) in (list, tuple)]
        return _item_annotation(sequences[0], index) if sequences else Any
    if origin is list and args:
        return args[0]
    if origin is tuple and args:
        return args[0] if args[-1] is Ellipsis else args[min(index, len(args) - 1)]
    return Any


# --------------------------------------------------------------------------- data
#: A path that stays a string when it is a URL (``gs://bucket/x``; ``Path`` would drop a slash).
URL = Annotated[str, StringConstraints(pattern=r"^[A-Za-z][A-Za-z0-9+.-]*://")]


class CocoSource(_Strict):
    """COCO-format keypoint json files and their image folders (local paths or URLs)."""

    train_annotations: URL | Path
    train_images: URL | Path
    val_annotations: URL | Path | None = None
    val_images: URL | Path | None = None
    val_boxes: URL | Path | None = None  # detections json for evaluation (default: GT boxes)
    val_fraction: float = Field(0.1, ge=0.0, lt=1.0)  # split off train when no val json
    split_seed: int = 0
    score_threshold: float = Field(0.0, ge=0.0, le=1.0)
    # true: read images whose file_name leaves the image folder (../x.jpg, /abs/x.jpg)
    allow_outside_root: bool = False


class DlcSource(_Strict):
    """A DeepLabCut project folder or a label CSV, split into train / val by image."""

    project: URL | Path  # DLC project folder (config.yaml) or a label .csv (lightning-pose style)
    val_fraction: float | None = Field(None, ge=0.0, lt=1.0)  # null: 1 - TrainingFraction, or 0.2
    val_frames: list[str] = []  # hold out these frames (path ends or globs: video1/img0*.png)
    val_last: int = Field(0, ge=0)  # hold out the last N frames of each video folder (file order)
    split_seed: int = 0  # seed of the random val_fraction split
    box: Literal["keypoints", "image"] = "keypoints"
    margin: float = Field(0.2, ge=0.0)

    @model_validator(mode="after")
    def _check_split(self) -> DlcSource:
        if self.val_fraction is not None and (self.val_frames or self.val_last):
            raise ValueError(
                "val_fraction and val_frames / val_last both set; the named or last frames are "
                "the validation set, so drop val_fraction (or set it to null)"
            )
        return self


class SyntheticSource(_Strict):
    """Rendered two-pin images, generated once into ``cache_dir``."""

    cache_dir: Path
    num_train: int = Field(512, ge=1)
    num_val: int = Field(64, ge=1)
    image_size: tuple[int, int] = (128, 128)
    seed: int = 0
    max_rotation: float = Field(45.0, ge=0.0)
    single_channel: bool = False


class TFRecordSource(_Strict):
    """Sharded TFRecord sets written by ``kpnet data convert SOURCE --to tfrecord -o DIR``.

    Paths may be URLs (``gs://bucket/train``): they stay strings.
    """

    train: str  # folder holding index.json and the shards of the training set
    val: str | None = None  # a converted validation set (read once into memory), or null


class DataSection(_Strict):
    source: Literal["coco", "dlc", "synthetic_pins", "tfrecord"]
    coco: CocoSource | None = None
    dlc: DlcSource | None = None
    synthetic_pins: SyntheticSource | None = None
    tfrecord: TFRecordSource | None = None
    spec: Literal["coco17"] | dict[str, Any] | None = None  # None: derived from the source
    mode: Literal["topdown", "whole", "random_crop", "two_stage"] = "topdown"
    padding: tuple[float, float] = DEFAULT_PADDING
    train_box_extend: float = Field(DEFAULT_TRAIN_BOX_EXTEND, gt=0.0)
    whole_fraction: float = Field(DEFAULT_WHOLE_FRACTION, ge=0.0, le=1.0)
    on_error: Literal["raise", "skip"] = "raise"
    # images whose header declares more pixels are bad files (refused, or skipped by on_error)
    max_pixels: int = Field(MAX_PIXELS, gt=0)

    @field_validator("spec")
    @classmethod
    def _check_spec(cls, spec: Any) -> Any:
        if isinstance(spec, dict):
            try:
                KeypointSpec.from_dict(spec)
            except SpecError as err:
                raise ValueError(str(err)) from None
        return spec

    @model_validator(mode="after")
    def _check(self) -> DataSection:
        if getattr(self, self.source) is None:
            raise ValueError(f"section '{self.source}' is required when source is {self.source!r}")
        return self

    def keypoint_spec(self) -> KeypointSpec | None:
        """The recipe's spec, or None when the data source defines it."""
        if self.spec is None:
            return None
        if self.spec == "coco17":
            return KeypointSpec.coco17()
        return KeypointSpec.from_dict(self.spec)


# --------------------------------------------------------------------------- model / loss
class ModelSection(_Strict):
    backbone: Literal[BACKBONES] = "resnet50"  # type: ignore[valid-type]
    head: Literal[HEADS] = "cpn"  # type: ignore[valid-type]  # hrnet: backbone hrnet_w32 only
    alpha: float = Field(1.0, gt=0.0)  # MobileNetV2 width multiplier (1.0 for other trunks)
    backbone_weights: str | None = None  # null | imagenet | path to a weights file
    # [H, W], or auto: whole frames' own aspect at about input_pixels pixels (kpnet fit reads
    # the training frames' sizes and saves the [H, W] it picks in the run folder)
    input_size: tuple[int, int] | Literal["auto"] = _CODEC.input_size
    input_pixels: int = Field(_CODEC.input_size[0] * _CODEC.input_size[1], ge=32 * 32)
    pyramid_channels: int = Field(256, ge=1)  # head width: CPN pyramid / SimpleBaseline deconvs
    init_from: URL | Path | None = None
    bn_momentum: float = Field(0.9, gt=0.0, lt=1.0)  # BatchNorm moving-average momentum

    @model_validator(mode="after")
    def _check(self) -> ModelSection:
        if self.input_size == "auto":
            return self
        if any(s <= 0 for s in self.input_size):
            raise ValueError(f"input_size {list(self.input_size)}: H and W must be positive "
                             "multiples of 32 (e.g. [256, 192])")  # fmt: skip
        if any(s % 32 for s in self.input_size):
            raise ValueError(f"input_size {list(self.input_size)}: H and W must divide by 32")
        return self

    @field_validator("head")
    @classmethod
    def _check_head(cls, head: str, info: Any) -> str:
        if "backbone" in info.data:
            check_head(head, info.data["backbone"])
        return head

    @field_validator("alpha")
    @classmethod
    def _check_alpha(cls, alpha: float, info: Any) -> float:
        if alpha != 1.0 and info.data.get("backbone", "mobilenetv2") != "mobilenetv2":
            raise ValueError(
                f"{alpha}: backbone {info.data['backbone']!r} has no width multiplier; "
                "alpha applies to mobilenetv2 only (set model.alpha: 1.0)"
            )
        return alpha

    @field_validator("backbone_weights")
    @classmethod
    def _check_weights(cls, weights: str | None, info: Any) -> str | None:
        backbone, alpha = info.data.get("backbone"), info.data.get("alpha", 1.0)
        if weights == "imagenet" and backbone not in IMAGENET_BACKBONES:
            raise ValueError(
                f"backbone {backbone!r} has no ImageNet weights; set model.backbone_weights: "
                f"null (or a {backbone} .weights.h5 file), or use a keras.applications trunk "
                "(resnet50, resnet101, mobilenetv2, efficientnetb0)"
            )
        if weights == "imagenet" and backbone == "mobilenetv2" and alpha not in MOBILENET_ALPHAS:
            raise ValueError(
                f"mobilenetv2 has ImageNet weights for alpha in {list(MOBILENET_ALPHAS)}, "
                f"not {alpha}; change model.alpha or set model.backbone_weights: null"
            )
        return weights


class LossSection(_Strict):
    global_weight: float = Field(0.5, ge=0.0)
    refine_weight: float = Field(1.0, ge=0.0)
    refine: Literal["ohkm", "pixel", "l2"] = "ohkm"  # l2: SimpleBaseline / HRNet's MSE
    top_k: int = Field(8, ge=1)
    pixel_ratio: float = Field(0.1, gt=0.0, le=1.0)
    global_sigmas: tuple[float, float, float, float] = DEFAULT_GLOBAL_SIGMAS
    refine_sigma: float = Field(DEFAULT_REFINE_SIGMA, gt=0.0)


class AugmentSection(_Strict):
    scale: tuple[float, float] = (0.7, 1.35)
    translate: float = Field(0.0, ge=0.0, le=1.0)  # centre shift, fraction of the region size
    rotation: float = Field(45.0, ge=0.0)
    rotation_prob: float = Field(0.6, ge=0.0, le=1.0)
    flip: bool = True
    half_body_prob: float = Field(0.0, ge=0.0, le=1.0)
    brightness: float = Field(0.2, ge=0.0)
    contrast: float = Field(0.2, ge=0.0)
    saturation: float = Field(0.2, ge=0.0)
    hue: float = Field(0.0, ge=0.0, le=0.5)
    photometric: list[dict[str, Any]] = []


# --------------------------------------------------------------------------- training
class TrainSection(_Strict):
    epochs: int = Field(140, ge=1)
    batch_size: int = Field(32, ge=1)  # GLOBAL batch size, split over the replicas
    optimizer: Literal["adam", "adamw", "sgd"] = "adam"
    lr: float = Field(5e-4, gt=0.0)
    lr_scaling: Literal["none", "linear"] = "none"  # linear: lr * batch_size / base_batch_size
    base_batch_size: int = Field(32, ge=1)
    lr_schedule: Literal["constant", "cosine", "step"] = "step"
    warmup_epochs: float = Field(0.0, ge=0.0)
    step_every: float | None = Field(None, gt=0.0)  # step: multiply by gamma every N epochs
    milestones: list[float] = []  # step: and/or at these epochs
    gamma: float = Field(0.5, gt=0.0, le=1.0)
    momentum: float = Field(0.9, ge=0.0, lt=1.0)  # sgd only
    weight_decay: float = Field(1e-5, ge=0.0)
    clipnorm: float | None = Field(None, gt=0.0)
    precision: Literal["float32", "mixed_float16", "mixed_bfloat16"] = "float32"
    distribute: Literal["auto", "one_device", "mirrored", "multi_worker"] = "auto"
    seed: int = 0
    steps_per_epoch: int | None = Field(None, ge=1)  # null: one pass; N: N steps (small data)
    validation_steps: int | None = Field(None, ge=1)
    freeze_backbone_epochs: int = Field(0, ge=0)  # skipped when nothing is pretrained
    # trunk BatchNorm: trainable, or frozen in inference mode (pretrained statistics, as
    # DeepLabCut does; cheaper steps); auto: frozen when the trunk is pretrained
    backbone_bn: Literal["auto", "frozen", "trainable"] = "trainable"
    # pretrained trunk: its layers whose outputs are at stride <= N (2: the stem; 4: up to C2)
    # stay frozen all run (Detectron2's FREEZE_AT): generic low-level features, and the
    # steps skip the backward pass at the highest resolutions; 0: none
    freeze_trunk_stride: Literal[0, 2, 4, 8, 16, 32] = 0
    unfreeze_lr_factor: float = Field(1.0, gt=0.0)
    validation_every: int = Field(1, ge=1)
    backup_every_steps: int | None = Field(None, ge=1)  # default: back up every epoch
    precise_bn_batches: int = Field(16, ge=0)  # recompute BN statistics on N batches; 0: off
    verbose: Literal[0, 1, 2] = 1


class EvaluationSection(_Strict):
    decode: Literal["dark", "quarter", "argmax"] = _CODEC.method
    flip_test: bool = _CODEC.flip_test  # needs flip pairs to help: COCO recipes turn it on
    max_peaks: int | None = Field(_CODEC.max_peaks, ge=1)  # shared channels; None: keypoints
    threshold: float = Field(_CODEC.threshold, ge=0.0)
    min_distance: int = Field(_CODEC.min_distance, ge=0)
    pck_thresholds: list[float] = [0.05, 0.1]
    batch_size: int = Field(32, ge=1)


class ExportSection(_Strict):
    keypoints_model: bool = True
    saved_model: bool = False


class Recipe(_Strict):
    """A complete training recipe (see ``recipes/quickstart.yaml`` for every key)."""

    data: DataSection
    model: ModelSection = ModelSection()
    loss: LossSection = LossSection()
    augment: AugmentSection = AugmentSection()
    train: TrainSection = TrainSection()
    evaluation: EvaluationSection = EvaluationSection()
    export: ExportSection = ExportSection()
    _source: str = PrivateAttr(default="<recipe>")

    @property
    def source(self) -> str:
        """The file this recipe came from (for error messages)."""
        return self._source

    def error(self, key: str, message: str) -> RecipeError:
        """A RecipeError naming this recipe's file and ``key``."""
        return RecipeError(f"{self._source}: {key}: {message}")

    def codec(self) -> Codec:
        """The :class:`kpnet.codec.Codec` of this recipe: geometry, sigmas and decoding."""
        d, e, lo = self.data, self.evaluation, self.loss
        if self.model.input_size == "auto":
            raise self.error("model.input_size", "auto is set from the training frames' sizes "
                             "(kpnet.data.sources.resolve_input_size), not known yet")  # fmt: skip
        return Codec(
            input_size=tuple(self.model.input_size),
            global_sigmas=tuple(lo.global_sigmas),
            refine_sigma=lo.refine_sigma,
            mode=d.mode,
            padding=tuple(d.padding),
            train_box_extend=d.train_box_extend,
            whole_fraction=d.whole_fraction,
            method=e.decode,
            flip_test=e.flip_test,
            max_peaks=e.max_peaks,
            threshold=e.threshold,
            min_distance=e.min_distance,
        )

    def with_input_size(self, size: tuple[int, int]) -> Recipe:
        """A copy of this recipe with ``model.input_size`` = ``size`` (H, W)."""
        model = self.model.model_copy(update={"input_size": (int(size[0]), int(size[1]))})
        return self.model_copy(update={"model": model})

    def check_files(self) -> None:
        """Raise RecipeError naming the key of every input path that does not exist."""
        missing = []
        for key, path in _input_paths(self):
            try:
                found = fs.exists(path)
            except Exception as err:  # a URL whose filesystem cannot be reached  # noqa: BLE001
                missing.append(f"{self._source}: {key}: cannot check {path} ({fs.reason(err)})")
                continue
            if not found:
                missing.append(f"{self._source}: {key}: file not found: {path}")
        if missing:
            raise RecipeError("\n".join(missing))

    def save(self, path: str | Path) -> str | Path:
        """Write the resolved recipe (absolute paths, every default filled in) as YAML.

        Atomic: written to a temporary file beside ``path`` (a local path or a URL), then
        renamed over it.
        """
        path = fs.as_path(path)
        fs.write_atomic(path, self.to_yaml())
        return path

    def to_yaml(self) -> str:
        """The resolved recipe as YAML text (what :meth:`save` writes)."""
        data = self.model_dump(mode="json")
        return yaml.safe_dump(data, sort_keys=False, default_flow_style=None)


# --------------------------------------------------------------------------- loading
def load_recipe(
    path: str | Path,
    overrides: Sequence[str] = (),
    check_files: bool = False,
) -> Recipe:
    """Load, expand, override and validate a recipe file.

    Args:
        path: the YAML recipe (a local path or a URL: ``gs://bucket/recipes/pins.yaml``).
        overrides: ``"dotted.key=value"`` strings; values are parsed as YAML.
        check_files: also require every input file / folder to exist.

    Raises:
        RecipeError: naming the file and the key path of the problem.
    """
    path = fs.as_path(path)
    raw = _read_yaml(path)
    over_keys = []
    for item in overrides:
        key, value = _parse_override(item, path)
        _set_dotted(raw, key, value, path)
        over_keys.append(key)
    raw = _expand_env(raw, path, ())
    try:
        recipe = Recipe.model_validate(raw)
    except ValidationError as err:
        raise RecipeError(_format_errors(err, path, over_keys)) from None
    recipe._source = str(path)
    base = fs.dirname(path) if fs.is_url(path) else path.resolve().parent
    _resolve_paths(recipe, base, over_keys)
    if check_files:
        recipe.check_files()
    return recipe


def _read_yaml(path: str | Path) -> dict[str, Any]:
    try:
        found = fs.isfile(path)
    except Exception as err:  # a URL whose filesystem cannot be reached  # noqa: BLE001
        raise RecipeError(f"{path}: cannot read the recipe ({fs.reason(err)})") from None
    if not found:
        raise RecipeError(f"{path}: recipe file not found; check the path")
    try:
        data = fs.read_bytes(path)
    except fs.io_errors() as err:
        reason = getattr(err, "strerror", None) or fs.reason(err)
        raise RecipeError(f"{path}: cannot read the recipe ({reason})") from None
    try:
        raw = yaml.safe_load(data.decode("utf-8"))
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise RecipeError(
            f"{path}: not UTF-8 text (byte 0x{data[err.start]:02x} at offset {err.start}, "
            f"line {line}); save the recipe as UTF-8"
        ) from None
    except yaml.YAMLError as err:
        raise RecipeError(f"{path}: not valid YAML: {fs.reason(err)}") from None
    if not isinstance(raw, dict):
        kind = {str: "string", list: "list", bool: "boolean"}.get(type(raw), "number")
        what = "empty" if raw is None else f"a YAML {kind}, not a mapping"
        raise RecipeError(
            f"{path}: the recipe is {what}; a recipe is a mapping of sections (data:, model:, "
            "train:, ...) with at least a 'data' section"
        )
    return raw


def _parse_override(item: str, path: Path) -> tuple[str, Any]:
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise RecipeError(f"{path}: override {item!r}: expected KEY=VALUE, e.g. train.epochs=3")
    try:
        return key, yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError as err:
        raise RecipeError(
            f"{path}: override {item!r}: value is not valid YAML: {fs.reason(err)}"
        ) from None


def _set_dotted(raw: dict[str, Any], key: str, value: Any, path: Path) -> None:
    node = raw
    parts = key.split(".")
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            where = ".".join(parts[: i + 1])
            raise RecipeError(f"{path} (--set {key}): {where}: is not a section")
        node = child
    node[parts[-1]] = value


_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def _expand_env(node: Any, path: Path, loc: tuple[str, ...]) -> Any:
    if isinstance(node, dict):
        return {k: _expand_env(v, path, (*loc, str(k))) for k, v in node.items()}
    if isinstance(node, list):
        return [_expand_env(v, path, (*loc, str(i))) for i, v in enumerate(node)]
    if not isinstance(node, str):
        return node

    def sub(match: re.Match) -> str:
        name, default = match.group(1), match.group(2)
        value = os.environ.get(name) or default
        if value is None:
            key = ".".join(loc)
            raise RecipeError(
                f"{path}: {key}: environment variable {name} is not set "
                f"(set it, or write ${{{name}:-default}})"
            )
        return value

    return _ENV.sub(sub, node)


# --------------------------------------------------------------------------- errors
def _format_errors(err: ValidationError, path: Path, over_keys: Sequence[str]) -> str:
    lines = []
    for e in err.errors():
        loc = [str(p) for p in e["loc"] if not _is_union_tag(p)]
        key = ".".join(loc) or "<top level>"
        origin = f"{path} (--set)" if any(key.startswith(k) for k in over_keys) else str(path)
        if e["type"] == "extra_forbidden":
            msg = "unknown key" + _did_you_mean(loc)
        elif e["type"] == "missing":
            msg = "required key is missing"
        else:
            msg = e["msg"].removeprefix("Value error, ")
            if "input" in e and not isinstance(e["input"], dict):
                msg += f" (got {e['input']!r})"
        lines.append(f"{origin}: {key}: {msg}")
    return "\n".join(dict.fromkeys(lines))


def _is_union_tag(part: Any) -> bool:
    # pydantic adds union members ("dict[str,any]", "literal['coco17']") to the location.
    return isinstance(part, str) and (
        "[" in part or part in {"str", "int", "float", "bool", "constrained-str"}
    )


def _did_you_mean(loc: Sequence[str]) -> str:
    fields = _fields_at(loc[:-1])
    close = difflib.get_close_matches(loc[-1], fields, n=1, cutoff=0.6)
    if close:
        return f" (did you mean {close[0]!r}?)"
    return f" (known keys: {', '.join(fields)})" if fields else ""


def _fields_at(loc: Sequence[str]) -> list[str]:
    model: Any = Recipe
    for part in loc:
        field = model.model_fields.get(part) if _is_model(model) else None
        if field is None:
            return []
        model = _model_in(field.annotation)
    return list(model.model_fields) if _is_model(model) else []


def _is_model(obj: Any) -> bool:
    return isinstance(obj, type) and issubclass(obj, BaseModel)


def _model_in(annotation: Any) -> Any:
    if _is_model(annotation):
        return annotation
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        for arg in typing.get_args(annotation):
            if _is_model(arg):
                return arg
    return None


# --------------------------------------------------------------------------- paths
#: Path keys that must stay local (written by kpnet, or read by code that needs a local file).
_LOCAL_ONLY = ("data.synthetic_pins.cache_dir", "model.backbone_weights")


def _resolve_paths(recipe: Recipe, base: str | Path, over_keys: Sequence[str]) -> None:
    """Relative paths against ``base`` (the recipe's folder, a local path or a URL); those
    given with ``--set`` against the working directory. URLs stay as they are."""
    cwd = Path.cwd()
    tfr = recipe.data.tfrecord
    fields = _path_fields(recipe)
    fields += [(f"data.tfrecord.{n}", tfr, n) for n in ("train", "val") if tfr is not None]
    for key, section, name in fields:
        value = getattr(section, name)
        if value is None or (name == "backbone_weights" and value == "imagenet"):
            continue
        if fs.is_url(value):
            continue
        value = os.path.expanduser(value)
        folder = cwd if key in over_keys else base
        if fs.is_url(folder) and not os.path.isabs(value) and key in _LOCAL_ONLY:
            raise recipe.error(
                key,
                f"{value!r} is relative to a recipe at a URL, but must be a local path; give "
                f"an absolute path (or --set {key}=PATH)",
            )
        p = fs.resolve(value, folder)
        is_str = isinstance(section, TFRecordSource) or name == "backbone_weights"
        setattr(section, name, p if is_str or fs.is_url(p) else Path(p))


def _path_fields(recipe: Recipe) -> list[tuple[str, BaseModel, str]]:
    out = []
    for sec_name in ("coco", "dlc", "synthetic_pins"):
        sec = getattr(recipe.data, sec_name)
        if sec is None:
            continue
        for name, field in type(sec).model_fields.items():
            if Path in (field.annotation, *typing.get_args(field.annotation)):
                out.append((f"data.{sec_name}.{name}", sec, name))
    out.append(("model.init_from", recipe.model, "init_from"))
    out.append(("model.backbone_weights", recipe.model, "backbone_weights"))
    return out


def _input_paths(recipe: Recipe) -> list[tuple[str, str]]:
    tfr = recipe.data.tfrecord
    out = [(f"data.tfrecord.{n}", getattr(tfr, n)) for n in ("train", "val")
           if tfr is not None and getattr(tfr, n) is not None]  # fmt: skip
    for key, section, name in _path_fields(recipe):
        value = getattr(section, name)
        if value is None or key == "data.synthetic_pins.cache_dir" or value == "imagenet":
            continue
        out.append((key, str(value)))
    return out
