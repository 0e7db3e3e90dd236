"""``kpnet filter``, ``kpnet plot``, ``kpnet outliers``: the rest of a DeepLabCut user's loop.

Example:
    $ kpnet predict runs/mouse clip.mp4 -o out/clip.json        # out/clip.csv + clip.h5
    $ kpnet filter out/clip.csv --method median                   # out/clip_filtered.csv/.h5
    $ kpnet plot out/clip_filtered.csv --video clip.mp4 -o out/plots
    $ kpnet outliers out/clip.csv clip.mp4 --project my-dlc-project -n 20

None of them imports TensorFlow.
"""

from __future__ import annotations

from pathlib import Path

import click

from kpnet.data.records import DataError
from kpnet.tracks import DEFAULT_PCUTOFF

PCUTOFF_HELP = "Likelihood below which a point counts as missing (DeepLabCut's pcutoff)."
pcutoff_option = click.option("--pcutoff", type=click.FloatRange(0.0, 1.0), default=DEFAULT_PCUTOFF,
                              show_default=True, help=PCUTOFF_HELP)  # fmt: skip


def _fail(err: BaseException) -> click.ClickException:
    from kpnet import fs

    if isinstance(err, DataError | ValueError):
        return click.ClickException(str(err).splitlines()[0])
    return click.ClickException(fs.reason(err))


@click.command("filter")
@click.argument("table", type=click.Path(path_type=Path))
@click.option(
    "--method",
    type=click.Choice(["median", "savgol"]),
    default="median",
    show_default=True,
    help="median: removes single-frame jumps; savgol: smooths.",
)
@click.option(
    "--window", type=int, default=5, show_default=True, help="Filter window in frames (odd, >= 3)."
)
@click.option(
    "--polyorder", type=int, default=2, show_default=True, help="savgol: the polynomial's order."
)
@pcutoff_option
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    help="CSV to write (default: <table>_filtered.csv; the .h5 goes beside it).",
)
def filter_command(table, method, window, polyorder, pcutoff, output) -> None:
    """Filter a DeepLabCut prediction TABLE (.csv or .h5) over time, per body part.

    Points below --pcutoff are interpolated from their confident neighbours before the
    filter runs, so a dropout is bridged rather than averaged in.
    """
    from kpnet.tracks import filter_tracks, filtered_path, read_tracks, write_tracks

    try:
        tracks = read_tracks(table)
        smooth = filter_tracks(tracks, method, window=window, pcutoff=pcutoff, polyorder=polyorder)
        out = output or filtered_path(Path(table).with_suffix(".csv"))
        written = write_tracks(out, smooth)
    except (DataError, ValueError, OSError) as err:
        raise _fail(err) from None
    for path in written:
        click.echo(f"wrote {path}")


@click.command("plot")
@click.argument("table", type=click.Path(path_type=Path))
@click.option(
    "-o",
    "--output",
    "out_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Folder for the PNGs (default: beside TABLE).",
)
@click.option(
    "--video",
    type=click.Path(path_type=Path),
    help="Draw the trajectories over this video's first frame.",
)
@pcutoff_option
def plot(table, out_dir, video, pcutoff) -> None:
    """Plot a DeepLabCut prediction TABLE: trajectories (over the video's first frame with
    --video), x / y over time, likelihood over time and its histogram, as PNGs."""
    from kpnet.plots import plot_tracks
    from kpnet.tracks import read_tracks

    try:
        tracks = read_tracks(table)
        out = out_dir if out_dir is not None else Path(table).parent
        written = plot_tracks(tracks, out, video=video, pcutoff=pcutoff, stem=Path(table).stem)
    except (DataError, ValueError, OSError) as err:
        raise _fail(err) from None
    for path in written:
        click.echo(f"wrote {path}")


@click.command("outliers")
@click.argument("table", type=click.Path(path_type=Path))
@click.argument("video", type=click.Path(path_type=Path))
@click.option(
    "--project",
    required=True,
    type=click.Path(path_type=Path),
    help="The DeepLabCut project to write the frames into (labeled-data/<video>/).",
)
@click.option(
    "-n",
    "--num-frames",
    type=click.IntRange(min=1),
    default=20,
    show_default=True,
    help="Frames to pick.",
)
@pcutoff_option
@click.option(
    "--jump",
    type=float,
    default=20.0,
    show_default=True,
    help="Pixels a confident point may move between frames.",
)
@click.option(
    "--epsilon",
    type=float,
    default=20.0,
    show_default=True,
    help="Pixels a confident point may lie off its median-filtered track.",
)
@click.option("--seed", type=int, default=0, show_default=True, help="k-means seed.")
def outliers(table, video, project, num_frames, pcutoff, jump, epsilon, seed) -> None:
    """Pick the frames of VIDEO the model most likely gets wrong (from its prediction TABLE)
    and write them into a DeepLabCut project for labelling, as extract_outlier_frames does:
    labeled-data/<video stem>/img*.png, machinelabels-iter<N>.h5 / machinelabels.csv (the
    model's guesses) and the video in config.yaml's video_sets."""
    from kpnet.outliers import read_project_config, write_outlier_frames
    from kpnet.tracks import read_tracks

    try:
        read_project_config(project)  # a missing project fails before the table is read
        tracks = read_tracks(table)
        summary = write_outlier_frames(
            project,
            video,
            tracks,
            table_name=str(table),
            n=num_frames,
            pcutoff=pcutoff,
            jump=jump,
            epsilon=epsilon,
            seed=seed,
        )
    except (DataError, ValueError, OSError) as err:
        raise _fail(err) from None
    frames = summary["frames"]
    click.echo(f"picked {len(frames)} of {summary['candidates']} candidate frames: {frames}")
    click.echo(f"wrote {len(summary['images'])} images and machine labels into {summary['folder']}")
    if summary["config"]:
        click.echo(f"added {video} to video_sets in {summary['config']}")
    click.echo("next: correct the labels in DeepLabCut (refine_labels), then kpnet fit")


COMMANDS = [filter_command, plot, outliers]
