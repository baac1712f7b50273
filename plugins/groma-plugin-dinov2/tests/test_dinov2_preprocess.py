"""The two preprocessing paths: PIL bicubic (inference) and OpenCV bilinear (the reference's mmdet evaluation)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from groma_plugin_dinov2.preprocess import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    bilinear_pixels,
    cv2_bilinear_resize,
    pil_bicubic_pixels,
    preprocess_images,
)
from PIL import Image

SIZES_HW = [(400, 640), (448, 448), (448, 640), (300, 200), (896, 896), (1344, 1000), (37, 53), (449, 447)]


def random_image(height: int, width: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def test_bilinear_upscale_of_a_row_by_hand():
    row = np.array([[[0], [255]]], dtype=np.uint8)  # 1 x 2, one channel
    # half-pixel centres: 0 (clamped), 0.25 of the way (63.75), 0.75 (191.25), 255 (clamped)
    assert cv2_bilinear_resize(row, 4, 1)[0, :, 0].tolist() == [0, 64, 191, 255]


def test_bilinear_halving_averages_2x2_blocks_rounding_half_up():
    image = random_image(6, 8, seed=3)
    blocks = image.reshape(3, 2, 4, 2, 3).astype(np.int64).sum(axis=(1, 3))
    np.testing.assert_array_equal(cv2_bilinear_resize(image, 4, 3), (blocks + 2) // 4)


def test_bilinear_resize_to_the_same_size_is_the_identity():
    image = random_image(448, 448, seed=4)
    np.testing.assert_array_equal(cv2_bilinear_resize(image, 448, 448), image)


@pytest.mark.parametrize("height,width", SIZES_HW)
def test_bilinear_resize_equals_opencv_bit_for_bit(height, width):
    # exact on purpose: OpenCV's uint8 INTER_LINEAR is integer fixed-point arithmetic (11-bit weights, the rounding
    # shift), the same in every build, so any difference is a real one
    cv2 = pytest.importorskip("cv2")
    image = random_image(height, width, seed=height * width)
    for size in (448, 112):
        expected = cv2.resize(image, (size, size), interpolation=cv2.INTER_LINEAR)
        np.testing.assert_array_equal(cv2_bilinear_resize(image, size, size), expected)


# What the reference fixes is the resized uint8 image (integer arithmetic, bit-exact above) and the formula of mmcv's
# normalization, (x - mean) * (1 / std) on float32 pixels with mmdet's float32 mean and std. How OpenCV rounds that
# float arithmetic is not fixed: whether the float64 scalars are cast to float32 first, SIMD or FMA paths, differ
# between builds (opencv-python-headless 5.0.0.93 agreed bit for bit; 5.1.0.95 differs by up to 2.4e-7, one or two
# float32 ULPs). Each of the two roundings moves a value by at most 1/2 ULP, which for |pixel| <= 2.7 (the range of
# normalized uint8 values) bounds a disagreement between two correct implementations by about 5e-7.
# PIXEL_FLOAT_ATOL = 1e-6 admits that and is still 17,000 times smaller than one grey level after normalization
# (1 / (255 * std) ~ 0.017), so a resize off by one level anywhere fails.
PIXEL_FLOAT_ATOL = 1e-6


def test_bilinear_pixels_equal_the_mmdet_pipeline():
    """mmcv ``imresize`` (cv2 bilinear) then ``imnormalize`` with mmdet's float32 mean/std, to_rgb on a BGR load,
    equal up to the float32 rounding of the normalization (see PIXEL_FLOAT_ATOL)."""
    cv2 = pytest.importorskip("cv2")
    rgb = random_image(400, 640, seed=5)
    bgr = np.ascontiguousarray(rgb[..., ::-1])  # what mmdet's LoadImageFromFile gives
    resized = cv2.resize(bgr, (448, 448), interpolation=cv2.INTER_LINEAR).astype(np.float32)
    mean = np.float64(np.array([m * 255 for m in IMAGENET_MEAN], dtype=np.float32).reshape(1, -1))
    std_inv = 1 / np.float64(np.array([s * 255 for s in IMAGENET_STD], dtype=np.float32).reshape(1, -1))
    cv2.cvtColor(resized, cv2.COLOR_BGR2RGB, resized)
    cv2.subtract(resized, mean, resized)
    cv2.multiply(resized, std_inv, resized)
    ours = bilinear_pixels(Image.fromarray(rgb), 448)
    assert ours.dtype == np.float32
    np.testing.assert_allclose(ours, resized.transpose(2, 0, 1), rtol=0, atol=PIXEL_FLOAT_ATOL)


def test_pil_path_is_bicubic_resize_then_processor_arithmetic():
    image = Image.fromarray(random_image(400, 640, seed=6))
    resized = np.asarray(image.resize((448, 448), Image.Resampling.BICUBIC)).astype(np.float64)
    expected = ((resized / 255 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)).transpose(2, 0, 1)
    np.testing.assert_allclose(pil_bicubic_pixels(image, 448), expected, rtol=0, atol=1e-6)


def test_the_two_paths_differ_slightly_on_a_resized_image():
    images = [Image.fromarray(random_image(400, 640, seed=7))]
    bicubic = preprocess_images(images, 448, "pil-bicubic")
    bilinear = preprocess_images(images, 448, "bilinear")
    assert bicubic.shape == bilinear.shape == (1, 3, 448, 448)
    assert 0 < (bicubic - bilinear).abs().max() < 5  # same image, different filters
    same = [Image.fromarray(random_image(448, 448, seed=8))]  # no resize: only the normalization arithmetic differs
    torch.testing.assert_close(preprocess_images(same, 448, "bilinear"), preprocess_images(same, 448, "pil-bicubic"))
