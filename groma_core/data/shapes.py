"""Synthetic grounding datasets of coloured shapes, annotated in the reference Groma's own formats.

``groma data shapes OUT --images 200 --seed 0`` (or :func:`write_shapes_dataset`) draws images of 1-8 solid shapes
(circle, square, rectangle, triangle, ellipse, star, diamond, hexagon) in named colours (:data:`PALETTE`), of varied
sizes and drawing (occlusion) order, on plain, gradient, noisy, striped or checkered backgrounds, in images of varied,
mostly non-square sizes; and writes::

    OUT/
      dataset.json                         summary: generator, seed, options, palette, counts and files per split
      images/000001.png ...                8-bit RGB PNGs, named by image id (1-based)
      annotations/
        scenes_{split}.json                the ground truth everything else is derived from (see below)
        detection_{split}.json             COCO detection, one category per colour x shape (stage 1)
        rec_{split}.json                   RefCOCO-style REC: one "image" entry per referring expression
        region_captions_{split}.json       VG region captions, one "image" entry per region (SingleRoundVG, vg_test)
        region_captions_multi_{split}.json VG region captions, one entry per image with all its regions (MultiRoundsVG)
        flickr_{split}.json                Flickr30k-Entities grounded captions, MDETR style (tokens_positive)
        lvis_ground_{split}.json           LVIS-Ground queries: one "image" entry per (image, category present)
        instruct_{split}.json              Groma Instruct multi-turn grounded conversations
        captions_{split}.json              LLaVA-style image caption conversations

``{split}`` is ``train`` and ``val`` (no val files when ``--val-fraction 0``). ``file_name`` everywhere is relative
to ``OUT/images`` (the ``--img-prefix`` of the reference's loaders). Boxes are ``[x, y, w, h]`` integer pixels of the
original image around the *visible* pixels of a shape (pixel columns 0..9 give x = 0, w = 10); ``area`` is the number
of visible pixels. A shape keeps at least 60 % of its pixels visible, and shapes of one colour never touch.

Formats, as the reference's loaders read them (``groma/data/datasets/*.py``, ``groma/eval/*.py``):

* detection: COCO ``images`` (id, file_name, height, width), ``annotations`` (id, image_id, category_id, bbox,
  area, iscrowd 0), ``categories`` the colour x shape entries of the LVIS-Ground vocabulary (``red_circle``, ...):
  the proposer is trained class-agnostic, the categories serve the optional attribute loss of a detection stage.
  Annotation ids are ``image_id * 100 + k``
  (k = drawing order) and are the object ids used by every other file (``original_id``).
* rec: each ``images`` entry is one expression (id, file_name, height, width, ``caption`` = expression,
  ``original_id`` = image id, ``ref_type``) with one annotation (bbox, area, ``original_id`` = object id).
  Expressions use colour, shape, size ("the small red circle", "the biggest shape"), position ("the leftmost
  circle") and relations ("the blue square left of the green triangle"); each is checked to pick out exactly one
  shape (:func:`resolve_expression`).
* region_captions: COCO with ``annotations[j].caption`` ("a small red circle in the top left corner, partly hidden
  by a blue square"), category ``object``; the single-region file has one image entry (``original_id``) per region.
* flickr: one entry per image with ``caption``; each annotation (one shape) has ``tokens_positive`` ``[[start,
  end]]``, character offsets of its phrase in the caption; shapes of one phrase ("two blue squares") share a span.
* lvis_ground: LVIS v1 layout. Categories are the shape names (``circle``) and colour+shape names
  (``red_circle``; the reference turns ``_`` into a space); ids are fixed (shapes first, then colours x shapes), and
  every category is listed in every split with ``frequency`` (r/c/f from its image count in that file),
  ``image_count``, ``instance_count``, ``synonyms`` and ``def``. Each image entry is one query (as in
  ``lvis_test.json``): ``coco_url`` (``http://images.cocodataset.org/`` + file_name, from which mmdet derives the
  file name), ``file_name``, ``original_id``, ``neg_category_ids`` (categories absent from the image),
  ``not_exhaustive_category_ids`` ``[]``; its annotations are every shape of the category.
* instruct: list of ``{id, file_name, height, width, boxes: [[x, y, w, h]] (all shapes, in drawing order),
  conversation: [{from: "human", value}, {from: "gpt", value, box_inds}, ...]}``; a gpt value grounds phrases as
  ``<p>phrase</p><roi><ground_box>...</roi>`` with exactly ``len(box_inds)`` ``<ground_box>``, in ``box_inds``
  order. Human turns carry no ``[grounding]`` (the reference's loader prepends it).
* captions: list of ``{id, image, conversations: [{from: "human", value: "<image>\\n..."}, {from: "gpt", value}]}``.
* scenes: ``images`` entries with id, file_name, width, height, ``background`` (kind, colours) and ``objects`` (id,
  index = drawing order, shape, colour, rgb, bbox, area, ``shape_area`` = pixels of the whole shape before
  occlusion, ``occluded_by`` = indices of the shapes drawn over it).

Image ``k`` depends only on the seed and ``k``; the same options give byte-identical files (PNGs carry no metadata,
JSON is written with sorted keys).
"""

from __future__ import annotations

import json
import math
import re
import shutil
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from groma_core.errors import InputError
from groma_core.tokens import GROUND_BOX, IMAGE, P_CLOSE, P_OPEN, ROI_CLOSE, ROI_OPEN

GENERATOR = "groma_core.data.shapes"
FORMAT_VERSION = 1

#: the named colours shapes are filled with (exact RGB values, no antialiasing)
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 40),
    "green": (40, 160, 60),
    "blue": (30, 80, 220),
    "yellow": (245, 210, 30),
    "orange": (245, 130, 20),
    "purple": (130, 50, 170),
    "pink": (245, 120, 190),
    "brown": (120, 70, 30),
    "black": (20, 20, 20),
    "white": (250, 250, 250),
    "gray": (128, 128, 128),
    "cyan": (30, 200, 220),
}
SHAPES: tuple[str, ...] = ("circle", "square", "rectangle", "triangle", "ellipse", "star", "diamond", "hexagon")
BACKGROUNDS: tuple[str, ...] = ("plain", "linear-gradient", "radial-gradient", "noise", "stripes", "checker")
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
SUPERLATIVES: tuple[str, ...] = ("leftmost", "rightmost", "topmost", "bottommost", "biggest", "smallest")
SPLITS: tuple[str, ...] = ("train", "val")

#: the annotation file (``annotations/{stem}_{split}.json``) that each ``groma train`` dataset format reads
FORMAT_FILES: dict[str, str] = {
    "detection": "detection",
    "rec": "rec",
    "grounding": "lvis_ground",
    "grounded-caption": "flickr",
    "region-caption": "region_captions",
    "region-caption-multi": "region_captions_multi",
    "refcocog-caption": "rec",
    "conversation": "captions",
    "instruct": "instruct",
}

MIN_SIDE = 64  #: smallest image side the generator accepts
MIN_VISIBLE_FRACTION = 0.6  #: share of a shape's pixels that stays visible when later shapes cover it
MIN_SHAPE_PIXELS = 150  #: fewest visible pixels of a shape
SIZE_RATIO = 1.5  #: "big"/"small"/"biggest"/"smallest" need this area ratio to every other candidate
POSITION_MARGIN = 0.05  #: "leftmost" etc. need this share of the image side between the centres

_BG_DISTANCE = 70.0  # smallest RGB distance between a background colour and any palette colour
_NOISE_AMPLITUDE = 14
_PLACEMENT_ATTEMPTS = 40
_MIN_SHAPE_SIZE = 24.0  # pixels across
_NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
                 "twelve")
_BACKGROUND_PHRASES = {
    "plain": "plain background",
    "linear-gradient": "gradient background",
    "radial-gradient": "radial gradient background",
    "noise": "grainy background",
    "stripes": "striped background",
    "checker": "checkered background",
}
_LOCATIONS = (
    ("in the top left corner", "at the top", "in the top right corner"),
    ("on the left", "in the middle", "on the right"),
    ("in the bottom left corner", "at the bottom", "in the bottom right corner"),
)
_CAPTION_QUESTIONS = (
    "Describe the image briefly.",
    "What does this picture show?",
    "Give a short description of the image.",
    "Summarize the content of this image.",
)
_LIST_QUESTIONS = (
    "What shapes can you see in this image?",
    "Can you list the shapes in the picture?",
    "What is drawn in this image?",
)


# ----------------------------------------------------------------------------------------------------------- options


#: the values of :attr:`ShapesConfig.phrases`
PHRASE_STYLES = ("grouped", "each")


@dataclass(frozen=True)
class ShapesConfig:
    """Options of a synthetic shapes dataset; invalid values raise :class:`InputError` naming the option."""

    images: int = 200  #: number of images
    seed: int = 0  #: image k is drawn from the random stream (seed, k)
    width: tuple[int, int] = (320, 640)  #: inclusive range of image widths, pixels
    height: tuple[int, int] = (240, 480)  #: inclusive range of image heights, pixels
    objects: tuple[int, int] = (1, 8)  #: inclusive range of shapes per image (fewer when they do not fit)
    val_fraction: float = 0.1  #: share of images in the val split
    rec_per_image: int = 3  #: most referring expressions per image (one per shape)
    #: how grounded captions and answers name the shapes: ``grouped`` ("two blue squares", one phrase with both boxes;
    #: groups ordered by their leftmost member) or ``each`` (one phrase a shape, left to right)
    phrases: str = "grouped"

    def __post_init__(self) -> None:
        if not 1 <= self.images <= 999_999:
            raise InputError(f"images: expected 1..999999, got {self.images}")
        if not 0 <= self.seed < 2**63:
            raise InputError(f"seed: expected a non-negative integer below 2**63, got {self.seed}")
        for name in ("width", "height"):
            low, high = getattr(self, name)
            if not MIN_SIDE <= low <= high <= 4096:
                raise InputError(f"{name}: expected a range {MIN_SIDE} <= min <= max <= 4096, got {low}-{high}")
        low, high = self.objects
        if not 1 <= low <= high <= len(_NUMBER_WORDS) - 1:
            raise InputError(f"objects: expected a range 1 <= min <= max <= {len(_NUMBER_WORDS) - 1}, got {low}-{high}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise InputError(f"val_fraction: expected 0 <= value < 1, got {self.val_fraction}")
        if self.rec_per_image < 1:
            raise InputError(f"rec_per_image: expected at least 1, got {self.rec_per_image}")
        if self.phrases not in PHRASE_STYLES:
            raise InputError(f"phrases: expected one of {', '.join(PHRASE_STYLES)}, got {self.phrases!r}")

    def as_dict(self) -> dict:
        """The options as JSON-ready values."""
        return {key: list(value) if isinstance(value, tuple) else value for key, value in asdict(self).items()}


def parse_size_ranges(text: str) -> tuple[tuple[int, int], tuple[int, int]]:
    """Width and height ranges from ``"320-640x240-480"`` or ``"512x384"`` (fixed size)."""
    match = re.fullmatch(r"\s*(\d+)(?:-(\d+))?\s*[xX]\s*(\d+)(?:-(\d+))?\s*", text)
    if not match:
        raise InputError(f"--size: expected WxH or WMIN-WMAXxHMIN-HMAX (e.g. 320-640x240-480), got {text!r}")
    w_low, w_high, h_low, h_high = match.groups()
    return (int(w_low), int(w_high or w_low)), (int(h_low), int(h_high or h_low))


def parse_count_range(text: str, what: str = "--objects") -> tuple[int, int]:
    """An inclusive integer range from ``"1-8"`` or ``"4"``."""
    match = re.fullmatch(r"\s*(\d+)(?:\s*-\s*(\d+))?\s*", text)
    if not match:
        raise InputError(f"{what}: expected N or MIN-MAX (e.g. 1-8), got {text!r}")
    return int(match.group(1)), int(match.group(2) or match.group(1))


# ------------------------------------------------------------------------------------------------------------ scenes


@dataclass(frozen=True)
class ShapeObject:
    """One drawn shape; ``bbox`` ([x, y, w, h] pixels) and ``area`` cover its visible pixels."""

    id: int  #: unique over the dataset: image_id * 100 + index
    index: int  #: drawing order in its image, 0 = bottom
    shape: str
    colour: str
    bbox: tuple[int, int, int, int]
    area: int
    shape_area: int  #: pixels of the whole shape before later shapes covered it
    occluded_by: tuple[int, ...]  #: indices of later shapes that cover part of it

    @property
    def center(self) -> tuple[float, float]:
        """Centre of the box, pixels."""
        x, y, w, h = self.bbox
        return x + w / 2, y + h / 2

    def as_dict(self) -> dict:
        """JSON-ready record (scenes file)."""
        record = asdict(self)
        record.update(bbox=list(self.bbox), occluded_by=list(self.occluded_by), rgb=list(PALETTE[self.colour]))
        return record


@dataclass(frozen=True)
class Background:
    """How the background was painted: a kind from :data:`BACKGROUNDS` and its colours."""

    kind: str
    colours: tuple[tuple[int, int, int], ...]


@dataclass(frozen=True)
class Scene:
    """One synthetic image: its shapes (in drawing order) and its pixels."""

    image_id: int
    width: int
    height: int
    background: Background
    objects: tuple[ShapeObject, ...]
    pixels: np.ndarray = field(repr=False, compare=False)  #: (height, width, 3) uint8

    @property
    def file_name(self) -> str:
        """Image file name, relative to ``OUT/images``."""
        return f"{self.image_id:06d}.png"

    def as_dict(self) -> dict:
        """JSON-ready record (scenes file)."""
        return {
            "id": self.image_id,
            "file_name": self.file_name,
            "width": self.width,
            "height": self.height,
            "background": {"kind": self.background.kind, "colours": [list(c) for c in self.background.colours]},
            "objects": [obj.as_dict() for obj in self.objects],
        }


def _regular_polygon(sides: int, radius: float, rotation: float) -> np.ndarray:
    angles = rotation + np.arange(sides) * (2 * math.pi / sides)
    return np.stack([radius * np.cos(angles), radius * np.sin(angles)], axis=1)


def _shape_vertices(shape: str, size: float, rng: np.random.Generator) -> np.ndarray:
    """Outline of a shape of about ``size`` pixels across, centred on 0, as (K, 2) x/y vertices."""
    r = size / 2
    if shape in ("circle", "ellipse"):
        ry = r if shape == "circle" else r / rng.uniform(1.6, 2.4)
        angles = np.arange(72) * (2 * math.pi / 72)
        vertices = np.stack([r * np.cos(angles), ry * np.sin(angles)], axis=1)
    elif shape in ("square", "rectangle"):
        ry = r if shape == "square" else r / rng.uniform(1.6, 2.6)
        vertices = np.array([[-r, -ry], [r, -ry], [r, ry], [-r, ry]])
    elif shape == "diamond":
        rx = r * rng.uniform(0.55, 0.8)
        vertices = np.array([[0.0, -r], [rx, 0.0], [0.0, r], [-rx, 0.0]])
    elif shape == "triangle":
        vertices = _regular_polygon(3, r * 1.15, rng.uniform(0, 2 * math.pi))
    elif shape == "hexagon":
        vertices = _regular_polygon(6, r, rng.uniform(0, math.pi / 3))
    elif shape == "star":
        rotation = rng.uniform(0, 2 * math.pi / 5)
        outer = _regular_polygon(5, r * 1.15, rotation)
        inner = _regular_polygon(5, r * 0.5, rotation + math.pi / 5)
        vertices = np.stack([outer, inner], axis=1).reshape(10, 2)
    else:
        raise InputError(f"unknown shape {shape!r}; expected one of {', '.join(SHAPES)}")
    if shape in ("ellipse", "rectangle", "diamond") and rng.random() < 0.5:
        vertices = vertices[:, ::-1].copy()
    return vertices


def _rasterize(vertices: np.ndarray, cx: float, cy: float) -> tuple[int, int, np.ndarray]:
    """Top-left corner and boolean mask of the polygon centred at (cx, cy)."""
    points = vertices + (cx, cy)
    x0, y0 = (int(math.floor(v)) - 1 for v in points.min(axis=0))
    x1, y1 = (int(math.ceil(v)) + 2 for v in points.max(axis=0))
    canvas = Image.new("L", (x1 - x0, y1 - y0), 0)
    ImageDraw.Draw(canvas).polygon([(float(x - x0), float(y - y0)) for x, y in points], fill=255)
    return x0, y0, np.asarray(canvas) > 0


def _colour_distance(rgb: np.ndarray) -> float:
    """Smallest RGB distance from a colour to the palette."""
    palette = np.array(list(PALETTE.values()), dtype=np.float64)
    return float(np.sqrt(((palette - rgb) ** 2).sum(axis=1)).min())


def _background_colour(rng: np.random.Generator, margin: float = _BG_DISTANCE,
                       near: np.ndarray | None = None) -> np.ndarray:
    """A muted colour at least ``margin`` from the palette; with ``near``, a colour 25..60 away from it."""
    while True:
        if near is None:
            rgb = np.rint(np.clip(rng.uniform(40, 235) + rng.normal(0, 35, size=3), 0, 255))
        else:
            rgb = np.rint(np.clip(near + rng.normal(0, 30, size=3), 0, 255))
            if not 25 <= np.sqrt(((rgb - near) ** 2).sum()) <= 60:
                continue
        if _colour_distance(rgb) >= margin:
            return rgb


def _paint_background(width: int, height: int, rng: np.random.Generator) -> tuple[Background, np.ndarray]:
    """A background of a random kind whose colours all stay far from the palette."""
    kind = BACKGROUNDS[rng.integers(len(BACKGROUNDS))]
    ys = np.arange(height, dtype=np.float32)[:, None]
    xs = np.arange(width, dtype=np.float32)[None, :]
    if kind == "plain":
        colours = [_background_colour(rng)]
        pixels = np.broadcast_to(colours[0].astype(np.float32), (height, width, 3))
    elif kind == "noise":
        colours = [_background_colour(rng, _BG_DISTANCE + _NOISE_AMPLITUDE * math.sqrt(3))]
        noise = rng.integers(-_NOISE_AMPLITUDE, _NOISE_AMPLITUDE + 1, size=(height, width, 1)).astype(np.float32)
        pixels = colours[0].astype(np.float32) + noise
    elif kind in ("stripes", "checker"):
        first = _background_colour(rng)
        colours = [first, _background_colour(rng, near=first)]
        period = float(rng.uniform(0.04, 0.12) * min(width, height))
        if kind == "stripes":
            angle = rng.uniform(0, math.pi)
            phase = np.floor((xs * math.cos(angle) + ys * math.sin(angle)) / period)
        else:
            phase = np.floor(xs / period) + np.floor(ys / period)
        pick = (phase.astype(np.int64) % 2).astype(bool)[..., None]
        pixels = np.where(pick, colours[1].astype(np.float32), colours[0].astype(np.float32))
    else:
        while True:
            colours = [_background_colour(rng), _background_colour(rng)]
            steps = np.linspace(0, 1, 17)[:, None]
            if min(_colour_distance(c) for c in colours[0] * (1 - steps) + colours[1] * steps) >= _BG_DISTANCE:
                break
        if kind == "linear-gradient":
            angle = rng.uniform(0, 2 * math.pi)
            t = xs * math.cos(angle) + ys * math.sin(angle)
        else:
            cx, cy = rng.uniform(0, width), rng.uniform(0, height)
            t = np.sqrt((xs - cx) ** 2 + (ys - cy) ** 2)
        t = ((t - t.min()) / max(float(t.max() - t.min()), 1e-6))[..., None]
        pixels = colours[0].astype(np.float32) * (1 - t) + colours[1].astype(np.float32) * t
    array = np.clip(np.rint(pixels), 0, 255).astype(np.uint8)
    background = Background(kind, tuple(tuple(int(v) for v in c) for c in colours))
    return background, np.ascontiguousarray(array)


def generate_scene(config: ShapesConfig, image_id: int) -> Scene:
    """Draw image ``image_id`` (1-based) of the dataset described by ``config``."""
    rng = np.random.default_rng([config.seed, image_id])
    width = int(rng.integers(config.width[0], config.width[1] + 1))
    height = int(rng.integers(config.height[0], config.height[1] + 1))
    background, pixels = _paint_background(width, height, rng)
    # a few colours and shapes per image, so that repeats call for size, position and relation expressions
    colours = rng.choice(list(PALETTE), size=int(rng.integers(2, 6)), replace=False).tolist()
    shapes = rng.choice(list(SHAPES), size=int(rng.integers(2, 6)), replace=False).tolist()
    wanted = int(rng.integers(config.objects[0], config.objects[1] + 1))
    labels = np.full((height, width), -1, dtype=np.int16)
    placed: list[dict] = []
    side = min(width, height)
    for index in range(wanted):
        for _ in range(_PLACEMENT_ATTEMPTS):
            shape = shapes[rng.integers(len(shapes))]
            colour = colours[rng.integers(len(colours))]
            vertices = _shape_vertices(shape, max(rng.uniform(0.1, 0.35) * side, _MIN_SHAPE_SIZE), rng)
            low, high = vertices.min(axis=0), vertices.max(axis=0)
            cx = rng.uniform(-low[0] + 2, width - 3 - high[0])
            cy = rng.uniform(-low[1] + 2, height - 3 - high[1])
            x0, y0, mask = _rasterize(vertices, cx, cy)
            h, w = mask.shape
            if x0 < 0 or y0 < 0 or x0 + w > width or y0 + h > height or mask.sum() < MIN_SHAPE_PIXELS:
                continue
            region = labels[y0 : y0 + h, x0 : x0 + w]
            near = labels[max(y0 - 2, 0) : y0 + h + 2, max(x0 - 2, 0) : x0 + w + 2]
            if any(placed[k]["colour"] == colour for k in np.unique(near[near >= 0])):
                continue  # shapes of one colour would merge into one blob
            under = region[mask]
            covered = np.bincount(under[under >= 0], minlength=len(placed))
            if any(
                covered[k] and placed[k]["visible"] - covered[k] < max(MIN_VISIBLE_FRACTION * placed[k]["full"],
                                                                       MIN_SHAPE_PIXELS)
                for k in range(len(placed))
            ):
                continue
            region[mask] = index
            for k in np.flatnonzero(covered):
                placed[k]["visible"] -= int(covered[k])
                placed[k]["occluded_by"].append(index)
            full = int(mask.sum())
            placed.append({"shape": shape, "colour": colour, "full": full, "visible": full, "occluded_by": [],
                           "window": (x0, y0, w, h)})
            break
        else:
            break  # no room left for another shape
    objects = []
    for index, record in enumerate(placed):
        x0, y0, w, h = record["window"]
        ys, xs = np.nonzero(labels[y0 : y0 + h, x0 : x0 + w] == index)
        bbox = (x0 + int(xs.min()), y0 + int(ys.min()), int(xs.max() - xs.min()) + 1, int(ys.max() - ys.min()) + 1)
        objects.append(ShapeObject(
            id=image_id * 100 + index, index=index, shape=record["shape"], colour=record["colour"], bbox=bbox,
            area=len(xs), shape_area=record["full"], occluded_by=tuple(record["occluded_by"]),
        ))
    if objects:
        fills = np.array([PALETTE[obj.colour] for obj in objects], dtype=np.uint8)
        drawn = labels >= 0
        pixels[drawn] = fills[labels[drawn]]
    return Scene(image_id, width, height, background, tuple(objects), pixels)


# -------------------------------------------------------------------------------------------------------- expressions


Description = tuple[str | None, str | None]  # (colour or None, shape or None)


def _phrase(description: Description) -> str:
    colour, shape = description
    return " ".join(part for part in (colour, shape or "shape") if part)


def _matches(obj: ShapeObject, description: Description) -> bool:
    colour, shape = description
    return (colour is None or obj.colour == colour) and (shape is None or obj.shape == shape)


_DESCRIPTION_RE = rf"(?:({'|'.join(PALETTE)}) )?({'|'.join(SHAPES)}|shape)"


def _parse_description(text: str) -> Description | None:
    match = re.fullmatch(_DESCRIPTION_RE, text)
    if not match:
        return None
    return match.group(1), None if match.group(2) == "shape" else match.group(2)


def _loosely_related(obj: ShapeObject, anchor: ShapeObject, relation: str) -> bool:
    """The relation judged by box centres (what a reader could still accept)."""
    (x, y), (ax, ay) = obj.center, anchor.center
    return {"left of": x < ax, "right of": x > ax, "above": y < ay, "below": y > ay}[relation]


def _strictly_related(obj: ShapeObject, anchor: ShapeObject, relation: str) -> bool:
    """The relation with the whole box on that side of the anchor's box."""
    x, y, w, h = obj.bbox
    ax, ay, aw, ah = anchor.bbox
    return {"left of": x + w <= ax, "right of": x >= ax + aw, "above": y + h <= ay, "below": y >= ay + ah}[relation]


def _clear_extreme(candidates: list[ShapeObject], key: Callable[[ShapeObject], float], margin: float,
                   ratio: float = 1.0) -> list[ShapeObject]:
    """Candidates whose ``key`` is below every other candidate's by ``margin`` (or by the factor ``ratio``)."""
    return [c for c in candidates
            if all(key(c) * ratio + margin <= key(o) for o in candidates if o is not c)]


def resolve_expression(text: str, scene: Scene) -> list[int]:
    """Indices of the shapes of ``scene`` that a referring expression of this generator's grammar could mean.

    A generated expression resolves to exactly its target. Grammar: ``the D``, ``the small|big D``, ``the
    leftmost|rightmost|topmost|bottommost|biggest|smallest D``, ``the D left of|right of|above|below the D'`` with
    ``D = [colour] shape-name|"shape"``. Sizes compare ``shape_area`` (factor :data:`SIZE_RATIO`), positions box
    centres (margin :data:`POSITION_MARGIN` of the image side); a relation counts every candidate whose centre lies on
    that side of the anchor's. Text outside the grammar resolves to ``[]``."""
    objects = list(scene.objects)
    match = re.fullmatch(r"the (.+)", text)
    if not match:
        return []
    body = match.group(1)
    relation = re.fullmatch(rf"(.+?) ({'|'.join(RELATIONS)}) the (.+)", body)
    if relation:
        target, anchor = _parse_description(relation.group(1)), _parse_description(relation.group(3))
        if target is None or anchor is None:
            return []
        anchors = [o for o in objects if _matches(o, anchor)]
        if len(anchors) != 1:
            return []
        return [o.index for o in objects
                if o is not anchors[0] and _matches(o, target) and _loosely_related(o, anchors[0], relation.group(2))]
    words = body.split(" ", 1)
    if words[0] in SUPERLATIVES + ("small", "big") and len(words) == 2:
        description = _parse_description(words[1])
        if description is None:
            return []
        candidates = [o for o in objects if _matches(o, description)]
        if len(candidates) < 2:
            return []
        mx, my = POSITION_MARGIN * scene.width, POSITION_MARGIN * scene.height
        rules: dict[str, tuple[Callable[[ShapeObject], float], float, float]] = {
            "leftmost": (lambda o: o.center[0], mx, 1.0),
            "rightmost": (lambda o: -o.center[0], mx, 1.0),
            "topmost": (lambda o: o.center[1], my, 1.0),
            "bottommost": (lambda o: -o.center[1], my, 1.0),
            "smallest": (lambda o: o.shape_area, 0.0, SIZE_RATIO),
            "small": (lambda o: o.shape_area, 0.0, SIZE_RATIO),
            "biggest": (lambda o: 1.0 / o.shape_area, 0.0, SIZE_RATIO),
            "big": (lambda o: 1.0 / o.shape_area, 0.0, SIZE_RATIO),
        }
        if words[0] in ("small", "big") and len(candidates) != 2:
            return []
        key, margin, ratio = rules[words[0]]
        return [o.index for o in _clear_extreme(candidates, key, margin, ratio)]
    description = _parse_description(body)
    if description is None or description == (None, None):
        return []
    return [o.index for o in objects if _matches(o, description)]


@dataclass(frozen=True)
class ReferringExpression:
    """An expression that picks out exactly one shape of its scene."""

    text: str
    target: int  #: index of the shape in its scene
    kind: str  #: "attribute", "size", "position" or "relation"


def _candidate_expressions(scene: Scene, obj: ShapeObject) -> Iterator[tuple[str, str]]:
    """(text, kind) pairs that might single out ``obj``; :func:`resolve_expression` decides."""
    own: list[Description] = [(obj.colour, obj.shape), (None, obj.shape), (obj.colour, None), (None, None)]
    for description in own[:3]:
        yield f"the {_phrase(description)}", "attribute"
    for description in own:
        count = sum(_matches(o, description) for o in scene.objects)
        if count == 2:
            yield f"the small {_phrase(description)}", "size"
            yield f"the big {_phrase(description)}", "size"
        if count >= 3:
            yield f"the smallest {_phrase(description)}", "size"
            yield f"the biggest {_phrase(description)}", "size"
        if count >= 2:
            for word in ("leftmost", "rightmost", "topmost", "bottommost"):
                yield f"the {word} {_phrase(description)}", "position"
    for anchor in scene.objects:
        if anchor is obj:
            continue
        names = [d for d in ((None, anchor.shape), (anchor.colour, anchor.shape), (anchor.colour, None))
                 if sum(_matches(o, d) for o in scene.objects) == 1]
        if not names:
            continue
        for description in own:
            if sum(_matches(o, description) for o in scene.objects) < 2:
                continue  # the description alone is unique; no relation needed
            for relation in RELATIONS:
                if _strictly_related(obj, anchor, relation):
                    yield f"the {_phrase(description)} {relation} the {_phrase(names[0])}", "relation"


def referring_expressions(scene: Scene) -> dict[int, list[ReferringExpression]]:
    """Every expression of the grammar (see :func:`resolve_expression`) that picks out exactly one shape, per shape
    index; relations also need the target's whole box on that side of the anchor's box."""
    found: dict[int, list[ReferringExpression]] = {}
    for obj in scene.objects:
        seen: set[str] = set()
        found[obj.index] = []
        for text, kind in _candidate_expressions(scene, obj):
            if text not in seen and resolve_expression(text, scene) == [obj.index]:
                seen.add(text)
                found[obj.index].append(ReferringExpression(text, obj.index, kind))
    return found


# ------------------------------------------------------------------------------------------------------------ language


def _indefinite(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _size_word(scene: Scene, obj: ShapeObject) -> str:
    share = obj.shape_area / (scene.width * scene.height)
    return "small" if share < 0.015 else "large" if share > 0.06 else ""


def location_cell(x: float, y: float, width: int, height: int) -> tuple[int, int]:
    """(row, column) of the 3 x 3 grid over a ``width`` x ``height`` picture that holds the point (x, y): the cell a
    caption's place words ("in the top left corner") name."""
    return min(int(3 * y / height), 2), min(int(3 * x / width), 2)


def _location(scene: Scene, obj: ShapeObject) -> str:
    row, column = location_cell(*obj.center, scene.width, scene.height)
    return _LOCATIONS[row][column]


def _object_phrase(scene: Scene, obj: ShapeObject, sized: bool = True) -> str:
    size = _size_word(scene, obj) if sized else ""
    return _indefinite(" ".join(part for part in (size, obj.colour, obj.shape) if part))


def region_caption(scene: Scene, obj: ShapeObject) -> str:
    """A region caption such as "a small red circle in the top left corner, partly hidden by a blue square"."""
    caption = f"{_object_phrase(scene, obj)} {_location(scene, obj)}"
    if obj.occluded_by:
        caption += f", partly hidden by {_object_phrase(scene, scene.objects[obj.occluded_by[0]], sized=False)}"
    else:
        covered = [o for o in scene.objects if obj.index in o.occluded_by]
        if covered:
            caption += f", in front of {_object_phrase(scene, covered[0], sized=False)}"
    return caption


def _groups(objects: Sequence[ShapeObject], each: bool = False) -> list[list[ShapeObject]]:
    """Shapes grouped by colour and shape, groups ordered by their leftmost member; with ``each``, every shape its own
    group, left to right."""
    groups: dict[tuple[str, str] | int, list[ShapeObject]] = {}
    for obj in sorted(objects, key=lambda o: (o.center[0], o.index)):
        groups.setdefault(obj.index if each else (obj.colour, obj.shape), []).append(obj)
    return list(groups.values())


def _group_phrase(scene: Scene, group: list[ShapeObject]) -> str:
    if len(group) == 1:
        return _object_phrase(scene, group[0])
    return f"{_NUMBER_WORDS[len(group)]} {group[0].colour} {group[0].shape}s"


@dataclass(frozen=True)
class SceneCaption:
    """An image caption whose phrases name shapes: ``phrases`` holds ((start, end), shape indices) in text order."""

    text: str
    phrases: tuple[tuple[tuple[int, int], tuple[int, ...]], ...]


def grounded_caption(scene: Scene, rng: np.random.Generator, each: bool = False) -> SceneCaption:
    """A caption such as "Two blue squares and a red circle on a striped background." with phrase spans; with
    ``each``, one phrase a shape ("A blue square, a red circle and a blue square on ...")."""
    groups = _groups(scene.objects, each)
    phrases = [_group_phrase(scene, group) for group in groups]
    background = _indefinite(_BACKGROUND_PHRASES[scene.background.kind])
    lead = rng.random() < 0.5
    text = (background[0].upper() + background[1:] + " with ") if lead else ""
    spans = []
    for i, (phrase, group) in enumerate(zip(phrases, groups)):
        if i:
            text += " and " if i == len(phrases) - 1 else ", "
        if not text:
            phrase = phrase[0].upper() + phrase[1:]
        spans.append(((len(text), len(text) + len(phrase)), tuple(o.index for o in group)))
        text += phrase
    text += "." if lead else f" on {background}."
    return SceneCaption(text, tuple(spans))


def _ground(phrase: str, indices: Sequence[int]) -> str:
    return f"{P_OPEN}{phrase}{P_CLOSE}{ROI_OPEN}{GROUND_BOX * len(indices)}{ROI_CLOSE}"


class _Answer:
    """A gpt turn under construction: text with grounded phrases and the box indices in order."""

    def __init__(self, each: bool = False) -> None:
        self.text = ""
        self.box_inds: list[int] = []
        self.each = each  # one phrase a shape in :meth:`ground_groups`

    def say(self, text: str) -> _Answer:
        self.text += text
        return self

    def ground(self, phrase: str, objects: Sequence[ShapeObject]) -> _Answer:
        self.text += _ground(phrase, objects)
        self.box_inds.extend(o.index for o in objects)
        return self

    def ground_groups(self, scene: Scene, objects: Sequence[ShapeObject]) -> _Answer:
        groups = _groups(objects, self.each)
        for i, group in enumerate(groups):
            if i:
                self.say(" and " if i == len(groups) - 1 else ", ")
            self.ground(_group_phrase(scene, group), group)
        return self


def _capitalized(text: str) -> str:
    return text[0].upper() + text[1:]


def instruct_conversation(scene: Scene, expressions: dict[int, list[ReferringExpression]],
                          rng: np.random.Generator, each: bool = False) -> list[dict]:
    """A Groma Instruct conversation of 2-4 rounds about the shapes of ``scene``; every gpt turn grounds at least
    one shape (with ``each``, one phrase a shape)."""
    objects = list(scene.objects)
    rounds: dict[str, Callable[[], tuple[str, _Answer]]] = {}

    def listing() -> tuple[str, _Answer]:
        count = len(objects)
        noun = "shape" if count == 1 else "shapes"
        answer = _Answer(each).say(f"I can see {_NUMBER_WORDS[count]} {noun}: ")
        answer.ground_groups(scene, objects).say(".")
        return _LIST_QUESTIONS[rng.integers(len(_LIST_QUESTIONS))], answer

    def where() -> tuple[str, _Answer]:
        named = [e for index in sorted(expressions) for e in expressions[index]]
        expression = named[rng.integers(len(named))]
        obj = objects[expression.target]
        answer = _Answer(each).ground(_capitalized(expression.text), [obj]).say(f" is {_location(scene, obj)}")
        if obj.occluded_by:
            cover = objects[obj.occluded_by[0]]
            answer.say(", partly hidden by ").ground(_object_phrase(scene, cover, sized=False), [cover])
        return f"Where is {expression.text}?", answer.say(".")

    def count() -> tuple[str, _Answer]:
        shapes = sorted({o.shape for o in objects})
        shape = shapes[rng.integers(len(shapes))]
        members = [o for o in objects if o.shape == shape]
        if len(members) == 1:
            answer = _Answer(each).say(f"There is one {shape}: ")
        elif len(_groups(members, each)) == 1:
            answer = _Answer(each).say("There are ")
        else:
            answer = _Answer(each).say(f"There are {_NUMBER_WORDS[len(members)]} {shape}s: ")
        return f"How many {shape}s are there?", answer.ground_groups(scene, members).say(".")

    def exists() -> tuple[str, _Answer]:
        present = sorted({(o.colour, o.shape) for o in objects})
        if rng.random() < 0.5:
            colour, shape = present[rng.integers(len(present))]
        else:
            colour, shape = list(PALETTE)[rng.integers(len(PALETTE))], SHAPES[rng.integers(len(SHAPES))]
        question = f"Is there {_indefinite(f'{colour} {shape}')} in the image?"
        members = [o for o in objects if (o.colour, o.shape) == (colour, shape)]
        if members:
            verb = "is" if len(members) == 1 else "are"
            return question, _Answer(each).say(f"Yes, there {verb} ").ground_groups(scene, members).say(".")
        answer = _Answer(each).say(f"No, there is no {colour} {shape}. ")
        alike = [o for o in objects if o.shape == shape] or [o for o in objects if o.colour == colour]
        if alike:
            answer.say("There is " if len(alike) == 1 else "There are ").ground_groups(scene, alike).say(" though.")
        else:
            answer.say("The image shows ").ground_groups(scene, objects).say(".")
        return question, answer

    def extreme(word: str, question: str, claim: str) -> Callable[[], tuple[str, _Answer]]:
        def build() -> tuple[str, _Answer]:
            obj = objects[resolve_expression(f"the {word} shape", scene)[0]]
            answer = _Answer(each).ground(f"The {obj.colour} {obj.shape}", [obj]).say(f" {claim}.")
            return question, answer
        return build

    def hidden() -> tuple[str, _Answer]:
        covered = [o for o in objects if o.occluded_by]
        answer = _Answer(each).say("Yes: ")
        for i, obj in enumerate(covered[:2]):
            cover = objects[obj.occluded_by[0]]
            answer.say(" and " if i else "").ground(_object_phrase(scene, obj, sized=False), [obj])
            answer.say(" is partly hidden by ").ground(_object_phrase(scene, cover, sized=False), [cover])
        return "Is any shape partly hidden behind another one?", answer.say(".")

    rounds["list"] = listing
    rounds["count"] = count
    rounds["exists"] = exists
    if any(expressions.values()):
        rounds["where"] = where
    if len(resolve_expression("the biggest shape", scene)) == 1:
        rounds["biggest"] = extreme("biggest", "Which shape is the biggest?", "is the biggest shape")
    if len(resolve_expression("the leftmost shape", scene)) == 1:
        rounds["leftmost"] = extreme("leftmost", "Which shape is furthest to the left?", "is furthest to the left")
    if any(o.occluded_by for o in objects):
        rounds["hidden"] = hidden
    kinds = list(rounds)
    chosen = [kinds[i] for i in rng.permutation(len(kinds))[: int(rng.integers(2, 5))]]
    conversation = []
    for kind in chosen:
        question, answer = rounds[kind]()
        conversation.append({"from": "human", "value": question})
        conversation.append({"from": "gpt", "value": answer.text, "box_inds": answer.box_inds})
    return conversation


# ------------------------------------------------------------------------------------------------------------ writing


@dataclass
class _SplitFiles:
    """Annotation records of one split, filled image by image."""

    scenes: list[dict] = field(default_factory=list)
    images: list[dict] = field(default_factory=list)
    boxes: list[dict] = field(default_factory=list)
    rec_images: list[dict] = field(default_factory=list)
    rec_boxes: list[dict] = field(default_factory=list)
    region_images: list[dict] = field(default_factory=list)
    region_boxes: list[dict] = field(default_factory=list)
    multi_boxes: list[dict] = field(default_factory=list)
    flickr_images: list[dict] = field(default_factory=list)
    flickr_boxes: list[dict] = field(default_factory=list)
    lvis_images: list[dict] = field(default_factory=list)
    lvis_boxes: list[dict] = field(default_factory=list)
    instruct: list[dict] = field(default_factory=list)
    captions: list[dict] = field(default_factory=list)


def lvis_categories() -> list[tuple[int, str, str | None, str]]:
    """The LVIS-Ground vocabulary as (id, name, colour or None, shape): shapes first, then colours x shapes."""
    names: list[tuple[int, str, str | None, str]] = [(i + 1, shape, None, shape) for i, shape in enumerate(SHAPES)]
    for colour in PALETTE:
        for shape in SHAPES:
            names.append((len(names) + 1, f"{colour}_{shape}", colour, shape))
    return names


def _box(obj: ShapeObject) -> dict:
    return {"bbox": list(obj.bbox), "area": obj.area, "iscrowd": 0, "category_id": 1}


def _detection_category(obj: ShapeObject) -> int:
    """The detection file's category of a shape: its colour x shape entry of :func:`lvis_categories`."""
    return _CATEGORY_IDS[(obj.colour, obj.shape)]


def _add_scene(files: _SplitFiles, scene: Scene, config: ShapesConfig) -> None:
    """Append every annotation of one scene to its split."""
    rng = np.random.default_rng([config.seed, scene.image_id, 1])
    size = {"file_name": scene.file_name, "height": scene.height, "width": scene.width}
    files.scenes.append(scene.as_dict())
    files.images.append({"id": scene.image_id, **size})
    for obj in scene.objects:
        files.boxes.append({"id": obj.id, "image_id": scene.image_id, **_box(obj),
                            "category_id": _detection_category(obj)})
        region_id = obj.id
        files.region_images.append({"id": region_id, "original_id": scene.image_id, **size})
        caption = region_caption(scene, obj)
        files.region_boxes.append({"id": obj.id, "image_id": region_id, "caption": caption, "original_id": obj.id,
                                   **_box(obj)})
        files.multi_boxes.append({"id": obj.id, "image_id": scene.image_id, "caption": caption, **_box(obj)})

    expressions = referring_expressions(scene)
    named = [index for index in sorted(expressions) if expressions[index]]
    for index in [named[i] for i in rng.permutation(len(named))[: config.rec_per_image]]:
        choices = expressions[index]
        kinds = sorted({e.kind for e in choices})
        kind = kinds[rng.integers(len(kinds))]
        of_kind = [e for e in choices if e.kind == kind]
        expression = of_kind[rng.integers(len(of_kind))]
        obj = scene.objects[index]
        ref_id = len(files.rec_images) + 1
        files.rec_images.append({"id": ref_id, "caption": expression.text, "original_id": scene.image_id,
                                 "ref_type": expression.kind, "dataset_name": "groma-shapes", **size})
        files.rec_boxes.append({"id": ref_id, "image_id": ref_id, "original_id": obj.id, **_box(obj)})

    if scene.objects:
        caption = grounded_caption(scene, rng, config.phrases == "each")
        files.flickr_images.append({"id": scene.image_id, "caption": caption.text, "dataset_name": "groma-shapes",
                                    **size})
        for span, indices in caption.phrases:
            for index in indices:
                obj = scene.objects[index]
                files.flickr_boxes.append({"id": obj.id, "image_id": scene.image_id, "tokens_positive": [list(span)],
                                           "phrase": caption.text[span[0] : span[1]], **_box(obj)})
        question = _CAPTION_QUESTIONS[rng.integers(len(_CAPTION_QUESTIONS))]
        files.captions.append({"id": f"{scene.image_id:06d}", "image": scene.file_name, "conversations": [
            {"from": "human", "value": f"{IMAGE}\n{question}"}, {"from": "gpt", "value": caption.text}]})
        files.instruct.append({"id": scene.image_id, **size, "boxes": [list(o.bbox) for o in scene.objects],
                               "conversation": instruct_conversation(scene, expressions, rng,
                                                                     config.phrases == "each")})

    categories = lvis_categories()
    present = [c for c in categories if any(_matches(o, (c[2], c[3])) for o in scene.objects)]
    negatives = [c[0] for c in categories if c not in present]
    for category_id, _, colour, shape in present:
        query_id = len(files.lvis_images) + 1
        files.lvis_images.append({
            "id": query_id, "original_id": scene.image_id, "coco_url": "http://images.cocodataset.org/"
            + scene.file_name, "neg_category_ids": negatives, "not_exhaustive_category_ids": [], **size,
        })
        for obj in scene.objects:
            if _matches(obj, (colour, shape)):
                files.lvis_boxes.append({"id": len(files.lvis_boxes) + 1, "image_id": query_id,
                                         "category_id": category_id, "original_id": obj.id, "bbox": list(obj.bbox),
                                         "area": obj.area})


_CATEGORY_IDS = {(colour, shape): i for i, _, colour, shape in lvis_categories() if colour}


def _lvis_category_records(files: _SplitFiles) -> list[dict]:
    images: dict[int, set[int]] = {}
    instances: dict[int, int] = {}
    originals = {image["id"]: image["original_id"] for image in files.lvis_images}
    for box in files.lvis_boxes:
        images.setdefault(box["category_id"], set()).add(originals[box["image_id"]])
        instances[box["category_id"]] = instances.get(box["category_id"], 0) + 1
    records = []
    for category_id, name, colour, shape in lvis_categories():
        image_count = len(images.get(category_id, ()))
        records.append({
            "id": category_id, "name": name, "synonyms": [name.replace("_", " ")],
            "def": f"a {colour + ' ' if colour else ''}{shape} drawn in a synthetic image",
            "frequency": "r" if image_count <= 10 else "c" if image_count <= 100 else "f",
            "image_count": image_count, "instance_count": instances.get(category_id, 0),
        })
    return records


def _annotation_files(files: _SplitFiles, split: str, config: ShapesConfig) -> dict[str, object]:
    """File stem -> JSON content of every annotation file of one split."""
    objects = [{"id": 1, "name": "object", "supercategory": "object"}]
    kinds = [{"id": i, "name": name, "supercategory": "object"} for i, name, colour, _ in lvis_categories() if colour]
    info = {"description": "groma synthetic shapes", "seed": config.seed, "split": split}
    return {
        "scenes": {"info": info, "images": files.scenes},
        "detection": {"info": info, "images": files.images, "annotations": files.boxes, "categories": kinds},
        "rec": {"info": info, "images": files.rec_images, "annotations": files.rec_boxes, "categories": objects},
        "region_captions": {"info": info, "images": files.region_images, "annotations": files.region_boxes,
                            "categories": objects},
        "region_captions_multi": {"info": info, "images": files.images, "annotations": files.multi_boxes,
                                  "categories": objects},
        "flickr": {"info": info, "images": files.flickr_images, "annotations": files.flickr_boxes,
                   "categories": objects},
        "lvis_ground": {"info": info, "images": files.lvis_images, "annotations": files.lvis_boxes,
                        "categories": _lvis_category_records(files)},
        "instruct": files.instruct,
        "captions": files.captions,
    }


def _dump(path: Path, content: object, indent: int | None = None) -> None:
    separators = (",", ": ") if indent else (",", ":")
    text = json.dumps(content, sort_keys=True, indent=indent, separators=separators, ensure_ascii=True)
    path.write_text(text + "\n", encoding="utf-8")


def split_of_images(config: ShapesConfig) -> dict[int, str]:
    """Image id -> split name (val images drawn from the seed)."""
    count = round(config.images * config.val_fraction)
    rng = np.random.default_rng([config.seed, 0])
    val = {int(i) + 1 for i in rng.permutation(config.images)[:count]}
    return {i: "val" if i in val else "train" for i in range(1, config.images + 1)}


def _prepare(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: exists and is not a folder")
    if out.exists() and any(out.iterdir()):
        summary = out / "dataset.json"
        try:
            ours = json.loads(summary.read_text(encoding="utf-8")).get("generator") == GENERATOR
        except (OSError, ValueError, AttributeError):
            ours = False
        if not overwrite or not ours:
            why = "pass --overwrite to replace it" if ours else "it does not hold a shapes dataset; choose another"
            raise InputError(f"{out}: folder is not empty ({why})")
        for name in ("images", "annotations"):
            shutil.rmtree(out / name, ignore_errors=True)
        summary.unlink()
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "annotations").mkdir(exist_ok=True)


def write_shapes_dataset(out: str | Path, config: ShapesConfig, overwrite: bool = False,
                         progress: Callable[[int, int], None] | None = None) -> dict:
    """Write the dataset described by ``config`` into ``out`` (layout in this module's docstring) and return the
    summary written to ``out/dataset.json``. ``out`` must be absent or empty, or (with ``overwrite``) hold an
    earlier shapes dataset, which is replaced. ``progress(done, total)`` is called after each image."""
    out = Path(out)
    _prepare(out, overwrite)
    splits = split_of_images(config)
    files = {split: _SplitFiles() for split in SPLITS}
    for image_id in range(1, config.images + 1):
        scene = generate_scene(config, image_id)
        Image.fromarray(scene.pixels, "RGB").save(out / "images" / scene.file_name, format="PNG", compress_level=1)
        _add_scene(files[splits[image_id]], scene, config)
        if progress:
            progress(image_id, config.images)
    summary: dict = {
        "generator": GENERATOR,
        "format_version": FORMAT_VERSION,
        "seed": config.seed,
        "options": config.as_dict(),
        "palette": {name: list(rgb) for name, rgb in PALETTE.items()},
        "shapes": list(SHAPES),
        "image_folder": "images",
        "splits": {},
    }
    for split in SPLITS:
        if not files[split].images:
            continue
        content = _annotation_files(files[split], split, config)
        paths = {}
        for stem, data in content.items():
            path = out / "annotations" / f"{stem}_{split}.json"
            _dump(path, data)
            paths[stem] = path.relative_to(out).as_posix()
        split_files = files[split]
        summary["splits"][split] = {
            "images": len(split_files.images),
            "objects": len(split_files.boxes),
            "referring_expressions": len(split_files.rec_images),
            "grounded_captions": len(split_files.flickr_images),
            "lvis_queries": len(split_files.lvis_images),
            "conversations": len(split_files.instruct),
            "files": paths,
        }
    _dump(out / "dataset.json", summary, indent=2)
    return summary
