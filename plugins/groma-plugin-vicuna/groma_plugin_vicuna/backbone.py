"""A Hugging Face causal LM with Groma's new tokens kept in two separate tables, as the reference keeps them.

The LLM's own vocabulary is never resized: ids below its size use its input embeddings and output head, the new
tokens (``[PAD]`` ... ``<r99>``) use ``new_input_embs`` and ``extra_lm_head``, and the logits are the LLM's followed by
the new tokens' (32000 + 114 = 32114 columns for Vicuna).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from transformers import PreTrainedModel

from groma_core import tokens as T
from groma_core.kv_cache import run_with_cache
from groma_core.prompt import GromaTokenizer, SentencePieceCodec
from groma_core.stages import BackboneOutput, LanguageBackbone

#: files that mark a directory as holding a tokenizer
TOKENIZER_FILES = (SentencePieceCodec.FILE, "tokenizer.json", "tokenizer_config.json")


def check_tokenizer(tokenizer: GromaTokenizer, base_vocab_size: int, num_new_tokens: int, source: str) -> None:
    """Raise a ValueError unless ``tokenizer`` puts its new tokens right after the LLM's ``base_vocab_size`` ids."""
    if tokenizer.offset != base_vocab_size:
        raise ValueError(
            f"{source}: the tokenizer's base vocabulary has {tokenizer.offset} tokens (its new tokens would start at "
            f"id {tokenizer.offset}) but the language model's embedding table has {base_vocab_size} rows; give the "
            "tokenizer that belongs to this model"
        )
    if len(tokenizer.new_tokens) != num_new_tokens:
        raise ValueError(
            f"{source}: the tokenizer has {len(tokenizer.new_tokens)} new tokens but the backbone {num_new_tokens}"
        )


def tokenizer_directory(tokenizer: str | None, pretrained: str | None) -> Path | None:
    """The directory to read the tokenizer from: ``tokenizer`` if given, else ``pretrained`` if it holds one."""
    if tokenizer is not None:
        path = Path(tokenizer)
        if not any((path / f).is_file() for f in TOKENIZER_FILES):
            raise FileNotFoundError(f"tokenizer: {str(path)!r} holds none of {', '.join(TOKENIZER_FILES)}")
        return path
    if pretrained is not None and any((Path(pretrained) / f).is_file() for f in TOKENIZER_FILES):
        return Path(pretrained)
    return None


def check_pretrained_directory(pretrained: str) -> Path:
    """``pretrained`` as a Path; a FileNotFoundError when it is not a model directory."""
    path = Path(pretrained)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"pretrained: {pretrained!r} is not a local model directory (no config.json)")
    return path


class CausalLMBackbone(LanguageBackbone):
    """A decoder-only causal LM (``llm``) plus Groma's new tokens in ``new_input_embs`` / ``extra_lm_head``.

    Call contract (see :class:`~groma_core.stages.LanguageBackbone`): ``embed(ids)`` maps ids below the LLM's
    vocabulary through its input embeddings and the others through ``new_input_embs[id - base]``;
    ``forward(inputs_embeds, attention_mask, position_ids, past_key_values, use_cache)`` returns the logits over
    base + new tokens, the final hidden states (after the last norm) and, with ``use_cache``, a transformers
    ``Cache`` to pass back with the next step's embeddings.
    """

    reference_prefixes = ("llm.", "new_input_embs.", "extra_lm_head.")

    def __init__(
        self,
        llm: PreTrainedModel,
        tokenizer: GromaTokenizer | None = None,
        num_new_tokens: int = T.NUM_NEW_TOKENS,
    ):
        super().__init__()
        if llm.config.is_encoder_decoder:
            raise ValueError(
                f"llm: {type(llm).__name__} is an encoder-decoder model; a decoder-only causal LM is needed"
            )
        for attribute in ("final_logit_softcapping", "logit_scale"):
            if getattr(llm.config, attribute, None) not in (None, 1.0):
                raise ValueError(
                    f"llm: {type(llm).__name__} post-processes its logits ({attribute}="
                    f"{getattr(llm.config, attribute)}), which this backbone does not reproduce"
                )
        self.llm = llm
        embed_tokens = llm.get_input_embeddings()
        lm_head = llm.get_output_embeddings()
        weight = embed_tokens.weight
        self.base_vocab_size: int = embed_tokens.num_embeddings
        self.num_new_tokens = num_new_tokens
        self.hidden_size = embed_tokens.embedding_dim
        self.vocab_size = self.base_vocab_size + num_new_tokens
        self.new_input_embs = nn.Embedding(num_new_tokens, self.hidden_size, device=weight.device, dtype=weight.dtype)
        self.extra_lm_head = nn.Linear(
            lm_head.in_features, num_new_tokens, bias=False, device=weight.device, dtype=weight.dtype
        )
        if tokenizer is not None:
            check_tokenizer(tokenizer, self.base_vocab_size, num_new_tokens, "tokenizer")
        self.tokenizer = tokenizer

    def reference_key(self, key: str) -> str | None:
        """Reference keys ``llm.*``, ``new_input_embs.*``, ``extra_lm_head.*`` are this module's keys unchanged."""
        return key if key.startswith(self.reference_prefixes) else None

    @torch.no_grad()
    def init_new_tokens_from_mean(self) -> None:
        """Set every new token's input embedding to the mean of the LLM's input embeddings (the reference's init)."""
        mean = self.llm.get_input_embeddings().weight.mean(dim=0, keepdim=True)
        self.new_input_embs.weight.copy_(mean.expand_as(self.new_input_embs.weight))

    def embed(self, ids: Tensor) -> Tensor:
        """Input embeddings (B, L, H) of token ids (B, L) over the base and the new vocabulary."""
        if ids.numel():
            low, high = (int(v) for v in torch.aminmax(ids))
            if low < 0 or high >= self.vocab_size:
                raise ValueError(f"ids: token ids must lie in [0, {self.vocab_size}), got values from {low} to {high}")
        is_new = ids >= self.base_vocab_size
        base = self.llm.get_input_embeddings()(ids.masked_fill(is_new, 0))
        new = self.new_input_embs((ids - self.base_vocab_size).clamp(min=0))
        return torch.where(is_new.unsqueeze(-1), new, base)

    def forward(
        self,
        inputs_embeds: Tensor,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        past_key_values: Any = None,
        use_cache: bool = False,
    ) -> BackboneOutput:
        """Logits (B, L, base + new), final hidden states (B, L, H) and the key/value cache (with ``use_cache``)."""
        if inputs_embeds.ndim != 3 or inputs_embeds.shape[-1] != self.hidden_size:
            raise ValueError(
                f"inputs_embeds: expected shape (B, L, {self.hidden_size}), got {tuple(inputs_embeds.shape)}"
            )
        if attention_mask is not None:
            past = past_key_values.get_seq_length() if past_key_values is not None else 0
            expected = (inputs_embeds.shape[0], past + inputs_embeds.shape[1])
            if tuple(attention_mask.shape) != expected:
                raise ValueError(
                    f"attention_mask: expected shape {expected} (batch, cached + new positions), "
                    f"got {tuple(attention_mask.shape)}"
                )
        out, cache = run_with_cache(
            self.llm.base_model,
            past_key_values,
            use_cache,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
        )
        hidden = out.last_hidden_state
        logits = torch.cat([self.llm.get_output_embeddings()(hidden), self.extra_lm_head(hidden)], dim=-1)
        return BackboneOutput(logits=logits, hidden_states=hidden, past_key_values=cache)
