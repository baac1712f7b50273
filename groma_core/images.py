"""Reading user images robustly (one RGB, fully decoded PIL image per source) and checking user boxes in pixels.

Every problem raises :class:`groma_core.errors.InputError` with one line that names the file (or argument) and what
is wrong. What ``load_image`` does, in order:

* opens a path, ``bytes`` or an already opened ``PIL.Image.Image`` (files are closed again before returning);
* refuses images with more pixels than a limit (decompression bombs). The limit is the ``max_pixels`` argument, else
  the environment variable ``GROMA_MAX_IMAGE_PIXELS``, else :data:`DEFAULT_MAX_IMAGE_PIXELS` (178,956,970, the size at
  which Pillow itself refuses to open an image); 0 turns it off. Pillow's own guard (``PIL.Image.MAX_IMAGE_PIXELS``)
  is left as the program set it, except that it is lifted, under a lock, for the instant a file header is parsed when
  the groma limit is higher than Pillow's; Pillow's ``DecompressionBombWarning`` is silenced there, since the size is
  checked here;
* refuses images with a side longer than :data:`MAX_IMAGE_SIDE` (65,535) pixels while the pixel limit is on: no
  camera or scanner makes them, and decoders slow down far more than linearly on such shapes (an animated WebP of
  1 KB may declare a 13,369,360 x 12 canvas, under the pixel limit, that takes minutes to decode);
* refuses images with a side shorter than ``min_side`` pixels (default 2): a 1x1 image is a tracking pixel or a
  placeholder, never a picture a model can say anything about;
* decodes every pixel (of the first frame only), so that a truncated or damaged file fails here and not inside a
  model; whatever a decoder raises on damaged data (Pillow raises TypeError, IndexError, struct.error... on some
  malformed headers) becomes an :class:`InputError`. Pillow's ``ImageFile.LOAD_TRUNCATED_IMAGES`` is never switched
  on (if a program switched it on itself, Pillow pads truncated files and they are accepted);
* applies the EXIF orientation (``PIL.ImageOps.exif_transpose``), so sizes and boxes refer to the image as viewers
  show it. The reference (``Image.open(..).convert('RGB')``) ignores EXIF orientation;
* takes the first frame of animated GIF/WebP/APNG files (an opened PIL image is used at the frame it shows);
* converts to 8-bit RGB: 1, L, P, RGB, RGBX, CMYK, YCbCr and HSV as Pillow's ``convert("RGB")`` does (identical to the
  reference); images with transparency (RGBA, LA, PA, RGBa, a palette or a colour key with transparency) are
  composited on opaque white, so transparent areas look like the page they would be shown on, not like the hidden
  colour underneath; 16-bit greyscale (I;16, I;16L, I;16B, I;16N, and I holding 0..65535) is scaled by its 16-bit
  range, 65535 -> 255, ``round(v * 255 / 65535)`` (Pillow's own conversion clips everything above 255 to white);
  32-bit float greyscale (F) is read as intensities in [0, 1] when all samples lie in [0, 1] and in [0, 255]
  otherwise. Other modes (LAB, La, ...), integer samples outside 0..65535 and float samples outside [0, 255] or not
  finite are refused.

User boxes are given in pixels of the image after EXIF orientation (see :func:`image_size`), as continuous corner
coordinates: the image spans x in [0, width] and y in [0, height], and a box around pixel columns 0..9 is
x1 = 0, x2 = 10. :func:`to_normalized_xyxy` accepts corners up to :data:`BOX_TOLERANCE_PX` (half a pixel, the
difference between the pixel-corner and pixel-centre conventions) outside the image and clips them onto its border;
anything further out is a coordinate-system mistake (a resized image, swapped width and height) and is refused.
"""

from __future__ import annotations

import contextlib
import glob
import io
import math
import numbers
import os
import re
import threading
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch import Tensor

from groma_core.errors import InputError, echo, printable

DEFAULT_MAX_IMAGE_PIXELS = 178_956_970
"""Largest image (width x height) read by default: 2 x Pillow's ``MAX_IMAGE_PIXELS``, where Pillow itself refuses."""

MAX_PIXELS_ENV = "GROMA_MAX_IMAGE_PIXELS"
"""Environment variable that sets the pixel limit when no ``max_pixels`` argument is given (0: no limit)."""

DEFAULT_MIN_SIDE = 2
"""Shortest accepted image side in pixels."""

MAX_IMAGE_SIDE = 65_535
"""Longest accepted image side in pixels while the pixel limit is on (the largest side JPEG can store)."""

BOX_TOLERANCE_PX = 0.5
"""How far (pixels) a user box corner may lie outside the image before it is refused; within it, it is clipped."""

IMAGE_EXTENSIONS = frozenset(".jpg .jpeg .jpe .jfif .png .apng .gif .webp .bmp .tif .tiff .pbm .pgm .ppm .pnm".split())
"""File name endings (lower case) that :func:`expand_image_sources` takes from a folder."""

ImageSource = str | os.PathLike | bytes | Image.Image
"""What :func:`load_image` reads: a path, the bytes of an image file, or an opened PIL image."""

_DIRECT_MODES = frozenset({"1", "L", "P", "RGB", "RGBX", "CMYK", "YCbCr", "HSV"})
_ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa"})
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})
_SUPPORTED_MODES = ", ".join(sorted(_DIRECT_MODES | _ALPHA_MODES | _SIXTEEN_BIT_MODES | {"F"}))
_PIL_GUARD_LOCK = threading.Lock()


def load_image(
    source: ImageSource,
    *,
    min_side: int = DEFAULT_MIN_SIDE,
    max_pixels: int | None = None,
    name: str | None = None,
) -> Image.Image:
    """Read one image as a new, fully decoded 8-bit RGB PIL image, upright according to its EXIF orientation.

    ``max_pixels``: pixel limit (None: ``GROMA_MAX_IMAGE_PIXELS`` or :data:`DEFAULT_MAX_IMAGE_PIXELS`; 0: none).
    ``name``: what error messages call the source (default: the path, the PIL image's file name or "image bytes").
    """
    label = name if name is not None else _label(source)
    if isinstance(min_side, bool) or not isinstance(min_side, int) or min_side < 1:
        raise InputError(f"min_side must be a whole number of pixels >= 1, got {echo(min_side)}")
    limit = resolve_max_pixels(max_pixels)
    with _opened(source, label, limit) as im:
        _check_dimensions(im.size, label, limit, min_side)
        _decode(im, label, limit)
        try:
            upright = ImageOps.exif_transpose(im)
            return _to_rgb(upright, label)
        except InputError:
            raise
        except Exception as e:  # noqa: BLE001 - a damaged EXIF block or palette raises many types
            raise _damaged(label, e) from e


def load_images(
    sources: Sequence[ImageSource], *, min_side: int = DEFAULT_MIN_SIDE, max_pixels: int | None = None
) -> list[Image.Image]:
    """:func:`load_image` for each source, in order; errors call a source that is not a path ``images[i] (...)``."""
    if isinstance(sources, (str, os.PathLike, bytes, bytearray, Image.Image)):
        sources = [sources]
    return [
        load_image(
            src,
            min_side=min_side,
            max_pixels=max_pixels,
            name=None if isinstance(src, (str, os.PathLike)) else f"images[{i}] ({_label(src)})",
        )
        for i, src in enumerate(sources)
    ]


def image_size(source: ImageSource) -> tuple[int, int]:
    """(width, height) of an image as shown after its EXIF orientation, without decoding pixels where the format
    allows (the size that user boxes in pixels refer to)."""
    label = _label(source)
    with _opened(source, label, None) as im:
        width, height = im.size
        try:
            orientation = im.getexif().get(0x0112, 1)  # EXIF Orientation
        except Exception as e:  # noqa: BLE001 - a damaged EXIF block raises many types
            raise _damaged(label, e) from e
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


def resolve_max_pixels(max_pixels: int | None = None) -> int | None:
    """The pixel limit in force: ``max_pixels`` if given, else ``GROMA_MAX_IMAGE_PIXELS``, else the default; None
    when the limit is off (0)."""
    if max_pixels is None:
        text = os.environ.get(MAX_PIXELS_ENV, "").strip()
        if not text:
            return DEFAULT_MAX_IMAGE_PIXELS
        try:
            max_pixels = int(text)
        except ValueError:
            max_pixels = -1
        if max_pixels < 0:
            raise InputError(
                f"{MAX_PIXELS_ENV}={echo(text)} is not a whole number of pixels >= 0 (0 turns the limit off)"
            )
    elif isinstance(max_pixels, bool) or not isinstance(max_pixels, int) or max_pixels < 0:
        raise InputError(f"max_pixels must be a whole number of pixels >= 0 (0: no limit), got {echo(max_pixels)}")
    return max_pixels or None


def expand_image_sources(patterns: Sequence[str | os.PathLike]) -> list[Path]:
    """Paths of the images named by files, folders (their image files, sorted, hidden files skipped) and glob
    patterns (``*``, ``?``, ``[...]``, ``**``; matching files sorted, taken whatever their ending), in order, each
    path once. Every pattern must match something."""
    if isinstance(patterns, (str, os.PathLike)):
        patterns = [patterns]
    if len(patterns) == 0:
        raise InputError("no images given: pass image files, folders or glob patterns")
    found: dict[Path, Path] = {}
    for pattern in patterns:
        if not isinstance(pattern, (str, os.PathLike)):
            raise InputError(f"expected a file, folder or glob pattern, got {type(pattern).__name__}: {echo(pattern)}")
        text = os.fspath(pattern)
        try:
            matches = _matches(str(text))
        except InputError:
            raise
        except OSError as e:  # a name too long for the file system, a folder that cannot be listed
            raise InputError(f"{_label(text)}: cannot be read ({_one_line(e.strerror or e)})") from e
        except ValueError as e:  # a NUL character
            raise InputError(f"{_label(text)}: not a usable path ({_one_line(e)})") from e
        for match in matches:
            found.setdefault(match.resolve(), match)
    return list(found.values())


def _matches(text: str) -> list[Path]:
    """The image files a file, folder or glob pattern names (see :func:`expand_image_sources`)."""
    path = _expand_user(text)
    if path.is_file():
        return [path]
    if path.is_dir():
        matches = sorted(
            p
            for p in path.iterdir()
            if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")
        )
        if not matches:
            endings = " ".join(sorted(IMAGE_EXTENSIONS))
            raise InputError(f"{_label(text)}: folder holds no image files (looked for {endings})")
        return matches
    if any(c in text for c in "*?["):
        matches = sorted(Path(p) for p in glob.glob(str(_expand_user(text)), recursive=True) if os.path.isfile(p))
        if not matches:
            raise InputError(f"{_label(text)}: pattern matches no files")
        return matches
    raise InputError(f"{_label(text)}: no such file or folder")


def to_normalized_xyxy(
    boxes_px: object,
    size: tuple[int, int] | Image.Image,
    *,
    tolerance: float = BOX_TOLERANCE_PX,
    what: str = "boxes",
) -> Tensor:
    """User boxes in pixels (x1, y1, x2, y2) of the image of ``size`` (width, height), or of a PIL image after its
    EXIF orientation -> float32 (N, 4) normalized xyxy. Takes a list of boxes, one flat box, an array or a tensor."""
    width, height = _image_extent(size, what)
    if not _is_number(tolerance) or not tolerance >= 0:
        raise InputError(f"tolerance must be a number of pixels >= 0, got {echo(tolerance)}")
    rows = _box_rows(boxes_px, what)
    for i, (x1, y1, x2, y2) in enumerate(rows):
        if x2 <= x1 or y2 <= y1:
            raise InputError(
                f"{what}: box {i} {_fmt(rows[i])} needs x2 > x1 and y2 > y1 (corners x1, y1, x2, y2 in pixels, "
                "not x, y, width, height)"
            )
        x_inside = -tolerance <= x1 < width and 0 < x2 <= width + tolerance
        y_inside = -tolerance <= y1 < height and 0 < y2 <= height + tolerance
        if not (x_inside and y_inside):
            raise InputError(
                f"{what}: box {i} {_fmt(rows[i])} lies outside the {width}x{height} image (x in 0..{width}, "
                f"y in 0..{height} pixels, {tolerance:g} px tolerance); boxes are in pixels of the original image "
                "after EXIF rotation"
            )
    boxes = torch.tensor(rows, dtype=torch.float64).reshape(-1, 4)
    scale = torch.tensor([width, height, width, height], dtype=torch.float64)
    clipped = torch.minimum(boxes.clamp(min=0), scale)
    normalized = (clipped / scale).float()
    flat = (normalized[:, 2] <= normalized[:, 0]) | (normalized[:, 3] <= normalized[:, 1])
    if flat.any():
        i = int(torch.nonzero(flat).flatten()[0])
        raise InputError(
            f"{what}: box {i} {_fmt(rows[i])} covers no area of the {width}x{height} image once clipped to it "
            "(it lies on the image's edge, or is thinner than float32 can tell apart); give a box inside the image"
        )
    return normalized


def to_pixels_xyxy(boxes: object, size: tuple[int, int] | Image.Image, *, what: str = "boxes") -> Tensor:
    """Normalized xyxy boxes (within [0, 1], x2 >= x1, y2 >= y1) -> float32 (N, 4) pixels of the image of ``size``
    (width, height), or of a PIL image after its EXIF orientation."""
    width, height = _image_extent(size, what)
    rows = _box_rows(boxes, what)
    for i, (x1, y1, x2, y2) in enumerate(rows):
        if not all(0.0 <= v <= 1.0 for v in rows[i]):
            raise InputError(f"{what}: box {i} {_fmt(rows[i])} is outside [0, 1] (expected normalized xyxy)")
        if x2 < x1 or y2 < y1:
            raise InputError(f"{what}: box {i} {_fmt(rows[i])} needs x2 >= x1 and y2 >= y1")
    scale = torch.tensor([width, height, width, height], dtype=torch.float64)
    return (torch.tensor(rows, dtype=torch.float64).reshape(-1, 4) * scale).float()


def _expand_user(path: str | os.PathLike) -> Path:
    """``~`` and ``~user`` expanded; a ``~user`` naming no user (or a home that cannot be found) stays as written."""
    return Path(os.path.expanduser(os.fspath(path)))


def _label(source: object) -> str:
    """How error messages call a source: its path (control characters escaped, a very long one cut in the middle),
    the PIL image's file name, or "image bytes"."""
    if isinstance(source, (str, os.PathLike)):
        text = printable(str(os.fspath(source)))
    elif isinstance(source, Image.Image):
        text = printable(getattr(source, "filename", "") or "PIL image")
    else:
        return "image bytes"
    return text if len(text) <= 200 else f"{text[:100]}...{text[-97:]}"


@contextlib.contextmanager
def _opened(source: ImageSource, label: str, limit: int | None) -> Iterator[Image.Image]:
    """The source as a (lazily loaded) PIL image; files and buffers opened here are closed on exit."""
    if isinstance(source, Image.Image):
        yield source
        return
    if isinstance(source, (str, os.PathLike)):
        path = _expand_user(source)
        try:
            if path.is_dir():
                raise InputError(f"{label}: is a directory, not an image file")
            if not path.exists():
                raise InputError(f"{label}: no such file")
            n_bytes = path.stat().st_size
            fp = path.open("rb")
        except OSError as e:
            raise InputError(f"{label}: cannot be read ({_one_line(e.strerror or e)})") from e
        if n_bytes == 0:
            fp.close()
            raise InputError(f"{label}: the file is empty (0 bytes)")
    elif isinstance(source, (bytes, bytearray, memoryview)):
        if len(source) == 0:
            raise InputError(f"{label}: no data (0 bytes)")
        fp = io.BytesIO(source)
        n_bytes = len(source)
    else:
        raise InputError(f"{label}: expected a path, image bytes or a PIL image, got {type(source).__name__}")
    with fp:
        try:
            with _pil_guard(limit):
                im = Image.open(fp)
        except UnidentifiedImageError as e:
            fp.seek(0)
            head = fp.read(16)
            raise InputError(
                f"{label}: not an image (no format Pillow knows; its {n_bytes} bytes start {head!r})"
            ) from e
        except Image.DecompressionBombError as e:
            raise _too_large(label, _pixels_in(str(e)), limit) from e
        except Exception as e:  # noqa: BLE001 - header parsers raise many types on damaged data
            raise _damaged(label, e) from e
        with im:
            yield im


@contextlib.contextmanager
def _pil_guard(limit: int | None) -> Iterator[None]:
    """While Pillow parses a header: its bomb warning off, its bomb error lifted only if ``limit`` exceeds it."""
    with _PIL_GUARD_LOCK, warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        pil_limit = Image.MAX_IMAGE_PIXELS
        lift = pil_limit is not None and (limit is None or limit > 2 * pil_limit)
        if lift:
            Image.MAX_IMAGE_PIXELS = None
        try:
            yield
        finally:
            if lift:
                Image.MAX_IMAGE_PIXELS = pil_limit


def _check_dimensions(size: tuple[int, int], label: str, limit: int | None, min_side: int) -> None:
    """Refuse images over the pixel limit or with a side shorter than ``min_side``."""
    width, height = size
    if limit is not None and width * height > limit:
        raise _too_large(label, width * height, limit, f"{width}x{height} = ")
    if limit is not None and max(width, height) > MAX_IMAGE_SIDE:
        raise InputError(
            f"{label}: image is {width}x{height} pixels; a side longer than {MAX_IMAGE_SIDE:,} pixels is refused "
            "(no camera makes one, and decoding such a shape takes minutes); if you trust the file, turn this guard "
            f"off with max_pixels=0 or the environment variable {MAX_PIXELS_ENV}=0"
        )
    if min(width, height) < min_side:
        raise InputError(
            f"{label}: image is {width}x{height} pixels; each side needs at least {min_side} pixels (smaller images "
            "hold no picture a model can describe, e.g. a 1x1 tracking pixel or a placeholder; lower min_side to "
            "accept them)"
        )


def _too_large(label: str, pixels: int | None, limit: int | None, dims: str = "") -> InputError:
    """The error for an image over the pixel limit."""
    count = f"is {dims}{pixels:,} pixels" if pixels is not None else "has too many pixels"
    bound = f"the limit of {limit:,} pixels" if limit is not None else "Pillow's limit (PIL.Image.MAX_IMAGE_PIXELS)"
    return InputError(
        f"{label}: image {count}, more than {bound} that guards against decompression bombs; if you trust the "
        f"file, raise the limit with max_pixels=N or the environment variable {MAX_PIXELS_ENV}=N (0 turns it off)"
    )


def _pixels_in(message: str) -> int | None:
    """The pixel count that a Pillow DecompressionBombError message reports, if it reports one."""
    match = re.search(r"\((\d+) pixels\)", message)
    return int(match.group(1)) if match else None


def _decode(im: Image.Image, label: str, limit: int | None) -> None:
    """Decode every pixel now, so that truncated or damaged data fails here."""
    try:
        im.load()
    except Image.DecompressionBombError as e:
        raise _too_large(label, _pixels_in(str(e)), limit) from e
    except Exception as e:  # noqa: BLE001 - decoders raise many types on damaged data (TypeError, struct.error...)
        raise _damaged(label, e) from e


def _damaged(label: str, error: BaseException) -> InputError:
    """The error for a file whose header or pixel data cannot be decoded."""
    reason = _one_line(error) or type(error).__name__
    return InputError(f"{label}: the image data is truncated or damaged ({reason}); re-download or re-export the file")


def _to_rgb(im: Image.Image, label: str) -> Image.Image:
    """A new 8-bit RGB image from a decoded image of any supported mode (see the module docstring)."""
    mode = im.mode
    if mode in _SIXTEEN_BIT_MODES:
        samples = np.asarray(im).astype(np.int64)
        low, high = int(samples.min()), int(samples.max())
        if low < 0 or high > 65535:
            raise InputError(
                f"{label}: integer samples range from {low} to {high}, outside the 16-bit range 0..65535 that is "
                "read; convert the image to 8 bits first"
            )
        return Image.fromarray(((samples * 255 + 32767) // 65535).astype(np.uint8)).convert("RGB")
    if mode == "F":
        samples = np.asarray(im, dtype=np.float64)
        if not np.isfinite(samples).all():
            raise InputError(f"{label}: float image has samples that are not finite numbers (NaN or infinity)")
        low, high = float(samples.min()), float(samples.max())
        if low < 0 or high > 255:
            raise InputError(
                f"{label}: float samples range from {low:g} to {high:g}; float images are read with values in "
                "[0, 1] or [0, 255]"
            )
        scaled = samples * 255 if high <= 1 else samples
        return Image.fromarray(np.round(scaled).astype(np.uint8)).convert("RGB")
    has_alpha = mode in _ALPHA_MODES or "transparency" in im.info
    if has_alpha or (mode == "P" and im.palette is not None and im.palette.mode == "RGBA"):
        white = Image.new("RGBA", im.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, im.convert("RGBA")).convert("RGB")
    if mode in _DIRECT_MODES:
        return im.convert("RGB")
    raise InputError(f"{label}: unsupported image mode {mode!r} (supported: {_SUPPORTED_MODES})")


def _image_extent(size: object, what: str) -> tuple[int, int]:
    """(width, height) from a size pair or a PIL image (after EXIF orientation), validated."""
    if isinstance(size, Image.Image):
        return image_size(size)
    if isinstance(size, (tuple, list)) and len(size) == 2 and all(_is_whole(v) and v > 0 for v in size):
        return int(size[0]), int(size[1])
    raise InputError(f"{what}: image size must be (width, height) in whole pixels > 0, got {echo(size)}")


def _box_rows(boxes: object, what: str) -> list[tuple[float, float, float, float]]:
    """Boxes as a list of 4 finite floats each; a flat list of numbers is one box."""
    if isinstance(boxes, (Tensor, np.ndarray)):
        is_bool = boxes.dtype == (torch.bool if isinstance(boxes, Tensor) else np.bool_)
        if is_bool or boxes.ndim not in (1, 2):
            shape = tuple(boxes.shape)
            raise InputError(f"{what}: expected numbers of shape (N, 4) or (4,), got {boxes.dtype} {shape}")
        boxes = boxes.tolist()
    if isinstance(boxes, (str, bytes)) or not isinstance(boxes, Sequence):
        raise InputError(
            f"{what}: expected a list of boxes (x1, y1, x2, y2), got {type(boxes).__name__}: {echo(boxes)}"
        )
    items = list(boxes)
    if items and not any(_is_sequence(v) for v in items):
        items = [items]
    rows = []
    for i, box in enumerate(items):
        if not _is_sequence(box):
            raise InputError(f"{what}: box {i} is {echo(box)}, not a list of 4 numbers (x1, y1, x2, y2)")
        coords = list(box.tolist() if isinstance(box, (Tensor, np.ndarray)) else box)
        if len(coords) != 4:
            raise InputError(
                f"{what}: box {i} {echo(coords)} has {len(coords)} coordinates; expected 4 (x1, y1, x2, y2)"
            )
        for j, v in enumerate(coords):
            if not _is_number(v):
                raise InputError(f"{what}: box {i} coordinate {j} is {echo(v)}, not a number")
        if not all(math.isfinite(v) for v in coords):
            raise InputError(f"{what}: box {i} {echo(coords)} has a coordinate that is not a finite number")
        rows.append(tuple(float(v) for v in coords))
    return rows


def _is_sequence(value: object) -> bool:
    if isinstance(value, (Tensor, np.ndarray)):
        return value.ndim >= 1
    return isinstance(value, Sequence) and not isinstance(value, (str, bytes))


def _is_number(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _is_whole(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _fmt(box: tuple[float, ...]) -> str:
    return "[" + ", ".join(f"{v:g}" for v in box) + "]"


def _one_line(error: object) -> str:
    return " ".join(str(error).split())
