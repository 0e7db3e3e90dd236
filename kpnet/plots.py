"""Pictures of a video's tracks: what DeepLabCut's ``plot_trajectories`` draws, as PNGs.

:func:`plot_tracks` writes, for one prediction table (:class:`kpnet.tracks.Tracks`):

* ``<stem>_trajectory.png``: each body part's path in image pixels (points at or above
  ``pcutoff``), over the video's first frame when the video is given;
* ``<stem>_xy.png``: x and y over time per body part (confident points);
* ``<stem>_likelihood.png``: likelihood over time per body part, the ``pcutoff`` line drawn;
* ``<stem>_hist.png``: a histogram of each body part's likelihoods.

matplotlib runs with its Agg backend (no display needed); every PNG is written under a
temporary name and renamed (:func:`kpnet.fs.staged`).

Example:
    >>> import tempfile, numpy as np
    >>> from kpnet.tracks import Tracks
    >>> t = np.linspace(0, 6, 40)
    >>> xy = np.stack([np.stack([50 + 20 * np.cos(t), 40 + 20 * np.sin(t)], -1)] * 2, 1)
    >>> tracks = Tracks("s", ("nose", "tail"), tuple(range(40)), xy, np.full((40, 2), 0.9))
    >>> [p.name for p in plot_tracks(tracks, tempfile.mkdtemp(), stem="clip")]
    ['clip_trajectory.png', 'clip_xy.png', 'clip_likelihood.png', 'clip_hist.png']
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from kpnet import fs
from kpnet.frames import read_video_frames
from kpnet.tracks import DEFAULT_PCUTOFF, Tracks

PathLike = str | os.PathLike

#: matplotlib colour map of the body parts (DeepLabCut's default ``colormap``).
COLORMAP = "rainbow"


def first_frame(video: PathLike, index: int = 0) -> np.ndarray:
    """RGB uint8 frame ``index`` of a video (read sequentially: exact for every codec).

    Raises:
        DataError: one line naming the video when OpenCV cannot open it or it has fewer
            frames.
    """
    return read_video_frames(video, [index])[0][index]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display; a no-op when already Agg
    import matplotlib.pyplot as plt

    return plt


def _colors(n: int) -> list[Any]:
    import matplotlib

    cmap = matplotlib.colormaps[COLORMAP]
    return [cmap(v) for v in np.linspace(0, 1, max(n, 1))]


def _save(fig: Any, path: str | Path) -> str | Path:
    with fs.staged(path) as tmp:
        fig.savefig(tmp, format="png", dpi=fig.dpi)
    _pyplot().close(fig)
    return fs.as_path(path)


def plot_trajectory(
    tracks: Tracks, path: PathLike, background: np.ndarray | None = None,
    pcutoff: float = DEFAULT_PCUTOFF, dpi: int = 100,
) -> str | Path:  # fmt: skip
    """Each body part's confident positions, over ``background`` (an RGB frame) if given."""
    plt = _pyplot()
    ok = tracks.confident(pcutoff)
    if background is not None:
        h, w = background.shape[:2]
        fig = plt.figure(figsize=(w / dpi, h / dpi), dpi=dpi)
        ax = fig.add_axes([0, 0, 1, 1])
        ax.imshow(background)
        ax.axis("off")
    else:
        fig, ax = plt.subplots(figsize=(6, 5), dpi=dpi)
        ax.invert_yaxis()  # image coordinates: y grows downwards
        ax.set_xlabel("x (px)")
        ax.set_ylabel("y (px)")
        ax.set_aspect("equal", adjustable="datalim")
    for k, (name, color) in enumerate(zip(tracks.bodyparts, _colors(len(tracks.bodyparts)),
                                          strict=True)):  # fmt: skip
        pts = tracks.xy[ok[:, k], k]
        ax.plot(pts[:, 0], pts[:, 1], ".", ms=3, color=color, alpha=0.7, label=name)
    if background is not None:
        h, w = background.shape[:2]
        ax.set_xlim(0, w - 1)
        ax.set_ylim(h - 1, 0)
    ax.legend(loc="upper right", fontsize=7, markerscale=3, framealpha=0.6)
    return _save(fig, path)


def plot_xy(tracks: Tracks, path: PathLike, pcutoff: float = DEFAULT_PCUTOFF) -> str | Path:
    """x and y over time (frame number) per body part; points below ``pcutoff`` left out."""
    plt = _pyplot()
    frames = tracks.frame_numbers()
    ok = tracks.confident(pcutoff)
    fig, axes = plt.subplots(2, 1, figsize=(8, 5), sharex=True, dpi=100)
    for k, (name, color) in enumerate(zip(tracks.bodyparts, _colors(len(tracks.bodyparts)),
                                          strict=True)):  # fmt: skip
        for c, ax in enumerate(axes):
            values = np.where(ok[:, k], tracks.xy[:, k, c], np.nan)
            ax.plot(frames, values, "-", lw=1, color=color, label=name if c == 0 else None)
    axes[0].set_ylabel("x (px)")
    axes[1].set_ylabel("y (px)")
    axes[1].set_xlabel("frame")
    axes[0].legend(loc="upper right", fontsize=7, ncol=min(len(tracks.bodyparts), 5))
    fig.tight_layout()
    return _save(fig, path)


def plot_likelihood(tracks: Tracks, path: PathLike, pcutoff: float = DEFAULT_PCUTOFF) -> str | Path:
    """Likelihood over time per body part, with the ``pcutoff`` line."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 3), dpi=100)
    frames = tracks.frame_numbers()
    for k, (name, color) in enumerate(zip(tracks.bodyparts, _colors(len(tracks.bodyparts)),
                                          strict=True)):  # fmt: skip
        ax.plot(frames, tracks.likelihood[:, k], "-", lw=1, color=color, label=name)
    ax.axhline(pcutoff, color="k", ls="--", lw=1, label=f"pcutoff {pcutoff:g}")
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("frame")
    ax.set_ylabel("likelihood")
    ax.legend(loc="lower right", fontsize=7, ncol=3)
    fig.tight_layout()
    return _save(fig, path)


def plot_likelihood_hist(
    tracks: Tracks, path: PathLike, pcutoff: float = DEFAULT_PCUTOFF
) -> str | Path:
    """A histogram of the likelihoods, one panel per body part."""
    plt = _pyplot()
    k = len(tracks.bodyparts)
    cols = min(k, 4)
    rows = (k + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.2 * rows), dpi=100,
                             squeeze=False)  # fmt: skip
    bins = np.linspace(0, 1, 21)
    for i, (name, color) in enumerate(zip(tracks.bodyparts, _colors(k), strict=True)):
        ax = axes[i // cols][i % cols]
        values = tracks.likelihood[:, i]
        ax.hist(values[np.isfinite(values)], bins=bins, color=color)
        ax.axvline(pcutoff, color="k", ls="--", lw=1)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("likelihood", fontsize=8)
    for j in range(k, rows * cols):
        axes[j // cols][j % cols].axis("off")
    fig.tight_layout()
    return _save(fig, path)


def plot_tracks(
    tracks: Tracks, out_dir: PathLike, video: PathLike | None = None,
    pcutoff: float = DEFAULT_PCUTOFF, stem: str = "tracks",
) -> list[str | Path]:  # fmt: skip
    """Write the four pictures of the module docstring into ``out_dir``; returns their paths.

    The video (if given) is read before anything is written, so a bad video writes nothing.
    """
    background = first_frame(video) if video is not None else None
    fs.makedirs(out_dir)
    out = fs.as_path(out_dir)
    return [
        plot_trajectory(tracks, fs.child(out, f"{stem}_trajectory.png"), background, pcutoff),
        plot_xy(tracks, fs.child(out, f"{stem}_xy.png"), pcutoff),
        plot_likelihood(tracks, fs.child(out, f"{stem}_likelihood.png"), pcutoff),
        plot_likelihood_hist(tracks, fs.child(out, f"{stem}_hist.png"), pcutoff),
    ]
