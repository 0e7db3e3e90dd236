"""``kpnet data``: check, convert and preview datasets.

A SOURCE is a COCO keypoints json (images from ``--images``, or guessed as
``<json dir>/../train2017`` / ``val2017`` (or ``train`` / ``val``) from the file name) or a
DeepLabCut project folder.

Example:
    kpnet data check coco/annotations/person_keypoints_val2017.json
    kpnet data convert my-dlc-project -o my-dlc-project/coco.json
    kpnet data convert train.json --images train/ --to tfrecord -o data/train --shards 8
    kpnet data preview my-dlc-project --out preview/ -n 16 --input-size 256x256
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from kpnet.codec import CROP_MODES
from kpnet.data.check import check_records, format_check
from kpnet.data.images import MAX_PIXELS
from kpnet.data.records import DataError, LoadReport, Records
from kpnet.spec import KeypointSpec

#: Skip reasons that are normal filtering, not bad data.
FILTERED = {"crowd", "no_keypoints", "low_score", "other_category"}


def _parse_size(value: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in value.lower().split("x"))
    except ValueError:
        raise click.BadParameter(f"{value!r}: use HEIGHTxWIDTH, e.g. 256x192") from None
    if h <= 0 or w <= 0 or h % 32 or w % 32:
        raise click.BadParameter(f"{value!r}: height and width must be positive multiples of 32")
    return h, w


def _load_or_fail(
    source: str, images: str | None, on_error: str, allow_outside_root: bool = False
) -> tuple[KeypointSpec, Records]:
    from kpnet.data.sources import load_source  # the data pipeline: TensorFlow

    try:
        return load_source(source, images, on_error, allow_outside_root)
    except DataError as err:
        raise click.ClickException(str(err)) from None


def _bad_count(report: LoadReport) -> int:
    return sum(n for reason, n in report.skipped.items() if reason not in FILTERED)


def _format_load(report: LoadReport) -> str:
    lines = [report.summary()]
    for reason, messages in report.examples.items():
        lines += [f"  {reason}: {m}" for m in messages]
    return "\n".join(lines)


@click.group("data")
def data() -> None:
    """Check, convert and preview datasets."""


@data.command("check")
@click.argument("source")  # a path or a URL: load_source says when it is missing
@click.option("--images", help="Image folder (a path or a URL).")
@click.option("--decode", is_flag=True, help="Decode every image to find corrupt files (slow).")
@click.option("--on-error", type=click.Choice(["skip", "raise"]), default="skip",
              show_default=True, help="Skip and count bad records, or stop.")  # fmt: skip
@click.option("--json", "as_json", is_flag=True, help="Print the report as json.")
@click.option("--allow-outside-root", is_flag=True,
              help="Read COCO images whose file_name leaves the image folder.")  # fmt: skip
@click.option("--max-pixels", type=click.IntRange(1), default=MAX_PIXELS, show_default=True,
              help="Images declaring more pixels in their header are bad.")  # fmt: skip
def check(
    source: str, images: str | None, decode: bool, on_error: str, as_json: bool,
    allow_outside_root: bool, max_pixels: int,
) -> None:  # fmt: skip
    """Report what SOURCE holds and what is wrong with it.

    Exit code 1 when records are bad or no usable record is left (``kpnet fit`` would refuse).
    """
    spec, records = _load_or_fail(source, images, on_error, allow_outside_root)
    report = check_records(records, spec, decode=decode, max_pixels=max_pixels)
    if as_json:
        load = {"kept": records.report.kept, "skipped": dict(records.report.skipped)}
        click.echo(json.dumps({"load": load, **report}, indent=1))
    else:
        click.echo(_format_load(records.report))
        click.echo(format_check(report, spec))
    if not records:
        raise click.ClickException(
            f"{records.report.summary()}: no usable record, `kpnet fit` would refuse this data"
        )
    problems = (
        _bad_count(records.report) + report["missing_files"] + report["too_large"]
        + (report["corrupt_images"] or 0)
    )  # fmt: skip
    if problems:
        raise SystemExit(1)


@data.command("convert")
@click.argument("source")  # a path or a URL: load_source says when it is missing
@click.option("-o", "--out", "out", required=True,
              help="COCO json to write (--to coco), or a folder (--to tfrecord; a URL "
                   "such as gs://bucket/train works).")  # fmt: skip
@click.option("--to", "to", type=click.Choice(["coco", "tfrecord"]), default="coco",
              show_default=True, help="coco: a DLC project as COCO json; tfrecord: any "
              "SOURCE as sharded TFRecords (image bytes + instances), with index.json.")
@click.option("--shards", type=click.IntRange(1), default=None,
              help="TFRecord files to write (default: one per 128 MB of images); use at "
                   "least one per training worker.")  # fmt: skip
@click.option("--images",
              help="Image folder of a COCO json (--to tfrecord).")  # fmt: skip
@click.option("--on-error", type=click.Choice(["skip", "raise"]), default="raise",
              show_default=True,
              help="Skip bad records and images, or stop (--to tfrecord).")  # fmt: skip
@click.option("--box", type=click.Choice(["keypoints", "image"]), default="keypoints",
              show_default=True, help="Box: labelled extent + margin, or whole image.")  # fmt: skip
@click.option("--margin", type=float, default=0.2, show_default=True,
              help="Box margin as a fraction of the keypoints' extent.")  # fmt: skip
def convert(
    source: str, out: str, to: str, shards: int | None, images: str | None, on_error: str,
    box: str, margin: float,
) -> None:  # fmt: skip
    """Convert SOURCE: a DeepLabCut project to a COCO keypoints json (file names relative
    to the project), or any SOURCE (COCO json, DLC project, label CSV) to TFRecords.

    \b
    kpnet data convert my-dlc-project -o my-dlc-project/coco.json
    kpnet data convert coco/annotations/person_keypoints_train2017.json --to tfrecord \\
        -o gs://bucket/coco-train --shards 64
    """
    if to == "tfrecord":
        _convert_tfrecord(source, out, shards, images, on_error)
        return
    if not Path(source).is_dir():
        raise click.ClickException(
            f"{source}: --to coco converts a DeepLabCut project folder; for a json or CSV "
            "use --to tfrecord"
        )
    from kpnet.data.dlc import dlc_to_coco

    try:
        coco = dlc_to_coco(source, out, box=box, margin=margin)
    except DataError as err:
        raise click.ClickException(str(err)) from None
    click.echo(
        f"wrote {len(coco['annotations'])} instances in {len(coco['images'])} images to "
        f"{out} (load with image dir {source})"
    )


def _convert_tfrecord(
    source: str, out: str, shards: int | None, images: str | None, on_error: str
) -> None:
    from kpnet.data.tfrecord import write_tfrecords

    spec, records = _load_or_fail(source, images, on_error)
    try:
        tset = write_tfrecords(records, spec, out, shards, on_error, source=str(source))
    except DataError as err:
        raise click.ClickException(str(err)) from None
    click.echo(
        f"wrote {len(tset)} instances in {tset.num_images} images to {len(tset.files)} "
        f"TFRecord file(s) in {out} (train with data.source: tfrecord, data.tfrecord.train: "
        f"{out})"
    )


@data.command("preview")
@click.argument("source")  # a path or a URL: load_source says when it is missing
@click.option("--out", "out_dir", type=click.Path(file_okay=False), required=True)
@click.option("--images", help="Image folder (a path or a URL).")
@click.option("-n", "num", type=click.IntRange(1, 256), default=16, show_default=True)
@click.option("--input-size", default="256x192", show_default=True, help="HEIGHTxWIDTH.")
@click.option("--mode", type=click.Choice(list(CROP_MODES)),
              default="topdown", show_default=True)  # fmt: skip
@click.option("--seed", type=int, default=0, show_default=True)
def preview(
    source: str, out_dir: str, images: str | None, num: int, input_size: str, mode: str, seed: int
) -> None:
    """Write a PNG grid of augmented training samples of SOURCE with keypoints and skeleton."""
    from kpnet.codec import Codec
    from kpnet.data.pipeline import PipelineConfig
    from kpnet.data.preview import write_preview

    size = _parse_size(input_size)
    spec, records = _load_or_fail(source, images, "skip")
    if not records:
        raise click.ClickException(f"{source}: no usable records ({records.report.summary()})")
    config = PipelineConfig(codec=Codec(input_size=size, mode=mode))
    path = write_preview(records, spec, config, out_dir, n=num, seed=seed)
    click.echo(f"wrote {path}")


COMMANDS = [data]
