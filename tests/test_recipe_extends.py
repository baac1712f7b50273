"""Recipes that build on other recipes (`extends:`), one-line stage swaps with `STAGE.plugin=X`, and the weights of
the stages a swap keeps."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from groma_core.api import DEFAULT_MODEL, build
from groma_core.errors import RecipeError
from groma_core.recipe import load_recipe, recipes_dir, validate_recipe

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "images" / "shapes.png"


def write(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.fixture
def base(tmp_path, tiny_recipe, sp_dir):
    """A tiny recipe in its own folder, naming its tokenizer by a path relative to that folder."""
    folder = tmp_path / "base"
    shutil.copytree(sp_dir, folder / "tok")
    data = {**tiny_recipe, "region_selection": {"score_threshold": 0.0, "max_regions": 7}}
    data["language_backbone"] = {**data["language_backbone"], "tokenizer": "tok"}
    return write(folder / "base.yaml", data)


def test_an_extending_recipe_merges_deeply_and_wins(base, tmp_path, manager, monkeypatch):
    child = write(
        tmp_path / "elsewhere" / "child.yaml",
        "extends: ../base/base.yaml\nregion_proposer: {cells: 4}\nregion_selection: {score_threshold: 0.3}\n",
    )
    monkeypatch.chdir(tmp_path)  # neither "tok" nor "../base" means anything from here
    recipe = load_recipe(child, manager=manager)
    assert recipe.stages["region_proposer"].plugin == "grid"
    assert recipe.stages["region_proposer"].options.cells == 4
    selection = recipe.core.region_selection
    assert (selection.score_threshold, selection.max_regions) == (0.3, 7)  # one key changed, the other inherited
    assert recipe.core.name == "tiny"
    # the base's relative tokenizer still means the folder beside the base, so the model builds
    model = build(recipe, manager=manager)
    assert model.tokenizer.vocab_size == 400 + 114
    assert "extends" not in recipe.to_dict()


def test_a_stage_section_that_switches_plugin_replaces_the_base_section(base, tmp_path, manager):
    child = write(tmp_path / "child.yaml", "extends: base/base.yaml\nregion_proposer: {plugin: user-boxes}\n")
    recipe = load_recipe(child, manager=manager)  # the base's `cells` (a grid option) is not carried over
    assert recipe.stages["region_proposer"].plugin == "user-boxes"
    assert recipe.to_dict()["region_proposer"] == {"plugin": "user-boxes"}


def test_options_left_from_the_previous_plugin_are_named_each(base, tmp_path, manager):
    child = write(
        tmp_path / "child.yaml",
        "extends: base/base.yaml\nregion_proposer: {plugin: user-boxes, cells: 3}\n"
        "image_tokenizer: {plugin: tiny-conv, channels: 8}\n",
    )
    with pytest.raises(RecipeError) as err:
        load_recipe(child, manager=manager)
    assert err.value.problems == [
        "region_proposer.cells: an option of grid, not of user-boxes: this section switched plugin "
        "(grid -> user-boxes) and keeps the old one's options; remove it"
    ]


def test_a_single_file_naming_another_plugins_options_says_whose_they_are(tiny_recipe, manager):
    data = {**tiny_recipe, "region_proposer": {"plugin": "user-boxes", "cells": 3, "cels": 1}}
    with pytest.raises(RecipeError) as err:
        validate_recipe(data, manager)
    cells, cels = err.value.problems
    assert cells.startswith("region_proposer.cells: an option of grid, not of user-boxes (left from another plugin?)")
    assert cels.startswith("region_proposer.cels: unknown option")


def test_an_extends_cycle_is_one_line_naming_the_chain(tmp_path, manager):
    a = write(tmp_path / "a.yaml", "extends: b.yaml\n")
    write(tmp_path / "b.yaml", "extends: sub/c.yaml\n")
    write(tmp_path / "sub" / "c.yaml", "extends: ../a.yaml\n")
    with pytest.raises(RecipeError) as err:
        load_recipe(a, manager=manager)
    assert str(err.value) == f"{a}: extends: a cycle: a.yaml -> b.yaml -> sub/c.yaml -> a.yaml"


def test_a_missing_base_is_one_line_naming_the_chain(tmp_path, manager):
    a = write(tmp_path / "a.yaml", "extends: b.yaml\n")
    b = write(tmp_path / "b.yaml", "extends: groma-7bb\n")
    with pytest.raises(RecipeError) as err:
        load_recipe(a, manager=manager)
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"{b}: extends: 'groma-7bb': no such recipe file")
    assert "did you mean 'groma-7b'?" in message and "(a.yaml -> b.yaml -> 'groma-7bb')" in message
    write(tmp_path / "c.yaml", "extends: [groma-7b]\n")
    with pytest.raises(RecipeError, match="extends: expected the name of a shipped recipe"):
        load_recipe(tmp_path / "c.yaml", manager=manager)


def test_extending_a_shipped_recipe_by_name_keeps_its_paths(tmp_path, manager):
    mine = write(tmp_path / "mine.yaml", "extends: shapes-tiny\ntrain: {save_every: 7}\n")
    recipe = load_recipe(mine, manager=manager)
    shipped = load_recipe("shapes-tiny", manager=manager)
    assert recipe.core.train.root(recipe.base_dir) == Path(os.path.normpath(recipes_dir() / "../data/shapes"))
    assert recipe.core.train.root(recipe.base_dir).resolve() == shipped.core.train.root(shipped.base_dir).resolve()
    assert recipe.core.train.save_every == 7 and shipped.core.train.save_every != 7
    assert recipe.core.train.stages == shipped.core.train.stages  # lists come from the base


def test_a_mapping_with_extends_is_refused_outside_a_file(tiny_recipe, manager):
    with pytest.raises(RecipeError, match="extends: 'groma-7b': only a recipe file can extend another"):
        validate_recipe({**tiny_recipe, "extends": "groma-7b"}, manager)


def test_setting_a_stage_plugin_drops_the_old_options_and_says_so(base, manager):
    recipe = load_recipe(base, ["region_proposer.plugin=user-boxes"], manager)
    assert recipe.stages["region_proposer"].plugin == "user-boxes"
    assert recipe.notes == [
        "override 'region_proposer.plugin=user-boxes': region_proposer switched from grid to user-boxes; dropped 1 "
        "option(s) of grid: cells"
    ]
    # an option the command line sets for the new plugin is kept, and named when it is not the new plugin's
    with pytest.raises(RecipeError) as err:
        load_recipe(base, ["region_proposer.plugin=user-boxes", "region_proposer.cells=2"], manager)
    assert err.value.problems[0].startswith("region_proposer.cells: an option of grid, not of user-boxes")
    assert err.value.problems[0].endswith("[from override 'region_proposer.cells=2']")


def test_swapping_a_stage_of_a_model_folder_keeps_the_other_stages_weights(tmp_path):
    """The embedded model's folder has weights for all four stages; a recipe that extends it with another proposer
    loads the weights of the other three, without writing weights_exclude."""
    mine = write(tmp_path / "mine.yaml", f"extends: {DEFAULT_MODEL}\nregion_proposer: {{plugin: user-boxes}}\n")
    recipe = load_recipe(mine)
    assert recipe.core.weights_exclude == ["region_proposer"]
    assert recipe.notes == [
        "weights: swapped region_proposer deformable-detr -> user-boxes; the tensors of region_proposer in "
        f"{DEFAULT_MODEL / 'model.safetensors'} are not loaded (added to weights_exclude)"
    ]
    swapped = build(recipe)
    original = build(DEFAULT_MODEL / "recipe.yaml")
    for part in ("image_tokenizer", "region_encoder", "language_backbone", "image_projector"):
        mine_state, theirs = getattr(swapped, part).state_dict(), getattr(original, part).state_dict()
        assert mine_state.keys() == theirs.keys()
        assert all(torch.equal(mine_state[k], theirs[k]) for k in theirs), part
    # the same swap from the command line's --set, on the folder itself
    by_override = load_recipe(DEFAULT_MODEL, ["region_proposer.plugin=user-boxes"])
    assert by_override.core.weights_exclude == ["region_proposer"] and len(by_override.notes) == 2
    # a recipe that names its own weights says what they hold: nothing is left out for it
    own = write(tmp_path / "own.yaml", f"extends: {DEFAULT_MODEL}\nweights: {DEFAULT_MODEL / 'model.safetensors'}\n")
    assert load_recipe(own).core.weights_exclude == []


def test_swapping_the_image_tokenizer_leaves_the_projector_out_too(tmp_path):
    mine = write(
        tmp_path / "mine.yaml",
        f"extends: {DEFAULT_MODEL}\nimage_tokenizer: {{plugin: clip, hidden_size: 32, num_hidden_layers: 4, "
        "num_attention_heads: 4, intermediate_size: 64, image_size: 224, patch_size: 14, input_size: 224}\n",
    )
    recipe = load_recipe(mine)
    assert recipe.core.weights_exclude == ["image_tokenizer", "image_projector"]


def test_the_one_line_swap_answers_from_the_command_line():
    """README's swap: the embedded model with the user's boxes as its only regions."""
    out = subprocess.run(
        [sys.executable, "-m", "groma_core.cli", "ground", str(EXAMPLE), "What is <box>?", "--box", "156", "317",
         "205", "364", "--set", "region_proposer.plugin=user-boxes", "--max-new-tokens", "4", "--json"],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"},
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    (answer,) = yaml.safe_load(out.stdout)
    assert len(answer["regions"]) == 1  # exactly the user's box: the proposer proposes nothing
    notes = out.stderr.strip().splitlines()
    assert len(notes) == 2 and all(line.startswith("groma: note: ") for line in notes)
    assert "dropped 18 option(s) of deformable-detr" in notes[0] and "added to weights_exclude" in notes[1]
