"""Running a keypoints model: over validation records (fit, evaluate) and over new images or
video frames (predict). One loop, one codec, one crop sampler, so every path gives the same
keypoints for the same pixels.

* records (``kpnet fit`` validation, ``kpnet evaluate``): :func:`evaluate_model`,
  :func:`evaluate_detections`, :func:`predict_records` read crops from the evaluation
  pipeline (:func:`kpnet.data.pipeline.build_dataset` with ``training=False``);
* new images (``kpnet predict``, your own code): :class:`Predictor`.

Both crop with the model's :class:`kpnet.codec.Codec` (``Codec.crop_matrices``), sample with
:func:`kpnet.crops.sample_crops` and map back with :func:`kpnet.codec.crop_to_image`, exactly
as the SavedModel does (:mod:`kpnet.export`).

Example:
    >>> import numpy as np, keras
    >>> from kpnet.codec import Codec
    >>> from kpnet.inference import build_keypoints_model
    >>> from kpnet.spec import KeypointSpec
    >>> images = keras.Input((64, 64, 3))
    >>> net = keras.Model(images, keras.layers.Conv2D(1, 4, strides=4)(images))
    >>> model = build_keypoints_model(net, KeypointSpec(names=("tip",)), Codec((64, 64)))
    >>> xy, scores = Predictor(model).predict(np.zeros((48, 80, 3), np.uint8))
    >>> xy.shape, scores.shape        # one instance (the whole frame), one keypoint
    ((1, 1, 2), (1, 1))
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import keras
import numpy as np
import tensorflow as tf
from keras import ops

from kpnet.codec import Codec, crop_to_image
from kpnet.crops import sample_crops
from kpnet.data.pipeline import build_dataset
from kpnet.data.records import DataError, InstanceRecord
from kpnet.evaluate import coco_keypoint_ap, evaluate_predictions, to_coco_results
from kpnet.frames import read_image
from kpnet.inference import codec_of, decoder_of, with_heatmaps
from kpnet.spec import KeypointSpec


# --------------------------------------------------------------------------- records
def predict_records(
    keypoints_model: Any, batches: Iterable[Any], num_records: int
) -> tuple[np.ndarray, np.ndarray]:
    """Run a keypoints model on ``(images, keypoints, meta)`` batches; image-px predictions.

    ``meta["affine"]`` maps image -> crop, ``meta["image_hw"]`` gives the image sizes and
    ``meta["index"]`` each sample's record index. Returns (xy [N, K, 2], scores [N, K]) in
    record order, keypoints clipped to their image (:func:`kpnet.codec.crop_to_image`).
    """
    xy = scores = None
    seen = np.zeros(num_records, bool)
    for images, _, meta in batches:
        kp, sc = _predict(keypoints_model, images)
        if xy is None:
            xy = np.zeros((num_records, kp.shape[1], 2), np.float32)
            scores = np.zeros((num_records, kp.shape[1]), np.float32)
        index = np.asarray(meta["index"]).astype(np.int64)
        xy[index] = _numpy(crop_to_image(kp, meta["affine"], meta["image_hw"]))
        scores[index] = sc
        seen[index] = True
    if not seen.all():
        raise DataError(
            f"evaluate: {int((~seen).sum())} of {num_records} records got no "
            "prediction (the dataset skipped them); fix or drop those records"
        )
    return xy, scores


def evaluate_model(
    keypoints_model: Any,
    records: Sequence[InstanceRecord],
    spec: KeypointSpec,
    pipeline_config: Any,
    batch_size: int = 32,
    **metric_options: Any,
) -> dict[str, Any]:
    """Predict every record through the evaluation pipeline and compute all metrics.

    Example:
        >>> m = evaluate_model(kpnet.load_model("runs/pins"), records, spec,
        ...                    PipelineConfig())                       # doctest: +SKIP

    The crops follow ``pipeline_config.codec`` (the recipe's, which fit also saves in the
    keypoints model). ``metric_options`` go to :func:`kpnet.evaluate.evaluate_predictions`.
    The result also holds ``predictions``: COCO keypoint results.
    """
    xy, scores = _predict_all(keypoints_model, records, spec, pipeline_config, batch_size)
    metrics = evaluate_predictions(xy, scores, records, spec, **metric_options)
    metrics["crops"] = crop_source(pipeline_config.codec)
    metrics["predictions"] = to_coco_results(records, xy, scores)
    return metrics


def crop_source(codec: Codec, detections: bool = False) -> str:
    """Where validation crops come from, for reports: whole frames, detector boxes, or boxes
    from the labels ("oracle boxes": a number no user gets on new frames without boxes)."""
    if codec.mode == "two_stage":
        return "two stages: whole frames, then crops around the found keypoints (as kpnet " \
            "predict on new frames)"
    if codec.mode != "topdown":
        return "whole frames (as kpnet predict on new frames)"
    if detections:
        return "detector boxes"
    return "oracle boxes (from the labels; new frames need --boxes from a detector)"


def evaluate_detections(
    keypoints_model: Any,
    detections: Sequence[InstanceRecord],
    spec: KeypointSpec,
    pipeline_config: Any,
    ground_truth: Any,
    batch_size: int = 32,
    oks_nms_threshold: float | None = None,
) -> dict[str, Any]:
    """COCO keypoint AP of a model on detector boxes, against the ground-truth json.

    The top-down protocol of CPN and SimpleBaselines: one crop per detection (records from
    :func:`kpnet.data.coco.load_coco_records` with ``boxes_file``), instance score = the
    detection score times the mean confident keypoint score, optional per-image OKS-NMS,
    then pycocotools against every ground-truth instance of the evaluated images (missed
    people count, as do false detections).

    Returns ``{"num_detections", "coco": coco_keypoint_ap(...), "predictions"}``.
    """
    if spec.sigmas is None:
        raise DataError("evaluate: detection boxes are scored by OKS AP, which needs spec.sigmas")
    xy, scores = _predict_all(keypoints_model, detections, spec, pipeline_config, batch_size)
    predictions = to_coco_results(detections, xy, scores)
    coco = coco_keypoint_ap(ground_truth, predictions, spec.sigmas, oks_nms_threshold)
    return {"num_detections": len(detections), "coco": coco, "predictions": predictions}


def _predict_all(model, records, spec, pipeline_config, batch_size):
    """(xy [N, K, 2], scores [N, K]) in image pixels for every record, via the eval pipeline
    (two-stage models: :class:`Predictor` on each record's whole image, as on new frames)."""
    if pipeline_config.codec.mode == "two_stage":
        return _predict_frames(model, records, pipeline_config.codec, batch_size)
    dataset = build_dataset(
        records, spec, pipeline_config, batch_size, training=False, with_meta=True
    )
    return predict_records(model, dataset.as_numpy_iterator(), len(records))


def _predict_frames(model, records, codec, batch_size):
    """Predict each record's image as a new frame (no box: the subject is found first)."""
    items = ((i, read_image(r.image_path), None) for i, r in enumerate(records))
    xy = np.zeros((len(records), 0, 2), np.float32)
    scores = np.zeros((len(records), 0), np.float32)
    for i, kp, sc, _ in Predictor(model, codec).run(items, batch_size):
        if not xy.shape[1]:
            xy = np.zeros((len(records), kp.shape[1], 2), np.float32)
            scores = np.zeros((len(records), kp.shape[1]), np.float32)
        xy[i], scores[i] = kp[0], sc[0]
    return xy, scores


def _predict(model: Any, images: Any) -> tuple[np.ndarray, np.ndarray]:
    out = model.predict_on_batch(images) if hasattr(model, "predict_on_batch") else model(images)
    kp = _numpy(out["keypoints"]).astype(np.float32)
    return kp[..., :2], _numpy(out["scores"]).astype(np.float32)


def _numpy(x: Any) -> np.ndarray:
    return np.asarray(ops.convert_to_numpy(x))


# --------------------------------------------------------------------------- new images
class Predictor:
    """Keypoints of new images in image pixels, with the model's own codec and sampler.

    Args:
        keypoints_model: a keypoints model (:func:`kpnet.inference.load_model`).
        codec: override the model's codec (e.g. another box padding); default: the model's.
    """

    def __init__(self, keypoints_model: Any, codec: Codec | None = None) -> None:
        self.model = keypoints_model
        self.codec = codec or codec_of(keypoints_model)
        self.spec = decoder_of(keypoints_model).spec
        self._sample = _sampler()
        self._matrices: dict[tuple, np.ndarray] = {}

    def crops(self, image: np.ndarray, boxes: np.ndarray | None = None):
        """(float32 crops [n, H, W, 3], matrices [n, 2, 3]) of one RGB image's boxes [n, 4]
        (x, y, w, h); None, or a box with w <= 0 or h <= 0, is the whole image."""
        image = np.asarray(image)
        if image.ndim != 3 or image.shape[-1] != 3:
            raise DataError(f"predict: an image must be RGB [H, W, 3], got shape {image.shape}")
        boxes = np.zeros((1, 4), np.float32) if boxes is None else boxes
        boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
        return self._crops_stacked(image[None], boxes, np.zeros(len(boxes), np.int32))

    def _crops_stacked(
        self, images: np.ndarray, boxes: np.ndarray, image_of: np.ndarray, as_tensor: bool = False
    ):
        """:meth:`crops` of a stack of same-size images [N, H, W, 3] in one sampler call;
        box i lies in image ``image_of[i]`` (``as_tensor``: the crops as the sampler's tensor,
        for the model's next call). Whole-frame matrices repeat every batch: cached."""
        hw = np.tile(np.array(images.shape[1:3], np.float32), (len(boxes), 1))
        key = (self.codec, boxes.tobytes(), hw.tobytes())
        matrices = self._matrices.get(key)
        if matrices is None:
            matrices = _numpy(self.codec.crop_matrices(boxes, hw))
            if len(self._matrices) > 64:
                self._matrices.clear()
            self._matrices[key] = matrices
        crops = self._sample(images, matrices, self.codec.input_size,
                             np.asarray(image_of, np.int32))  # fmt: skip
        return (crops if as_tensor else _numpy(crops)), matrices

    def predict(
        self, image: np.ndarray, boxes: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """(keypoints [n, K, 2] image px, scores [n, K]) of one image's boxes (see crops)."""
        (_, xy, scores, _), = self.run([(None, image, boxes)])
        return xy, scores

    def run(
        self, items: Iterable[tuple[Any, np.ndarray, np.ndarray | None]], batch_size: int = 16,
        keep_crops: bool = False,
    ) -> Iterator[tuple[Any, np.ndarray, np.ndarray, dict[str, np.ndarray] | None]]:  # fmt: skip
        """For each ``(key, image, boxes)`` yield ``(key, keypoints, scores, extra)``, in
        order, batching crops of consecutive images (``extra``: crops and heatmaps when
        ``keep_crops``, else None). Two-stage models run both stages
        (:meth:`kpnet.codec.Codec.locate`)."""
        model = with_heatmaps(self.model) if keep_crops else self.model
        batch: list[tuple[Any, np.ndarray, np.ndarray]] = []
        for key, image, boxes in items:
            image = np.asarray(image)
            boxes = np.zeros((1, 4), np.float32) if boxes is None else np.asarray(boxes, "f4")
            batch.append((key, image, boxes.reshape(-1, 4)))
            if sum(len(b) for _, _, b in batch) >= batch_size:
                yield from self._batch(model, batch, keep_crops)
                batch = []
        if batch:
            yield from self._batch(model, batch, keep_crops)

    def _batch(self, model, batch, keep_crops):
        images = [image for _, image, _ in batch]
        counts = [len(b) for _, _, b in batch]
        image_of = np.repeat(np.arange(len(batch)), counts)
        last: dict[str, np.ndarray] = {}

        # video frames (one size, RGB): one sampler call for the whole batch
        same_size = len(images) > 1 and len({image.shape for image in images}) == 1
        same_size = same_size and images[0].ndim == 3 and images[0].shape[-1] == 3

        def locate(boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            if same_size:
                boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
                c, m = self._crops_stacked(np.stack(images), boxes, image_of,
                                           as_tensor=_tf_backend())  # fmt: skip
                last.update(crops=c, matrices=m)  # stays a tensor: no copy to NumPy and back
            else:
                crops, matrices = [], []
                for i, image in enumerate(images):
                    c, m = self.crops(image, boxes[image_of == i])
                    crops.append(c)
                    matrices.append(m)
                last.update(crops=np.concatenate(crops), matrices=np.concatenate(matrices))
            out = self._forward(model, last["crops"])
            last.update(out)
            hw = np.array([images[i].shape[:2] for i in image_of], np.float32).reshape(-1, 2)
            xy = _numpy(crop_to_image(out["keypoints"][..., :2], last["matrices"], hw))
            return xy, out["scores"]

        xy, scores = self.codec.locate(np.concatenate([b for _, _, b in batch]), locate)
        start = 0
        for (key, _, _), n in zip(batch, counts, strict=True):
            part = slice(start, start + n)
            extra = None
            if keep_crops:
                crops = _numpy(last["crops"][part])
                extra = {"crops": crops, "heatmaps": last["heatmaps"][part]}
            yield key, xy[part], scores[part], extra
            start += n

    def _forward(self, model, crops: np.ndarray) -> dict[str, np.ndarray]:
        if len(crops):
            return {k: _numpy(v) for k, v in model.predict_on_batch(crops).items()}
        k, c = self.spec.num_keypoints, self.spec.num_channels  # no boxes in these images
        h, w = self.codec.heatmap_size
        return {"keypoints": np.zeros((0, k, 2), np.float32),
                "scores": np.zeros((0, k), np.float32),
                "heatmaps": np.zeros((0, h, w, c), np.float32)}  # fmt: skip


_SAMPLER: list[Any] = []


def _tf_backend() -> bool:
    """True under Keras' TensorFlow backend (a model then takes the sampler's tensor as is)."""
    return keras.backend.backend() == "tensorflow"


def _sampler():
    """:func:`kpnet.crops.sample_crops` as one traced TensorFlow function (shared)."""
    if not _SAMPLER:
        def sample(images, matrices, output_size, index):
            return sample_crops(images, matrices, output_size, image_index=index)

        _SAMPLER.append(tf.function(sample, reduce_retracing=True))
    return _SAMPLER[0]
