"""Where detectron2 is absent (as on the machines this project is tested on), the plugin is an error line that says
why and how to install detectron2; nothing else breaks."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from groma_core.errors import UnknownPluginError
from groma_core.plugins import PluginManager, PluginWarning

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("detectron2") is not None, reason="detectron2 is installed: test_detectron2_proposer runs"
)


def test_without_detectron2_the_plugin_is_an_error_with_install_instructions():
    with pytest.warns(PluginWarning, match="groma-plugin-detectron2 needs detectron2"):
        manager = PluginManager()
    record = next(r for r in manager.records if r.distribution == "groma-plugin-detectron2")
    assert record.status == "error" and record.stages == []
    assert "ImportError" in record.error and "no release on PyPI" in record.error
    assert "git+https://github.com/facebookresearch/detectron2.git" in record.error
    with pytest.raises(UnknownPluginError) as err:  # a recipe naming it gets the reason and the instructions
        manager.get("region_proposer", "detectron2")
    assert str(err.value).startswith(
        "region_proposer plugin 'detectron2' is not available: groma-plugin-detectron2 failed to load (ImportError: "
        "groma-plugin-detectron2 needs detectron2"
    )
    assert manager.get("region_proposer", "user-boxes").name == "user-boxes"  # the rest still work


def test_groma_plugins_shows_the_reason():
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    out = subprocess.run(
        [sys.executable, "-m", "groma_core.cli", "plugins", "--json"], capture_output=True, text=True, env=env
    )
    assert out.returncode == 0, out.stderr
    (row,) = [r for r in json.loads(out.stdout) if r["distribution"] == "groma-plugin-detectron2"]
    assert row["status"] == "error" and "needs detectron2" in row["error"]
