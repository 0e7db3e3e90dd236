"""``kpnet predict``: keypoints of images, folders of images and videos.

Example:
    $ kpnet predict runs/mouse clip.mp4 -o out/predictions.json --draw out/draw
    $ kpnet predict runs/mouse clip.mp4 -o out/clip.json --filter median --draw out \\
          --pcutoff 0.6 --trail 10
    $ kpnet predict runs/coco val2017/ --boxes detections.json --score-threshold 0.5 \\
          --images-json person_keypoints_val2017.json -o results.json

Outputs, ids and box matching: see :mod:`kpnet.predict`.

A bad file (undecodable, unreadable, over ``--max-pixels``, a video that cannot be opened or
is truncated) is skipped with a warning naming it; the rest is written, and the command ends
with a summary line and exit status :data:`EXIT_SKIPPED` (3). Every input bad: one error
line, exit status 1, nothing written.
"""

from __future__ import annotations

from pathlib import Path

import click

from kpnet import fs
from kpnet.codec import CodecError
from kpnet.data.images import MAX_PIXELS
from kpnet.data.records import DataError
from kpnet.spec import SpecError
from kpnet.tracks import DEFAULT_PCUTOFF

#: Exit status of a prediction that wrote its outputs but skipped some input files.
EXIT_SKIPPED = 3
#: How many skipped files the summary line names.
NAMED = 10


@click.command("predict")
@click.argument("model", type=click.Path())  # may be a URL: checked by load_model
@click.argument("inputs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option(
    "--boxes", type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="COCO detection results json (file_name or image_id, bbox, score); default: one "
         "crop per frame as the model was validated (whole frame or the frame's box).",
)  # fmt: skip
@click.option("--score-threshold", type=float, default=0.5, show_default=True,
              help="Ignore detections scoring below this.")  # fmt: skip
@click.option(
    "--images-json", type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="COCO json whose 'images' map file names to image ids.",
)  # fmt: skip
@click.option("-o", "--output", type=click.Path(dir_okay=False), default="predictions.json",
              show_default=True, help="COCO results json; DeepLabCut CSVs are written beside "
              "it (may be a URL).")  # fmt: skip
@click.option("--draw", type=click.Path(file_okay=False),
              help="Write labelled images (and <video>_labelled.mp4) into this folder (may be a "
                   "URL).")  # fmt: skip
@click.option("--heatmaps", is_flag=True, help="With --draw: also heatmap overlays per crop.")
@click.option("--flip-test/--no-flip-test", default=None,
              help="Average with the mirrored crops' heatmaps (default: as the model was saved).")
@click.option("--padding", type=float, nargs=2, default=None,
              help="Box extension (x, y) of the crops (default: the model's codec).")
@click.option("--category-id", type=int, default=1, show_default=True,
              help="category_id of whole-frame results.")  # fmt: skip
@click.option("--batch-size", type=int, default=16, show_default=True,
              help="Frames per forward pass (benchmarks/video.py finds the fastest).")  # fmt: skip
@click.option("--pcutoff", type=click.FloatRange(0.0, 1.0), default=DEFAULT_PCUTOFF,
              show_default=True,
              help="Likelihood below which a point is hidden (--draw) or bridged.")  # fmt: skip
@click.option("--trail", type=click.IntRange(min=0), default=0, show_default=True,
              help="With --draw: each point's path over the last N video frames.")  # fmt: skip
@click.option("--skeleton/--no-skeleton", default=True, show_default=True,
              help="With --draw: lines between the skeleton pairs of the spec.")  # fmt: skip
@click.option("--filter", "filter_method", type=click.Choice(["median", "savgol"]),
              help="Also write <csv stem>_filtered.csv / .h5 (see kpnet filter).")  # fmt: skip
@click.option("--window", "filter_window", type=int, default=5, show_default=True,
              help="With --filter: the filter's window in frames (odd).")  # fmt: skip
@click.option("--max-pixels", type=click.IntRange(1), default=MAX_PIXELS, show_default=True,
              help="Skip images (and videos) whose header declares more pixels per frame, "
                   "without decoding them.")  # fmt: skip
def predict(model, inputs, boxes, score_threshold, images_json, output, draw, heatmaps,
            flip_test, padding, category_id, batch_size, pcutoff, trail, skeleton,
            filter_method, filter_window, max_pixels) -> None:  # fmt: skip
    """Predict keypoints of INPUTS (image files, folders, videos) with MODEL (a .keras file
    or a run folder, local or a URL).

    A bad input file (undecodable, unreadable, over --max-pixels, a video that cannot be
    opened or ends before the frame count its header announces) is skipped with a warning
    naming it; everything else is written. Exit status: 0 all done, 3 some files skipped
    (listed on the last line), 1 an error (nothing written)."""
    from kpnet.predict import predict_inputs

    try:
        summary = predict_inputs(
            model, inputs, output, boxes=boxes, images_json=images_json,
            score_threshold=score_threshold, draw=draw, heatmaps=heatmaps, flip_test=flip_test,
            padding=padding, category_id=category_id, batch_size=batch_size, pcutoff=pcutoff,
            trail=trail, skeleton=skeleton, filter_method=filter_method,
            filter_window=filter_window, max_pixels=max_pixels, warn=_warn,
        )  # fmt: skip
    except (DataError, SpecError, CodecError, FileNotFoundError, ValueError) as err:
        raise click.ClickException(str(err)) from None
    except fs.io_errors() as err:  # e.g. a URL that cannot be reached
        raise click.ClickException(fs.reason(err)) from None
    click.echo(f"wrote {summary['predictions']} predictions for {summary['frames']} frames to "
               f"{output}")  # fmt: skip
    for path in [*summary["csv"], *summary["h5"], *summary["filtered"]]:
        click.echo(f"wrote {path}")
    if summary["skipped"]:
        click.echo(_skipped_line(summary["skipped"], summary["inputs"]), err=True)
        raise SystemExit(EXIT_SKIPPED)


def _warn(message: str) -> None:
    click.echo(f"Warning: {message}", err=True)


def _skipped_line(skipped: list[tuple[str, str]], inputs: int) -> str:
    """``2 of 50 inputs skipped (see the warnings above): a.jpg, b.avi``."""
    names = [Path(path).name for path, _ in skipped]
    more = f" and {len(names) - NAMED} more" if len(names) > NAMED else ""
    return (f"{len(skipped)} of {inputs} inputs skipped (see the warnings above): "
            f"{', '.join(names[:NAMED])}{more}")  # fmt: skip


COMMANDS = [predict]
