"""Tracks over time: DeepLabCut prediction tables (CSV + ``.h5``) and their filters.

A :class:`Tracks` is what ``analyze_videos`` writes for one video: per frame and body part
x, y and a likelihood. :func:`read_tracks` reads DLC's CSV (three header rows) or ``.h5``
(key ``df_with_missing``); :func:`write_tracks` writes both, each under a temporary name
renamed into place. :func:`filter_tracks` is ``filterpredictions``: a median or
Savitzky-Golay filter over time per body part, likelihood-aware (points below ``pcutoff``
are first replaced by a linear interpolation of their confident neighbours, so a dropout
is bridged instead of averaged in).

Example:
    >>> import numpy as np
    >>> t = np.arange(9.0)
    >>> xy = np.stack([t, t], -1)[:, None, :].copy()
    >>> xy[4] = 50.0                                   # one spike
    >>> lik = np.ones((9, 1)); lik[6] = 0.0            # one dropout
    >>> tracks = Tracks("s", ("nose",), tuple(range(9)), xy, lik)
    >>> filter_tracks(tracks, "median", window=3).xy[4, 0].tolist()  # the spike is gone
    [5.0, 5.0]
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from kpnet import fs
from kpnet.data.dlc_output import read_dlc_csv, read_h5_table, write_dlc_csv, write_dlc_h5
from kpnet.data.records import DataError

PathLike = str | os.PathLike

#: Filters of :func:`filter_tracks`.
FILTERS = ("median", "savgol")
#: Likelihood below which a point counts as missing (DeepLabCut's default ``pcutoff``).
DEFAULT_PCUTOFF = 0.6


@dataclass(frozen=True)
class Tracks:
    """One video's predictions: ``xy`` [N, K, 2] image pixels, ``likelihood`` [N, K].

    ``index`` holds the first column per row (frame numbers for a video).
    """

    scorer: str
    bodyparts: tuple[str, ...]
    index: tuple[str | int, ...]
    xy: np.ndarray
    likelihood: np.ndarray

    @property
    def num_frames(self) -> int:
        """Number of rows (frames)."""
        return int(self.xy.shape[0])

    def frame_numbers(self) -> np.ndarray:
        """Frame number of each row: the index when it is numeric, else the row position."""
        try:
            return np.array([int(v) for v in self.index], np.int64)
        except (TypeError, ValueError):
            return np.arange(self.num_frames, dtype=np.int64)

    def confident(self, pcutoff: float) -> np.ndarray:
        """bool [N, K]: finite and ``likelihood >= pcutoff``."""
        return np.isfinite(self.xy).all(-1) & (np.nan_to_num(self.likelihood) >= pcutoff)


# --------------------------------------------------------------------------- reading
def read_tracks(path: PathLike) -> Tracks:
    """Read a DLC prediction table: a ``.csv`` or an ``.h5`` (DeepLabCut's layout).

    Raises:
        DataError: one line naming the file: missing, not a DLC table, or labels without
            likelihoods.
    """
    path = fs.as_path(path)
    if not fs.isfile(path):
        raise DataError(f"{path}: file not found")
    if fs.basename(path).lower().endswith((".h5", ".hdf5")):
        return _read_h5(path)
    table = read_dlc_csv(path)
    if table.likelihood is None:
        raise DataError(f"{path}: a label file (x, y only), not predictions with likelihoods")
    index = tuple(_index_value(v) for v in table.frame_names)
    return Tracks(table.scorer, table.bodyparts, index, table.xy, table.likelihood)


def _index_value(value: str) -> str | int:
    return int(value) if value.isdigit() else value


def _read_h5(path: PathLike) -> Tracks:
    return tracks_from_frame(read_h5_table(path), path)


def tracks_from_frame(frame, where: PathLike = "table") -> Tracks:
    """A :class:`Tracks` from DLC's pandas frame (columns scorer / bodyparts / coords)."""
    columns = frame.columns
    if getattr(columns, "nlevels", 1) != 3:
        raise DataError(f"{where}: not a single-animal DLC table (needs 3 column levels: "
                        "scorer / bodyparts / coords)")  # fmt: skip
    bodyparts = tuple(dict.fromkeys(columns.get_level_values(-2)))
    scorer = str(columns.get_level_values(0)[0])
    n = len(frame)
    data = np.full((n, len(bodyparts), 3), np.nan)
    for k, part in enumerate(bodyparts):
        for c, coord in enumerate(("x", "y", "likelihood")):
            hit = [i for i, col in enumerate(columns) if col[-2] == part and col[-1] == coord]
            if not hit and coord != "likelihood":
                raise DataError(f"{where}: bodypart {part!r} has no {coord} column")
            if hit:
                data[:, k, c] = frame.iloc[:, hit[0]].to_numpy(np.float64)
    if np.isnan(data[..., 2]).all():
        raise DataError(f"{where}: a label table (x, y only), not predictions with likelihoods")
    index = tuple(_index_value(str(v)) for v in frame.index)
    return Tracks(scorer, bodyparts, index, data[..., :2], data[..., 2])


# --------------------------------------------------------------------------- writing
def write_tracks(csv_path: PathLike, tracks: Tracks, h5: bool = True) -> list[str | Path]:
    """Write ``tracks`` as DLC's CSV and (``h5``) the ``.h5`` beside it; returns the paths.

    Each file is written under a temporary name and renamed, so a failure leaves no half
    file (and an older table in place).
    """
    args = (tracks.scorer, tracks.bodyparts, list(tracks.index), tracks.xy, tracks.likelihood)
    written = [write_dlc_csv(csv_path, *args)]
    if h5:
        h5_path = os.path.splitext(os.fspath(csv_path))[0] + ".h5"
        out = write_dlc_h5(h5_path, *args)
        if out is not None:
            written.append(out)
    return written


def filtered_path(path: PathLike) -> str | Path:
    """``clip.csv`` -> ``clip_filtered.csv`` (as DeepLabCut names filtered tables)."""
    stem, _ = os.path.splitext(os.fspath(path))
    return fs.as_path(f"{stem}_filtered.csv")


# --------------------------------------------------------------------------- filters
def interpolate_missing(values: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """``values`` [N] with the entries where ``keep`` is False linearly interpolated from
    the kept ones (held constant beyond the first / last); all NaN if none is kept.

    Example:
        >>> interpolate_missing(np.array([0.0, 9.0, 2.0, 3.0]), np.array([1, 0, 1, 1], bool))
        array([0., 1., 2., 3.])
    """
    values = np.asarray(values, np.float64)
    keep = np.asarray(keep, bool) & np.isfinite(values)
    if not keep.any():
        return np.full_like(values, np.nan)
    t = np.arange(len(values))
    return np.interp(t, t[keep], values[keep])


def filter_tracks(
    tracks: Tracks, method: str = "median", window: int = 5, pcutoff: float = DEFAULT_PCUTOFF,
    polyorder: int = 2,
) -> Tracks:  # fmt: skip
    """Filter every body part's x and y over time (DeepLabCut's ``filterpredictions``).

    Points below ``pcutoff`` (or NaN) are replaced by a linear interpolation of the
    confident ones before filtering, so they are bridged, not averaged in. ``median`` is
    ``scipy.signal.medfilt`` (removes single-frame jumps), ``savgol`` is
    ``scipy.signal.savgol_filter`` (smooths jitter, keeps the shape of fast moves). The
    likelihoods are kept as they were (DLC does the same); a body part never confident
    stays NaN.

    Raises:
        ValueError: an unknown method, a window < 3 or even, or polyorder >= window.
    """
    from scipy.signal import medfilt, savgol_filter

    if method not in FILTERS:
        raise ValueError(f"filter: unknown method {method!r}; use one of {', '.join(FILTERS)}")
    if window < 3 or window % 2 == 0:
        raise ValueError(f"filter: window must be odd and >= 3, got {window}")
    if method == "savgol" and not 0 <= polyorder < window:
        raise ValueError(f"filter: polyorder must be in 0..window-1, got {polyorder}")
    n = tracks.num_frames
    out = np.array(tracks.xy, np.float64, copy=True)
    keep = tracks.confident(pcutoff)
    for k in range(len(tracks.bodyparts)):
        for c in range(2):
            series = interpolate_missing(tracks.xy[:, k, c], keep[:, k])
            if n == 0 or not np.isfinite(series).all():
                out[:, k, c] = series
                continue
            w = min(window, n if n % 2 else n - 1)
            if w < 3:
                out[:, k, c] = series
            elif method == "median":
                padded = np.pad(series, w // 2, mode="edge")  # no zeros pulled in at the ends
                out[:, k, c] = medfilt(padded, w)[w // 2 : w // 2 + n]
            else:
                out[:, k, c] = savgol_filter(series, w, min(polyorder, w - 1), mode="interp")
    return replace(tracks, xy=out)


def check_bodyparts(tracks: Tracks, names: Sequence[str], where: str, other: str) -> None:
    """Raise a one-line DataError when the table's body parts differ from ``names``."""
    if tuple(tracks.bodyparts) != tuple(names):
        raise DataError(
            f"{where}: body parts {list(tracks.bodyparts)} differ from {other}'s "
            f"{list(names)}; is this table from another project?"
        )
