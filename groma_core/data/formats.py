"""Readers of the reference Groma's annotation formats (the files :mod:`groma_core.data.shapes` writes, and the
reference's own ``groma_data`` files of the same layout).

Each reader checks the structure it relies on and raises :class:`InputError` naming the file, the record and the
key that is wrong. Boxes come back as ``(x1, y1, x2, y2)`` pixels of the original image (the files hold COCO
``[x, y, w, h]``), the unit :mod:`groma_core.evaluation` scores in, as the file gives them: boxes without area
(w or h <= 0), with coordinates that are not finite, or outside their image are returned too, for the caller to
judge (the training datasets clip or drop them with a count). An ``area`` left out is the box's (COCO's own
files give the segment's); ``iscrowd`` left out is 0. Category names of LVIS files come back as the reference's
prompts use them: ``_`` replaced by a space, stripped and lower-cased. Training and evaluation read every format
through these functions, so a file means the same to both.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from groma_core.errors import InputError
from groma_core.tokens import GROUND_BOX

Box = tuple[float, float, float, float]


@dataclass(frozen=True)
class ImageInfo:
    """One ``images`` entry: its id (a string in some conversation files), file name (relative to the image
    folder) and size in pixels."""

    id: int | str
    file_name: str
    width: int
    height: int


@dataclass(frozen=True)
class DetectionImage:
    """An image of a COCO detection file with all its boxes."""

    image: ImageInfo
    boxes: tuple[Box, ...]
    areas: tuple[float, ...]
    labels: tuple[int, ...] = ()  #: each box's ``category_id`` (0 where the file gives none)
    crowd: tuple[bool, ...] = ()  #: each box's ``iscrowd`` (a crowd region: COCOeval counts no detection on it)


@dataclass(frozen=True)
class RecSample:
    """One referring expression (one ``images`` entry of a RefCOCO-style file) and its ground-truth box."""

    image: ImageInfo
    expression: str
    box: Box


@dataclass(frozen=True)
class RegionCaption:
    """One captioned region of a Visual Genome-style file (or a RefCOCOg-style one, whose captions are the image
    entry's): its first caption, every reference caption, and the annotation's id (None where the file gives none)."""

    image: ImageInfo
    box: Box
    caption: str
    references: tuple[str, ...] = ()
    id: int | str | None = None


@dataclass(frozen=True)
class GroundedPhrase:
    """A phrase of a grounded caption: its character span, its text and the boxes it names."""

    span: tuple[int, int]
    text: str
    boxes: tuple[Box, ...]


@dataclass(frozen=True)
class GroundedCaption:
    """A Flickr30k-Entities-style caption with its phrases in text order."""

    image: ImageInfo
    caption: str
    phrases: tuple[GroundedPhrase, ...]


@dataclass(frozen=True)
class GroundingQuery:
    """One LVIS-Ground query: a category in an image and all its boxes."""

    image: ImageInfo
    category_id: int
    category: str
    boxes: tuple[Box, ...]
    areas: tuple[float, ...]


@dataclass(frozen=True)
class ChatTurn:
    """One human question and the grounded gpt answer, with the boxes of its ``<ground_box>`` in order."""

    question: str
    answer: str
    boxes: tuple[Box, ...]


@dataclass(frozen=True)
class Conversation:
    """A Groma Instruct entry."""

    image: ImageInfo
    turns: tuple[ChatTurn, ...]


def _load(path: str | Path) -> object:
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except OSError as exc:
        raise InputError(f"{path}: cannot read the annotation file ({exc.strerror or exc})") from exc
    except ValueError as exc:
        raise InputError(f"{path}: not valid JSON ({exc})") from exc


def _get(record: object, key: str, kind: type | tuple[type, ...], where: str) -> object:
    if not isinstance(record, dict):
        raise InputError(f"{where}: expected an object, got {type(record).__name__}")
    if key not in record:
        raise InputError(f"{where}: missing key {key!r}")
    value = record[key]
    if not isinstance(value, kind) or isinstance(value, bool):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise InputError(f"{where}.{key}: expected {names}, got {type(value).__name__}")
    return value


def _xywh_to_xyxy(value: object, where: str) -> Box:
    if not (isinstance(value, list) and len(value) == 4 and all(isinstance(v, (int, float)) for v in value)):
        raise InputError(f"{where}: expected a box [x, y, w, h] of 4 numbers, got {value!r}")
    x, y, w, h = (float(v) for v in value)
    return x, y, x + w, y + h


def _area(record: dict, box: Box, where: str) -> float:
    """The annotation's ``area``, or its box's where the file gives none."""
    if "area" not in record:
        return (box[2] - box[0]) * (box[3] - box[1])
    return float(_get(record, "area", (int, float), where))


def _coco(path: str | Path) -> tuple[dict, dict[int, ImageInfo], dict[int, list[tuple[int, dict]]]]:
    """The file, its images by id and its annotations (with their positions) by image id."""
    data = _load(path)
    where = str(path)
    images_raw = _get(data, "images", list, where)
    annotations = _get(data, "annotations", list, where)
    images: dict[int, ImageInfo] = {}
    for i, record in enumerate(images_raw):
        at = f"{where}: images[{i}]"
        info = ImageInfo(
            id=_get(record, "id", int, at),
            file_name=_get(record, "file_name", str, at),
            width=_get(record, "width", int, at),
            height=_get(record, "height", int, at),
        )
        if info.id in images:
            raise InputError(f"{at}.id: image id {info.id} appears twice")
        images[info.id] = info
    by_image: dict[int, list[tuple[int, dict]]] = defaultdict(list)
    for j, record in enumerate(annotations):
        at = f"{where}: annotations[{j}]"
        image_id = _get(record, "image_id", int, at)
        if image_id not in images:
            raise InputError(f"{at}.image_id: no image has id {image_id}")
        by_image[image_id].append((j, record))
    return data, images, by_image


def read_detection(path: str | Path) -> list[DetectionImage]:
    """Every image of a COCO detection file with its boxes (images without boxes included)."""
    _, images, by_image = _coco(path)
    result = []
    for image_id, info in images.items():
        boxes, areas, labels, crowd = [], [], [], []
        for j, record in by_image.get(image_id, []):
            at = f"{path}: annotations[{j}]"
            boxes.append(_xywh_to_xyxy(_get(record, "bbox", list, at), f"{at}.bbox"))
            areas.append(_area(record, boxes[-1], at))
            label = record.get("category_id", 0)
            if isinstance(label, bool) or not isinstance(label, int) or label < 0:
                raise InputError(f"{at}.category_id: expected a non-negative integer, got {str(label)[:40]!r}")
            labels.append(label)
            flag = record.get("iscrowd", 0)
            if flag not in (0, 1):
                raise InputError(f"{at}.iscrowd: expected 0 or 1, got {str(flag)[:40]!r}")
            crowd.append(bool(flag))
        result.append(DetectionImage(info, tuple(boxes), tuple(areas), tuple(labels), tuple(crowd)))
    return result


def read_category_names(path: str | Path) -> dict[int, str]:
    """The ``categories`` of a COCO file as {id: name} (empty when the file lists none)."""
    data = _load(path)
    names = {}
    for k, record in enumerate(data.get("categories") or []):
        at = f"{path}: categories[{k}]"
        names[_get(record, "id", int, at)] = _get(record, "name", str, at)
    return names


def category_words(name: str) -> tuple[str, ...]:
    """The words of a category name, lower case (``red_circle`` -> ``('red', 'circle')``; ``traffic light`` ->
    ``('traffic', 'light')``)."""
    return tuple(w for w in re.split(r"[\s_]+", name.strip().lower()) if w)


def read_rec(path: str | Path) -> list[RecSample]:
    """The referring expressions of a RefCOCO-style file (``images[i].caption``), each with its one box."""
    data, images, by_image = _coco(path)
    result = []
    for i, record in enumerate(data["images"]):
        info = images[record["id"]]
        expression = _get(record, "caption", str, f"{path}: images[{i}]")
        found = by_image.get(info.id, [])
        if len(found) != 1:
            raise InputError(f"{path}: images[{i}] (id {info.id}): a REC entry needs exactly one annotation, "
                             f"got {len(found)}")
        j, annotation = found[0]
        box = _xywh_to_xyxy(_get(annotation, "bbox", list, f"{path}: annotations[{j}]"),
                            f"{path}: annotations[{j}].bbox")
        result.append(RecSample(info, expression, box))
    return result


def read_region_captions(path: str | Path) -> list[RegionCaption]:
    """Every captioned region of a Visual Genome-style file (``annotations[j].caption``), in file order. A region
    without a caption of its own takes its image entry's (RefCOCOg style); a caption may be a list of references."""
    data, images, _ = _coco(path)
    image_records = {record["id"]: (i, record) for i, record in enumerate(data["images"])}
    result = []
    for j, record in enumerate(data["annotations"]):
        at = f"{path}: annotations[{j}]"
        box = _xywh_to_xyxy(_get(record, "bbox", list, at), f"{at}.bbox")
        i, image_record = image_records[record["image_id"]]
        if "caption" in record:
            caption, where = record["caption"], f"{at}.caption"
        elif "caption" in image_record:
            caption, where = image_record["caption"], f"{path}: images[{i}].caption"
        else:
            raise InputError(f"{at}: no caption, neither its own nor its image's (images[{i}])")
        references = caption if isinstance(caption, list) else [caption]
        if not references or not all(isinstance(c, str) and c.strip() for c in references):
            raise InputError(f"{where}: expected a caption or a list of captions, got {str(caption)[:60]!r}")
        annotation_id = record.get("id")
        result.append(RegionCaption(images[record["image_id"]], box, references[0], tuple(references), annotation_id))
    return result


def read_grounded_captions(path: str | Path) -> list[GroundedCaption]:
    """The captions of a Flickr30k-Entities (MDETR-style) file with their phrases: annotations that share a
    ``tokens_positive`` span form one phrase; an annotation with several spans belongs to each."""
    data, images, by_image = _coco(path)
    result = []
    for i, record in enumerate(data["images"]):
        info = images[record["id"]]
        caption = _get(record, "caption", str, f"{path}: images[{i}]")
        spans: dict[tuple[int, int], list[Box]] = defaultdict(list)
        for j, annotation in by_image.get(info.id, []):
            at = f"{path}: annotations[{j}]"
            box = _xywh_to_xyxy(_get(annotation, "bbox", list, at), f"{at}.bbox")
            for span in _get(annotation, "tokens_positive", list, at):
                if not (isinstance(span, list) and len(span) == 2 and all(isinstance(v, int) for v in span)
                        and 0 <= span[0] < span[1] <= len(caption)):
                    raise InputError(f"{at}.tokens_positive: expected [start, end] character offsets inside the "
                                     f"{len(caption)}-character caption, got {span!r}")
                spans[(span[0], span[1])].append(box)
        phrases = tuple(GroundedPhrase(span, caption[span[0] : span[1]], tuple(boxes))
                        for span, boxes in sorted(spans.items()))
        result.append(GroundedCaption(info, caption, phrases))
    return result


def read_lvis_ground(path: str | Path) -> list[GroundingQuery]:
    """The queries of an LVIS-Ground file: one per (image entry, category with boxes in it), in file order."""
    data, images, by_image = _coco(path)
    categories = {}
    for k, record in enumerate(_get(data, "categories", list, str(path))):
        at = f"{path}: categories[{k}]"
        name = _get(record, "name", str, at)
        categories[_get(record, "id", int, at)] = name.replace("_", " ").strip().lower()
    result = []
    for image_id, info in images.items():
        per_category: dict[int, tuple[list[Box], list[float]]] = {}
        for j, annotation in by_image.get(image_id, []):
            at = f"{path}: annotations[{j}]"
            category_id = _get(annotation, "category_id", int, at)
            if category_id not in categories:
                raise InputError(f"{at}.category_id: no category has id {category_id}")
            boxes, areas = per_category.setdefault(category_id, ([], []))
            boxes.append(_xywh_to_xyxy(_get(annotation, "bbox", list, at), f"{at}.bbox"))
            areas.append(_area(annotation, boxes[-1], at))
        for category_id, (boxes, areas) in per_category.items():
            result.append(GroundingQuery(info, category_id, categories[category_id], tuple(boxes), tuple(areas)))
    return result


def count_ground_boxes(text: str) -> int:
    """Number of ``<ground_box>`` placeholders in a gpt turn."""
    return len(re.findall(re.escape(GROUND_BOX), text))


def read_instruct(path: str | Path) -> list[Conversation]:
    """The conversations of a Groma Instruct file. Turns alternate human/gpt; each gpt turn holds exactly
    ``len(box_inds)`` ``<ground_box>`` and its ``box_inds`` index ``boxes``."""
    data = _load(path)
    if not isinstance(data, list):
        raise InputError(f"{path}: expected a list of conversations, got {type(data).__name__}")
    result = []
    for i, record in enumerate(data):
        at = f"{path}: [{i}]"
        info = ImageInfo(
            id=_get(record, "id", (int, str), at),
            file_name=_get(record, "file_name", str, at),
            width=_get(record, "width", int, at),
            height=_get(record, "height", int, at),
        )
        boxes = [_xywh_to_xyxy(box, f"{at}.boxes[{k}]") for k, box in enumerate(_get(record, "boxes", list, at))]
        turns_raw: Sequence = _get(record, "conversation", list, at)
        if len(turns_raw) % 2:
            raise InputError(f"{at}.conversation: expected human/gpt pairs, got {len(turns_raw)} turns")
        turns = []
        for t in range(0, len(turns_raw), 2):
            human, gpt = turns_raw[t], turns_raw[t + 1]
            for offset, (turn, role) in enumerate(((human, "human"), (gpt, "gpt"))):
                if _get(turn, "from", str, f"{at}.conversation[{t + offset}]") != role:
                    raise InputError(f"{at}.conversation[{t + offset}].from: expected {role!r}, got {turn['from']!r}")
            gat = f"{at}.conversation[{t + 1}]"
            answer = _get(gpt, "value", str, gat)
            indices = _get(gpt, "box_inds", list, gat)
            if any(not isinstance(k, int) or not 0 <= k < len(boxes) for k in indices):
                raise InputError(f"{gat}.box_inds: expected indices into the {len(boxes)} boxes, got {indices!r}")
            if count_ground_boxes(answer) != len(indices):
                raise InputError(f"{gat}: the value holds {count_ground_boxes(answer)} {GROUND_BOX} but box_inds has "
                                 f"{len(indices)} entries")
            question = _get(human, "value", str, f"{at}.conversation[{t}]")
            turns.append(ChatTurn(question, answer, tuple(boxes[k] for k in indices)))
        result.append(Conversation(info, tuple(turns)))
    return result
