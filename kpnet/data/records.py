"""Instance records: the one format every data source produces and the pipeline consumes.

Example:
    >>> import numpy as np
    >>> r = InstanceRecord("img.jpg", box=(10, 20, 100, 200),
    ...                    keypoints=np.zeros((2, 3), np.float32), image_id=1, record_id=7)
    >>> r.num_labelled
    0
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


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
