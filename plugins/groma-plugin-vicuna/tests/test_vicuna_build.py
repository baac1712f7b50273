"""Building the vicuna backbone: full-size shapes, options, a pretrained directory, tokenizer checks, discovery."""

from __future__ import annotations

import pytest
import torch
from groma_plugin_vicuna import CausalLMBackbone, VicunaOptions, build_vicuna
from pydantic import ValidationError
from transformers import Cache, LlamaConfig

from groma_core.plugins import PluginManager
from groma_core.prompt import GromaTokenizer
from groma_core.stages import BuildContext, LanguageBackbone
from groma_core.testing.fixtures import golden_root

KEYS_TSV = golden_root().parent / "groma-7b-keys.tsv"
TINY_SIZES = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2
)


def released_groma_config() -> dict:
    """The reference config.json fields this backbone reads, with the released Vicuna-7B v1.5 values."""
    llm_cfg = LlamaConfig(
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        vocab_size=32000,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
    ).to_dict()
    llm_cfg.pop("rope_theta", None)  # transformers 4.32 configs have no rope_theta: the default 10000 applies
    return {"llm_cfg": llm_cfg, "num_new_token": 114, "vocab_size": 32114}


def test_full_size_build_on_meta_matches_released_checkpoint_shapes():
    if not KEYS_TSV.is_file():
        pytest.skip(f"{KEYS_TSV} not present")
    expected = {}
    for line in KEYS_TSV.read_text().splitlines()[1:]:
        key, shape = line.split("\t")[:2]
        if key.startswith(CausalLMBackbone.reference_prefixes):
            expected[key] = tuple(int(n) for n in shape.split("x"))
    with torch.device("meta"):
        backbone = build_vicuna(VicunaOptions(), BuildContext())
    state = {backbone.reference_key(k): tuple(v.shape) for k, v in backbone.state_dict().items()}
    assert len(expected) == 293
    assert state == expected
    assert backbone.llm.model.embed_tokens.weight.is_meta
    assert (backbone.hidden_size, backbone.base_vocab_size, backbone.vocab_size) == (4096, 32000, 32114)
    assert backbone.tokenizer is None


def test_reference_keys_map_unchanged():
    backbone = build_vicuna(VicunaOptions(vocab_size=100, **TINY_SIZES), BuildContext())
    assert backbone.reference_key("llm.model.layers.0.mlp.up_proj.weight") == "llm.model.layers.0.mlp.up_proj.weight"
    assert backbone.reference_key("new_input_embs.weight") == "new_input_embs.weight"
    assert backbone.reference_key("extra_lm_head.weight") == "extra_lm_head.weight"
    assert backbone.reference_key("img_txt_bridge.0.weight") is None


def test_options_from_released_config_are_the_vicuna_defaults():
    assert VicunaOptions.from_reference_config(released_groma_config()) == VicunaOptions()


@pytest.mark.parametrize(
    "change, message",
    [
        ({"num_new_token": 10}, "num_new_token is 10"),
        ({"llm_cfg": {"rope_scaling": {"type": "linear", "factor": 4.0}}}, "llm_cfg.rope_scaling"),
        ({"llm_cfg": {"model_type": "mistral"}}, "needs 'llama'"),
    ],
)
def test_options_from_an_unsupported_config_say_what_is_wrong(change, message):
    config = released_groma_config()
    config["llm_cfg"].update(change.pop("llm_cfg", {}))
    config.update(change)
    with pytest.raises(ValueError, match=message):
        VicunaOptions.from_reference_config(config)


def test_options_reject_unknown_keys_and_bad_head_counts():
    with pytest.raises(ValidationError, match="hidden_sise"):
        VicunaOptions(hidden_sise=4096)
    with pytest.raises(ValidationError, match="not divisible by num_attention_heads"):
        VicunaOptions(hidden_size=100, num_attention_heads=32)
    with pytest.raises(ValidationError, match="attn_implementation"):
        VicunaOptions(attn_implementation="flash")


def test_sizes_build_plain_new_tokens_and_the_llama_config():
    backbone = build_vicuna(VicunaOptions(vocab_size=100, attn_implementation="eager", **TINY_SIZES), BuildContext())
    config = backbone.llm.config
    assert isinstance(backbone, LanguageBackbone)
    assert (config.hidden_size, config.num_key_value_heads, config.vocab_size) == (32, 2, 100)
    assert config._attn_implementation == "eager"
    assert config.tie_word_embeddings is False
    assert backbone.new_input_embs.weight.shape == (114, 32)
    assert backbone.extra_lm_head.weight.shape == (114, 32)
    assert not torch.allclose(backbone.new_input_embs.weight[0], backbone.new_input_embs.weight[1])


def test_pretrained_directory_round_trip(tiny_llama_dir, make_tiny_llama):
    original = make_tiny_llama(400)
    backbone = build_vicuna(VicunaOptions(pretrained=str(tiny_llama_dir)), BuildContext()).eval()
    assert isinstance(backbone.tokenizer, GromaTokenizer)
    assert backbone.tokenizer.offset == backbone.base_vocab_size == 400
    assert backbone.vocab_size == backbone.tokenizer.vocab_size == 514
    torch.testing.assert_close(backbone.llm.state_dict(), original.state_dict(), rtol=0, atol=0)
    mean = original.model.embed_tokens.weight.mean(0)
    torch.testing.assert_close(backbone.new_input_embs.weight, mean.expand(114, -1), rtol=0, atol=1e-7)

    ids = torch.tensor([backbone.tokenizer.encode("Locate the man in a red shirt")])
    assert (ids < 400).all()
    with torch.no_grad():
        out = backbone(backbone.embed(ids), attention_mask=torch.ones_like(ids))
        reference = original(input_ids=ids).logits
    torch.testing.assert_close(out.logits[..., :400], reference, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.logits[..., 400:], backbone.extra_lm_head(out.hidden_states))


def test_new_token_ids_embed_through_the_new_table(tiny_llama_dir):
    backbone = build_vicuna(VicunaOptions(pretrained=str(tiny_llama_dir)), BuildContext())
    tok = backbone.tokenizer
    ids = torch.tensor([tok.encode("Locate <p>a dog</p><roi><r3></roi>")])
    with torch.no_grad():
        backbone.new_input_embs.weight.copy_(torch.randn(114, 32))
        embeds = backbone.embed(ids)
    assert (ids >= 400).sum() == 5
    for position, token_id in enumerate(ids[0].tolist()):
        if token_id >= 400:
            expected = backbone.new_input_embs.weight[token_id - 400]
        else:
            expected = backbone.llm.model.embed_tokens.weight[token_id]
        torch.testing.assert_close(embeds[0, position], expected, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"\[0, 514\)"):
        backbone.embed(torch.tensor([[3, 514]]))


def test_kv_cache_steps_equal_a_full_recompute(tiny_llama_dir):
    backbone = build_vicuna(VicunaOptions(pretrained=str(tiny_llama_dir)), BuildContext()).eval()
    ids = torch.tensor([backbone.tokenizer.encode("Locate <p>the man</p> in <image>.")])
    with torch.no_grad():
        out = backbone(backbone.embed(ids), attention_mask=torch.ones_like(ids), use_cache=True)
        assert isinstance(out.past_key_values, Cache)
        assert backbone(backbone.embed(ids)).past_key_values is None
        for _ in range(4):
            next_id = out.logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, next_id], 1)
            out = backbone(
                backbone.embed(next_id),
                attention_mask=torch.ones_like(ids),
                position_ids=torch.tensor([[ids.shape[1] - 1]]),
                past_key_values=out.past_key_values,
                use_cache=True,
            )
            full = backbone(backbone.embed(ids), attention_mask=torch.ones_like(ids))
            torch.testing.assert_close(out.logits[:, -1], full.logits[:, -1], rtol=1e-5, atol=1e-5)
        expected = rf"attention_mask: expected shape \(1, {ids.shape[1] + 1}\) .* got \(1, 1\)"
        with pytest.raises(ValueError, match=expected):
            backbone(backbone.embed(next_id), attention_mask=torch.ones(1, 1), past_key_values=out.past_key_values)
        with pytest.raises(ValueError, match=r"inputs_embeds: expected shape \(B, L, 32\), got \(1, 16\)"):
            backbone(torch.zeros(1, 16))


def test_tokenizer_option_and_its_default(tiny_llama_dir, sp_tokenizer_dir, tmp_path):
    sizes = VicunaOptions(vocab_size=400, **TINY_SIZES)
    assert build_vicuna(sizes, BuildContext()).tokenizer is None
    with_tokenizer = sizes.model_copy(update={"tokenizer": str(sp_tokenizer_dir)})
    assert build_vicuna(with_tokenizer, BuildContext()).tokenizer.offset == 400
    explicit = VicunaOptions(pretrained=str(tiny_llama_dir), tokenizer=str(sp_tokenizer_dir))
    assert build_vicuna(explicit, BuildContext()).tokenizer.offset == 400
    with pytest.raises(FileNotFoundError, match="tokenizer: .* holds none of tokenizer.model"):
        build_vicuna(VicunaOptions(pretrained=str(tiny_llama_dir), tokenizer=str(tmp_path)), BuildContext())
    with pytest.raises(FileNotFoundError, match=r"pretrained: .* \(no config.json\)"):
        build_vicuna(VicunaOptions(pretrained=str(tmp_path)), BuildContext())


def test_tokenizer_that_does_not_match_the_model_vocabulary_is_refused(sp_tokenizer_dir, make_tiny_llama, tmp_path):
    make_tiny_llama(410).save_pretrained(tmp_path)
    (tmp_path / "tokenizer.model").write_bytes((sp_tokenizer_dir / "tokenizer.model").read_bytes())
    with pytest.raises(ValueError, match="base vocabulary has 400 tokens .* embedding table has 410 rows") as err:
        build_vicuna(VicunaOptions(pretrained=str(tmp_path)), BuildContext())
    assert str(tmp_path) in str(err.value)
    sizes = VicunaOptions(vocab_size=32000, tokenizer=str(sp_tokenizer_dir), **TINY_SIZES)
    with pytest.raises(ValueError, match="has 400 tokens .* has 32000 rows"):
        build_vicuna(sizes, BuildContext())
    tokenizer = GromaTokenizer.from_directory(sp_tokenizer_dir)
    with pytest.raises(ValueError, match="has 400 tokens .* has 410 rows"):
        CausalLMBackbone(make_tiny_llama(410), tokenizer)


def test_discovered_through_the_entry_point():
    manager = PluginManager(env={})
    entry = manager.get("language_backbone", "vicuna")
    assert entry.distribution == "groma-plugin-vicuna"
    assert entry.config is VicunaOptions
    backbone = entry.build(VicunaOptions(vocab_size=100, **TINY_SIZES), BuildContext())
    assert isinstance(backbone, CausalLMBackbone)
    assert "hf-causal-lm" in manager.names("language_backbone")
