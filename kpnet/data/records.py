"""Instance records: the one format every data source produces and the pipeline consumes.

A source returns a sequence of :class:`InstanceRecord`: a list, or (COCO json) a
:class:`RecordTable`, which holds the same fields as a few arrays (one row per instance) and
makes each record when it is asked for, so a million instances cost a few arrays rather
than a million Python objects, and the pipeline reads the arrays directly.

Example:
    >>> import numpy as np
    >>> r = InstanceRecord("img.jpg", box=(10, 20, 100, 200),
    ...                    keypoints=np.zeros((2, 3), np.float32), image_id=1, record_id=7)
    >>> r.num_labelled
    0
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

#: How many example messages a report keeps per reason.
MAX_EXAMPLES = 5


class DataError(ValueError):
    """Bad input data; the message names the file and the record."""


@dataclass
class InstanceRecord:
    """One object instance in one image.

    Attributes:
        image_path: path of the image file.
        box: (x, y, w, h) in image pixels (COCO convention).
        keypoints: float32 [K, 3] with (x, y, v) in image pixels, pixel centres at integer
            coordinates; v = 0 unlabelled, 1 labelled but occluded, 2 visible (COCO).
        image_id: id of the image (COCO image id, or a running index).
        record_id: id of this instance (COCO annotation id, or a running index).
        score: detection score (1.0 for ground-truth boxes).
        image_size: (height, width) when known, else None.
        source: where the record came from (file:line, json annotation id, ...), for errors.
    """

    image_path: str
    box: tuple[float, float, float, float]
    keypoints: np.ndarray
    image_id: int = 0
    record_id: int = 0
    score: float = 1.0
    image_size: tuple[int, int] | None = None
    source: str = field(default="")

    @property
    def num_labelled(self) -> int:
        return int((self.keypoints[:, 2] > 0).sum())

    def describe(self) -> str:
        """Short human-readable identity used in error messages."""
        where = f" ({self.source})" if self.source else ""
        return f"record {self.record_id} of image {self.image_path}{where}"


class RecordTable(Sequence[InstanceRecord]):
    """Instance records as columns: a read-mostly sequence of :class:`InstanceRecord`.

    Row ``i`` is made into an :class:`InstanceRecord` when first indexed (or iterated) and
    kept, so changes to a record handed out are seen by every later reader, as with a
    list; :meth:`given` lists those records (readers of the columns apply them). Slices
    are lists; :meth:`take` is a sub-table.

    Args:
        image_paths: [G] image paths; ``image`` [N] indexes them (rows may share one).
        image: [N] int, each row's entry in ``image_paths``.
        boxes: [N, 4] float64 (x, y, w, h); keypoints: [N, K, 3] float32.
        image_ids, record_ids: [N] int64; scores: [N] float64 (default 1.0).
        image_sizes: [N, 2] int (H, W), -1 where unknown (default unknown).
        source_prefix: a row's ``source`` is ``source_prefix + str(record_id)``, unless
            ``sources`` ({row: source}) says otherwise.
        report: the loader's :class:`LoadReport` (``kept`` is set).

    Example:
        >>> t = RecordTable(["a.jpg"], np.zeros(2, int), np.tile([0., 0, 8, 8], (2, 1)),
        ...                 np.zeros((2, 1, 3), np.float32), record_ids=np.array([5, 6]),
        ...                 source_prefix="ann.json annotation id ")
        >>> len(t), t[1].record_id, t[1].source, t[1].box
        (2, 6, 'ann.json annotation id 6', (0.0, 0.0, 8.0, 8.0))
    """

    def __init__(
        self,
        image_paths: Sequence[str],
        image: np.ndarray,
        boxes: np.ndarray,
        keypoints: np.ndarray,
        image_ids: np.ndarray | None = None,
        record_ids: np.ndarray | None = None,
        scores: np.ndarray | None = None,
        image_sizes: np.ndarray | None = None,
        source_prefix: str = "",
        sources: Mapping[int, str] | None = None,
        report: Any = None,
    ):
        n = len(image)
        self.image_paths = list(image_paths)
        self.image = np.asarray(image, np.int64).reshape(n)
        self.boxes = np.asarray(boxes, np.float64).reshape(n, 4)
        kps = np.asarray(keypoints, np.float32)
        self.keypoints = kps if kps.ndim == 3 and len(kps) == n else kps.reshape(n, -1, 3)
        self.image_ids = _column(image_ids, n, np.int64, 0)
        self.record_ids = _column(record_ids, n, np.int64, 0)
        self.scores = _column(scores, n, np.float64, 1.0)
        self.image_sizes = (np.full((n, 2), -1, np.int32) if image_sizes is None
                            else np.asarray(image_sizes, np.int32).reshape(n, 2))  # fmt: skip
        self.source_prefix = source_prefix
        self.sources = dict(sources or {})
        if report is None:
            report = LoadReport(source="")
        self.report = report
        self.report.kept = n
        self._given: dict[int, InstanceRecord] = {}

    @classmethod
    def from_records(
        cls, records: Sequence[InstanceRecord], source_prefix: str = "",
        num_keypoints: int | None = None, report: Any = None,
    ) -> RecordTable:  # fmt: skip
        """The table of ``records`` (all with keypoints of one shape; ``num_keypoints``
        gives the shape of an empty table)."""
        entries: dict[str, int] = {}
        image = [entries.setdefault(r.image_path, len(entries)) for r in records]
        k = num_keypoints if num_keypoints is not None else 0
        kps = np.zeros((0, k, 3), np.float32)
        if records:
            kps = np.stack([np.asarray(r.keypoints, np.float32) for r in records])
        sources = {i: r.source for i, r in enumerate(records)
                   if r.source != f"{source_prefix}{int(r.record_id)}"}  # fmt: skip
        return cls(
            list(entries), np.array(image, np.int64), [r.box for r in records], kps,
            _ids(records, "image_id"), _ids(records, "record_id"),
            [float(r.score) for r in records],
            [tuple(r.image_size) if r.image_size else (-1, -1) for r in records],
            source_prefix, sources, report,
        )  # fmt: skip

    def __len__(self) -> int:
        return len(self.image)

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        i = int(i)
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"record index {i} out of range ({len(self)} records)")
        record = self._given.get(i)
        if record is None:
            record = self._given[i] = self._make(i)
        return record

    def __iter__(self) -> Iterator[InstanceRecord]:
        for i in range(len(self)):
            yield self[i]

    def __repr__(self) -> str:
        return f"RecordTable({len(self)} records, {len(self.image_paths)} images)"

    def _make(self, i: int) -> InstanceRecord:
        h, w = self.image_sizes[i].tolist()
        rid = int(self.record_ids[i])
        return InstanceRecord(
            image_path=self.image_paths[self.image[i]],
            box=tuple(self.boxes[i].tolist()),
            keypoints=self.keypoints[i],
            image_id=int(self.image_ids[i]),
            record_id=rid,
            score=float(self.scores[i]),
            image_size=None if h < 0 else (h, w),
            source=self.sources.get(i, f"{self.source_prefix}{rid}"),
        )

    def given(self) -> list[tuple[int, InstanceRecord]]:
        """(row, record) of every record handed out so far, by row: they may have changed."""
        return sorted(self._given.items(), key=lambda item: item[0])

    def take(self, rows: Sequence[int] | np.ndarray) -> RecordTable:
        """The table of ``rows`` (in that order); records handed out stay the same objects."""
        rows = np.asarray(rows, np.int64).reshape(-1)
        sub = RecordTable(
            self.image_paths, self.image[rows], self.boxes[rows], self.keypoints[rows],
            self.image_ids[rows], self.record_ids[rows], self.scores[rows],
            self.image_sizes[rows], self.source_prefix,
        )  # fmt: skip
        if self.sources or self._given:
            where = np.full(len(self), -1, np.int64)
            where[rows] = np.arange(len(rows))
            sub.sources = {int(where[i]): s for i, s in self.sources.items() if where[i] >= 0}
            sub._given = {int(where[i]): r for i, r in self._given.items() if where[i] >= 0}
        return sub


def _ids(records: Sequence[InstanceRecord], name: str) -> np.ndarray:
    """[N] int64 of each record's ``name``; DataError naming one that does not fit."""
    values = [int(getattr(r, name)) for r in records]
    try:
        return np.array(values, np.int64)
    except OverflowError:
        r = next(r for r, v in zip(records, values, strict=True) if not -(2**63) <= v < 2**63)
        raise DataError(f"{r.describe()}: {name} {getattr(r, name)} does not fit in 64 bits; "
                        "renumber it") from None  # fmt: skip


def _column(values: Any, n: int, dtype: Any, default: float) -> np.ndarray:
    if values is None:
        return np.full(n, default, dtype)
    return np.asarray(values, dtype).reshape(n)


# --------------------------------------------------------------------------- load reports
@dataclass
class LoadReport:
    """What a loader read, kept and skipped.

    Attributes:
        source: the file or folder that was loaded.
        kept: number of records returned.
        skipped: reason -> count. Reasons ``crowd`` and ``no_keypoints`` (and ``low_score``,
            ``other_category`` for detections) are normal filtering; ``missing_image``,
            ``keypoint_count``, ``nan``, ``zero_area``, ``unknown_image``, ``bad_row`` are bad
            records, counted only with ``on_error="skip"`` (else they raise); so are
            ``visibility`` (not 0, 1 or 2) and ``outside_root`` (an image path that leaves
            the image folder).
        examples: reason -> first few error messages, naming file and record.
    """

    source: str
    kept: int = 0
    skipped: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)

    def skip(self, reason: str, message: str = "") -> None:
        """Count one skipped record (and keep its message as an example)."""
        self.skipped[reason] += 1
        if message and len(self.examples.setdefault(reason, [])) < MAX_EXAMPLES:
            self.examples[reason].append(message)

    def bad(self, reason: str, message: str, on_error: str) -> None:
        """A bad record: raise :class:`DataError` or (``on_error="skip"``) count it."""
        if on_error == "raise":
            raise DataError(f"{message}. Fix the record, or load with on_error='skip'.")
        self.skip(reason, message)
        log.warning("skipping: %s", message)

    def summary(self) -> str:
        """One line: kept count and skip counts."""
        parts = ", ".join(f"{k}: {v}" for k, v in sorted(self.skipped.items()))
        return f"{self.source}: {self.kept} records" + (f" (skipped {parts})" if parts else "")


class Records(list):
    """A list of :class:`InstanceRecord` that also carries its :class:`LoadReport`."""

    def __init__(self, items: Sequence[InstanceRecord] = (), report: LoadReport | None = None):
        super().__init__(items)
        self.report = report if report is not None else LoadReport(source="")
        self.report.kept = len(self)


def check_on_error(on_error: str) -> None:
    """Validate an ``on_error`` argument."""
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
