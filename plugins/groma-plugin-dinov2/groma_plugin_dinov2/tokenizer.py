"""The ``dinov2`` image tokenizer: a frozen DINOv2 read at 448 px, 2x2-merged image tokens, last four layers as maps."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
from PIL import Image
from torch import Tensor, nn

from groma_core.boxes import IDENTITY_FRAME, Frame
from groma_core.errors import InputError
from groma_core.stages import ImageTokenizer
from groma_core.types import ImageFeatures
from groma_plugin_dinov2.encoder import build_encoder, installed_key
from groma_plugin_dinov2.options import Dinov2Options
from groma_plugin_dinov2.preprocess import letterbox_size, preprocess_images

#: the published feature levels, oldest first: hidden_states[-4], ..., hidden_states[-1] (pre final LayerNorm)
LEVEL_NAMES = ("last-3", "last-2", "last-1", "last")
#: the extra level of ``pixel_level_stride``: the input pixels through a small stem, finer than a patch
PIXEL_LEVEL = "pixels"


def merge_neighbours(patches: Tensor) -> Tensor:
    """(B, h, w, C) patch grid -> (B, h/2 * w/2, 4C) tokens, row-major over the (h/2, w/2) grid.

    Token (i, j) = cat(p(2i, 2j), p(2i+1, 2j), p(2i, 2j+1), p(2i+1, 2j+1)) with p(row, col): the reference's order
    (row offset varies fastest).
    """
    b, h, w, c = patches.shape
    if h % 2 or w % 2:
        raise ValueError(f"merge_neighbours needs an even patch grid, got {h}x{w}")
    quads = (patches[:, 0::2, 0::2], patches[:, 1::2, 0::2], patches[:, 0::2, 1::2], patches[:, 1::2, 1::2])
    return torch.cat(quads, dim=-1).reshape(b, (h // 2) * (w // 2), 4 * c)


class Dinov2ImageTokenizer(ImageTokenizer):
    """Groma's image tokenizer: DINOv2 (transformers ``Dinov2Model``) on ``input_size`` x ``input_size`` images.

    ``forward(pixel_values)`` -> :class:`ImageFeatures` with ``levels`` "last-3", "last-2", "last-1", "last" = the
    last four layers' patch features before the final LayerNorm, each (B, C, g, g) with g = input_size / patch_size,
    and ``tokens`` = layer ``token_layer``'s patches, 2x2-merged to (B, g^2/4, 4C) (or (B, g^2, C) unmerged).
    With ``pixel_level_stride`` N a level "pixels" (B, C, input_size / N, input_size / N) is added.
    """

    reference_prefixes = ("perceiver.vis_encoder.",)

    def __init__(self, options: Dinov2Options):
        super().__init__()
        self.options = options
        self.dinov2 = build_encoder(options)
        config = self.dinov2.config
        patch = config.patch_size if isinstance(config.patch_size, int) else config.patch_size[0]
        size = options.input_size
        if size % patch:
            raise ValueError(f"input_size {size} is not a multiple of the encoder's patch_size {patch}")
        self.grid = size // patch
        if options.merge_tokens and self.grid % 2:
            raise ValueError(f"merge_tokens needs an even patch grid; input_size {size} gives {self.grid}x{self.grid}")
        layers = config.num_hidden_layers
        if layers < len(LEVEL_NAMES) or options.token_layer < -layers:
            raise ValueError(
                f"the encoder has {layers} layers: need at least {len(LEVEL_NAMES)} and token_layer in "
                f"-{layers}..-1, got {options.token_layer}"
            )
        channels = config.hidden_size
        self.num_channels = config.num_channels
        self.image_size = (size, size)
        self.level_channels = dict.fromkeys(LEVEL_NAMES, channels)
        self.level_sizes = dict.fromkeys(LEVEL_NAMES, (self.grid, self.grid))
        self.token_dim = 4 * channels if options.merge_tokens else channels
        self.num_tokens = self.grid**2 // 4 if options.merge_tokens else self.grid**2
        self._encoder_keys = frozenset(self.dinov2.state_dict())
        self.pixel_stem = None
        stride = options.pixel_level_stride
        if stride:
            self.pixel_stem = nn.Sequential(
                nn.Conv2d(self.num_channels, channels, stride, stride), nn.GELU(), nn.Conv2d(channels, channels, 1)
            )
            self.level_channels[PIXEL_LEVEL] = channels
            self.level_sizes[PIXEL_LEVEL] = (size // stride, size // stride)
        if options.frozen:
            self.requires_grad_(False)

    def preprocess(self, images: Sequence[Image.Image]) -> Tensor:
        """RGB PIL images of any sizes -> float32 (B, 3, input_size, input_size), by the ``resize`` method (and
        ``letterbox``)."""
        return preprocess_images(images, self.options.input_size, self.options.resize, self.options.letterbox)

    def input_frame(self, width: int, height: int) -> Frame:
        """The identity, or with ``letterbox`` the top-left rectangle the image is scaled into."""
        if not self.options.letterbox:
            return IDENTITY_FRAME
        size = self.options.input_size
        w, h = letterbox_size(width, height, size)
        return (w / size, h / size, 0.0, 0.0)

    def forward(self, pixel_values: Tensor) -> ImageFeatures:
        """Encode (B, 3, input_size, input_size) pixel values."""
        expected = (self.num_channels, *self.image_size)
        if not isinstance(pixel_values, Tensor) or pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != expected:
            got = tuple(pixel_values.shape) if isinstance(pixel_values, Tensor) else type(pixel_values).__name__
            raise InputError(f"pixel_values must have shape (B, {', '.join(map(str, expected))}), got {got}")
        weight = self.dinov2.embeddings.patch_embeddings.projection.weight
        grad = torch.no_grad() if self.options.frozen else contextlib.nullcontext()
        with grad:
            hidden = self.dinov2(pixel_values=pixel_values.to(weight.dtype), output_hidden_states=True).hidden_states
        b, g = pixel_values.shape[0], self.grid

        def patch_grid(layer: int) -> Tensor:  # (B, g, g, C), CLS dropped
            return hidden[layer][:, 1:].reshape(b, g, g, -1)

        first = -len(LEVEL_NAMES)
        levels = {name: patch_grid(first + i).permute(0, 3, 1, 2).contiguous() for i, name in enumerate(LEVEL_NAMES)}
        if self.pixel_stem is not None:
            with grad:
                levels[PIXEL_LEVEL] = self.pixel_stem(pixel_values.to(weight.dtype))
        patches = patch_grid(self.options.token_layer)
        tokens = merge_neighbours(patches) if self.options.merge_tokens else patches.reshape(b, g * g, -1)
        return ImageFeatures(tokens=tokens, levels=levels)

    def reference_key(self, key: str) -> str | None:
        """``perceiver.vis_encoder.<transformers 4.32 name>`` -> ``dinov2.<installed transformers' name>``."""
        inner = super().reference_key(key)
        if inner is None:
            return None
        return "dinov2." + installed_key(inner, self._encoder_keys)
