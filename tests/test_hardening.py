"""Bad inputs a new user may give kpnet: each is refused with one line naming the file or key.

One parametrized test per class of bad input (issue 12): non-finite or boolean numbers in a
recipe, image paths outside the image folder, bad annotations (visibility, duplicate image ids,
a category without keypoint names, nothing usable) and truncated images. Each bad case exits
non-zero without a traceback; the good case next to it still passes.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml
from _cli import invoke as _invoke
from _cli import refused as _refused

import kpnet.cli
from kpnet.cli import main
from kpnet.data.coco import load_coco_records
from kpnet.data.records import DataError
from kpnet.recipe import load_recipe
from kpnet.spec import KeypointSpec

TINY_RECIPE = {
    "data": {"source": "synthetic_pins", "synthetic_pins": {"cache_dir": "pins"}},
    "model": {"backbone": "tiny", "backbone_weights": None, "input_size": [64, 64],
              "pyramid_channels": 16},
    "train": {"epochs": 1, "batch_size": 2, "steps_per_epoch": 1, "verbose": 0},
    "evaluation": {"flip_test": False},
    "export": {"keypoints_model": False, "saved_model": False},
}  # fmt: skip


def _write_recipe(path: Path, recipe: dict) -> Path:
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def _set_dotted(recipe: dict, key: str, value) -> dict:
    recipe = copy.deepcopy(recipe)
    *sections, name = key.split(".")
    node = recipe
    for section in sections:
        node = node.setdefault(section, {})
    node[name] = value
    return recipe


# --------------------------------------------------------------------------- the CLI itself
@pytest.mark.parametrize("args", [["--help"], ["--version"], ["fit", "--help"]])
def test_cli_help_is_quick_and_quiet(args):
    """--help / --version import neither TensorFlow nor Keras and print nothing on stderr."""
    code = ("import sys; from kpnet.cli import main\n"
            "try:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
            "heavy = [m for m in ('tensorflow', 'keras', 'jax') if m in sys.modules]\n"
            "assert not heavy, heavy")  # fmt: skip
    done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          timeout=60)  # fmt: skip
    assert done.returncode == 0 and done.stderr == "", done.stderr[-2000:]
    assert done.stdout.strip()


def test_every_command_is_registered_and_a_broken_one_fails_loudly(monkeypatch):
    names = {"data", "fit", "evaluate", "predict", "export", "filter", "plot", "outliers"}
    assert names <= set(main.commands)
    monkeypatch.setitem(sys.modules, "kpnet.cli.export", None)  # as if it failed to import
    with pytest.raises(ImportError, match="kpnet.cli.export"):
        kpnet.cli._register()


# --------------------------------------------------------------------------- recipes
BAD_NUMBERS = [
    ("train.lr", ".inf", "must be a finite number"),
    ("train.lr", ".nan", "must be a finite number"),
    ("train.lr", "1e400", "Input should be a finite number"),  # a string to YAML, inf to float
    ("train.epochs", "true", "expected a number, not a boolean"),
    ("train.batch_size", "false", "expected a number, not a boolean"),
    ("model.input_size", "[64, true]", "item 1: expected a number, not a boolean"),
    ("augment.scale", "[0.7, .inf]", "item 1: must be a finite number"),
    ("loss.global_sigmas", "[8, 6, 4, -.inf]", "item 3: must be a finite number"),
    ("augment.photometric", "[{name: Blur, p: .nan}]", "item 0: key 'p': must be a finite number"),
]


@pytest.mark.parametrize("how", ["file", "--set"])
@pytest.mark.parametrize("key,value,message", BAD_NUMBERS, ids=lambda v: str(v)[:20])
def test_bad_number_in_recipe_is_refused(tmp_path, key, value, message, how):
    if how == "file":
        recipe = _set_dotted(TINY_RECIPE, key, yaml.safe_load(value))
        path = _write_recipe(tmp_path / "bad.yaml", recipe)
        result = _invoke("fit", str(path), "-o", str(tmp_path / "run"))
        _refused(result, f"{path}: {key}: {message}")
    else:
        path = _write_recipe(tmp_path / "good.yaml", TINY_RECIPE)
        result = _invoke("fit", str(path), "-o", str(tmp_path / "run"), "--set", f"{key}={value}")
        _refused(result, f"{path} (--set): {key}: {message}")
    assert not (tmp_path / "run").exists()  # refused before anything is written


def test_good_numbers_and_set_overrides_still_load(tmp_path):
    path = _write_recipe(tmp_path / "good.yaml", TINY_RECIPE)
    recipe = load_recipe(path, ["train.epochs=3", "train.lr=1e-3", "model.input_size=[96,64]",
                                "evaluation.flip_test=true", "train.verbose=2"])  # fmt: skip
    assert (recipe.train.epochs, recipe.train.lr, recipe.model.input_size) == (3, 1e-3, (96, 64))
    assert recipe.evaluation.flip_test is True and recipe.train.verbose == 2
    assert recipe.data.synthetic_pins.cache_dir == tmp_path / "pins"


# --------------------------------------------------------------------------- COCO data
def _image(path: Path, seed: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 255, (48, 64, 3)).astype(np.uint8)
    assert cv2.imwrite(str(path), pixels)


def _coco(root: Path) -> dict:
    """A valid two-keypoint COCO json over two 48x64 images in ``root/images``."""
    images = [{"id": i + 1, "file_name": f"{i:03d}.jpg", "height": 48, "width": 64}
              for i in range(2)]  # fmt: skip
    for i, image in enumerate(images):
        _image(root / "images" / image["file_name"], i)
    _image(root / "outside" / "000.jpg")  # a real file outside the image folder
    anns = [{"id": 100 + i, "image_id": i + 1, "category_id": 1, "iscrowd": 0,
             "bbox": [5, 5, 40, 30], "keypoints": [10, 10, 2, 30, 20, 1]}
            for i in range(2)]  # fmt: skip
    cat = {"id": 1, "name": "part", "keypoints": ["tip_l", "tip_r"], "skeleton": [[1, 2]]}
    return {"images": images, "annotations": anns, "categories": [cat]}


def _outside_relative(d):
    d["images"][0]["file_name"] = "../outside/000.jpg"


def _outside_absolute(d):
    d["images"][0]["file_name"] = "/etc/hostname"


def _visibility(value):
    def mutate(d):
        d["annotations"][0]["keypoints"][5] = value

    return mutate


def _duplicate_id(d):
    d["images"][1]["id"] = 1


def _nameless_category(d):
    d["categories"] = [{"id": 1, "name": "person"}]  # no keypoint names: not COCO-17


def _empty(d):
    for ann in d["annotations"]:
        ann["keypoints"] = [0, 0, 0, 0, 0, 0]


# name: (mutation, what `data check` says, what `fit` says); {ann}, {recipe}: their paths
BAD_DATA = {
    "outside_relative": (_outside_relative, ["annotation id 100", "'../outside/000.jpg' is "
                         "outside the image folder", "allow_outside_root"],
                         ["{ann} annotation id 100", "outside the image folder"]),
    "outside_absolute": (_outside_absolute, ["annotation id 100", "'/etc/hostname' is outside"],
                         ["{ann} annotation id 100", "'/etc/hostname' is outside"]),
    "visibility_3": (_visibility(3), ["annotation id 100", "visibility 3 "],
                     ["{ann} annotation id 100", "visibility 3 "]),
    "visibility_-1": (_visibility(-1), ["annotation id 100", "visibility -1 "],
                      ["{ann} annotation id 100", "visibility -1 "]),
    "visibility_0.5": (_visibility(0.5), ["visibility 0.5 "], ["{ann}", "visibility 0.5 "]),
    "duplicate_image_id": (_duplicate_id, ["image id 1 is listed twice ('000.jpg' and '001.jpg')"],
                           ["{ann}: image id 1 is listed twice ('000.jpg' and '001.jpg')"]),
    "nameless_category": (_nameless_category, ["category 'person' lists no keypoint names",
                          "data.spec"], ["{ann}: category 'person' lists no keypoint names"]),
    "empty": (_empty, ["0 records (skipped no_keypoints: 2): no usable record",
                       "fit` would refuse"],
              ["{recipe}: data: no training records"]),
}  # fmt: skip


@pytest.fixture
def coco(tmp_path):
    """(write(json dict) -> annotation path, the valid json dict, image folder)."""
    data = _coco(tmp_path)

    def write(d: dict) -> Path:
        path = tmp_path / "ann.json"
        path.write_text(json.dumps(d))
        return path

    return write, data, tmp_path / "images"


def _coco_recipe(tmp_path: Path, ann: Path, images: Path, **coco) -> Path:
    source = {"train_annotations": str(ann), "train_images": str(images), "val_fraction": 0.0}
    recipe = {**TINY_RECIPE, "data": {"source": "coco", "coco": {**source, **coco}}}
    return _write_recipe(tmp_path / "coco.yaml", recipe)


def test_good_coco_data_passes(coco, tmp_path):
    write, data, images = coco
    ann = write(data)
    result = _invoke("data", "check", str(ann), "--images", str(images), "--decode")
    assert result.exit_code == 0, result.output
    assert "instances         2" in result.output and "corrupt images    0" in result.output
    from kpnet.data.sources import load_data

    spec, train, _ = load_data(load_recipe(_coco_recipe(tmp_path, ann, images)))
    assert spec.names == ("tip_l", "tip_r") and len(train) == 2


@pytest.mark.parametrize("case", list(BAD_DATA))
def test_bad_coco_data_is_refused(coco, tmp_path, case):
    write, data, images = coco
    mutate, check_says, fit_says = BAD_DATA[case]
    mutate(data)
    ann = write(data)
    check = _invoke("data", "check", str(ann), "--images", str(images))
    assert check.exit_code == 1 and "Traceback" not in check.output, check.output
    assert str(ann) in check.output, check.output
    for needle in check_says:
        assert needle in check.output, (needle, check.output)
    recipe = _coco_recipe(tmp_path, ann, images)
    fit = _invoke("fit", str(recipe), "-o", str(tmp_path / "run"))
    _refused(fit, *(s.format(ann=ann, recipe=recipe) for s in fit_says))


def test_outside_root_needs_an_explicit_opt_in(coco, tmp_path):
    write, data, images = coco
    _outside_relative(data)
    ann = write(data)
    _, records = load_coco_records(ann, images, allow_outside_root=True)
    assert Path(records[0].image_path).resolve() == (tmp_path / "outside" / "000.jpg").resolve()
    with pytest.raises(DataError, match="outside the image folder"):
        load_coco_records(ann, images)
    check = _invoke("data", "check", str(ann), "--images", str(images), "--allow-outside-root")
    assert check.exit_code == 0, check.output
    from kpnet.data.sources import load_data

    recipe = load_recipe(_coco_recipe(tmp_path, ann, images, allow_outside_root=True))
    assert recipe.data.coco.allow_outside_root is True
    _, train, _ = load_data(recipe)  # the recipe key reaches the loader
    assert len(train) == 2


def test_nameless_category_loads_with_a_spec(coco):
    write, data, images = coco
    _nameless_category(data)
    spec, records = load_coco_records(write(data), images, spec=KeypointSpec(names=("a", "b")))
    assert spec.names == ("a", "b") and len(records) == 2


# --------------------------------------------------------------------------- image files
def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _bmp(path: Path) -> None:
    pixels = cv2.imread(str(path))
    ok, encoded = cv2.imencode(".bmp", pixels)
    path.write_bytes(encoded.tobytes())  # a BMP named .jpg: OpenCV reads it, training does not


@pytest.mark.parametrize(
    "damage,why", [(_truncate, "corrupt or truncated"), (_bmp, "not a JPEG or PNG file")]
)
def test_decode_check_finds_images_training_cannot_read(coco, damage, why):
    write, data, images = coco
    ann = write(data)
    damage(images / "001.jpg")
    assert cv2.imread(str(images / "001.jpg")) is not None  # OpenCV alone would pass it
    result = _invoke("data", "check", str(ann), "--images", str(images), "--decode")
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    assert "corrupt images    1" in result.output
    assert f"{images / '001.jpg'}: " in result.output and why in result.output


@pytest.mark.slow  # over 25 s on 2 cores
def test_fit_skips_an_unusable_validation_image_with_on_error_skip(coco, tmp_path):
    """data.on_error: skip drops a corrupt validation image once, up front, and validates on
    the rest (fit's validation predicts every record it is given: it used to stop there)."""
    write, data, images = coco
    ann = write(data)
    val = json.loads(json.dumps(data))
    val["images"].append({"id": 3, "file_name": "broken.jpg", "height": 48, "width": 64})
    val["annotations"].append({**val["annotations"][0], "id": 102, "image_id": 3})
    (images / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    val_ann = tmp_path / "val.json"
    val_ann.write_text(json.dumps(val))
    recipe = _coco_recipe(tmp_path, ann, images, val_annotations=str(val_ann))
    out = tmp_path / "run"
    result = _invoke("fit", str(recipe), "-o", str(out), "--set", "data.on_error=skip")
    assert result.exit_code == 0, result.output
    assert "2 training / 2 validation instances" in result.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["overall"]["count"] == 4  # 2 frames x 2 keypoints, the broken one dropped
