"""COCO keypoint json (and detection results) -> instance records.

Training/validation: one record per ground-truth instance, skipping crowd instances and those
without labelled keypoints (as tf-cpn does). Test mode (``boxes_file``): one record per
detection box of the keypoint category, keypoints all unlabelled. Keypoints are taken as they
are in the json (COCO pixel coordinates; kpnet puts pixel centres at integers).

Bad records (missing image file, a ``file_name`` that leaves the image folder, wrong keypoint
count, NaN coordinates, a visibility other than 0 / 1 / 2, zero-area box, a detection for an
image the json does not list) raise :class:`DataError` naming the file and the annotation id;
with ``on_error="skip"`` they are skipped and counted in ``records.report`` (a
:class:`~kpnet.data.records.LoadReport`). A json that lists one image id twice, or a category
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
import gc
import io
import itertools
import json
import logging
import operator
import os
import posixpath
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from kpnet import fs
from kpnet.data.check import outside_root
from kpnet.data.records import DataError, InstanceRecord, LoadReport, RecordTable, check_on_error
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
) -> tuple[KeypointSpec, RecordTable]:
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
        (spec, records): a :class:`~kpnet.data.records.RecordTable` (a sequence of
        :class:`InstanceRecord`, stored as arrays), ``records.report`` its kept and skipped
        counts. The json is parsed once, plain annotations straight into arrays, and every
        check runs per array or per image (one listing per image folder), so a million
        instances load in seconds.
    """
    check_on_error(on_error)
    coco = _load_coco(annotation_file)
    cat = _pick_category(coco.data.get("categories") or [], category, annotation_file)
    spec = spec if spec is not None else spec_from_category(cat, annotation_file)
    _warn_name_mismatch(cat, spec, annotation_file)
    report = LoadReport(source=str(annotation_file))
    image_dir = ImageDir(image_dir, allow_outside_root)
    if boxes_file is None:
        records = _gt_records(coco, cat["id"], spec, image_dir, report, on_error)
    else:
        dets = read_json(boxes_file)
        if not isinstance(dets, list):
            raise DataError(f"{boxes_file}: expected a list of COCO detection results")
        report.source = str(boxes_file)
        records = _detection_records(
            coco.imgs, dets, cat["id"], spec, image_dir, score_threshold, report, on_error,
            boxes_file,
        )  # fmt: skip
    records.report = report
    report.kept = len(records)
    log.info(report.summary())
    return spec, records


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
def _read_text(path: PathLike) -> str:
    """The text of a json file (any of json's encodings); DataError if it is missing."""
    if not fs.isfile(path):
        raise DataError(f"{path}: file not found")
    try:
        raw = fs.read_bytes(path)
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    return raw.decode(json.detect_encoding(raw), "surrogatepass")  # as json.loads(bytes)


def _parse(text: str, path: PathLike, object_hook: Any = None) -> Any:
    """``json.loads`` with the cyclic garbage collector paused: parsed json holds no cycles,
    and collections while it grows cost ~30 % of the parse of a large file."""
    paused = gc.isenabled()
    gc.disable()
    try:
        return json.loads(text, object_hook=object_hook)
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: not valid json ({err})") from None
    finally:
        if paused:
            gc.enable()


def read_json(path: PathLike) -> Any:
    """A JSON file (local or a URL, any of JSON's encodings) parsed; one DataError line
    naming the file when it is missing or not JSON. kpnet's one JSON file reader.

    >>> read_json("no/such.json")
    Traceback (most recent call last):
    kpnet.data.records.DataError: no/such.json: file not found
    """
    return _parse(_read_text(path), path)


class _Coco:
    """A parsed COCO json: its top-level dict (annotations replaced by :data:`_ANN`), the
    images by id, and every annotation as :class:`_Annotations` rows."""

    def __init__(self, data: dict, imgs: dict, rows: _Annotations):
        self.data, self.imgs, self.rows = data, imgs, rows


def _load_coco(annotation_file: PathLike) -> _Coco:
    """Parse once, collecting annotations as compact rows; files the fast path cannot take
    whole (an annotation-like dict outside ``annotations``, a malformed entry) are parsed
    again as plain json and indexed by pycocotools, as before."""
    text = _read_text(annotation_file)
    rows = _Annotations()
    data = _parse(text, annotation_file, rows.hook)
    rows.finish()
    anns = data.get("annotations", []) if isinstance(data, dict) else None
    if not (type(anns) is list and len(anns) == rows.n and anns.count(_ANN) == rows.n):
        data = _parse(text, annotation_file)  # rare: keep pycocotools' exact behaviour
        rows = None
    del text
    if not isinstance(data, dict) or "images" not in data:
        raise DataError(f"{annotation_file}: not a COCO json (no 'images' list)")
    data.setdefault("annotations", [])
    imgs = _check_images(data["images"], annotation_file)
    if rows is None:
        _create_index(data, annotation_file)
        rows = _Annotations.of_dicts(data["annotations"])
    else:
        _check_index(data, rows, annotation_file)
    return _Coco(data, imgs, rows)


def _create_index(data: dict, source: PathLike) -> None:
    """pycocotools' index of ``data``, for the errors it raises on a malformed file."""
    from pycocotools.coco import COCO

    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
        try:
            coco.createIndex()
        except (KeyError, TypeError) as err:
            raise DataError(f"{source}: malformed COCO json (missing key {err})") from None


def _check_index(data: dict, rows: _Annotations, source: PathLike) -> None:
    """The errors pycocotools' ``createIndex`` would raise (it indexes annotations by
    ``image_id`` and ``id``, categories by ``id``, then annotations by ``category_id``);
    compact rows have int ids, so only kept dicts and category ids need a look."""
    try:
        for ann in rows.slow.values():
            hash(ann["image_id"]), hash(ann["id"])
        if "categories" in data:
            for cat in data["categories"]:
                hash(cat["id"])
            if not _all_type(rows.cats, int):
                for c in rows.cats:
                    if c is _MISSING:
                        raise KeyError("category_id")
                    hash(c)
    except (KeyError, TypeError) as err:
        raise DataError(f"{source}: malformed COCO json (missing key {err})") from None


def _check_images(images: Any, source: PathLike) -> dict[Any, dict]:
    """{id: image entry}; every entry has an id and a file_name, and no id is listed twice."""
    if not isinstance(images, list):
        raise DataError(f"{source}: 'images' must be a list of image entries")
    seen: dict[Any, dict] = {}
    for i, image in enumerate(images):
        if not isinstance(image, dict) or "id" not in image or "file_name" not in image:
            raise DataError(f"{source}: images[{i}] needs an 'id' and a 'file_name'")
        first = seen.get(image["id"])
        if first is not None:
            raise DataError(
                f"{source}: image id {image['id']} is listed twice ({str(first['file_name'])!r} "
                f"and {image['file_name']!r}); give every image its own id"
            )
        seen[image["id"]] = image
    return seen


class _Sentinel:
    def __init__(self, name: str):
        self.name = name

    def __repr__(self) -> str:
        return self.name


_FIELDS = operator.itemgetter("id", "image_id", "keypoints", "bbox", "category_id", "iscrowd")
_ANN = _Sentinel("<annotation row>")  # what the parse leaves in the annotations list
_MISSING = _Sentinel("<no category_id>")


class _Annotations:
    """The annotations of a COCO json, collected while it is parsed (a ``json.loads``
    object hook takes every dict with an ``image_id``): a plain one (int ``id`` and
    ``image_id``, a ``bbox`` of 4 finite numbers with w, h > 0, a flat ``keypoints`` list of
    finite numbers, visibilities 0 / 1 / 2) becomes a row of a few arrays; any other is kept
    as its dict (``slow``) and checked one by one. A million annotations then take tens of
    MB, not the ~1 GB their dicts would, and are checked with NumPy.

    After :meth:`finish`: ``n`` rows in file order, ``fast`` [n], ``ids``, ``image_ids`` [n]
    int64, ``cats`` (the raw ``category_id`` values, :data:`_MISSING` if absent), ``crowd``
    [n], ``kp_len`` [n] (number of keypoint values), ``boxes`` [n, 4], :meth:`keypoints`.
    """

    BATCH = 8192  # dicts held at once while parsing

    def __init__(self) -> None:
        self.n = 0
        self.slow: dict[int, dict] = {}
        self.cats: list[Any] = []
        self._pending: list[dict] = []
        self._parts: list[dict[str, Any]] = []
        self._kp: dict[int, list[tuple[np.ndarray, np.ndarray]]] = {}

    @classmethod
    def of_dicts(cls, anns: list) -> _Annotations:
        """Rows of annotation dicts already parsed, all kept as dicts (checked one by one)."""
        rows = cls()
        rows.n = len(anns)
        rows.slow = dict(enumerate(anns))
        rows.cats = [_MISSING] * rows.n
        rows.finish()
        return rows

    def hook(self, obj: dict) -> Any:
        if "image_id" not in obj:
            return obj
        self._pending.append(obj)
        if len(self._pending) >= self.BATCH:
            self._flush()
        return _ANN

    def _flush(self) -> None:
        dicts, self._pending = self._pending, []
        b, start = len(dicts), self.n
        self.n += b
        if not b:
            return
        try:  # every key present (the usual case): in C
            fields = list(map(_FIELDS, dicts))
        except KeyError:
            fields = [(d.get("id"), d["image_id"], d.get("keypoints"), d.get("bbox"),
                       d.get("category_id", _MISSING), d.get("iscrowd", 0))
                      for d in dicts]  # fmt: skip
        ids, image_ids, kps, boxes, cats, crowd = zip(*fields, strict=True)
        del fields
        self.cats += cats
        crowd = np.fromiter(map(bool, crowd), bool, b) if any(crowd) else np.zeros(b, bool)
        if (_all_type(ids, int) and _all_type(image_ids, int) and _all_type(kps, list)
                and _all_type(boxes, list) and set(map(len, boxes)) == {4}):  # fmt: skip
            fast = np.ones(b, bool)
        else:
            fast = np.fromiter(
                (type(i) is int and type(j) is int and type(k) is list and type(x) is list
                 and len(x) == 4 for i, j, k, x in zip(ids, image_ids, kps, boxes, strict=True)),
                bool, b,
            )  # fmt: skip
        ids_a, ok = _int64(ids, fast)
        image_ids_a, ok2 = _int64(image_ids, fast)
        fast &= ok & ok2
        box_a = np.zeros((b, 4), np.float64)
        rows = np.flatnonzero(fast)
        vals, ok = _floats(_pick(boxes, rows), 4, np.float64)
        ok &= np.isfinite(vals).all(1) & (vals[:, 2] > 0) & (vals[:, 3] > 0)
        box_a[rows[ok]] = vals[ok]
        fast[rows[~ok]] = False
        kp_len = np.full(b, -1, np.int64)
        kp_len[rows] = np.fromiter(map(len, _pick(kps, rows)), np.int64, len(rows))
        kp_len[~fast] = -1
        for length in set(kp_len[fast].tolist()):
            rows = np.flatnonzero(kp_len == length)
            vals, ok = _floats(_pick(kps, rows), length, np.float32)
            if length % 3 == 0:  # NaN or an odd visibility: checked one by one
                vis = vals[:, 2::3]
                ok &= np.isfinite(vals).all(1) & ((vis == 0) | (vis == 1) | (vis == 2)).all(1)
            fast[rows[~ok]] = False
            self._kp.setdefault(length, []).append((start + rows[ok], vals[ok]))
        kp_len[~fast] = -1
        for i in np.flatnonzero(~fast).tolist():
            self.slow[start + i] = dicts[i]
        self._parts.append({"fast": fast, "ids": ids_a, "image_ids": image_ids_a,
                            "crowd": crowd, "kp_len": kp_len, "boxes": box_a})  # fmt: skip

    def finish(self) -> None:
        """Flush the last batch and join the batches' arrays."""
        self._flush()
        n, parts = self.n, self._parts
        if parts:
            for key in parts[0]:
                setattr(self, key, np.concatenate([p[key] for p in parts]))
        else:  # no compact rows (or none at all)
            self.fast, self.crowd = np.zeros(n, bool), np.zeros(n, bool)
            self.ids, self.image_ids = np.zeros(n, np.int64), np.zeros(n, np.int64)
            self.kp_len, self.boxes = np.full(n, -1, np.int64), np.zeros((n, 4))
        self._parts = []

    def keypoints(self, num_values: int) -> np.ndarray:
        """[n, num_values / 3, 3] float32 keypoints of the compact rows with that many values
        (zeros elsewhere)."""
        out = np.zeros((self.n, num_values // 3, 3), np.float32)
        for rows, vals in self._kp.get(num_values, ()):
            out[rows] = vals.reshape(len(rows), num_values // 3, 3)  # rows may be empty
        return out


def _all_type(values: Sequence[Any], kind: type) -> bool:
    return set(map(type, values)) == {kind}


def _pick(values: Sequence[Any], rows: np.ndarray) -> Sequence[Any]:
    return values if len(rows) == len(values) else [values[i] for i in rows.tolist()]


def _int64(values: Sequence[Any], fast: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``values`` (ints where ``fast``) as int64, and which fit (others: 0, False)."""
    if fast.all():
        values_fast = values
    else:
        values_fast = [v if f else 0 for v, f in zip(values, fast, strict=True)]
    try:
        return np.fromiter(values_fast, np.int64, len(values)), np.ones(len(values), bool)
    except OverflowError:
        pairs = zip(values, fast, strict=True)
        ok = np.array([bool(f) and -(2**63) <= v < 2**63 for v, f in pairs], bool)
        return np.array([v if f else 0 for v, f in zip(values, ok, strict=True)], np.int64), ok


def _floats(values: Sequence[Any], width: int, dtype: Any) -> tuple[np.ndarray, np.ndarray]:
    """Lists of ``width`` numbers as a [m, width] array, and which rows converted (a row that
    numpy cannot convert, or of another shape, is zeros and False)."""
    m = len(values)
    try:
        flat = np.fromiter(itertools.chain.from_iterable(values), dtype, m * width)
        return flat.reshape(m, width), np.ones(m, bool)
    except (ValueError, TypeError, OverflowError):
        pass
    out, ok = np.zeros((m, width), dtype), np.zeros(m, bool)
    for i, v in enumerate(values):
        try:
            row = np.asarray(v, dtype)
        except (ValueError, TypeError, OverflowError):
            continue
        if row.shape == (width,):
            out[i], ok[i] = row, True
    return out, ok


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
# Why a compact row is not kept, in the order the checks run (as for one annotation).
_OTHER, _CROWD, _COUNT, _NO_KP, _UNKNOWN, _OUTSIDE, _MISSING_FILE = range(1, 8)
_FILTERED = {_OTHER: "other_category", _CROWD: "crowd", _NO_KP: "no_keypoints"}


def _gt_records(
    coco: _Coco, cat_id: Any, spec: KeypointSpec, image_dir: ImageDir, report: LoadReport,
    on_error: str,
) -> RecordTable:  # fmt: skip
    """One record per kept annotation, in file order: compact rows checked with NumPy
    (each image looked up and probed once, a folder of many listed once), kept dicts one by
    one; the first bad one in file order raises (or all are counted)."""
    a, images = coco.rows, coco.data["images"]
    n3 = 3 * spec.num_keypoints
    reason = np.zeros(a.n, np.int8)

    def mark(mask: np.ndarray, code: int) -> None:
        reason[a.fast & (reason == 0) & mask] = code

    if type(cat_id) is int and _all_type(a.cats, int):
        mark(np.fromiter(a.cats, np.int64, a.n) != cat_id, _OTHER)
    elif a.n:
        mark(np.fromiter((c is not _MISSING and c != cat_id for c in a.cats), bool, a.n), _OTHER)
    mark(a.crowd, _CROWD)
    mark(a.kp_len != n3, _COUNT)
    kps = a.keypoints(n3)
    mark(~(kps[:, :, 2] > 0).any(1), _NO_KP)
    pos = _image_positions(images, a.image_ids)  # index into images, -1: not listed
    mark(pos < 0, _UNKNOWN)
    paths: dict[int, str] = {}
    used = _used(pos[a.fast & (reason == 0)], len(images))
    names = [images[k]["file_name"] for k in used.tolist()]
    found, outside = image_dir.paths(names)
    paths.update(zip(used.tolist(), found, strict=True))
    flag = np.zeros(len(images) + 1, bool)  # + 1: pos -1 (masked anyway)
    flag[used] = outside
    mark(flag[pos], _OUTSIDE)
    used = _used(pos[a.fast & (reason == 0)], len(images))
    flag[:] = False
    flag[used] = ~image_dir.exists_many([paths[k] for k in used.tolist()])
    mark(flag[pos], _MISSING_FILE)

    for code, name in _FILTERED.items():
        count = int((reason == code).sum())
        if count:
            report.skipped[name] += count
    prefix = f"{report.source} annotation id "
    slow: dict[int, InstanceRecord] = {}
    bad = np.flatnonzero(np.isin(reason, (_COUNT, _UNKNOWN, _OUTSIDE, _MISSING_FILE)))
    events = sorted([*bad.tolist(), *a.slow])  # file order: the first bad one raises
    for row in events:
        ann = a.slow.get(row)
        if ann is not None:
            record = _gt_one(coco.imgs, ann, cat_id, spec, image_dir, report, on_error)
            if record is not None:
                slow[row] = record
            continue
        where, code = f"{prefix}{a.ids[row]}", reason[row]
        if code == _COUNT:
            report.bad("keypoint_count", _count_message(where, int(a.kp_len[row]), spec),
                       on_error)  # fmt: skip
        elif code == _UNKNOWN:
            report.bad("unknown_image", f"{where}: image id {a.image_ids[row]} not listed",
                       on_error)  # fmt: skip
        elif code == _OUTSIDE:
            image = images[pos[row]]
            report.bad("outside_root", _outside_message(where, image, image_dir), on_error)
        else:
            path = paths[int(pos[row])]
            report.bad("missing_image", f"{where} (image {path}): image file not found",
                       on_error)  # fmt: skip

    keep = np.flatnonzero(a.fast & (reason == 0))
    entries = _used(pos[keep], len(images))
    remap = np.zeros(len(images) + 1, np.int64)
    remap[entries] = np.arange(len(entries))
    entry = remap[pos[keep]]
    chosen = [images[k] for k in entries.tolist()]
    sizes, image_ids = _image_fields(chosen, report.source)
    fast = RecordTable(
        [paths[k] for k in entries.tolist()], entry, a.boxes[keep], kps[keep],
        image_ids[entry], a.ids[keep], image_sizes=sizes[entry], source_prefix=prefix,
    )  # fmt: skip
    if not slow:
        return fast
    rest = RecordTable.from_records(list(slow.values()), prefix, spec.num_keypoints)
    return _merge(fast, keep, rest, np.array(list(slow), np.int64))


def _used(pos: np.ndarray, n: int) -> np.ndarray:
    """The distinct values of ``pos`` (in 0..n-1), ascending."""
    seen = np.zeros(n, bool)
    seen[pos] = True
    return np.flatnonzero(seen)


def _image_fields(images: list[dict], source: str) -> tuple[np.ndarray, np.ndarray]:
    """([G, 2] int32 (height, width), -1 without a height; [G] int64 ids) of image entries."""
    hs = [image.get("height") for image in images]
    ws = [image.get("width") for image in images]
    ids = [image["id"] for image in images]
    if _all_type(hs, int) and _all_type(ws, int) and _all_type(ids, int):
        try:
            sizes = np.stack([np.array(hs, np.int64), np.array(ws, np.int64)], 1)
            return sizes.astype(np.int32), np.array(ids, np.int64)
        except OverflowError:
            pass
    sizes_l = [(int(im["height"]), int(im["width"])) if "height" in im else (-1, -1)
               for im in images]  # fmt: skip
    ids_l = [int(i) for i in ids]
    big = [i for i in ids_l if not -(2**63) <= i < 2**63]
    if big:
        raise DataError(f"{source}: image id {big[0]} does not fit in 64 bits; renumber it")
    return np.array(sizes_l, np.int64).reshape(-1, 2).astype(np.int32), np.array(ids_l, np.int64)


def _merge(a: RecordTable, rows_a: np.ndarray, b: RecordTable, rows_b: np.ndarray) -> RecordTable:
    """The records of two tables in the order of their ``rows`` (file positions)."""
    order = np.argsort(np.concatenate([rows_a, rows_b]), kind="stable")

    def cat(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        return np.concatenate([x, y])[order]

    where = np.empty(len(order), np.int64)
    where[order] = np.arange(len(order))
    sources = {int(where[len(a) + i]): s for i, s in b.sources.items()}
    return RecordTable(
        a.image_paths + b.image_paths, cat(a.image, b.image + len(a.image_paths)),
        cat(a.boxes, b.boxes), cat(a.keypoints, b.keypoints), cat(a.image_ids, b.image_ids),
        cat(a.record_ids, b.record_ids), cat(a.scores, b.scores),
        cat(a.image_sizes, b.image_sizes), a.source_prefix, sources,
    )  # fmt: skip


def _image_positions(images: list[dict], image_ids: np.ndarray) -> np.ndarray:
    """Index in ``images`` of each image id (-1 where none has it), as a dict lookup would."""
    ids = [image["id"] for image in images]
    if ids and all(type(i) is int for i in ids):
        try:
            keys = np.array(ids, np.int64)
        except OverflowError:
            keys = None
        if keys is not None:
            order = np.argsort(keys, kind="stable")
            at = np.searchsorted(keys[order], image_ids).clip(0, len(ids) - 1)
            found = keys[order][at] == image_ids
            return np.where(found, order[at], -1)
    index = {i: k for k, i in enumerate(ids)}
    return np.fromiter((index.get(i, -1) for i in image_ids.tolist()), np.int64,
                       len(image_ids))  # fmt: skip


def _count_message(where: str, size: int, spec: KeypointSpec) -> str:
    return (f"{where}: {size} keypoint values, spec wants {3 * spec.num_keypoints} "
            f"({spec.num_keypoints} keypoints x 3)")  # fmt: skip


def _outside_message(source: str, image: dict, image_dir: ImageDir) -> str:
    return (f"{source}: file_name {image['file_name']!r} is outside the image folder "
            f"{image_dir.root}; fix the file_name, or set data.coco.allow_outside_root: true "
            "to read it")  # fmt: skip


def _gt_one(
    imgs: dict, ann: dict, cat_id: Any, spec: KeypointSpec, image_dir: ImageDir,
    report: LoadReport, on_error: str,
) -> InstanceRecord | None:  # fmt: skip
    """The record of one annotation dict, or None (skipped, counted in ``report``)."""
    if ann.get("category_id", cat_id) != cat_id:
        report.skip("other_category")
        return None
    if ann.get("iscrowd", 0):
        report.skip("crowd")
        return None
    where = f"{report.source} annotation id {ann.get('id')}"
    kp = np.asarray(ann.get("keypoints") or [], np.float32)
    if kp.size != 3 * spec.num_keypoints:
        report.bad("keypoint_count", _count_message(where, kp.size, spec), on_error)
        return None
    kp = kp.reshape(spec.num_keypoints, 3)
    if not np.isfinite(kp).all():
        report.bad("nan", f"{where}: {_not_finite(kp)} keypoint coordinates", on_error)
        return None
    odd = sorted({float(v) for v in kp[:, 2]} - {0.0, 1.0, 2.0})
    if odd:
        report.bad("visibility", f"{where}: visibility {', '.join(f'{v:g}' for v in odd)} "
                   "(COCO uses 0 unlabelled, 1 occluded, 2 visible)", on_error)  # fmt: skip
        return None
    if not (kp[:, 2] > 0).any():
        report.skip("no_keypoints")
        return None
    image = imgs.get(ann.get("image_id"))
    if image is None:
        report.bad("unknown_image", f"{where}: image id {ann.get('image_id')} not listed", on_error)
        return None
    return _checked_record(image, image_dir, ann.get("bbox"), kp, ann.get("id"), 1.0, where,
                           report, on_error)  # fmt: skip


def _detection_records(
    imgs: dict, dets: list, cat_id: Any, spec: KeypointSpec, image_dir: ImageDir,
    threshold: float, report: LoadReport, on_error: str, boxes_file: PathLike,
) -> RecordTable:  # fmt: skip
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
        image = imgs.get(det["image_id"])
        if image is None:
            report.bad("unknown_image", f"{where}: image id {det['image_id']} not in the "
                       "annotation file", on_error)  # fmt: skip
            continue
        kp = np.zeros((spec.num_keypoints, 3), np.float32)
        record = _checked_record(image, image_dir, det["bbox"], kp, i, score, where, report,
                                 on_error)  # fmt: skip
        if record is not None:
            records.append(record)
    return RecordTable.from_records(records, f"{boxes_file} detection #",
                                    num_keypoints=spec.num_keypoints)  # fmt: skip


def _checked_record(
    image: dict, image_dir: ImageDir, bbox, kp: np.ndarray, record_id, score: float, where: str,
    report: LoadReport, on_error: str,
) -> InstanceRecord | None:  # fmt: skip
    path, outside = image_dir.path(image["file_name"])
    source, where = where, f"{where} (image {path})"
    if outside:  # checked first: such a path is never opened
        report.bad("outside_root", _outside_message(source, image, image_dir), on_error)
        return None
    box = np.asarray(bbox if bbox is not None else [np.nan] * 4, np.float64).reshape(-1)
    if box.size != 4 or not np.isfinite(box).all():
        report.bad("nan", f"{where}: bbox {bbox} is missing or not 4 finite numbers", on_error)
        return None
    if box[2] <= 0 or box[3] <= 0:
        report.bad("zero_area", f"{where}: {_empty_box(box)}", on_error)
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


#: A folder holding at least this many of the images a json names is listed, not probed.
LIST_FOLDER_FILES = 256


def _plain_name(name: str) -> bool:
    """A relative ``file_name`` that pathlib joins unchanged (so inside the folder)."""
    return not (name[0] == "/" or name[-1] == "/" or "//" in name or "/./" in f"/{name}/"
                or "/../" in f"/{name}/")  # fmt: skip


def _files_in(folder: str) -> set[str]:
    """Names of the regular files (or links to them) in a local folder; empty if unreadable."""
    try:
        with os.scandir(folder) as entries:
            return {e.name for e in entries if e.is_file()}
    except OSError:
        return set()


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
        self._listed: dict[str, set[str]] = {}  # local folder -> its files (exists_many)

    def path(self, file_name: Any) -> tuple[str, bool]:
        """(the image's path, True when it is outside the folder and that is not allowed)."""
        if isinstance(self.root, str):
            scheme, rest = self.root.split("://", 1)
            path = f"{scheme}://{posixpath.normpath(posixpath.join(rest, str(file_name)))}"
        else:
            path = str(self.root / str(file_name))
        return path, not self.allow_outside and outside_root(self.root, path)

    def paths(self, file_names: Sequence[Any]) -> tuple[list[str], np.ndarray]:
        """:meth:`path` of many names: (paths, outside [n] bool). A plain relative name (no
        ``.`` / ``..`` part, no doubled or end slash) is joined as a string: the same path,
        inside the folder."""
        if isinstance(self.root, str) or os.sep != "/":
            done = [self.path(name) for name in file_names]
            return [p for p, _ in done], np.array([o for _, o in done], bool)
        root = str(self.root)
        prefix = "" if root == "." else root if root.endswith("/") else root + "/"
        if (_all_type(file_names, str) and "/" not in "".join(file_names)
                and not {"", ".", ".."} & set(file_names)):  # fmt: skip
            return [prefix + name for name in file_names], np.zeros(len(file_names), bool)
        paths, outside = [], np.zeros(len(file_names), bool)
        for i, name in enumerate(file_names):
            if type(name) is str and name and _plain_name(name):
                paths.append(prefix + name)
            else:
                path, outside[i] = self.path(name)
                paths.append(path)
        return paths, outside

    def exists(self, path: str) -> bool:
        """Whether the image file exists (asked once per file: annotations share images)."""
        found = self._found.get(path)
        if found is None:
            folder, slash, name = path.rpartition("/")
            files = self._listed.get(folder or slash or ".")
            if files is not None and name in files:
                return True
            found = self._found[path] = fs.isfile(path)
        return found

    def exists_many(self, paths: Sequence[str]) -> np.ndarray:
        """:meth:`exists` of many paths [n] bool: a local folder holding at least
        :data:`LIST_FOLDER_FILES` of them is listed once instead of asked per file (a name
        the listing lacks is still asked, so the answer is :func:`os.path.isfile`'s)."""
        if isinstance(self.root, str) or os.sep != "/":
            return np.fromiter(map(self.exists, paths), bool, len(paths))
        parts = [p.rpartition("/") for p in paths]
        folders = Counter(f or s or "." for f, s, _ in parts)
        for folder, count in folders.items():
            if count >= LIST_FOLDER_FILES and folder not in self._listed:
                self._listed[folder] = _files_in(folder)
        if len(folders) == 1 and next(iter(folders)) in self._listed:  # one listed folder
            names = [name for _, _, name in parts]
            unlisted = set(names).difference(self._listed[next(iter(folders))])
            found = np.ones(len(paths), bool)
            if unlisted:  # not in the listing: asked (a folder, a missing file, ...)
                for i, name in enumerate(names):
                    if name in unlisted:
                        found[i] = self.exists(paths[i])
            return found
        return np.fromiter(map(self.exists, paths), bool, len(paths))


def _not_finite(values: np.ndarray) -> str:
    """What is wrong with values that are not all finite: ``NaN``, ``infinite`` or both.

    >>> _not_finite(np.array([1.0, np.inf])), _not_finite(np.array([np.nan, -np.inf]))
    ('infinite', 'NaN and infinite')
    """
    kinds = [name for name, bad in (("NaN", np.isnan(values).any()),
                                    ("infinite", np.isinf(values).any())) if bad]  # fmt: skip
    return " and ".join(kinds)


def _empty_box(box: np.ndarray) -> str:
    """Why a bbox with w <= 0 or h <= 0 is refused, in its own words.

    >>> _empty_box(np.array([5.0, 5.0, -3.0, 20.0]))
    'bbox [5.0, 5.0, -3.0, 20.0] has a negative width (-3): w and h must be > 0'
    >>> _empty_box(np.array([5.0, 5.0, 10.0, 0.0]))
    'zero-area bbox [5.0, 5.0, 10.0, 0.0] (height 0): w and h must be > 0'
    """
    (w, h), shown = box[2:4], box.tolist()
    negative = [f"{name} ({v:g})" for name, v in (("width", w), ("height", h)) if v < 0]
    if negative:
        return f"bbox {shown} has a negative {' and '.join(negative)}: w and h must be > 0"
    zero = " and ".join(name for name, v in (("width", w), ("height", h)) if v == 0)
    return f"zero-area bbox {shown} ({zero} 0): w and h must be > 0"
