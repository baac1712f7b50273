"""The official ``segment_anything`` package, used directly where it imports (``backend: segment-anything``).

segment-anything imports torchvision (its resize and ``batched_nms``), so it cannot run where torchvision is
missing or broken; :func:`segment_anything_status` says whether it imports here and, if not, why.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn
from transformers import SamConfig

from groma_plugin_sam.checkpoint import (
    CONSTANT_BUFFERS,
    build_sam_model,
    config_from_options,
    config_from_segment_anything,
    read_state_dict,
    to_segment_anything,
)
from groma_plugin_sam.generator import GeneratedMasks
from groma_plugin_sam.options import SamOptions


@functools.cache
def segment_anything_status() -> tuple[bool, str]:
    """(True, version) when ``segment_anything`` and its automatic mask generator import; else (False, reason)."""
    try:
        import segment_anything
        from segment_anything import SamAutomaticMaskGenerator  # noqa: F401  (imports torchvision)
    except Exception as exc:  # a broken torchvision raises RuntimeError, a missing one ImportError
        return False, f"{type(exc).__name__}: {exc}"
    return True, getattr(segment_anything, "__version__", "installed")


def build_official_sam(config: SamConfig) -> nn.Module:
    """segment-anything's ``Sam`` with the architecture of ``config`` (as its ``build_sam`` builds the official
    sizes), randomly initialised."""
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    vision, prompt, decoder = config.vision_config, config.prompt_encoder_config, config.mask_decoder_config
    grid = vision.image_size // vision.patch_size
    return Sam(
        image_encoder=ImageEncoderViT(
            img_size=vision.image_size,
            patch_size=vision.patch_size,
            embed_dim=vision.hidden_size,
            depth=vision.num_hidden_layers,
            num_heads=vision.num_attention_heads,
            mlp_ratio=vision.mlp_dim / vision.hidden_size,
            out_chans=vision.output_channels,
            qkv_bias=vision.qkv_bias,
            norm_layer=functools.partial(nn.LayerNorm, eps=vision.layer_norm_eps),
            use_abs_pos=vision.use_abs_pos,
            use_rel_pos=vision.use_rel_pos,
            window_size=vision.window_size,
            global_attn_indexes=tuple(vision.global_attn_indexes),
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=prompt.hidden_size,
            image_embedding_size=(grid, grid),
            input_image_size=(vision.image_size, vision.image_size),
            mask_in_chans=prompt.mask_input_channels,
        ),
        mask_decoder=MaskDecoder(
            transformer_dim=decoder.hidden_size,
            transformer=TwoWayTransformer(
                depth=decoder.num_hidden_layers,
                embedding_dim=decoder.hidden_size,
                num_heads=decoder.num_attention_heads,
                mlp_dim=decoder.mlp_dim,
                attention_downsample_rate=decoder.attention_downsample_rate,
            ),
            num_multimask_outputs=decoder.num_multimask_outputs,
            iou_head_depth=decoder.iou_head_depth,
            iou_head_hidden_dim=decoder.iou_head_hidden_dim,
        ),
    ).eval()


def build_official_model(options: SamOptions) -> nn.Module:
    """segment-anything's ``Sam`` for ``options``: an official checkpoint file loaded as is, a transformers
    ``SamModel`` directory converted to segment-anything names, or random weights of the given sizes."""
    ok, reason = segment_anything_status()
    if not ok:
        raise RuntimeError(
            f"backend 'segment-anything' needs the segment_anything package, which does not import: {reason}"
        )
    path = Path(os.path.expanduser(options.pretrained)) if options.pretrained else None
    if path is None:
        return build_official_sam(config_from_options(options))
    if path.is_file():
        state = read_state_dict(path)
        config = config_from_segment_anything(state, options.decoder_num_attention_heads, where=str(path))
    else:
        hf_model = build_sam_model(options)
        config = hf_model.config
        state = to_segment_anything(hf_model.state_dict(), config, str(path))
    model = build_official_sam(config)
    model.load_state_dict({k: v for k, v in state.items() if k not in CONSTANT_BUFFERS}, strict=True)
    return model


@torch.no_grad()
def generate_official(model: nn.Module, image: Image.Image, options: SamOptions, want_masks: bool) -> GeneratedMasks:
    """Masks of one image by segment-anything's own ``SamAutomaticMaskGenerator`` (no crop layers), best first."""
    from segment_anything import SamAutomaticMaskGenerator

    model.mask_threshold = options.mask_threshold
    generator = SamAutomaticMaskGenerator(
        model,
        points_per_side=options.points_per_side,
        points_per_batch=options.points_per_batch,
        pred_iou_thresh=options.pred_iou_thresh,
        stability_score_thresh=options.stability_score_thresh,
        stability_score_offset=options.stability_score_offset,
        box_nms_thresh=options.box_nms_thresh,
        crop_n_layers=0,
        min_mask_region_area=0,
        output_mode="binary_mask",
    )
    rgb = image.convert("RGB")
    records = [r for r in generator.generate(np.asarray(rgb)) if r["area"] > 0]
    device = model.pixel_mean.device
    boxes = torch.tensor([r["bbox"] for r in records], dtype=torch.float32, device=device).reshape(-1, 4)
    boxes[:, 2:] += boxes[:, :2]  # XYWH -> XYXY (x2 = last mask column, as segment-anything's boxes)
    width, height = rgb.size
    masks = None
    if want_masks:
        arrays = [torch.from_numpy(np.asarray(r["segmentation"], dtype=bool)) for r in records]
        masks = (
            torch.stack(arrays).to(device) if arrays else torch.zeros(0, height, width, dtype=torch.bool, device=device)
        )
    return GeneratedMasks(
        boxes=boxes,
        predicted_iou=torch.tensor([r["predicted_iou"] for r in records], dtype=torch.float32, device=device),
        stability_score=torch.tensor([r["stability_score"] for r in records], dtype=torch.float32, device=device),
        point_coords=torch.tensor([r["point_coords"][0] for r in records], dtype=torch.float32, device=device).reshape(
            -1, 2
        ),
        masks=masks,
    )
