"""Golden parity with the reference implementation, through the runner users call."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
from safetensors.torch import load_file, save_file

from groma_core.testing.fixtures import golden_sets

SETS = golden_sets()


def run_golden(*dirs) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "groma_core.testing.golden", *map(str, dirs)],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )


@pytest.mark.skipif(not SETS, reason="no golden fixture set found")
@pytest.mark.parametrize("fixture", SETS, ids=[s.name for s in SETS])
def test_every_golden_set_passes(fixture):
    out = run_golden(fixture)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert " 0 failed" in out.stdout
    for stage in (
        "pixel_values",
        "image_tokenizer.tokens",
        "proposer.scores",
        "selection.keep",
        "region_encoder",
        "llm_inputs_embeds",
        "logits_last",
        "generate.new_ids",
        "end_to_end.region_set",
    ):
        assert stage in out.stdout, f"the runner did not compare {stage}"


@pytest.mark.skipif(not SETS, reason="no golden fixture set found")
def test_runner_fails_on_a_perturbed_model(tmp_path):
    copy = tmp_path / SETS[0].name
    shutil.copytree(SETS[0], copy)
    weights = load_file(str(copy / "weights.safetensors"))
    weights["llm.model.norm.weight"] = weights["llm.model.norm.weight"] * 1.01
    save_file(weights, str(copy / "weights.safetensors"))
    out = run_golden(copy)
    assert out.returncode == 1
    failing = [line for line in out.stdout.splitlines() if line.endswith("FAIL")]
    assert any("llm_last_hidden" in line for line in failing)
    assert not any("image_tokenizer" in line for line in failing)  # only what depends on the change fails


def test_runner_refuses_a_directory_without_meta(tmp_path):
    out = run_golden(tmp_path)
    assert out.returncode == 1 and "not a fixture set" in out.stderr
