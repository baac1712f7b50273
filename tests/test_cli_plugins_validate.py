"""`groma validate` and `groma plugins` as a user runs them: in a subprocess."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import yaml

from groma_core.api import DEFAULT_MODEL

ROOT = Path(__file__).resolve().parents[1]
COLUMNS = ["NAME", "STAGE", "PLUGIN", "DISTRIBUTION", "VERSION", "STATUS", "DESCRIPTION"]


def groma(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "groma_core.cli", *args],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", **(env or {})},
        timeout=300,
    )


def broken_plugin(tmp_path: Path) -> dict:
    """An installed plugin `boom` (distribution groma-plugin-boom) whose module fails to import with a hint."""
    info = tmp_path / "groma_plugin_boom-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: groma-plugin-boom\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[groma]\nboom = boom_mod\n")
    (tmp_path / "boom_mod.py").write_text(
        "raise ImportError(\"groma-plugin-boom needs libboom: pip install libboom; until then the 'boom' region "
        "proposer is not available\")\n"
    )
    return {"PYTHONPATH": str(tmp_path)}


def test_validate_print_writes_only_yaml_on_stdout(tmp_path):
    out = groma("validate", "groma-7b", "--print")
    assert out.returncode == 0, out.stderr
    printed = yaml.safe_load(out.stdout)  # the whole of stdout is the recipe
    assert printed["region_proposer"]["plugin"] == "deformable-detr" and printed["name"] == "groma-7b"
    assert out.stderr.startswith("ok: ") and "ok:" not in out.stdout
    plain = groma("validate", "groma-7b")
    assert plain.returncode == 0 and plain.stdout.startswith("ok: ")


def test_validate_accepts_a_model_folder_as_model_does(tmp_path):
    out = groma("validate", str(DEFAULT_MODEL))
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(f"ok: {DEFAULT_MODEL / 'recipe.yaml'} (image_tokenizer=dinov2")
    out = groma("validate", str(tmp_path))
    assert out.returncode == 1
    assert out.stderr.strip() == f"{tmp_path}: a folder, but not a model folder (it has no recipe.yaml)"


def test_validate_shows_why_a_named_plugin_failed_to_load(tmp_path):
    env = broken_plugin(tmp_path)
    out = groma("validate", "groma-7b", "region_proposer.plugin=boom", env=env)
    assert out.returncode == 1
    assert out.stderr.strip() == (
        f"{ROOT / 'recipes' / 'groma-7b.yaml'}: region_proposer.plugin: region_proposer plugin 'boom' is not "
        "available: groma-plugin-boom failed to load (ImportError: groma-plugin-boom needs libboom: pip install "
        "libboom; until then the 'boom' region proposer is not available) [from override "
        "'region_proposer.plugin=boom']"
    )
    # a plugin name nothing provides still lists the installed ones, and says that some failed to load
    out = groma("validate", "groma-7b", "region_proposer.plugin=bam", env=env)
    assert "unknown region_proposer plugin 'bam'" in out.stderr
    assert re.search(r"; \d plugin\(s\) failed to load: ([\w-]+, )*boom(, [\w-]+)* \(see `groma plugins`\)", out.stderr)


def test_plugins_columns_are_the_ones_contributing_describes(tmp_path):
    out = groma("plugins", env=broken_plugin(tmp_path))
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].split() == COLUMNS
    starts = [lines[0].index(c) for c in COLUMNS]
    rows = {line[: starts[1]].strip(): line for line in lines[1:] if not line.startswith(" ")}
    user_boxes = rows["user-boxes"]
    assert user_boxes[starts[2] :].split()[:4] == ["builtin", "groma-core", "0.1.0", "ok"]
    assert user_boxes[starts[6] :] == "no proposals: the regions are exactly the user's boxes"
    assert rows["owlv2"][starts[2] : starts[3]].strip() == "detectors"  # entry point, not stage name
    failed = [line for line in lines if "groma-plugin-boom" in line][0]
    assert failed[starts[2] : starts[3]].strip() == "boom" and failed.split()[-1] == "error"
    # CONTRIBUTING says what each column holds, with these names
    contributing = (ROOT / "CONTRIBUTING.md").read_text()
    described = re.search(r"`groma plugins` shows one row per stage: (.*?)\n\n", contributing, re.S).group(1)
    assert re.findall(r"`([A-Z]+)`", described) == COLUMNS
    rows_json = json.loads(groma("plugins", "--json").stdout)
    assert {"name": "user-boxes", "plugin": "builtin", "description": "no proposals: the regions are exactly the "
            "user's boxes"}.items() <= rows_json[0].items()


def test_plugins_options_shows_types_defaults_and_descriptions():
    from groma_plugin_deformable_detr.options import DeformableDetrOptions

    out = groma("plugins", "--options", "deformable-detr")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("deformable-detr (region_proposer, groma-plugin-deformable-detr 0.1.0): ")
    assert lines[1].split() == ["OPTION", "TYPE", "DEFAULT", "DESCRIPTION"]
    options = {line.split()[0]: line for line in lines[2:]}
    assert list(options) == list(DeformableDetrOptions.model_fields)
    field = DeformableDetrOptions.model_fields["d_model"]
    assert options["d_model"].split()[:3] == ["d_model", "int", "(>0)"]
    assert f" {field.default} " in options["d_model"] and options["d_model"].endswith(field.description)
    assert '"pytorch"' in options["attention_impl"]  # a Literal shows its choices
    (as_json,) = json.loads(groma("plugins", "--options", "deformable-detr", "--json").stdout)
    assert as_json["options"][0] == {
        "name": "in_levels",
        "type": "list[str]",
        "default": json.dumps(DeformableDetrOptions().in_levels),
        "description": DeformableDetrOptions.model_fields["in_levels"].description,
    }
    missing = groma("plugins", "--options", "deformable-dter")
    assert missing.returncode == 1
    assert missing.stderr.startswith("groma: error: --options deformable-dter: no stage of that name (did you mean "
                                     "'deformable-detr'?); installed: ")
