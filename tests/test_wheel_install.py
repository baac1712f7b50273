"""groma-core and the default plugins installed from their wheels (not editable) work on their own: the shipped
recipes are package data, `groma validate` finds them by name, and the embedded model answers.

The wheels are built from a copy of the sources and installed with ``--no-deps`` into a fresh venv that sees the
third-party packages of the running environment (torch is not installed again) through a folder of links to them,
from which every groma package, its metadata and its editable-install hooks are left out: nothing of the checkout
can be imported there.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DEFAULT_PLUGINS = ("dinov2", "deformable-detr", "roialign", "vicuna")
IMAGE = "examples/images/shapes.png"
PROMPT = "[grounding]Give me a concise description of the image."


def run(command: list, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "GROMA_", "VIRTUAL_ENV", "PIP_"))}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONNOUSERSITE="1", PIP_DISABLE_PIP_VERSION_CHECK="1")
    out = subprocess.run([str(c) for c in command], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"{' '.join(map(str, command))}\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out


def third_party_view(target: Path) -> Path:
    """A folder of links to every entry of this environment's site-packages except the groma packages (modules,
    dist-info) and the ``.pth`` files and finders of editable installs."""
    site = Path(sysconfig.get_paths()["purelib"])
    target.mkdir()
    for entry in site.iterdir():
        name = entry.name.lower()
        if name.startswith(("groma", "__editable__", "_groma")) or name.endswith(".pth") or name == "__pycache__":
            continue
        (target / entry.name).symlink_to(entry)
    return target


@pytest.fixture(scope="module")
def wheel_env(tmp_path_factory) -> Path:
    """A venv holding the wheels of groma-core and the default plugins; returns its bin folder."""
    tmp = tmp_path_factory.mktemp("wheel-install")
    src = tmp / "src"
    # a copy, so that the checkout gets no build/ or egg-info; groma_core/recipes stays the link to recipes/
    skip = shutil.ignore_patterns("__pycache__", "*.egg-info", "build", "tests")
    shutil.copytree(REPO / "groma_core", src / "groma_core", symlinks=True, ignore=skip)
    shutil.copytree(REPO / "recipes", src / "recipes")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    projects = [src]
    for plugin in DEFAULT_PLUGINS:
        projects.append(src / "plugins" / f"groma-plugin-{plugin}")
        shutil.copytree(REPO / "plugins" / f"groma-plugin-{plugin}", projects[-1], ignore=skip)
    pip = [sys.executable, "-m", "pip"]
    run([*pip, "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", tmp / "wheels", *projects], cwd=tmp)
    wheels = sorted((tmp / "wheels").glob("*.whl"))
    assert len(wheels) == 1 + len(DEFAULT_PLUGINS), wheels

    venv = tmp / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", venv], cwd=tmp)
    bin_dir = venv / "bin"
    purelib = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    site = Path(run([bin_dir / "python", "-c", purelib], cwd=tmp).stdout.strip())
    (site / "third_party.pth").write_text(f"{third_party_view(tmp / 'third-party')}\n")
    run([*pip, "--python", bin_dir / "python", "install", "-q", "--no-deps", "--no-index", *wheels], cwd=tmp)
    return bin_dir


def test_the_wheels_not_the_checkout_are_imported(wheel_env, tmp_path):
    code = (
        "import importlib.metadata as md, groma_core, groma_core.api as api, groma_core.recipe as recipe\n"
        "import groma_plugin_dinov2, groma_plugin_deformable_detr, groma_plugin_roialign, groma_plugin_vicuna\n"
        "print(groma_core.__file__)\n"
        "print(api.default_model())\n"
        "print(recipe.recipes_dir())\n"
        "for m in (groma_plugin_dinov2, groma_plugin_deformable_detr, groma_plugin_roialign, groma_plugin_vicuna):\n"
        "    print(m.__file__)\n"
        "print(*sorted(d.metadata['Name'] for d in md.distributions() if d.metadata['Name'].startswith('groma')))\n"
    )
    lines = run([wheel_env / "python", "-c", code], cwd=tmp_path).stdout.splitlines()
    venv = wheel_env.parent.resolve()
    for path in lines[:-1]:
        assert Path(path).resolve().is_relative_to(venv), f"{path} is not from the wheel install in {venv}"
    assert lines[-1].split() == sorted(["groma-core", *(f"groma-plugin-{p}" for p in DEFAULT_PLUGINS)])


def test_recipes_lists_the_shipped_recipes(wheel_env, tmp_path):
    out = run([wheel_env / "groma", "recipes"], cwd=tmp_path).stdout
    listed = sorted(line.split()[0] for line in out.splitlines() if line.strip())
    assert listed == sorted(p.stem for p in (REPO / "recipes").glob("*.yaml"))


def test_validate_finds_a_shipped_recipe_by_name(wheel_env, tmp_path):
    run([wheel_env / "groma", "validate", "groma-7b"], cwd=tmp_path)


def test_ground_answers_with_the_embedded_model(wheel_env, tmp_path):
    (tmp_path / IMAGE).parent.mkdir(parents=True)
    shutil.copy2(REPO / IMAGE, tmp_path / IMAGE)
    out = run([wheel_env / "groma", "ground", IMAGE, PROMPT], cwd=tmp_path).stdout.splitlines()
    assert out[0].startswith(f"{IMAGE}: ") and len(out[0]) > len(IMAGE) + 10, out
    phrases = [line for line in out[1:] if line.startswith("  ") and not line.startswith("  warning: ")]
    assert phrases and all(line.rstrip().endswith("]") and ": <r" in line for line in phrases), out
