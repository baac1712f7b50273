"""Fuzzing image reading: mutated PNG/JPEG/GIF/WebP/TIFF bytes, odd modes and sample values, decompression bombs
and extreme shapes all end in an 8-bit RGB image or one short InputError line; plus the campaign's defects (a TIFF
whose StripOffsets tag is typed FLOAT, an animated WebP with a 13,369,360 x 12 canvas, ``~nouser/``, a box on the
image's edge)."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from groma_core.errors import MAX_LINE_CHARS, InputError
from groma_core.images import (
    MAX_IMAGE_SIDE,
    MAX_PIXELS_ENV,
    expand_image_sources,
    image_size,
    load_image,
    to_normalized_xyxy,
)

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning:PIL")  # Pillow warns about the damage it skips

FUZZ = settings(
    max_examples=60,
    deadline=5000,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
#: pixel limit of the mutation fuzzing: a mutated header may declare any size up to it, and the decoder may fill it
FUZZ_MAX_PIXELS = 1_000_000


@pytest.fixture(autouse=True)
def _no_limit_from_the_environment(monkeypatch):
    monkeypatch.delenv(MAX_PIXELS_ENV, raising=False)


def encoded(fmt: str, **save) -> bytes:
    """A small picture with some structure, in ``fmt`` (GIF and WebP: three frames)."""
    rng = np.random.default_rng(0)
    frames = [Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)) for _ in range(3)]
    buffer = io.BytesIO()
    if fmt in ("GIF", "WEBP"):
        frames[0].save(buffer, fmt, save_all=True, append_images=frames[1:], duration=50, **save)
    elif fmt == "JPEG":
        exif = Image.Exif()
        exif[0x0112] = 6  # rotated: exercises the EXIF path
        frames[0].save(buffer, fmt, exif=exif, **save)
    else:
        frames[0].save(buffer, fmt, **save)
    return buffer.getvalue()


def palette_png() -> bytes:
    """A palette PNG with a transparent colour."""
    buffer = io.BytesIO()
    Image.open(io.BytesIO(encoded("PNG"))).convert("P").save(buffer, "PNG", transparency=3)
    return buffer.getvalue()


SAMPLES = {
    "png": encoded("PNG"),
    "png-palette": palette_png(),
    "jpeg": encoded("JPEG", quality=80),
    "gif": encoded("GIF"),
    "webp": encoded("WEBP", lossless=True),
    "tiff": encoded("TIFF"),
    "tiff-lzw": encoded("TIFF", compression="tiff_lzw"),
}


def assert_clear(error: InputError) -> None:
    message = str(error)
    assert message and "\n" not in message and len(message) <= MAX_LINE_CHARS, message[:300]


def load_or_refuse(source, **kwargs) -> Image.Image | None:
    try:
        image = load_image(source, **kwargs)
    except InputError as exc:
        assert_clear(exc)
        return None
    assert image.mode == "RGB" and min(image.size) >= kwargs.get("min_side", 2)
    return image


@st.composite
def mutated(draw) -> bytes:
    """One sample with a few bytes changed, runs inserted or removed, and maybe cut short."""
    data = bytearray(SAMPLES[draw(st.sampled_from(sorted(SAMPLES)))])
    for _ in range(draw(st.integers(1, 6))):
        kind = draw(st.sampled_from(["set", "insert", "delete", "header"]))
        where = draw(st.integers(0, len(data) - 1))
        if kind == "set":
            data[where] = draw(st.integers(0, 255))
        elif kind == "header":  # headers hold sizes, offsets and types: hit the first bytes hardest
            data[where % 64] = draw(st.sampled_from([0, 1, 0x7F, 0x80, 0xFF, draw(st.integers(0, 255))]))
        elif kind == "insert":
            data[where:where] = draw(st.binary(min_size=1, max_size=16))
        else:
            del data[where : where + draw(st.integers(1, 16))]
    if draw(st.booleans()):
        data = data[: draw(st.integers(1, len(data)))]
    return bytes(data)


@settings(FUZZ, max_examples=200)
@given(data=mutated())
def test_mutated_files_give_an_image_or_one_clear_line(data):
    load_or_refuse(data, max_pixels=FUZZ_MAX_PIXELS)


@settings(FUZZ, max_examples=150)
@given(
    sample=st.sampled_from(["tiff", "tiff-lzw"]),
    edits=st.lists(
        st.tuples(
            st.integers(0, 50),  # which IFD entry (modulo their number)
            st.sampled_from(["type", "count", "value"]),
            st.integers(0, 2**32 - 1) | st.integers(0, 20),
        ),
        min_size=1,
        max_size=3,
    ),
)
def test_tiff_tags_of_any_type_count_or_value_give_an_image_or_one_clear_line(sample, edits):
    """A TIFF's tags say where its pixels are and how they are stored; any field of any tag may be wrong (the
    campaign's case: StripOffsets typed FLOAT raised a TypeError)."""
    data = bytearray(SAMPLES[sample])
    (ifd,) = struct.unpack("<I", data[4:8])
    (count,) = struct.unpack("<H", data[ifd : ifd + 2])
    for which, field, value in edits:
        entry = ifd + 2 + 12 * (which % count)
        if field == "type":
            data[entry + 2 : entry + 4] = struct.pack("<H", value % 2**16)
        elif field == "count":
            data[entry + 4 : entry + 8] = struct.pack("<I", value)
        else:
            data[entry + 8 : entry + 12] = struct.pack("<I", value)
    load_or_refuse(bytes(data), max_pixels=FUZZ_MAX_PIXELS)


@FUZZ
@given(data=mutated())
def test_image_size_of_mutated_files_is_a_size_or_one_clear_line(data):
    try:
        width, height = image_size(data)
    except InputError as exc:
        assert_clear(exc)
    else:
        assert width >= 0 and height >= 0


MODES = ["1", "L", "P", "LA", "PA", "RGB", "RGBA", "RGBX", "RGBa", "CMYK", "YCbCr", "HSV", "LAB", "I", "I;16", "F"]


@FUZZ
@given(
    mode=st.sampled_from(MODES),
    value=st.one_of(
        st.integers(-(2**31), 2**31 - 1),
        st.floats(allow_nan=True, allow_infinity=True, width=32),
        st.tuples(*[st.integers(0, 255)] * 4),
    ),
    size=st.tuples(st.integers(1, 5), st.integers(1, 5)),
)
def test_any_mode_and_sample_value_gives_rgb_or_one_clear_line(mode, value, size):
    try:
        image = Image.new(mode, size)
        image.paste(value if not isinstance(value, tuple) else value[: len(image.getbands())], (0, 0, 1, 1))
    except (ValueError, TypeError, OverflowError):  # Pillow itself cannot hold that value in that mode
        return
    if mode in ("P", "PA") and isinstance(value, int) and value % 2:
        image.info["transparency"] = 0
    load_or_refuse(image, min_side=1)


# -- bombs and extreme shapes ----------------------------------------------------------------------------------
def png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares a size and holds a few bytes of pixel data (a decompression bomb's header)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


@FUZZ
@given(width=st.integers(1, 2**31 - 1), height=st.integers(1, 2**31 - 1))
def test_declared_sizes_are_refused_before_decoding(width, height):
    """Any declared size over the pixel limit or the side limit is refused from the header alone."""
    if width * height <= 4_000_000 and max(width, height) <= MAX_IMAGE_SIDE:
        return  # small enough to be decoded (and found truncated): covered by the mutation fuzzing
    with pytest.raises(InputError) as info:
        load_image(png_header_only(width, height), max_pixels=4_000_000)
    assert_clear(info.value)
    assert "pixels" in str(info.value)


def test_a_decompression_bomb_is_refused_with_the_way_out():
    message = str(pytest.raises(InputError, load_image, png_header_only(50_000, 50_000)).value)
    assert "2,500,000,000 pixels" in message and MAX_PIXELS_ENV in message


def animated_webp_with_canvas(width: int, height: int) -> bytes:
    """A three-frame animated WebP of 16 x 12 frames whose VP8X header declares a ``width`` x ``height`` canvas."""
    data = bytearray(encoded("WEBP", lossless=True))
    at = data.find(b"VP8X")
    data[at + 12 : at + 15] = (width - 1).to_bytes(3, "little")
    data[at + 15 : at + 18] = (height - 1).to_bytes(3, "little")
    return bytes(data)


def test_a_wide_animated_webp_canvas_is_refused_before_decoding():
    """The campaign's 1 KB WebP with a 13,369,360 x 12 canvas (under the pixel limit) took 110 s to decode."""
    data = animated_webp_with_canvas(13_369_360, 12)
    assert len(data) < 4000 and 13_369_360 * 12 < 178_956_970
    message = str(pytest.raises(InputError, load_image, data).value)
    assert "13369360x12" in message and "65,535" in message and MAX_PIXELS_ENV in message
    assert load_image(animated_webp_with_canvas(64, 48)).size == (64, 48)  # a sane canvas still reads


def test_a_tiff_whose_strip_offsets_are_typed_float_is_one_clear_line(tmp_path):
    data = bytearray(encoded("TIFF"))
    (ifd,) = struct.unpack("<I", data[4:8])
    (count,) = struct.unpack("<H", data[ifd : ifd + 2])
    for i in range(count):
        entry = ifd + 2 + 12 * i
        if struct.unpack("<H", data[entry : entry + 2])[0] == 273:  # StripOffsets
            data[entry + 2 : entry + 4] = struct.pack("<H", 11)  # FLOAT
    path = tmp_path / "float-offsets.tif"
    path.write_bytes(bytes(data))
    message = str(pytest.raises(InputError, load_image, path).value)
    assert message.startswith(f"{path}: the image data is truncated or damaged")


def test_an_unknown_user_in_a_path_is_no_such_file(tmp_path):
    message = str(pytest.raises(InputError, load_image, "~no-such-user-here/a.png").value)
    assert message == "~no-such-user-here/a.png: no such file"
    message = str(pytest.raises(InputError, expand_image_sources, ["~no-such-user-here/a.png"]).value)
    assert "no such file" in message
    message = str(pytest.raises(InputError, expand_image_sources, ["~no-such-user-here/*.png"]).value)
    assert "matches no files" in message


def test_a_file_name_with_a_newline_is_named_on_one_line_by_the_cli(tmp_path, capsys):
    from groma_core.cli import main

    path = tmp_path / "two\nlines.png"
    path.write_bytes(b"not a picture at all")
    assert main(["ground", str(path), "Hi."]) == 1
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "two\\nlines.png" in err and "not an image" in err


# -- boxes -----------------------------------------------------------------------------------------------------
@FUZZ
@given(
    box=st.lists(
        st.one_of(
            st.floats(allow_nan=True, allow_infinity=True),
            st.floats(-1, 1).map(lambda d: 100 + d),  # at the right edge of a 100 x 50 image
            st.floats(-1, 1).map(lambda d: 50 + d),
            st.floats(-1e-6, 1e-6),
        ),
        min_size=4,
        max_size=4,
    )
)
def test_a_box_that_passes_is_a_valid_normalized_box(box):
    """Whatever pixel box is given, it is refused with one line or becomes a box with area inside [0, 1]."""
    try:
        normalized = to_normalized_xyxy([box], (100, 50))
    except InputError as exc:
        assert_clear(exc)
        return
    from groma_core.boxes import check_boxes

    check_boxes(normalized)  # what the model checks after normalisation never fails


def test_a_box_on_the_image_edge_is_refused_before_normalisation_fails():
    message = str(pytest.raises(InputError, to_normalized_xyxy, [[100 - 1e-6, 0, 100.4, 10]], (100, 50)).value)
    assert "covers no area of the 100x50 image" in message


@FUZZ
@given(text=st.text(alphabet="ab*?[]!~/\\\n\x00 ", max_size=12))
def test_any_file_folder_or_pattern_gives_paths_or_one_clear_line(tmp_path_factory, text):
    folder = tmp_path_factory.mktemp("pics")
    Image.new("RGB", (4, 4)).save(folder / "a.png")
    (folder / "b").mkdir()
    try:
        found = expand_image_sources([f"{folder}/{text}"])
    except InputError as exc:
        assert_clear(exc)
    else:
        assert found and all(p.is_file() for p in found)
