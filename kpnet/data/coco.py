"""COCO keypoint json (and detection results) -> instance records.

Training/validation: one record per ground-truth instance, skipping crowd instances and those
without labelled keypoints (as tf-cpn does). Test mode (``boxes_file``): one record per
detection box of the keypoint category, keypoints all unlabelled. Keypoints are taken as they
are in the json (COCO pixel coordinates; kpnet puts pixel centres at integers).

Bad records (missing image file, a ``file_name`` that leaves the image folder, wrong keypoint
count, NaN coordinates, a visibility other than 0 / 1 / 2, zero-area box, a detection for an
image the json does not list) raise :class:`DataError` naming the file and the annotation id;
with ``on_error="skip"`` they are skipped and counted in ``records.report`` (a
:class:`~kpnet.data.check.LoadReport`). A json that lists one image id twice, or a category
without keypoint names (and no ``spec``), is refused as a whole. Corrupt JPEGs are not decoded
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
import posixpath
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from kpnet import fs
from kpnet.data.check import LoadReport, Records, check_on_error, outside_root
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
    allow_outside_root: bool = False,
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
        allow_outside_root: read images whose ``file_name`` leaves ``image_dir`` (``../x.jpg``,
            an absolute path); by default such records are bad (``outside_root``).

    Returns:
        (spec, records); ``records.report`` holds kept and skipped counts.
    """
    check_on_error(on_error)
    coco = _load_coco(annotation_file)
    cat = _pick_category(coco.dataset.get("categories") or [], category, annotation_file)
    spec = spec if spec is not None else spec_from_category(cat, annotation_file)
    _warn_name_mismatch(cat, spec, annotation_file)
    report = LoadReport(source=str(annotation_file))
    image_dir = ImageDir(image_dir, allow_outside_root)
    if boxes_file is None:
        records = _gt_records(coco, cat["id"], spec, image_dir, report, on_error)
    else:
        dets = _read_json(boxes_file)
        if not isinstance(dets, list):
            raise DataError(f"{boxes_file}: expected a list of COCO detection results")
        report.source = str(boxes_file)
        records = _detection_records(
            coco, dets, cat["id"], spec, image_dir, score_threshold, report, on_error,
            boxes_file,
        )  # fmt: skip
    out = Records(records, report)
    log.info(report.summary())
    return spec, out


def spec_from_category(category: Mapping[str, Any], source: PathLike = "") -> KeypointSpec:
    """A spec from a COCO category: keypoint names, 1-based skeleton, left/right flip pairs.

    The COCO person category (17 standard names) gives :meth:`KeypointSpec.coco17`; a
    category without keypoint names is refused (even "person": pass the spec instead).

    Example:
        >>> spec_from_category({"keypoints": ["l_tip", "r_tip"], "skeleton": [[1, 2]]}).skeleton
        ((0, 1),)
    """
    names = tuple(category.get("keypoints") or ())
    if names == COCO17_NAMES:
        return KeypointSpec.coco17()
    if not names:
        raise DataError(
            f"{source}: category {category.get('name')!r} lists no keypoint names; add them "
            "(the category's 'keypoints' list) or give the spec (recipe data.spec, e.g. coco17)"
        )
    skeleton = []
    for pair in category.get("skeleton") or ():
        if len(pair) != 2 or min(pair) < 1 or max(pair) > len(names):
            raise DataError(f"{source}: skeleton pair {pair} is not two 1-based keypoint indices")
        skeleton.append((int(pair[0]) - 1, int(pair[1]) - 1))
    return KeypointSpec(names=names, flip_pairs=guess_flip_pairs(names), skeleton=skeleton)


def guess_flip_pairs(names: Sequence[str]) -> tuple[tuple[int, int], ...]:
    """Pairs of names that differ only by left/right, whatever the style, case-insensitive.

    Names are split into words at ``_``, ``-``, spaces and other punctuation, at camel-case
    and letter/digit boundaries, and around the words ``left`` / ``right`` (so ``leftear``
    works). ``left``/``right`` and the single letters ``l``/``r`` (as whole words only) mark
    the side: ``left_ear``/``right_ear``, ``l_ear``/``r_ear``, ``ear_L``/``ear_R``,
    ``earL``/``earR``, ``LeftEar``/``RightEar``, ``EarLeft``/``EarRight``, ``L Ear``/``R Ear``,
    ``leftear``/``rightear``. Names like ``lip``/``rip`` or ``Leg`` have no side word and are
    never paired; each name joins at most one pair.

    Example:
        >>> guess_flip_pairs(["nose", "left_eye", "right_eye", "pin_l", "pin_r"])
        ((1, 2), (3, 4))
        >>> guess_flip_pairs(["leftear", "rightear", "earL", "earR", "lip", "rip", "LPaw", "RPaw"])
        ((0, 1), (2, 3), (6, 7))
    """
    words = [_name_words(n) for n in names]
    canon = [tuple(_SIDE_WORD.get(w, w) for w in ws) for ws in words]
    by_canon: dict[tuple[str, ...], list[int]] = {}
    for i, key in enumerate(canon):
        by_canon.setdefault(key, []).append(i)
    paired: set[int] = set()
    pairs = []
    for same_style in (True, False):  # l_ear pairs with r_ear before right_ear
        for i, key in enumerate(canon):
            if i in paired or not any(w in _SIDE_SWAP for w in key):
                continue
            mirror = tuple(_SIDE_SWAP.get(w, w) for w in key)
            style = tuple(_SIDE_LETTER_SWAP.get(w, w) for w in words[i])
            found = [
                j for j in by_canon.get(mirror, ())
                if j != i and j not in paired and (tuple(words[j]) == style or not same_style)
            ]  # fmt: skip
            if found:
                paired |= {i, found[0]}
                pairs.append((min(i, found[0]), max(i, found[0])))
    return tuple(sorted(pairs))


_SIDE_WORD = {"l": "left", "r": "right"}  # canonical side words
_SIDE_SWAP = {"left": "right", "right": "left"}
_SIDE_LETTER_SWAP = {"left": "right", "right": "left", "l": "r", "r": "l"}


def _name_words(name: str) -> list[str]:
    """Lower-case words of a keypoint name: ``"LeftEar_2"`` -> ``['left', 'ear', '2']``."""
    import re

    words = []
    for part in re.split(r"[\W_]+", str(name)):
        if not part.isascii():  # no camel-case rules outside ASCII: keep the part whole
            words.append(part.lower())
            continue
        for word in re.findall(r"[A-Z]+(?![a-z])|[A-Z]?[a-z]+|[0-9]+", part):
            words += [w for w in re.split(r"(left|right)", word.lower()) if w]
    return words


# --------------------------------------------------------------------------- reading
def _read_json(path: PathLike) -> Any:
    if not fs.isfile(path):
        raise DataError(f"{path}: file not found")
    try:
        return json.loads(fs.read_bytes(path))
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
    _check_images(data["images"], annotation_file)
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
        try:
            coco.createIndex()
        except (KeyError, TypeError) as err:
            raise DataError(f"{annotation_file}: malformed COCO json (missing key {err})") from None
    return coco


def _check_images(images: Any, source: PathLike) -> None:
    """Every image entry has an id and a file_name, and no id is listed twice."""
    if not isinstance(images, list):
        raise DataError(f"{source}: 'images' must be a list of image entries")
    seen: dict[Any, str] = {}
    for i, image in enumerate(images):
        if not isinstance(image, dict) or "id" not in image or "file_name" not in image:
            raise DataError(f"{source}: images[{i}] needs an 'id' and a 'file_name'")
        first = seen.get(image["id"])
        if first is not None:
            raise DataError(
                f"{source}: image id {image['id']} is listed twice ({first!r} and "
                f"{image['file_name']!r}); give every image its own id"
            )
        seen[image["id"]] = str(image["file_name"])


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
    coco, cat_id: int, spec: KeypointSpec, image_dir: ImageDir, report: LoadReport, on_error: str
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
    coco, ann: dict, spec: KeypointSpec, image_dir: ImageDir, report: LoadReport, on_error: str
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
    odd = sorted({float(v) for v in kp[:, 2]} - {0.0, 1.0, 2.0})
    if odd:
        report.bad("visibility", f"{where}: visibility {', '.join(f'{v:g}' for v in odd)} "
                   "(COCO uses 0 unlabelled, 1 occluded, 2 visible)", on_error)  # fmt: skip
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
    coco, dets: list, cat_id: int, spec: KeypointSpec, image_dir: ImageDir, threshold: float,
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
    image: dict, image_dir: ImageDir, bbox, kp: np.ndarray, record_id, score: float, where: str,
    report: LoadReport, on_error: str,
) -> InstanceRecord | None:  # fmt: skip
    path, outside = image_dir.path(image["file_name"])
    source, where = where, f"{where} (image {path})"
    if outside:  # checked first: such a path is never opened
        report.bad("outside_root", f"{source}: file_name {image['file_name']!r} is outside the "
                   f"image folder {image_dir.root}; fix the file_name, or set "
                   "data.coco.allow_outside_root: true to read it", on_error)  # fmt: skip
        return None
    box = np.asarray(bbox if bbox is not None else [np.nan] * 4, np.float64).reshape(-1)
    if box.size != 4 or not np.isfinite(box).all():
        report.bad("nan", f"{where}: bbox {bbox} is missing or not 4 finite numbers", on_error)
        return None
    if box[2] <= 0 or box[3] <= 0:
        report.bad("zero_area", f"{where}: zero-area bbox {box.tolist()}", on_error)
        return None
    if not image_dir.exists(path):
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


class ImageDir:
    """An image folder and whether an annotation's ``file_name`` may leave it.

    Example:
        >>> ImageDir(Path("data/images")).path("cam1/0001.jpg")
        ('data/images/cam1/0001.jpg', False)
        >>> ImageDir(Path("data/images")).path("../../etc/hostname")[1]
        True
        >>> ImageDir(Path("data/images"), allow_outside=True).path("/srv/img.jpg")
        ('/srv/img.jpg', False)
    """

    def __init__(self, root: PathLike, allow_outside: bool = False):
        self.root = os.fspath(root) if fs.is_url(root) else Path(root)  # a URL stays a string
        self.allow_outside = allow_outside
        self._found: dict[str, bool] = {}

    def path(self, file_name: Any) -> tuple[str, bool]:
        """(the image's path, True when it is outside the folder and that is not allowed)."""
        if isinstance(self.root, str):
            scheme, rest = self.root.split("://", 1)
            path = f"{scheme}://{posixpath.normpath(posixpath.join(rest, str(file_name)))}"
        else:
            path = str(self.root / str(file_name))
        return path, not self.allow_outside and outside_root(self.root, path)

    def exists(self, path: str) -> bool:
        """Whether the image file exists (asked once per file: annotations share images)."""
        found = self._found.get(path)
        if found is None:
            found = self._found[path] = fs.isfile(path)
        return found
