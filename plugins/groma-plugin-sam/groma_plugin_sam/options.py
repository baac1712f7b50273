"""Options of the ``sam`` region proposer."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from groma_core.config import StageOptions

#: the size options; with ``pretrained`` they come from the checkpoint and an explicitly set one must agree
SIZE_FIELDS = (
    "image_size",
    "patch_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "mlp_dim",
    "window_size",
    "global_attn_indexes",
    "prompt_embed_dim",
    "decoder_num_hidden_layers",
    "decoder_num_attention_heads",
    "decoder_mlp_dim",
    "iou_head_hidden_dim",
)


class SamOptions(StageOptions):
    """Segment Anything's automatic mask generator as a class-agnostic proposer (SAM ViT-B sizes by default).

    The generation options carry the names and defaults of segment-anything's ``SamAutomaticMaskGenerator``.
    """

    pretrained: str | None = Field(
        default=None,
        description="an official segment-anything checkpoint file (e.g. sam_vit_b_01ec64.pth, keys image_encoder.*, "
        "prompt_encoder.*, mask_decoder.*) or a local directory of a saved transformers SamModel; None builds a "
        "randomly initialised SAM of the sizes below",
    )
    backend: Literal["transformers", "segment-anything"] = Field(
        default="transformers",
        description="'transformers' (SamModel, no torchvision needed) or 'segment-anything' (the official package's "
        "SamAutomaticMaskGenerator; needs segment_anything and a working torchvision)",
    )
    image_size: int = Field(
        default=1024, gt=0, description="side of the square SAM input; the longest image side is resized to it"
    )
    patch_size: int = Field(default=16, gt=0, description="ViT patch side in pixels")
    hidden_size: int = Field(default=768, gt=0, description="width of the ViT image encoder")
    num_hidden_layers: int = Field(default=12, gt=0, description="layers of the ViT image encoder")
    num_attention_heads: int = Field(default=12, gt=0, description="attention heads of the ViT image encoder")
    mlp_dim: int | None = Field(default=None, gt=0, description="feed-forward width of the ViT; None = 4 x hidden_size")
    window_size: int = Field(default=14, ge=0, description="side of the windows of the windowed-attention layers")
    global_attn_indexes: list[int] = Field(
        default=[2, 5, 8, 11], description="ViT layers with global (not windowed) attention"
    )
    prompt_embed_dim: int = Field(
        default=256, gt=0, description="width of the image embedding, the prompt encoder and the mask decoder"
    )
    decoder_num_hidden_layers: int = Field(
        default=2, gt=0, description="two-way transformer layers of the mask decoder"
    )
    decoder_num_attention_heads: int = Field(
        default=8, gt=0, description="attention heads of the mask decoder (not stored in a checkpoint: SAM uses 8)"
    )
    decoder_mlp_dim: int = Field(default=2048, gt=0, description="feed-forward width of the mask decoder")
    iou_head_hidden_dim: int = Field(default=256, gt=0, description="hidden width of the mask-quality (IoU) head")
    attn_implementation: Literal["sdpa", "eager"] = Field(
        default="sdpa", description="attention kernel of transformers: 'sdpa' or 'eager'"
    )
    segment_anything_layer_norm: bool = Field(
        default=True,
        description="mask-decoder LayerNorms with eps 1e-5 as segment-anything (transformers' SamMaskDecoderConfig "
        "says 1e-6)",
    )
    points_per_side: int = Field(
        default=32, gt=0, description="point prompts per image side (points_per_side^2 in all)"
    )
    points_per_batch: int = Field(default=64, gt=0, description="point prompts decoded together (memory vs speed)")
    pred_iou_thresh: float = Field(
        default=0.88, description="keep masks whose predicted IoU is strictly above this (0 or less: no filter)"
    )
    stability_score_thresh: float = Field(
        default=0.95, description="keep masks whose stability score is at least this (0 or less: no filter)"
    )
    stability_score_offset: float = Field(
        default=1.0, description="logit offset of the stability score: IoU of the masks at threshold +- offset"
    )
    mask_threshold: float = Field(default=0.0, description="a pixel belongs to a mask when its logit is above this")
    box_nms_thresh: float = Field(
        default=0.7, ge=0.0, le=1.0, description="NMS IoU threshold between the boxes of the masks of an image"
    )
    score: Literal["predicted-iou", "iou-times-stability"] = Field(
        default="predicted-iou",
        description="score of a proposal for Groma's selection: the predicted IoU, or predicted IoU x stability "
        "score (both clamped to [0, 1])",
    )
    box_convention: Literal["inclusive", "edges"] = Field(
        default="inclusive",
        description="'inclusive': segment-anything's boxes (first and last mask pixel indices, x2 = last column); "
        "'edges': pixel edges (x2 = last column + 1)",
    )
    return_masks: bool = Field(
        default=False,
        description="put each image's masks, (N, H, W) bool at the original resolution, in Proposals.extras['masks']",
    )

    @model_validator(mode="after")
    def _sizes_fit(self) -> SamOptions:
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not divisible by num_attention_heads {self.num_attention_heads}"
            )
        if self.prompt_embed_dim % 8:
            raise ValueError(f"prompt_embed_dim {self.prompt_embed_dim} must be a multiple of 8 (mask upscaling)")
        if (self.prompt_embed_dim // 2) % self.decoder_num_attention_heads:
            raise ValueError(
                f"prompt_embed_dim / 2 = {self.prompt_embed_dim // 2} (the decoder's cross-attention width) is not "
                f"divisible by decoder_num_attention_heads {self.decoder_num_attention_heads}"
            )
        bad = [i for i in self.global_attn_indexes if not 0 <= i < self.num_hidden_layers]
        if bad:
            raise ValueError(f"global_attn_indexes {bad} are not layers of a {self.num_hidden_layers}-layer encoder")
        return self
