"""Options of the ``dinov2`` image tokenizer."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from groma_core.config import StageOptions

#: the size options, named as the Dinov2Config attributes they set
SIZE_FIELDS = (
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "mlp_ratio",
    "patch_size",
    "image_size",
    "layerscale_value",
    "layer_norm_eps",
    "qkv_bias",
    "use_swiglu_ffn",
)


class Dinov2Options(StageOptions):
    """A frozen DINOv2 encoder (DINOv2-L/14 sizes by default) read at ``input_size`` pixels.

    With ``pretrained`` the encoder and its sizes come from that local directory; size options that are set
    explicitly must then agree with the directory's config. Without it a randomly initialised encoder of the given
    sizes is built (for converted checkpoints and tests).
    """

    pretrained: str | None = Field(
        default=None,
        description="local directory of a Dinov2Model (config.json + weights); None builds from the sizes below",
    )
    hidden_size: int = Field(default=1024, gt=0, description="width C of the encoder")
    num_hidden_layers: int = Field(default=24, ge=4, description="number of transformer layers (the last 4 are read)")
    num_attention_heads: int = Field(default=16, gt=0, description="number of attention heads")
    mlp_ratio: int = Field(default=4, gt=0, description="feed-forward width as a multiple of hidden_size")
    patch_size: int = Field(default=14, gt=0, description="side of a square patch in pixels")
    image_size: int = Field(
        default=518,
        gt=0,
        description="pretraining resolution; fixes the position table at (image_size / patch_size)^2 + 1 rows",
    )
    layerscale_value: float = Field(default=1.0, description="initial value of the layer-scale factors")
    layer_norm_eps: float = Field(default=1e-6, gt=0, description="epsilon of the LayerNorms")
    qkv_bias: bool = Field(default=True, description="bias on the query/key/value projections")
    use_swiglu_ffn: bool = Field(default=False, description="SwiGLU feed-forward instead of the GELU MLP")
    attn_implementation: Literal["sdpa", "eager"] = Field(
        default="sdpa", description="attention kernel of transformers: 'sdpa' or 'eager'"
    )
    input_size: int = Field(default=448, gt=0, description="side in pixels of the square encoder input")
    resize: Literal["pil-bicubic", "bilinear"] = Field(
        default="pil-bicubic",
        description="preprocessing: 'pil-bicubic' (reference inference path) or 'bilinear' (the reference's "
        "mmdet/cv2 evaluation path)",
    )
    letterbox: bool = Field(
        default=False,
        description="keep the aspect ratio: scale the longer side to input_size and pad the rest (boxes stay "
        "normalized to the original image); false fills the square as the reference does",
    )
    position_interpolation: Literal["transformers-4.32", "installed"] = Field(
        default="transformers-4.32",
        description="position-embedding resize: the reference's transformers-4.32 formula, or the installed "
        "transformers' own",
    )
    token_layer: int = Field(
        default=-1, le=-1, description="encoder layer whose patch features become the image tokens (-1 = last)"
    )
    merge_tokens: bool = Field(
        default=True, description="concatenate each 2x2 patch neighbourhood into one token (4C wide, 4x fewer)"
    )
    frozen: bool = Field(default=True, description="no gradients: parameters frozen and forward run under no_grad")
    pixel_level_stride: int = Field(
        default=0,
        ge=0,
        description="0 (the reference): only the encoder's levels; N > 0 also publishes a level 'pixels', the "
        "input through a small trained stem (N x N patches -> hidden_size, GELU, 1x1 conv) at stride N, so a "
        "region encoder can pool details finer than a patch",
    )

    @model_validator(mode="after")
    def _sizes_fit(self) -> Dinov2Options:
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not divisible by num_attention_heads {self.num_attention_heads}"
            )
        if self.pixel_level_stride and self.input_size % self.pixel_level_stride:
            raise ValueError(
                f"pixel_level_stride {self.pixel_level_stride} does not divide input_size {self.input_size}"
            )
        if self.pretrained is None and self.token_layer < -self.num_hidden_layers:
            raise ValueError(
                f"token_layer {self.token_layer} does not exist in a {self.num_hidden_layers}-layer encoder "
                f"(expected -{self.num_hidden_layers}..-1)"
            )
        return self

    @classmethod
    def from_reference_config(cls, groma_config: dict[str, Any]) -> Dinov2Options:
        """Options equal to the reference ``GromaConfig.to_dict()``'s ``perceiver_cfg.vis_encoder_cfg`` (sizes only,
        no pretrained dir); a key the dict omits takes ``Dinov2Config``'s default, as transformers would."""
        from transformers import Dinov2Config

        perceiver = groma_config["perceiver_cfg"]
        encoder = perceiver["vis_encoder_cfg"]
        model_type = encoder.get("model_type", "dinov2")
        if model_type != "dinov2":
            raise ValueError(f"groma config perceiver_cfg.vis_encoder_cfg.model_type is {model_type!r}; need 'dinov2'")
        defaults = Dinov2Config()
        for key, supported in (("hidden_act", "gelu"), ("num_channels", 3)):
            value = encoder.get(key, getattr(defaults, key))
            if value != supported:
                raise ValueError(f"groma config perceiver_cfg.vis_encoder_cfg.{key} is {value!r}; only {supported!r}")
        sizes = {name: encoder.get(name, getattr(defaults, name)) for name in SIZE_FIELDS}
        layer = perceiver.get("vis_output_layer", -1)  # an index into hidden_states (embeddings + one per layer)
        if layer >= 0:
            layer -= sizes["num_hidden_layers"] + 1
        return cls(**sizes, token_layer=layer)
