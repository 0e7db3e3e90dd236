"""``kpnet predict``: keypoints of images (top-down on detection boxes, or whole images).

Example:
    $ kpnet predict runs/coco person.jpg -o predictions.json --draw overlays/
    $ kpnet predict runs/coco val2017/ --boxes detections.json --score-threshold 0.5 \\
          --images-json person_keypoints_val2017.json -o results.json

Image ids (to match ``--boxes`` detections and to label the results): with ``--images-json``
(any COCO json with an ``images`` list) an image's id is the ``id`` of the entry whose
``file_name`` has the same base name; otherwise the file stem when every stem is a number
(``000000000139.jpg`` -> 139, COCO's naming), else the image's index in the argument list.

The output is a COCO keypoint results list: ``image_id``, ``category_id``, ``keypoints``
(x, y, score) * K in image pixels, ``score`` = box score * mean of the keypoint scores
above 0.2, plus ``bbox`` (the box used) and ``file_name``. Crops use the same geometry as
the evaluation pipeline and the SavedModel (:mod:`kpnet.export`): numpy + OpenCV here, so
this runs on any Keras backend.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
import numpy as np

from kpnet import codec
from kpnet.data.records import DataError
from kpnet.spec import SpecError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
DEFAULT_PADDING: tuple[float, float] = (1.2, 1.3)
WHOLE_IMAGE_PADDING: tuple[float, float] = (1.0, 1.0)
RESCORE_THRESHOLD = 0.2


@dataclass
class Instance:
    """One crop to predict: an image, a box (None = whole image) and its results."""

    image: int  # index into the image list
    box: tuple[float, float, float, float] | None
    box_score: float = 1.0
    category_id: int = 1
    keypoints: np.ndarray | None = None  # [K, 2] image pixels
    scores: np.ndarray | None = None  # [K]
    heatmaps: np.ndarray | None = None
    crop: np.ndarray | None = field(default=None, repr=False)


# --------------------------------------------------------------------------- command
@click.command("predict")
@click.argument("model", type=click.Path(exists=True, path_type=Path))
@click.argument("images", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option(
    "--boxes", type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="COCO detection results json (image_id, bbox, score); default: whole images.",
)  # fmt: skip
@click.option("--score-threshold", type=float, default=0.5, show_default=True,
              help="Ignore detections scoring below this.")  # fmt: skip
@click.option(
    "--images-json", type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="COCO json whose 'images' map file names to image ids.",
)  # fmt: skip
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path),
              default=Path("predictions.json"), show_default=True)  # fmt: skip
@click.option("--draw", type=click.Path(file_okay=False, path_type=Path),
              help="Write keypoint overlays into this folder.")  # fmt: skip
@click.option("--heatmaps", is_flag=True, help="With --draw: also heatmap overlays per crop.")
@click.option("--flip-test", is_flag=True, help="Average with the mirrored crops' heatmaps.")
@click.option("--padding", type=float, nargs=2, default=DEFAULT_PADDING, show_default=True,
              help="Box extension (x, y) of the crops.")  # fmt: skip
@click.option("--category-id", type=int, default=1, show_default=True,
              help="category_id of whole-image results.")  # fmt: skip
@click.option("--batch-size", type=int, default=16, show_default=True)
def predict(
    model: Path,
    images: tuple[Path, ...],
    boxes: Path | None,
    score_threshold: float,
    images_json: Path | None,
    output: Path,
    draw: Path | None,
    heatmaps: bool,
    flip_test: bool,
    padding: tuple[float, float],
    category_id: int,
    batch_size: int,
) -> None:
    """Predict keypoints of IMAGE... (files or folders) with MODEL (.keras or a run folder)."""
    try:
        paths = expand_images(images)
        ids = image_ids(paths, images_json)
        if boxes is not None:
            instances = instances_from_detections(boxes, ids, score_threshold)
        else:
            instances = [Instance(i, None, 1.0, category_id) for i in range(len(paths))]
        keypoints_model = _load(resolve_model_path(model), flip_test)
        results = []
        for chunk in run_topdown(keypoints_model, paths, instances, padding, batch_size,
                                 keep_crops=heatmaps and draw is not None):  # fmt: skip
            results += [coco_result(inst, ids[inst.image], paths[inst.image]) for inst in chunk]
            if draw is not None:
                _draw(draw, paths, chunk, _spec_of(keypoints_model), heatmaps)
        write_json_atomic(output, results)
    except (DataError, SpecError, FileNotFoundError, ValueError) as err:
        raise click.ClickException(str(err)) from None
    click.echo(f"wrote {len(results)} predictions for {len(paths)} images to {output}")


COMMANDS = [predict]


# --------------------------------------------------------------------------- inputs
def resolve_model_path(path: str | Path) -> Path:
    """A ``.keras`` file as is; a run folder -> its ``best.keras`` (else ``last.keras``)."""
    path = Path(path)
    if path.is_dir():
        for name in ("best.keras", "last.keras"):
            if (path / name).is_file():
                return path / name
        raise FileNotFoundError(f"{path}: a run folder needs best.keras (or last.keras)")
    if path.suffix != ".keras":
        raise FileNotFoundError(f"{path}: MODEL must be a .keras file or a run folder")
    return path


def expand_images(images: Sequence[str | Path]) -> list[Path]:
    """Files as given, folders -> their image files (sorted); missing/unreadable -> DataError."""
    import cv2

    paths: list[Path] = []
    for item in map(Path, images):
        if item.is_dir():
            found = sorted(p for p in item.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise DataError(f"{item}: folder holds no image files {IMAGE_SUFFIXES}")
            paths += found
        elif not item.is_file():
            raise DataError(f"{item}: no such image file")
        elif not cv2.haveImageReader(str(item)):
            raise DataError(f"{item}: not an image file OpenCV can read")
        else:
            paths.append(item)
    return paths


def image_ids(paths: Sequence[Path], images_json: str | Path | None = None) -> list[int]:
    """Image id of each path (rules: see the module docstring)."""
    if images_json is not None:
        table = _coco_image_table(Path(images_json))
        missing = [p.name for p in paths if p.name not in table]
        if missing:
            raise DataError(f"{images_json}: no 'images' entry for {missing[:5]}")
        return [table[p.name] for p in paths]
    stems = [p.stem for p in paths]
    if all(s.isdigit() for s in stems):
        return [int(s) for s in stems]
    return list(range(len(paths)))


def _coco_image_table(path: Path) -> dict[str, int]:
    data = _read_json(path)
    entries = data.get("images") if isinstance(data, dict) else None
    if not isinstance(entries, list):
        raise DataError(f"{path}: expected a COCO json with an 'images' list")
    try:
        return {Path(e["file_name"]).name: int(e["id"]) for e in entries}
    except (KeyError, TypeError, ValueError) as err:
        raise DataError(f"{path}: 'images' entries need 'id' and 'file_name' ({err})") from None


def instances_from_detections(
    path: str | Path, ids: Sequence[int], score_threshold: float = 0.0
) -> list[Instance]:
    """Instances of a COCO detection results json whose image ids are among ``ids``."""
    path = Path(path)
    dets = _read_json(path)
    if not isinstance(dets, list):
        raise DataError(f"{path}: expected a list of detections (COCO results format)")
    where = {image_id: i for i, image_id in enumerate(ids)}
    out = []
    for n, det in enumerate(dets):
        try:
            image_id, box = int(det["image_id"]), [float(v) for v in det["bbox"]]
            score, category = float(det.get("score", 1.0)), int(det.get("category_id", 1))
        except (KeyError, TypeError, ValueError) as err:
            raise DataError(f"{path}: detection {n} needs image_id and bbox ({err})") from None
        if len(box) != 4:
            raise DataError(f"{path}: detection {n} bbox must be [x, y, w, h], got {box}")
        if image_id in where and score >= score_threshold and box[2] > 0 and box[3] > 0:
            out.append(Instance(where[image_id], tuple(box), score, category))
    return out


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(f"{path}: cannot read JSON ({err})") from None


def read_image(path: str | Path) -> np.ndarray:
    """RGB uint8 [H, W, 3] pixels of an image file; DataError naming the file otherwise."""
    import cv2

    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if bgr is None:
        raise DataError(f"{path}: cannot decode the image (corrupt or unsupported format)")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


# --------------------------------------------------------------------------- geometry
def crop_matrix(
    box: Sequence[float] | None,
    image_hw: Sequence[int],
    input_size: Sequence[int],
    padding: Sequence[float] = DEFAULT_PADDING,
) -> np.ndarray:
    """Image -> crop affine [2, 3] of a box (x, y, w, h), or of the whole image when None.

    Example:
        >>> crop_matrix(None, (480, 640), (256, 192)).astype(float).round(3).tolist()
        [[0.3, 0.0, -0.35], [0.0, 0.3, 55.65]]
    """
    if box is None:
        box, padding = (0.0, 0.0, float(image_hw[1]), float(image_hw[0])), WHOLE_IMAGE_PADDING
    aspect = float(input_size[1]) / float(input_size[0])
    center, size = codec.box_to_center_scale(box, aspect, tuple(padding))
    return codec.crop_affine(center, size, input_size)


def crop_image(image: np.ndarray, matrix: np.ndarray, input_size: Sequence[int]) -> np.ndarray:
    """Bilinear crop (uint8, zero fill) with pixel centres at integer coordinates."""
    import cv2

    out_hw = (int(input_size[1]), int(input_size[0]))
    return cv2.warpAffine(image, matrix, out_hw, flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=0)  # fmt: skip


# --------------------------------------------------------------------------- running
def run_topdown(
    keypoints_model,
    paths: Sequence[Path],
    instances: Sequence[Instance],
    padding: Sequence[float] = DEFAULT_PADDING,
    batch_size: int = 16,
    keep_crops: bool = False,
) -> Iterator[list[Instance]]:
    """Fill ``keypoints`` (image px) and ``scores`` of instances, yielding them image by image
    group (about ``batch_size`` crops each); ``keep_crops`` also keeps crops and heatmaps."""
    from kpnet.inference import with_heatmaps

    model = with_heatmaps(keypoints_model) if keep_crops else keypoints_model
    input_size = tuple(int(v) for v in keypoints_model.inputs[0].shape[1:3])
    by_image: dict[int, list[Instance]] = {}
    for inst in instances:
        by_image.setdefault(inst.image, []).append(inst)
    pending: list[Instance] = []
    crops: list[np.ndarray] = []
    matrices: list[np.ndarray] = []
    for index in sorted(by_image):
        image = read_image(paths[index])
        for inst in by_image[index]:
            m = crop_matrix(inst.box, image.shape[:2], input_size, padding)
            crops.append(crop_image(image, m, input_size))
            matrices.append(m)
            pending.append(inst)
        if len(pending) >= batch_size:
            yield _predict(model, pending, crops, matrices, batch_size, keep_crops)
            pending, crops, matrices = [], [], []
    if pending:
        yield _predict(model, pending, crops, matrices, batch_size, keep_crops)


def _predict(model, instances, crops, matrices, batch_size, keep_crops) -> list[Instance]:
    out = model.predict(np.stack(crops), batch_size=batch_size, verbose=0)
    for i, inst in enumerate(instances):
        inverse = codec.invert_affine(matrices[i])
        inst.keypoints = codec.transform_points(np.asarray(out["keypoints"][i]), inverse)
        inst.scores = np.asarray(out["scores"][i], np.float32)
        if keep_crops:
            inst.crop, inst.heatmaps = crops[i], np.asarray(out["heatmaps"][i])
    return list(instances)


def coco_result(inst: Instance, image_id: int, path: Path) -> dict[str, Any]:
    """One COCO keypoint result (see the module docstring for the score)."""
    scores = inst.scores.astype(np.float64)
    confident = scores[scores > RESCORE_THRESHOLD]
    flat = np.concatenate([inst.keypoints.astype(np.float64), scores[:, None]], axis=1)
    return {
        "image_id": int(image_id),
        "category_id": int(inst.category_id),
        "keypoints": [round(float(v), 3) for v in flat.reshape(-1)],
        "score": float(inst.box_score * (confident.mean() if confident.size else 0.0)),
        "bbox": [round(float(v), 2) for v in inst.box] if inst.box is not None else None,
        "file_name": path.name,
    }


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON via a temporary file, so a failed run never truncates an old output."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# --------------------------------------------------------------------------- helpers
def _load(path: Path, flip_test: bool):
    from kpnet.inference import load_model

    return load_model(path, **({"flip_test": True} if flip_test else {}))


def _spec_of(keypoints_model):
    from kpnet.inference import KeypointDecoder

    return next(la.spec for la in keypoints_model.layers if isinstance(la, KeypointDecoder))


def _draw(folder: Path, paths, instances: Sequence[Instance], spec, heatmaps: bool) -> None:
    import cv2

    from kpnet.inference import draw_keypoints, heatmap_overlay

    folder.mkdir(parents=True, exist_ok=True)
    for index in sorted({inst.image for inst in instances}):
        canvas = read_image(paths[index])
        mine = [inst for inst in instances if inst.image == index]
        for n, inst in enumerate(mine):
            canvas = draw_keypoints(canvas, inst.keypoints, inst.scores, spec)
            if heatmaps and inst.crop is not None:
                overlay = heatmap_overlay(inst.crop, inst.heatmaps)
                name = folder / f"{paths[index].stem}_heatmap{n}.jpg"
                cv2.imwrite(str(name), cv2.cvtColor(overlay, cv2.COLOR_RGB2BGR))
        out = folder / f"{paths[index].stem}.jpg"
        if not cv2.imwrite(str(out), cv2.cvtColor(canvas, cv2.COLOR_RGB2BGR)):
            print(f"warning: could not write {out}", file=sys.stderr)
