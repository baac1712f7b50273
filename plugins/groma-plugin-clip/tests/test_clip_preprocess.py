"""The two preprocessing modes against transformers' CLIPImageProcessor, and what each does to boxes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from groma_plugin_clip import CLIP_MEAN, CLIP_STD
from groma_plugin_clip.preprocess import center_crop_resize, preprocess_images
from PIL import Image
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

SIZES_WH = [(90, 40), (40, 90), (56, 56), (113, 70), (71, 200), (300, 299)]


def random_image(width: int, height: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.mark.parametrize("width,height", SIZES_WH)
def test_square_mode_equals_clip_image_processor_resizing_to_a_square(width, height):
    image = random_image(width, height, seed=width * height)
    processor = CLIPImageProcessorPil(size={"height": 56, "width": 56}, do_center_crop=False)
    expected = processor(images=[image], return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(preprocess_images([image], 56, "square", CLIP_MEAN, CLIP_STD), expected, rtol=0, atol=0)


@pytest.mark.filterwarnings("ignore:clip resize='center-crop' drops the margins")
@pytest.mark.parametrize("width,height", SIZES_WH)
def test_center_crop_mode_equals_clip_image_processor(width, height):
    image = random_image(width, height, seed=width + height)
    processor = CLIPImageProcessorPil(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56})
    expected = processor(images=[image], return_tensors="pt")["pixel_values"]
    got = preprocess_images([image], 56, "center-crop", CLIP_MEAN, CLIP_STD)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_square_mode_keeps_a_box_where_it_is_in_normalized_coordinates():
    image = Image.new("RGB", (200, 100), (0, 0, 0))
    image.paste((255, 255, 255), (20, 50, 100, 100))  # normalized box (0.1, 0.5, 0.5, 1.0)
    pixels = preprocess_images([image], 56, "square", (0, 0, 0), (1, 1, 1))[0, 0]
    bright = (pixels > 0.5).nonzero()
    assert bright[:, 1].min() / 56 == pytest.approx(0.1, abs=1 / 56)
    assert (bright[:, 1].max() + 1) / 56 == pytest.approx(0.5, abs=1 / 56)
    assert bright[:, 0].min() / 56 == pytest.approx(0.5, abs=1 / 56) and bright[:, 0].max() == 55


def test_center_crop_mode_drops_the_margins_and_says_so():
    image = Image.new("RGB", (200, 100), (0, 0, 0))
    image.paste((255, 255, 255), (0, 0, 40, 100))  # the left fifth: outside the central square
    with pytest.warns(UserWarning, match="drops the margins of a 200x100 image"):
        pixels = preprocess_images([image], 56, "center-crop", (0, 0, 0), (1, 1, 1))
    assert pixels.max() < 0.5
    assert center_crop_resize(image, 56).size == (56, 56)


def test_mean_and_std_are_applied_per_channel():
    image = Image.new("RGB", (10, 10), (255, 0, 51))
    pixels = preprocess_images([image], 14, "square", (0.5, 0.0, 0.1), (0.5, 1.0, 0.1))
    assert pixels[0, :, 0, 0].tolist() == pytest.approx([1.0, 0.0, 1.0], abs=1e-6)


def test_non_images_are_rejected_by_position():
    with pytest.raises(ValueError, match=r"images\[1\] must be a PIL.Image.Image, got Tensor"):
        preprocess_images([Image.new("RGB", (9, 9)), torch.zeros(3, 9, 9)], 14, "square", CLIP_MEAN, CLIP_STD)
