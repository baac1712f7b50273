"""Turning PIL images into CLIP pixel values, two ways.

* ``square`` (default): Pillow bicubic resize to S x S without keeping the aspect ratio, as Groma feeds its image
  tokenizer. Every pixel of the original image is seen, so boxes normalized to the original image stay valid.
* ``center-crop``: CLIP's own preprocessing, as transformers' ``CLIPImageProcessor`` does it: bicubic resize of the
  shortest side to S (the other side ``int(S * long / short)``), then an S x S centre crop starting at
  ``(H - S) // 2``, ``(W - S) // 2``. The margins of a non-square image are discarded, so a box normalized to the
  crop is not normalized to the original image.

Both then apply ``CLIPImageProcessor``'s arithmetic: ``float32(uint8 * (1/255))`` computed in float64, then
``(x - mean) / std`` in float32.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from groma_core.errors import InputError

ResizeMode = Literal["square", "center-crop"]


def square_resize(image: Image.Image, size: int) -> Image.Image:
    """The RGB image resized (bicubic) to ``size`` x ``size``, aspect ratio not kept."""
    return image.convert("RGB").resize((size, size), Image.Resampling.BICUBIC)


def center_crop_resize(image: Image.Image, size: int) -> Image.Image:
    """The RGB image with its shortest side resized (bicubic) to ``size``, then centre-cropped to ``size`` x
    ``size``."""
    rgb = image.convert("RGB")
    width, height = rgb.size
    if width <= height:
        new_width, new_height = size, int(size * height / width)
    else:
        new_width, new_height = int(size * width / height), size
    resized = rgb.resize((new_width, new_height), Image.Resampling.BICUBIC)
    top, left = (new_height - size) // 2, (new_width - size) // 2
    return resized.crop((left, top, left + size, top + size))


def normalize(image: Image.Image, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """(3, H, W) float32 pixel values of an RGB image: rescaled to 0..1, then ``(x - mean) / std``."""
    x = (np.asarray(image, dtype=np.uint8).astype(np.float64) * (1 / 255)).astype(np.float32)
    x = (x - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))


def preprocess_images(
    images: Sequence[Image.Image],
    size: int,
    mode: ResizeMode,
    mean: Sequence[float],
    std: Sequence[float],
) -> Tensor:
    """A batch of PIL images of any sizes and modes -> float32 pixel values (B, 3, size, size)."""
    if len(images) == 0:
        raise InputError("preprocess needs at least one image, got an empty sequence")
    pixels = []
    for i, image in enumerate(images):
        if not isinstance(image, Image.Image):
            raise InputError(f"preprocess: images[{i}] must be a PIL.Image.Image, got {type(image).__name__}")
        if mode == "center-crop":
            if image.width != image.height:
                warnings.warn(
                    f"clip resize='center-crop' drops the margins of a {image.width}x{image.height} image: boxes "
                    "refer to its central crop, not to the whole image (use resize='square' for grounding)",
                    stacklevel=2,
                )
            resized = center_crop_resize(image, size)
        else:
            resized = square_resize(image, size)
        pixels.append(normalize(resized, mean, std))
    return torch.from_numpy(np.stack(pixels))
