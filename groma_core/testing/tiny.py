"""Small, real stage implementations for tests and for the contract kit: a conv image tokenizer, a RoI-pooling
region encoder and a tiny LLaMA backbone with a SentencePiece tokenizer trained on the spot.

Register them with ``manager.register_plugin(groma_core.testing.tiny, name="tiny", distribution="groma-core")``;
they are not auto-loaded.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from groma_core.config import StageOptions
from groma_core.hookspecs import hookimpl
from groma_core.kv_cache import run_with_cache
from groma_core.prompt import GromaTokenizer, SentencePieceCodec
from groma_core.prompt import make_sentencepiece as _make_sentencepiece
from groma_core.stages import (
    BackboneOutput,
    ImageTokenizer,
    LanguageBackbone,
    RegionEncoder,
    RegionProposer,
)
from groma_core.types import ImageFeatures, Proposals

LEVELS = ("last-3", "last-2", "last-1", "last")
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


class TinyConvOptions(StageOptions):
    image_size: int = Field(64, ge=8, description="input side in pixels")
    patch_size: int = Field(8, ge=1, description="stride of the patchifying convolution")
    channels: int = Field(16, ge=4, description="feature channels")


class TinyConvTokenizer(ImageTokenizer):
    """Patchify conv + 4 conv blocks; publishes the 4 block outputs as levels and the last one as tokens."""

    def __init__(self, image_size: int = 64, patch_size: int = 8, channels: int = 16):
        super().__init__()
        self.image_size = (image_size, image_size)
        grid = image_size // patch_size
        self.patch = nn.Conv2d(3, channels, patch_size, stride=patch_size)
        self.blocks = nn.ModuleList(nn.Conv2d(channels, channels, 3, padding=1) for _ in LEVELS)
        self.token_dim = channels
        self.num_tokens = grid * grid
        self.level_channels = {name: channels for name in LEVELS}
        self.level_sizes = {name: (grid, grid) for name in LEVELS}

    def preprocess(self, images: Sequence[Any]) -> Tensor:
        if len(images) == 0:
            raise ValueError("preprocess: no images given")
        side = self.image_size[0]
        out = []
        for img in images:
            arr = torch.from_numpy(np.asarray(img.convert("RGB").resize((side, side)), dtype=np.float32).copy())
            x = arr.permute(2, 0, 1) / 255.0
            out.append((x - torch.tensor(MEAN)[:, None, None]) / torch.tensor(STD)[:, None, None])
        return torch.stack(out)

    def forward(self, pixel_values: Tensor) -> ImageFeatures:
        x = self.patch(pixel_values)
        levels = {}
        for name, block in zip(LEVELS, self.blocks):
            x = x + F.gelu(block(x))
            levels[name] = x
        return ImageFeatures(tokens=x.flatten(2).transpose(1, 2), levels=levels)


class GridOptions(StageOptions):
    cells: int = Field(2, ge=1, description="the image is split into cells x cells boxes")


class GridProposer(RegionProposer):
    """Proposes the cells of a regular grid, scored by the mean activation of the last level (a real, if naive,
    proposer)."""

    def __init__(self, cells: int = 2):
        super().__init__()
        self.cells = cells

    def forward(self, features: ImageFeatures) -> Proposals:
        fmap = features.level("last")
        n = self.cells
        ticks = torch.linspace(0, 1, n + 1, device=fmap.device)
        boxes = torch.stack(
            [torch.stack([ticks[j], ticks[i], ticks[j + 1], ticks[i + 1]]) for i in range(n) for j in range(n)]
        )
        pooled = F.adaptive_avg_pool2d(fmap.float().abs().mean(1, keepdim=True), n).flatten(1)
        scores = torch.sigmoid(pooled)
        return Proposals([boxes.clone() for _ in range(fmap.shape[0])], list(scores))


class RoIPoolOptions(StageOptions):
    level: str = Field("last", description="feature level to pool from")
    pool_size: int = Field(2, ge=1, description="bilinear samples per side inside each box")


class RoIPoolEncoder(RegionEncoder):
    """Bilinear sampling of a pool_size x pool_size grid inside each box, flattened and projected."""

    def __init__(self, channels: int, hidden_size: int, level: str = "last", pool_size: int = 2):
        super().__init__()
        self.level_name = level
        self.pool_size = pool_size
        self.hidden_size = hidden_size
        self.proj = nn.Linear(channels * pool_size * pool_size + 4, hidden_size)

    def forward(self, features: ImageFeatures, regions: list[Tensor]) -> list[Tensor]:
        fmap = features.level(self.level_name)
        out = []
        k = self.pool_size
        steps = (torch.arange(k, device=fmap.device, dtype=fmap.dtype) + 0.5) / k
        for i, boxes in enumerate(regions):
            if boxes.shape[0] == 0:
                out.append(fmap.new_zeros(0, self.hidden_size))
                continue
            b = boxes.to(fmap.dtype)
            xs = b[:, 0:1] + (b[:, 2:3] - b[:, 0:1]) * steps  # (N, k)
            ys = b[:, 1:2] + (b[:, 3:4] - b[:, 1:2]) * steps
            grid = torch.stack(torch.broadcast_tensors(xs[:, None, :], ys[:, :, None]), dim=-1) * 2 - 1
            sampled = F.grid_sample(
                fmap[i : i + 1].expand(b.shape[0], -1, -1, -1), grid, align_corners=False
            )  # (N, C, k, k)
            out.append(self.proj(torch.cat([sampled.flatten(1), b], dim=1)))
        return out


class TinyLlamaOptions(StageOptions):
    tokenizer: str = Field(..., description="directory holding tokenizer.model (SentencePiece)")
    hidden_size: int = Field(32, description="model width")
    num_hidden_layers: int = Field(2, description="decoder layers")
    num_attention_heads: int = Field(4, description="attention heads")


class TinyLlamaBackbone(LanguageBackbone):
    """``LlamaForCausalLM`` with Groma's new tokens as an extra embedding table and output head."""

    def __init__(self, tokenizer: GromaTokenizer, hidden_size: int = 32, layers: int = 2, heads: int = 4):
        super().__init__()
        from transformers import LlamaConfig, LlamaForCausalLM

        base = tokenizer.offset
        config = LlamaConfig(
            vocab_size=base,
            hidden_size=hidden_size,
            intermediate_size=2 * hidden_size,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=heads,
            max_position_embeddings=2048,
            bos_token_id=tokenizer.bos_id,
            eos_token_id=tokenizer.eos_id,
            pad_token_id=0,
        )
        self.llm = LlamaForCausalLM(config)
        self.new_input_embs = nn.Embedding(len(tokenizer.new_tokens), hidden_size)
        self.extra_lm_head = nn.Linear(hidden_size, len(tokenizer.new_tokens), bias=False)
        self.tokenizer = tokenizer
        self.hidden_size = hidden_size
        self.vocab_size = tokenizer.vocab_size
        self.base_vocab = base

    def embed(self, ids: Tensor) -> Tensor:
        base = self.llm.get_input_embeddings()(ids.clamp(max=self.base_vocab - 1))
        new = self.new_input_embs((ids - self.base_vocab).clamp(min=0))
        return torch.where((ids >= self.base_vocab)[..., None], new, base)

    def forward(
        self,
        inputs_embeds: Tensor,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        past_key_values: Any = None,
        use_cache: bool = False,
    ) -> BackboneOutput:
        out, cache = run_with_cache(
            self.llm.model,
            past_key_values,
            use_cache,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
        )
        h = out.last_hidden_state
        logits = torch.cat([self.llm.lm_head(h), self.extra_lm_head(h)], dim=-1)
        return BackboneOutput(logits, h, cache)


TRAINING_TEXT = """a red circle and a blue square on a white background
the man in a red shirt stands next to a green tree
locate the small yellow triangle in the image
there is a large black dog under the wooden table
a chat between a curious user and an artificial intelligence assistant
the assistant gives helpful detailed and polite answers to the user's questions
here is an image with region crops from it image regions
thank you for the image how can i assist you with it
what is this describe the region in details please briefly
give me a concise description of the image where is it
"""


def make_sentencepiece(directory: str | Path, vocab_size: int = 400, text: str = TRAINING_TEXT, **kwargs: Any) -> Path:
    """:func:`groma_core.prompt.make_sentencepiece` on :data:`TRAINING_TEXT` by default."""
    return _make_sentencepiece(directory, vocab_size, text, **kwargs)


# -- registration --------------------------------------------------------------------------------------------
@hookimpl
def register_image_tokenizers(register):
    register(
        "tiny-conv",
        lambda o, ctx: TinyConvTokenizer(o.image_size, o.patch_size, o.channels),
        config=TinyConvOptions,
        description="tiny conv tokenizer for tests",
    )


@hookimpl
def register_region_proposers(register):
    register("grid", lambda o, ctx: GridProposer(o.cells), config=GridOptions, description="regular grid of boxes")


@hookimpl
def register_region_encoders(register):
    register(
        "roi-pool",
        lambda o, ctx: RoIPoolEncoder(ctx.level_channels[o.level], ctx.hidden_size, o.level, o.pool_size),
        config=RoIPoolOptions,
        description="bilinear RoI pooling for tests",
    )


@hookimpl
def register_language_backbones(register):
    register(
        "tiny-llama",
        lambda o, ctx: TinyLlamaBackbone(
            GromaTokenizer(SentencePieceCodec(Path(o.tokenizer) / "tokenizer.model")),
            o.hidden_size,
            o.num_hidden_layers,
            o.num_attention_heads,
        ),
        config=TinyLlamaOptions,
        description="tiny LLaMA for tests",
    )


__all__ = [
    "GridProposer",
    "RoIPoolEncoder",
    "TinyConvTokenizer",
    "TinyLlamaBackbone",
    "make_sentencepiece",
    "recipe_dict",
]


def recipe_dict(tokenizer) -> dict:
    """The recipe of the test plugins' tiny pipeline (tokenizer: a SentencePiece directory)."""
    return {
        "name": "tiny",
        "image_tokenizer": {"plugin": "tiny-conv", "image_size": 64, "patch_size": 8, "channels": 16},
        "region_proposer": {"plugin": "grid", "cells": 3},
        "region_encoder": {"plugin": "roi-pool"},
        "language_backbone": {"plugin": "tiny-llama", "tokenizer": str(tokenizer)},
        "region_selection": {"score_threshold": 0.0},
    }
