"""Turning PIL images into DINOv2 pixel values the two ways the reference does.

* ``pil-bicubic`` (the reference's inference path, ``run_groma.py``): ``img.convert('RGB').resize((S, S))`` with
  Pillow's bicubic filter, then Hugging Face ``BitImageProcessor`` arithmetic: ``float32(uint8 * (1/255))`` computed
  in float64, then ``(x - mean) / std`` in float32.
* ``bilinear`` (the reference's mmdet evaluation path): ``cv2.resize(..., INTER_LINEAR)`` to S x S without keeping
  the aspect ratio, then mmcv's ``imnormalize``: ``(x - 255 * mean) * (1 / (255 * std))``, each step computed in
  float64 and stored as float32. The resize is OpenCV's fixed-point algorithm re-implemented in numpy (no OpenCV
  needed); it matches ``cv2.resize`` bit for bit on x86 builds.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from groma_core.errors import InputError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

ResizeMethod = Literal["pil-bicubic", "bilinear"]

_COEF_BITS = 11  # OpenCV's INTER_RESIZE_COEF_BITS: linear weights are integers summing to 2048
_COEF_SCALE = 1 << _COEF_BITS


def pil_bicubic_pixels(image: Image.Image, size: int, height: int | None = None) -> np.ndarray:
    """(3, height, size) float32 pixel values of one image by the reference's PIL path (height defaults to
    size: a square)."""
    rgb = image.convert("RGB").resize((size, height or size), Image.Resampling.BICUBIC)
    x = (np.asarray(rgb, dtype=np.uint8).astype(np.float64) * (1 / 255)).astype(np.float32)
    x = (x - np.asarray(IMAGENET_MEAN, dtype=np.float32)) / np.asarray(IMAGENET_STD, dtype=np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))


def _linear_taps(n_in: int, n_out: int, clamp_weights: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """OpenCV's INTER_LINEAR taps along one axis: source indices (i0, i1) and fixed-point weights (w0, w1).

    Centres are aligned (``src = (dst + 0.5) * n_in / n_out - 0.5``, computed in double, rounded to float). Along x
    OpenCV clamps a position outside the image to the edge pixel with weights (1, 0) (``clamp_weights``); along y it
    keeps the weights and only clamps the row indices.
    """
    scale = 1.0 / (n_out / n_in)
    pos = ((np.arange(n_out, dtype=np.float64) + 0.5) * scale - 0.5).astype(np.float32)
    i0 = np.floor(pos).astype(np.int64)
    frac = (pos - i0.astype(np.float32)).astype(np.float32)
    if clamp_weights:
        outside = (i0 < 0) | (i0 >= n_in - 1)
        frac[outside] = 0
        i0 = np.clip(i0, 0, n_in - 1)
    w0 = np.rint((np.float32(1) - frac) * np.float32(_COEF_SCALE)).astype(np.int32)
    w1 = np.rint(frac * np.float32(_COEF_SCALE)).astype(np.int32)
    return np.clip(i0, 0, n_in - 1), np.clip(i0 + 1, 0, n_in - 1), w0, w1


def cv2_bilinear_resize(array: np.ndarray, width: int, height: int) -> np.ndarray:
    """``cv2.resize(array, (width, height), interpolation=cv2.INTER_LINEAR)`` for a uint8 (H, W, C) array.

    A horizontal pass with 11-bit integer weights, then a vertical pass with the rounding of OpenCV's SIMD kernel:
    ``((r0 >> 4) * w0 >> 16) + ((r1 >> 4) * w1 >> 16)``, plus 2, shifted right by 2.
    """
    if array.dtype != np.uint8 or array.ndim != 3:
        raise InputError(f"cv2_bilinear_resize needs a uint8 (H, W, C) array, got {array.dtype} {array.shape}")
    src = array.astype(np.int32)
    x0, x1, wx0, wx1 = _linear_taps(src.shape[1], width, clamp_weights=True)
    y0, y1, wy0, wy1 = _linear_taps(src.shape[0], height, clamp_weights=False)
    wx0, wx1 = wx0[None, :, None], wx1[None, :, None]
    row0 = src[y0][:, x0] * wx0 + src[y0][:, x1] * wx1
    row1 = src[y1][:, x0] * wx0 + src[y1][:, x1] * wx1
    wy0, wy1 = wy0[:, None, None], wy1[:, None, None]
    mixed = (((row0 >> 4) * wy0) >> 16) + (((row1 >> 4) * wy1) >> 16)
    return np.clip((mixed + 2) >> 2, 0, 255).astype(np.uint8)


def bilinear_pixels(image: Image.Image, size: int, height: int | None = None) -> np.ndarray:
    """(3, height, size) float32 pixel values of one image by the reference's mmdet path (cv2 bilinear + mmcv
    normalization; height defaults to size: a square)."""
    rgb = np.asarray(image.convert("RGB"), dtype=np.uint8)
    x = cv2_bilinear_resize(rgb, size, height or size).astype(np.float32)
    mean = (np.asarray(IMAGENET_MEAN) * 255).astype(np.float32).astype(np.float64)  # mmdet stores float32
    std_inv = 1 / (np.asarray(IMAGENET_STD) * 255).astype(np.float32).astype(np.float64)
    x = (x.astype(np.float64) - mean).astype(np.float32)
    x = (x.astype(np.float64) * std_inv).astype(np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))


def letterbox_size(width: int, height: int, size: int) -> tuple[int, int]:
    """(w, h) of a ``width`` x ``height`` image scaled, aspect kept, so that its longer side is ``size`` (each
    side at least one pixel)."""
    scale = size / max(width, height)
    return min(size, max(1, round(width * scale))), min(size, max(1, round(height * scale)))


def preprocess_images(
    images: Sequence[Image.Image], size: int, method: ResizeMethod, letterbox: bool = False
) -> Tensor:
    """A batch of PIL images of any sizes -> float32 pixel values (B, 3, size, size): resized to fill the square
    (the reference), or with ``letterbox`` scaled with their aspect ratio kept into its top-left corner, the rest
    zero (the mean colour after normalization)."""
    if len(images) == 0:
        raise InputError("preprocess needs at least one image, got an empty sequence")
    convert = pil_bicubic_pixels if method == "pil-bicubic" else bilinear_pixels
    pixels = []
    for i, image in enumerate(images):
        if not isinstance(image, Image.Image):
            raise InputError(f"preprocess: images[{i}] must be a PIL.Image.Image, got {type(image).__name__}")
        if not letterbox:
            pixels.append(convert(image, size))
            continue
        w, h = letterbox_size(image.width, image.height, size)
        canvas = np.zeros((3, size, size), dtype=np.float32)
        canvas[:, :h, :w] = convert(image, w, h)
        pixels.append(canvas)
    return torch.from_numpy(np.stack(pixels))
