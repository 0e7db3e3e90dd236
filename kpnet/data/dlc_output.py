"""Predictions in DeepLabCut's output format: the CSV (and ``.h5``) that ``analyze_videos`` writes.

Layout (what DLC users and their tools expect): three header rows, then one row per frame::

    scorer,kpnet_mouse,kpnet_mouse,kpnet_mouse,kpnet_mouse,...
    bodyparts,snout,snout,snout,tail,...
    coords,x,y,likelihood,x,...
    0,312.5,201.25,0.97,...
    1,313.0,200.5,0.95,...

The first column is the frame index for a video (as ``analyze_videos`` writes it) or the image
name for a folder of frames (as ``analyze_time_lapse_frames`` does). ``pandas.read_csv(path,
header=[0, 1, 2], index_col=0)`` reads it into DLC's MultiIndex frame.

Coordinates are always written with their likelihood, never blanked, as DLC does: downstream
tools (DLC's plotting, filtering, anipose, ...) hide points whose likelihood is below their own
``pcutoff``. A NaN coordinate or likelihood (a point the caller has no estimate for) is written
as an empty cell, as pandas does. Likelihoods must lie in 0..1.

The ``.h5`` twin (:func:`write_dlc_h5`, key ``df_with_missing``) needs pandas and PyTables
(kpnet dependencies since the video loop; in an environment without them it is skipped and
returns None).

Example:
    >>> import tempfile, pathlib, numpy as np
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "clipDLC_kpnet.csv"
    >>> xy = np.array([[[10.0, 20.0], [30.5, 40.25]]])
    >>> _ = write_dlc_csv(path, "kpnet", ["nose", "tail"], [0], xy, np.array([[0.9, 0.5]]))
    >>> print(path.read_text().strip())
    scorer,kpnet,kpnet,kpnet,kpnet,kpnet,kpnet
    bodyparts,nose,nose,nose,tail,tail,tail
    coords,x,y,likelihood,x,y,likelihood
    0,10.0,20.0,0.9,30.5,40.25,0.5
    >>> table = read_dlc_csv(path)
    >>> table.bodyparts, table.frame_names, table.xy.shape, table.likelihood.tolist()
    (('nose', 'tail'), ('0',), (1, 2, 2), [[0.9, 0.5]])
"""

from __future__ import annotations

import csv
import io
import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np

from kpnet import fs
from kpnet.data.records import DataError

log = logging.getLogger(__name__)

PathLike = str | os.PathLike
#: The key DeepLabCut reads and writes its ``.h5`` tables under.
H5_KEY = "df_with_missing"

#: Decimals written for coordinates (1e-4 px) and likelihoods.
XY_DECIMALS = 4
LIKELIHOOD_DECIMALS = 6


class DlcTable(NamedTuple):
    """A DLC table read back by :func:`read_dlc_csv`.

    Attributes:
        bodyparts: names in column order.
        frame_names: the first column(s) of every row (joined with ``/`` when split over
            several columns, as DLC 2.3 label files do).
        xy: float64 [N, K, 2], NaN where a cell is empty.
        likelihood: float64 [N, K], or None for a label file (coords x, y only).
        scorer: the scorer of the first body-part column.
    """

    bodyparts: tuple[str, ...]
    frame_names: tuple[str, ...]
    xy: np.ndarray
    likelihood: np.ndarray | None
    scorer: str


def write_dlc_csv(
    path: PathLike,
    scorer: str,
    bodyparts: Sequence[str],
    frame_names: Sequence[str | int],
    keypoints: np.ndarray,
    likelihood: np.ndarray,
) -> str | Path:
    """Write predictions as a DeepLabCut CSV, atomically (:func:`kpnet.fs.write_atomic`).

    Args:
        path: the CSV to write (its folder is created).
        scorer: the scorer row's value, e.g. ``kpnet_<model name>``.
        bodyparts: K names.
        frame_names: N first-column values: frame indices (video) or image names (folder).
        keypoints: [N, K, 2] x, y in image pixels (NaN: no estimate, written empty).
        likelihood: [N, K] scores in 0..1 (NaN: written empty).

    Returns:
        the path written.

    Raises:
        ValueError: shapes that do not match, or likelihoods outside 0..1.
    """
    xy, lik = _check_arrays(bodyparts, frame_names, keypoints, likelihood)
    k = len(bodyparts)
    rows = [
        ["scorer", *[str(scorer)] * (3 * k)],
        ["bodyparts", *[str(b) for b in bodyparts for _ in range(3)]],
        ["coords", *["x", "y", "likelihood"] * k],
    ]
    for name, frame_xy, frame_lik in zip(frame_names, xy, lik, strict=True):
        row = [str(name)]
        for (x, y), p in zip(frame_xy, frame_lik, strict=True):
            row += [_cell(x, XY_DECIMALS), _cell(y, XY_DECIMALS), _cell(p, LIKELIHOOD_DECIMALS)]
        rows.append(row)
    text = io.StringIO()
    csv.writer(text, lineterminator="\n").writerows(rows)
    fs.write_atomic(path, text.getvalue())
    return fs.as_path(path)


def write_dlc_h5(
    path: PathLike,
    scorer: str,
    bodyparts: Sequence[str],
    frame_names: Sequence[str | int],
    keypoints: np.ndarray,
    likelihood: np.ndarray,
) -> str | Path | None:
    """Write the same table as DLC's ``.h5`` (key ``df_with_missing``), if pandas and PyTables
    are installed; otherwise write nothing and return None (they are optional).

    Example:
        >>> import numpy as np
        >>> write_dlc_h5("x.h5", "s", ["a"], [0], np.zeros((1, 1, 2)),
        ...              np.ones((1, 1)))  # doctest: +SKIP
        PosixPath('x.h5')
    """
    if not h5_available():
        log.debug("pandas/PyTables not installed: %s not written", path)
        return None
    import pandas as pd

    xy, lik = _check_arrays(bodyparts, frame_names, keypoints, likelihood)
    columns = pd.MultiIndex.from_product(
        [[str(scorer)], [str(b) for b in bodyparts], ["x", "y", "likelihood"]],
        names=["scorer", "bodyparts", "coords"],
    )
    values = np.concatenate([xy, lik[..., None]], axis=2).reshape(len(xy), -1)
    index = list(frame_names)
    if all(isinstance(n, (int, np.integer)) for n in index):
        index = [int(n) for n in index]
    frame = pd.DataFrame(values, columns=columns, index=index)
    with fs.staged(path) as tmp:  # PyTables writes local files only
        frame.to_hdf(tmp, key=H5_KEY, format="table", mode="w")
    return fs.as_path(path)


def read_h5_table(path: PathLike, what: str = "table"):
    """DLC's pandas frame from an ``.h5`` (a prediction or label table; local or a URL).

    Raises:
        DataError: one line naming the file when pandas / PyTables cannot read it.
    """
    try:
        import pandas as pd

        with fs.local_copy(path) as local:
            return pd.read_hdf(local)
    except (OSError, ValueError, KeyError, TypeError, ImportError, RuntimeError) as err:
        raise DataError(f"{path}: cannot read this .h5 {what} ({fs.reason(err)})") from None


def h5_available() -> bool:
    """True when pandas and PyTables (needed for DLC's ``.h5`` files) import."""
    try:
        import pandas  # noqa: F401
        import tables  # noqa: F401
    except ImportError:
        return False
    return True


def read_csv_rows(path: PathLike) -> list[list[str]]:
    """The rows of a CSV file (a local path or a URL; a UTF-8 byte-order mark is dropped).

    Raises:
        DataError: one line naming the file: not found, or unreadable.
    """
    if not fs.isfile(path):
        raise DataError(f"{path}: file not found")
    try:
        text = fs.read_bytes(path).decode("utf-8-sig")
        return list(csv.reader(io.StringIO(text, newline="")))
    except (*fs.io_errors(), UnicodeDecodeError, csv.Error) as err:
        raise DataError(f"{path}: cannot read this CSV ({fs.reason(err)})") from None


def read_dlc_csv(path: PathLike) -> DlcTable:
    """Read a DLC CSV: predictions (x, y, likelihood) or labels (x, y), single animal.

    Raises:
        DataError: one line naming the file (and row) when it is not a DLC table.
    """
    path = fs.as_path(path)
    rows = read_csv_rows(path)
    scorer, n_index, columns = parse_header(path, rows[:4])
    bodyparts = tuple(dict.fromkeys(name for name, _ in columns))
    part = {name: i for i, name in enumerate(bodyparts)}
    slot = {"x": 0, "y": 1, "likelihood": 2}
    has_lik = any(coord == "likelihood" for _, coord in columns)
    names, values = [], []
    for line, row in enumerate(rows[3:], start=4):
        if not any(cell.strip() for cell in row):
            continue
        table = np.full((len(bodyparts), 3), np.nan)
        for col, (name, coord) in enumerate(columns, start=n_index):
            cell = row[col].strip() if col < len(row) else ""
            try:
                table[part[name], slot[coord]] = float(cell) if cell else math.nan
            except ValueError:
                raise DataError(
                    f"{path}:{line}: column {col + 1} ({name} {coord}) {cell!r} is not a number"
                ) from None
        names.append("/".join(c.strip() for c in row[:n_index] if c.strip()))
        values.append(table)
    data = np.stack(values) if values else np.zeros((0, len(bodyparts), 3))
    return DlcTable(
        bodyparts, tuple(names), data[..., :2], data[..., 2] if has_lik else None, scorer
    )


def parse_header(path: PathLike, header: list[list[str]]) -> tuple[str, int, list[tuple[str, str]]]:
    """(scorer, number of index columns, [(bodypart, coord) per data column]) of a DLC CSV.

    ``coord`` is ``x``, ``y`` or ``likelihood``. Raises DataError naming the file for a file
    that is not a single-animal DLC table.
    """
    if len(header) < 3 or header[0][:1] != ["scorer"]:
        raise DataError(
            f"{path}: not a DeepLabCut CSV (needs the three header rows scorer / bodyparts / "
            "coords, first cell 'scorer')"
        )
    if header[1][:1] == ["individuals"]:
        raise DataError(f"{path}: multi-animal DLC CSVs (an 'individuals' row) are not supported")
    if header[2][:1] != ["coords"]:
        raise DataError(f"{path}: row 3 should start with 'coords', got {header[2][:1]}")
    parts, coords = header[1], header[2]
    n_index = next((i for i, c in enumerate(coords) if c in ("x", "y")), len(coords))
    columns = []
    for col in range(n_index, len(coords)):
        name = parts[col].strip() if col < len(parts) else ""
        coord = coords[col].strip()
        if not name or coord not in ("x", "y", "likelihood"):
            raise DataError(
                f"{path}: column {col + 1} ({name!r}, {coord!r}) is not a bodypart's x, y or "
                "likelihood"
            )
        columns.append((name, coord))
    if not columns:
        raise DataError(f"{path}: no bodypart columns in the header")
    for name in dict.fromkeys(n for n, _ in columns):
        have = [c for n, c in columns if n == name]
        if sorted(have) not in (["x", "y"], ["likelihood", "x", "y"]):
            raise DataError(f"{path}: bodypart {name!r} has columns {have}, expected x, y")
    scorer = header[0][n_index].strip() if n_index < len(header[0]) else ""
    return scorer, n_index, columns


# --------------------------------------------------------------------------- helpers
def _check_arrays(bodyparts, frame_names, keypoints, likelihood) -> tuple[np.ndarray, np.ndarray]:
    n, k = len(frame_names), len(bodyparts)
    xy = np.asarray(keypoints, np.float64)
    lik = np.asarray(likelihood, np.float64)
    if xy.shape != (n, k, 2):
        raise ValueError(f"keypoints: shape {xy.shape}, expected (frames, bodyparts, 2) {n, k, 2}")
    if lik.shape != (n, k):
        raise ValueError(f"likelihood: shape {lik.shape}, expected (frames, bodyparts) = {n, k}")
    finite = lik[np.isfinite(lik)]
    if finite.size and (finite.min() < -1e-6 or finite.max() > 1 + 1e-6):
        raise ValueError(f"likelihood must lie in 0..1, got {finite.min():.4g}..{finite.max():.4g}")
    return xy, np.where(np.isfinite(lik), np.clip(lik, 0.0, 1.0), np.nan)


def _cell(value: float, decimals: int) -> str:
    if not math.isfinite(value):
        return ""
    return repr(round(float(value), decimals))
