"""Building the transformers ``CLIPVisionModel`` of the options: from sizes, a transformers directory, an
open_clip / OpenAI checkpoint file (converted), or open_clip itself."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from transformers import CLIPVisionConfig, CLIPVisionModel

from groma_plugin_clip.open_clip_weights import (
    convert_visual,
    load_converted,
    open_clip_sizes,
    open_clip_visual,
    read_checkpoint,
    visual_state_dict,
)
from groma_plugin_clip.options import SIZE_FIELDS, ClipOptions

#: head width of OpenAI's CLIP ViTs and open_clip's default: heads = hidden_size // 64 unless set
DEFAULT_HEAD_WIDTH = 64


def encoder_config(sizes: dict[str, Any], options: ClipOptions) -> CLIPVisionConfig:
    """The ``CLIPVisionConfig`` of the architecture ``sizes``."""
    return CLIPVisionConfig(**sizes, attn_implementation=options.attn_implementation)


def check_explicit_sizes(found: dict[str, Any], options: ClipOptions, source: str) -> None:
    """Size options set explicitly must agree with what ``source`` holds."""
    for name in sorted(options.model_fields_set & set(SIZE_FIELDS) & set(found)):
        asked = getattr(options, name)
        if found[name] != asked:
            raise ValueError(f"{source} has {name}={found[name]!r} but the options ask for {asked!r}")


def load_pretrained(options: ClipOptions) -> CLIPVisionModel:
    """``CLIPVisionModel.from_pretrained`` on the local directory ``options.pretrained`` (a saved CLIPVisionModel or
    a whole CLIPModel, whose vision tower is taken)."""
    path = Path(os.path.expanduser(options.pretrained))
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"pretrained: {path} is not a directory with a config.json (a saved CLIPVisionModel or CLIPModel)"
        )
    model = CLIPVisionModel.from_pretrained(
        str(path), local_files_only=True, attn_implementation=options.attn_implementation
    )
    check_explicit_sizes({name: getattr(model.config, name) for name in SIZE_FIELDS}, options, f"{path}/config.json")
    return model


def build_from_open_clip(options: ClipOptions) -> CLIPVisionModel:
    """A ``CLIPVisionModel`` holding the converted visual tower of ``open_clip_model`` / ``open_clip_checkpoint``."""
    if options.open_clip_model is not None:
        visual, architecture = open_clip_visual(options.open_clip_model, options.open_clip_checkpoint)
        source = f"open_clip model {options.open_clip_model!r}"
    else:
        visual = visual_state_dict(read_checkpoint(options.open_clip_checkpoint))
        architecture = {}
        source = f"open_clip_checkpoint {options.open_clip_checkpoint}"
    converted, _ = convert_visual(visual)
    found = {**open_clip_sizes(visual), **architecture}
    check_explicit_sizes(found, options, source)
    sizes = {name: found.get(name, getattr(options, name)) for name in SIZE_FIELDS}
    if "num_attention_heads" not in found and "num_attention_heads" not in options.model_fields_set:
        sizes["num_attention_heads"] = max(1, sizes["hidden_size"] // DEFAULT_HEAD_WIDTH)
    if sizes["hidden_size"] % sizes["num_attention_heads"]:
        raise ValueError(
            f"{source}: hidden_size {sizes['hidden_size']} is not divisible by num_attention_heads "
            f"{sizes['num_attention_heads']}"
        )
    model = CLIPVisionModel(encoder_config(sizes, options))
    load_converted(model, converted, source)
    return model


def build_encoder(options: ClipOptions) -> CLIPVisionModel:
    """The CLIP vision tower of ``options``: loaded from ``pretrained``, converted from open_clip, or built
    (randomly initialised) from the sizes."""
    if options.pretrained is not None:
        return load_pretrained(options)
    if options.open_clip_checkpoint is not None or options.open_clip_model is not None:
        return build_from_open_clip(options)
    return CLIPVisionModel(encoder_config({name: getattr(options, name) for name in SIZE_FIELDS}, options))
