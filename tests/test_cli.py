"""The `groma` command line, run as a user runs it: in a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


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


def test_help_on_every_command():
    for cmd in ([], ["plugins"], ["recipes"], ["validate"]):
        out = groma(*cmd, "--help")
        assert out.returncode == 0 and "usage: groma" in out.stdout


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
    assert out.stdout.startswith("ok: ")
    printed = yaml.safe_load(out.stdout.split("\n", 1)[1])
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
