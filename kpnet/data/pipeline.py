"""The tf.data pipeline: records -> (uint8 input crops, keypoints in input-crop pixels).

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
   record order; at training all of a file's records do: :mod:`kpnet.data.columns`); image
   sizes come from the file headers, read up front (above
   :data:`kpnet.data.columns.CHECK_IMAGES_LIMIT` files, from the records: the annotations'
   sizes); a :class:`kpnet.data.tfrecord.TFRecordSet` is streamed instead,
   through the same geometry (:func:`build_tfrecord_dataset`, below);
2. at the start of each epoch (above :data:`CHUNK_IMAGES` images: of each chunk of that
   many, as the epoch goes), ONE batched graph call gives every instance its [2, 3] affine
   matrix (image -> input crop, pixel centres at integer coordinates, see
   :mod:`kpnet.codec`) from its box (or the whole image) and the random augmentation
   (:mod:`kpnet.data.augment`, stateless, keyed by seed, epoch and record, so a run is
   reproducible whatever the parallelism), its colour jitter and its output keypoints
   (the same matrix; a flip permutes them with ``spec.flip_index``; points leaving the crop
   become v = 0 with (x, y) = 0; the losses encode them on the device with the codec),
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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import cv2
import numpy as np
import tensorflow as tf

from kpnet import codec
from kpnet.crops import reduced_matrices, reduction_ratios, sample_crops
from kpnet.data import augment as aug
from kpnet.data import images
from kpnet.data.columns import Columns, Groups, check_files, group, record_arrays
from kpnet.data.images import MAX_PIXELS
from kpnet.data.records import DataError, InstanceRecord, RecordTable
from kpnet.data.tfrecord import TFRecordSet, parse_examples
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

    def __init__(self, spec, config, training, seed, cols: Columns, groups: Groups,
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
            center = aug.shift_centers(
                cfg.augment, tf.random.experimental.stateless_fold_in(seeds[0], 1), center, size
            )
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
        """Keypoints [n,K,3] in input-crop pixels; flipped order; outside / unlabelled -> 0."""
        kp = tf.gather(self.keypoints, idx)
        xy = codec.transform_points(kp[..., :2], m)
        v = kp[..., 2]
        flipped = (m[:, 0, 0] * m[:, 1, 1] - m[:, 0, 1] * m[:, 1, 0]) < 0  # det < 0: mirrored
        xy = tf.where(flipped[:, None, None], tf.gather(xy, self.flip_index, axis=1), xy)
        v = tf.where(flipped[:, None], tf.gather(v, self.flip_index, axis=1), v)
        h, w = self.config.input_size
        x, y = xy[..., 0], xy[..., 1]
        inside = (v > 0) & (x >= -0.5) & (x < w - 0.5) & (y >= -0.5) & (y < h - 0.5)
        xy = tf.where(inside[..., None], xy, 0.0)
        return tf.concat([xy, tf.where(inside, v, 0.0)[..., None]], axis=-1)

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
        seed: everything random is a stateless function of (seed, epoch, image/record);
            a one-pass dataset's epoch key also follows TensorFlow's global seed
            (``keras.utils.set_random_seed``, which ``kpnet fit`` sets from ``train.seed``).
        shuffle: shuffle images per epoch and instances in a buffer (default: ``training``).
        repeat: repeat forever (epoch e gets fresh augmentation); else one pass.
        with_meta: also yield ``{"affine": [B,2,3] image -> input crop, "index": [B]
            (into ``records``), "image_hw": [B, 2] image (H, W)}``.
        input_context: see ``batch_size``.
        on_error: ``"raise"`` (DataError naming file and record) or ``"skip"`` (drop them).
        drop_remainder: drop a last partial batch (default: ``training``).
        check_images: open every image file up front (size, format, truncation); None:
            only up to :data:`kpnet.data.columns.CHECK_IMAGES_LIMIT` files, beyond that the
            records' image sizes (the annotations') are used when every record has one, so
            start-up does not read the whole dataset (a bad file then fails, or is skipped,
            in tf.data).

    Returns:
        ``(images [B,H,W,3], keypoints float32 [B,K,3] in input-crop pixels)``, plus ``meta``
        if asked; images are uint8 when training, float32 (0..255,
        :func:`kpnet.crops.sample_crops`) else.
    """
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error: {on_error!r} is not 'raise' or 'skip'")
    if int(batch_size) <= 0:
        raise ValueError(f"batch_size: must be > 0, got {batch_size}")
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
    cols = record_arrays(records, spec)
    keep, hw, is_jpeg, usable = check_files(
        cols, records, on_error, check_images, config.max_pixels
    )
    groups = group(cols, keep, consecutive=not shuffle)
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


# --------------------------------------------------------------------------- TFRecord sets
#: Images whose crop geometry is computed in one graph call while streaming.
BLOCK_IMAGES = 64
#: Shards read at once (interleaved) when shuffling; image shuffle buffer.
CYCLE_LENGTH, IMAGE_BUFFER = 16, 1024


class _StreamBuilder(_Builder):
    """The folder pipeline's builder, fed one block of streamed images at a time."""

    def __init__(self, tset: TFRecordSet, spec, config, training, seed, on_error):
        self.spec, self.config, self.training, self.seed = spec, config, training, int(seed)
        self.on_error = on_error
        self.num_records = len(tset)
        self.flip_index = tf.constant(spec.flip_index, tf.int32)
        a = config.augment
        self.upper = a.upper_body_index(spec) if a.half_body_prob > 0 else None
        if training and a.half_body_prob > 0 and self.upper is None:
            raise ValueError(
                "augment.half_body_prob > 0 needs augment.upper_body for a non-COCO spec"
            )
        self.albu = aug.AlbumentationsOp(a.photometric) if a.photometric else None

    def read(self, path: tf.Tensor) -> tf.Tensor:
        return path  # the example holds the encoded image itself

    def image_hw(self, idx: tf.Tensor, *extra: tf.Tensor) -> tf.Tensor:
        return extra[0]

    def block(self, epoch: tf.Tensor, number: tf.Tensor, serialized: tf.Tensor):
        """Per image of a block of serialized examples: :meth:`epoch_tables`' outputs
        (record indices into the converted list) plus each instance's image (H, W)."""
        p = parse_examples(serialized, self.spec.num_keypoints)
        blk = object.__new__(_StreamBuilder)
        blk.__dict__.update(self.__dict__)
        splits = p["splits"]
        counts = splits[1:] - splits[:-1]
        n_images = tf.shape(p["image"], out_type=tf.int64)[0]
        blk.seed_t = tf.constant(self.seed, tf.int64) * 1_000_003 + number
        blk.paths, blk.hw, blk.splits = p["image"], p["hw"], splits
        blk.is_jpeg = tf.strings.substr(p["image"], 0, 3) == _JPEG
        blk.keypoints, blk.boxes = p["keypoints"], p["boxes"]
        blk.flat_members = tf.range(splits[-1])
        blk.member_group = tf.repeat(tf.range(n_images), counts)
        blk.num_groups = tf.cast(n_images, tf.int32)
        tables = list(blk.epoch_tables(epoch, tf.range(n_images)))
        local = tables[-1]
        tables[-1] = local.with_flat_values(tf.gather(p["index"], local.flat_values))
        hw = tf.RaggedTensor.from_row_splits(
            tf.gather(p["hw"], blk.member_group), splits, validate=False
        )
        # padded, not ragged: unbatching ragged elements costs ~0.4 ms per image
        dense = [t.to_tensor() if isinstance(t, tf.RaggedTensor) else t for t in (*tables, hw)]
        return (*dense, counts)

    def load_streamed(self, *tables):
        """:meth:`load` of one image of a :meth:`block` (padded instances cut back)."""
        *head, hw, count = tables
        head[4:] = [t[:count] for t in head[4:]]  # per instance: warps ... record indices
        return (*self.load(*head), hw[:count])


def build_tfrecord_dataset(
    tset: TFRecordSet,
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
) -> tf.data.Dataset:
    """:func:`kpnet.data.pipeline.build_dataset` for a :class:`TFRecordSet` (same arguments
    and outputs; ``meta["index"]`` indexes the converted record list).

    With ``input_context`` this input pipeline reads only shards ``i::n`` (whole files).
    """
    if spec.num_keypoints != tset.spec.num_keypoints:
        raise DataError(
            f"{tset.root}: holds {tset.spec.num_keypoints} keypoints per instance, "
            f"the spec has {spec.num_keypoints}; convert with the right spec"
        )
    shuffle = training if shuffle is None else bool(shuffle)
    drop_remainder = training if drop_remainder is None else bool(drop_remainder)
    files, counts = list(tset.files), list(tset.shard_records)
    if input_context is not None:
        pid, num = input_context.input_pipeline_id, input_context.num_input_pipelines
        if len(files) < num:
            raise DataError(
                f"{tset.root}: {len(files)} TFRecord shard(s) for {num} input pipelines "
                f"(workers); each reads whole shards: convert again with --shards {num} or more"
            )
        files, counts = files[pid::num], counts[pid::num]
        batch_size = input_context.get_per_replica_batch_size(batch_size)
    num = sum(counts)
    if not num:
        raise DataError(f"{tset.root}: the TFRecord set holds no instances")
    if drop_remainder and not repeat and num < batch_size:
        raise DataError(
            f"build_dataset: {num} instances are fewer than one batch of {batch_size} with "
            "drop_remainder; lower the batch size or pass repeat=True"
        )
    b = _StreamBuilder(tset, spec, config, training, seed, on_error)
    names = tf.constant(files)

    def one_epoch(epoch: tf.Tensor) -> tf.data.Dataset:
        order = names
        if shuffle and len(files) > 1:
            u = tf.random.stateless_uniform([len(files)], seed=tf.stack([b.seed + 5, epoch]))
            order = tf.gather(names, tf.argsort(u))
        ds = tf.data.Dataset.from_tensor_slices(order)
        if shuffle:
            ds = ds.interleave(tf.data.TFRecordDataset, min(len(files), CYCLE_LENGTH), 1,
                               num_parallel_calls=AUTOTUNE, deterministic=True)  # fmt: skip
            ds = ds.shuffle(IMAGE_BUFFER, seed=b.seed + 7)
        else:
            ds = ds.flat_map(tf.data.TFRecordDataset)
        ds = ds.batch(BLOCK_IMAGES).enumerate()
        ds = ds.map(lambda i, s: b.block(epoch, i, s), num_parallel_calls=AUTOTUNE,
                    deterministic=True)  # fmt: skip
        return ds.unbatch()

    if repeat:
        ds = tf.data.Dataset.counter().flat_map(one_epoch)
    else:
        key = tf.data.Dataset.random(seed=b.seed, rerandomize_each_iteration=True).take(1)
        ds = key.map(lambda k: k % 2**40).flat_map(one_epoch)
    ds = ds.map(b.load_streamed, num_parallel_calls=AUTOTUNE, deterministic=True)
    known = num if not repeat and on_error == "raise" else None
    return _finish(ds, b, batch_size, training, shuffle, drop_remainder, with_meta,
                      seed, known, input_context is not None)  # fmt: skip
