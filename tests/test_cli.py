"""The `groma` command line, run as a user runs it: in a subprocess."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from groma_core.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "images" / "shapes.png"


def groma(*args: str, cwd: Path | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "groma_core.cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=full_env,
        timeout=300,
    )


def commands(parser: argparse.ArgumentParser | None = None, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every command of the ``groma`` parser, nested ones (``data shapes``) included, read from the parser itself so
    that a new command is covered here without a change."""
    parser = parser or build_parser()
    found = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found.append((*prefix, name))
                found += commands(sub, (*prefix, name))
    return found


def test_top_level_help_lists_every_command():
    out = groma("--help")
    assert out.returncode == 0 and out.stdout.startswith("usage: groma")
    listed = {line.split()[0] for line in out.stdout.splitlines() if line.startswith("    ")}
    top = {c[0] for c in commands()}
    assert listed == top and len(top) >= 9


@pytest.mark.parametrize("command", commands(), ids=" ".join)
def test_help_on_every_command(command, capsys):
    with pytest.raises(SystemExit) as exited:
        main([*command, "--help"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: groma {' '.join(command)}")
    assert len(out.split("\n\n")[1].strip()) > 20  # a description of what the command does


def test_every_command_has_a_behaviour_check():
    missing = set(commands()) - set(BEHAVIOUR_CHECKS)
    assert not missing, f"add a test of what these commands do to BEHAVIOUR_CHECKS: {sorted(missing)}"


def test_plugins_lists_builtin_and_installed():
    out = groma("plugins")
    assert out.returncode == 0
    assert "user-boxes" in out.stdout and "region_proposer" in out.stdout and "groma-core" in out.stdout
    rows = json.loads(groma("plugins", "--json").stdout)
    assert {"name": "user-boxes", "stage": "region_proposer"}.items() <= rows[0].items()


def test_recipes_lists_shipped_recipes_with_purpose():
    out = groma("recipes")
    assert out.returncode == 0
    shipped = sorted(p.stem for p in (ROOT / "recipes").glob("*.yaml"))
    assert shipped, "the repository ships recipes"
    for name in shipped:
        line = next(line for line in out.stdout.splitlines() if line.startswith(name + " "))
        assert len(line.split(None, 1)[1]) > 10


def test_validate_reports_every_problem_and_exits_1(tmp_path):
    recipe = {
        "image_tokenizer": {"plugin": "no-such-tokenizer"},
        "region_proposer": {"plugin": "user-boxes", "colour": "red"},
        "region_encoder": {"plugin": "user-boxes"},
        "dtype": "float64",
    }
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(recipe))
    out = groma("validate", str(path))
    assert out.returncode == 1
    err = out.stderr
    assert "image_tokenizer.plugin: unknown image_tokenizer plugin 'no-such-tokenizer'" in err
    assert "region_proposer.colour: unknown option" in err
    assert "region_encoder.plugin: unknown region_encoder plugin 'user-boxes'" in err
    assert "language_backbone: missing section" in err
    assert "dtype:" in err
    assert "Traceback" not in err


def test_validate_shipped_recipe_with_override():
    out = groma("validate", "groma-7b", "region_selection.max_regions=50", "--print")
    assert out.returncode == 0, out.stderr
    assert out.stderr.startswith("ok: ")  # stdout is the YAML alone
    printed = yaml.safe_load(out.stdout)
    assert printed["region_selection"]["max_regions"] == 50
    assert printed["image_tokenizer"]["plugin"] == "dinov2"


def test_errors_are_one_line_unless_debug(tmp_path):
    out = groma("validate", str(tmp_path / "missing.yaml"))
    assert out.returncode == 1 and "file not found" in out.stderr and "Traceback" not in out.stderr
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n")
    out = groma("validate", str(listy))
    assert out.returncode == 1 and "must be a mapping" in out.stderr
    out = groma("--debug", "validate", "no-such-shipped-recipe")
    assert out.returncode == 1 and "no such recipe" in out.stderr


def test_recipes_cp_copies_a_shipped_recipe_to_edit_and_never_overwrites(tmp_path):
    out = groma("recipes", "cp", "shapes-tiny", str(tmp_path))
    assert out.returncode == 0, out.stderr
    copy = tmp_path / "shapes-tiny.yaml"
    assert out.stdout.startswith(f"copied shapes-tiny to {copy}")
    original = (ROOT / "recipes" / "shapes-tiny.yaml").read_text()
    text = copy.read_text()
    assert text.splitlines()[0] == original.splitlines()[0]  # comments kept
    data_root = yaml.safe_load(text)["train"]["data_root"]
    if (ROOT / "data" / "shapes").is_dir():  # the data exists beside the original: the same folder
        assert "relative paths made absolute: train.data_root" in out.stdout
        assert Path(data_root) == (ROOT / "data" / "shapes").resolve()
    else:  # nothing there yet: the data is the user's to put beside the copy
        assert "left as written: language_backbone.tokenizer, train.data_root" in out.stdout
        assert data_root == "../data/shapes"
    assert groma("validate", str(copy)).returncode == 0
    source = tmp_path / "elsewhere"
    (source / "data").mkdir(parents=True)
    (source / "r.yaml").write_text("extends: shapes-tiny\ntrain: {data_root: data}\n")
    out = groma("recipes", "cp", str(source / "r.yaml"), str(tmp_path / "r.yaml"))
    assert "relative paths made absolute: train.data_root" in out.stdout, out.stdout + out.stderr
    assert yaml.safe_load((tmp_path / "r.yaml").read_text())["train"]["data_root"] == str(source / "data")
    again = groma("recipes", "cp", "groma-7b", str(copy))
    assert again.returncode == 1 and copy.read_text() == text
    assert again.stderr == (
        f"groma: error: {copy}: already exists; "
        "not overwritten (remove it, or copy to another name)\n"
    )


def test_plugin_that_fails_to_import_shows_in_plugins_and_others_work(tmp_path):
    info = tmp_path / "groma_plugin_boom-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: groma-plugin-boom\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[groma]\nboom = boom_mod\n")
    (tmp_path / "boom_mod.py").write_text("import not_a_real_module_anywhere\n")
    env = {"PYTHONPATH": str(tmp_path)}
    out = groma("plugins", env=env)
    assert out.returncode == 0
    assert "groma-plugin-boom" in out.stdout and "error" in out.stdout
    assert "ModuleNotFoundError" in out.stdout and "user-boxes" in out.stdout


def test_ground_answers_with_the_embedded_model():
    out = groma("ground", str(EXAMPLE), "[grounding]Give me a concise description of the image.", "--json",
                "--max-new-tokens", "3")
    assert out.returncode == 0, out.stderr
    (answer,) = json.loads(out.stdout)
    assert answer["image"] == str(EXAMPLE) and answer["image_size"] == [512, 384]
    assert answer["regions"] and answer["text"].strip()
    assert len(answer["raw_text"].split()) <= 3  # three tokens: at most three words


def test_chat_answers_each_line_and_reads_boxes():
    out = subprocess.run(
        [sys.executable, "-m", "groma_core.cli", "chat", str(EXAMPLE), "--max-new-tokens", "4"],
        input="What is <156,317,205,364>?\nAnd <308,73,448,203>?\n",
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"},
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    answers = [line for line in out.stdout.splitlines() if line.startswith("groma: ")]
    assert len(answers) == 2 and all(line[len("groma: "):].strip() for line in answers)


def test_eval_scores_the_embedded_model_on_shapes(tmp_path):
    from groma_core.data.shapes import ShapesConfig, write_shapes_dataset

    data = tmp_path / "shapes"
    write_shapes_dataset(data, ShapesConfig(images=4, seed=3, val_fraction=0.5))
    ann = data / "annotations" / "rec_val.json"
    out = groma("eval", "rec", "--ann", str(ann), "--images", str(data / "images"), "--out", str(tmp_path / "rec"),
                "--limit", "2", "--batch-size", "1")
    assert out.returncode == 0, out.stderr
    summary = json.loads((tmp_path / "rec" / "summary.json").read_text())
    assert summary["num_samples"] == 2 and summary["metrics"]["count"] == 2
    assert f"rec: accuracy {summary['metrics']['accuracy']:.4f}" in out.stdout


def test_train_without_a_train_section_is_one_line_before_any_weight():
    out = groma("train", "groma-tiny")  # random weights, and no train section
    assert out.returncode == 1
    assert out.stderr.strip().splitlines()[-1].endswith("groma-tiny.yaml: train: missing section (the training "
                                                        "stages and their datasets)")
    assert "Traceback" not in out.stderr


def test_data_shapes_writes_a_dataset_and_data_alone_shows_its_commands(tmp_path):
    out = groma("data", "shapes", str(tmp_path / "s"), "--images", "2", "--seed", "1")
    assert out.returncode == 0, out.stderr
    files = json.loads((tmp_path / "s" / "dataset.json").read_text())
    assert files["splits"]["train"]["images"] + files["splits"].get("val", {}).get("images", 0) == 2
    assert len(list((tmp_path / "s" / "images").iterdir())) == 2
    alone = groma("data")
    assert alone.returncode == 0 and "shapes" in alone.stdout


def test_convert_names_a_missing_source_and_writes_nothing(tmp_path):
    out = groma("convert", str(tmp_path / "no-such-checkpoint"), str(tmp_path / "out"))
    assert out.returncode == 1
    assert out.stderr.strip() == f"groma: error: {tmp_path / 'no-such-checkpoint'}: not a directory"
    assert not (tmp_path / "out").exists()


#: the test of what each command does (the converter's and trainer's full runs are in test_convert.py and
#: test_train_cli.py, the benchmarks' in test_eval_harness.py)
BEHAVIOUR_CHECKS = {
    ("plugins",): test_plugins_lists_builtin_and_installed,
    ("recipes",): test_recipes_lists_shipped_recipes_with_purpose,
    ("recipes", "cp"): test_recipes_cp_copies_a_shipped_recipe_to_edit_and_never_overwrites,
    ("validate",): test_validate_reports_every_problem_and_exits_1,
    ("ground",): test_ground_answers_with_the_embedded_model,
    ("chat",): test_chat_answers_each_line_and_reads_boxes,
    ("eval",): test_eval_scores_the_embedded_model_on_shapes,
    ("train",): test_train_without_a_train_section_is_one_line_before_any_weight,
    ("data",): test_data_shapes_writes_a_dataset_and_data_alone_shows_its_commands,
    ("data", "shapes"): test_data_shapes_writes_a_dataset_and_data_alone_shows_its_commands,
    ("convert",): test_convert_names_a_missing_source_and_writes_nothing,
    ("demo",): "tests/test_demo_browser.py (the page in Chromium) and tests/test_demo.py (start-up errors)",
    ("models",): "tests/test_hub.py::test_models_lists_and_removes_cached_conversions",
    ("models", "rm"): "tests/test_hub.py::test_models_lists_and_removes_cached_conversions",
}


@pytest.mark.parametrize(
    "argv",
    [
        ["eval", "rec", "--ann", "a.json", "--images", ".", "--max-new-tokens", "0"],
        ["eval", "rec", "--ann", "a.json", "--images", ".", "--batch-size", "0"],
        ["eval", "rec", "--ann", "a.json", "--images", ".", "--batch-size", "-1"],
        ["eval", "rec", "--ann", "a.json", "--images", ".", "--limit", "0"],
        ["ground", "x.png", "hi", "--batch-size", "0"],
        ["ground", "x.png", "hi", "--max-new-tokens", "-3"],
        ["chat", "x.png", "--max-new-tokens", "0"],
        ["eval", "rec", "--ann", "a.json", "--images", ".", "--batch-size", "two"],
    ],
    ids=lambda argv: " ".join(argv[:1] + argv[-2:]),
)
def test_counts_below_one_are_refused_in_one_line(argv, capsys):
    with pytest.raises(SystemExit) as exited:  # in-process: refused while parsing, before anything is loaded
        main(argv)
    option, value = argv[-2], argv[-1]
    err = capsys.readouterr().err
    assert exited.value.code == 2 and "Traceback" not in err
    assert err.strip().splitlines()[-1] == (
        f"groma {argv[0]}: error: argument {option}: expected a positive integer, got '{value}'"
    )


def test_eval_detection_refuses_max_new_tokens(tmp_path):
    (tmp_path / "det.json").write_text(json.dumps({"images": [{"id": 1, "file_name": "a.png"}], "annotations": []}))
    out = groma("eval", "detection", "--ann", str(tmp_path / "det.json"), "--images", str(tmp_path),
                "--max-new-tokens", "5")
    assert out.returncode == 1
    assert out.stderr.strip() == (
        "groma: error: --max-new-tokens: the detection task runs the region proposer alone and writes no text"
    )


def test_listing_validating_and_help_do_not_import_the_stages_heavy_libraries():
    code = (
        "import sys, contextlib, io\n"
        "from groma_core.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    assert main(['plugins']) == 0 and main(['validate', 'shapes-tiny']) == 0\n"
        "    assert main(['validate', 'groma-7b']) == 0\n"
        "    try:\n"
        "        main(['--help'])\n"
        "    except SystemExit:\n"
        "        pass\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'transformers', 'open_clip', 'segment_anything'}))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"  # loaded, listed and checked; nothing built, so no model code imported


def test_a_lazily_registered_stage_still_builds_and_its_names_still_import():
    import groma_plugin_vicuna

    from groma_core.plugins import PluginManager

    entry = PluginManager().get("language_backbone", "vicuna")
    assert entry.factory.__name__ == "build_vicuna"
    assert groma_plugin_vicuna.CausalLMBackbone.__module__ == "groma_plugin_vicuna.backbone"
    with pytest.raises(AttributeError, match="has no attribute 'nothing'"):
        groma_plugin_vicuna.nothing  # noqa: B018
