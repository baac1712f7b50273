"""The same backbone class registered as ``hf-causal-lm`` works for other decoder-only architectures."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from groma_plugin_vicuna import CausalLMBackbone, CausalLMOptions, VicunaOptions
from pydantic import ValidationError
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedModel, Qwen2Config, Qwen2ForCausalLM

from groma_core.plugins import PluginManager
from groma_core.stages import BuildContext

PROMPT = "Locate the man in a red shirt"
HF_TOKENIZER_TEXT = [
    "Locate the man in a red shirt in the image.",
    "A dog runs on the grass next to a small red car.",
    "Which region matches the description of a cat sleeping on a sofa?",
]


def save_hf_tokenizer(directory: Path) -> int:
    """Train a small byte-level BPE tokenizer, save it as Hugging Face files, return its vocabulary size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    backend.train_from_iterator(HF_TOKENIZER_TEXT * 5, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    tokenizer.save_pretrained(str(directory))
    return len(tokenizer)


def qwen2_with_sentencepiece(directory: Path, sp_tokenizer_dir: Path) -> PreTrainedModel:
    torch.manual_seed(1)
    config = Qwen2Config(
        vocab_size=400,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
    )
    model = Qwen2ForCausalLM(config).eval()
    model.save_pretrained(directory)
    (directory / "tokenizer.model").write_bytes((sp_tokenizer_dir / "tokenizer.model").read_bytes())
    return model


def gpt2_with_hf_tokenizer(directory: Path, sp_tokenizer_dir: Path) -> PreTrainedModel:
    vocab = save_hf_tokenizer(directory)
    torch.manual_seed(2)
    config = GPT2Config(
        vocab_size=vocab, n_embd=32, n_layer=2, n_head=4, n_positions=256, bos_token_id=1, eos_token_id=2
    )
    model = GPT2LMHeadModel(config).eval()
    model.save_pretrained(directory)
    return model


@pytest.fixture(scope="module")
def manager() -> PluginManager:
    return PluginManager(env={})


@pytest.mark.parametrize("make_model", [qwen2_with_sentencepiece, gpt2_with_hf_tokenizer], ids=["qwen2", "gpt2"])
def test_other_architectures_load_and_generate(make_model, manager, sp_tokenizer_dir, tmp_path):
    original = make_model(tmp_path, sp_tokenizer_dir)
    base = original.get_input_embeddings().num_embeddings
    backbone = manager.get("language_backbone", "hf-causal-lm").build(
        CausalLMOptions(pretrained=str(tmp_path)), BuildContext()
    )
    assert isinstance(backbone, CausalLMBackbone)
    assert type(backbone.llm) is type(original)
    assert backbone.tokenizer.offset == backbone.base_vocab_size == base
    assert backbone.vocab_size == base + 114
    assert backbone.tokenizer.token_id("<p>") == base + 6
    mean = original.get_input_embeddings().weight.mean(0)
    torch.testing.assert_close(backbone.new_input_embs.weight, mean.expand(114, -1), rtol=0, atol=1e-7)

    ids = torch.tensor([backbone.tokenizer.encode(PROMPT)])
    assert (ids < base).all()
    with torch.no_grad():
        out = backbone(backbone.embed(ids), attention_mask=torch.ones_like(ids), use_cache=True)
        torch.testing.assert_close(out.logits[..., :base], original(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
        ids = torch.cat([ids, torch.tensor([[backbone.tokenizer.token_id("<p>")]])], 1)
        out = backbone(
            backbone.embed(ids[:, -1:]),
            attention_mask=torch.ones_like(ids),
            position_ids=torch.tensor([[ids.shape[1] - 1]]),
            past_key_values=out.past_key_values,
            use_cache=True,
        )
        for _ in range(3):
            full = backbone(backbone.embed(ids), attention_mask=torch.ones_like(ids))
            torch.testing.assert_close(out.logits[:, -1], full.logits[:, -1], rtol=1e-5, atol=1e-5)
            next_id = out.logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, next_id], 1)
            out = backbone(
                backbone.embed(next_id),
                attention_mask=torch.ones_like(ids),
                position_ids=torch.tensor([[ids.shape[1] - 1]]),
                past_key_values=out.past_key_values,
                use_cache=True,
            )


def test_vicuna_refuses_another_architecture(manager, sp_tokenizer_dir, tmp_path):
    qwen2_with_sentencepiece(tmp_path, sp_tokenizer_dir)
    with pytest.raises(ValueError, match="holds a 'qwen2' model; the vicuna backbone needs 'llama'"):
        manager.get("language_backbone", "vicuna").build(VicunaOptions(pretrained=str(tmp_path)), BuildContext())


def test_hf_causal_lm_needs_a_pretrained_directory(manager):
    assert manager.get("language_backbone", "hf-causal-lm").config is CausalLMOptions
    with pytest.raises(ValidationError, match="pretrained"):
        CausalLMOptions()
