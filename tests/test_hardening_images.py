"""Huge and hostile images, and hostile recipe files (issue 24, items 4 and 7).

An image whose header declares more than the pixel limit (``data.max_pixels``, default
:data:`kpnet.data.images.MAX_PIXELS`) is found from its header, never decoded: ``kpnet data
check`` counts and names it, ``kpnet fit`` refuses it in one line (or skips it with
``data.on_error: skip``). The 20000x20000 PNG here is a few hundred bytes; decoding it would
take 1.2 GB, so a test that decodes it by mistake fails by running out of time or memory.
A recipe that is not UTF-8, not a mapping or empty is refused in one line.
"""

from __future__ import annotations

import io
import json
import logging
import struct
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml
from _cli import invoke as _invoke
from _cli import refused as _refused
from PIL import Image

from kpnet.data.images import MAX_PIXELS, header_of, probe, too_large
from kpnet.data.records import DataError

TINY_RECIPE = {
    "model": {"backbone": "tiny", "backbone_weights": None, "input_size": [64, 64],
              "pyramid_channels": 16},
    "train": {"epochs": 1, "batch_size": 2, "steps_per_epoch": 1, "verbose": 0},
    "evaluation": {"flip_test": False},
    "export": {"keypoints_model": False, "saved_model": False},
}  # fmt: skip


def huge_png(path: Path, width: int = 20000, height: int = 20000) -> Path:
    """A valid PNG header declaring ``width`` x ``height`` RGB, with a tiny IDAT."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat)
                     + chunk(b"IEND", b""))  # fmt: skip
    return path


@pytest.fixture
def coco(tmp_path) -> tuple[Path, Path]:
    """(annotation json, image folder): two 48x64 JPEGs and huge.png, whose json entry
    claims 48x64 (only the file's header tells)."""
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        cv2.imwrite(str(images / f"{i:03d}.jpg"), rng.integers(0, 255, (48, 64, 3), np.uint8))
    huge_png(images / "huge.png")
    names = ["000.jpg", "001.jpg", "huge.png"]
    data = {
        "images": [{"id": i + 1, "file_name": n, "height": 48, "width": 64}
                   for i, n in enumerate(names)],
        "annotations": [{"id": 100 + i, "image_id": i + 1, "category_id": 1, "iscrowd": 0,
                         "bbox": [5, 5, 40, 30], "keypoints": [10, 10, 2, 30, 20, 2]}
                        for i in range(len(names))],
        "categories": [{"id": 1, "name": "part", "keypoints": ["a", "b"]}],
    }  # fmt: skip
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps(data))
    return ann, images


def _recipe(tmp_path: Path, ann: Path, images: Path, **data) -> Path:
    source = {"train_annotations": str(ann), "train_images": str(images), "val_fraction": 0.0}
    recipe = {**TINY_RECIPE, "data": {"source": "coco", "coco": source, **data}}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


# --------------------------------------------------------------------------- probing
def _encoded(fmt: str) -> bytes:
    pixels = np.random.default_rng(1).integers(0, 255, (37, 53, 3), np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, fmt)
    return out.getvalue()


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "GIF", "BMP", "WEBP", "TIFF", "PPM"])
def test_headers_give_format_and_size_without_decoding(fmt):
    header = header_of(_encoded(fmt))
    assert header is not None and header.hw == (37, 53), header
    assert header.format == {"JPEG": "jpeg", "PPM": "ppm"}.get(fmt, fmt.lower())


def test_probe_names_the_file_it_cannot_size(tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "notes.png").write_text("plain text")
    with pytest.raises(DataError, match=r"empty\.png: the image file is empty"):
        probe(tmp_path / "empty.png")
    with pytest.raises(DataError, match=r"notes\.png: not an image file"):
        probe(tmp_path / "notes.png")
    with pytest.raises(DataError, match=r"gone\.png: cannot read the image file"):
        probe(tmp_path / "gone.png")
    header = probe(huge_png(tmp_path / "huge.png"))
    assert header.pixels == 400_000_000 > MAX_PIXELS
    assert "20000x20000 = 400,000,000 pixels" in too_large(header, MAX_PIXELS)
    assert too_large(header, 400_000_000) is None


# --------------------------------------------------------------------------- data check, fit
def test_data_check_names_a_huge_image_without_decoding_it(coco):
    ann, images = coco
    result = _invoke("data", "check", ann, "--images", images, "--decode")
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    assert "over pixel limit  1" in result.output and "corrupt images    0" in result.output
    line = next(ln for ln in result.output.splitlines() if "huge.png:" in ln)
    assert "20000x20000 = 400,000,000 pixels" in line and "--max-pixels" in line
    lowered = _invoke("data", "check", ann, "--images", images, "--max-pixels", "1000")
    assert lowered.exit_code == 1 and "over pixel limit  3" in lowered.output, lowered.output


def test_fit_refuses_a_huge_image_in_one_line(coco, tmp_path):
    ann, images = coco
    line = _refused(_invoke("fit", _recipe(tmp_path, ann, images), "-o", tmp_path / "run"),
                    "huge.png", "20000x20000", "data.max_pixels", "data.on_error")  # fmt: skip
    assert "annotation id 102" in line


def test_fit_skips_huge_images_with_on_error_skip(coco, tmp_path, caplog):
    """data.on_error: skip drops the huge image's records, naming it; data.max_pixels reaches
    the pipeline (a lower limit also drops the 48x64 images)."""
    from kpnet.data.pipeline import build_dataset
    from kpnet.data.sources import load_data, pipeline_config
    from kpnet.recipe import load_recipe

    ann, images = coco
    recipe = load_recipe(_recipe(tmp_path, ann, images, on_error="skip"))
    spec, train, _ = load_data(recipe)
    assert recipe.data.max_pixels == MAX_PIXELS and len(train) == 3
    with caplog.at_level(logging.WARNING, logger="kpnet.data.pipeline"):
        ds = build_dataset(train, spec, pipeline_config(recipe), batch_size=1, training=False,
                           on_error="skip", with_meta=True)  # fmt: skip
        seen = sorted(int(meta["index"][0]) for _, _, meta in ds)
    assert seen == [0, 1]
    assert "skipping 1 records of 1 unusable image files" in caplog.text
    assert "huge.png: the image is 20000x20000" in caplog.text
    small = load_recipe(_recipe(tmp_path, ann, images), ["data.max_pixels=3000"])
    with pytest.raises(DataError, match=r"000\.jpg.*64x48 = 3,072 pixels.*limit of 3,000"):
        build_dataset(train, spec, pipeline_config(small), batch_size=1, training=False)


def test_sizes_from_annotations_are_held_to_the_limit_too(coco):
    """Above CHECK_IMAGES_LIMIT files the pipeline opens no file: the json's sizes count."""
    from kpnet.data.coco import load_coco_records
    from kpnet.data.pipeline import PipelineConfig, build_dataset

    ann, images = coco
    data = json.loads(ann.read_text())
    data["images"][0].update(height=20000, width=20000)
    ann.write_text(json.dumps(data))
    spec, records = load_coco_records(ann, images)
    config = PipelineConfig(max_pixels=10_000)  # 48x64 passes, the json's 20000x20000 not
    with pytest.raises(DataError, match=r"000\.jpg.*20000x20000"):
        build_dataset(records, spec, config, 1, training=False, check_images=False)


def test_max_pixels_must_be_a_positive_whole_number(coco, tmp_path):
    ann, images = coco
    path = _recipe(tmp_path, ann, images)
    for value in ("0", "-5", "1.5e3", "true"):
        result = _invoke("fit", path, "-o", tmp_path / "run", "--set", f"data.max_pixels={value}")
        _refused(result, "data.max_pixels")
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------- recipes
BAD_RECIPES = {
    "latin-1": ("data:\n  source: coco  # café\n".encode("latin-1"),
                ["not UTF-8 text (byte 0xe9 at offset 27, line 2)", "save the recipe as UTF-8"]),
    "utf-16": ("data: {}\n".encode("utf-16"), ["not UTF-8 text (byte 0xff at offset 0"]),
    "binary": (bytes(range(256)) * 4, ["not UTF-8 text (byte 0x80 at offset 128"]),
    "nul": (b"data: \x00\x01", ["not valid YAML: unacceptable character #x0000"]),
    "list": (b"- data\n- model\n", ["the recipe is a YAML list, not a mapping", "'data'"]),
    "scalar": (b"quickstart\n", ["the recipe is a YAML string, not a mapping"]),
    "number": (b"42\n", ["the recipe is a YAML number, not a mapping"]),
    "empty": (b"", ["the recipe is empty", "'data' section"]),
    "comments only": (b"# nothing yet\n", ["the recipe is empty"]),
    "bad yaml": (b"data: [unclosed\n", ["not valid YAML:", "(line 2, column 1)"]),
}  # fmt: skip


@pytest.mark.parametrize("case", list(BAD_RECIPES))
def test_hostile_recipe_file_is_one_line(tmp_path, case):
    content, needles = BAD_RECIPES[case]
    path = tmp_path / "recipe.yaml"
    path.write_bytes(content)
    result = _invoke("fit", path, "-o", tmp_path / "run")
    _refused(result, f"{path}: ", *needles)
    assert not (tmp_path / "run").exists() and path.read_bytes() == content
