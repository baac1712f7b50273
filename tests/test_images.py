"""groma_core.images: every image case is written to disk with Pillow, read back and checked as a user would see it."""

from __future__ import annotations

import io
import warnings

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from groma_core.errors import InputError
from groma_core.images import (
    DEFAULT_MAX_IMAGE_PIXELS,
    MAX_PIXELS_ENV,
    expand_image_sources,
    image_size,
    load_image,
    load_images,
    resolve_max_pixels,
    to_normalized_xyxy,
    to_pixels_xyxy,
)

RED, GREEN, BLUE, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)


@pytest.fixture(autouse=True)
def _no_limit_from_the_environment(monkeypatch):
    monkeypatch.delenv(MAX_PIXELS_ENV, raising=False)


def error_of(call, *args, **kwargs) -> str:
    """The InputError message of a call; every message is one line."""
    with pytest.raises(InputError) as info:
        call(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


def pixels(img: Image.Image) -> np.ndarray:
    assert img.mode == "RGB"
    return np.asarray(img)


def first_row(source) -> list[tuple[int, ...]]:
    """Pixels of the first row of a loaded image (test images may be one pixel high)."""
    return [tuple(p) for p in pixels(load_image(source, min_side=1))[0]]


def noise_jpeg_bytes() -> bytes:
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    buffer = io.BytesIO()
    rgb.save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


# --- sources -------------------------------------------------------------------------------------------------------


def test_path_bytes_and_pil_sources_give_the_same_decoded_rgb_image(tmp_path):
    path = tmp_path / "two.png"
    original = Image.new("RGB", (6, 4), RED)
    original.paste(BLUE, (3, 0, 6, 4))
    original.save(path)
    from_path = load_image(path)
    assert from_path.size == (6, 4)
    assert tuple(pixels(from_path)[0, 0]) == RED and tuple(pixels(from_path)[0, 5]) == BLUE
    with Image.open(path) as opened:
        from_pil = load_image(opened)
    for other in (load_image(str(path)), load_image(path.read_bytes()), from_pil):
        assert np.array_equal(pixels(other), pixels(from_path))
    path.unlink()  # the returned image does not depend on the file any more
    assert tuple(pixels(from_path)[3, 5]) == BLUE


def test_a_pil_image_given_is_not_modified():
    rgba = Image.new("RGBA", (3, 3), (10, 20, 30, 0))
    result = load_image(rgba)
    assert result is not rgba and rgba.mode == "RGBA" and rgba.getpixel((0, 0)) == (10, 20, 30, 0)


def test_load_images_keeps_order_and_names_the_failing_source(tmp_path):
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    Image.new("RGB", (4, 4), RED).save(a)
    Image.new("RGB", (5, 5), GREEN).save(b)
    images = load_images([a, str(b), Image.new("L", (2, 3), 0)])
    assert [im.size for im in images] == [(4, 4), (5, 5), (2, 3)]
    assert load_images(str(a))[0].size == (4, 4)
    assert error_of(load_images, [a, b"junk data here"]).startswith("images[1] (image bytes): not an image")
    with Image.open(a) as opened:
        assert error_of(load_images, [opened], min_side=5).startswith(f"images[0] ({a}): image is 4x4 pixels")
    message = error_of(load_images, [a, tmp_path / "missing.png"])
    assert message == f"{tmp_path / 'missing.png'}: no such file"


def test_bytes_sources(tmp_path):
    assert error_of(load_image, b"") == "image bytes: no data (0 bytes)"
    message = error_of(load_image, b"GIF89a-but-not-really", name="upload.gif")
    assert message.startswith("upload.gif: not an image") and "b'GIF89a-but-not-r'" in message
    assert "expected a path, image bytes or a PIL image, got int" in error_of(load_image, 42)


# --- orientation ---------------------------------------------------------------------------------------------------


def test_exif_orientation_6_turns_the_image_upright(tmp_path):
    """Orientation 6: the stored image must be turned 90 degrees clockwise to be shown upright."""
    stored = Image.new("RGB", (40, 20), BLUE)
    stored.paste(RED, (0, 0, 20, 10))  # top-left quadrant of the stored image
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "phone.jpg"
    stored.save(path, quality=95, exif=exif)

    upright = load_image(path)
    assert upright.size == (20, 40)
    with Image.open(path) as opened:
        assert opened.size == (40, 20) and image_size(opened) == (20, 40)
    assert image_size(path) == (20, 40)
    assert image_size(upright) == (20, 40)
    px = pixels(upright).astype(int)
    assert np.abs(px[5, 15] - RED).max() < 8  # the stored top-left is now top-right
    assert np.abs(px[5, 4] - BLUE).max() < 8
    assert np.abs(px[35, 15] - BLUE).max() < 8


# --- modes ---------------------------------------------------------------------------------------------------------


def test_greyscale_and_bilevel(tmp_path):
    grey = Image.new("L", (3, 2), 77)
    grey.save(tmp_path / "grey.png")
    assert (pixels(load_image(tmp_path / "grey.png")) == 77).all()
    bilevel = Image.new("1", (4, 2), 0)
    bilevel.putpixel((1, 1), 1)
    bilevel.save(tmp_path / "bits.png")
    px = pixels(load_image(tmp_path / "bits.png"))
    assert tuple(px[1, 1]) == WHITE and tuple(px[0, 0]) == (0, 0, 0)


def test_palette_colours_are_preserved_and_transparency_shows_white(tmp_path):
    palette = Image.new("P", (3, 1))
    palette.putpalette([*RED, *GREEN, *BLUE] + [0] * 759)
    for x in range(3):
        palette.putpixel((x, 0), x)
    palette.save(tmp_path / "palette.png")
    assert first_row(tmp_path / "palette.png") == [RED, GREEN, BLUE]
    palette.save(tmp_path / "keyed.png", transparency=1)  # palette entry 1 (green) is transparent
    assert first_row(tmp_path / "keyed.png") == [RED, WHITE, BLUE]
    palette.save(tmp_path / "keyed.gif", transparency=2)
    assert first_row(tmp_path / "keyed.gif") == [RED, GREEN, WHITE]


def test_alpha_is_composited_on_white(tmp_path):
    rgba = Image.new("RGBA", (3, 1))
    rgba.putdata([(200, 10, 10, 255), (200, 10, 10, 0), (0, 0, 0, 128)])
    rgba.save(tmp_path / "rgba.png")
    row = first_row(tmp_path / "rgba.png")
    assert row[0] == (200, 10, 10) and row[1] == WHITE
    assert max(abs(v - 127) for v in row[2]) <= 1  # half-transparent black on white
    la = Image.new("LA", (2, 1))
    la.putdata([(30, 255), (30, 0)])
    la.save(tmp_path / "la.png")
    assert first_row(tmp_path / "la.png") == [(30, 30, 30), WHITE]
    grey_key = Image.new("L", (2, 1), 9)
    grey_key.putpixel((1, 0), 50)
    grey_key.save(tmp_path / "grey-key.png", transparency=9)
    assert first_row(tmp_path / "grey-key.png") == [WHITE, (50, 50, 50)]


def test_cmyk(tmp_path):
    Image.new("CMYK", (2, 2), (0, 255, 255, 0)).save(tmp_path / "cmyk.tif")
    assert (pixels(load_image(tmp_path / "cmyk.tif")) == RED).all()
    Image.new("CMYK", (8, 8), (0, 0, 0, 255)).save(tmp_path / "cmyk.jpg", quality=95)
    assert pixels(load_image(tmp_path / "cmyk.jpg")).max() < 8  # full black ink


def test_16_bit_greyscale_is_scaled_by_its_range_not_clipped(tmp_path):
    samples = np.array([[0, 257, 32768, 65535]], dtype=np.uint16)
    Image.fromarray(samples).save(tmp_path / "deep.png")  # I;16
    Image.frombytes("I;16B", (4, 1), samples.astype(">u2").tobytes()).save(tmp_path / "deep-be.tif")
    Image.fromarray(samples.astype(np.int32)).save(tmp_path / "deep-i.tif")  # I
    for name, mode in [("deep.png", "I;16"), ("deep-be.tif", "I;16B"), ("deep-i.tif", "I")]:
        with Image.open(tmp_path / name) as stored:
            assert stored.mode == mode
        assert first_row(tmp_path / name) == [(v, v, v) for v in (0, 1, 128, 255)], name
    Image.fromarray(np.array([[0, 70000]], dtype=np.int32)).save(tmp_path / "wide.tif")
    message = error_of(load_image, tmp_path / "wide.tif", min_side=1)
    assert message.startswith(str(tmp_path / "wide.tif")) and "0 to 70000" in message and "0..65535" in message


def test_float_images(tmp_path):
    Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32)).save(tmp_path / "unit.tif")
    assert pixels(load_image(tmp_path / "unit.tif", min_side=1))[0, :, 0].tolist() == [0, 128, 255]
    Image.fromarray(np.array([[0.0, 99.6, 255.0]], dtype=np.float32)).save(tmp_path / "bytes.tif")
    assert pixels(load_image(tmp_path / "bytes.tif", min_side=1))[0, :, 0].tolist() == [0, 100, 255]
    Image.fromarray(np.array([[-3.0, 1.0]], dtype=np.float32)).save(tmp_path / "signed.tif")
    assert "float samples range from -3 to 1" in error_of(load_image, tmp_path / "signed.tif", min_side=1)
    Image.fromarray(np.array([[np.nan, 1.0]], dtype=np.float32)).save(tmp_path / "nan.tif")
    assert "not finite" in error_of(load_image, tmp_path / "nan.tif", min_side=1)


@pytest.mark.parametrize(
    ("mode", "value", "expected"),
    [
        ("RGBX", (1, 2, 3, 0), (1, 2, 3)),
        ("RGBa", (200, 10, 10, 255), (200, 10, 10)),
        ("RGBa", (0, 0, 0, 0), WHITE),
        ("HSV", (0, 255, 255), RED),
        ("YCbCr", (76, 85, 255), (254, 0, 0)),
        ("I;16L", 65535, WHITE),
        ("I;16N", 257, (1, 1, 1)),
    ],
)
def test_other_modes_of_pil_images(mode, value, expected):
    assert (pixels(load_image(Image.new(mode, (2, 2), value))) == expected).all()


def test_palette_with_alpha():
    image = Image.new("PA", (2, 1))
    image.putpalette([*GREEN] * 256)
    image.putdata([(0, 255), (0, 0)])
    assert first_row(image) == [GREEN, WHITE]


def test_unsupported_mode():
    message = error_of(load_image, Image.new("LAB", (4, 4)))
    assert message.startswith("PIL image: unsupported image mode 'LAB'") and "RGBA" in message


@pytest.mark.parametrize("ext", ["gif", "webp", "png"])
def test_animated_images_give_the_first_frame(tmp_path, ext):
    frames = [Image.new("RGB", (8, 8), colour) for colour in (RED, GREEN, BLUE)]
    path = tmp_path / f"anim.{ext}"
    options = {"lossless": True} if ext == "webp" else {}
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0, **options)
    with Image.open(path) as stored:
        assert stored.n_frames == 3
    assert (pixels(load_image(path)) == RED).all()


# --- files that are not images -------------------------------------------------------------------------------------


def test_missing_directory_empty_and_text_files(tmp_path):
    assert error_of(load_image, tmp_path / "nope.jpg") == f"{tmp_path / 'nope.jpg'}: no such file"
    assert error_of(load_image, tmp_path) == f"{tmp_path}: is a directory, not an image file"
    (tmp_path / "empty.jpg").write_bytes(b"")
    assert error_of(load_image, tmp_path / "empty.jpg") == f"{tmp_path / 'empty.jpg'}: the file is empty (0 bytes)"
    (tmp_path / "notes.jpg").write_text("hello, this is not a photo\n")
    message = error_of(load_image, tmp_path / "notes.jpg")
    assert message.startswith(f"{tmp_path / 'notes.jpg'}: not an image") and "b'hello, this is " in message


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_truncated_files_are_detected(tmp_path, fmt):
    buffer = io.BytesIO()
    with Image.open(io.BytesIO(noise_jpeg_bytes())) as noise:
        noise.save(buffer, fmt)
    data = buffer.getvalue()
    path = tmp_path / f"cut.{fmt.lower()}"
    path.write_bytes(data[: len(data) // 2])
    message = error_of(load_image, path)
    assert message.startswith(f"{path}: the image data is truncated or damaged") and "truncated" in message
    with Image.open(path) as opened:  # a lazily opened PIL image is decoded too
        assert "truncated" in error_of(load_image, opened)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    path.write_bytes(data[:40])
    assert error_of(load_image, path).startswith(str(path))


def test_too_small_images(tmp_path):
    Image.new("RGB", (1, 1), RED).save(tmp_path / "pixel.gif")
    message = error_of(load_image, tmp_path / "pixel.gif")
    assert message.startswith(f"{tmp_path / 'pixel.gif'}: image is 1x1 pixels; each side needs at least 2 pixels")
    assert "min_side" in message
    assert load_image(tmp_path / "pixel.gif", min_side=1).size == (1, 1)
    Image.new("RGB", (3, 9)).save(tmp_path / "thin.png")
    assert "image is 3x9 pixels; each side needs at least 4" in error_of(load_image, tmp_path / "thin.png", min_side=4)
    assert "min_side" in error_of(load_image, tmp_path / "thin.png", min_side=0)


# --- decompression-bomb limit --------------------------------------------------------------------------------------


def test_pixel_limit_from_the_environment_and_the_argument(tmp_path, monkeypatch):
    path = tmp_path / "wide.png"
    Image.new("RGB", (20, 10), GREEN).save(path)
    assert resolve_max_pixels() == DEFAULT_MAX_IMAGE_PIXELS
    monkeypatch.setenv(MAX_PIXELS_ENV, "150")
    message = error_of(load_image, path)
    assert message.startswith(f"{path}: image is 20x10 = 200 pixels, more than the limit of 150 pixels")
    assert MAX_PIXELS_ENV in message and "max_pixels" in message
    assert load_image(path, max_pixels=200).size == (20, 10)  # the argument wins over the environment
    assert "limit of 199 pixels" in error_of(load_image, path, max_pixels=199)
    monkeypatch.setenv(MAX_PIXELS_ENV, "0")
    assert resolve_max_pixels() is None and load_image(path).size == (20, 10)
    monkeypatch.setenv(MAX_PIXELS_ENV, "lots")
    assert error_of(load_image, path).startswith(f"{MAX_PIXELS_ENV}='lots' is not a whole number")
    assert "max_pixels" in error_of(load_image, path, max_pixels=-5)


def test_pillows_own_limit_is_kept_or_lifted_only_while_opening(tmp_path, monkeypatch):
    path = tmp_path / "wide.png"
    Image.new("RGB", (20, 10), GREEN).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 50)  # Pillow refuses > 100 pixels
    message = error_of(load_image, path, max_pixels=100)
    assert message.startswith(f"{path}: image is 200 pixels, more than the limit of 100 pixels")
    assert load_image(path, max_pixels=1000).size == (20, 10)  # groma's higher limit lifts Pillow's
    assert load_image(path, max_pixels=0).size == (20, 10)
    assert Image.MAX_IMAGE_PIXELS == 50
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 150)  # Pillow would warn about 200 pixels
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_image(path, max_pixels=250).size == (20, 10)


# --- expanding files, folders and patterns -------------------------------------------------------------------------


def test_expand_image_sources(tmp_path):
    folder = tmp_path / "shots"
    folder.mkdir()
    for name in ["b.png", "a.JPG", "c.webp", "notes.txt", ".hidden.png"]:
        (folder / name).write_bytes(b"x")
    (folder / "sub").mkdir()
    assert expand_image_sources([str(folder)]) == [folder / "a.JPG", folder / "b.png", folder / "c.webp"]
    assert expand_image_sources([str(folder / "*.png"), str(folder / "notes.txt")]) == [
        folder / "b.png",
        folder / "notes.txt",
    ]
    assert expand_image_sources(str(folder / "b.png")) == [folder / "b.png"]
    both = expand_image_sources([str(folder / "b.png"), str(folder / "?.png"), str(folder)])
    assert both == [folder / "b.png", folder / "a.JPG", folder / "c.webp"]  # each file once, first place kept
    assert expand_image_sources([str(tmp_path / "**" / "c.*")]) == [folder / "c.webp"]


def test_expand_image_sources_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    assert (
        error_of(expand_image_sources, [str(tmp_path / "*.jpg")]) == f"{tmp_path / '*.jpg'}: pattern matches no files"
    )
    assert error_of(expand_image_sources, [str(tmp_path / "x.jpg")]) == f"{tmp_path / 'x.jpg'}: no such file or folder"
    assert error_of(expand_image_sources, [str(tmp_path / "empty")]).startswith(
        f"{tmp_path / 'empty'}: folder holds no image files (looked for .apng .bmp"
    )
    assert error_of(expand_image_sources, []).startswith("no images given")
    assert "got int" in error_of(expand_image_sources, [3])


# --- boxes ---------------------------------------------------------------------------------------------------------


def test_pixel_boxes_become_normalized_float32():
    boxes = to_normalized_xyxy([[0, 0, 640, 480], [64, 48, 320, 240]], (640, 480))
    assert boxes.dtype == torch.float32 and boxes.shape == (2, 4)
    assert torch.equal(boxes, torch.tensor([[0, 0, 1, 1], [0.1, 0.1, 0.5, 0.5]]))
    assert torch.equal(to_normalized_xyxy([64, 48, 320, 240], (640, 480)), boxes[1:])  # one flat box
    assert torch.equal(to_normalized_xyxy(torch.tensor([[64, 48, 320, 240]]), [640, 480]), boxes[1:])
    assert torch.equal(to_normalized_xyxy(np.array([[64.0, 48, 320, 240]]), (640, 480)), boxes[1:])
    assert to_normalized_xyxy([], (640, 480)).shape == (0, 4)
    assert torch.allclose(to_pixels_xyxy(boxes, (640, 480)), torch.tensor([[0, 0, 640, 480], [64, 48, 320, 240.0]]))


def test_pixel_boxes_within_half_a_pixel_outside_are_clipped():
    boxes = to_normalized_xyxy([[-0.5, -0.2, 100.5, 50.4]], (100, 50))
    assert torch.equal(boxes, torch.tensor([[0.0, 0.0, 1.0, 1.0]]))
    message = error_of(to_normalized_xyxy, [[0, 0, 100.6, 50]], (100, 50))
    assert message.startswith("boxes: box 0 [0, 0, 100.6, 50] lies outside the 100x50 image") and "0.5 px" in message
    assert "lies outside" in error_of(to_normalized_xyxy, [[-0.4, 0, -0.1, 10]], (100, 50))  # only in the margin
    assert "lies outside" in error_of(to_normalized_xyxy, [[0, 0, 50, 100]], (100, 50))
    assert torch.equal(to_normalized_xyxy([[0, 0, 101, 50]], (100, 50), tolerance=1), boxes)


def test_bad_pixel_boxes_are_named():
    size = (100, 50)
    assert error_of(to_normalized_xyxy, [[10, 10, 5, 20]], size, what="refer_boxes").startswith(
        "refer_boxes: box 0 [10, 10, 5, 20] needs x2 > x1 and y2 > y1"
    )
    assert "box 1 [1, 1, 1, 9] needs x2 > x1" in error_of(to_normalized_xyxy, [[0, 0, 9, 9], [1, 1, 1, 9]], size)
    assert "box 0 coordinate 2 is 'a', not a number" in error_of(to_normalized_xyxy, [[1, 2, "a", 4]], size)
    assert "box 0 coordinate 0 is True, not a number" in error_of(to_normalized_xyxy, [[True, 2, 3, 4]], size)
    assert "not a finite number" in error_of(to_normalized_xyxy, [[1, 2, float("nan"), 4]], size)
    assert "box 0 [1, 2, 3] has 3 coordinates; expected 4" in error_of(to_normalized_xyxy, [[1, 2, 3]], size)
    assert "has 5 coordinates" in error_of(to_normalized_xyxy, [1, 2, 3, 4, 5], size)
    assert "box 1 is 7, not a list of 4 numbers" in error_of(to_normalized_xyxy, [[1, 2, 3, 4], 7], size)
    assert "expected a list of boxes" in error_of(to_normalized_xyxy, "1,2,3,4", size)
    assert "shape (N, 4) or (4,)" in error_of(to_normalized_xyxy, torch.zeros(1, 1, 4), size)
    assert "image size must be (width, height)" in error_of(to_normalized_xyxy, [[1, 2, 3, 4]], (100, 0))
    assert "outside [0, 1]" in error_of(to_pixels_xyxy, [[0, 0, 1.5, 1]], size)


def test_box_size_from_an_exif_rotated_image(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "phone.jpg"
    Image.new("RGB", (40, 20)).save(path, exif=exif)
    with Image.open(path) as stored:
        boxes = to_normalized_xyxy([[0, 0, 20, 40]], stored)  # pixels of the upright 20x40 image
    assert torch.equal(boxes, torch.tensor([[0.0, 0.0, 1.0, 1.0]]))
