"""Factories of the ``vicuna`` and ``hf-causal-lm`` backbones (``factory(options, context)``)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, PreTrainedModel

from groma_core import tokens as T
from groma_core.prompt import GromaTokenizer
from groma_core.stages import BuildContext
from groma_plugin_vicuna.backbone import (
    CausalLMBackbone,
    check_pretrained_directory,
    check_tokenizer,
    tokenizer_directory,
)
from groma_plugin_vicuna.options import CausalLMOptions, VicunaOptions


def llama_config(options: VicunaOptions) -> LlamaConfig:
    """The ``LlamaConfig`` of the size options (Vicuna's special ids: pad 0, bos 1, eos 2; untied head)."""
    return LlamaConfig(
        vocab_size=options.vocab_size,
        hidden_size=options.hidden_size,
        intermediate_size=options.intermediate_size,
        num_hidden_layers=options.num_hidden_layers,
        num_attention_heads=options.num_attention_heads,
        num_key_value_heads=options.num_key_value_heads,
        hidden_act="silu",
        max_position_embeddings=options.max_position_embeddings,
        rms_norm_eps=options.rms_norm_eps,
        rope_theta=options.rope_theta,
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        attn_implementation=options.attn_implementation,
    )


def _load_tokenizer(directory: Path | None, base_vocab_size: int) -> GromaTokenizer | None:
    if directory is None:
        return None
    tokenizer = GromaTokenizer.from_directory(directory)
    check_tokenizer(tokenizer, base_vocab_size, T.NUM_NEW_TOKENS, f"tokenizer {str(directory)!r}")
    return tokenizer


def build_vicuna(options: VicunaOptions, context: BuildContext) -> CausalLMBackbone:
    """Vicuna / LLaMA from a local directory (new tokens start at the mean embedding) or from the size options."""
    if options.pretrained is None:
        tokenizer = _load_tokenizer(tokenizer_directory(options.tokenizer, None), options.vocab_size)
        return CausalLMBackbone(LlamaForCausalLM(llama_config(options)), tokenizer)
    path = check_pretrained_directory(options.pretrained)
    model_type = json.loads((path / "config.json").read_text()).get("model_type")
    if model_type != "llama":
        raise ValueError(
            f"pretrained: {options.pretrained!r} holds a {model_type!r} model; the vicuna backbone needs 'llama' "
            "(use the hf-causal-lm backbone for other architectures)"
        )
    llm = LlamaForCausalLM.from_pretrained(
        str(path),
        local_files_only=True,
        attn_implementation=options.attn_implementation,
        dtype=torch.get_default_dtype(),
    )
    return _with_new_tokens(llm, options.tokenizer, options.pretrained)


def build_causal_lm(options: CausalLMOptions, context: BuildContext) -> CausalLMBackbone:
    """Any decoder-only causal LM that ``AutoModelForCausalLM`` loads from a local directory."""
    path = check_pretrained_directory(options.pretrained)
    llm = AutoModelForCausalLM.from_pretrained(
        str(path),
        local_files_only=True,
        attn_implementation=options.attn_implementation,
        dtype=torch.get_default_dtype(),
    )
    return _with_new_tokens(llm, options.tokenizer, options.pretrained)


def _with_new_tokens(llm: PreTrainedModel, tokenizer: str | None, pretrained: str) -> CausalLMBackbone:
    tok = _load_tokenizer(tokenizer_directory(tokenizer, pretrained), llm.get_input_embeddings().num_embeddings)
    backbone = CausalLMBackbone(llm, tok)
    backbone.init_new_tokens_from_mean()
    return backbone
