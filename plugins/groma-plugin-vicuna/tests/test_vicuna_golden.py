"""Parity with the reference Groma LLM on every golden fixture set (embeddings, logits, greedy generation)."""

from __future__ import annotations

import pytest
import torch
from groma_plugin_vicuna import CausalLMBackbone, VicunaOptions, build_vicuna

from groma_core import tokens as T
from groma_core.reference import load_reference_weights
from groma_core.stages import BuildContext
from groma_core.testing.fixtures import GoldenSet, require_golden_sets

ATOL = 1e-4
PARAMS = [(path, attn) for path in require_golden_sets() for attn in ("sdpa", "eager")]  # fails without the sets


@pytest.fixture(scope="module", params=PARAMS, ids=[f"{p.name}-{a}" for p, a in PARAMS])
def golden(request) -> tuple[GoldenSet, CausalLMBackbone]:
    path, attn = request.param
    gs = GoldenSet(path)
    sizes = VicunaOptions.from_reference_config(gs.groma_config).model_dump()
    options = VicunaOptions.model_validate({**sizes, "attn_implementation": attn})
    backbone = build_vicuna(options, BuildContext()).eval()
    assert backbone.llm.config._attn_implementation == attn
    load_reference_weights(backbone, gs.weights(), where=f"golden set {gs.name}")
    return gs, backbone


def case_tensors(gs: GoldenSet) -> dict[str, dict[str, torch.Tensor]]:
    return {name: gs.tensors(case["file"].removesuffix(".safetensors")) for name, case in gs.cases().items()}


def test_sizes_come_from_the_reference_config(golden):
    gs, backbone = golden
    llm_cfg = gs.groma_config["llm_cfg"]
    assert backbone.hidden_size == llm_cfg["hidden_size"]
    assert backbone.base_vocab_size == llm_cfg["vocab_size"]
    assert backbone.vocab_size == gs.groma_config["vocab_size"] == llm_cfg["vocab_size"] + 114
    assert backbone.tokenizer is None


def test_embed_matches_reference_outside_visual_placeholders(golden):
    gs, backbone = golden
    base = backbone.base_vocab_size
    placeholders = [base + T.NEW_TOKENS.index(t) for t in (T.IMAGE, T.REGION, T.REFER_FEAT)]
    for name, t in case_tensors(gs).items():
        ids = t["ids_expanded"]
        with torch.no_grad():
            embeds = backbone.embed(ids)
        keep = ~torch.isin(ids, torch.tensor(placeholders))
        assert (ids >= base).any(), name
        torch.testing.assert_close(embeds[keep], t["llm_inputs_embeds"][keep], rtol=0, atol=0, msg=name)


def test_forward_matches_reference_hidden_states_and_logits(golden):
    gs, backbone = golden
    for name, t in case_tensors(gs).items():
        with torch.no_grad():
            out = backbone(t["llm_inputs_embeds"], attention_mask=t["attention_mask"])
        assert out.logits.shape[-1] == backbone.vocab_size
        torch.testing.assert_close(out.hidden_states, t["llm_last_hidden"], rtol=ATOL, atol=ATOL, msg=name)
        torch.testing.assert_close(out.logits[:, -1], t["logits_last"], rtol=ATOL, atol=ATOL, msg=name)
        rows = out.logits[:, t["logits_rows_pos"]]
        torch.testing.assert_close(rows, t["logits_rows"], rtol=ATOL, atol=ATOL, msg=name)
        assert torch.equal(out.logits.argmax(-1), t["logits_argmax"]), name
        torch.testing.assert_close(out.logits.logsumexp(-1), t["logits_logsumexp"], rtol=0, atol=ATOL, msg=name)
        if "logits_last_per_sample" in t:
            last = t["attention_mask"].sum(1) - 1
            per_sample = out.logits[torch.arange(len(last)), last]
            torch.testing.assert_close(per_sample, t["logits_last_per_sample"], rtol=ATOL, atol=ATOL, msg=name)


def test_greedy_generation_with_kv_cache_matches_reference(golden):
    gs, backbone = golden
    cases = {name: t for name, t in case_tensors(gs).items() if "gen_sequences" in t}
    assert cases
    for name, t in cases.items():
        embeds = t["llm_inputs_embeds"]
        steps = t["gen_scores_logsumexp"].shape[1]
        prompt_len, length = t["input_ids"].shape[1], embeds.shape[1]
        generated, lse, top10 = [], [], []
        with torch.no_grad():
            out = backbone(embeds, attention_mask=t["attention_mask"], use_cache=True)
            for step in range(steps):
                logits = out.logits[:, -1]
                lse.append(logits.logsumexp(-1))
                top10.append(logits.topk(10).values)
                next_id = logits.argmax(-1, keepdim=True)
                generated.append(next_id)
                if step + 1 == steps:
                    break
                past = length + step
                out = backbone(
                    backbone.embed(next_id),
                    attention_mask=torch.ones(1, past + 1, dtype=torch.long),
                    position_ids=torch.tensor([[past]]),
                    past_key_values=out.past_key_values,
                    use_cache=True,
                )
        assert torch.equal(torch.cat(generated, 1), t["gen_sequences"][:, prompt_len:]), name
        torch.testing.assert_close(torch.stack(lse, 1), t["gen_scores_logsumexp"], rtol=0, atol=ATOL, msg=name)
        torch.testing.assert_close(torch.stack(top10, 1), t["gen_scores_top10_values"], rtol=0, atol=ATOL, msg=name)
