"""Golden parity with the reference implementation, through the runner users call."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
from safetensors.torch import load_file, save_file

from groma_core.testing.fixtures import require_golden_sets

SETS = require_golden_sets()  # the repository ships tests/reference/golden: without it these tests fail


def run_golden(*dirs) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "groma_core.testing.golden", *map(str, dirs)],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )


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


def test_runner_reads_a_right_padded_batch_case(tmp_path):
    """A batch2 case (img0 + REC prompt, img1 + referring prompt, right-padded) assembled from the set's two B=1
    cases: every real position must match those reference tensors; padded positions carry this model's own values,
    so the case checks the batch code path and batch-invariance, not new parity."""
    import json

    import torch
    from safetensors.torch import save_file

    from groma_core.testing.fixtures import GoldenSet
    from groma_core.testing.golden import load_fixture_model

    gs = GoldenSet(SETS[0])
    cases = [n for n in ("img0_rec", "img1_refer") if n in gs.cases()]
    if len(cases) < 2 or any("batch2" in n for n in gs.cases()):
        pytest.skip("the set has no img0_rec/img1_refer pair, or a batch2 case of its own")
    a, b = (gs.tensors(f"case_{n}") for n in cases)
    pad = 32000
    (tmp_path / "work").mkdir()
    model = load_fixture_model(gs, tmp_path / "work")

    def padded(x, y, value):
        width = max(x.shape[1], y.shape[1])
        rows = [
            torch.nn.functional.pad(t, (0, 0) * (t.ndim - 2) + (0, width - t.shape[1]), value=value) for t in (x, y)
        ]
        return torch.cat(rows)

    t = {
        "input_ids": padded(a["input_ids"], b["input_ids"], pad),
        "input_ids_after_refer_subst": padded(a["input_ids_after_refer_subst"], b["input_ids_after_refer_subst"], pad),
        "ids_expanded": padded(a["ids_expanded"], b["ids_expanded"], pad),
        "attention_mask": padded(a["attention_mask"], b["attention_mask"], 0),
    }
    for k in ("nms_candidates_xyxy", "nms_candidate_scores", "nms_keep", "regions_cxcywh", "region_features"):
        t[f"{k}.0"], t[f"{k}.1"] = a[f"{k}.0"], b[f"{k}.0"]
    t["refer_boxes.1"] = b["refer_boxes.0"]
    with torch.no_grad():
        embeds = model.language_backbone.embed(t["ids_expanded"])
        for i, case in enumerate((a, b)):
            embeds[i, : case["llm_inputs_embeds"].shape[1]] = case["llm_inputs_embeds"][0]
        t["llm_inputs_embeds"] = embeds
        positions = torch.arange(embeds.shape[1])[None].expand(2, -1)
        out = model.language_backbone(embeds, t["attention_mask"], positions)
    t["llm_last_hidden"] = out.hidden_states
    t["logits_last"] = out.logits[:, -1]
    t["logits_rows_pos"] = a["logits_rows_pos"]
    t["logits_rows"] = out.logits[:, a["logits_rows_pos"]]
    t["logits_argmax"] = out.logits.argmax(-1)
    t["logits_logsumexp"] = out.logits.logsumexp(-1)
    t["logits_last_per_sample"] = torch.cat([a["logits_last"], b["logits_last"]])  # reference values, B=1
    copy = tmp_path / gs.name
    shutil.copytree(gs.dir, copy)
    save_file({k: v.contiguous() for k, v in t.items()}, str(copy / "case_batch2.safetensors"))
    meta = json.loads((copy / "meta.json").read_text())
    meta["cases"] = {"batch2": {"file": "case_batch2.safetensors", "images": ["img0", "img1"], "batch_size": 2}}
    (copy / "meta.json").write_text(json.dumps(meta))
    result = run_golden(copy)
    assert result.returncode == 0, result.stdout[-3000:]
    assert "batch2/selection.keep.1" in result.stdout and "batch2/region_encoder.1" in result.stdout
    assert "batch2/logits_last_per_sample" in result.stdout
