"""The frames to label next: DeepLabCut's ``extract_outlier_frames`` for kpnet tables.

:func:`find_outliers` scores every frame of a prediction table by three signs that the
model is wrong there (DeepLabCut's ``uncertain``, ``jump`` and ``fitting`` criteria):

* **uncertain**: body parts whose likelihood is below ``pcutoff``;
* **jump**: a confident body part moved more than ``jump`` pixels since the previous frame;
* **fitting**: a confident body part lies more than ``epsilon`` pixels from the median-
  filtered track (:func:`kpnet.tracks.filter_tracks`).

Frames showing any sign are candidates; when there are more than ``n`` they are spread over
the video by k-means (``scipy.cluster.vq.kmeans2``, seeded) on time and pose, and the
highest-scoring candidate of each cluster is taken.

:func:`write_outlier_frames` writes them into a DeepLabCut project the way DLC does, so its
labelling tools open them: ``labeled-data/<video stem>/img<frame>.png`` (DLC's zero padding:
``ceil(log10(frames))`` digits), the model's guesses as ``machinelabels-iter<iteration>.h5``
(key ``df_with_missing``, rows ``("labeled-data", stem, image)``, columns scorer /
bodyparts / coords x, y, likelihood) and ``machinelabels.csv``, and the video in
``config.yaml``'s ``video_sets`` (added as one text block: comments and the rest of the file
are kept). Everything is read and checked before the first file is written; each file is
written under a temporary name and renamed.

Example:
    >>> import numpy as np
    >>> from kpnet.tracks import Tracks
    >>> t = np.arange(100.0)
    >>> xy = np.stack([t, 0 * t], -1)[:, None, :].copy()
    >>> lik = np.ones((100, 1))
    >>> xy[40] += 60.0                      # a jump and back
    >>> lik[75] = 0.1                       # an uncertain frame
    >>> find_outliers(Tracks("s", ("nose",), tuple(range(100)), xy, lik), n=5).frames
    (40, 41, 75)
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kpnet import fs
from kpnet.data.dlc_output import H5_KEY
from kpnet.data.records import DataError
from kpnet.frames import announced_frames, read_video_frames, write_image
from kpnet.tracks import DEFAULT_PCUTOFF, Tracks, check_bodyparts, filter_tracks

PathLike = str | os.PathLike

#: DeepLabCut's default ``epsilon`` (pixels) for the jump and fitting criteria.
DEFAULT_EPSILON = 20.0


@dataclass(frozen=True)
class OutlierPick:
    """Frames picked by :func:`find_outliers` (row positions in the table, sorted) and,
    per picked frame, its score and the signs it showed."""

    frames: tuple[int, ...]
    scores: tuple[float, ...]
    reasons: tuple[tuple[str, ...], ...]
    candidates: int


def outlier_scores(
    tracks: Tracks, pcutoff: float = DEFAULT_PCUTOFF, jump: float = DEFAULT_EPSILON,
    epsilon: float = DEFAULT_EPSILON, window: int = 5,
) -> dict[str, np.ndarray]:  # fmt: skip
    """Per frame [N]: ``uncertain`` (fraction of body parts below ``pcutoff``), ``jump``
    and ``fitting`` (largest excess over the threshold, in thresholds; 0 when within)."""
    ok = tracks.confident(pcutoff)
    n = tracks.num_frames
    uncertain = 1.0 - ok.mean(axis=1) if n else np.zeros(0)
    step = np.zeros(n)
    if n > 1:
        move = np.linalg.norm(np.diff(tracks.xy, axis=0), axis=-1)  # [N-1, K]
        both = ok[1:] & ok[:-1]
        step[1:] = np.where(both, move, 0.0).max(axis=1)
    smooth = filter_tracks(tracks, "median", window=window, pcutoff=pcutoff).xy
    off = np.linalg.norm(np.nan_to_num(tracks.xy - smooth), axis=-1)
    fit = np.where(ok, off, 0.0).max(axis=1) if n else np.zeros(0)
    return {
        "uncertain": uncertain,
        "jump": np.maximum(step / jump - 1.0, 0.0),
        "fitting": np.maximum(fit / epsilon - 1.0, 0.0),
    }


def find_outliers(
    tracks: Tracks, n: int = 20, pcutoff: float = DEFAULT_PCUTOFF,
    jump: float = DEFAULT_EPSILON, epsilon: float = DEFAULT_EPSILON, seed: int = 0,
    exclude: Iterable[int] = (), window: int = 5,
) -> OutlierPick:  # fmt: skip
    """Pick up to ``n`` frames (rows) to label next (see the module docstring).

    ``exclude`` lists rows not to pick (frames already extracted or labelled).
    """
    if n < 1:
        raise ValueError(f"outliers: n must be >= 1, got {n}")
    signs = outlier_scores(tracks, pcutoff, jump, epsilon, window)
    score = signs["uncertain"] + signs["jump"] + signs["fitting"]
    flagged = score > 0
    flagged[list(set(exclude) & set(range(tracks.num_frames)))] = False
    candidates = np.flatnonzero(flagged)
    if len(candidates) > n:
        chosen = _spread(tracks, candidates, score, n, seed, pcutoff)
    else:
        chosen = candidates
    chosen = np.sort(chosen)
    reasons = tuple(tuple(k for k in ("uncertain", "jump", "fitting") if signs[k][i] > 0)
                    for i in chosen)  # fmt: skip
    return OutlierPick(tuple(int(i) for i in chosen), tuple(float(score[i]) for i in chosen),
                       reasons, int(len(candidates)))  # fmt: skip


def _spread(
    tracks: Tracks, candidates: np.ndarray, score: np.ndarray, n: int, seed: int, pcutoff: float
) -> np.ndarray:
    """k-means over (time, pose) of the candidates; the best-scoring one per cluster."""
    from scipy.cluster.vq import kmeans2

    smooth = filter_tracks(tracks, "median", window=5, pcutoff=pcutoff).xy
    pose = np.nan_to_num(smooth.reshape(len(smooth), -1)[candidates])
    spread = pose.std(axis=0)
    pose = (pose - pose.mean(axis=0)) / np.where(spread > 0, spread, 1.0)
    time = candidates[:, None] / max(tracks.num_frames - 1, 1) * 2.0 * math.sqrt(pose.shape[1])
    features = np.concatenate([time, pose / math.sqrt(max(pose.shape[1], 1))], axis=1)
    _, labels = kmeans2(features, n, seed=seed, minit="++")
    chosen = []
    for c in range(n):
        members = candidates[labels == c]
        if len(members):
            chosen.append(members[np.argmax(score[members])])
    rest = [i for i in candidates[np.argsort(-score[candidates], kind="stable")]
            if i not in set(chosen)]  # fmt: skip
    chosen += rest[: n - len(chosen)]  # empty clusters: the next best scores
    return np.asarray(chosen, np.int64)


# --------------------------------------------------------------------------- project
def frame_name(frame: int, num_frames: int) -> str:
    """DeepLabCut's image name of a video frame: ``img`` + ``ceil(log10(frames))`` digits.

    Example:
        >>> frame_name(7, 2000), frame_name(7, 30)
        ('img0007.png', 'img07.png')
    """
    digits = max(1, int(math.ceil(math.log10(max(num_frames, 2)))))
    return f"img{frame:0{digits}d}.png"


def read_project_config(project: PathLike) -> tuple[Path, dict[str, Any]]:
    """``(config.yaml path, its content)`` of a DLC project, or a one-line DataError."""
    import yaml

    root = Path(project)
    if not root.is_dir():
        raise DataError(f"{root}: no such DeepLabCut project folder")
    path = root / "config.yaml"
    if not path.is_file():
        raise DataError(f"{path}: not found; is {root} a DeepLabCut project folder?")
    try:
        config = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as err:
        raise DataError(f"{path}: cannot read it ({fs.reason(err)})") from None
    if not isinstance(config, dict) or not config.get("bodyparts"):
        raise DataError(f"{path}: no 'bodyparts' list")
    return path, config


def add_video_set(config_text: str, video: str, width: int, height: int) -> str:
    """``config.yaml`` text with ``video`` added under ``video_sets`` (DLC's ``crop`` entry),
    the rest of the text untouched; unchanged when the video is already there.

    Example:
        >>> text = ("Task: t\\n# videos\\nvideo_sets:\\n  /a.mp4:\\n    crop: 0, 4, 0, 3\\n"
        ...         "bodyparts: [a]\\n")
        >>> print(add_video_set(text, "/b.mp4", 640, 480))
        Task: t
        # videos
        video_sets:
          "/b.mp4":
            crop: 0, 640, 0, 480
          /a.mp4:
            crop: 0, 4, 0, 3
        bodyparts: [a]
        <BLANKLINE>
    """
    import yaml

    config = yaml.safe_load(config_text) or {}
    sets = config.get("video_sets") or {}
    if isinstance(sets, dict) and video in sets:
        return config_text
    entry = [f"  {json.dumps(video)}:", f"    crop: 0, {width}, 0, {height}"]
    lines = config_text.splitlines()
    at = next((i for i, line in enumerate(lines) if line.split(":")[0] == "video_sets"), None)
    if at is None:
        lines += ["video_sets:", *entry]
    else:  # block style (or empty): the new entry goes first, the others stay as written
        value = lines[at].split(":", 1)[1].split("#")[0].strip()
        lines[at : at + 1] = ["video_sets:", *entry]
        if value not in ("", "{}", "null", "~"):
            lines = []  # flow style with entries: rewritten below
    text = "\n".join(lines) + "\n"
    expected = dict(config, video_sets={**(sets if isinstance(sets, dict) else {}),
                                        video: {"crop": f"0, {width}, 0, {height}"}})  # fmt: skip
    if not lines or yaml.safe_load(text) != expected:  # an unusual layout: rewrite it all
        text = yaml.safe_dump(expected, sort_keys=False)
    return text


def write_outlier_frames(
    project: PathLike, video: PathLike, tracks: Tracks, pick: OutlierPick | None = None,
    n: int = 20, table_name: str | None = None, **find_options: Any,
) -> dict[str, Any]:  # fmt: skip
    """Extract the picked frames of ``video`` into the DLC project (module docstring).

    Without ``pick`` the frames come from :func:`find_outliers` (``n``, ``find_options``),
    leaving out frames the project's folder for this video already holds. ``table_name``
    names the table in errors (default: its scorer).

    Returns:
        ``{"folder", "frames": [frame numbers], "images": [paths], "machinelabels":
        [h5, csv], "config": path or None (unchanged)}``.

    Raises:
        DataError: one line: no project, body parts that differ from the project's, a video
            OpenCV cannot read or that is truncated.
    """
    config_path, config = read_project_config(project)
    check_bodyparts(tracks, [str(b) for b in config["bodyparts"]],
                    table_name or str(tracks.scorer or "table"),
                    f"the project {config_path}")  # fmt: skip
    video = Path(video)
    stem = video.stem
    folder = Path(project) / "labeled-data" / stem
    numbers = tracks.frame_numbers()
    num_frames = _frame_count(video, len(numbers))
    if pick is None:
        present = {p.name for p in folder.glob("img*.png")} if folder.is_dir() else set()
        exclude = [i for i, f in enumerate(numbers) if frame_name(int(f), num_frames) in present]
        pick = find_outliers(tracks, n=n, exclude=exclude, **find_options)
    wanted = [int(numbers[i]) for i in pick.frames]
    if not wanted:  # no frame shows a sign: nothing to write
        return {"folder": str(folder), "frames": [], "images": [], "machinelabels": [],
                "config": None, "candidates": pick.candidates}  # fmt: skip
    images, _ = read_video_frames(video, wanted)  # everything read before writing
    height, width = next(iter(images.values())).shape[:2] if images else (0, 0)
    paths = []
    for frame in wanted:
        path = folder / frame_name(frame, num_frames)
        write_image(path, images[frame])
        paths.append(str(path))
    machine = _machine_labels(folder, tracks, pick.frames, num_frames, stem, config)
    config_written = None
    if images:
        text = config_path.read_text()
        new = add_video_set(text, str(video.resolve()), width, height)
        if new != text:
            fs.write_atomic(config_path, new)
            config_written = str(config_path)
    return {"folder": str(folder), "frames": wanted, "images": paths, "machinelabels": machine,
            "config": config_written, "candidates": pick.candidates}  # fmt: skip


def _frame_count(video: Path, rows: int) -> int:
    """Frames of ``video`` for the image names: its header's count, at least the table's rows."""
    return max(announced_frames(video), rows, 1)


def _machine_labels(
    folder: Path, tracks: Tracks, rows: Sequence[int], num_frames: int, stem: str,
    config: dict[str, Any],
) -> list[str]:  # fmt: skip
    """Write (merge into) ``machinelabels-iter<iteration>.h5`` and ``machinelabels.csv``."""
    import pandas as pd

    iteration = int(config.get("iteration") or 0)
    numbers = tracks.frame_numbers()
    names = [frame_name(int(numbers[i]), num_frames) for i in rows]
    index = pd.MultiIndex.from_tuples([("labeled-data", stem, name) for name in names])
    columns = pd.MultiIndex.from_product(
        [[tracks.scorer], list(tracks.bodyparts), ["x", "y", "likelihood"]],
        names=["scorer", "bodyparts", "coords"],
    )
    rows = list(rows)
    values = np.concatenate([tracks.xy[rows], tracks.likelihood[rows][..., None]], axis=2)
    frame = pd.DataFrame(values.reshape(len(rows), -1), index=index, columns=columns)
    h5 = folder / f"machinelabels-iter{iteration}.h5"
    if h5.is_file():  # an earlier extraction of this iteration: keep its rows
        try:
            old = pd.read_hdf(h5)
            if list(old.columns) == list(frame.columns):
                frame = pd.concat([old[~old.index.isin(frame.index)], frame]).sort_index()
        except (OSError, ValueError, KeyError, TypeError, RuntimeError):
            pass  # unreadable: replaced by this extraction's guesses
    with fs.staged(h5) as tmp:
        frame.to_hdf(tmp, key=H5_KEY, mode="w")  # fixed format, as DLC writes
    csv = folder / "machinelabels.csv"
    fs.write_atomic(csv, frame.to_csv())
    return [str(h5), str(csv)]
