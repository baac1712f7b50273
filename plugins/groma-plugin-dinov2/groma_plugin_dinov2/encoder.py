"""Building the transformers ``Dinov2Model`` the reference used, with its transformers-4.32 numerics.

Groma pinned transformers 4.32, whose DINOv2 resized the position table with ``scale_factor`` (grid + 0.1) / 37;
later versions resize to an exact ``size``, which moves the encoder's outputs by about 2e-2 (tiny fixture). The
reference state dict also uses the 4.x attention names, which transformers 5 renamed.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import Tensor
from torch.nn import functional as F
from transformers import Dinov2Config, Dinov2Model
from transformers.models.dinov2.modeling_dinov2 import Dinov2Embeddings

from groma_plugin_dinov2.options import SIZE_FIELDS, Dinov2Options

#: attention parameter names of transformers 4.x (the reference) and their transformers 5.x equivalents
ATTENTION_RENAMES = (
    (".attention.attention.query.", ".attention.q_proj."),
    (".attention.attention.key.", ".attention.k_proj."),
    (".attention.attention.value.", ".attention.v_proj."),
    (".attention.output.dense.", ".attention.o_proj."),
)


def interpolate_position_embeddings(table: Tensor, num_patches: int, height: int, width: int, patch: int) -> Tensor:
    """Position embeddings (1, 1 + num_patches, C) for an input of ``height`` x ``width`` pixels, exactly as
    transformers 4.32 computed them from the table (1, 1 + N, C) of a sqrt(N) x sqrt(N) grid.

    The table is returned unchanged when it already has ``num_patches`` rows and the input is square; otherwise
    the patch rows are resized bicubically (``align_corners=False``, no antialias) with
    ``scale_factor = ((height // patch + 0.1) / sqrt(N), (width // patch + 0.1) / sqrt(N))``, in float32. The CLS
    row is kept as is.
    """
    num_positions = table.shape[1] - 1
    if num_patches == num_positions and height == width:
        return table
    dim = table.shape[-1]
    side = math.sqrt(num_positions)
    grid_h, grid_w = height // patch + 0.1, width // patch + 0.1
    patch_table = table[:, 1:].reshape(1, int(side), int(side), dim).permute(0, 3, 1, 2)
    resized = F.interpolate(
        patch_table.to(torch.float32),
        scale_factor=(float(grid_h / side), float(grid_w / side)),
        mode="bicubic",
        align_corners=False,
    ).to(table.dtype)
    if resized.shape[-2:] != (int(grid_h), int(grid_w)):
        raise ValueError(
            f"position embeddings resized to {tuple(resized.shape[-2:])}, expected ({int(grid_h)}, {int(grid_w)})"
        )
    return torch.cat((table[:, :1], resized.permute(0, 2, 3, 1).reshape(1, -1, dim)), dim=1)


class ReferencePositionEmbeddings(Dinov2Embeddings):
    """transformers' ``Dinov2Embeddings`` with the transformers-4.32 position-embedding interpolation.

    Same parameters and forward; only :meth:`interpolate_pos_encoding` differs. :func:`build_encoder` switches the
    embeddings of a built model to this class.
    """

    def interpolate_pos_encoding(self, embeddings: Tensor, height: int, width: int) -> Tensor:
        patch = self.config.patch_size
        patch = patch if isinstance(patch, int) else patch[0]
        return interpolate_position_embeddings(self.position_embeddings, embeddings.shape[1] - 1, height, width, patch)


def encoder_config(options: Dinov2Options) -> Dinov2Config:
    """The ``Dinov2Config`` of the size options."""
    sizes = {name: getattr(options, name) for name in SIZE_FIELDS}
    return Dinov2Config(**sizes, attn_implementation=options.attn_implementation)


def load_pretrained(options: Dinov2Options) -> Dinov2Model:
    """``Dinov2Model.from_pretrained`` on the local directory ``options.pretrained``; size options set explicitly
    must agree with its config."""
    path = Path(options.pretrained)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"pretrained: {path} is not a directory with a config.json (a saved Dinov2Model)")
    model = Dinov2Model.from_pretrained(
        str(path), local_files_only=True, attn_implementation=options.attn_implementation
    )
    for name in sorted(options.model_fields_set & set(SIZE_FIELDS)):
        found, asked = getattr(model.config, name), getattr(options, name)
        if found != asked:
            raise ValueError(f"pretrained: {path}/config.json has {name}={found!r} but the options ask for {asked!r}")
    return model


def build_encoder(options: Dinov2Options) -> Dinov2Model:
    """The DINOv2 encoder of ``options``: loaded from ``pretrained`` or built (randomly initialised) from the sizes,
    with the reference's position interpolation unless ``position_interpolation='installed'``."""
    model = load_pretrained(options) if options.pretrained is not None else Dinov2Model(encoder_config(options))
    if options.position_interpolation == "transformers-4.32":
        model.embeddings.__class__ = ReferencePositionEmbeddings
    return model


def installed_key(key: str, own_keys: frozenset[str]) -> str:
    """The installed transformers' name of a ``Dinov2Model`` state-dict key written by transformers 4.x or 5.x.

    A key the model has is kept; otherwise the attention renames are tried in both directions. A key that still does
    not match is returned unchanged (the loader then reports it).
    """
    if key in own_keys:
        return key
    for old, new in ATTENTION_RENAMES:
        for a, b in ((old, new), (new, old)):
            if a in key and key.replace(a, b) in own_keys:
                return key.replace(a, b)
    return key
