"""Recipe validation: every problem at once, with paths, suggestions and installed names."""

from __future__ import annotations

import pytest
import yaml

from groma_core.errors import RecipeError
from groma_core.recipe import apply_overrides, load_recipe, validate_recipe


def problems_of(data, manager, **kw) -> list[str]:
    with pytest.raises(RecipeError) as info:
        validate_recipe(data, manager, **kw)
    return info.value.problems


def test_valid_recipe_fills_defaults(tiny_recipe, manager):
    recipe = validate_recipe(tiny_recipe, manager)
    assert recipe.stages["region_proposer"].options.cells == 3
    assert recipe.core.region_selection.nms_iou == 0.6
    assert recipe.core.dtype == "float32"


def test_unknown_plugin_lists_installed_and_suggests(tiny_recipe, manager):
    tiny_recipe["region_proposer"]["plugin"] = "gird"
    (p,) = problems_of(tiny_recipe, manager)
    assert p.startswith("region_proposer.plugin:")
    assert "did you mean 'grid'" in p and "installed:" in p and "user-boxes" in p


def test_all_problems_are_reported_at_once(tiny_recipe, manager):
    tiny_recipe["region_proposer"]["cels"] = 4  # misspelled option
    tiny_recipe["image_tokenizer"]["channels"] = "many"  # wrong type
    del tiny_recipe["language_backbone"]["tokenizer"]  # missing required field
    tiny_recipe["dtype"] = "float64"  # invalid literal
    tiny_recipe["region_selecton"] = {}  # misspelled section
    problems = problems_of(tiny_recipe, manager)
    joined = "\n".join(problems)
    assert len(problems) == 5, joined
    assert "region_proposer.cels: unknown option (did you mean 'cells'?)" in joined
    assert "image_tokenizer.channels:" in joined and "'many'" in joined
    assert "language_backbone.tokenizer: required option is missing" in joined
    assert "dtype:" in joined
    assert "region_selecton: unknown option (did you mean 'region_selection'?)" in joined


def test_nested_core_option_suggestion(tiny_recipe, manager):
    tiny_recipe["region_selection"]["nms_iuo"] = 0.5
    (p,) = problems_of(tiny_recipe, manager)
    assert p.startswith("region_selection.nms_iuo: unknown option (did you mean 'nms_iou'?)")


def test_missing_section_and_missing_plugin_key(tiny_recipe, manager):
    del tiny_recipe["region_encoder"]
    tiny_recipe["image_tokenizer"] = {"channels": 3}
    problems = problems_of(tiny_recipe, manager)
    assert any(p.startswith("region_encoder: missing section") for p in problems)
    assert any(p.startswith("image_tokenizer.plugin: missing; installed image_tokenizer plugins:") for p in problems)


def test_not_yaml_and_not_a_mapping(tmp_path, manager):
    bad = tmp_path / "bad.yaml"
    bad.write_text("image_tokenizer: [unclosed\n")
    with pytest.raises(RecipeError, match="line 2.*not valid YAML"):
        load_recipe(bad, manager=manager)
    listy = tmp_path / "list.yaml"
    listy.write_text("- a\n- b\n")
    with pytest.raises(RecipeError, match="must be a mapping of sections, got list"):
        load_recipe(listy, manager=manager)
    with pytest.raises(RecipeError, match="file not found"):
        load_recipe(tmp_path / "absent.yaml", manager=manager)


def test_overrides_change_values_and_unknown_keys_are_named(tiny_recipe, manager, tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe))
    recipe = load_recipe(path, ["region_proposer.cells=5", "region_selection.seed=3", "dtype=bfloat16"], manager)
    assert recipe.stages["region_proposer"].options.cells == 5
    assert recipe.core.region_selection.seed == 3 and recipe.core.dtype == "bfloat16"
    with pytest.raises(RecipeError) as info:
        load_recipe(path, ["region_proposer.celss=5"], manager)
    (p,) = info.value.problems
    assert "region_proposer.celss: unknown option (did you mean 'cells'?)" in p
    assert "[from override 'region_proposer.celss=5']" in p


def test_override_through_a_scalar_is_refused(tiny_recipe):
    with pytest.raises(RecipeError, match="name is not a section"):
        apply_overrides(tiny_recipe, ["name.sub=1"])
    with pytest.raises(RecipeError, match="expected key.sub=value"):
        apply_overrides(tiny_recipe, ["justakey"])


def test_round_trip_through_to_yaml(tiny_recipe, manager):
    recipe = validate_recipe(tiny_recipe, manager)
    again = validate_recipe(yaml.safe_load(recipe.to_yaml()), manager)
    assert again.to_dict() == recipe.to_dict()


def test_relative_path_options_resolve_against_the_recipe_folder(tiny_recipe, manager, sp_dir, tmp_path, monkeypatch):
    import shutil

    from groma_core.api import build

    folder = tmp_path / "model"
    shutil.copytree(sp_dir, folder / "tok")
    tiny_recipe["language_backbone"]["tokenizer"] = "tok"
    (folder / "recipe.yaml").write_text(yaml.safe_dump(tiny_recipe))
    monkeypatch.chdir(tmp_path)  # "tok" does not exist here
    model = build(load_recipe(folder / "recipe.yaml", manager=manager), manager=manager)
    assert model.tokenizer.vocab_size == 400 + 114
