"""Reading open_clip / OpenAI CLIP checkpoints and converting their ViT visual tower to transformers names.

open_clip's ``VisionTransformer`` (and OpenAI's original CLIP, whose layout it keeps) names its tensors ``conv1``,
``class_embedding``, ``positional_embedding``, ``ln_pre``, ``transformer.resblocks.N.{ln_1, attn.in_proj_weight,
attn.in_proj_bias, attn.out_proj, ln_2, mlp.c_fc, mlp.c_proj}``, ``ln_post`` and ``proj``. transformers'
``CLIPVisionModel`` holds the same tensors under other names, with the packed query/key/value projection split into
``q_proj``, ``k_proj``, ``v_proj`` (rows 0..C-1, C..2C-1, 2C..3C-1 of ``in_proj``). ``proj`` (the image-text
projection) has no place in ``CLIPVisionModel`` and is dropped. The attention head count, the activation and the
LayerNorm epsilon are not stored in a state dict.
"""

from __future__ import annotations

import math
import os
import re
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

#: open_clip visual-tower names outside the blocks -> CLIPVisionModel names
TOP_LEVEL_NAMES = {
    "conv1.weight": "embeddings.patch_embedding.weight",
    "class_embedding": "embeddings.class_embedding",
    "positional_embedding": "embeddings.position_embedding.weight",
    "ln_pre.weight": "pre_layrnorm.weight",
    "ln_pre.bias": "pre_layrnorm.bias",
    "ln_post.weight": "post_layernorm.weight",
    "ln_post.bias": "post_layernorm.bias",
}

#: open_clip names inside ``transformer.resblocks.N.`` -> names inside ``encoder.layers.N.``
BLOCK_NAMES = {
    "ln_1.weight": "layer_norm1.weight",
    "ln_1.bias": "layer_norm1.bias",
    "attn.out_proj.weight": "self_attn.out_proj.weight",
    "attn.out_proj.bias": "self_attn.out_proj.bias",
    "ln_2.weight": "layer_norm2.weight",
    "ln_2.bias": "layer_norm2.bias",
    "mlp.c_fc.weight": "mlp.fc1.weight",
    "mlp.c_fc.bias": "mlp.fc1.bias",
    "mlp.c_proj.weight": "mlp.fc2.weight",
    "mlp.c_proj.bias": "mlp.fc2.bias",
}

#: the packed attention input projection, split into query, key and value (in this order)
PACKED_NAMES = {"attn.in_proj_weight": "weight", "attn.in_proj_bias": "bias"}

#: open_clip visual tensors that CLIPVisionModel has no place for and that its features do not need
DROPPED_NAMES = ("proj",)

_BLOCK_KEY = re.compile(r"transformer\.resblocks\.(\d+)\.(.+)")


def is_torchscript_archive(path: Path) -> bool:
    """Whether ``path`` is a TorchScript archive (OpenAI's original CLIP ``.pt`` files are)."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith("/constants.pkl") or name == "constants.pkl" for name in archive.namelist())


def read_checkpoint(path: str | Path) -> dict[str, Tensor]:
    """The state dict stored in an open_clip / OpenAI CLIP checkpoint file.

    Accepted: safetensors files, TorchScript archives (OpenAI's ``ViT-L-14-336px.pt``; loaded with
    ``torch.jit.load``), and ``torch.save`` files (loaded with ``weights_only=True``) holding a state dict or an
    open_clip training checkpoint ``{"state_dict": ...}``.
    """
    path = Path(os.path.expanduser(path))
    if not path.is_file():
        raise FileNotFoundError(f"open_clip_checkpoint: {path} is not a file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    if is_torchscript_archive(path):
        return dict(torch.jit.load(str(path), map_location="cpu").state_dict())
    loaded: Any = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(loaded, Mapping) and isinstance(loaded.get("state_dict"), Mapping):
        loaded = loaded["state_dict"]
    if not isinstance(loaded, Mapping) or not all(isinstance(v, Tensor) for v in loaded.values()):
        raise ValueError(f"open_clip_checkpoint: {path} holds no state dict (a mapping of names to tensors)")
    return dict(loaded)


def visual_state_dict(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The visual tower's tensors of a CLIP state dict, named as inside open_clip's ``visual`` module.

    Takes the ``visual.`` tensors of a whole CLIP model (a ``module.`` prefix of distributed training is removed
    first), or the state dict itself when it is already a visual tower (it has ``conv1.weight``).
    """
    state = {k.removeprefix("module."): v for k, v in state.items()}
    visual = {k[len("visual.") :]: v for k, v in state.items() if k.startswith("visual.")}
    if not visual and "conv1.weight" in state:
        visual = dict(state)
    if not visual:
        sample = sorted(state)[:5]
        raise ValueError(
            "open_clip checkpoint has no visual tower: expected 'visual.conv1.weight' (a CLIP model) or "
            f"'conv1.weight' (a visual tower), found e.g. {sample}"
        )
    if "conv1.weight" not in visual:
        what = "a timm tower" if any(k.startswith("trunk.") for k in visual) else "not a ViT (a ResNet?)"
        raise ValueError(f"open_clip checkpoint: the visual tower has no conv1.weight, {what}: only ViT towers convert")
    return visual


def open_clip_sizes(visual: Mapping[str, Tensor]) -> dict[str, int]:
    """The CLIPVisionConfig sizes a visual tower's tensors fix (all but the heads, activation and epsilon)."""
    required = ("conv1.weight", "positional_embedding", "transformer.resblocks.0.mlp.c_fc.weight")
    missing = [key for key in required if key not in visual]
    if missing:
        raise ValueError(f"open_clip checkpoint: the visual tower lacks {missing}")
    width, channels, patch, patch_w = visual["conv1.weight"].shape
    if patch != patch_w:
        raise ValueError(f"open_clip checkpoint: conv1.weight has a non-square {patch}x{patch_w} patch")
    if channels != 3:
        raise ValueError(f"open_clip checkpoint: conv1.weight reads {channels} channels, need 3")
    positions = visual["positional_embedding"].shape[0] - 1
    side = math.isqrt(positions)
    if side * side != positions:
        raise ValueError(f"open_clip checkpoint: {positions} patch positions are not a square grid")
    layers = {int(m.group(1)) for key in visual if (m := _BLOCK_KEY.fullmatch(key))}
    if layers != set(range(len(layers))) or not layers:
        raise ValueError(f"open_clip checkpoint: transformer.resblocks are not numbered 0..N-1: {sorted(layers)}")
    return {
        "hidden_size": width,
        "intermediate_size": visual["transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
        "num_hidden_layers": len(layers),
        "patch_size": patch,
        "image_size": side * patch,
    }


def convert_visual(visual: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], list[str]]:
    """open_clip visual-tower tensors -> (CLIPVisionModel state dict, names of the dropped tensors).

    A tensor with no CLIPVisionModel equivalent (layer scale, attention pooling, scaled cosine attention...) is an
    error naming it: such towers compute something CLIPVisionModel cannot.
    """
    converted: dict[str, Tensor] = {}
    dropped: list[str] = []
    unknown: list[str] = []
    for key, tensor in visual.items():
        block = _BLOCK_KEY.fullmatch(key)
        if key in TOP_LEVEL_NAMES:
            converted[TOP_LEVEL_NAMES[key]] = tensor
        elif key in DROPPED_NAMES:
            dropped.append(key)
        elif block and block.group(2) in BLOCK_NAMES:
            converted[f"encoder.layers.{block.group(1)}.{BLOCK_NAMES[block.group(2)]}"] = tensor
        elif block and block.group(2) in PACKED_NAMES:
            if tensor.shape[0] % 3:
                raise ValueError(f"open_clip checkpoint: {key} has {tensor.shape[0]} rows, not a multiple of 3")
            kind = PACKED_NAMES[block.group(2)]
            for name, part in zip(("q", "k", "v"), tensor.chunk(3, dim=0)):
                converted[f"encoder.layers.{block.group(1)}.self_attn.{name}_proj.{kind}"] = part
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(
            f"open_clip checkpoint: {len(unknown)} visual tensors have no CLIPVisionModel equivalent (layer scale, "
            f"attention pooling, extra norms are not supported): {sorted(unknown)[:8]}"
        )
    return converted, dropped


def load_converted(model: nn.Module, converted: Mapping[str, Tensor], source: str) -> None:
    """Load a converted state dict into a ``CLIPVisionModel`` (every tensor must be there with its shape), cast to
    the model's dtype. Parameters on the meta device are replaced by the loaded tensors."""
    target = getattr(model, "vision_model", model)  # transformers 4.x wraps the tower, 5.x does not
    own = target.state_dict()
    missing = sorted(set(own) - set(converted))
    unexpected = sorted(set(converted) - set(own))
    misshapen = [
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in converted.items()
        if k in own and v.shape != own[k].shape
    ]
    if missing or unexpected or misshapen:
        raise ValueError(
            f"{source}: the converted tower does not fit CLIPVisionModel: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}, wrong shapes {misshapen[:5]}"
        )
    on_meta = any(p.is_meta for p in target.parameters())
    state = {k: v.to(dtype=own[k].dtype, copy=on_meta) for k, v in converted.items()}
    target.load_state_dict(state, strict=True, assign=on_meta)


def open_clip_architecture(visual: nn.Module) -> dict[str, Any]:
    """Heads, activation and LayerNorm epsilon of an open_clip ``VisionTransformer`` module (read from its
    sub-modules, as a state dict does not hold them)."""
    block = visual.transformer.resblocks[0]
    activation = block.mlp.gelu
    if type(activation).__name__ == "QuickGELU":
        hidden_act = "quick_gelu"
    elif isinstance(activation, nn.GELU) and activation.approximate == "none":
        hidden_act = "gelu"
    else:
        raise ValueError(f"open_clip model: activation {activation!r} has no CLIPVisionConfig equivalent")
    if not isinstance(visual.ln_pre, nn.LayerNorm):
        raise ValueError("open_clip model: no ln_pre LayerNorm (no_ln_pre towers do not convert)")
    return {"num_attention_heads": block.attn.num_heads, "hidden_act": hidden_act, "layer_norm_eps": visual.ln_pre.eps}


def open_clip_visual(name: str, checkpoint: str | None) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Build ``name`` with open_clip (weights from ``checkpoint``, passed as its ``pretrained``) and return its
    visual tower's state dict and architecture; open_clip must be importable."""
    try:
        import open_clip
    except Exception as exc:  # open_clip needs torchvision: any import failure means it cannot be used here
        raise ImportError(
            f"open_clip_model {name!r} needs the open_clip package, which cannot be imported here "
            f"({type(exc).__name__}: {exc}); give open_clip_checkpoint with the size options instead"
        ) from exc
    model = open_clip.create_model(name, pretrained=checkpoint, device="cpu")
    visual = model.visual
    return dict(visual.state_dict()), open_clip_architecture(visual)
