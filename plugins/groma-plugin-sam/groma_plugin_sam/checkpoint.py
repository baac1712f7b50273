"""SAM weights: the official segment-anything checkpoints and transformers' ``SamModel``.

The official files (``sam_vit_b_01ec64.pth``, ``sam_vit_l_0b3195.pth``, ``sam_vit_h_4b8939.pth``) are flat state
dicts of segment-anything's ``Sam`` (``image_encoder.*``, ``prompt_encoder.*``, ``mask_decoder.*``). They carry no
config: the architecture is read from the tensor shapes (all but the mask decoder's head count, 8 in every SAM).
:func:`key_pairs` lists, for an architecture, every segment-anything key with its ``SamModel`` name, which gives the
conversion in both directions.
"""

from __future__ import annotations

import os
import pickle
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from transformers import SamConfig, SamModel

from groma_core.errors import CheckpointError
from groma_core.stages import empty_parameters
from groma_plugin_sam.options import SIZE_FIELDS, SamOptions

#: buffers of segment-anything's ``Sam`` that some checkpoints carry; they are constants, not weights
CONSTANT_BUFFERS = ("pixel_mean", "pixel_std")
#: segment-anything's two-way transformer uses ``nn.LayerNorm``'s default epsilon
SEGMENT_ANYTHING_DECODER_EPS = 1e-5
#: transformers' default of ``SamMaskDecoderConfig.layer_norm_eps``
TRANSFORMERS_DECODER_EPS = 1e-6

Pairs = list[tuple[str, str]]


def _params(sa: str, hf: str, names: tuple[str, ...] = ("weight", "bias")) -> Pairs:
    return [(f"{sa}.{n}", f"{hf}.{n}") for n in names]


def _mlp(sa: str, hf: str, depth: int) -> Pairs:
    """segment-anything's ``MLP`` (``layers.0 .. layers.{depth-1}``) vs transformers' ``SamFeedForward``
    (``proj_in``, ``layers.0 .. layers.{depth-3}``, ``proj_out``)."""
    names = ["proj_in", *(f"layers.{j}" for j in range(depth - 2)), "proj_out"]
    return [pair for j, name in enumerate(names) for pair in _params(f"{sa}.layers.{j}", f"{hf}.{name}")]


def _attention(sa: str, hf: str) -> Pairs:
    return [
        pair for proj in ("q_proj", "k_proj", "v_proj", "out_proj") for pair in _params(f"{sa}.{proj}", f"{hf}.{proj}")
    ]


def key_pairs(config: SamConfig) -> Pairs:
    """(segment-anything key, ``SamModel`` key) for every tensor of a SAM of this architecture.

    The random Gaussian matrix of SAM's positional encoding is listed twice: ``SamModel`` keeps it as
    ``shared_image_embedding`` and, tied, as ``prompt_encoder.shared_embedding``.
    """
    vision, prompt, decoder = config.vision_config, config.prompt_encoder_config, config.mask_decoder_config
    pairs: Pairs = []
    if vision.use_abs_pos:
        pairs.append(("image_encoder.pos_embed", "vision_encoder.pos_embed"))
    pairs += _params("image_encoder.patch_embed.proj", "vision_encoder.patch_embed.projection")
    for i in range(vision.num_hidden_layers):
        sa, hf = f"image_encoder.blocks.{i}", f"vision_encoder.layers.{i}"
        pairs += _params(f"{sa}.norm1", f"{hf}.layer_norm1")
        pairs += _params(f"{sa}.attn.qkv", f"{hf}.attn.qkv", ("weight", "bias") if vision.qkv_bias else ("weight",))
        pairs += _params(f"{sa}.attn.proj", f"{hf}.attn.proj")
        if vision.use_rel_pos:
            pairs += [(f"{sa}.attn.rel_pos_{a}", f"{hf}.attn.rel_pos_{a}") for a in ("h", "w")]
        pairs += _params(f"{sa}.norm2", f"{hf}.layer_norm2")
        pairs += _params(f"{sa}.mlp.lin1", f"{hf}.mlp.lin1") + _params(f"{sa}.mlp.lin2", f"{hf}.mlp.lin2")
    pairs += _params("image_encoder.neck.0", "vision_encoder.neck.conv1", ("weight",))
    pairs += _params("image_encoder.neck.1", "vision_encoder.neck.layer_norm1")
    pairs += _params("image_encoder.neck.2", "vision_encoder.neck.conv2", ("weight",))
    pairs += _params("image_encoder.neck.3", "vision_encoder.neck.layer_norm2")

    gaussian = "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"
    pairs += [
        (gaussian, "shared_image_embedding.positional_embedding"),
        (gaussian, "prompt_encoder.shared_embedding.positional_embedding"),
    ]
    pairs += [
        (f"prompt_encoder.point_embeddings.{k}.weight", f"prompt_encoder.point_embed.{k}.weight")
        for k in range(prompt.num_point_embeddings)
    ]
    pairs.append(("prompt_encoder.not_a_point_embed.weight", "prompt_encoder.not_a_point_embed.weight"))
    for sa_index, hf_name in (
        ("0", "conv1"),
        ("1", "layer_norm1"),
        ("3", "conv2"),
        ("4", "layer_norm2"),
        ("6", "conv3"),
    ):
        pairs += _params(f"prompt_encoder.mask_downscaling.{sa_index}", f"prompt_encoder.mask_embed.{hf_name}")
    pairs.append(("prompt_encoder.no_mask_embed.weight", "prompt_encoder.no_mask_embed.weight"))

    for i in range(decoder.num_hidden_layers):
        sa = hf = f"mask_decoder.transformer.layers.{i}"
        for attention in ("self_attn", "cross_attn_token_to_image", "cross_attn_image_to_token"):
            pairs += _attention(f"{sa}.{attention}", f"{hf}.{attention}")
        for k in range(1, 5):
            pairs += _params(f"{sa}.norm{k}", f"{hf}.layer_norm{k}")
        pairs += _params(f"{sa}.mlp.lin1", f"{hf}.mlp.lin1") + _params(f"{sa}.mlp.lin2", f"{hf}.mlp.lin2")
    pairs += _attention(
        "mask_decoder.transformer.final_attn_token_to_image", "mask_decoder.transformer.final_attn_token_to_image"
    )
    pairs += _params("mask_decoder.transformer.norm_final_attn", "mask_decoder.transformer.layer_norm_final_attn")
    pairs += [("mask_decoder.iou_token.weight", "mask_decoder.iou_token.weight")]
    pairs += [("mask_decoder.mask_tokens.weight", "mask_decoder.mask_tokens.weight")]
    pairs += _params("mask_decoder.output_upscaling.0", "mask_decoder.upscale_conv1")
    pairs += _params("mask_decoder.output_upscaling.1", "mask_decoder.upscale_layer_norm")
    pairs += _params("mask_decoder.output_upscaling.3", "mask_decoder.upscale_conv2")
    for k in range(decoder.num_multimask_outputs + 1):
        pairs += _mlp(f"mask_decoder.output_hypernetworks_mlps.{k}", f"mask_decoder.output_hypernetworks_mlps.{k}", 3)
    pairs += _mlp("mask_decoder.iou_prediction_head", "mask_decoder.iou_prediction_head", decoder.iou_head_depth)
    return pairs


def _mismatch(where: str, missing: set[str], unknown: set[str]) -> CheckpointError:
    problems = []
    for what, keys in (("missing", missing), ("unknown", unknown)):
        if keys:
            listed = sorted(keys)
            more = f" ... ({len(listed)} in all)" if len(listed) > 8 else ""
            problems.append(f"{len(listed)} {what} tensor(s): {', '.join(listed[:8])}{more}")
    return CheckpointError(f"{where}: " + " | ".join(problems))


def from_segment_anything(
    state: Mapping[str, Tensor], config: SamConfig, where: str = "checkpoint"
) -> dict[str, Tensor]:
    """A segment-anything state dict -> the ``SamModel`` state dict of ``config``; every tensor must map."""
    pairs = key_pairs(config)
    expected = {sa for sa, _ in pairs}
    given = set(state) - set(CONSTANT_BUFFERS)
    if expected != given:
        raise _mismatch(f"{where} (segment-anything names)", expected - given, given - expected)
    return {hf: state[sa] for sa, hf in pairs}


def to_segment_anything(state: Mapping[str, Tensor], config: SamConfig, where: str = "state dict") -> dict[str, Tensor]:
    """A ``SamModel`` state dict -> the segment-anything state dict (the names of the official checkpoints)."""
    pairs = key_pairs(config)
    expected = {hf for _, hf in pairs}
    if expected != set(state):
        raise _mismatch(f"{where} (transformers names)", expected - set(state), set(state) - expected)
    out: dict[str, Tensor] = {}
    for sa, hf in pairs:
        out.setdefault(sa, state[hf])
    return out


def _count(state: Mapping[str, Tensor], pattern: str) -> int:
    regex = re.compile(pattern)
    return len({m.group(1) for key in state if (m := regex.fullmatch(key))})


def config_from_segment_anything(
    state: Mapping[str, Tensor],
    decoder_num_attention_heads: int = 8,
    decoder_layer_norm_eps: float = SEGMENT_ANYTHING_DECODER_EPS,
    attn_implementation: str = "sdpa",
    where: str = "checkpoint",
) -> SamConfig:
    """The ``SamConfig`` of a segment-anything state dict, read from its tensor shapes."""

    def shape(key: str) -> tuple[int, ...]:
        if key not in state:
            raise CheckpointError(f"{where}: no tensor {key!r}; not a segment-anything SAM state dict")
        return tuple(state[key].shape)

    hidden, _, patch, _ = shape("image_encoder.patch_embed.proj.weight")
    grid = shape("image_encoder.pos_embed")[1]
    layers = _count(state, r"image_encoder\.blocks\.(\d+)\.norm1\.weight")
    use_rel_pos = "image_encoder.blocks.0.attn.rel_pos_h" in state
    if not use_rel_pos:
        raise CheckpointError(f"{where}: no relative position tables; the head count cannot be read from it")
    rel_sizes = [shape(f"image_encoder.blocks.{i}.attn.rel_pos_h")[0] for i in range(layers)]
    head_dim = shape("image_encoder.blocks.0.attn.rel_pos_h")[1]
    global_layers = [i for i, n in enumerate(rel_sizes) if n == 2 * grid - 1]
    windowed = [n for n in rel_sizes if n != 2 * grid - 1]
    vision = {
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": hidden // head_dim,
        "image_size": grid * patch,
        "patch_size": patch,
        "mlp_dim": shape("image_encoder.blocks.0.mlp.lin1.weight")[0],
        "qkv_bias": "image_encoder.blocks.0.attn.qkv.bias" in state,
        "use_abs_pos": True,
        "use_rel_pos": True,
        "window_size": (windowed[0] + 1) // 2 if windowed else 0,
        "global_attn_indexes": global_layers,
        "output_channels": shape("image_encoder.neck.0.weight")[0],
        "num_pos_feats": shape("prompt_encoder.pe_layer.positional_encoding_gaussian_matrix")[1],
    }
    width = shape("prompt_encoder.no_mask_embed.weight")[1]
    prompt = {
        "hidden_size": width,
        "image_size": grid * patch,
        "patch_size": patch,
        "mask_input_channels": shape("prompt_encoder.mask_downscaling.3.weight")[0],
        "num_point_embeddings": _count(state, r"prompt_encoder\.point_embeddings\.(\d+)\.weight"),
    }
    decoder_width = shape("mask_decoder.iou_token.weight")[1]
    decoder = {
        "hidden_size": decoder_width,
        "mlp_dim": shape("mask_decoder.transformer.layers.0.mlp.lin1.weight")[0],
        "num_hidden_layers": _count(state, r"mask_decoder\.transformer\.layers\.(\d+)\.norm1\.weight"),
        "num_attention_heads": decoder_num_attention_heads,
        "attention_downsample_rate": decoder_width
        // shape("mask_decoder.transformer.layers.0.cross_attn_token_to_image.q_proj.weight")[0],
        "num_multimask_outputs": shape("mask_decoder.mask_tokens.weight")[0] - 1,
        "iou_head_depth": _count(state, r"mask_decoder\.iou_prediction_head\.layers\.(\d+)\.weight"),
        "iou_head_hidden_dim": shape("mask_decoder.iou_prediction_head.layers.0.weight")[0],
        "layer_norm_eps": decoder_layer_norm_eps,
    }
    return SamConfig(
        vision_config=vision,
        prompt_encoder_config=prompt,
        mask_decoder_config=decoder,
        attn_implementation=attn_implementation,
    )


def config_from_options(options: SamOptions) -> SamConfig:
    """The ``SamConfig`` of the size options."""
    vision = {
        "hidden_size": options.hidden_size,
        "num_hidden_layers": options.num_hidden_layers,
        "num_attention_heads": options.num_attention_heads,
        "image_size": options.image_size,
        "patch_size": options.patch_size,
        "mlp_dim": options.mlp_dim,
        "window_size": options.window_size,
        "global_attn_indexes": list(options.global_attn_indexes),
        "output_channels": options.prompt_embed_dim,
        "num_pos_feats": options.prompt_embed_dim // 2,
    }
    prompt = {
        "hidden_size": options.prompt_embed_dim,
        "image_size": options.image_size,
        "patch_size": options.patch_size,
    }
    decoder = {
        "hidden_size": options.prompt_embed_dim,
        "mlp_dim": options.decoder_mlp_dim,
        "num_hidden_layers": options.decoder_num_hidden_layers,
        "num_attention_heads": options.decoder_num_attention_heads,
        "iou_head_hidden_dim": options.iou_head_hidden_dim,
        "layer_norm_eps": decoder_eps(options),
    }
    return SamConfig(
        vision_config=vision,
        prompt_encoder_config=prompt,
        mask_decoder_config=decoder,
        attn_implementation=options.attn_implementation,
    )


def decoder_eps(options: SamOptions) -> float:
    """The mask decoder's LayerNorm epsilon that the options ask for."""
    return SEGMENT_ANYTHING_DECODER_EPS if options.segment_anything_layer_norm else TRANSFORMERS_DECODER_EPS


def config_sizes(config: SamConfig) -> dict[str, Any]:
    """The size options that describe ``config``."""
    vision, decoder = config.vision_config, config.mask_decoder_config
    return {
        "image_size": vision.image_size,
        "patch_size": vision.patch_size,
        "hidden_size": vision.hidden_size,
        "num_hidden_layers": vision.num_hidden_layers,
        "num_attention_heads": vision.num_attention_heads,
        "mlp_dim": vision.mlp_dim,
        "window_size": vision.window_size,
        "global_attn_indexes": list(vision.global_attn_indexes),
        "prompt_embed_dim": decoder.hidden_size,
        "decoder_num_hidden_layers": decoder.num_hidden_layers,
        "decoder_num_attention_heads": decoder.num_attention_heads,
        "decoder_mlp_dim": decoder.mlp_dim,
        "iou_head_hidden_dim": decoder.iou_head_hidden_dim,
    }


def check_sizes(options: SamOptions, config: SamConfig, where: str) -> None:
    """Raise when a size option set explicitly disagrees with the architecture of a loaded checkpoint."""
    found = config_sizes(config)
    for name in SIZE_FIELDS:
        if name in options.model_fields_set and getattr(options, name) is not None:
            if found[name] != getattr(options, name):
                raise ValueError(
                    f"pretrained: {where} has {name}={found[name]!r} but the options ask for {getattr(options, name)!r}"
                )


def read_state_dict(path: Path) -> dict[str, Tensor]:
    """The tensors of a ``.pth``/``.pt``/``.bin`` (torch.load, weights only) or ``.safetensors`` file."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state: Any = load_file(str(path))
    else:
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
        except (RuntimeError, OSError, EOFError, pickle.UnpicklingError) as exc:
            raise CheckpointError(f"{path}: cannot read it as a torch checkpoint ({exc})") from None
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: expected a flat state dict of tensors (an official SAM checkpoint)")
    return dict(state)


def load_segment_anything_checkpoint(path: str | Path, options: SamOptions | None = None) -> SamModel:
    """A ``SamModel`` with the weights of an official segment-anything checkpoint file, its architecture read from
    the tensors (the decoder's head count and LayerNorm epsilon from ``options``)."""
    options = options or SamOptions()
    path = Path(os.path.expanduser(path))
    state = read_state_dict(path)
    config = config_from_segment_anything(
        state, options.decoder_num_attention_heads, decoder_eps(options), options.attn_implementation, str(path)
    )
    converted = from_segment_anything(state, config, str(path))
    with empty_parameters():
        model = SamModel(config)
    model.load_state_dict(converted, strict=True, assign=True)
    model.prompt_encoder.shared_embedding.positional_embedding = model.shared_image_embedding.positional_embedding
    return model.eval()


def load_pretrained_directory(path: str | Path, options: SamOptions) -> SamModel:
    """``SamModel.from_pretrained`` on a local directory, with the decoder epsilon the options ask for."""
    path = Path(os.path.expanduser(path))
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"pretrained: {path} is not a directory with a config.json (a saved SamModel)")
    config = SamConfig.from_pretrained(str(path), local_files_only=True)
    config.mask_decoder_config.layer_norm_eps = decoder_eps(options)
    model = SamModel.from_pretrained(
        str(path), config=config, local_files_only=True, attn_implementation=options.attn_implementation
    )
    return model.eval()


def build_sam_model(options: SamOptions) -> SamModel:
    """The ``SamModel`` of ``options``: from ``pretrained`` (segment-anything file or transformers directory) or
    randomly initialised from the sizes."""
    if options.pretrained is None:
        return SamModel(config_from_options(options)).eval()
    path = Path(os.path.expanduser(options.pretrained))
    if path.is_dir():
        model = load_pretrained_directory(path, options)
    elif path.is_file():
        model = load_segment_anything_checkpoint(path, options)
    else:
        raise FileNotFoundError(f"pretrained: {path} does not exist (a segment-anything .pth or a SamModel directory)")
    check_sizes(options, model.config, str(path))
    return model
