"""Data checks: what a set of instance records holds, and what a loader skipped.

Loaders validate cheap things up front (file exists, keypoint count, NaN, box area) and,
with ``on_error="skip"``, skip and count bad records in a
:class:`~kpnet.data.records.LoadReport` attached to the returned
:class:`~kpnet.data.records.Records` list (or :class:`~kpnet.data.records.RecordTable`: COCO json).
:func:`check_records` summarises records for humans (``kpnet data check``). Corrupt image
files are only found by decoding: pass ``decode=True`` here (slow on all of COCO: every
image is decoded in full by TensorFlow, as training does, so a truncated JPEG that OpenCV
would half-read counts as corrupt) or let the pipeline's ``on_error`` catch them while
training.

Example:
    >>> import numpy as np
    >>> from kpnet.spec import KeypointSpec
    >>> from kpnet.data.records import InstanceRecord
    >>> kp = np.array([[5, 5, 2], [0, 0, 0]], np.float32)
    >>> r = InstanceRecord("missing.jpg", (0, 0, 10, 10), kp, image_size=(8, 8))
    >>> report = check_records([r], KeypointSpec(names=("a", "b")))
    >>> report["instances"], report["labelled"], report["missing_files"]
    (1, {'a': 1, 'b': 0}, 1)
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from kpnet import fs
from kpnet.data.images import MAX_PIXELS, probe, too_large
from kpnet.data.records import MAX_EXAMPLES, DataError, InstanceRecord
from kpnet.spec import KeypointSpec

log = logging.getLogger(__name__)


def outside_root(root: str | os.PathLike, path: str | os.PathLike) -> bool:
    """True when ``path`` is not inside the folder ``root`` (compared as written: ``..`` and
    absolute paths count, symbolic links inside the folder are the user's choice).

    Example:
        >>> outside_root("images", "images/a/b.jpg"), outside_root("images", "images/../x.jpg")
        (False, True)
        >>> outside_root("/data/images", "/etc/hostname")
        True
    """
    root = os.path.normpath(os.path.abspath(root))
    path = os.path.normpath(os.path.abspath(path))
    return os.path.commonpath([root, path]) != root


def check_records(
    records: Sequence[InstanceRecord], spec: KeypointSpec, decode: bool = False,
    max_pixels: int = MAX_PIXELS,
) -> dict[str, Any]:  # fmt: skip
    """Count images, instances, labelled keypoints and problems in ``records``.

    Image sizes come from the file headers (:func:`kpnet.data.images.probe`; the records'
    sizes when a header gives none); an image whose header declares more than
    ``max_pixels`` is counted as too large and never decoded.

    Args:
        records: instance records from any source.
        spec: the keypoint spec (names the per-keypoint counts).
        decode: also decode every image in full (TensorFlow, as training does) to find
            corrupt or truncated files and learn unknown image sizes (slow on large sets).
        max_pixels: the pixel limit (``kpnet data check --max-pixels``, ``data.max_pixels``).

    Returns:
        dict with ``images``, ``instances``, ``labelled`` / ``coverage`` (per keypoint name),
        ``visible``, ``occluded``, ``unlabelled``, ``out_of_image`` (labelled points outside
        the image), ``boxes_out_of_image``, ``zero_area_boxes``, ``missing_files``,
        ``too_large`` (images over ``max_pixels``), ``unknown_size``, ``corrupt_images``
        (None unless ``decode``) and ``examples``.
    """
    k = spec.num_keypoints
    vis = np.zeros((0, k), np.float32)
    if records:
        vis = np.stack([_keypoints(r, k)[:, 2] for r in records])
    sizes = _image_sizes(records, decode, max_pixels)
    missing = sorted({p for p, s in sizes.items() if s == "missing"})
    corrupt = sorted(f"{p}: {s}" for p, s in sizes.items() if isinstance(s, _Corrupt))
    large = sorted(f"{p}: {s}" for p, s in sizes.items() if isinstance(s, _TooLarge))
    out_pts, out_boxes, zero_area, unknown, num_out = [], [], [], 0, 0
    for r in records:
        size = sizes.get(r.image_path)
        if r.box[2] <= 0 or r.box[3] <= 0:
            zero_area.append(r.describe())
        if not isinstance(size, tuple):
            unknown += 1
            continue
        outside = _points_outside(_keypoints(r, k), size)
        num_out += len(outside)
        if outside:
            out_pts.append(f"{r.describe()}: {[spec.names[i] for i in outside]}")
        if _box_outside(r.box, size):
            out_boxes.append(f"{r.describe()}: box {tuple(round(v, 1) for v in r.box)}")
    labelled = (vis > 0).sum(axis=0)
    n = max(len(records), 1)
    return {
        "images": len({r.image_path for r in records}),
        "instances": len(records),
        "labelled": {name: int(c) for name, c in zip(spec.names, labelled, strict=True)},
        "coverage": {
            name: round(float(c) / n, 4) for name, c in zip(spec.names, labelled, strict=True)
        },
        "visible": int((vis == 2).sum()),
        "occluded": int((vis == 1).sum()),
        "unlabelled": int((vis == 0).sum()),
        "out_of_image": num_out,
        "boxes_out_of_image": len(out_boxes),
        "zero_area_boxes": len(zero_area),
        "missing_files": len(missing),
        "too_large": len(large),
        "unknown_size": unknown,
        "corrupt_images": len(corrupt) if decode else None,
        "examples": {
            key: vals[:MAX_EXAMPLES]
            for key, vals in (
                ("out_of_image", out_pts),
                ("boxes_out_of_image", out_boxes),
                ("zero_area_boxes", zero_area),
                ("missing_files", missing),
                ("too_large", large),
                ("corrupt_images", corrupt),
            )
            if vals
        },
    }


def format_check(report: dict[str, Any], spec: KeypointSpec) -> str:
    """Render a :func:`check_records` report as aligned text."""
    lines = [
        f"images            {report['images']}",
        f"instances         {report['instances']}",
        f"keypoints         {report['visible']} visible, {report['occluded']} occluded, "
        f"{report['unlabelled']} unlabelled",
    ]
    width = max(len(n) for n in spec.names + ("per keypoint",))
    lines.append(f"{'per keypoint':<{width + 2}}  labelled  coverage")
    for name in spec.names:
        lines.append(
            f"  {name:<{width}}  {report['labelled'][name]:>8}  {report['coverage'][name]:>7.1%}"
        )
    corrupt = report["corrupt_images"]
    lines += [
        f"out-of-image pts  {report['out_of_image']}",
        f"boxes off image   {report['boxes_out_of_image']}",
        f"zero-area boxes   {report['zero_area_boxes']}",
        f"missing files     {report['missing_files']}",
        f"over pixel limit  {report['too_large']}",
        f"unknown size      {report['unknown_size']}",
        f"corrupt images    {'not checked (use --decode)' if corrupt is None else corrupt}",
    ]
    for key, examples in report["examples"].items():
        lines.append(f"{key}:")
        lines += [f"  {e}" for e in examples]
    return "\n".join(lines)


# --------------------------------------------------------------------------- helpers
def _keypoints(record: InstanceRecord, k: int) -> np.ndarray:
    kp = np.asarray(record.keypoints, np.float32)
    if kp.shape != (k, 3):
        raise DataError(f"{record.describe()}: keypoints shape {kp.shape}, spec wants {(k, 3)}")
    return kp


def _image_sizes(
    records: Sequence[InstanceRecord], decode: bool, max_pixels: int
) -> dict[str, Any]:
    """image path -> (h, w), "missing", :class:`_TooLarge` / :class:`_Corrupt` (why) or None
    (size unknown)."""
    sizes: dict[str, Any] = {}
    for r in records:
        if r.image_path not in sizes:
            sizes[r.image_path] = _image_size(r, decode, max_pixels)
    return sizes


def _image_size(record: InstanceRecord, decode: bool, max_pixels: int) -> Any:
    """One image's entry of :func:`_image_sizes`: the header first, so an image over the
    limit is never decoded."""
    path = record.image_path
    if not fs.isfile(path):
        return "missing"
    try:
        header = probe(path)
    except DataError:  # decoding says why (below), or the record's size stands
        header = None
    if header is not None and (why := too_large(header, max_pixels, "--max-pixels")):
        return _TooLarge(why)
    if decode:
        return _decoded_size(path)
    if header is not None:
        return header.hw
    return tuple(record.image_size) if record.image_size else None


class _Corrupt(str):
    """Why an image file cannot be decoded."""


class _TooLarge(str):
    """Why an image file is over the pixel limit."""


def _decoded_size(path: str) -> tuple[int, int] | _Corrupt:
    """(H, W) of the fully decoded image, or why it is corrupt: what training would read."""
    import tensorflow as tf

    try:
        contents = fs.read_bytes(path)
    except fs.io_errors() as err:
        return _Corrupt(f"cannot read the image file ({getattr(err, 'strerror', None) or err})")
    if not contents.startswith((b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n")):
        return _Corrupt("not a JPEG or PNG file (convert it to one of those)")
    try:  # as the pipeline reads it; OpenCV would return a truncated JPEG half grey
        image = tf.io.decode_image(contents, channels=3, expand_animations=False)
    except (tf.errors.OpError, ValueError) as err:
        return _Corrupt(f"the image is corrupt or truncated ({fs.reason(err)})")
    return int(image.shape[0]), int(image.shape[1])


def _points_outside(kp: np.ndarray, size: tuple[int, int]) -> list[int]:
    h, w = size
    x, y, v = kp[:, 0], kp[:, 1], kp[:, 2]
    bad = (v > 0) & ((x < -0.5) | (y < -0.5) | (x > w - 0.5) | (y > h - 0.5))
    return [int(i) for i in np.flatnonzero(bad)]


def _box_outside(box: Sequence[float], size: tuple[int, int], tol: float = 1.0) -> bool:
    h, w = size
    x, y, bw, bh = box
    return x < -tol or y < -tol or x + bw > w + tol or y + bh > h + tol
