"""Render the README's pictures of the DeepLabCut loop from the shared dlc_reaching project.

No trained model is used: the "predictions" are the project's HUMAN labels (55 frames of
``labeled-data/reachingvideo1``, in file order, likelihood 1 where labelled, 0 where not),
drawn by the same code ``kpnet predict --draw`` and ``kpnet plot`` run:

* ``docs/loop_labelled.png``: one frame with its points and skeleton
  (:func:`kpnet.inference.draw_keypoints`), half size;
* ``docs/loop_trajectory.png``: every body part's path over the first frame
  (:func:`kpnet.plots.plot_trajectory`), half size.

Usage:
    python docs/loop_pictures.py [--data ../shared/data/dlc_reaching]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's kpnet

import numpy as np  # noqa: E402

DEFAULT_DATA = ROOT.parent / "shared" / "data" / "dlc_reaching"


def main() -> None:
    import cv2

    from kpnet.data.dlc import dlc_spec, load_dlc_records
    from kpnet.frames import natural_key, read_image, write_image
    from kpnet.inference import draw_keypoints
    from kpnet.plots import plot_trajectory
    from kpnet.tracks import Tracks

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--frame", default="img020.png", help="the labelled frame to draw")
    args = parser.parse_args()
    if not args.data.is_dir():
        raise SystemExit(f"{args.data}: no such DeepLabCut project (pass --data)")
    spec = dlc_spec(args.data)
    _, records = load_dlc_records(args.data)
    records = sorted(records, key=lambda r: natural_key(Path(r.image_path).name))
    xy = np.stack([r.keypoints[:, :2] for r in records]).astype(np.float64)
    labelled = np.stack([r.keypoints[:, 2] > 0 for r in records])
    xy[~labelled] = np.nan
    names = tuple(Path(r.image_path).name for r in records)
    tracks = Tracks("human labels", spec.names, names, xy, labelled.astype(np.float64))

    def half(image: np.ndarray) -> np.ndarray:
        h, w = image.shape[:2]
        return cv2.resize(image, (w // 2, h // 2), interpolation=cv2.INTER_AREA)

    row = names.index(args.frame)
    image = read_image(records[row].image_path)
    drawn = draw_keypoints(image, xy[row], labelled[row].astype(np.float32), spec,
                           threshold=0.5, radius=6, thickness=3)  # fmt: skip
    write_image(ROOT / "docs" / "loop_labelled.png", half(drawn))
    first = read_image(records[0].image_path)
    # the plot is drawn at half size: scale the tracks' pixels with it
    tracks_half = Tracks(tracks.scorer, tracks.bodyparts, tracks.index, xy / 2, tracks.likelihood)
    plot_trajectory(tracks_half, ROOT / "docs" / "loop_trajectory.png", half(first), pcutoff=0.5)
    print("wrote docs/loop_labelled.png, docs/loop_trajectory.png")


if __name__ == "__main__":
    main()
