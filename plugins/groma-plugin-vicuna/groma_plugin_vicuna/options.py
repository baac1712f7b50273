"""Options of the ``vicuna`` and ``hf-causal-lm`` language backbones."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from groma_core import tokens as T
from groma_core.config import StageOptions

AttnImplementation = Literal["sdpa", "eager"]


class VicunaOptions(StageOptions):
    """A LLaMA-architecture causal LM (Vicuna-7B v1.5 sizes by default) plus Groma's 114 new tokens.

    With ``pretrained`` the model and its sizes come from that local directory and the size options are ignored;
    without it a randomly initialised model of the given sizes is built (for converted checkpoints and tests).
    """

    pretrained: str | None = Field(
        default=None,
        description="local directory of a LlamaForCausalLM (config.json + weights); None builds from the sizes below",
    )
    tokenizer: str | None = Field(
        default=None,
        description="directory with tokenizer.model or Hugging Face tokenizer files; default: `pretrained` when it "
        "holds one, else no tokenizer",
    )
    attn_implementation: AttnImplementation = Field(
        default="sdpa", description="attention kernel of transformers: 'sdpa' or 'eager'"
    )
    hidden_size: int = Field(default=4096, gt=0, description="width of the language model (H)")
    intermediate_size: int = Field(default=11008, gt=0, description="width of the SwiGLU feed-forward layer")
    num_hidden_layers: int = Field(default=32, gt=0, description="number of decoder layers")
    num_attention_heads: int = Field(default=32, gt=0, description="number of attention heads")
    num_key_value_heads: int = Field(
        default=32, gt=0, description="number of key/value heads (grouped-query attention)"
    )
    vocab_size: int = Field(default=32000, gt=0, description="base vocabulary of the LLM, before Groma's new tokens")
    max_position_embeddings: int = Field(default=4096, gt=0, description="longest sequence the rotary table covers")
    rms_norm_eps: float = Field(default=1e-5, gt=0, description="epsilon of the RMSNorm layers")
    rope_theta: float = Field(default=10000.0, gt=0, description="base of the rotary position embedding")

    @model_validator(mode="after")
    def _heads_divide(self) -> VicunaOptions:
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not divisible by num_attention_heads {self.num_attention_heads}"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads {self.num_attention_heads} is not divisible by "
                f"num_key_value_heads {self.num_key_value_heads}"
            )
        return self

    @classmethod
    def from_reference_config(cls, groma_config: dict[str, Any]) -> VicunaOptions:
        """Options equal to the reference ``GromaConfig.to_dict()``'s ``llm_cfg`` (sizes only, no pretrained dir)."""
        num_new = groma_config.get("num_new_token", T.NUM_NEW_TOKENS)
        if num_new != T.NUM_NEW_TOKENS:
            raise ValueError(
                f"groma config num_new_token is {num_new}; this backbone has {T.NUM_NEW_TOKENS} new tokens"
            )
        llm = groma_config["llm_cfg"]
        model_type = llm.get("model_type", "llama")
        if model_type != "llama":
            raise ValueError(f"groma config llm_cfg.model_type is {model_type!r}; the vicuna backbone needs 'llama'")
        unsupported = {
            "rope_scaling": (llm.get("rope_scaling"), None),
            "hidden_act": (llm.get("hidden_act", "silu"), "silu"),
            "tie_word_embeddings": (llm.get("tie_word_embeddings", False), False),
            "attention_bias": (llm.get("attention_bias", False), False),
        }
        for key, (value, supported) in unsupported.items():
            if value != supported:
                raise ValueError(f"groma config llm_cfg.{key} is {value!r}; only {supported!r} is supported")
        heads = llm["num_attention_heads"]
        return cls(
            hidden_size=llm["hidden_size"],
            intermediate_size=llm["intermediate_size"],
            num_hidden_layers=llm["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=llm.get("num_key_value_heads") or heads,
            vocab_size=llm["vocab_size"],
            max_position_embeddings=llm["max_position_embeddings"],
            rms_norm_eps=llm["rms_norm_eps"],
            rope_theta=llm.get("rope_theta", 10000.0),
        )


class CausalLMOptions(StageOptions):
    """Any decoder-only causal LM that ``transformers.AutoModelForCausalLM`` loads from a local directory."""

    pretrained: str = Field(description="local directory of the causal LM (config.json + weights); required")
    tokenizer: str | None = Field(
        default=None,
        description="directory with tokenizer.model or Hugging Face tokenizer files; default: `pretrained` when it "
        "holds one, else no tokenizer",
    )
    attn_implementation: AttnImplementation = Field(
        default="sdpa", description="attention kernel of transformers: 'sdpa' or 'eager'"
    )
