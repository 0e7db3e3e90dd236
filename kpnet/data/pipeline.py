"""The tf.data pipeline: records -> (uint8 input crops, keypoints in heatmap coordinates).

Example:
    >>> from kpnet.data.pipeline import PipelineConfig, build_dataset
    >>> ds = build_dataset(records, spec, PipelineConfig(), batch_size=32,  # doctest: +SKIP
    ...                    training=True, repeat=True)
    >>> images, keypoints = next(iter(ds))  # doctest: +SKIP
    >>> images.shape, keypoints.shape  # doctest: +SKIP
    (TensorShape([32, 256, 192, 3]), TensorShape([32, 17, 3]))

How it works:

1. records (a :class:`~kpnet.data.records.RecordTable`, from a COCO json, is read as its
   arrays) are grouped by image file, so an image holding several instances is read and
   decoded ONCE (at evaluation consecutive records of one file form a group, keeping the
   record order; at training all of a file's records do); image sizes come from the file
   headers, read up front (above :data:`CHECK_IMAGES_LIMIT` files, from the records: the
   annotations' sizes); a :class:`kpnet.data.tfrecord.TFRecordSet` is streamed instead,
   through the same geometry (:mod:`kpnet.data.tfrecord`);
2. at the start of each epoch (above :data:`CHUNK_IMAGES` images: of each chunk of that
   many, as the epoch goes), ONE batched graph call gives every instance its [2, 3] affine
   matrix (image -> input crop, pixel centres at integer coordinates, see
   :mod:`kpnet.codec`) from its box (or the whole image) and the random augmentation
   (:mod:`kpnet.data.augment`, stateless, keyed by seed, epoch and record, so a run is
   reproducible whatever the parallelism), its colour jitter and its output keypoints
   (the same matrix; a flip permutes them with ``spec.flip_index``; points leaving the crop
   become v = 0 with (x, y) = 0; heatmap coordinates by :func:`kpnet.codec.input_to_heatmap`),
   and every image its decode window and ratio (step 3): per image, only reading, decoding
   and warping are left, which keeps the per-image graph small;
3. JPEGs are decoded only inside the bounding window of all the image's crops
   (``decode_and_crop_jpeg``), and at 1/2, 1/4 or 1/8 resolution (libjpeg DCT scaling,
   cheaper than a full decode, and less aliased than sampling the full image) when every
   crop of the image shrinks it by at least that factor (``reduced_decode``; the matrices
   are adjusted exactly: reduced pixel j covers full-resolution pixels [r j, r j + r));
   then, in one ``tf.numpy_function`` per image (OpenCV releases the GIL), each crop is one
   bilinear OpenCV ``warpAffine`` of output size (on RGBA: OpenCV's 4-channel path is ~2x
   faster than its 3-channel one) followed by the colour jitter (one colour transform);
4. albumentations (if configured), instance shuffle buffer, batch, prefetch.

Cost on coco_mini (3.1 instances per image, 256x192 crops, one core): ~2.6 ms per image,
0.71x the rate of plain ``tf.io.decode_jpeg`` of the same files; decoding dominates, and
colour jitter costs ~0.13 ms (``benchmarks/pipeline.py``).

Errors: records are checked up front (keypoint shapes; every image file exists, is
non-empty, is a JPEG or PNG, declares at most ``PipelineConfig.max_pixels`` pixels in its
header (:mod:`kpnet.data.images`), and a file without an end marker is test-decoded); a failure
raises :class:`kpnet.data.DataError` naming the file and the record, or with
``on_error="skip"`` drops the file's records with a warning. A file that passes these checks
but still fails to decode inside tf.data raises TensorFlow's decode error (``"skip"`` ignores
it: the image's instances are dropped and TF logs a warning).
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import cv2
import numpy as np
import tensorflow as tf

from kpnet import codec, fs
from kpnet.crops import reduced_matrices, reduction_ratios, sample_crops
from kpnet.data import augment as aug
from kpnet.data import images
from kpnet.data.images import MAX_PIXELS
from kpnet.data.records import DataError, InstanceRecord, RecordTable
from kpnet.spec import KeypointSpec

log = logging.getLogger(__name__)

_JPEG, _PNG = images.JPEG_MAGIC, images.PNG_MAGIC
AUTOTUNE = tf.data.AUTOTUNE


@dataclass(frozen=True)
class PipelineConfig:
    """How records become model inputs: the codec's geometry plus training augmentation.

    Args:
        codec: :class:`kpnet.codec.Codec` (or a mapping of its fields): input size, stride,
            crop mode (``"topdown"``, ``"whole"``, ``"random_crop"``, ``"two_stage"``), box
            padding and the training box extension.
        augment: :class:`~kpnet.data.augment.AugmentConfig` (or a mapping of its fields).
        shuffle_buffer: instance-level shuffle buffer (after the per-epoch image shuffle).
        fill_value: grey level outside the image.
        reduced_decode: (training) decode JPEGs at 1/2, 1/4 or 1/8 resolution when all of
            an image's crops shrink it at least that much (faster, and less aliasing than
            sampling the full image); False always decodes at full resolution. Evaluation
            crops always come from :func:`kpnet.crops.sample_crops`, as in predict and the
            SavedModel.
        max_pixels: images whose header (or record size) declares more pixels are bad
            files, refused or skipped (``on_error``) before anything decodes them.
    """

    codec: codec.Codec = field(default_factory=codec.Codec)
    augment: aug.AugmentConfig = field(default_factory=aug.AugmentConfig)
    shuffle_buffer: int = 256
    fill_value: int = 0
    reduced_decode: bool = True
    max_pixels: int = MAX_PIXELS

    def __post_init__(self) -> None:
        if isinstance(self.codec, Mapping):
            object.__setattr__(self, "codec", codec.Codec(**self.codec))
        if isinstance(self.augment, Mapping):
            object.__setattr__(self, "augment", aug.AugmentConfig(**self.augment))

    @property
    def input_size(self) -> tuple[int, int]:
        return self.codec.input_size

    @property
    def stride(self) -> int:
        return self.codec.stride

    @property
    def mode(self) -> str:
        return self.codec.mode

    @property
    def aspect_ratio(self) -> float:
        return self.codec.aspect_ratio

    @property
    def heatmap_size(self) -> tuple[int, int]:
        return self.codec.heatmap_size


# --------------------------------------------------------------------------- record checks
@dataclass
class _Columns:
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


def _record_arrays(records: Sequence[InstanceRecord], spec: KeypointSpec) -> _Columns:
    """The records' :class:`_Columns`; DataError naming the first malformed record.

    A :class:`~kpnet.data.records.RecordTable` is read column by column (its records
    handed out so far row by row: they may have changed); any other sequence record by record.
    """
    k = spec.num_keypoints
    if isinstance(records, RecordTable):
        return _table_arrays(records, k)
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
    return _Columns(
        kps, boxes, list(index), path_index, sizes,
        np.array([int(r.image_id) for r in records], np.int64).reshape(n),
        np.array([int(r.record_id) for r in records], np.int64).reshape(n),
        np.array([float(r.score) for r in records], np.float64).reshape(n),
    )  # fmt: skip


def _table_arrays(t: RecordTable, k: int) -> _Columns:
    """:func:`_record_arrays` of a table: NumPy checks, then its handed-out records."""
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
    return _Columns(kps.astype(np.float32, copy=False), boxes.astype(np.float32), list(index),
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
            why = err.message.splitlines()[0]
            return f"the image is corrupt or truncated ({why})", (0, 0), False
        hw = tuple(int(v) for v in image.shape[:2])
    return None, hw, fmt == "jpeg"


def _signature(head: bytes) -> str | None:
    """``jpeg`` or ``png`` by a file's first bytes (a header too damaged to give a size)."""
    return "jpeg" if head.startswith(_JPEG) else "png" if head.startswith(_PNG) else None


#: ``check_images=None`` opens every image up front only up to this many image files;
#: larger sets take image sizes from their records (the annotations) when all have one.
CHECK_IMAGES_LIMIT = 10_000


def _check_files(
    cols: _Columns, records: Sequence[InstanceRecord], on_error: str, check: bool | None = None,
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
    cols: _Columns, records: Sequence[InstanceRecord], bad: dict[int, str], on_error: str
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


def _known_sizes(cols: _Columns) -> tuple[np.ndarray, np.ndarray] | None:
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
class _Groups:
    """Record indices grouped by image file: group g is ``members[splits[g]:splits[g+1]]``,
    its image ``path_index[g]`` (into :attr:`_Columns.paths`)."""

    path_index: np.ndarray  # [G] int64
    members: np.ndarray  # [n] int64
    splits: np.ndarray  # [G + 1] int64

    def __len__(self) -> int:
        return len(self.path_index)

    @property
    def counts(self) -> np.ndarray:
        return np.diff(self.splits)

    def shard(self, index: int, num: int) -> _Groups:
        """Groups ``index::num``."""
        keep = np.zeros(len(self), bool)
        keep[index::num] = True
        counts = self.counts[keep]
        return _Groups(self.path_index[keep], self.members[np.repeat(keep, self.counts)],
                       np.concatenate([[0], np.cumsum(counts)]).astype(np.int64))  # fmt: skip


def _group(cols: _Columns, keep: np.ndarray, consecutive: bool) -> _Groups:
    """The ``keep`` records grouped by image file: at evaluation (``consecutive``) each run
    of records of one file is a group, in record order; else all of a file's records, the
    groups in order of their first record."""
    path = cols.path_index[keep]
    if consecutive:
        start = np.flatnonzero(np.r_[True, path[1:] != path[:-1]]) if len(path) else path
        return _Groups(path[start], keep, np.r_[start, len(path)].astype(np.int64))
    uniq, first, inverse = np.unique(path, return_index=True, return_inverse=True)
    by_first = np.argsort(first)
    rank = np.empty(len(uniq), np.int64)
    rank[by_first] = np.arange(len(uniq))
    group = rank[inverse.reshape(-1)]
    order = np.argsort(group, kind="stable")
    counts = np.bincount(group, minlength=len(uniq))
    return _Groups(uniq[by_first], keep[order],
                   np.concatenate([[0], np.cumsum(counts)]).astype(np.int64))  # fmt: skip


# --------------------------------------------------------------------------- graph helpers
def _decode_ratios(m: tf.Tensor, group: tf.Tensor, is_jpeg: tf.Tensor) -> tf.Tensor:
    """[G] int32 JPEG reduction r in (1, 2, 4, 8) per image: the largest with every crop's
    scale <= 1 / r (so the reduced image is never upsampled); 1 for PNG.

    ``m`` [n, 2, 3] crops, ``group`` [n] their (sorted) image index, ``is_jpeg`` [G].
    """
    ratio = tf.math.segment_min(reduction_ratios(m), group)
    return tf.where(is_jpeg, ratio, 1)


def _windows(m, group, hw, ratio, output_size: Sequence[int]) -> tf.Tensor:
    """[G, 4] windows [y0, x0, h, w] of each 1/ratio image that its crops sample (clipped).

    Reduced pixel j covers full-resolution pixels [r j, r j + r): its centre is at
    r j + (r - 1) / 2 (libjpeg DCT scaling), the convention :func:`_crops` uses.
    """
    out_h, out_w = float(output_size[0]), float(output_size[1])
    corners = tf.constant([[-0.5, -0.5], [out_w - 0.5, -0.5], [-0.5, out_h - 0.5],
                           [out_w - 0.5, out_h - 0.5]])  # fmt: skip
    inv = codec.invert_affine(m)
    pts = tf.einsum("nij,cj->nci", inv[:, :, :2], corners) + inv[:, None, :, 2]  # [n, 4, 2]
    r = tf.cast(tf.gather(ratio, group), tf.float32)[:, None, None]
    pts = (pts - (r - 1.0) * 0.5) / r
    lo = tf.math.segment_min(tf.reduce_min(pts, 1), group)
    hi = tf.math.segment_max(tf.reduce_max(pts, 1), group)
    lo = tf.cast(tf.floor(lo), tf.int32) - 1
    hi = tf.cast(tf.math.ceil(hi), tf.int32) + 2
    size_xy = (tf.reverse(hw, [1]) + ratio[:, None] - 1) // ratio[:, None]  # ceil(size / r)
    lo = tf.clip_by_value(lo, 0, size_xy - 1)
    hi = tf.clip_by_value(hi, lo + 1, size_xy)
    return tf.stack([lo[:, 1], lo[:, 0], hi[:, 1] - lo[:, 1], hi[:, 0] - lo[:, 0]], 1)


_RATIOS = (1, 2, 4, 8)


def _decode_window(contents, window, branch) -> tf.Tensor:
    """uint8 RGB pixels of ``window`` = [y0, x0, h, w] of an image decoded by ``branch``:
    0 to 3: a JPEG at 1 / ``_RATIOS[branch]`` (only that window decoded, DCT-scaled); 4: PNG.
    """

    def png():
        img = tf.io.decode_png(contents, channels=3)
        return img[window[0] : window[0] + window[2], window[1] : window[1] + window[3]]

    def jpeg(r):
        return lambda: tf.image.decode_and_crop_jpeg(contents, window, channels=3, ratio=r)

    return tf.switch_case(branch, [*(jpeg(r) for r in _RATIOS), png])  # one function call


def _window_warps(m, group, ratio, window) -> tf.Tensor:
    """[n, 2, 3] float64 matrices from each crop's window of the 1/ratio image to the crop.

    Window pixel (u, v) is reduced pixel origin + (u, v) (see :func:`kpnet.crops.reduced_matrices`),
    ``origin`` = (x0, y0) of the image's ``window`` [G, 4]; ``m`` [n, 2, 3] image -> crop.
    """
    reduced = reduced_matrices(m, tf.gather(ratio, group))
    origin = tf.cast(tf.gather(tf.reverse(window[:, :2], [1]), group), tf.float64)
    shift = reduced[:, :, 2] + tf.linalg.matvec(reduced[:, :, :2], origin)
    return tf.concat([reduced[:, :, :2], shift[:, :, None]], axis=2)


_NO_COLOR = np.array([0.0, 1.0, 1.0, 0.0], np.float32)


def _crops(image, warps, colors, color_m, out_hw, fill_value) -> np.ndarray:
    """Bilinear crops [n,H,W,3] of ``image`` (an image window), then colour jitter.

    ``warps`` [n, 2, 3] map window pixels to crop pixels (:func:`_window_warps`); ``colors``
    [n, 4] and ``color_m`` [n, 3, 4] are :func:`~kpnet.data.augment.sample_color` and
    :func:`~kpnet.data.augment.color_matrices`. OpenCV's warpAffine has kpnet's pixel-centre
    convention; on RGBA it costs ~0.11 ms a 256x192 crop, ~0.25 ms on RGB (TF's
    ImageProjectiveTransformV3: ~2.2 ms).
    """
    h, w = int(out_hw[0]), int(out_hw[1])
    src = cv2.cvtColor(image, cv2.COLOR_RGB2RGBA)
    crop = np.empty((h, w, 4), np.uint8)
    out = np.empty((len(warps), h, w, 3), np.uint8)
    fill = (int(fill_value),) * 4
    jitter = (colors != _NO_COLOR).any(1).tolist()
    for i, warp in enumerate(warps):
        cv2.warpAffine(src, warp, (w, h), crop, cv2.INTER_LINEAR, cv2.BORDER_CONSTANT, fill)
        rgb = out[i]
        cv2.cvtColor(crop, cv2.COLOR_RGBA2RGB, dst=rgb)
        if jitter[i]:
            aug.jitter_color(rgb, color_m[i], float(colors[i, 1]), float(colors[i, 3]))
    return out


# --------------------------------------------------------------------------- the builder
#: Images per chunk of an epoch's tables (see :meth:`_Builder.epochs`).
CHUNK_IMAGES = 16384


class _Builder:
    """Holds the constant tables and the graph functions of one dataset."""

    on_error = "raise"

    def __init__(self, spec, config, training, seed, cols: _Columns, groups: _Groups,
                 hw: np.ndarray, is_jpeg: np.ndarray, usable: np.ndarray,
                 on_error: str = "raise"):  # fmt: skip
        self.spec, self.config, self.training, self.seed = spec, config, training, int(seed)
        self.on_error = on_error
        self.seed_t = tf.constant(self.seed, tf.int64)
        self.paths = tf.constant([cols.paths[j] for j in groups.path_index.tolist()], tf.string)
        self.is_jpeg = tf.constant(is_jpeg[groups.path_index])
        self.hw = tf.constant(hw[groups.path_index].astype(np.int32).reshape(-1, 2))
        self.flat_members = tf.constant(groups.members.astype(np.int64))
        self.member_group = tf.constant(np.repeat(np.arange(len(groups)), groups.counts))
        self.splits = tf.constant(groups.splits, tf.int64)
        self.num_groups, self.num_records = len(groups), len(cols)
        self.keypoints = tf.constant(cols.keypoints)
        self.boxes = tf.constant(cols.boxes)
        record_hw = np.where(usable[cols.path_index, None], hw[cols.path_index], 0)
        self.record_hw = tf.constant(record_hw.astype(np.int32).reshape(-1, 2))
        self.flip_index = tf.constant(spec.flip_index, tf.int32)
        a = config.augment
        self.upper = a.upper_body_index(spec) if a.half_body_prob > 0 else None
        if training and a.half_body_prob > 0 and self.upper is None:
            raise ValueError(
                "augment.half_body_prob > 0 needs augment.upper_body for a non-COCO spec"
            )
        self.albu = aug.AlbumentationsOp(a.photometric) if a.photometric else None

    def image_hw(self, idx: tf.Tensor, *extra: tf.Tensor) -> tf.Tensor:
        """[B, 2] (H, W) of the images of records ``idx`` (the ``image_hw`` meta)."""
        return tf.gather(self.record_hw, idx)

    # -- geometry ---------------------------------------------------------------------
    def _random_window(self, box: tf.Tensor, hw: tf.Tensor, seed: tf.Tensor):
        """Random windows [n] (center, size) containing each box, inside the image if possible."""
        n, cfg = tf.shape(box)[0], self.config
        full_c, full_s = cfg.codec.regions(tf.zeros_like(box), hw)  # the whole image
        _, box_s = codec.box_to_center_scale(box, cfg.aspect_ratio, cfg.codec.padding)
        u = tf.random.stateless_uniform(tf.stack([n, 3]), seed=seed)
        size = box_s + u[:, :1] * tf.maximum(full_s - box_s, 0.0)
        half = size * 0.5
        lo, hi = box[:, :2] + box[:, 2:] - 1 - half, box[:, :2] + half  # window holds the box
        img_lo, img_hi = half - 0.5, full_c * 2 + 0.5 - half  # window inside the image
        lo2, hi2 = tf.maximum(lo, img_lo), tf.minimum(hi, img_hi)
        lo, hi = tf.where(lo2 <= hi2, lo2, lo), tf.where(lo2 <= hi2, hi2, hi)
        return lo + u[:, 1:] * (hi - lo), size

    def matrices(self, idx: tf.Tensor, hw: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
        """[n, 2, 3] image -> crop matrices of records ``idx`` in images of sizes ``hw`` [n, 2].

        Evaluation: exactly :meth:`kpnet.codec.Codec.crop_matrices` (what predict and the
        SavedModel use); training: the codec's regions, randomly scaled, rotated, flipped.
        """
        cfg, n = self.config, tf.shape(idx)[0]
        seeds = tf.random.experimental.stateless_split(seed, 3)
        boxes = tf.gather(self.boxes, idx)
        if cfg.mode == "two_stage":  # boxes as the second stage finds them: from keypoints
            boxes = self._two_stage_boxes(idx, seeds[2])
        if not self.training:
            return cfg.codec.crop_matrices(boxes, hw)
        if cfg.mode == "random_crop":
            center, size = self._random_window(boxes, hw, seeds[1])
        else:
            center, size = cfg.codec.regions(boxes, hw, training=True)
        scale, rot, flip, hb = aug.sample_geometry(cfg.augment, seeds[0], n)
        if self.upper is not None and cfg.mode == "topdown":
            kp = tf.gather(self.keypoints, idx)
            center, size = aug.half_body(kp, center, size, hb, self.upper, cfg.augment,
                                         cfg.aspect_ratio)  # fmt: skip
        if cfg.mode != "random_crop":
            size = size * scale[:, None]
        return codec.crop_affine(center, size, cfg.input_size, rot, flip)

    def _two_stage_boxes(self, idx: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
        """Two-stage boxes [n, 4]: the labelled keypoints' extent (what the second stage
        crops around); while training, a ``whole_fraction`` share are whole frames (the
        first stage)."""
        kp = tf.gather(self.keypoints, idx)
        boxes = codec.keypoint_boxes(kp[..., :2], kp[..., 2] > 0)
        if not self.training:
            return boxes
        whole = tf.random.stateless_uniform(tf.shape(idx), seed) < self.config.codec.whole_fraction
        return tf.where(whole[:, None], 0.0, boxes)

    def keypoints_out(self, idx: tf.Tensor, m: tf.Tensor) -> tf.Tensor:
        """Keypoints [n,K,3] in heatmap coords; flipped order; outside / unlabelled -> 0."""
        kp = tf.gather(self.keypoints, idx)
        xy = codec.transform_points(kp[..., :2], m)
        v = kp[..., 2]
        flipped = (m[:, 0, 0] * m[:, 1, 1] - m[:, 0, 1] * m[:, 1, 0]) < 0  # det < 0: mirrored
        xy = tf.where(flipped[:, None, None], tf.gather(xy, self.flip_index, axis=1), xy)
        v = tf.where(flipped[:, None], tf.gather(v, self.flip_index, axis=1), v)
        h, w = self.config.input_size
        x, y = xy[..., 0], xy[..., 1]
        inside = (v > 0) & (x >= -0.5) & (x < w - 0.5) & (y >= -0.5) & (y < h - 0.5)
        hm = codec.input_to_heatmap(xy, float(self.config.stride))
        hm = tf.where(inside[..., None], hm, 0.0)
        return tf.concat([hm, tf.where(inside, v, 0.0)[..., None]], axis=-1)

    # -- stages -----------------------------------------------------------------------
    def epoch_tables(
        self, epoch: tf.Tensor, order: tf.Tensor, chunk: tf.Tensor | None = None
    ) -> tuple[tf.Tensor, ...]:
        """Everything random and geometric of one epoch, for ALL instances in a few batched
        ops, per image in ``order``: (epoch, path, decode branch, window, then ragged
        [G, None, ...]: window -> crop matrices, colour parameters, colour matrices,
        image -> crop matrices, keypoints, record indices). ``chunk`` > 0 (see
        :meth:`chunk_tables`) is folded into the random key."""
        idx, group = self.flat_members, self.member_group
        n = tf.shape(idx)[0]
        key = tf.stack([self.seed_t, epoch])
        if chunk is not None:
            key = tf.where(chunk > 0, tf.random.experimental.stateless_fold_in(key, chunk), key)
        seeds = tf.random.experimental.stateless_split(key, 2)
        m = self.matrices(idx, tf.gather(self.hw, group), seeds[0])
        if self.training:
            colors = aug.sample_color(self.config.augment, seeds[1], n)
        else:
            colors = tf.tile(tf.constant([[0.0, 1.0, 1.0, 0.0]]), tf.stack([n, 1]))
        if self.config.reduced_decode:
            ratio = _decode_ratios(m, group, self.is_jpeg)
        else:
            ratio = tf.ones([self.num_groups], tf.int32)
        window = _windows(m, group, self.hw, ratio, self.config.input_size)
        warps = _window_warps(m, group, ratio, window)
        per_instance = (warps, colors, aug.color_matrices(colors), m,
                        self.keypoints_out(idx, m), idx)  # fmt: skip
        per_instance = [tf.RaggedTensor.from_row_splits(t, self.splits, validate=False)
                        for t in per_instance]  # fmt: skip
        log2_ratio = tf.reduce_sum(tf.cast(ratio[:, None] >= [2, 4, 8], tf.int32), 1)
        branch = tf.where(self.is_jpeg, log2_ratio, len(_RATIOS))  # see _decode_window
        per_image = [self.paths, branch, window, *per_instance]
        return (tf.fill(tf.shape(order), epoch), *(tf.gather(t, order) for t in per_image))

    def read(self, path: tf.Tensor) -> tf.Tensor:
        """The encoded image: the file ``path`` (TFRecords hold the bytes themselves)."""
        return tf.io.read_file(path)

    def load(self, epoch, path, branch, window, warps, colors, color_m, m, keypoints, idx):
        """One image: read, decode (its window) once, crop (and jitter) all its instances.

        Evaluation decodes the whole image and crops with :func:`kpnet.crops.sample_crops`,
        the sampler of predict and the SavedModel; training decodes the crops' window
        (DCT-reduced) and warps with OpenCV (faster; augmented anyway).
        """
        if not self.training:
            image = tf.io.decode_image(self.read(path), channels=3,
                                       expand_animations=False)  # fmt: skip
            crops = sample_crops(image[None], m, self.config.input_size,
                                 image_index=tf.zeros_like(idx, tf.int32),
                                 fill_value=self.config.fill_value)  # fmt: skip
            return crops, keypoints, m, idx, tf.fill(tf.shape(idx), epoch)
        image = _decode_window(self.read(path), window, branch)
        crop_fn = functools.partial(_crops, out_hw=self.config.input_size,
                                    fill_value=self.config.fill_value)  # fmt: skip
        crops = tf.numpy_function(crop_fn, [image, warps, colors, color_m], tf.uint8,
                                  stateful=False)  # fmt: skip
        crops = tf.ensure_shape(crops, [None, *self.config.input_size, 3])
        return crops, keypoints, m, idx, tf.fill(tf.shape(idx), epoch)

    def albumentations(self, image, keypoints, m, idx, epoch, *extra):
        """The configured albumentations on one uint8 crop, seeded per record and epoch."""
        image = self.albu.apply(image, (epoch * self.num_records + idx) * 7919 + self.seed)
        return image, keypoints, m, idx, epoch, *extra

    def chunk_tables(self, epoch: tf.Tensor, images: tf.Tensor, chunk: tf.Tensor):
        """:meth:`epoch_tables` of the images ``images`` [m] (distinct), in that order: a
        builder restricted to them (in image order) draws with ``chunk`` folded in."""
        perm = tf.argsort(images)
        ascending = tf.gather(images, perm)
        sub = tf.gather(
            tf.RaggedTensor.from_row_splits(self.flat_members, self.splits, validate=False),
            ascending,
        )
        view = object.__new__(type(self))
        view.__dict__.update(self.__dict__)
        view.flat_members, view.splits = sub.flat_values, sub.row_splits
        view.member_group = sub.value_rowids()
        view.paths, view.hw = tf.gather(self.paths, ascending), tf.gather(self.hw, ascending)
        view.is_jpeg, view.num_groups = tf.gather(self.is_jpeg, ascending), tf.size(images)
        return view.epoch_tables(epoch, tf.argsort(perm), chunk)

    def epochs(self, shuffle: bool, repeat: bool) -> tf.data.Dataset:
        """Per image :meth:`epoch_tables`; images permuted per epoch (stateless) if shuffling.

        Above :data:`CHUNK_IMAGES` images, each epoch is computed a chunk of that many images
        (in epoch order) at a time, as the epoch goes: the first batch and the memory held do
        not grow with the dataset. (Random draws are then keyed by chunk too.)
        """
        g, size = self.num_groups, CHUNK_IMAGES
        chunks = -(-g // size)

        def one_epoch(e):
            order = tf.range(g, dtype=tf.int64)
            if shuffle:
                u = tf.random.stateless_uniform([g], seed=tf.stack([self.seed + 2, e]))
                order = tf.gather(order, tf.argsort(u))
            if chunks <= 1:
                return tf.data.Dataset.from_tensor_slices(self.epoch_tables(e, order))
            tables = tf.data.Dataset.range(chunks).map(
                lambda c: self.chunk_tables(e, order[c * size : (c + 1) * size], c)
            )
            return tables.flat_map(lambda *t: tf.data.Dataset.from_tensor_slices(t))

        if repeat:
            return tf.data.Dataset.counter().flat_map(one_epoch)
        # One pass; each new iteration (a new Keras epoch) draws a fresh, seeded epoch key.
        key = tf.data.Dataset.random(seed=self.seed, rerandomize_each_iteration=True).take(1)
        return key.map(lambda k: k % 2**40).flat_map(one_epoch)


def build_dataset(
    records: Sequence[InstanceRecord],
    spec: KeypointSpec,
    config: PipelineConfig,
    batch_size: int,
    training: bool,
    seed: int = 0,
    shuffle: bool | None = None,
    repeat: bool = False,
    with_meta: bool = False,
    input_context: tf.distribute.InputContext | None = None,
    on_error: str = "raise",
    drop_remainder: bool | None = None,
    check_images: bool | None = None,
) -> tf.data.Dataset:
    """A batched tf.data pipeline of input crops and heatmap-coordinate keypoints.

    Args:
        records: instances (any source); image files are checked up front. A
            :class:`kpnet.data.tfrecord.TFRecordSet` streams its TFRecord files instead
            (:func:`kpnet.data.tfrecord.build_tfrecord_dataset`, same arguments).
        spec: the keypoint spec (K keypoints, flip pairs).
        config: geometry and augmentation (:class:`PipelineConfig`).
        batch_size: the GLOBAL batch size. With ``input_context`` the dataset batches
            ``input_context.get_per_replica_batch_size(batch_size)`` and reads only its
            shard of the images (``input_pipeline_id`` of ``num_input_pipelines``): use it from
            ``strategy.distribute_datasets_from_function(lambda ctx: build_dataset(...,
            input_context=ctx))``. Without a context the dataset yields global batches, which
            ``strategy.experimental_distribute_dataset`` splits across replicas (auto-shard
            policy DATA).
        training: augment (and extend top-down boxes); default shuffling.
        seed: everything random is a stateless function of (seed, epoch, image/record).
        shuffle: shuffle images per epoch and instances in a buffer (default: ``training``).
        repeat: repeat forever (epoch e gets fresh augmentation); else one pass.
        with_meta: also yield ``{"affine": [B,2,3] image -> input crop, "index": [B]
            (into ``records``), "image_hw": [B, 2] image (H, W)}``.
        input_context: see ``batch_size``.
        on_error: ``"raise"`` (DataError naming file and record) or ``"skip"`` (drop them).
        drop_remainder: drop a last partial batch (default: ``training``).
        check_images: open every image file up front (size, format, truncation); None:
            only up to :data:`CHECK_IMAGES_LIMIT` files, beyond that the records' image
            sizes (the annotations') are used when every record has one, so start-up does
            not read the whole dataset (a bad file then fails, or is skipped, in tf.data).

    Returns:
        ``(images [B,H,W,3], keypoints float32 [B,K,3])``, plus ``meta`` if asked; images
        are uint8 when training, float32 (0..255, :func:`kpnet.crops.sample_crops`) else.
    """
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error: {on_error!r} is not 'raise' or 'skip'")
    if int(batch_size) <= 0:
        raise ValueError(f"batch_size: must be > 0, got {batch_size}")
    from kpnet.data.tfrecord import TFRecordSet, build_tfrecord_dataset

    if isinstance(records, TFRecordSet):
        return build_tfrecord_dataset(
            records, spec, config, batch_size, training, seed=seed, shuffle=shuffle,
            repeat=repeat, with_meta=with_meta, input_context=input_context,
            on_error=on_error, drop_remainder=drop_remainder,
        )  # fmt: skip
    if not isinstance(records, RecordTable):
        records = list(records)
    if not len(records):
        raise DataError("build_dataset: no records (check the annotation file and filters)")
    shuffle = training if shuffle is None else bool(shuffle)
    drop_remainder = training if drop_remainder is None else bool(drop_remainder)
    cols = _record_arrays(records, spec)
    keep, hw, is_jpeg, usable = _check_files(
        cols, records, on_error, check_images, config.max_pixels
    )
    groups = _group(cols, keep, consecutive=not shuffle)
    if not len(groups):
        raise DataError("build_dataset: every record's image file is unusable")
    if input_context is not None:
        groups = groups.shard(input_context.input_pipeline_id, input_context.num_input_pipelines)
        batch_size = input_context.get_per_replica_batch_size(batch_size)
    total = len(groups.members)
    if drop_remainder and not repeat and total < batch_size:
        raise DataError(
            f"build_dataset: {total} instances are fewer than one batch of "
            f"{batch_size} with drop_remainder; lower the batch size or pass repeat=True"
        )
    b = _Builder(spec, config, training, seed, cols, groups, hw, is_jpeg, usable, on_error)
    ds = b.epochs(shuffle, repeat).map(b.load, num_parallel_calls=AUTOTUNE, deterministic=True)
    num = total if not repeat and on_error == "raise" else None
    return _finish(ds, b, batch_size, training, shuffle, drop_remainder, with_meta, seed,
                   num, input_context is not None)  # fmt: skip


def _finish(ds, b, batch_size, training, shuffle, drop_remainder, with_meta, seed,
            num_instances: int | None, sharded: bool) -> tf.data.Dataset:  # fmt: skip
    """Per-image ``b.load`` outputs -> instances -> albumentations, shuffle, batches, meta.

    ``num_instances``: one pass's instances (a known length for Keras), else None;
    ``sharded``: each input pipeline already reads its own share (auto-shard OFF).
    """
    config, on_error = b.config, b.on_error
    if on_error == "skip":
        ds = ds.ignore_errors(log_warning=True)
    ds = ds.unbatch()
    if training and b.albu is not None:
        ds = ds.map(b.albumentations, num_parallel_calls=AUTOTUNE, deterministic=True)
    if shuffle and config.shuffle_buffer > 1:
        ds = ds.shuffle(config.shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
    ds = ds.batch(batch_size, drop_remainder=drop_remainder, num_parallel_calls=AUTOTUNE,
                  deterministic=True)  # fmt: skip
    if num_instances is not None:  # known length: Keras sizes epochs without warnings
        ds = ds.apply(tf.data.experimental.assert_cardinality(
            _num_batches(num_instances, batch_size, drop_remainder)))  # fmt: skip
    if with_meta:
        ds = ds.map(lambda im, kp, m, i, e, *extra: (
            im, kp, {"affine": m, "index": i, "image_hw": b.image_hw(i, *extra)}))  # fmt: skip
    else:
        ds = ds.map(lambda im, kp, m, i, e, *extra: (im, kp))
    options = tf.data.Options()
    options.deterministic = True
    options.experimental_distribute.auto_shard_policy = (
        tf.data.experimental.AutoShardPolicy.OFF
        if sharded
        else tf.data.experimental.AutoShardPolicy.DATA
    )
    return ds.prefetch(AUTOTUNE).with_options(options)


def _num_batches(num_samples: int, batch_size: int, drop_remainder: bool) -> int:
    """Batches in one pass over ``num_samples``."""
    return num_samples // batch_size if drop_remainder else -(-num_samples // batch_size)
