"""DeepLabCut project folder -> instance records (and a COCO json).

Reads ``config.yaml`` (``bodyparts``, optional ``skeleton``, ``Task``) and every
``labeled-data/*/CollectedData_*.csv``: three header rows (scorer / bodyparts / coords), then
one row per frame whose first column(s) give the image path relative to the project (DLC 2.3+
splits it over three columns; both work). Empty (or NaN) cells are unlabelled (v=0), labelled
points get v=2. Single-animal projects and CSV only: DLC writes a CSV next to every
``CollectedData_*.h5`` when labels are saved; multi-animal CSVs (an ``individuals`` row) are
refused with a clear error.

The box of a frame is the labelled keypoints' extent grown by ``margin`` x its longer side on
every side (clipped to the image), or the whole image (``box="image"``). Frames with no labelled
point are skipped and counted; a single labelled point (no extent) uses the whole image.

Example:
    >>> spec, records = load_dlc_records("Reaching-Mackenzie-2018-08-30")  # doctest: +SKIP
    >>> spec.names, len(records)  # doctest: +SKIP
    (('Hand', 'Finger1', 'Tongue', 'Joystick1', 'Joystick2'), 55)
"""

from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from kpnet.data.check import LoadReport, Records, check_on_error
from kpnet.data.coco import guess_flip_pairs
from kpnet.data.records import DataError, InstanceRecord
from kpnet.spec import KeypointSpec, SpecError

PathLike = str | os.PathLike


def load_dlc_records(
    project_dir: PathLike, box: str = "keypoints", margin: float = 0.2, on_error: str = "raise"
) -> tuple[KeypointSpec, Records]:
    """Load a DeepLabCut project's labelled frames.

    Args:
        project_dir: the DLC project folder (holds ``config.yaml`` and ``labeled-data/``).
        box: "keypoints" (labelled extent + margin) or "image" (the whole frame).
        margin: fraction of the extent's longer side added on every side.
        on_error: "raise" or "skip" bad rows / missing images (counted in ``records.report``).

    Returns:
        (spec, records); ``records.report`` holds kept and skipped counts.
    """
    check_on_error(on_error)
    if box not in ("keypoints", "image"):
        raise ValueError(f"box must be 'keypoints' or 'image', got {box!r}")
    project = Path(project_dir)
    spec = dlc_spec(project)
    report = LoadReport(source=str(project))
    records: list[InstanceRecord] = []
    for csv_path in _csv_files(project):
        for where, rel, kp in _read_csv(csv_path, spec, report, on_error):
            record = _record(project, rel, kp, where, len(records), box, margin, report, on_error)
            if record is not None:
                records.append(record)
    return spec, Records(records, report)


def dlc_spec(project_dir: PathLike) -> KeypointSpec:
    """The spec of a DLC project: bodyparts, skeleton (by name), left/right flip pairs."""
    config = _read_config(Path(project_dir))
    names = config["bodyparts"]
    try:
        skeleton = [tuple(pair) for pair in config.get("skeleton") or ()]
        return KeypointSpec.from_dict(
            {"names": names, "skeleton": skeleton, "flip_pairs": guess_flip_pairs(names)}
        )
    except (SpecError, TypeError) as err:
        raise DataError(f"{project_dir}/config.yaml: {err}") from None


def dlc_to_coco(
    project_dir: PathLike, out_json: PathLike, box: str = "keypoints", margin: float = 0.2
) -> dict[str, Any]:
    """Write a DLC project as a COCO keypoints json; ``file_name`` is relative to the project.

    Load it back with ``load_coco_records(out_json, project_dir)``.

    Returns:
        the COCO dict that was written.
    """
    spec, records = load_dlc_records(project_dir, box=box, margin=margin)
    task = str(_read_config(Path(project_dir)).get("Task") or "animal")
    coco = records_to_coco(records, spec, Path(project_dir), category_name=task)
    Path(out_json).parent.mkdir(parents=True, exist_ok=True)
    with open(out_json, "w", encoding="utf-8") as f:
        json.dump(coco, f, indent=1)
    return coco


def records_to_coco(
    records: list[InstanceRecord], spec: KeypointSpec, image_root: Path, category_name: str
) -> dict[str, Any]:
    """COCO keypoints dict (images, annotations, one category) from records."""
    images, annotations, image_ids = [], [], {}
    for r in records:
        if r.image_path not in image_ids:
            image_ids[r.image_path] = len(image_ids) + 1
            h, w = r.image_size or (0, 0)
            rel = os.path.relpath(r.image_path, image_root)
            images.append(
                {"id": image_ids[r.image_path], "file_name": rel, "height": h, "width": w}
            )
        kp = np.where(r.keypoints[:, 2:] > 0, r.keypoints, 0.0)
        annotations.append({
            "id": len(annotations) + 1,
            "image_id": image_ids[r.image_path],
            "category_id": 1,
            "bbox": [round(float(v), 3) for v in r.box],
            "area": round(float(r.box[2] * r.box[3]), 3),
            "iscrowd": 0,
            "num_keypoints": r.num_labelled,
            "keypoints": [round(float(v), 4) for v in kp.reshape(-1)],
        })  # fmt: skip
    category = {
        "id": 1,
        "name": category_name,
        "supercategory": category_name,
        "keypoints": list(spec.names),
        "skeleton": [[i + 1, j + 1] for i, j in spec.skeleton],
    }
    return {"images": images, "annotations": annotations, "categories": [category]}


# --------------------------------------------------------------------------- reading
def _read_config(project: Path) -> dict[str, Any]:
    path = project / "config.yaml"
    if not path.is_file():
        raise DataError(f"{path}: not found; is {project} a DeepLabCut project folder?")
    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise DataError(f"{path}: not valid YAML ({err})") from None
    if not isinstance(config, dict) or not config.get("bodyparts"):
        raise DataError(f"{path}: no 'bodyparts' list")
    if config.get("multianimalproject"):
        raise DataError(f"{path}: multi-animal DLC projects are not supported")
    return config


def _csv_files(project: Path) -> list[Path]:
    folders = sorted(p for p in (project / "labeled-data").glob("*") if p.is_dir())
    files = []
    for folder in folders:
        found = sorted(folder.glob("CollectedData_*.csv"))
        if not found and list(folder.glob("CollectedData_*.h5")):
            raise DataError(
                f"{folder}: only CollectedData_*.h5 found; kpnet reads the CSV. Re-save the labels "
                "in DLC (it writes both) or run pandas.read_hdf(h5).to_csv(csv)"
            )
        files += found
    if not files:
        raise DataError(f"{project}/labeled-data: no CollectedData_*.csv files")
    return files


def _read_csv(csv_path: Path, spec: KeypointSpec, report: LoadReport, on_error: str):
    """Yield (where, image path relative to project, keypoints [K,3]) per labelled row."""
    with open(csv_path, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    columns, n_index = _columns(csv_path, rows[:4], spec)
    for line, row in enumerate(rows[3:], start=4):
        where = f"{csv_path}:{line}"
        if not any(cell.strip() for cell in row):
            continue
        try:
            kp = _parse_row(row, columns, n_index, spec.num_keypoints)
        except DataError as err:
            report.bad("bad_row", f"{where}: {err}", on_error)
            continue
        rel = "/".join(c.strip() for c in row[:n_index] if c.strip()).replace("\\", "/")
        yield where, rel, kp


def _columns(csv_path: Path, header: list[list[str]], spec: KeypointSpec):
    """Map CSV columns to (keypoint index, 0 for x / 1 for y); count the path columns."""
    if len(header) < 3 or header[0][:1] != ["scorer"]:
        raise DataError(f"{csv_path}: not a DLC CollectedData CSV (first cell should be 'scorer')")
    if header[1][:1] == ["individuals"]:
        raise DataError(f"{csv_path}: multi-animal DLC CSVs are not supported")
    parts, coords = header[1], header[2]
    n_index = next((i for i, c in enumerate(coords) if c in ("x", "y")), len(coords))
    index = {n: i for i, n in enumerate(spec.names)}
    columns = {}
    for col in range(n_index, len(coords)):
        name, coord = parts[col] if col < len(parts) else "", coords[col]
        if name not in index or coord not in ("x", "y"):
            raise DataError(
                f"{csv_path}: column {col + 1} ({name!r}, {coord!r}) is not a bodypart x/y "
                f"from config.yaml {list(spec.names)}"
            )
        columns[col] = (index[name], 0 if coord == "x" else 1)
    return columns, n_index


def _parse_row(row: list[str], columns: dict, n_index: int, k: int) -> np.ndarray:
    kp = np.full((k, 2), np.nan, np.float64)
    for col, (i, c) in columns.items():
        cell = row[col].strip() if col < len(row) else ""
        try:
            kp[i, c] = float(cell) if cell else math.nan
        except ValueError:
            raise DataError(f"column {col + 1}: {cell!r} is not a number") from None
    if not "".join(row[:n_index]).strip():
        raise DataError("no image path in the first column")
    x_nan, y_nan = np.isnan(kp[:, 0]), np.isnan(kp[:, 1])
    if (x_nan != y_nan).any():
        raise DataError(f"keypoint {int(np.flatnonzero(x_nan != y_nan)[0])} has only x or y")
    if np.isinf(kp).any():
        raise DataError("infinite coordinate")
    out = np.zeros((k, 3), np.float32)
    labelled = ~x_nan
    out[labelled, :2] = kp[labelled]
    out[labelled, 2] = 2.0
    return out


# --------------------------------------------------------------------------- records
def _record(
    project: Path, rel: str, kp: np.ndarray, where: str, index: int, box: str, margin: float,
    report: LoadReport, on_error: str,
) -> InstanceRecord | None:  # fmt: skip
    path = project / rel
    if not (kp[:, 2] > 0).any():
        report.skip("no_keypoints")
        return None
    size = image_size(path)
    if size is None:
        report.bad("missing_image", f"{where}: image {path} not found or unreadable", on_error)
        return None
    return InstanceRecord(
        image_path=str(path),
        box=_box(kp, size, box, margin),
        keypoints=kp,
        image_id=index,
        record_id=index,
        image_size=size,
        source=where,
    )


def _box(kp: np.ndarray, size: tuple[int, int], mode: str, margin: float):
    """(x, y, w, h) with kpnet's convention: x..x+w-1 are the covered pixel centres."""
    h, w = size
    pts = kp[kp[:, 2] > 0, :2]
    x0, y0 = pts.min(axis=0)
    x1, y1 = pts.max(axis=0)
    if mode == "image" or max(x1 - x0, y1 - y0) < 1.0:
        return (0.0, 0.0, float(w), float(h))
    pad = margin * max(x1 - x0, y1 - y0)
    x0, y0 = max(x0 - pad, 0.0), max(y0 - pad, 0.0)
    x1, y1 = min(x1 + pad, w - 1.0), min(y1 + pad, h - 1.0)
    return (float(x0), float(y0), float(x1 - x0 + 1), float(y1 - y0 + 1))


def image_size(path: PathLike) -> tuple[int, int] | None:
    """(height, width) from the image header (no full decode), or None if unreadable."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return int(im.height), int(im.width)
    except (OSError, UnidentifiedImageError):
        return None
