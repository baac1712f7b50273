"""Groma's Vicuna / LLaMA language backbone with the 114 new tokens (and any causal LM that transformers loads).

Loading the plugin imports only its options; transformers is imported when a stage is built or a name below is used.
"""

from groma_core.hookspecs import hookimpl
from groma_core.plugins import lazy_exports, lazy_factory
from groma_plugin_vicuna.options import CausalLMOptions, VicunaOptions

__all__ = ["CausalLMBackbone", "CausalLMOptions", "VicunaOptions", "build_causal_lm", "build_vicuna", "llama_config"]

__getattr__ = lazy_exports(
    __name__,
    {"CausalLMBackbone": ".backbone", "build_causal_lm": ".builders", "build_vicuna": ".builders",
     "llama_config": ".builders"},
)  # fmt: skip


@hookimpl
def register_language_backbones(register):
    register(
        "vicuna",
        lazy_factory("groma_plugin_vicuna.builders:build_vicuna"),
        config=VicunaOptions,
        description="Vicuna-7B v1.5 (LlamaForCausalLM) with Groma's 114 new tokens in separate tables",
    )
    register(
        "hf-causal-lm",
        lazy_factory("groma_plugin_vicuna.builders:build_causal_lm"),
        config=CausalLMOptions,
        description="any decoder-only causal LM that transformers loads from a local directory, plus the new tokens",
    )
