"""Recipe schema: clear errors (file + key path), overrides, env expansion, shipped recipes."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from kpnet.recipe import Recipe, RecipeError, load_recipe

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"))
MINIMAL = {"data": {"source": "synthetic_pins", "synthetic_pins": {"cache_dir": "cache"}}}


def _write(tmp_path: Path, data: dict, name: str = "r.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


def test_typo_key_names_file_key_and_suggestion(tmp_path):
    path = _write(tmp_path, {**MINIMAL, "train": {"epcohs": 3}})
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    assert str(err.value) == f"{path}: train.epcohs: unknown key (did you mean 'epochs'?)"


def test_unknown_section_and_nested_typo(tmp_path):
    data = {**MINIMAL, "trian": {}, "model": {"backbon": "tiny"}}
    with pytest.raises(RecipeError) as err:
        load_recipe(_write(tmp_path, data))
    message = str(err.value)
    assert "trian: unknown key (did you mean 'train'?)" in message
    assert "model.backbon: unknown key (did you mean 'backbone'?)" in message


def test_wrong_type_and_bad_choice(tmp_path):
    data = {**MINIMAL, "train": {"epochs": "many", "precision": "fp8"}}
    with pytest.raises(RecipeError) as err:
        load_recipe(_write(tmp_path, data))
    message = str(err.value)
    assert "train.epochs: Input should be a valid integer" in message and "'many'" in message
    assert "train.precision:" in message and "mixed_bfloat16" in message


def test_missing_source_section_and_bad_input_size(tmp_path):
    data = {"data": {"source": "coco"}, "model": {"input_size": [100, 96]}}
    with pytest.raises(RecipeError) as err:
        load_recipe(_write(tmp_path, data))
    assert "data: section 'coco' is required" in str(err.value)
    assert "model: input_size [100, 96]: H and W must divide by 32" in str(err.value)


def test_inline_spec_is_validated(tmp_path):
    data = {**MINIMAL}
    data["data"] = {**MINIMAL["data"], "spec": {"names": ["a", "b"], "flip_pairs": [["a", "c"]]}}
    with pytest.raises(RecipeError, match=r"data\.spec: spec\.flip_pairs: unknown keypoint"):
        load_recipe(_write(tmp_path, data))
    data["data"]["spec"] = {"names": ["a", "b"], "channel_map": [0, 0]}
    spec = load_recipe(_write(tmp_path, data)).data.keypoint_spec()
    assert spec.num_channels == 1 and spec.shares_channels


def test_overrides_parse_yaml_values_and_name_set(tmp_path):
    path = _write(tmp_path, MINIMAL)
    recipe = load_recipe(
        path,
        ["train.epochs=3", "model.input_size=[64, 96]", "train.lr=1e-3", "data.spec=coco17",
         "augment.photometric=[{name: Blur, p: 0.5}]", "model.init_from=null"],
    )  # fmt: skip
    assert recipe.train.epochs == 3 and recipe.model.input_size == (64, 96)
    assert recipe.train.lr == pytest.approx(1e-3)
    assert recipe.data.keypoint_spec().num_keypoints == 17
    assert recipe.augment.photometric == [{"name": "Blur", "p": 0.5}]
    with pytest.raises(RecipeError, match=r"\(--set\): train\.lr: Input should be a valid num"):
        load_recipe(path, ["train.lr=fast"])
    with pytest.raises(RecipeError, match="expected KEY=VALUE"):
        load_recipe(path, ["train.epochs"])
    with pytest.raises(RecipeError, match="train.epochs: is not a section"):
        load_recipe(path, ["train.epochs=3", "train.epochs.x=1"])


def test_relative_paths_env_expansion_and_missing_files(tmp_path, monkeypatch):
    sub = tmp_path / "recipes"
    sub.mkdir()
    data = {"data": {"source": "coco", "coco": {
        "train_annotations": "${KPNET_TEST_ROOT:-../coco}/train.json",
        "train_images": "${KPNET_TEST_ROOT:-../coco}/images"}}}  # fmt: skip
    path = _write(sub, data)
    recipe = load_recipe(path)
    assert recipe.data.coco.train_annotations == tmp_path / "coco" / "train.json"
    with pytest.raises(RecipeError) as err:
        recipe.check_files()
    assert f"{path}: data.coco.train_annotations: file not found" in str(err.value)
    assert "data.coco.train_images: file not found" in str(err.value)
    monkeypatch.setenv("KPNET_TEST_ROOT", str(tmp_path / "elsewhere"))
    recipe = load_recipe(path)
    assert recipe.data.coco.train_images == tmp_path / "elsewhere" / "images"
    monkeypatch.chdir(tmp_path)
    over = load_recipe(path, ["data.coco.train_images=imgs"])
    assert over.data.coco.train_images == tmp_path / "imgs"  # --set paths: relative to cwd


def test_unset_env_without_default_and_missing_recipe(tmp_path):
    data = {"data": {"source": "dlc", "dlc": {"project": "${KPNET_SURELY_UNSET_VAR}"}}}
    with pytest.raises(RecipeError, match=r"data\.dlc\.project: environment variable"):
        load_recipe(_write(tmp_path, data))
    with pytest.raises(RecipeError, match="recipe file not found"):
        load_recipe(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("data: [unclosed")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(tmp_path / "bad.yaml")


def test_resolved_recipe_round_trips(tmp_path):
    recipe = load_recipe(_write(tmp_path, MINIMAL), ["train.epochs=2"])
    saved = recipe.save(tmp_path / "out" / "recipe.resolved.yaml")
    again = load_recipe(saved)
    assert again.model_dump() == recipe.model_dump()
    assert again.data.synthetic_pins.cache_dir == tmp_path / "cache"


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_shipped_recipes_validate(path):
    recipe = load_recipe(path)
    assert isinstance(recipe, Recipe)
    size = recipe.model.input_size
    assert size == "auto" or all(s % 32 == 0 for s in size)
    if recipe.data.source == "synthetic_pins":
        recipe.check_files()  # synthetic data has no input files: nothing may be missing


def test_expected_recipes_exist_and_quickstart_documents_every_key():
    names = {p.name for p in RECIPES}
    assert {
        "quickstart.yaml", "two-pin-single-channel.yaml", "coco-cpn50-256x192.yaml",
        "coco-cpn50-384x288.yaml", "dlc-project.yaml", "multi-gpu-mixed-precision.yaml",
    } <= names  # fmt: skip
    text = (RECIPES[0].parent / "quickstart.yaml").read_text().splitlines()
    keyed = [ln for ln in text if ln.strip() and not ln.lstrip().startswith("#") and ":" in ln]
    undocumented = [ln for ln in keyed if "#" not in ln]
    assert not undocumented, undocumented
    dumped = Recipe.model_validate(yaml.safe_load("\n".join(text))).model_dump()
    for section in ("model", "loss", "augment", "train", "evaluation", "export"):
        assert set(dumped[section]) == set(yaml.safe_load("\n".join(text))[section]), section


def test_every_default_is_defined_once():
    """A recipe without a key trains, decodes and augments as the configs' own defaults do."""
    from kpnet.codec import Codec
    from kpnet.data.augment import AugmentConfig
    from kpnet.data.sources import pipeline_config

    recipe = load_recipe(Path(__file__).resolve().parents[1] / "recipes" / "quickstart.yaml")
    bare = Recipe.model_validate({"data": recipe.model_dump()["data"]})
    assert bare.codec() == Codec(mode=bare.data.mode, padding=bare.data.padding)
    augment = pipeline_config(bare).augment
    assert augment == AugmentConfig(photometric=())
