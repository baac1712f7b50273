"""Groma's Vicuna / LLaMA language backbone with the 114 new tokens (and any causal LM that transformers loads)."""

from groma_core.hookspecs import hookimpl
from groma_plugin_vicuna.backbone import CausalLMBackbone
from groma_plugin_vicuna.builders import build_causal_lm, build_vicuna, llama_config
from groma_plugin_vicuna.options import CausalLMOptions, VicunaOptions

__all__ = ["CausalLMBackbone", "CausalLMOptions", "VicunaOptions", "build_causal_lm", "build_vicuna", "llama_config"]


@hookimpl
def register_language_backbones(register):
    register(
        "vicuna",
        build_vicuna,
        config=VicunaOptions,
        description="Vicuna-7B v1.5 (LlamaForCausalLM) with Groma's 114 new tokens in separate tables",
    )
    register(
        "hf-causal-lm",
        build_causal_lm,
        config=CausalLMOptions,
        description="any decoder-only causal LM that transformers loads from a local directory, plus the new tokens",
    )
