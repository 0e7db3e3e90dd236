"""The synthetic two-pin part: a small, learnable custom-keypoint dataset made from a seed.

Each image shows one textured, rounded part with two metal pins sticking out of its top edge,
at a random rotation, scale and position, under random lighting, blur and noise, on a
cluttered background. The keypoints are the centres of the two pins' rounded tips:
``pin_left`` / ``pin_right`` as seen with the pins pointing up (a horizontal flip swaps them).
:func:`pin_spec` can put both into ONE heatmap channel. Datasets are written in COCO format,
so :func:`kpnet.data.coco.load_coco_records` reads them.

Example:
    >>> import tempfile
    >>> paths = ensure_synthetic_pins(tempfile.mkdtemp(), num_train=4, num_val=2)
    >>> from kpnet.data.coco import load_coco_records
    >>> spec, records = load_coco_records(*paths["train"], spec=pin_spec(single_channel=True))
    >>> len(records), spec.num_channels
    (4, 1)
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from kpnet import fs
from kpnet.spec import KeypointSpec

PIN_NAMES = ("pin_left", "pin_right")
#: OKS sigmas of the pin tips (as precise as COCO's eyes).
PIN_SIGMAS = (0.025, 0.025)
#: Bump when the renderer changes, so cached datasets are regenerated.
GENERATOR_VERSION = 1
_SHIFT = 4  # cv2 fixed-point bits: sub-pixel drawing
_ONE = 1 << _SHIFT


def pin_spec(single_channel: bool = True) -> KeypointSpec:
    """Spec of the two pin tips; ``single_channel`` draws both into heatmap channel 0.

    Example:
        >>> pin_spec(True).channel_map, pin_spec(False).num_channels
        ((0, 0), 2)
    """
    return KeypointSpec(
        names=PIN_NAMES,
        flip_pairs=((0, 1),),
        skeleton=((0, 1),),
        sigmas=PIN_SIGMAS,
        channel_map=(0, 0) if single_channel else None,
    )


@dataclass
class PinSample:
    """One rendered image: RGB uint8 [H,W,3], keypoints [2,3] (x, y, v=2), box (x, y, w, h),
    and ``pin_mask`` float [H,W] (coverage of the pins, for tests and debugging)."""

    image: np.ndarray
    keypoints: np.ndarray
    box: tuple[float, float, float, float]
    pin_mask: np.ndarray


def render_pins(
    rng: np.random.Generator, image_size: tuple[int, int] = (128, 128), max_rotation: float = 45.0
) -> PinSample:
    """Render one random two-pin part (deterministic given ``rng``'s state).

    Example:
        >>> s = render_pins(np.random.default_rng(0))
        >>> s.image.shape, s.keypoints[:, 2].tolist()
        ((128, 128, 3), [2.0, 2.0])
    """
    h, w = image_size
    unit = min(h, w) / 128.0
    image = _background(rng, h, w)
    _clutter(rng, image, unit)
    part = _part_geometry(rng, unit)
    pose = _pose(rng, part, (h, w), max_rotation)
    body_mask = _fill_mask((h, w), _transform(part["body"], pose))
    image = _composite(image, _body_texture(rng, h, w, part, pose, unit), body_mask)
    tips = _transform(part["tips"], pose)
    bases = _transform(part["bases"], pose)
    image, pin_mask = _draw_pins(rng, image, bases, tips, part["pin_width"] * pose[1])
    image = _camera(rng, image)
    keypoints = np.concatenate([tips, np.full((2, 1), 2.0)], axis=1).astype(np.float32)
    return PinSample(image, keypoints, _box(part, pose), pin_mask)


def ensure_synthetic_pins(
    cache_dir: str | os.PathLike,
    num_train: int = 512,
    num_val: int = 128,
    image_size: tuple[int, int] = (128, 128),
    seed: int = 0,
    max_rotation: float = 45.0,
) -> dict[str, tuple[str, str]]:
    """Generate the COCO-format pins dataset under ``cache_dir`` unless it already exists.

    The folder name encodes every parameter (and :data:`GENERATOR_VERSION`), so changing one
    generates a new dataset. Generation writes to a temporary folder and renames it, so an
    interrupted run never leaves a half-written dataset behind.

    Returns:
        {"train": (ann_json, image_dir), "val": (ann_json, image_dir)}
    """
    h, w = (int(v) for v in image_size)
    name = (
        f"pins_{h}x{w}_n{num_train}-{num_val}_rot{max_rotation:g}_seed{seed}_v{GENERATOR_VERSION}"
    )
    root = Path(cache_dir) / name
    splits = {"train": num_train, "val": num_val}
    paths = {s: (str(root / "annotations" / f"{s}.json"), str(root / s)) for s in splits}
    if not (root / "done").is_file():
        root.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=root.parent))
        try:
            for index, (split, count) in enumerate(splits.items()):
                write_split(tmp, split, count, (h, w), (seed, index), max_rotation)
            fs.write_atomic(tmp / "done", "ok\n")
            tmp.rename(root)
        except OSError:  # another process finished first (or a stale folder): keep theirs
            if not (root / "done").is_file():
                raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)  # gone once renamed; else a partial set
    return paths


def write_split(
    root: Path, split: str, count: int, image_size: tuple[int, int], seed, max_rotation: float
) -> None:
    """Write ``count`` images to ``root/split/`` and their COCO json to
    ``root/annotations/split.json``; image i uses ``default_rng([*seed, i])``."""
    (root / split).mkdir(parents=True, exist_ok=True)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for i in range(count):
        sample = render_pins(np.random.default_rng([*seed, i]), image_size, max_rotation)
        file_name = f"{i:06d}.jpg"
        bgr = cv2.cvtColor(sample.image, cv2.COLOR_RGB2BGR)
        cv2.imwrite(str(root / split / file_name), bgr, [cv2.IMWRITE_JPEG_QUALITY, 95])
        images.append({"id": i + 1, "file_name": file_name, "height": image_size[0],
                       "width": image_size[1]})  # fmt: skip
        box = [round(float(v), 3) for v in sample.box]
        annotations.append({
            "id": i + 1, "image_id": i + 1, "category_id": 1, "iscrowd": 0,
            "bbox": box, "area": round(box[2] * box[3], 3), "num_keypoints": 2,
            "keypoints": [round(float(v), 4) for v in sample.keypoints.reshape(-1)],
        })  # fmt: skip
    category = {"id": 1, "name": "part", "supercategory": "part",
                "keypoints": list(PIN_NAMES), "skeleton": [[1, 2]]}  # fmt: skip
    coco = {"images": images, "annotations": annotations, "categories": [category]}
    fs.write_atomic(root / "annotations" / f"{split}.json", json.dumps(coco))


# --------------------------------------------------------------------------- geometry
def _part_geometry(rng: np.random.Generator, unit: float) -> dict:
    """The part in its own frame (pixels at scale 1, centred on the body, pins pointing -y)."""
    bw = rng.uniform(44, 62) * unit
    bh = bw * rng.uniform(0.45, 0.65)
    spacing = bw * rng.uniform(0.45, 0.7)
    offset = rng.uniform(-0.08, 0.08) * bw
    length = bw * rng.uniform(0.28, 0.45)
    xs = np.array([offset - spacing / 2, offset + spacing / 2])
    bases = np.stack([xs, np.full(2, -bh / 2 + 1)], axis=1)
    tips = bases - np.array([0.0, length + 1])
    return {
        "body": _rounded_rect(bw, bh, radius=bh * rng.uniform(0.1, 0.3)),
        "bases": bases,
        "tips": tips,
        "pin_width": rng.uniform(4.0, 6.5) * unit,
        "size": (bw, bh),
    }


def _rounded_rect(w: float, h: float, radius: float, steps: int = 6) -> np.ndarray:
    x, y = w / 2 - radius, h / 2 - radius
    corners = [(x, -y, -90), (x, y, 0), (-x, y, 90), (-x, -y, 180)]
    pts = []
    for cx, cy, start in corners:
        ang = np.deg2rad(start + np.linspace(0, 90, steps))
        pts.append(np.stack([cx + radius * np.cos(ang), cy + radius * np.sin(ang)], axis=1))
    return np.concatenate(pts)


def _pose(rng: np.random.Generator, part: dict, size: tuple[int, int], max_rotation: float):
    """(angle radians, scale, translation) keeping the whole part 4 px inside the image."""
    angle = np.deg2rad(rng.uniform(-max_rotation, max_rotation))
    scale = rng.uniform(0.8, 1.2)
    pts = _outline(part)
    rot = _transform(pts, (angle, scale, np.zeros(2)))
    lo, hi = rot.min(axis=0), rot.max(axis=0)
    h, w = size
    low, high = 4 - lo, np.array([w - 1 - 4, h - 1 - 4]) - hi
    if (high < low).any():  # too big for the image: shrink and centre
        scale *= 0.8 * min(w, h) / max(hi - lo)
        return angle, scale, np.array([(w - 1) / 2, (h - 1) / 2])
    return angle, scale, rng.uniform(low, high)


def _outline(part: dict) -> np.ndarray:
    r = part["pin_width"] / 2
    caps = np.concatenate([part["tips"] + d for d in ([r, 0], [-r, 0], [0, -r])])
    return np.concatenate([part["body"], caps])


def _transform(pts: np.ndarray, pose) -> np.ndarray:
    angle, scale, shift = pose
    c, s = np.cos(angle), np.sin(angle)
    return pts @ (scale * np.array([[c, s], [-s, c]])) + shift


def _box(part: dict, pose) -> tuple[float, float, float, float]:
    pts = _transform(_outline(part), pose)
    (x0, y0), (x1, y1) = pts.min(axis=0), pts.max(axis=0)
    return (float(x0), float(y0), float(x1 - x0 + 1), float(y1 - y0 + 1))


# --------------------------------------------------------------------------- rendering
def _fixed(pts: np.ndarray) -> np.ndarray:
    return np.round(np.asarray(pts) * _ONE).astype(np.int32)


def _fill_mask(size: tuple[int, int], poly: np.ndarray) -> np.ndarray:
    mask = np.zeros(size, np.uint8)  # anti-aliasing needs 8-bit images
    cv2.fillPoly(mask, [_fixed(poly)], 255, cv2.LINE_AA, _SHIFT)
    return mask.astype(np.float32) / 255.0


def _composite(image: np.ndarray, layer: np.ndarray, mask: np.ndarray) -> np.ndarray:
    return image * (1 - mask[..., None]) + layer * mask[..., None]


def _smooth_noise(rng: np.random.Generator, h: int, w: int, cells: int) -> np.ndarray:
    small = rng.standard_normal((cells, cells)).astype(np.float32)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC)


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    base = rng.uniform(20, 235, 3).astype(np.float32)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    direction = rng.normal(size=2)
    ramp = (xx * direction[0] + yy * direction[1]) / (np.linalg.norm(direction) * max(h, w))
    shade = ramp * rng.uniform(-50, 50) + _smooth_noise(rng, h, w, 5) * rng.uniform(0, 20)
    return base + shade[..., None]


def _clutter(rng: np.random.Generator, image: np.ndarray, unit: float) -> None:
    h, w = image.shape[:2]
    for _ in range(rng.integers(2, 8)):
        color = tuple(float(c) for c in rng.uniform(0, 255, 3))
        p, q = rng.uniform(0, 1, 2) * (w, h), rng.uniform(0, 1, 2) * (w, h)
        thick = int(rng.integers(1, 4))
        kind = rng.integers(0, 4)
        if kind == 0:
            cv2.line(image, _fixed(p), _fixed(q), color, thick, cv2.LINE_AA, _SHIFT)
        elif kind == 1:
            cv2.rectangle(image, _fixed(p), _fixed(q), color, -1 if thick == 3 else thick,
                          cv2.LINE_AA, _SHIFT)  # fmt: skip
        elif kind == 2:
            radius = int(rng.uniform(3, 20) * unit * _ONE)
            cv2.circle(image, _fixed(p), radius, color, -1 if thick == 3 else thick,
                       cv2.LINE_AA, _SHIFT)  # fmt: skip
        else:
            axes = rng.uniform(5, 40, 2) * unit
            box = (
                (float(p[0]), float(p[1])),
                (float(axes[0]), float(axes[1])),
                rng.uniform(0, 180),
            )
            cv2.ellipse(image, box, color, -1)


def _body_texture(rng, h: int, w: int, part: dict, pose, unit: float) -> np.ndarray:
    """Body colour with shading, fine grain and a few holes / a label, in image space."""
    color = rng.uniform(30, 220, 3).astype(np.float32)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    grad = (xx * np.cos(pose[0]) + yy * np.sin(pose[0])) / max(h, w) * rng.uniform(-40, 40)
    grain = _smooth_noise(rng, h, w, max(8, int(24 * unit))) * rng.uniform(2, 10)
    layer = color + (grad + grain)[..., None]
    bw, bh = part["size"]
    for _ in range(rng.integers(0, 3)):  # holes / screws
        centre = _transform(rng.uniform(-0.35, 0.35, (1, 2)) * (bw, bh), pose)[0]
        radius = int(rng.uniform(1.5, 3.5) * unit * pose[1] * _ONE)
        cv2.circle(layer, _fixed(centre), radius, tuple(float(c) for c in color * 0.4), -1,
                   cv2.LINE_AA, _SHIFT)  # fmt: skip
    if rng.random() < 0.5:  # a printed label
        label = _rounded_rect(bw * 0.4, bh * 0.3, radius=1.0) + rng.uniform(-0.15, 0.15, 2) * bw
        ink = tuple(float(c) for c in rng.uniform(0, 255, 3))
        cv2.fillPoly(layer, [_fixed(_transform(label, pose))], ink, cv2.LINE_AA, _SHIFT)
    return layer


def _draw_pins(rng, image: np.ndarray, bases: np.ndarray, tips: np.ndarray, width: float):
    """Metal cylinders with round tips and a specular stripe; returns (image, pin mask)."""
    h, w = image.shape[:2]
    thick = max(1, int(round(width)))
    mask8 = np.zeros((h, w), np.uint8)  # anti-aliasing needs 8-bit images
    for b, t in zip(bases, tips, strict=True):
        cv2.line(mask8, _fixed(b), _fixed(t), 255, thick, cv2.LINE_AA, _SHIFT)
        cv2.circle(mask8, _fixed(t), int(width / 2 * _ONE), 255, -1, cv2.LINE_AA, _SHIFT)
    mask = mask8.astype(np.float32) / 255.0
    metal = rng.uniform(120, 200)
    layer = np.full((h, w, 3), metal, np.float32) * rng.uniform(0.9, 1.1, 3).astype(np.float32)
    for b, t in zip(bases, tips, strict=True):
        axis = (t - b) / (np.linalg.norm(t - b) + 1e-6)
        side = np.array([-axis[1], axis[0]]) * width * rng.uniform(-0.25, 0.25)
        shine = float(min(255, metal + rng.uniform(40, 90)))
        cv2.line(layer, _fixed(b + side), _fixed(t + side), (shine,) * 3,
                 max(1, thick // 3), cv2.LINE_AA, _SHIFT)  # fmt: skip
    dark = (metal * 0.5,) * 3
    for b in bases:  # a dark collar where the pin enters the body
        cv2.circle(layer, _fixed(b), int(width * 0.6 * _ONE), dark, -1, cv2.LINE_AA, _SHIFT)
    return _composite(image, layer, mask), mask


def _camera(rng: np.random.Generator, image: np.ndarray) -> np.ndarray:
    """Exposure, blur and sensor noise."""
    image = image * rng.uniform(0.75, 1.25) + rng.uniform(-20, 20)
    sigma = rng.uniform(0.0, 1.2)
    if sigma > 0.3:
        image = cv2.GaussianBlur(image, (0, 0), sigma)
    image = image + rng.normal(0, rng.uniform(1, 7), image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)
