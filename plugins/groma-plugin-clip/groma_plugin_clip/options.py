"""Options of the ``clip`` image tokenizer."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from groma_core.config import StageOptions

#: the architecture options, named as the CLIPVisionConfig attributes they set
SIZE_FIELDS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "patch_size",
    "image_size",
    "hidden_act",
    "layer_norm_eps",
)

#: OpenAI CLIP's normalization (also open_clip's default and CLIPImageProcessor's)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class ClipOptions(StageOptions):
    """A frozen CLIP vision tower (CLIP ViT-L/14 at 336 px by default) read at ``input_size`` pixels.

    The weights come from at most one source: ``pretrained`` (a transformers directory), ``open_clip_checkpoint``
    (an open_clip / OpenAI CLIP checkpoint file, converted), or ``open_clip_model`` (built by open_clip itself,
    where it imports). Size options set explicitly must agree with what the source holds. With no source, a
    randomly initialised tower of the given sizes is built (for converted Groma checkpoints and tests).
    """

    pretrained: str | None = Field(
        default=None,
        description="local directory of a CLIPVisionModel or CLIPModel (config.json + weights); None: see "
        "open_clip_checkpoint, or build from the sizes below",
    )
    open_clip_checkpoint: str | None = Field(
        default=None,
        description="open_clip or OpenAI CLIP checkpoint file (.pt/.bin/.safetensors, TorchScript included) whose "
        "ViT visual tower is converted to transformers names; heads, activation and eps come from the options",
    )
    open_clip_model: str | None = Field(
        default=None,
        description="open_clip model name (e.g. 'ViT-L-14-336'): open_clip builds it (with open_clip_checkpoint "
        "as its `pretrained`) and the whole architecture is read from it; needs open_clip importable",
    )
    hidden_size: int = Field(default=1024, gt=0, description="width C of the tower")
    intermediate_size: int = Field(default=4096, gt=0, description="width of the feed-forward layers")
    num_hidden_layers: int = Field(default=24, ge=4, description="number of transformer layers (the last 4 are read)")
    num_attention_heads: int = Field(default=16, gt=0, description="number of attention heads")
    patch_size: int = Field(default=14, gt=0, description="side of a square patch in pixels")
    image_size: int = Field(
        default=336,
        gt=0,
        description="pretraining resolution; fixes the position table at (image_size / patch_size)^2 + 1 rows",
    )
    hidden_act: Literal["quick_gelu", "gelu"] = Field(
        default="quick_gelu",
        description="activation: 'quick_gelu' (OpenAI CLIP, open_clip '-quickgelu' models) or 'gelu' (most "
        "LAION/DataComp open_clip models)",
    )
    layer_norm_eps: float = Field(default=1e-5, gt=0, description="epsilon of the LayerNorms")
    attn_implementation: Literal["sdpa", "eager"] = Field(
        default="sdpa", description="attention kernel of transformers: 'sdpa' or 'eager'"
    )
    input_size: int = Field(
        default=336,
        gt=0,
        description="side in pixels of the square tower input; the position table is interpolated (bicubic, by "
        "transformers) when it differs from image_size",
    )
    resize: Literal["square", "center-crop"] = Field(
        default="square",
        description="'square': bicubic resize to input_size x input_size without keeping the ratio (Groma's way: "
        "boxes stay valid); 'center-crop': CLIP's shortest side + centre crop (boxes then refer to the crop)",
    )
    image_mean: tuple[float, float, float] = Field(default=CLIP_MEAN, description="per-channel mean (RGB, 0..1)")
    image_std: tuple[float, float, float] = Field(default=CLIP_STD, description="per-channel std (RGB, 0..1)")
    token_layer: int = Field(
        default=-1, le=-1, description="encoder layer whose patch features become the image tokens (-1 = last)"
    )
    merge_tokens: bool = Field(
        default=True, description="concatenate each 2x2 patch neighbourhood into one token (4C wide, 4x fewer)"
    )
    frozen: bool = Field(default=True, description="no gradients: parameters frozen and forward run under no_grad")

    @model_validator(mode="after")
    def _consistent(self) -> ClipOptions:
        if self.pretrained is not None and (self.open_clip_checkpoint is not None or self.open_clip_model is not None):
            raise ValueError("pretrained and open_clip_checkpoint/open_clip_model are exclusive: give one source")
        if min(self.image_std) <= 0:
            raise ValueError(f"image_std must be positive, got {self.image_std}")
        if self.has_weight_source:
            return self  # the sizes come from the source: the stage checks them once it is built
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not divisible by num_attention_heads {self.num_attention_heads}"
            )
        if self.token_layer < -self.num_hidden_layers:
            raise ValueError(
                f"token_layer {self.token_layer} does not exist in a {self.num_hidden_layers}-layer encoder "
                f"(expected -{self.num_hidden_layers}..-1)"
            )
        return self

    @property
    def has_weight_source(self) -> bool:
        """Whether the tower's weights (and sizes) come from a directory, a checkpoint file or open_clip."""
        return any(v is not None for v in (self.pretrained, self.open_clip_checkpoint, self.open_clip_model))
