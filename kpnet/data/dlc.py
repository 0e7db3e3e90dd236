"""DeepLabCut projects and label CSVs -> instance records (and a COCO json); train/val splits.

Two inputs give the same records:

- a DLC project folder: ``config.yaml`` (``bodyparts``, optional ``skeleton``, ``Task``,
  ``TrainingFraction``) and every ``labeled-data/*/CollectedData_*.csv`` (or ``.h5``);
- a label CSV alone (lightning-pose style, or one DLC ``CollectedData_*.csv``): body parts from
  its header, no skeleton; image paths relative to the CSV's folder, else to its parent or
  grandparent (lightning-pose stores ``labeled-data/...`` relative to the project root; DLC
  relative to the project, two folders above the CSV); the first folder where the images exist
  is used.

Both have three header rows (scorer / bodyparts / coords), then one row per frame whose first
column(s) give the image path (DLC 2.3+ splits it over three columns; both work). Empty (or
NaN) cells are unlabelled (v=0), labelled points get v=2; ``likelihood`` columns, if any, are
ignored. Single-animal projects: a folder's ``CollectedData_*.csv`` is read, or, when it has
none (labels saved by DLC's GUI after a refinement), its ``CollectedData_*.h5`` (pandas +
PyTables); multi-animal tables (an ``individuals`` row) are refused with a clear error.

The box of a frame is the labelled keypoints' extent grown by ``margin`` x its longer side on
every side (clipped to the image), or the whole image (``box="image"``). Frames with no labelled
point are skipped and counted; a single labelled point (no extent) uses the whole image.

:func:`split_dlc` splits records into train / val: named frames (globs) and/or the last N
frames of each video folder, else a random fraction of the frames (by default
``1 - TrainingFraction[0]`` of ``config.yaml``, see :func:`default_val_fraction`).

Example:
    >>> spec, records = load_dlc_records("Reaching-Mackenzie-2018-08-30")  # doctest: +SKIP
    >>> spec.names, len(records)  # doctest: +SKIP
    (('Hand', 'Finger1', 'Tongue', 'Joystick1', 'Joystick2'), 55)
    >>> train, val = split_dlc(records, val_last=5)  # doctest: +SKIP
    >>> len(train), len(val)  # doctest: +SKIP
    (50, 5)
"""

from __future__ import annotations

import fnmatch
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from kpnet import fs
from kpnet.data.coco import guess_flip_pairs
from kpnet.data.dlc_output import parse_header, read_csv_rows, read_h5_table
from kpnet.data.images import probe
from kpnet.data.records import DataError, InstanceRecord, LoadReport, Records, check_on_error
from kpnet.frames import natural_key
from kpnet.spec import KeypointSpec, SpecError

PathLike = str | os.PathLike

#: Validation fraction when neither the recipe nor config.yaml's TrainingFraction sets one.
DEFAULT_VAL_FRACTION = 0.2


def load_dlc_records(
    project_dir: PathLike, box: str = "keypoints", margin: float = 0.2, on_error: str = "raise"
) -> tuple[KeypointSpec, Records]:
    """Load a DeepLabCut project's labelled frames (or a label CSV's, see :func:`load_label_csv`).

    Args:
        project_dir: the DLC project folder (holds ``config.yaml`` and ``labeled-data/``), or
            a label ``.csv`` file; local, or a URL (read through :mod:`kpnet.fs`).
        box: "keypoints" (labelled extent + margin) or "image" (the whole frame).
        margin: fraction of the extent's longer side added on every side.
        on_error: "raise" or "skip" bad rows / missing images (counted in ``records.report``).

    Returns:
        (spec, records); ``records.report`` holds kept and skipped counts.
    """
    check_on_error(on_error)
    _check_box(box)
    project = fs.as_path(project_dir)
    if _is_csv(project):
        return load_label_csv(project, box, margin, on_error)
    spec = dlc_spec(project)
    report = LoadReport(source=str(project))
    records: list[InstanceRecord] = []
    for csv_path in _csv_files(project):
        for where, rel, kp in _read_csv(csv_path, spec, report, on_error):
            record = _record(project, rel, kp, where, len(records), box, margin, report, on_error)
            if record is not None:
                records.append(record)
    return spec, Records(records, report)


def load_label_csv(
    csv_path: PathLike, box: str = "keypoints", margin: float = 0.2, on_error: str = "raise"
) -> tuple[KeypointSpec, Records]:
    """Load a label CSV without a project (lightning-pose style): body parts from the header.

    Image paths are relative to the CSV's folder, else to its parent or grandparent: the first
    of these folders where the first rows' images exist is used for every row (absolute paths
    work too). Arguments and result as :func:`load_dlc_records`.

    Example:
        >>> import tempfile, pathlib, numpy as np, cv2
        >>> root = pathlib.Path(tempfile.mkdtemp())
        >>> (root / "labeled-data" / "v").mkdir(parents=True)
        >>> _ = cv2.imwrite(str(root / "labeled-data/v/0.png"), np.zeros((40, 60, 3), np.uint8))
        >>> _ = (root / "CollectedData.csv").write_text(
        ...     "scorer,me,me,me,me\\nbodyparts,l_ear,l_ear,r_ear,r_ear\\ncoords,x,y,x,y\\n"
        ...     "labeled-data/v/0.png,10,12,30,11\\n")
        >>> spec, records = load_label_csv(root / "CollectedData.csv")
        >>> spec.names, spec.flip_pairs, records[0].keypoints[:, :2].tolist()
        (('l_ear', 'r_ear'), ((0, 1),), [[10.0, 12.0], [30.0, 11.0]])
    """
    check_on_error(on_error)
    _check_box(box)
    csv_path = fs.as_path(csv_path)
    spec = csv_spec(csv_path)
    report = LoadReport(source=str(csv_path))
    rows = list(_read_csv(csv_path, spec, report, on_error))
    root = _image_root(csv_path, [rel for _, rel, _ in rows])
    records: list[InstanceRecord] = []
    for where, rel, kp in rows:
        record = _record(root, rel, kp, where, len(records), box, margin, report, on_error)
        if record is not None:
            records.append(record)
    return spec, Records(records, report)


def dlc_spec(project_dir: PathLike) -> KeypointSpec:
    """The spec of a DLC project (bodyparts, skeleton by name, left/right flip pairs), or of a
    label CSV (:func:`csv_spec`)."""
    if _is_csv(project_dir):
        return csv_spec(project_dir)
    config = _read_config(project_dir)
    names = config["bodyparts"]
    try:
        skeleton = [tuple(pair) for pair in config.get("skeleton") or ()]
        return KeypointSpec.from_dict(
            {"names": names, "skeleton": skeleton, "flip_pairs": guess_flip_pairs(names)}
        )
    except (SpecError, TypeError) as err:
        raise DataError(f"{project_dir}/config.yaml: {err}") from None


def csv_spec(csv_path: PathLike) -> KeypointSpec:
    """The spec of a label CSV: body parts in header order, guessed flip pairs, no skeleton."""
    path = fs.as_path(csv_path)
    header = read_csv_rows(path)[:4]
    _, _, columns = parse_header(path, header)
    names = list(dict.fromkeys(name for name, _ in columns))
    try:
        return KeypointSpec.from_dict({"names": names, "flip_pairs": guess_flip_pairs(names)})
    except SpecError as err:
        raise DataError(f"{path}: {err}") from None


def default_val_fraction(project: PathLike) -> float:
    """``1 - TrainingFraction[0]`` from a DLC project's config.yaml, else 0.2 (also for a CSV).

    DLC keeps ``round(TrainingFraction * frames)`` frames for training; ``split_dlc`` with this
    fraction holds out the same number.

    Example:
        >>> import tempfile, pathlib
        >>> project = pathlib.Path(tempfile.mkdtemp())
        >>> _ = (project / "config.yaml").write_text("bodyparts: [a]\\nTrainingFraction: [0.95]\\n")
        >>> round(default_val_fraction(project), 6)
        0.05
    """
    path = fs.as_path(project)
    if _is_csv(path):
        return DEFAULT_VAL_FRACTION
    config = _read_config(path)
    value = config.get("TrainingFraction")
    if value is None:
        return DEFAULT_VAL_FRACTION
    first = value[0] if isinstance(value, list) and value else value
    try:
        fraction = float(first)
    except (TypeError, ValueError):
        fraction = math.nan
    if not 0.0 < fraction <= 1.0:
        raise DataError(
            f"{fs.join(path, 'config.yaml')}: TrainingFraction should be a list of numbers in "
            f"(0, 1], got {value!r}; fix it or set data.dlc.val_fraction in the recipe"
        )
    return 1.0 - fraction


def split_dlc(
    records: Sequence[InstanceRecord],
    val_fraction: float = DEFAULT_VAL_FRACTION,
    val_frames: Sequence[str] = (),
    val_last: int = 0,
    seed: int = 0,
) -> tuple[list[InstanceRecord], list[InstanceRecord]]:
    """Split records into (train, val) by image.

    With ``val_frames`` and/or ``val_last`` those frames are the validation set (their union)
    and ``val_fraction`` is not used; otherwise ``val_fraction`` of the images, drawn with
    ``seed`` (at least one, and one image always stays in training; 0: no validation).

    Args:
        records: instance records (one per frame for DLC).
        val_fraction: fraction of the images held out at random.
        val_frames: image paths or globs (``*``, ``?``, ``[..]``), matched against the end of
            each image path at a folder boundary: ``labeled-data/video1/img001.png``,
            ``video1/img00*.png``, ``img001.png`` (in every folder), ``video2/*``.
        val_last: hold out the last N frames of each folder (video), in natural file-name
            order (``img9.png`` before ``img10.png``).
        seed: random seed of the fraction split.

    Raises:
        DataError: a ``val_frames`` pattern matches no frame, or no training frame is left.

    Example:
        >>> recs = [InstanceRecord(f"labeled-data/{v}/img{i}.png", (0, 0, 9, 9), np.zeros((1, 3)))
        ...         for v in "ab" for i in range(8, 12)]
        >>> [Path(r.image_path).name for r in split_dlc(recs, val_last=1)[1]]
        ['img11.png', 'img11.png']
        >>> [r.image_path for r in split_dlc(recs, val_frames=["a/img9.png", "b/img1?.png"])[1]]
        ['labeled-data/a/img9.png', 'labeled-data/b/img10.png', 'labeled-data/b/img11.png']
        >>> [len(part) for part in split_dlc(recs, val_fraction=0.25)]
        [6, 2]
    """
    if val_last < 0:
        raise ValueError(f"val_last must be >= 0, got {val_last}")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    images = sorted({r.image_path for r in records})
    if val_frames or val_last:
        val_images = _named_frames(images, val_frames) | _last_frames(images, val_last)
    elif val_fraction <= 0 or len(images) < 2:
        val_images = set()
    else:  # the same draw as kpnet.data.sources.split_by_image, so old splits stay as they were
        rng = np.random.default_rng(seed)
        n_val = min(max(1, round(val_fraction * len(images))), len(images) - 1)
        val_images = set(rng.permutation(images)[:n_val].tolist())
    train = [r for r in records if r.image_path not in val_images]
    val = [r for r in records if r.image_path in val_images]
    if records and not train:
        raise DataError(
            f"the validation split holds all {len(images)} labelled frames, none is left for "
            "training; hold out fewer (val_frames / val_last)"
        )
    return train, val


def _named_frames(images: Sequence[str], patterns: Sequence[str]) -> set[str]:
    tails = {image: _tails(image) for image in images}
    out: set[str] = set()
    for pattern in patterns:
        pat = str(pattern).replace("\\", "/").strip()
        while pat.startswith("./"):
            pat = pat[2:]
        hits = {im for im, ts in tails.items() if any(fnmatch.fnmatch(t, pat) for t in ts)}
        if not hits:
            example = "/".join(Path(images[0]).parts[-3:]) if images else "labeled-data/v/img.png"
            raise DataError(
                f"val_frames: {pattern!r} matches no labelled frame; give a path ending like "
                f"{example!r}, or a glob such as 'video1/img0*.png'"
            )
        out |= hits
    return out


def _tails(image: str) -> list[str]:
    """``a/b/c.png`` -> ``["a/b/c.png", "b/c.png", "c.png"]`` (suffixes at folder boundaries)."""
    posix = Path(image).as_posix()
    return [posix] + [posix[i + 1 :] for i, c in enumerate(posix) if c == "/"]


def _last_frames(images: Sequence[str], n: int) -> set[str]:
    if n <= 0:
        return set()
    folders: dict[str, list[str]] = {}
    for image in images:
        folders.setdefault(str(Path(image).parent), []).append(image)
    out: set[str] = set()
    for members in folders.values():
        members.sort(key=lambda p: natural_key(Path(p).name))
        out |= set(members[-n:])
    return out


def dlc_to_coco(
    project_dir: PathLike, out_json: PathLike, box: str = "keypoints", margin: float = 0.2
) -> dict[str, Any]:
    """Write a DLC project (or label CSV) as a COCO keypoints json; ``file_name`` is relative to
    the project (or to the folder the CSV's image paths are relative to).

    Load it back with ``load_coco_records(out_json, project_dir)``.

    Returns:
        the COCO dict that was written.
    """
    project = fs.as_path(project_dir)
    spec, records = load_dlc_records(project, box=box, margin=margin)
    if _is_csv(project):
        task, root = "animal", label_csv_root(project)
    else:
        task = str(_read_config(project).get("Task") or "animal")
        root = project
    coco = records_to_coco(records, spec, root, category_name=task)
    fs.write_atomic(out_json, json.dumps(coco, indent=1))
    return coco


def records_to_coco(
    records: list[InstanceRecord], spec: KeypointSpec, image_root: PathLike, category_name: str
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
def _read_config(project: PathLike) -> dict[str, Any]:
    path = fs.join(project, "config.yaml")
    if not fs.isfile(path):
        raise DataError(f"{path}: not found; is {project} a DeepLabCut project folder?")
    try:
        config = yaml.safe_load(fs.read_text(path)) or {}
    except yaml.YAMLError as err:
        raise DataError(f"{path}: not valid YAML: {fs.reason(err)}") from None
    if not isinstance(config, dict) or not config.get("bodyparts"):
        raise DataError(f"{path}: no 'bodyparts' list")
    if config.get("multianimalproject"):
        raise DataError(f"{path}: multi-animal DLC projects are not supported")
    return config


def _csv_files(project: PathLike) -> list[str | Path]:
    labeled = fs.join(project, "labeled-data")
    names = fs.listdir(labeled) if fs.isdir(labeled) else []
    folders = [f for f in (fs.child(labeled, n) for n in names) if fs.isdir(f)]
    files = []
    for folder in folders:
        inside = fs.listdir(folder)
        found = [fs.child(folder, n) for n in fnmatch.filter(inside, "CollectedData_*.csv")]
        if not found:  # labels saved by DLC's GUI after a refinement may be h5 only
            found = [fs.child(folder, n) for n in fnmatch.filter(inside, "CollectedData_*.h5")]
        files += found
    if not files:
        raise DataError(f"{labeled}: no CollectedData_*.csv (or .h5) files")
    return files


def label_rows(path: PathLike) -> list[list[str]]:
    """The rows of a label table as CSV cells: a ``.csv``, or DLC's ``CollectedData_*.h5``
    (pandas + PyTables; converted with ``DataFrame.to_csv``, the way DLC writes its CSVs).

    Raises:
        DataError: one line naming the file when it cannot be read.
    """
    if not fs.basename(path).lower().endswith((".h5", ".hdf5")):
        return read_csv_rows(path)
    import csv
    import io

    frame = read_h5_table(path, "label table")
    frame = frame.copy()
    frame.index.names = [None] * frame.index.nlevels  # no index-name row in the CSV text
    if getattr(frame.columns, "nlevels", 1) == 3:
        frame.columns.names = ["scorer", "bodyparts", "coords"]
    return list(csv.reader(io.StringIO(frame.to_csv(), newline="")))


def _read_csv(csv_path: PathLike, spec: KeypointSpec, report: LoadReport, on_error: str):
    """Yield (where, image path as written, keypoints [K,3]) per labelled row (a label CSV
    or a ``CollectedData_*.h5``)."""
    rows = label_rows(csv_path)
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


def _columns(csv_path: PathLike, header: list[list[str]], spec: KeypointSpec):
    """Map CSV columns to (keypoint index, 0 for x / 1 for y); count the path columns."""
    _, n_index, parsed = parse_header(csv_path, header)
    index = {n: i for i, n in enumerate(spec.names)}
    columns = {}
    for col, (name, coord) in enumerate(parsed, start=n_index):
        if coord == "likelihood":
            continue
        if name not in index:
            raise DataError(
                f"{csv_path}: column {col + 1} ({name!r}, {coord!r}) is not a bodypart "
                f"from config.yaml {list(spec.names)}"
            )
        columns[col] = (index[name], 0 if coord == "x" else 1)
    found = {columns[c] for c in columns}
    missing = [n for i, n in enumerate(spec.names) if not {(i, 0), (i, 1)} <= found]
    if missing:
        raise DataError(
            f"{csv_path}: no x / y columns for {', '.join(map(repr, missing))}, which "
            "config.yaml lists under bodyparts: label them in DeepLabCut (its labelling GUI "
            "adds the columns) or remove them from bodyparts"
        )
    return columns, n_index


def label_csv_root(csv_path: PathLike) -> str | Path:
    """The folder a label CSV's image paths are relative to (see :func:`load_label_csv`)."""
    csv_path = fs.as_path(csv_path)
    rows = read_csv_rows(csv_path)
    _, n_index, _ = parse_header(csv_path, rows[:4])
    rels = ["/".join(c.strip() for c in row[:n_index] if c.strip()) for row in rows[3:]]
    return _image_root(csv_path, [r.replace("\\", "/") for r in rels if r])


def _image_root(csv_path: PathLike, rels: Sequence[str], sample: int = 20) -> str | Path:
    """The first of the CSV's folder, its parent and grandparent holding the most of the first
    ``sample`` images (the CSV's folder when none does)."""
    folder = fs.parent(csv_path)
    candidates = [folder, fs.parent(folder), fs.parent(fs.parent(folder))]
    probe = list(dict.fromkeys(rels))[:sample]
    best, hits = folder, 0
    for root in dict.fromkeys(candidates):
        found = sum(_isfile(fs.join(root, rel)) for rel in probe)
        if found == len(probe):
            return root
        if found > hits:
            best, hits = root, found
    return best


def _isfile(path: str) -> bool:
    try:
        return fs.isfile(path)
    except fs.io_errors():  # e.g. above a bucket's root
        return False


def _is_csv(path: PathLike) -> bool:
    return fs.basename(path).lower().endswith(".csv") and not fs.isdir(path)


def _check_box(box: str) -> None:
    if box not in ("keypoints", "image"):
        raise ValueError(f"box must be 'keypoints' or 'image', got {box!r}")


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
        i = int(np.flatnonzero(x_nan != y_nan)[0])
        cols = sorted(col + 1 for col, (j, _) in columns.items() if j == i)
        has, lacks = ("y", "x") if x_nan[i] else ("x", "y")
        short = f" (the row has {len(row)} cells)" if len(row) <= max(cols) - 1 else ""
        raise DataError(
            f"columns {cols[0]}-{cols[-1]}: keypoint {i} has an {has} but no {lacks}{short}; "
            "give both or leave both empty"
        )
    if np.isinf(kp).any():
        raise DataError("infinite coordinate")
    out = np.zeros((k, 3), np.float32)
    labelled = ~x_nan
    out[labelled, :2] = kp[labelled]
    out[labelled, 2] = 2.0
    return out


# --------------------------------------------------------------------------- records
def _record(
    project: PathLike, rel: str, kp: np.ndarray, where: str, index: int, box: str,
    margin: float, report: LoadReport, on_error: str,
) -> InstanceRecord | None:  # fmt: skip
    path = fs.child(project, rel)
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
    """(height, width) from the image header (:func:`kpnet.data.images.probe`, no decode),
    or None if unreadable."""
    try:
        return probe(path).hw
    except DataError:
        return None
