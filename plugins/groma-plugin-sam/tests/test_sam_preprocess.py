"""SAM's input pipeline: longest side to the input size, SAM's mean/std, zero padding, point coordinates."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from groma_plugin_sam.preprocess import PIXEL_MEAN, PIXEL_STD, preprocess_image, resized_shape, to_input_frame
from PIL import Image
from transformers.models.sam.image_processing_pil_sam import SamImageProcessorPil


@pytest.mark.parametrize(
    "size, expected",
    [((480, 640), (768, 1024)), ((640, 480), (1024, 768)), ((997, 1500), (681, 1024)), ((1024, 1024), (1024, 1024))],
)
def test_resized_shape_scales_the_longest_side(size, expected):
    assert resized_shape(*size, 1024) == expected


def test_preprocess_matches_transformers_sam_image_processor():
    image = Image.new("RGB", (1500, 997), (10, 120, 240))
    image.paste((200, 30, 30), (80, 80, 500, 400))
    pixels, resized = preprocess_image(image, 1024)
    ref = SamImageProcessorPil()(images=[image], return_tensors="pt")
    assert pixels.shape == (1, 3, 1024, 1024) and pixels.dtype == torch.float32
    assert list(resized) == ref["reshaped_input_sizes"][0].tolist()
    torch.testing.assert_close(pixels, ref["pixel_values"], rtol=0, atol=1e-6)


def test_preprocess_normalizes_with_sams_statistics_and_pads_with_zeros():
    image = Image.new("RGB", (40, 20), (0, 128, 255))
    pixels, resized = preprocess_image(image, 64)
    assert resized == (32, 64)
    expected = (torch.tensor([0.0, 128.0, 255.0]) - torch.tensor(PIXEL_MEAN)) / torch.tensor(PIXEL_STD)
    torch.testing.assert_close(pixels[0, :, 10, 10], expected)
    assert torch.all(pixels[0, :, 32:] == 0)


def test_preprocess_accepts_other_modes():
    gray = Image.new("L", (30, 50), 77)
    pixels, resized = preprocess_image(gray, 64)
    assert resized == (64, 38) and torch.equal(
        pixels[0, 0, :64, :38], pixels[0, 0, :64, :38].flatten()[0].expand(64, 38)
    )


def test_points_are_scaled_into_the_resized_image():
    points = np.array([[45.0, 30.0], [0.0, 60.0]])
    out = to_input_frame(points, (60, 90), (43, 64))
    np.testing.assert_allclose(out, [[45 * 64 / 90, 30 * 43 / 60], [0.0, 43.0]])
    assert out.dtype == np.float64 and points[0, 0] == 45.0
