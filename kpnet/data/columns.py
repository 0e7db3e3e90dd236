"""Record columns: what the pipeline and the TFRecord writer read of N records, as arrays,
the up-front checks of their image files, and their grouping by image file.

A :class:`~kpnet.data.records.RecordTable` (COCO json) is read as its arrays, other record
sequences record by record; image sizes come from the file headers (:mod:`kpnet.data.images`)
up to :data:`CHECK_IMAGES_LIMIT` files, beyond that from the records.

Example:
    >>> import numpy as np
    >>> from kpnet.data.records import InstanceRecord
    >>> from kpnet.spec import KeypointSpec
    >>> kp = np.array([[5, 5, 2]], np.float32)
    >>> recs = [InstanceRecord("a.jpg", (0, 0, 9, 9), kp),
    ...         InstanceRecord("a.jpg", (1, 1, 8, 8), kp)]
    >>> cols = record_arrays(recs, KeypointSpec(names=("p",)))
    >>> g = group(cols, np.arange(2), consecutive=True)
    >>> len(g), g.members.tolist()
    (1, [0, 1])
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import tensorflow as tf

from kpnet import fs
from kpnet.data import images
from kpnet.data.images import JPEG_MAGIC as _JPEG
from kpnet.data.images import MAX_PIXELS
from kpnet.data.images import PNG_MAGIC as _PNG
from kpnet.data.records import DataError, InstanceRecord, RecordTable
from kpnet.spec import KeypointSpec

log = logging.getLogger(__name__)

@dataclass
class Columns:
    """What the pipeline reads of N records, as arrays (row i = record i)."""

    keypoints: np.ndarray  # [N, K, 3] float32
    boxes: np.ndarray  # [N, 4] float32
    paths: list[str]  # [P] the distinct image paths
    path_index: np.ndarray  # [N] int64 into paths
    sizes: np.ndarray  # [N, 2] int image (H, W), -1 where unknown
    image_ids: np.ndarray  # [N] int64
    record_ids: np.ndarray  # [N] int64
    scores: np.ndarray  # [N] float64

    def __len__(self) -> int:
        return len(self.path_index)


def _kp_ok(kp: np.ndarray, k: int) -> bool:
    return kp.shape == (k, 3) and bool(np.isfinite(kp).all())


def _box_ok(box: Sequence[float]) -> bool:
    return len(box) == 4 and bool(np.isfinite(box).all()) and min(box[2:]) > 0


def _record_error(r: InstanceRecord, k: int) -> DataError:
    kp = np.asarray(r.keypoints, np.float32)
    if not _kp_ok(kp, k):
        return DataError(
            f"{r.describe()}: keypoints must be finite float [{k}, 3] for this spec, got "
            f"shape {kp.shape}; fix the source or the spec"
        )
    return DataError(f"{r.describe()}: box must be (x, y, w, h) with w, h > 0, got {r.box}")


def record_arrays(records: Sequence[InstanceRecord], spec: KeypointSpec) -> Columns:
    """The records' :class:`Columns`; DataError naming the first malformed record.

    A :class:`~kpnet.data.records.RecordTable` is read column by column (its records
    handed out so far row by row: they may have changed); any other sequence record by record.
    """
    k = spec.num_keypoints
    if isinstance(records, RecordTable):
        return table_arrays(records, k)
    n = len(records)
    kps = np.zeros((n, k, 3), np.float32)
    boxes = np.zeros((n, 4), np.float32)
    sizes = np.full((n, 2), -1, np.int64)
    index: dict[str, int] = {}
    path_index = np.zeros(n, np.int64)
    for i, r in enumerate(records):
        kp = np.asarray(r.keypoints, np.float32)
        if not _kp_ok(kp, k) or not _box_ok(r.box):
            raise _record_error(r, k)
        kps[i], boxes[i] = kp, r.box
        path_index[i] = index.setdefault(r.image_path, len(index))
        if r.image_size is not None:
            sizes[i] = r.image_size
    return Columns(
        kps, boxes, list(index), path_index, sizes,
        np.array([int(r.image_id) for r in records], np.int64).reshape(n),
        np.array([int(r.record_id) for r in records], np.int64).reshape(n),
        np.array([float(r.score) for r in records], np.float64).reshape(n),
    )  # fmt: skip


def table_arrays(t: RecordTable, k: int) -> Columns:
    """:func:`record_arrays` of a table: NumPy checks, then its handed-out records."""
    n = len(t)
    kps, boxes, image, sizes = t.keypoints, t.boxes, t.image, t.image_sizes
    image_ids, record_ids, scores = t.image_ids, t.record_ids, t.scores
    if kps.shape[1:] == (k, 3):
        ok = np.isfinite(kps).all((1, 2))
    else:
        kps, ok = np.zeros((n, k, 3), np.float32), np.zeros(n, bool)
    ok &= np.isfinite(boxes).all(1) & (boxes[:, 2] > 0) & (boxes[:, 3] > 0)
    paths = t.image_paths
    given = t.given()
    if given:
        kps, boxes, image, sizes = kps.copy(), boxes.copy(), image.copy(), sizes.copy()
        image_ids, record_ids, scores = image_ids.copy(), record_ids.copy(), scores.copy()
        paths = list(paths)
        where: dict[str, int] | None = None
        for i, r in given:
            kp = np.asarray(r.keypoints, np.float32)
            ok[i] = _kp_ok(kp, k) and _box_ok(r.box)
            if not ok[i]:
                continue
            kps[i], boxes[i] = kp, r.box
            if r.image_path != paths[image[i]]:
                if where is None:
                    where = {p: j for j, p in enumerate(paths)}
                image[i] = where.setdefault(r.image_path, len(paths))
                if image[i] == len(paths):
                    paths.append(r.image_path)
            sizes[i] = r.image_size if r.image_size is not None else (-1, -1)
            image_ids[i], record_ids[i], scores[i] = int(r.image_id), int(r.record_id), r.score
    if not ok.all():
        raise _record_error(t[int(np.argmin(ok))], k)
    used, inverse = np.unique(image, return_inverse=True)  # entries rows use, by path
    index: dict[str, int] = {}
    entry = np.array([index.setdefault(paths[j], len(index)) for j in used.tolist()], np.int64)
    return Columns(kps.astype(np.float32, copy=False), boxes.astype(np.float32), list(index),
                    entry[inverse.reshape(-1)], sizes, image_ids, record_ids, scores)  # fmt: skip


def _inspect(path: str, max_pixels: int = MAX_PIXELS) -> tuple[str | None, tuple[int, int], bool]:
    """(why the image file is unusable or None, (H, W), is JPEG); cheap: header + tail.

    An image whose header declares more than ``max_pixels`` is refused before any decode.
    """
    try:
        size = fs.size(path)
        with fs.open_file(path, "rb") as f:
            header = images.read_header(f)
            f.seek(0)
            head = f.read(8)
            f.seek(max(size - 12, 0))
            tail = f.read()
    except OSError as err:
        return f"cannot read the image file ({err.strerror or err})", (0, 0), False
    except tf.errors.OpError as err:  # a URL (tf.io.gfile)
        return f"cannot read the image file ({err.message.splitlines()[0]})", (0, 0), False
    if size == 0:
        return "the image file is empty", (0, 0), False
    fmt = header.format if header else _signature(head)
    if fmt not in ("jpeg", "png"):
        return "not a JPEG or PNG file (convert it to one of those)", (0, 0), False
    too_large = images.too_large(header, max_pixels) if header else None
    if too_large:
        return too_large, (0, 0), False
    ok_end = tail.endswith(b"\xff\xd9") if fmt == "jpeg" else b"IEND" in tail
    hw = header.hw if header else None
    if not ok_end or not hw:  # truncated, or trailing bytes: try it
        try:
            image = tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False)
        except (tf.errors.OpError, ValueError) as err:
            return f"the image is corrupt or truncated ({fs.reason(err)})", (0, 0), False
        hw = tuple(int(v) for v in image.shape[:2])
    return None, hw, fmt == "jpeg"


def _signature(head: bytes) -> str | None:
    """``jpeg`` or ``png`` by a file's first bytes (a header too damaged to give a size)."""
    return "jpeg" if head.startswith(_JPEG) else "png" if head.startswith(_PNG) else None


#: ``check_images=None`` opens every image up front only up to this many image files;
#: larger sets take image sizes from their records (the annotations) when all have one.
CHECK_IMAGES_LIMIT = 10_000


def check_files(
    cols: Columns, records: Sequence[InstanceRecord], on_error: str, check: bool | None = None,
    max_pixels: int = MAX_PIXELS,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:  # fmt: skip
    """(indices of records with a usable image, then per path of ``cols.paths``: (H, W)
    [P, 2], is JPEG [P], usable [P]); DataError naming the first record of a bad file.

    ``check`` False (None: more than :data:`CHECK_IMAGES_LIMIT` files) takes sizes from the
    records' ``image_size`` and JPEG / PNG from the file name, opening no file, when every
    record has a size and a ``.jpg`` / ``.jpeg`` / ``.png`` name (else it opens them all).
    Images over ``max_pixels`` (by their header, or that record size) are bad files too.
    """
    paths = cols.paths
    known = None
    if check is False or (check is None and len(paths) > CHECK_IMAGES_LIMIT):
        known = _known_sizes(cols)
    if known is not None:
        hw, jpeg = known
        over = np.flatnonzero(hw.astype(np.int64).prod(1) > max_pixels)
        bad = {int(j): images.too_large(hw[j], max_pixels) for j in over}
    else:
        order = sorted(range(len(paths)), key=paths.__getitem__)
        inspect = functools.partial(_inspect, max_pixels=max_pixels)
        with ThreadPoolExecutor(8) as pool:
            found = dict(zip(order, pool.map(inspect, [paths[j] for j in order]), strict=True))
        bad = {j: why for j, (why, _, _) in found.items() if why}
        hw = np.zeros((len(paths), 2), np.int32)
        jpeg = np.zeros(len(paths), bool)
        for j, (why, size, is_jpeg) in found.items():
            if not why:
                hw[j], jpeg[j] = size, is_jpeg
    keep, usable = _drop_bad(cols, records, bad, on_error)
    return keep, hw, jpeg, usable


def _drop_bad(
    cols: Columns, records: Sequence[InstanceRecord], bad: dict[int, str], on_error: str
) -> tuple[np.ndarray, np.ndarray]:
    """(indices of the records whose file is not in ``bad``, usable [P]); with
    ``on_error="raise"`` a bad file is a DataError naming its first record, else a warning
    names the first few bad files and counts the records skipped."""
    usable = np.ones(len(cols.paths), bool)
    usable[list(bad)] = False
    if bad and on_error == "raise":
        i = int(np.argmin(usable[cols.path_index]))
        first, why = records[i], bad[int(cols.path_index[i])]
        more = f" ({len(bad) - 1} more bad files)" if len(bad) > 1 else ""
        raise DataError(
            f"{first.describe()}: {why}: {first.image_path}{more}. "
            "Fix or remove the file, or skip it (on_error='skip'; in a recipe data.on_error: "
            "skip)"
        )
    keep = np.flatnonzero(usable[cols.path_index]).astype(np.int64)
    if bad:
        named = "; ".join(f"{cols.paths[j]}: {why}" for j, why in list(bad.items())[:MAX_NAMED])
        more = f"; and {len(bad) - MAX_NAMED} more" if len(bad) > MAX_NAMED else ""
        log.warning("skipping %d records of %d unusable image files: %s%s",
                    len(cols) - len(keep), len(bad), named, more)  # fmt: skip
    return keep, usable


#: How many bad image files a skip warning names.
MAX_NAMED = 5


def _known_sizes(cols: Columns) -> tuple[np.ndarray, np.ndarray] | None:
    """((H, W) [P, 2], is JPEG [P]) of ``cols.paths`` from the records alone (a path's last
    record), or None if a record lacks a size or a path a ``.jpg`` / ``.jpeg`` / ``.png`` name."""
    if len(cols) and (cols.sizes.min(1) <= 0).any():
        return None
    exts = [os.path.splitext(p)[1].lower() for p in cols.paths]
    if any(e not in (".jpg", ".jpeg", ".png") for e in exts):
        return None
    _, last = np.unique(cols.path_index[::-1], return_index=True)  # sorted = path order
    hw = cols.sizes[len(cols) - 1 - last].astype(np.int32).reshape(-1, 2)
    return hw, np.array([e != ".png" for e in exts], bool)


@dataclass
class Groups:
    """Record indices grouped by image file: group g is ``members[splits[g]:splits[g+1]]``,
    its image ``path_index[g]`` (into :attr:`Columns.paths`)."""

    path_index: np.ndarray  # [G] int64
    members: np.ndarray  # [n] int64
    splits: np.ndarray  # [G + 1] int64

    def __len__(self) -> int:
        return len(self.path_index)

    @property
    def counts(self) -> np.ndarray:
        return np.diff(self.splits)

    def shard(self, index: int, num: int) -> Groups:
        """Groups ``index::num``."""
        keep = np.zeros(len(self), bool)
        keep[index::num] = True
        counts = self.counts[keep]
        return Groups(self.path_index[keep], self.members[np.repeat(keep, self.counts)],
                       np.concatenate([[0], np.cumsum(counts)]).astype(np.int64))  # fmt: skip


def group(cols: Columns, keep: np.ndarray, consecutive: bool) -> Groups:
    """The ``keep`` records grouped by image file: at evaluation (``consecutive``) each run
    of records of one file is a group, in record order; else all of a file's records, the
    groups in order of their first record."""
    path = cols.path_index[keep]
    if consecutive:
        start = np.flatnonzero(np.r_[True, path[1:] != path[:-1]]) if len(path) else path
        return Groups(path[start], keep, np.r_[start, len(path)].astype(np.int64))
    uniq, first, inverse = np.unique(path, return_index=True, return_inverse=True)
    by_first = np.argsort(first)
    rank = np.empty(len(uniq), np.int64)
    rank[by_first] = np.arange(len(uniq))
    group = rank[inverse.reshape(-1)]
    order = np.argsort(group, kind="stable")
    counts = np.bincount(group, minlength=len(uniq))
    return Groups(uniq[by_first], keep[order],
                   np.concatenate([[0], np.cumsum(counts)]).astype(np.int64))  # fmt: skip


def usable_records(
    records: Sequence[InstanceRecord], spec: KeypointSpec, on_error: str,
    max_pixels: int = MAX_PIXELS,
) -> Sequence[InstanceRecord]:
    """The records whose image file the pipeline can read (:func:`check_files`): the others
    are a DataError (``on_error="raise"``) or dropped with one warning (``"skip"``). A
    :class:`RecordTable` stays a table.

    Example:
        >>> import numpy as np
        >>> from kpnet.data.records import InstanceRecord
        >>> from kpnet.spec import KeypointSpec
        >>> kp = np.array([[5, 5, 2]], np.float32)
        >>> gone = [InstanceRecord("no/such.jpg", (0, 0, 9, 9), kp)]
        >>> usable_records(gone, KeypointSpec(names=("p",)), "skip")
        []
    """
    if not len(records):
        return records
    keep, *_ = check_files(record_arrays(records, spec), records, on_error, None, max_pixels)
    if len(keep) == len(records):
        return records
    if isinstance(records, RecordTable):
        return records.take(keep)
    return [records[int(i)] for i in keep]

