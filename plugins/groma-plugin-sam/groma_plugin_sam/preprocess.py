"""SAM's own input pipeline: longest side resized to the encoder's input, SAM's mean/std, zero padding.

segment-anything resizes with ``ResizeLongestSide.apply_image`` (torchvision's ``resize`` on a PIL image, i.e.
Pillow's bilinear filter) and normalizes then pads in ``Sam.preprocess``; this module does the same with Pillow and
torch alone.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.nn import functional as F

#: segment-anything's ``pixel_mean`` and ``pixel_std`` (RGB, 0-255 scale)
PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)


def resized_shape(height: int, width: int, long_side: int) -> tuple[int, int]:
    """(height, width) after scaling the longest side to ``long_side``, rounded as segment-anything rounds."""
    scale = long_side * 1.0 / max(height, width)
    return int(height * scale + 0.5), int(width * scale + 0.5)


def preprocess_image(image: Image.Image, long_side: int) -> tuple[Tensor, tuple[int, int]]:
    """One image -> (pixel values (1, 3, long_side, long_side) float32, resized (height, width) before padding)."""
    rgb = image.convert("RGB")
    width, height = rgb.size
    new_h, new_w = resized_shape(height, width, long_side)
    resized = rgb.resize((new_w, new_h), Image.Resampling.BILINEAR)
    pixels = torch.from_numpy(np.array(resized, dtype=np.uint8)).permute(2, 0, 1).to(torch.float32)
    mean = torch.tensor(PIXEL_MEAN, dtype=torch.float32)[:, None, None]
    std = torch.tensor(PIXEL_STD, dtype=torch.float32)[:, None, None]
    pixels = (pixels - mean) / std
    return F.pad(pixels, (0, long_side - new_w, 0, long_side - new_h))[None], (new_h, new_w)


def to_input_frame(points: np.ndarray, original: tuple[int, int], resized: tuple[int, int]) -> np.ndarray:
    """Points (N, 2) as (x, y) pixels of the original (height, width) image -> pixels of the resized image
    (float64, as ``ResizeLongestSide.apply_coords``)."""
    out = points.astype(np.float64)
    out[:, 0] = out[:, 0] * (resized[1] / original[1])
    out[:, 1] = out[:, 1] * (resized[0] / original[0])
    return out
