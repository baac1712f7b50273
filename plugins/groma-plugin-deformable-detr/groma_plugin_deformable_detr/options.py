"""Options of the ``deformable-detr`` region proposer."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from groma_core.config import StageOptions

#: ``DeformableDetrConfig`` defaults of transformers 4.32 (the reference saves its config as a diff against them)
REFERENCE_DEFAULTS: dict[str, Any] = {
    "d_model": 256,
    "encoder_layers": 6,
    "decoder_layers": 6,
    "encoder_attention_heads": 8,
    "decoder_attention_heads": 8,
    "encoder_n_points": 4,
    "decoder_n_points": 4,
    "encoder_ffn_dim": 1024,
    "decoder_ffn_dim": 1024,
    "dropout": 0.1,
    "attention_dropout": 0.0,
    "activation_dropout": 0.0,
    "activation_function": "relu",
    "num_queries": 300,
    "two_stage_num_proposals": 300,
    "num_feature_levels": 4,
    "two_stage": False,
    "with_box_refine": False,
    "position_embedding_type": "sine",
}

#: reference settings this proposer reproduces; any other value is rejected by ``from_reference_config``
_REQUIRED = {
    "num_feature_levels": 1,
    "two_stage": True,
    "with_box_refine": True,
    "activation_function": "relu",
    "attention_dropout": 0.0,
    "activation_dropout": 0.0,
    "position_embedding_type": "sine",
}


class ScoreExponents(BaseModel):
    """Exponents of the fused objectness score ``sigmoid(coco) ** coco * sigmoid(sa1b) ** sa1b``."""

    model_config = ConfigDict(extra="forbid")

    coco: float = Field(default=0.4, ge=0.0, description="exponent of the COCO-trained objectness head")
    sa1b: float = Field(default=0.6, ge=0.0, description="exponent of the SA-1B-trained objectness head")


class DeformableDetrOptions(StageOptions):
    """Groma's class-agnostic two-stage Deformable DETR (released sizes by default)."""

    in_levels: list[str] = Field(
        default=["last-3", "last-2", "last-1", "last"],
        min_length=1,
        description="image-feature levels fused into the single input map (all of the same shape)",
    )
    level_fusion: Literal["mean"] = Field(default="mean", description="how the input levels are fused: their mean")
    d_model: int = Field(default=256, gt=0, description="width of the transformer")
    encoder_layers: int = Field(default=6, gt=0, description="number of deformable encoder layers")
    decoder_layers: int = Field(default=6, gt=0, description="number of decoder layers")
    encoder_attention_heads: int = Field(default=8, gt=0, description="heads of the encoder deformable attention")
    decoder_attention_heads: int = Field(default=8, gt=0, description="heads of the decoder self/cross attention")
    encoder_n_points: int = Field(default=4, gt=0, description="sampling points per head in the encoder")
    decoder_n_points: int = Field(default=4, gt=0, description="sampling points per head in the decoder")
    encoder_ffn_dim: int = Field(default=1024, gt=0, description="hidden width of the encoder feed-forward layers")
    decoder_ffn_dim: int = Field(default=1024, gt=0, description="hidden width of the decoder feed-forward layers")
    dropout: float = Field(default=0.1, ge=0.0, lt=1.0, description="dropout of the residual branches (training)")
    num_queries: int = Field(default=300, gt=0, description="encoder proposals kept as decoder queries (top-k)")
    box_head_hidden: int = Field(default=256, gt=0, description="hidden width of the box MLP heads")
    score_exponents: ScoreExponents = Field(
        default_factory=ScoreExponents, description="exponents of the fused score of the two objectness heads"
    )
    clip_boxes: bool = Field(
        default=False,
        description="clamp the proposed corners to [0, 1]; the reference does not (its NMS sees unclipped boxes)",
    )
    attention_impl: Literal["pytorch"] = Field(
        default="pytorch", description="deformable attention implementation: 'pytorch' (grid_sample)"
    )
    frozen: bool = Field(
        default=True,
        description="no gradients: parameters frozen and forward under no_grad (Groma stages 2-3); false to train",
    )

    @model_validator(mode="after")
    def _heads_divide(self) -> DeformableDetrOptions:
        for what in ("encoder_attention_heads", "decoder_attention_heads"):
            heads = getattr(self, what)
            if self.d_model % heads:
                raise ValueError(f"d_model {self.d_model} is not divisible by {what} {heads}")
        if self.d_model % 2:
            raise ValueError(f"d_model must be even (sine position features), got {self.d_model}")
        return self

    @classmethod
    def from_reference_config(cls, groma_config: dict[str, Any]) -> DeformableDetrOptions:
        """Options equal to the reference ``GromaConfig.to_dict()``'s ``perceiver_cfg.ddetr_cfg``."""
        given = groma_config["perceiver_cfg"].get("ddetr_cfg") or {}
        cfg = {**REFERENCE_DEFAULTS, **given}
        for key, supported in _REQUIRED.items():
            if cfg[key] != supported:
                raise ValueError(
                    f"groma config perceiver_cfg.ddetr_cfg.{key} is {cfg[key]!r}; this proposer needs {supported!r}"
                )
        num_labels = len(cfg["id2label"]) if cfg.get("id2label") else cfg.get("num_labels", 2)
        if num_labels != 1:
            raise ValueError(
                f"groma config perceiver_cfg.ddetr_cfg has {num_labels} labels; the proposer is class-agnostic (1)"
            )
        if cfg["two_stage_num_proposals"] != cfg["num_queries"]:
            raise ValueError(
                f"groma config perceiver_cfg.ddetr_cfg: two_stage_num_proposals {cfg['two_stage_num_proposals']} "
                f"must equal num_queries {cfg['num_queries']} (one learned content query per proposal)"
            )
        names = (
            "d_model",
            "encoder_layers",
            "decoder_layers",
            "encoder_attention_heads",
            "decoder_attention_heads",
            "encoder_n_points",
            "decoder_n_points",
            "encoder_ffn_dim",
            "decoder_ffn_dim",
            "dropout",
            "num_queries",
        )
        return cls(**{name: cfg[name] for name in names})
