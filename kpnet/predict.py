"""Predicting keypoints of image files, folders and videos: what ``kpnet predict`` runs.

Example:
    >>> summary = predict_inputs("runs/mouse", ["clip.mp4"], "out/predictions.json",
    ...                          draw="out/draw")                          # doctest: +SKIP
    >>> summary["csv"]                                                      # doctest: +SKIP
    ['out/predictions.csv']

Crops, decoding and the way back to image pixels are those of validation and the SavedModel
(:class:`kpnet.runner.Predictor`, the model's codec): a whole-frame model predicts on whole
frames, a top-down model on ``--boxes`` or, without them, on the whole frame.

Outputs:

* a COCO keypoint results json: ``image_id``, ``category_id``, ``keypoints`` (x, y, score)
  * K in image pixels, ``score`` (:func:`kpnet.evaluate.instance_score`: box score * mean of
  the keypoint scores above 0.2, 6 decimals), plus
  ``bbox`` (the box used, None for the whole frame) and ``file_name`` (``clip.mp4#000012``
  for a video frame);
* without ``--boxes`` (one instance per frame): a DeepLabCut CSV per input (a video, a
  folder, an image): three header rows (scorer / bodyparts / coords) and one row per frame
  with x, y, likelihood per body part (``<json stem>.csv``, ``<json stem>_<input>.csv``
  for several inputs), and its DeepLabCut ``.h5`` twin (key ``df_with_missing``);
* ``filter_method`` (``--filter median|savgol``): also ``<csv stem>_filtered.csv`` / ``.h5``
  (:func:`kpnet.tracks.filter_tracks`);
* ``--draw DIR``: labelled images, and ``<video stem>_labelled.mp4`` for a video (points
  below ``pcutoff`` hidden; ``trail`` frames of each point's path; skeleton lines).

Videos stream: a background thread decodes frames (:func:`kpnet.frames.prefetch`, a bounded
queue) while the model runs on batches of ``batch_size`` frames; a progress line shows
frames per second. Nothing is written until every frame is done (tables are written under a
temporary name and renamed, so no half file is left).

One bad file does not sink a batch: an image that cannot be read or decoded, or whose header
declares more than ``max_pixels`` pixels (never decoded), and a video that cannot be opened
or ends before the frame count its header announces (truncated: more than 1 % and 2 frames
short, :data:`kpnet.frames.TRUNCATION_TOLERANCE`) are skipped with a one-line warning naming
the file: nothing of them is written (a truncated video's rows and labelled video are
dropped), everything else is, and the summary lists them (``"skipped"``). When every input
is skipped nothing is written and :class:`~kpnet.data.records.DataError` says why.

Scores ("likelihood") are the heatmap peak clipped to 0..1 (see
:class:`kpnet.inference.KeypointDecoder`); keypoints are clipped to the image.

Image ids (to match ``--boxes`` detections and to label the results): with ``images_json``
(any COCO json with an ``images`` list) an image's id is the ``id`` of the entry whose
``file_name`` has the same base name; otherwise the file stem when every stem is a number
(``000000000139.jpg`` -> 139, COCO's naming), else the frame's position. Detections are
matched to images by file name: a detection's own ``file_name``, else its ``image_id``
looked up in ``images_json``; a detection that matches no input image is an error.
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter, deque
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from kpnet import fs
from kpnet.data.coco import read_json
from kpnet.data.images import MAX_PIXELS
from kpnet.data.records import DataError
from kpnet.evaluate import instance_score
from kpnet.frames import (
    Progress,
    Skipped,
    VideoWriter,
    count_frames,
    is_video,
    iter_frames,
    list_inputs,
    prefetch,
    write_image,
)
from kpnet.inference import draw_keypoints, draw_trails, heatmap_overlay, load_model
from kpnet.runner import Predictor
from kpnet.tracks import (
    DEFAULT_PCUTOFF,
    FILTERS,
    Tracks,
    filter_tracks,
    filtered_path,
    write_tracks,
)

log = logging.getLogger(__name__)

PathLike = str | os.PathLike


def predict_inputs(
    model: PathLike | Any,
    inputs: Sequence[PathLike],
    output: PathLike = "predictions.json",
    boxes: PathLike | None = None,
    images_json: PathLike | None = None,
    score_threshold: float = 0.5,
    draw: PathLike | None = None,
    heatmaps: bool = False,
    flip_test: bool | None = None,
    padding: Sequence[float] | None = None,
    category_id: int = 1,
    batch_size: int = 16,
    pcutoff: float = DEFAULT_PCUTOFF,
    trail: int = 0,
    skeleton: bool = True,
    filter_method: str | None = None,
    filter_window: int = 5,
    max_pixels: int = MAX_PIXELS,
    warn: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Predict every frame of ``inputs`` (image files, folders, videos) with ``model``.

    ``model`` (a ``.keras`` file or a run folder, or a loaded keypoints model), ``output``
    and ``draw`` may be URLs (``gs://...``, written through :mod:`kpnet.fs`); the inputs are
    local files.

    ``pcutoff``, ``trail`` and ``skeleton`` style the drawings; ``filter_method`` (``median`` or
    ``savgol``, window ``filter_window``) also writes filtered tables.

    Bad files are skipped (see the module docstring): ``warn`` (default: a logging warning)
    gets one line per skipped file, naming it; images over ``max_pixels`` pixels are bad.

    Returns ``{"predictions", "frames", "json", "csv": [paths], "h5": [paths],
    "filtered": [paths], "draw": [paths], "inputs": files read, "skipped": [(path, why)]}``.

    Raises:
        DataError: every input file was skipped (nothing is written), or a bad argument.
    """
    if filter_method is not None and filter_method not in FILTERS:
        raise ValueError(f"--filter: unknown method {filter_method!r}; use one of "
                         f"{', '.join(FILTERS)}")  # fmt: skip
    listed = list_inputs(inputs)  # every input checked before the model loads
    files = [f for _, group in listed for f in group]
    detections = _detections(boxes, images_json, files, score_threshold) if boxes else None
    ids = _image_ids(files, images_json)
    options = {} if flip_test is None else {"flip_test": bool(flip_test)}
    if isinstance(model, (str, os.PathLike)):
        keypoints_model = load_model(model, **options)
    else:  # an already loaded keypoints model (benchmarks, notebooks)
        keypoints_model, model = model, getattr(model, "name", "model")
    predictor = Predictor(keypoints_model)
    if padding is not None:
        predictor.codec = predictor.codec.replace(padding=tuple(padding))
    style = {"pcutoff": float(pcutoff), "trail": int(trail), "skeleton": bool(skeleton)}
    smoothing = (filter_method, int(filter_window), float(pcutoff)) if filter_method else None
    out = _Outputs(output, predictor.spec, model, draw, heatmaps, len(listed), style, smoothing)
    total = count_frames(inputs, on_error="skip")
    try:
        with Progress(total, "predict") as bar:
            frames = prefetch(iter_frames(inputs, on_error="skip", max_pixels=max_pixels))
            items = _items(frames, detections, out, warn or log.warning)
            for frame, xy, scores, extra in predictor.run(items, batch_size,
                                                          keep_crops=heatmaps):  # fmt: skip
                dets = detections.get(frame.source.name, []) if detections is not None else None
                out.add(frame, xy, scores, dets, ids.get(frame.source, frame.index),
                        category_id, extra)  # fmt: skip
                bar.update()
        if len(out.skipped) == len(files):
            raise DataError(_nothing_read(out.skipped))
    except BaseException:
        out.abort()
        raise
    return {**out.finish(), "inputs": len(files)}


def _nothing_read(skipped: Sequence[tuple[Path, str]]) -> str:
    """The error when every input file was skipped: the first reason, and how many more."""
    more = f" (and {len(skipped) - 1} more files skipped)" if len(skipped) > 1 else ""
    return f"no input could be read, nothing written: {skipped[0][1]}{more}"


# --------------------------------------------------------------------------- inputs
def _items(
    frames: Iterator[Any], detections: dict[str, list[dict]] | None, out: _Outputs,
    warn: Callable[[str], None],
):  # fmt: skip
    """(frame, frame, boxes) for :meth:`kpnet.runner.Predictor.run`; frames without a
    detection are passed with zero boxes (skipped); a skipped file is warned about and
    dropped from ``out``."""
    for frame in frames:
        if isinstance(frame, Skipped):
            warn(f"skipping {frame.why}")
            out.skip(frame.source, frame.why)
        elif detections is None:
            yield frame, frame.image, None
        else:
            dets = detections.get(frame.source.name, [])
            yield frame, frame.image, np.array([d["bbox"] for d in dets], np.float32).reshape(-1, 4)


def _image_ids(files: Sequence[Path], images_json: PathLike | None) -> dict[Path, int]:
    """Image id of each image file (rules: see the module docstring); videos: frame index."""
    images = [f for f in files if not is_video(f)]
    if images_json is not None:
        table = _coco_image_table(Path(images_json))
        missing = [p.name for p in images if p.name not in table]
        if missing:
            raise DataError(f"{images_json}: no 'images' entry for {missing[:5]}")
        return {p: table[p.name] for p in images}
    if images and all(p.stem.isdigit() for p in images):
        return {p: int(p.stem) for p in images}
    return {p: i for i, p in enumerate(images)}


def _coco_image_table(path: Path) -> dict[str, int]:
    data = read_json(path)
    entries = data.get("images") if isinstance(data, dict) else None
    if not isinstance(entries, list):
        raise DataError(f"{path}: expected a COCO json with an 'images' list")
    try:
        return {Path(e["file_name"]).name: int(e["id"]) for e in entries}
    except (KeyError, TypeError, ValueError) as err:
        raise DataError(f"{path}: 'images' entries need 'id' and 'file_name' ({err})") from None


def _detections(
    path: PathLike, images_json: PathLike | None, files: Sequence[Path], score_threshold: float
) -> dict[str, list[dict[str, Any]]]:
    """Detections of a COCO results json by image file name (see the module docstring)."""
    path = Path(path)
    dets = read_json(path)
    if not isinstance(dets, list):
        raise DataError(f"{path}: expected a list of detections (COCO results format)")
    names = {f.name for f in files}
    by_id = None
    if images_json is not None:
        by_id = {i: name for name, i in _coco_image_table(Path(images_json)).items()}
    out: dict[str, list[dict[str, Any]]] = {}
    for n, det in enumerate(dets):
        try:
            box = [float(v) for v in det["bbox"]]
            score, category = float(det.get("score", 1.0)), int(det.get("category_id", 1))
            name = det.get("file_name")
            image_id = det.get("image_id")
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise DataError(f"{path}: detection {n} needs a bbox ({err})") from None
        if len(box) != 4 or not np.isfinite(box).all():
            raise DataError(f"{path}: detection {n} bbox must be 4 finite numbers, got {box}")
        if name is None:
            if by_id is None:
                raise DataError(
                    f"{path}: detection {n} has no file_name; pass --images-json (a COCO json "
                    "whose 'images' map image ids to file names) to match boxes to images"
                )
            name = by_id.get(_int_or_none(image_id))
            if name is None:
                raise DataError(f"{path}: detection {n}: image_id {image_id!r} is not in "
                                f"{images_json}")  # fmt: skip
        name = Path(str(name)).name
        if name not in names:
            raise DataError(
                f"{path}: detection {n} is for {name}, which is not among the input images; "
                "pass that image or drop the detection"
            )
        if score >= score_threshold and box[2] > 0 and box[3] > 0:
            out.setdefault(name, []).append({"bbox": box, "score": score, "category_id": category})
    return out


def _int_or_none(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None




# --------------------------------------------------------------------------- outputs
class _Outputs:
    """Collects results per input; writes the json, the DLC CSVs and the drawings."""

    def __init__(
        self, output: PathLike, spec, model: PathLike, draw: PathLike | None, heatmaps: bool,
        num_inputs: int, style: dict[str, Any], filter: tuple[str, int, float] | None = None,
    ) -> None:  # fmt: skip
        self.output, self.spec, self.heatmaps = fs.as_path(output), spec, heatmaps
        self.scorer = f"kpnet_{_model_name(model)}"
        self.draw = fs.as_path(draw) if draw is not None else None
        self.results: list[tuple[Path, dict[str, Any]]] = []  # (source file, result)
        # input -> rows (key, xy, scores, source file)
        self.tables: dict[Path, list[tuple[str | int, np.ndarray, np.ndarray, Path]]] = {}
        self.videos: dict[Path, Any] = {}
        self.drawn: list[str] = []
        self.frames: Counter[Path] = Counter()  # per source file
        self.skipped: list[tuple[Path, str]] = []  # (file, why)
        self.num_inputs = num_inputs
        self.style = style  # pcutoff, trail, skeleton of the drawings
        self.filter = filter  # (method, window, pcutoff) of the filtered tables, or None
        self.trails: dict[Path, Any] = {}

    def add(self, frame, xy, scores, dets, image_id, category_id, extra) -> None:
        if frame.source in self._skipped_files():
            return  # a frame of a truncated video, still in the batch when it was skipped
        self.frames[frame.source] += 1
        name = frame.name
        if dets is None:  # whole frame, one instance
            dets = [{"bbox": None, "score": 1.0, "category_id": category_id}]
            key = frame.index if frame.is_video else str(frame.source.name)
            row = (key, xy[0], scores[0], frame.source)
            self.tables.setdefault(frame.input or frame.source, []).append(row)
        for det, kp, sc in zip(dets, xy, scores, strict=True):
            self.results.append((frame.source, coco_result(kp, sc, det, image_id, name)))
        if self.draw is not None:
            self._draw(frame, xy, scores, extra)

    def _draw(self, frame, xy, scores, extra) -> None:
        canvas = frame.image
        style = self.style
        if style["trail"] > 0 and frame.is_video and len(xy) == 1:
            canvas = self._trail(frame.source, xy[0], scores[0], frame.image)
        for kp, sc in zip(xy, scores, strict=True):
            canvas = draw_keypoints(canvas, kp, sc, self.spec, threshold=style["pcutoff"],
                                    skeleton=style["skeleton"])  # fmt: skip
        if frame.is_video:
            writer = self.videos.get(frame.source)
            if writer is None:
                path = fs.child(self.draw, f"{frame.source.stem}_labelled.mp4")
                writer = self.videos[frame.source] = VideoWriter(path, fps=frame.fps)
            writer.write(canvas)
            return
        out = fs.child(self.draw, f"{frame.source.stem}.jpg")
        write_image(out, canvas)
        self.drawn.append(str(out))
        if self.heatmaps and extra is not None:
            for n, (crop, hm) in enumerate(zip(extra["crops"], extra["heatmaps"], strict=True)):
                name = fs.child(self.draw, f"{frame.source.stem}_heatmap{n}.jpg")
                write_image(name, heatmap_overlay(crop, hm))

    def _trail(self, source: Path, xy: np.ndarray, scores: np.ndarray, image: np.ndarray):
        """The frame with the last ``trail`` positions of each point drawn as lines."""
        history = self.trails.get(source)
        if history is None:
            history = self.trails[source] = deque(maxlen=self.style["trail"] + 1)
        history.append((np.asarray(xy, np.float64), np.asarray(scores) >= self.style["pcutoff"]))
        points = np.stack([p for p, _ in history])
        valid = np.stack([v for _, v in history])
        return draw_trails(np.array(image, np.uint8, copy=True), points, valid)

    def skip(self, source: Path, why: str) -> None:
        """Drop everything of the file ``source`` (a truncated video's frames so far, its
        labelled video) and list it as skipped."""
        self.skipped.append((source, why))
        self.results = [(src, r) for src, r in self.results if src != source]
        for table in self.tables.values():
            table[:] = [row for row in table if row[3] != source]
        self.frames.pop(source, None)
        writer = self.videos.pop(source, None)
        if writer is not None:
            writer.close(keep=False)

    def _skipped_files(self) -> set[Path]:
        return {source for source, _ in self.skipped}

    def abort(self) -> None:
        """Drop the labelled videos being written (nothing half is left behind)."""
        for writer in self.videos.values():
            writer.close(keep=False)
        self.videos.clear()

    def finish(self) -> dict[str, Any]:
        for writer in self.videos.values():
            writer.close()
            self.drawn.append(str(writer.path))
        fs.write_atomic(self.output, json.dumps([r for _, r in self.results]))
        csvs, h5s, filtered = [], [], []
        stem = os.path.splitext(fs.basename(self.output))[0]
        for source, rows in self.tables.items():
            if not rows:  # every file of this input was skipped
                continue
            suffix = f"_{Path(source).stem}" if self.num_inputs > 1 else ""  # skips: same names
            path = fs.child(fs.parent(self.output), f"{stem}{suffix}.csv")
            keys, xy, scores, _ = zip(*rows, strict=True)
            tracks = Tracks(self.scorer, tuple(self.spec.names), tuple(keys), np.stack(xy),
                            np.stack(scores))  # fmt: skip
            written = write_tracks(path, tracks)
            csvs.append(str(written[0]))
            h5s += [str(p) for p in written[1:]]
            if self.filter is not None:
                method, window, pcutoff = self.filter
                smooth = filter_tracks(tracks, method, window=window, pcutoff=pcutoff)
                filtered += [str(p) for p in write_tracks(filtered_path(path), smooth)]
        skipped = [(str(f), why) for f, why in self.skipped]
        return {"predictions": len(self.results), "frames": sum(self.frames.values()),
                "json": str(self.output), "csv": csvs, "h5": h5s, "filtered": filtered,
                "draw": self.drawn, "skipped": skipped}  # fmt: skip


def _model_name(model: PathLike) -> str:
    """A run folder's name (``.`` resolved) or a model file's stem: the DLC scorer's suffix."""
    model = fs.as_path(model)
    if isinstance(model, Path) and model.is_dir():
        return model.resolve().name
    name = fs.basename(model)
    return name if fs.isdir(model) else os.path.splitext(name)[0]


def coco_result(xy: np.ndarray, scores: np.ndarray, det: dict, image_id: int, name: str):
    """One COCO keypoint result, scored by :func:`kpnet.evaluate.instance_score`."""
    scores = np.asarray(scores, np.float64)
    flat = np.concatenate([np.asarray(xy, np.float64), scores[:, None]], axis=1)
    box = det["bbox"]
    return {
        "image_id": int(image_id),
        "category_id": int(det["category_id"]),
        "keypoints": [round(float(v), 3) for v in flat.reshape(-1)],
        "score": instance_score(scores, det["score"]),
        "bbox": [round(float(v), 2) for v in box] if box is not None else None,
        "file_name": name,
    }
