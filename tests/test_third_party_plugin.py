"""The CONTRIBUTING tutorial's example plugin, installed with pip and found through its entry-point metadata."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from groma_core.plugins import PluginManager
from groma_core.testing import tiny
from groma_core.testing.contract import check_registered_stage

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "groma-plugin-grid-proposer"


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    target = tmp_path_factory.mktemp("site")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "--target",
            str(target),
            str(EXAMPLE),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    assert any(p.name.startswith("groma_plugin_grid_proposer") and p.suffix == ".dist-info" for p in target.iterdir())
    return target


def test_cli_lists_the_installed_example(installed):
    env = {**os.environ, "PYTHONPATH": str(installed)}
    out = subprocess.run(
        [sys.executable, "-m", "groma_core.cli", "plugins"], capture_output=True, text=True, env=env, timeout=300
    )
    line = next(line for line in out.stdout.splitlines() if line.startswith("sliding-window"))
    assert "region_proposer" in line and "groma-plugin-grid-proposer" in line and "ok" in line


def test_example_passes_the_contract_kit_and_runs_in_a_pipeline(installed, monkeypatch, tiny_recipe, images):
    monkeypatch.syspath_prepend(str(installed))
    manager = PluginManager()
    manager.register_plugin(tiny, name="tiny", distribution="groma-core-tests")
    check_registered_stage("region_proposer", "sliding-window", {"scales": [0.5, 1.0]}, manager=manager)

    from groma_core.api import build
    from groma_core.prompt import TEMPLATES
    from groma_core.recipe import validate_recipe

    tiny_recipe["region_proposer"] = {"plugin": "sliding-window", "scales": [0.5, 1.0], "overlap": 0.5}
    model = build(validate_recipe(tiny_recipe, manager), manager=manager).eval()
    ids = model.tokenizer.encode(TEMPLATES["llava"].render([("Locate <p>the red square</p> in the image.", None)]))
    out = model.generate(model.image_tokenizer.preprocess(images), [ids, ids], max_new_tokens=3, eos_id=-1)
    assert all(len(s) == 3 for s in out.sequences)
    assert all(0 < b.shape[0] <= 10 for b in out.regions.boxes)  # 3x3 half-size windows + the whole image
    assert torch.all(out.regions.boxes[0] <= 1)


def test_contract_kit_catches_a_broken_proposer(manager):
    from groma_core import hookimpl
    from groma_core.builtin import UserBoxesOptions
    from groma_core.stages import RegionProposer
    from groma_core.types import Proposals

    class Outside(RegionProposer):
        def forward(self, features):
            b = features.batch_size
            return Proposals([torch.tensor([[1.2, 0.0, 1.5, 0.5]])] * b, [torch.tensor([0.5])] * b)

    class Plugin:
        @hookimpl
        def register_region_proposers(self, register):
            register("outside", lambda o, c: Outside(), config=UserBoxesOptions)

    manager.register_plugin(Plugin(), name="outside")
    with pytest.raises(AssertionError, match="centre is outside the image"):
        check_registered_stage("region_proposer", "outside", manager=manager)


def _pixel_proposers():
    """Three proposers that read the original images: one that declares it and says so without them, one that does
    not declare it, one that declares it but crashes without them."""
    from groma_core.errors import InputError
    from groma_core.stages import RegionProposer
    from groma_core.types import Proposals

    def boxes_of(features):
        b = features.batch_size
        return Proposals([torch.tensor([[0.0, 0.0, 0.5, 0.5]])] * b, [torch.tensor([0.9])] * b)

    class Declared(RegionProposer):
        needs_images = True

        def forward(self, features):
            if features.images is None:
                raise InputError("declared: features.images is None; pass the original images")
            return boxes_of(features)

    class Undeclared(Declared):
        needs_images = False

    class Crashes(RegionProposer):
        needs_images = True

        def forward(self, features):
            _ = [image.size for image in features.images]  # TypeError when None
            return boxes_of(features)

    return Declared, Undeclared, Crashes


def test_contract_kit_checks_stages_that_read_the_images():
    from groma_core.testing.contract import check_region_proposer

    declared, undeclared, crashes = _pixel_proposers()
    check_region_proposer(declared())  # passes: declared, and a one-line InputError without the images
    with pytest.raises(AssertionError, match="does not declare it: set the class attribute needs_images = True"):
        check_region_proposer(undeclared())
    with pytest.raises(AssertionError, match="crashes without features.images .TypeError.*raise groma_core.errors"):
        check_region_proposer(crashes())
