"""Fuzzing the command line's own parsing (``--box``, ``--set``, ``--device``): every command line ends in a result or
in one short ``groma ...: error: ...`` line (argparse's usage errors: its usage, then one line; exit 2), never a
traceback; plus the campaign's one-line-error defects, run in-process through ``groma_core.cli.main``."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from groma_core.api import resolve_device
from groma_core.cli import main
from groma_core.errors import MAX_LINE_CHARS, MAX_PROBLEMS_SHOWN, GromaError

FUZZ = settings(
    max_examples=40,
    deadline=10_000,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
ROOT = Path(__file__).resolve().parents[1]
NO_DEVICE = ["--device", "no-such-device"]  # the model is never loaded: a command line that passes ends here


def run(*argv: str) -> tuple[int, str, str]:
    """``groma ARGV`` in this process: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(argv))
        except SystemExit as exc:  # argparse's usage errors and --help
            code = exc.code if isinstance(exc.code, int) else 2
    return code, out.getvalue(), err.getvalue()


def assert_one_error_line(code: int, err: str) -> str:
    """The error a user sees: exit 1 with one line, or argparse's exit 2 with its usage and one line."""
    lines = err.splitlines()
    assert code in (1, 2), (code, err[:300])
    assert lines and "Traceback" not in err and "internal error" not in err, err[:500]
    if code == 1:
        assert len(lines) == 1, err[:500]
    assert lines[-1].startswith("groma") and "error: " in lines[-1]
    assert len(lines[-1]) <= MAX_LINE_CHARS + 40, lines[-1][:200]
    return lines[-1]


@pytest.fixture(scope="module")
def picture(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("pic") / "pic.png"
    Image.new("RGB", (120, 80), (30, 160, 90)).save(path)
    return path


# -- --device --------------------------------------------------------------------------------------------------
@settings(FUZZ, max_examples=150)
@given(name=st.text(max_size=30) | st.sampled_from(["cpu", "cpu:0", "cuda", "cuda:-1", "mps", "meta", "cpu:99" * 50]))
def test_any_device_name_is_a_device_or_one_short_error(name):
    try:
        device = resolve_device(name)
    except GromaError as exc:
        message = str(exc)
        assert "\n" not in message and len(message) < 300, message[:300]
    else:
        assert device.type in ("cpu", "cuda", "mps")
        if device.type == "cuda":
            assert torch.cuda.is_available()


@FUZZ
@given(name=st.text(alphabet=st.characters(blacklist_categories=["Cs"], blacklist_characters="\x00"), max_size=40))
def test_any_device_on_the_command_line_ends_in_one_line(picture, name):
    if name in ("auto", "cpu") or name.startswith(("cpu:", "cuda", "mps")):
        return  # a device that exists would run the model: covered by test_ground_cli
    code, _, err = run("ground", str(picture), "Hi.", "--device", name)
    assert_one_error_line(code, err)


# -- --box -----------------------------------------------------------------------------------------------------
coordinate = (
    st.floats(allow_nan=True, allow_infinity=True).map(repr)
    | st.integers(-200, 300).map(str)
    | st.sampled_from(["nan", "inf", "-inf", "1e999", "0x10", "1_0", " 5", "", "-", "--box", "١٢"])
    | st.text(max_size=6)
)


@FUZZ
@given(boxes=st.lists(st.lists(coordinate, min_size=4, max_size=4), min_size=1, max_size=3), slots=st.integers(0, 3))
def test_any_box_on_the_command_line_ends_in_one_line(picture, boxes, slots):
    prompt = "What is " + " and ".join(["<box>"] * slots) + "?"
    args = [x for box in boxes for x in ("--box", *box)]
    code, _, err = run("ground", str(picture), prompt, *args, *NO_DEVICE)
    line = assert_one_error_line(code, err)
    if code == 1 and "no-such-device" in line:  # it got as far as the model: the boxes were valid
        assert len(boxes) == slots


@FUZZ
@given(text=st.text(alphabet="<>,0123456789.- box", max_size=60))
def test_boxes_written_in_the_prompt_end_in_one_line(picture, text):
    code, _, err = run("ground", str(picture), text, *NO_DEVICE)
    assert_one_error_line(code, err)


# -- --set -----------------------------------------------------------------------------------------------------
override = st.tuples(
    st.lists(st.sampled_from(["region_selection", "max_regions", "generation", "name", "image_tokenizer", "0", "x"])),
    st.sampled_from(["=", "", "=="]),
    st.text(max_size=20) | st.sampled_from(["500", "[1, 2]", "{a: 1}", "&a [*a]", "!!float x", "[" * 40, "-1"]),
).map(lambda t: ".".join(t[0]) + t[1] + t[2])


@FUZZ
@given(overrides=st.lists(override, min_size=1, max_size=3))
def test_any_override_ends_in_a_recipe_or_clear_problems(overrides):
    code, out, err = run("validate", "groma-tiny", *overrides)
    if code == 0:
        assert out.startswith("ok: ") and err == ""
        return
    assert code in (1, 2) and "Traceback" not in err and "internal error" not in err, err[:500]
    lines = err.splitlines()
    assert 1 <= len(lines) <= MAX_PROBLEMS_SHOWN + 2, err[:500]
    assert all(len(line) <= MAX_LINE_CHARS + 10 for line in lines), err[:500]


# -- the campaign's one-line-error defects ---------------------------------------------------------------------
def test_more_regions_than_region_tokens_is_one_line(picture):
    code, _, err = run("ground", str(picture), "Hi.", "--set", "region_selection.max_regions=500")
    line = assert_one_error_line(code, err)
    assert "region_selection.max_regions: 500 regions" in line and "100 region tokens" in line


def test_a_prompt_longer_than_the_model_takes_is_one_line(picture):
    code, _, err = run("ground", str(picture), "a red circle " * 2000, "--device", "cpu")
    line = assert_one_error_line(code, err)
    assert "but the language model takes 1024" in line


def test_an_unknown_user_in_the_image_path_is_one_line():
    code, _, err = run("ground", "~no-such-user-here/a.png", "Hi.")
    assert assert_one_error_line(code, err) == "groma: error: ~no-such-user-here/a.png: no such file or folder"


def test_an_annotation_entry_that_is_not_an_object_is_named(tmp_path):
    ann = tmp_path / "ann.json"
    image = {"id": 1, "file_name": "a.png", "width": 8, "height": 8, "caption": "x"}
    ann.write_text(json.dumps({"images": [image], "annotations": ["oops"]}))
    code, _, err = run("eval", "rec", "--ann", str(ann), "--images", str(tmp_path), *NO_DEVICE)
    line = assert_one_error_line(code, err)
    assert "ann.json: annotations[0]: expected an object, got str" in line
    code, _, err = run("eval", "detection", "--ann", str(ann), "--images", str(tmp_path), *NO_DEVICE)
    line = assert_one_error_line(code, err)
    assert "ann.json: annotations[0]: expected an object, got str" in line  # the same reader, the same words


def test_a_refused_pickle_is_one_line(tmp_path):
    """torch's weights-only refusal is several lines long; the CLI shows one."""
    import os

    class RunsCode:
        def __reduce__(self):
            return (os.getcwd, ())

    src = tmp_path / "ref"
    src.mkdir()
    torch.save({"x": RunsCode()}, src / "pytorch_model.bin")
    (src / "config.json").write_text("{}")
    code, _, err = run("convert", str(src), str(tmp_path / "out"), "--quiet")
    assert_one_error_line(code, err)


def test_a_usage_error_echoes_a_short_value(picture):
    code, _, err = run("ground", str(picture), "Hi.", "--box", "1", "2", "3", "x" * 100_000)
    line = assert_one_error_line(code, err)
    assert code == 2 and "invalid float value" in line


# -- eval annotation files -------------------------------------------------------------------------------------
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 3) | st.floats(allow_nan=False) | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=10,
)
entry = st.fixed_dictionaries(
    {},
    optional={
        "id": st.integers(0, 3) | json_values,
        "image_id": st.integers(0, 3) | json_values,
        "category_id": st.integers(0, 3) | json_values,
        "file_name": st.sampled_from(["a.png"]) | json_values,
        "caption": st.text(max_size=10) | json_values,
        "name": st.text(max_size=10) | json_values,
        "bbox": st.lists(st.floats(-5, 50), min_size=4, max_size=4) | json_values,
        "area": st.floats(0, 100) | json_values,
        "iscrowd": st.booleans() | json_values,
    },
)
annotation_files = (
    st.fixed_dictionaries(
        {},
        optional={
            "images": st.lists(entry | json_values, max_size=3),
            "annotations": st.lists(entry | json_values, max_size=3),
            "categories": st.lists(entry | json_values, max_size=3),
        },
    )
    | json_values
)


@settings(FUZZ, max_examples=100)
@given(task=st.sampled_from(["rec", "lvis-ground", "region-caption", "detection"]), content=annotation_files)
def test_any_annotation_file_gives_samples_or_one_clear_line(tmp_path_factory, task, content):
    from groma_core.errors import InputError
    from groma_core.evaluation.harness import TASKS

    folder = tmp_path_factory.mktemp("ann")
    ann = folder / "ann.json"
    ann.write_text(json.dumps(content))
    try:
        loaded = TASKS[task](ann, folder)
    except InputError as exc:
        assert "\n" not in str(exc), str(exc)[:300]
    else:
        assert loaded.samples
