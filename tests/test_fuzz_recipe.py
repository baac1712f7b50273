"""Fuzzing recipe reading and ``key.sub=value`` overrides: every input ends in a validated recipe or a RecipeError
whose lines are short, whatever the YAML holds (alias trees, ``!!python`` tags, odd types and keys, deep nesting);
plus the defects an outside fuzzing campaign found, each with its test."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from groma_core.cli import main
from groma_core.errors import MAX_LINE_CHARS, MAX_PROBLEMS_SHOWN, RecipeError
from groma_core.plugins import PluginManager
from groma_core.recipe import (
    MAX_RECIPE_BYTES,
    MAX_RECIPE_DEPTH,
    apply_overrides,
    load_recipe,
    parse_override,
    read_recipe_file,
    validate_recipe,
)
from groma_core.testing import tiny

FUZZ = settings(
    max_examples=40,
    deadline=5000,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)

#: a 418-byte recipe whose `name` is a YAML alias tree of 9^7 strings (the campaign's "billion laughs")
LAUGHS = """\
a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]
b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]
c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]
d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]
e: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]
f: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]
image_tokenizer: {plugin: tiny-conv}
name: [*f,*f,*f,*f,*f,*f,*f,*f,*f]
"""


@pytest.fixture(scope="module")
def pm() -> PluginManager:
    manager = PluginManager()
    manager.register_plugin(tiny, name="tiny", distribution="groma-core-tests")
    return manager


@pytest.fixture(scope="module")
def base(sp_dir) -> dict:
    return tiny.recipe_dict(sp_dir)


def assert_clear(error: RecipeError) -> None:
    """A RecipeError a user can read: a few short lines, each problem one line."""
    lines = str(error).splitlines()
    assert 1 <= len(lines) <= MAX_PROBLEMS_SHOWN + 2, lines[:3]
    assert all(len(line) <= MAX_LINE_CHARS + 10 for line in lines), max(lines, key=len)[:200]
    assert error.problems and all("\n" not in p for p in error.problems)


# -- strategies ------------------------------------------------------------------------------------------------
scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=30)
    | st.binary(max_size=8)
)
keys = st.text(max_size=12) | st.integers(-5, 5) | st.booleans() | st.none()
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(keys, inner, max_size=4),
    max_leaves=12,
)
#: where a fuzzed value goes in an otherwise valid recipe
PLACES = [
    ("name",),
    ("dtype",),
    ("device",),
    ("weights",),
    ("template",),
    ("init_seed",),
    ("weights_exclude",),
    ("generation",),
    ("generation", "max_new_tokens"),
    ("region_selection",),
    ("region_selection", "max_regions"),
    ("region_selection", "nms_iou"),
    ("train",),
    ("image_tokenizer",),
    ("image_tokenizer", "plugin"),
    ("image_tokenizer", "image_size"),
    ("region_proposer", "cells"),
    ("language_backbone", "plugin"),
    ("language_backbone", "tokenizer"),
    ("an_unknown_key",),
]
YAML_PIECES = [
    "name: ",
    "image_tokenizer:",
    "plugin: ",
    "\n",
    "  ",
    "- ",
    "[",
    "]",
    "{",
    "}",
    ": ",
    ", ",
    "&a ",
    "*a",
    "&b ",
    "*b",
    "!!python/object/apply:os.mkdir [{marker}]",
    "!!python/name:os.system",
    "!!float ",
    "!!int ",
    "!!binary ",
    "!!timestamp ",
    "!!set ",
    "!!omap ",
    "!!str ",
    "? ",
    "|\n  ",
    ">\n  ",
    "'",
    '"',
    "#",
    "---\n",
    "...\n",
    "~",
    "1e999",
    "0x1F",
    "-.inf",
    ".nan",
    "2001-13-45",
    "vicuna",
    "tiny-conv",
    "\t",
    "%YAML 1.1\n",
    "<<: *a\n",
    "\x00",
    "\u2028",
    "\ufeff",
]


# -- fuzzing ---------------------------------------------------------------------------------------------------
@FUZZ
@given(place=st.sampled_from(PLACES), value=values)
def test_any_value_anywhere_gives_a_recipe_or_short_problems(pm, base, tmp_path, place, value):
    data = copy.deepcopy(base)
    node = data
    for key in place[:-1]:
        node = node.setdefault(key, {})  # a section the base recipe leaves at its defaults
    node[place[-1]] = value
    path = tmp_path / "fuzz.yaml"
    try:
        path.write_text(yaml.safe_dump(data, allow_unicode=True), encoding="utf-8")
    except (UnicodeEncodeError, yaml.YAMLError):  # text that cannot be stored as UTF-8 YAML (lone surrogates)
        return
    try:
        recipe = load_recipe(path, manager=pm)
    except RecipeError as exc:
        assert_clear(exc)
    else:
        assert recipe.stages["image_tokenizer"].plugin == "tiny-conv"
        yaml.safe_load(recipe.to_yaml())  # a validated recipe writes back as YAML


@settings(FUZZ, max_examples=150)
@given(pieces=st.lists(st.sampled_from(YAML_PIECES) | st.text(max_size=6), max_size=30))
def test_any_yaml_text_gives_a_mapping_or_one_clear_problem(tmp_path, pieces):
    marker = tmp_path / "code-ran"
    text = "".join(pieces).replace("{marker}", str(marker))
    path = tmp_path / "fuzz.yaml"
    try:
        path.write_text(text, encoding="utf-8")
    except UnicodeEncodeError:
        return
    try:
        data = read_recipe_file(path)
    except RecipeError as exc:
        assert_clear(exc)
    else:
        assert isinstance(data, dict)
    assert not marker.exists()  # a !!python tag never runs code


@FUZZ
@given(
    key=st.lists(st.sampled_from(["name", "region_selection", "max_regions", "train", "stages", "0", "x", ""])),
    value=st.lists(st.sampled_from(YAML_PIECES[:30]) | st.text(max_size=8), max_size=12),
)
def test_any_override_gives_a_recipe_or_short_problems(pm, base, key, value):
    text = ".".join(key) + "=" + "".join(value).replace("{marker}", "m")
    try:
        data, origin = apply_overrides(base, [text])
        validate_recipe(data, pm, origin=origin)
    except RecipeError as exc:
        assert_clear(exc)


# -- the campaign's defects ------------------------------------------------------------------------------------
def test_alias_tree_is_refused_with_a_short_message(tmp_path, capsys):
    path = tmp_path / "laughs.yaml"
    path.write_text(LAUGHS)
    assert main(["validate", str(path)]) == 1
    out = capsys.readouterr()
    assert out.out == "" and len(out.err) < 500 and len(out.err.splitlines()) == 1, out.err[:300]
    assert "more than 100,000 values (YAML aliases counted as expanded)" in out.err and "laughs.yaml" in out.err


def test_echoed_values_are_cut_short(pm, base):
    """A problem shows at most a short repr of what was given, however large (the campaign saw 312 MB)."""
    shared = ["lol"] * 9
    for _ in range(6):  # 9^7 strings, as the alias tree gives, built in Python (no YAML involved)
        shared = [shared] * 9
    data = {**base, "name": shared, "dtype": "x" * 100_000, "device": list(range(100_000))}
    with pytest.raises(RecipeError) as info:
        validate_recipe(data, pm)
    assert_clear(info.value)
    assert len(str(info.value)) < 2000
    assert any(p.startswith("name:") and "..." in p for p in info.value.problems)


@pytest.mark.parametrize("depth", [MAX_RECIPE_DEPTH + 1, 3000])
def test_deep_nesting_in_a_file_or_an_override_is_a_clear_problem(pm, base, tmp_path, depth):
    deep = "[" * depth + "]" * depth
    path = tmp_path / "deep.yaml"
    path.write_text(f"name: {deep}\n")
    with pytest.raises(RecipeError, match=f"nested more than {MAX_RECIPE_DEPTH} levels deep"):
        read_recipe_file(path)
    with pytest.raises(RecipeError, match=f"nested more than {MAX_RECIPE_DEPTH} levels deep"):
        parse_override(f"name={deep}")
    levels = min(depth, 400)  # in block style, 3,000 levels would be over the size cap
    block = "".join(" " * i + f"k{i}:\n" for i in range(levels)) + " " * levels + "v\n"
    path.write_text(block)
    with pytest.raises(RecipeError, match="nested more than"):
        read_recipe_file(path)


def test_recipe_file_size_is_capped(tmp_path):
    path = tmp_path / "big.yaml"
    path.write_text("name: x\nitems:\n" + "  - {a: 1, b: [1, 2, 3], c: 'some text here'}\n" * 30_000)
    assert path.stat().st_size > MAX_RECIPE_BYTES
    with pytest.raises(RecipeError, match=f"at most {MAX_RECIPE_BYTES:,} bytes"):
        read_recipe_file(path)


def test_a_cyclic_alias_is_refused(tmp_path):
    path = tmp_path / "cycle.yaml"
    path.write_text("name: &a [*a]\n")
    with pytest.raises(RecipeError, match="cycle"):
        read_recipe_file(path)


def test_python_tags_never_run(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "evil.yaml"
    path.write_text(f"name: !!python/object/apply:os.mkdir ['{marker}']\n")
    with pytest.raises(RecipeError, match=r"line 1, column 7: not valid YAML \(could not determine a constructor"):
        read_recipe_file(path)
    assert not marker.exists()


def test_a_tagged_scalar_that_is_not_its_type_says_where(tmp_path):
    path = tmp_path / "tag.yaml"
    path.write_text("image_tokenizer:\n  plugin: !!float vicuna\n")
    with pytest.raises(RecipeError) as info:
        read_recipe_file(path)
    (problem,) = info.value.problems
    assert problem.startswith("line 2, column 11:") and "'vicuna' is not a valid !!float" in problem


def test_a_plugin_name_that_is_not_text_is_named_as_such(pm, base):
    data = {**base, "language_backbone": {**base["language_backbone"], "plugin": 1.5}}
    with pytest.raises(RecipeError) as info:
        validate_recipe(data, pm)
    (problem,) = info.value.problems
    assert problem.startswith("language_backbone.plugin: expected a plugin name, got float 1.5;")
    assert "tiny-llama" in problem


def test_more_regions_than_region_tokens_is_a_recipe_problem(pm, base):
    data, origin = apply_overrides(base, ["region_selection.max_regions=500"])
    with pytest.raises(RecipeError) as info:
        validate_recipe(data, pm, origin=origin)
    (problem,) = info.value.problems
    assert problem.startswith("region_selection.max_regions: 500 regions")
    assert "100 region tokens" in problem and "[from override" in problem


def test_odd_keys_are_reported_with_their_path(pm, base, tmp_path):
    path = tmp_path / "keys.yaml"
    path.write_text(
        yaml.safe_dump({**base, 7: "x", None: 1, True: 2, "k" * 5000: 3, "region_selection": {1.5: 2}}, sort_keys=False)
    )
    with pytest.raises(RecipeError) as info:
        load_recipe(path, manager=pm)
    assert_clear(info.value)
    joined = "\n".join(info.value.problems)
    assert "7: Keys should be strings (got 7)" in joined and "region_selection.1.5: Keys should be strings" in joined
    assert "k" * 100 not in joined  # a long key is shown cut


def test_non_finite_numbers_are_values_not_crashes(pm, base):
    data = {**base, "region_selection": {"nms_iou": math.nan, "max_regions": math.inf}}
    with pytest.raises(RecipeError) as info:
        validate_recipe(data, pm)
    assert_clear(info.value)


def test_an_unreadable_recipe_path_is_one_problem(tmp_path):
    folder = tmp_path / "dir.yaml"
    folder.mkdir()
    with pytest.raises(RecipeError, match="file not found"):
        read_recipe_file(folder)
    binary = tmp_path / "bin.yaml"
    binary.write_bytes(b"\xff\xfe\x00\x01" * 10)
    with pytest.raises(RecipeError, match="not a text file|not valid YAML"):
        read_recipe_file(binary)


def test_the_shipped_recipes_still_load(pm):
    from groma_core.recipe import shipped_recipes

    for path in shipped_recipes():
        assert isinstance(read_recipe_file(Path(path)), dict)
