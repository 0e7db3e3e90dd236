"""Evaluation: OKS AP (pycocotools, custom sigmas), pixel errors, PCK, pin matching, OKS-NMS.

Example:
    >>> import numpy as np
    >>> from kpnet.data.records import InstanceRecord
    >>> from kpnet.spec import KeypointSpec
    >>> spec = KeypointSpec(names=("a", "b"))
    >>> gt = np.array([[10, 10, 2], [20, 10, 2]], np.float32)
    >>> rec = InstanceRecord("img.png", box=(0, 0, 100, 50), keypoints=gt)
    >>> m = evaluate_predictions(np.array([[[16, 18], [20, 10]]]), np.ones((1, 2)), [rec], spec)
    >>> m["overall"]["mean"], m["overall"]["pck@0.05"]
    (5.0, 0.5)

Conventions: pixel errors are Euclidean distances in image pixels over labelled (v > 0)
ground-truth points. PCK@t counts a point as correct when its error is at most t times the
*box size* ``max(w, h)`` of the record's box. OKS AP builds a COCO ground truth from the
records with ``area = w * h`` of the box (COCO itself uses the segmentation area).
"""

from __future__ import annotations

import contextlib
import copy
import io
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy.optimize import linear_sum_assignment

from kpnet.data.coco import read_json
from kpnet.data.records import DataError, InstanceRecord
from kpnet.spec import COCO17_SIGMAS, KeypointSpec

COCO_STAT_NAMES = ("AP", "AP50", "AP75", "APm", "APl", "AR", "AR50", "AR75", "ARm", "ARl")
#: tf-cpn rescoring: an instance's score is the mean of its keypoint scores above this.
RESCORE_THRESHOLD = 0.2
_DT_KEYS = ("image_id", "category_id", "keypoints", "score")


# --------------------------------------------------------------------------- OKS AP
def coco_keypoint_ap(
    gt: str | Path | Mapping[str, Any],
    dt: str | Path | Sequence[Mapping[str, Any]],
    sigmas: Sequence[float] | None = None,
    oks_nms_threshold: float | None = None,
    verbose: bool = False,
) -> dict[str, Any]:
    """COCO keypoint AP/AR with pycocotools, for any keypoint set.

    Example:
        >>> r = coco_keypoint_ap("val.json", "preds.json")  # doctest: +SKIP
        >>> round(r["AP"], 3), round(r["AP50"], 3)            # doctest: +SKIP
        (0.861, 0.993)

    Args:
        gt: COCO ground truth (path or dict); a missing ``area`` is taken from the box (w*h).
        dt: COCO keypoint results (path or list); fields other than image_id, category_id,
            keypoints and score (e.g. center, scale) are dropped.
        sigmas: per-keypoint OKS sigmas; None = the 17 COCO sigmas (needs K = 17).
        oks_nms_threshold: when set, apply :func:`oks_nms` per image to the results first.
        verbose: let pycocotools print its progress and summary.

    Returns:
        dict with the ten named stats (AP, AP50, ..., ARl), ``stats`` (the raw list),
        ``summary`` (pycocotools' printed summary), ``num_gt`` and ``num_dt``.
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    gt_name, dt_name = _name(gt, "ground truth"), _name(dt, "predictions")
    gt_data, num_kp = _prepare_gt(_load_json(gt, gt_name), gt_name)
    sig = _check_sigmas(sigmas, num_kp, gt_name)
    image_ids = {img["id"] for img in gt_data["images"]}
    results = _prepare_dt(_load_json(dt, dt_name), dt_name, image_ids, num_kp)
    if oks_nms_threshold is not None:
        results = _nms_per_image(results, sig, oks_nms_threshold)
    results = [{k: r[k] for k in _DT_KEYS} for r in results]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        coco_gt = COCO()
        coco_gt.dataset = gt_data
        coco_gt.createIndex()
        evaluator = COCOeval(coco_gt, coco_gt.loadRes(results), "keypoints")
        evaluator.params.kpt_oks_sigmas = sig
        evaluator.evaluate()
        evaluator.accumulate()
        start = out.tell()
        evaluator.summarize()
    if verbose:
        print(out.getvalue(), end="")
    stats = [float(s) for s in evaluator.stats]
    summary = out.getvalue()[start:]
    named: dict[str, Any] = {k: round(v, 6) for k, v in zip(COCO_STAT_NAMES, stats, strict=True)}
    named.update(stats=stats, summary=summary, num_gt=len(gt_data["annotations"]))
    named["num_dt"] = len(results)
    return named


def _name(obj: Any, what: str) -> str:
    return str(obj) if isinstance(obj, (str, Path)) else f"in-memory {what}"


def _load_json(obj: Any, name: str) -> Any:
    if not isinstance(obj, (str, Path)):
        return copy.deepcopy(obj)
    return read_json(obj)


def _prepare_gt(data: Any, name: str) -> tuple[dict[str, Any], int]:
    """Validate a COCO ground truth and fill what COCOeval needs (area, iscrowd, ids)."""
    if not isinstance(data, dict) or not isinstance(data.get("annotations"), list):
        raise DataError(f"{name}: expected a COCO dict with an 'annotations' list")
    num_kp = None
    for i, ann in enumerate(data["annotations"]):
        where = f"{name}: annotation {ann.get('id', f'#{i}')}"
        for key in ("image_id", "keypoints"):
            if key not in ann:
                raise DataError(f"{where}: missing '{key}'")
        kp = np.asarray(ann["keypoints"], np.float64)
        if kp.ndim != 1 or kp.size % 3 or (num_kp is not None and kp.size // 3 != num_kp):
            raise DataError(f"{where}: 'keypoints' must hold {num_kp or 'K'} (x, y, v) triples")
        num_kp = kp.size // 3
        if "area" not in ann:
            if "bbox" not in ann:
                raise DataError(f"{where}: needs 'area' or 'bbox' (OKS scales by the area)")
            ann["area"] = float(ann["bbox"][2]) * float(ann["bbox"][3])
        ann.setdefault("iscrowd", 0)
        ann.setdefault("category_id", 1)
        ann.setdefault("num_keypoints", int((kp[2::3] > 0).sum()))
        ann.setdefault("id", i + 1)
    if num_kp is None:
        raise DataError(f"{name}: no annotations to evaluate against")
    if "images" not in data:
        data["images"] = [{"id": i} for i in sorted({a["image_id"] for a in data["annotations"]})]
    if "categories" not in data:
        cats = sorted({a["category_id"] for a in data["annotations"]})
        data["categories"] = [{"id": c, "name": str(c)} for c in cats]
    return data, num_kp


def _prepare_dt(data: Any, name: str, image_ids: set, num_kp: int) -> list[dict[str, Any]]:
    if isinstance(data, dict) and "annotations" in data:
        data = data["annotations"]
    if not isinstance(data, list):
        raise DataError(f"{name}: expected a list of COCO keypoint results")
    if not data:
        raise DataError(f"{name}: holds 0 detections, nothing to evaluate (did inference run?)")
    out = []
    for i, res in enumerate(data):
        missing = [k for k in ("image_id", "keypoints", "score") if k not in res]
        if missing:
            raise DataError(f"{name}: result #{i} misses {missing}")
        if res["image_id"] not in image_ids:
            raise DataError(
                f"{name}: result #{i} has image_id {res['image_id']!r}, "
                "which the ground truth does not contain"
            )
        if len(res["keypoints"]) != 3 * num_kp:
            raise DataError(
                f"{name}: result #{i} has {len(res['keypoints'])} keypoint values, "
                f"expected {3 * num_kp} for {num_kp} keypoints"
            )
        entry = dict(res)
        entry.setdefault("category_id", 1)
        out.append(entry)
    return out


def _check_sigmas(sigmas: Sequence[float] | None, num_kp: int, name: str) -> np.ndarray:
    if sigmas is None:
        if num_kp != len(COCO17_SIGMAS):
            raise DataError(
                f"{name}: {num_kp} keypoints but no OKS sigmas given (the default "
                "is COCO's 17); pass one sigma per keypoint"
            )
        sigmas = COCO17_SIGMAS
    sig = np.asarray(sigmas, np.float64).reshape(-1)
    if sig.size != num_kp or (sig <= 0).any():
        raise DataError(f"{name}: need {num_kp} positive OKS sigmas, got {sig.tolist()}")
    return sig


# --------------------------------------------------------------------------- OKS-NMS
def oks_similarity(
    ref: np.ndarray,
    others: np.ndarray,
    ref_area: float,
    other_areas: np.ndarray,
    sigmas: Sequence[float],
    vis_threshold: float | None = None,
) -> np.ndarray:
    """OKS between one instance [K, 3] and others [M, 3] (x, y, score), as mmpose's oks_iou."""
    var = (np.asarray(sigmas, np.float64) * 2) ** 2
    d2 = ((others[:, :, :2] - ref[None, :, :2]) ** 2).sum(-1)  # [M, K]
    scale = (ref_area + np.asarray(other_areas, np.float64))[:, None] / 2 + np.spacing(1)
    e = np.exp(-d2 / var / scale / 2)
    if vis_threshold is None:
        return e.mean(-1)
    use = (ref[None, :, 2] > vis_threshold) & (others[:, :, 2] > vis_threshold)
    count = use.sum(-1)
    return np.where(count > 0, (e * use).sum(-1) / np.maximum(count, 1), 0.0)


def oks_nms(
    keypoints: np.ndarray,
    scores: np.ndarray,
    areas: np.ndarray,
    sigmas: Sequence[float],
    threshold: float = 0.9,
    vis_threshold: float | None = None,
) -> np.ndarray:
    """Greedy non-maximum suppression by OKS (tf-cpn / mmpose ``oks_nms``).

    Example:
        >>> kp = np.array([[[0, 0, 1], [10, 0, 1]], [[0.1, 0, 1], [10, 0, 1]]], float)
        >>> oks_nms(kp, np.array([0.5, 0.9]), np.array([100.0, 100.0]), [0.1, 0.1]).tolist()
        [1]

    Args:
        keypoints: [N, K, 3] (x, y, score) per instance.
        scores: [N] instance scores; higher ones are kept first.
        areas: [N] instance areas (px^2).
        sigmas: K OKS sigmas.
        threshold: suppress instances whose OKS with a kept one exceeds this.
        vis_threshold: only compare keypoints whose scores both exceed this.

    Returns:
        int64 indices of the kept instances, by decreasing score.
    """
    kp = np.asarray(keypoints, np.float64)
    areas = np.asarray(areas, np.float64)
    order = np.argsort(-np.asarray(scores, np.float64), kind="stable")
    keep = []
    while order.size:
        i, rest = order[0], order[1:]
        keep.append(int(i))
        oks = oks_similarity(kp[i], kp[rest], areas[i], areas[rest], sigmas, vis_threshold)
        order = rest[oks <= threshold]
    return np.asarray(keep, np.int64)


def _nms_per_image(results: list[dict], sigmas: np.ndarray, threshold: float) -> list[dict]:
    by_image: dict[Any, list[int]] = {}
    for i, r in enumerate(results):
        by_image.setdefault(r["image_id"], []).append(i)
    kept = []
    for idx in by_image.values():
        kp = np.array([np.reshape(results[i]["keypoints"], (-1, 3)) for i in idx], np.float64)
        areas = np.array([_result_area(results[i], kp[j]) for j, i in enumerate(idx)])
        scores = np.array([results[i]["score"] for i in idx], np.float64)
        kept += [idx[j] for j in oks_nms(kp, scores, areas, sigmas, threshold)]
    return [results[i] for i in sorted(kept)]


def _result_area(result: Mapping[str, Any], kp: np.ndarray) -> float:
    """Area of a result: its 'area', else its 'bbox', else the keypoints' extent."""
    if "area" in result:
        return float(result["area"])
    if "bbox" in result:
        return float(result["bbox"][2]) * float(result["bbox"][3])
    span = kp[:, :2].max(0) - kp[:, :2].min(0)
    return float(span[0] * span[1])


# --------------------------------------------------------------------------- pixel metrics
def pixel_metrics(
    pred_xy: np.ndarray,
    gt_keypoints: np.ndarray,
    box_sizes: np.ndarray,
    names: Sequence[str],
    pck_thresholds: Sequence[float] = (0.05, 0.1),
) -> dict[str, Any]:
    """Pixel error mean / median / p90 and PCK, per keypoint and overall.

    Example:
        >>> gt = np.array([[[0, 0, 2], [0, 0, 0]]], np.float32)
        >>> m = pixel_metrics(np.array([[[3, 4], [9, 9]]]), gt, np.array([100.0]), ["a", "b"])
        >>> m["overall"]["mean"], m["per_keypoint"][1]["count"]
        (5.0, 0)

    Args:
        pred_xy: [N, K, 2] predictions in image pixels.
        gt_keypoints: [N, K, 3] ground truth (x, y, v); only v > 0 points count.
        box_sizes: [N] reference size for PCK (kpnet uses max(w, h) of the box).
        names: K keypoint names.
        pck_thresholds: fractions of the box size.
    """
    gt = np.asarray(gt_keypoints, np.float64)
    err = np.linalg.norm(np.asarray(pred_xy, np.float64)[..., :2] - gt[..., :2], axis=-1)
    rel = err / np.maximum(np.asarray(box_sizes, np.float64), 1e-9)[:, None]
    labelled = gt[..., 2] > 0
    per = [
        {
            "name": name,
            **_error_stats(err[:, k][labelled[:, k]], rel[:, k][labelled[:, k]], pck_thresholds),
        }
        for k, name in enumerate(names)
    ]
    return {
        "overall": _error_stats(err[labelled], rel[labelled], pck_thresholds),
        "per_keypoint": per,
    }


def _error_stats(err: np.ndarray, rel: np.ndarray, thresholds: Sequence[float]) -> dict:
    if err.size == 0:
        stats: dict[str, Any] = {"count": 0, "mean": None, "median": None, "p90": None}
        return stats | {f"pck@{t:g}": None for t in thresholds}
    stats = {
        "count": int(err.size),
        "mean": _r(err.mean()),
        "median": _r(np.median(err)),
        "p90": _r(np.percentile(err, 90)),
    }
    return stats | {f"pck@{t:g}": _r((rel <= t).mean()) for t in thresholds}


def _r(x: float) -> float:
    return round(float(x), 6)


# --------------------------------------------------------------------------- pin matching
def match_points(
    true_xy: np.ndarray, pred_xy: np.ndarray, max_distance: float | None = None
) -> list[tuple[int, int, float]]:
    """Hungarian matching of true points [M, 2] to predictions [P, 2] by distance.

    With ``max_distance`` the number of pairs within it is maximised first, then the total
    distance is minimised; pairs farther apart are not returned.

    Example:
        >>> match_points(np.array([[0, 0], [10, 0]]), np.array([[9, 0], [50, 50]]), 5.0)
        [(1, 0, 1.0)]
    """
    t = np.asarray(true_xy, np.float64).reshape(-1, 2)
    p = np.asarray(pred_xy, np.float64).reshape(-1, 2)
    if not len(t) or not len(p):
        return []
    dist = np.linalg.norm(t[:, None] - p[None], axis=-1)
    ok = np.ones_like(dist, bool) if max_distance is None else dist <= max_distance
    if not ok.any():
        return []
    cost = np.where(ok, dist, 1.0 + 2.0 * dist[ok].sum() * len(t))
    rows, cols = linear_sum_assignment(cost)
    return [(int(i), int(j), _r(dist[i, j])) for i, j in zip(rows, cols, strict=True) if ok[i, j]]


def _shared_groups(spec: KeypointSpec) -> list[tuple[int, tuple[int, ...]]]:
    groups = [(c, spec.keypoints_in_channel(c)) for c in range(spec.num_channels)]
    return [(c, m) for c, m in groups if len(m) > 1]


def assign_shared_channels(
    pred_xy: np.ndarray,
    pred_scores: np.ndarray,
    records: Sequence[InstanceRecord],
    spec: KeypointSpec,
) -> tuple[np.ndarray, np.ndarray]:
    """Reorder predictions inside each shared channel to their nearest true points.

    Keypoints sharing a channel are interchangeable (the model sorts them by score), so
    their predictions are assigned to the labelled true points by the Hungarian algorithm;
    leftovers go to the unlabelled ones. Returns permuted copies of (pred_xy, pred_scores).
    """
    xy, sc = np.array(pred_xy, np.float64), np.array(pred_scores, np.float64)
    for n, rec in enumerate(records):
        for _, members in _shared_groups(spec):
            m = np.array(members)
            labelled = m[rec.keypoints[m, 2] > 0]
            pairs = match_points(rec.keypoints[labelled, :2], xy[n, m])
            used = [j for _, j, _ in pairs]
            order = dict((int(labelled[i]), int(m[j])) for i, j, _ in pairs)
            free = iter(int(m[j]) for j in range(len(m)) if j not in used)
            src = [order[k] if k in order else next(free) for k in members]
            xy[n, m], sc[n, m] = xy[n, src], sc[n, src]
    return xy, sc


def pin_report(
    pred_xy: np.ndarray,
    pred_scores: np.ndarray,
    records: Sequence[InstanceRecord],
    spec: KeypointSpec,
    score_threshold: float = 0.1,
    match_radius: float = 0.05,
    match_radius_px: float | None = None,
) -> dict[str, Any]:
    """Detection-style report for keypoints sharing a heatmap channel ("pins").

    Within each shared channel, predictions with score >= ``score_threshold`` are matched to
    labelled true points (Hungarian on distance) within a radius: ``match_radius_px`` pixels,
    or ``match_radius`` times the box size max(w, h). A true point left unmatched is a
    *miss*; a confident prediction left unmatched is a *false positive*.
    """
    per_channel = []
    for channel, members in _shared_groups(spec):
        errors, misses, fps, n_true = [], 0, 0, 0
        for n, rec in enumerate(records):
            m = np.array(members)
            true = rec.keypoints[m][rec.keypoints[m, 2] > 0, :2]
            cand = pred_xy[n, m][pred_scores[n, m] >= score_threshold]
            radius = (
                match_radius_px
                if match_radius_px is not None
                else match_radius * max(rec.box[2], rec.box[3])
            )
            pairs = match_points(true, cand, radius)
            errors += [d for _, _, d in pairs]
            n_true += len(true)
            misses += len(true) - len(pairs)
            fps += len(cand) - len(pairs)
        per_channel.append(
            _pin_stats(errors, n_true, misses, fps)
            | {"channel": channel, "keypoints": [spec.names[k] for k in members]}
        )
    errors = [e for c in per_channel for e in c.pop("_errors")]
    totals = {k: sum(c[k] for c in per_channel) for k in ("num_true", "misses", "false_positives")}
    overall = _pin_stats(errors, totals["num_true"], totals["misses"], totals["false_positives"])
    overall.pop("_errors")
    radius = (
        f"{match_radius_px:g} px" if match_radius_px is not None else f"{match_radius:g} x box size"
    )
    return {
        "overall": overall,
        "per_channel": per_channel,
        "match_radius": radius,
        "score_threshold": score_threshold,
    }


def _pin_stats(errors: list[float], n_true: int, misses: int, fps: int) -> dict[str, Any]:
    err = np.asarray(errors, np.float64)
    matched = int(err.size)
    return {
        "num_true": n_true,
        "matched": matched,
        "misses": misses,
        "false_positives": fps,
        "recall": _r(matched / n_true) if n_true else None,
        "precision": _r(matched / (matched + fps)) if matched + fps else None,
        "error_mean": _r(err.mean()) if matched else None,
        "error_median": _r(np.median(err)) if matched else None,
        "error_p90": _r(np.percentile(err, 90)) if matched else None,
        "_errors": errors,
    }


# --------------------------------------------------------------------------- records -> COCO
def instance_score(scores: np.ndarray, detection_score: float = 1.0) -> float:
    """An instance's COCO score, as tf-cpn rescores it: the mean of its keypoint scores above
    :data:`RESCORE_THRESHOLD` times the detection's score (0 when none passes), 6 decimals.

    The one rescoring of ``kpnet evaluate`` and ``kpnet predict``.

    >>> instance_score(np.array([0.9, 0.7, 0.1]), 0.5)
    0.4
    """
    scores = np.asarray(scores, np.float64)
    good = scores[scores > RESCORE_THRESHOLD]
    return round(float(good.mean()) * float(detection_score), 6) if good.size else 0.0


def to_coco_results(
    records: Sequence[InstanceRecord],
    pred_xy: np.ndarray,
    pred_scores: np.ndarray,
) -> list[dict[str, Any]]:
    """COCO keypoint results, one per record (image_id = record.image_id, category 1), scored
    by :func:`instance_score` with the record's (detection) score."""
    out = []
    for rec, xy, sc in zip(records, np.asarray(pred_xy), np.asarray(pred_scores), strict=True):
        kp = np.concatenate([xy[:, :2], sc[:, None]], axis=1).astype(np.float64)
        out.append(
            {
                "image_id": rec.image_id,
                "category_id": 1,
                "keypoints": [round(float(v), 3) for v in kp.reshape(-1)],
                "score": instance_score(sc, rec.score),
            }
        )
    return out


def records_to_coco(records: Sequence[InstanceRecord]) -> dict[str, Any]:
    """A COCO ground-truth dict for the records (area = box w*h, annotation id = index + 1)."""
    anns = []
    for i, rec in enumerate(records):
        kp = np.asarray(rec.keypoints, np.float64).copy()
        kp[kp[:, 2] <= 0] = 0.0
        x, y, w, h = (float(v) for v in rec.box)
        anns.append(
            {
                "id": i + 1,
                "image_id": rec.image_id,
                "category_id": 1,
                "bbox": [x, y, w, h],
                "area": w * h,
                "iscrowd": 0,
                "num_keypoints": int((kp[:, 2] > 0).sum()),
                "keypoints": kp.reshape(-1).tolist(),
            }
        )
    images = [{"id": i} for i in dict.fromkeys(r.image_id for r in records)]
    return {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "object"}]}


# --------------------------------------------------------------------------- evaluation
def evaluate_predictions(
    pred_xy: np.ndarray,
    pred_scores: np.ndarray,
    records: Sequence[InstanceRecord],
    spec: KeypointSpec,
    pck_thresholds: Sequence[float] = (0.05, 0.1),
    *,
    oks_nms_threshold: float | None = None,
    pin_score_threshold: float = 0.1,
    match_radius: float = 0.05,
    match_radius_px: float | None = None,
) -> dict[str, Any]:
    """All metrics for predictions [N, K, 2] (image px) and scores [N, K] on N records.

    Returns ``{"num_instances", "overall", "per_keypoint", "coco", "pins"}``: pixel errors
    and PCK (see the module doc); ``coco`` holds :func:`coco_keypoint_ap` (with optional
    per-image OKS-NMS) when ``spec.sigmas`` is set, else None; when ``spec.shares_channels``
    predictions within a shared channel are first assigned to true points (Hungarian) and
    ``pins`` holds :func:`pin_report`, else None. ``overall`` also repeats AP, AP50, AP75
    and AR.
    """
    xy, scores = _check_predictions(pred_xy, pred_scores, records, spec)
    pins = None
    if spec.shares_channels:
        pins = pin_report(
            xy, scores, records, spec, pin_score_threshold, match_radius, match_radius_px
        )
        xy, scores = assign_shared_channels(xy, scores, records, spec)
    gt = np.stack([np.asarray(r.keypoints, np.float64) for r in records])
    sizes = np.array([max(float(r.box[2]), float(r.box[3])) for r in records])
    metrics = pixel_metrics(xy, gt, sizes, spec.names, pck_thresholds)
    coco = None
    if spec.sigmas is not None:
        dt = to_coco_results(records, xy, scores)
        for d, r in zip(dt, records, strict=True):
            d["area"] = float(r.box[2]) * float(r.box[3])
        coco = coco_keypoint_ap(records_to_coco(records), dt, spec.sigmas, oks_nms_threshold)
        metrics["overall"].update({k: coco[k] for k in ("AP", "AP50", "AP75", "AR")})
    return {"num_instances": len(records), **metrics, "coco": coco, "pins": pins}


def _check_predictions(pred_xy, pred_scores, records, spec) -> tuple[np.ndarray, np.ndarray]:
    xy = np.asarray(pred_xy, np.float64)
    scores = np.asarray(pred_scores, np.float64)
    n, k = len(records), spec.num_keypoints
    if n == 0:
        raise DataError("evaluate: no records to evaluate")
    if xy.shape[:2] != (n, k) or xy.shape[-1] < 2 or scores.shape != (n, k):
        raise DataError(
            f"evaluate: predictions {xy.shape} / scores {scores.shape} do not fit "
            f"{n} records x {k} keypoints ([N, K, 2] and [N, K] expected)"
        )
    for rec in records:
        if np.shape(rec.keypoints) != (k, 3):
            raise DataError(
                f"evaluate: {rec.describe()} has keypoints of shape "
                f"{np.shape(rec.keypoints)}, the spec expects ({k}, 3)"
            )
    return xy[..., :2], scores


# --------------------------------------------------------------------------- printing
def format_table(metrics: Mapping[str, Any]) -> str:
    """A plain-text table of per-keypoint pixel errors and PCK, then COCO and pin summaries."""
    pck = [k for k in metrics["overall"] if k.startswith("pck@")]
    cols = ["count", "mean", "median", "p90", *pck]
    rows = [{"name": "overall", **metrics["overall"]}] + list(metrics["per_keypoint"])
    width = max(len(str(r["name"])) for r in rows)
    lines = [f"{'keypoint':<{width}} " + " ".join(f"{c:>9}" for c in cols)]
    for row in rows[1:] + rows[:1]:
        lines.append(f"{row['name']:<{width}} " + " ".join(f"{_fmt(row[c]):>9}" for c in cols))
    if metrics.get("coco"):
        lines.append("OKS " + "  ".join(f"{k} {metrics['coco'][k]:.3f}" for k in COCO_STAT_NAMES))
    if metrics.get("pins"):
        p = metrics["pins"]["overall"]
        lines.append(
            f"pins: {p['matched']}/{p['num_true']} matched, {p['misses']} missed, "
            f"{p['false_positives']} false positives, matched error mean "
            f"{_fmt(p['error_mean'])} px (radius {metrics['pins']['match_radius']})"
        )
    if metrics.get("crops"):
        lines.append(f"crops: {metrics['crops']}")
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    return str(value) if isinstance(value, int) else f"{value:.3f}"
