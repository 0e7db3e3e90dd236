"""COCO keypoint json (and detection results) -> instance records.

Training/validation: one record per ground-truth instance, skipping crowd instances and those
without labelled keypoints (as tf-cpn does). Test mode (``boxes_file``): one record per
detection box of the keypoint category, keypoints all unlabelled. Keypoints are taken as they
are in the json (COCO pixel coordinates; kpnet puts pixel centres at integers).

Bad records (missing image file, wrong keypoint count, NaN coordinates, zero-area box, a
detection for an image the json does not list) raise :class:`DataError` naming the file and
the annotation id; with ``on_error="skip"`` they are skipped and counted in
``records.report`` (a :class:`~kpnet.data.check.LoadReport`). Corrupt JPEGs are not decoded
here (too slow for COCO): ``kpnet data check --decode`` or the pipeline's ``on_error`` finds
them.

Example:
    >>> spec, records = load_coco_records(
    ...     "coco/annotations/person_keypoints_val2017.json", "coco/val2017")  # doctest: +SKIP
    >>> spec.num_keypoints, records.report.summary()  # doctest: +SKIP
    (17, '.../person_keypoints_val2017.json: 6352 records (skipped crowd: ..., ...)')
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from kpnet.data.check import LoadReport, Records, check_on_error
from kpnet.data.records import DataError, InstanceRecord
from kpnet.spec import COCO17_NAMES, KeypointSpec

log = logging.getLogger(__name__)

PathLike = str | os.PathLike


def load_coco_records(
    annotation_file: PathLike,
    image_dir: PathLike,
    spec: KeypointSpec | None = None,
    boxes_file: PathLike | None = None,
    score_threshold: float = 0.0,
    on_error: str = "raise",
    category: str | int | None = None,
) -> tuple[KeypointSpec, Records]:
    """Load COCO keypoint annotations (or detection boxes) as instance records.

    Args:
        annotation_file: COCO keypoints json (for ``boxes_file``, any COCO json that lists
            the images, e.g. ``image_info_test-dev2017.json``).
        image_dir: folder holding the images' ``file_name``.
        spec: keypoint spec; default derived from the json category (COCO person -> coco17).
        boxes_file: COCO detection results json (image_id, bbox, score, category_id).
        score_threshold: keep detections with score >= this.
        on_error: "raise" or "skip" bad records (counted in ``records.report``).
        category: category name or id; default the json's only keypoint category (or person).

    Returns:
        (spec, records); ``records.report`` holds kept and skipped counts.
    """
    check_on_error(on_error)
    coco = _load_coco(annotation_file)
    cat = _pick_category(coco.dataset.get("categories") or [], category, annotation_file)
    spec = spec if spec is not None else spec_from_category(cat, annotation_file)
    _warn_name_mismatch(cat, spec, annotation_file)
    report = LoadReport(source=str(annotation_file))
    if boxes_file is None:
        records = _gt_records(coco, cat["id"], spec, Path(image_dir), report, on_error)
    else:
        dets = _read_json(boxes_file)
        if not isinstance(dets, list):
            raise DataError(f"{boxes_file}: expected a list of COCO detection results")
        report.source = str(boxes_file)
        records = _detection_records(
            coco, dets, cat["id"], spec, Path(image_dir), score_threshold, report, on_error,
            boxes_file,
        )  # fmt: skip
    out = Records(records, report)
    log.info(report.summary())
    return spec, out


def spec_from_category(category: Mapping[str, Any], source: PathLike = "") -> KeypointSpec:
    """A spec from a COCO category: keypoint names, 1-based skeleton, left/right flip pairs.

    The COCO person category (17 standard names) gives :meth:`KeypointSpec.coco17`.

    Example:
        >>> spec_from_category({"keypoints": ["l_tip", "r_tip"], "skeleton": [[1, 2]]}).skeleton
        ((0, 1),)
    """
    names = tuple(category.get("keypoints") or ())
    if names == COCO17_NAMES or (not names and category.get("name") == "person"):
        return KeypointSpec.coco17()
    if not names:
        raise DataError(
            f"{source}: category {category.get('name')!r} lists no keypoint names; "
            "pass a spec (recipe `spec:`)"
        )
    skeleton = []
    for pair in category.get("skeleton") or ():
        if len(pair) != 2 or min(pair) < 1 or max(pair) > len(names):
            raise DataError(f"{source}: skeleton pair {pair} is not two 1-based keypoint indices")
        skeleton.append((int(pair[0]) - 1, int(pair[1]) - 1))
    return KeypointSpec(names=names, flip_pairs=guess_flip_pairs(names), skeleton=skeleton)


def guess_flip_pairs(names: Sequence[str]) -> tuple[tuple[int, int], ...]:
    """Pairs of names that differ only by left/right (``left_eye``/``right_eye``, ``l_x``/``r_x``).

    Example:
        >>> guess_flip_pairs(["nose", "left_eye", "right_eye", "pin_l", "pin_r"])
        ((1, 2), (3, 4))
    """
    swap = {"left": "right", "right": "left", "l": "r", "r": "l"}
    index = {n.lower(): i for i, n in enumerate(names)}
    pairs = []
    for i, name in enumerate(names):
        tokens = name.lower().replace("-", "_").split("_")
        if not any(t in swap for t in tokens):
            continue
        j = index.get("_".join(swap.get(t, t) for t in tokens))
        if j is not None and i < j:
            pairs.append((i, j))
    return tuple(pairs)


# --------------------------------------------------------------------------- reading
def _read_json(path: PathLike) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: not valid json ({err})") from None


def _load_coco(annotation_file: PathLike):
    from pycocotools.coco import COCO

    data = _read_json(annotation_file)
    if not isinstance(data, dict) or "images" not in data:
        raise DataError(f"{annotation_file}: not a COCO json (no 'images' list)")
    data.setdefault("annotations", [])
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
        try:
            coco.createIndex()
        except (KeyError, TypeError) as err:
            raise DataError(f"{annotation_file}: malformed COCO json (missing key {err})") from None
    return coco


def _pick_category(
    categories: list[dict], category: str | int | None, source: PathLike
) -> dict[str, Any]:
    if category is not None:
        for cat in categories:
            if category in (cat.get("id"), cat.get("name")):
                return cat
        if category == "person":
            return {"id": 1, "name": "person"}
        raise DataError(f"{source}: no category {category!r} (has {_cat_names(categories)})")
    with_kp = [c for c in categories if c.get("keypoints")]
    if len(with_kp) == 1:
        return with_kp[0]
    person = [c for c in categories if c.get("name") == "person"]
    if person:
        return person[0]
    if len(categories) == 1:
        return categories[0]
    raise DataError(
        f"{source}: cannot tell which category holds the keypoints "
        f"({_cat_names(categories) or 'none listed'}); pass category=..."
    )


def _cat_names(categories: list[dict]) -> list[str]:
    return [str(c.get("name")) for c in categories]


def _warn_name_mismatch(cat: Mapping[str, Any], spec: KeypointSpec, source: PathLike) -> None:
    names = tuple(cat.get("keypoints") or ())
    if names and names != spec.names:
        log.warning("%s: category keypoints %s differ from spec %s", source, names, spec.names)


# --------------------------------------------------------------------------- records
def _gt_records(
    coco, cat_id: int, spec: KeypointSpec, image_dir: Path, report: LoadReport, on_error: str
) -> list[InstanceRecord]:
    records = []
    for ann in coco.dataset["annotations"]:
        if ann.get("category_id", cat_id) != cat_id:
            report.skip("other_category")
            continue
        if ann.get("iscrowd", 0):
            report.skip("crowd")
            continue
        record = _gt_record(coco, ann, spec, image_dir, report, on_error)
        if record is not None:
            records.append(record)
    return records


def _gt_record(
    coco, ann: dict, spec: KeypointSpec, image_dir: Path, report: LoadReport, on_error: str
) -> InstanceRecord | None:
    where = f"{report.source} annotation id {ann.get('id')}"
    kp = np.asarray(ann.get("keypoints") or [], np.float32)
    if kp.size != 3 * spec.num_keypoints:
        report.bad(
            "keypoint_count",
            f"{where}: {kp.size} keypoint values, spec wants {3 * spec.num_keypoints} "
            f"({spec.num_keypoints} keypoints x 3)",
            on_error,
        )
        return None
    kp = kp.reshape(spec.num_keypoints, 3)
    if not np.isfinite(kp).all():
        report.bad("nan", f"{where}: NaN keypoint coordinates", on_error)
        return None
    if not (kp[:, 2] > 0).any():
        report.skip("no_keypoints")
        return None
    image = coco.imgs.get(ann.get("image_id"))
    if image is None:
        report.bad("unknown_image", f"{where}: image id {ann.get('image_id')} not listed", on_error)
        return None
    return _checked_record(image, image_dir, ann.get("bbox"), kp, ann.get("id"), 1.0, where,
                           report, on_error)  # fmt: skip


def _detection_records(
    coco, dets: list, cat_id: int, spec: KeypointSpec, image_dir: Path, threshold: float,
    report: LoadReport, on_error: str, boxes_file: PathLike,
) -> list[InstanceRecord]:  # fmt: skip
    records = []
    for i, det in enumerate(dets):
        where = f"{boxes_file} detection #{i}"
        if not isinstance(det, dict) or not {"image_id", "bbox"} <= det.keys():
            report.bad("bad_row", f"{where}: needs image_id and bbox", on_error)
            continue
        if det.get("category_id", cat_id) != cat_id:
            report.skip("other_category")
            continue
        score = float(det.get("score", 1.0))
        if score < threshold:
            report.skip("low_score")
            continue
        image = coco.imgs.get(det["image_id"])
        if image is None:
            report.bad("unknown_image", f"{where}: image id {det['image_id']} not in the "
                       "annotation file", on_error)  # fmt: skip
            continue
        kp = np.zeros((spec.num_keypoints, 3), np.float32)
        record = _checked_record(image, image_dir, det["bbox"], kp, i, score, where, report,
                                 on_error)  # fmt: skip
        if record is not None:
            records.append(record)
    return records


def _checked_record(
    image: dict, image_dir: Path, bbox, kp: np.ndarray, record_id, score: float, where: str,
    report: LoadReport, on_error: str,
) -> InstanceRecord | None:  # fmt: skip
    path = str(image_dir / image["file_name"])
    source, where = where, f"{where} (image {path})"
    box = np.asarray(bbox if bbox is not None else [np.nan] * 4, np.float64).reshape(-1)
    if box.size != 4 or not np.isfinite(box).all():
        report.bad("nan", f"{where}: bbox {bbox} is missing or not 4 finite numbers", on_error)
        return None
    if box[2] <= 0 or box[3] <= 0:
        report.bad("zero_area", f"{where}: zero-area bbox {box.tolist()}", on_error)
        return None
    if not os.path.isfile(path):
        report.bad("missing_image", f"{where}: image file not found", on_error)
        return None
    size = (int(image["height"]), int(image["width"])) if "height" in image else None
    return InstanceRecord(
        image_path=path,
        box=tuple(float(v) for v in box),
        keypoints=kp,
        image_id=int(image["id"]),
        record_id=int(record_id),
        score=score,
        image_size=size,
        source=source,
    )
