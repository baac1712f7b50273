"""Training datasets: the reference Groma's annotation files (read by :mod:`groma_core.data`) turned into the
engine's sample mappings (see :mod:`groma_core.training.data`), with the reference's prompts and label masking.

Every language sample renders a conversation with the fixed first turn (``<image>``, ``<region>``) in the
dataset's template (``default`` for stage 2, ``llava`` for stage 3), wraps each answer in ``<sep>``, supervises only
what lies between a pair of ``<sep>`` (plus every ``</s>`` but the first one, which closes the fixed turn) and then
deletes the ``<sep>`` tokens (the reference's ``preprocess`` of every dataset). ``<ground_box>`` placeholders come
with their boxes in ``ground_boxes`` and ``<refer_box>``/``<refer_feat>`` with theirs in ``refer_boxes``
(normalized xyxy of the original image). Random choices (instruction templates, augmentation) use the global
generators, which the engine seeds per sample.

Bad data does not stop training: when a dataset is opened, boxes partly outside their image are clipped to it,
degenerate boxes and boxes entirely outside are dropped, and so are the samples whose text needs a dropped box;
one summary line per dataset goes to the ``groma_core.training`` logger and the counts stay on the dataset
(``dropped``, ``clipped``). A sample whose image cannot be read is replaced by the next sample, with a warning
naming the file (see :class:`_ImageDataset`).

The recipe's ``train.datasets`` section (:class:`DatasetSpec`) names each dataset's format and files;
:func:`build_datasets` opens them for a model.
"""

from __future__ import annotations

import logging
import math
import random
from abc import ABC, abstractmethod
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from groma_core import tokens as T
from groma_core.boxes import IDENTITY_FRAME, Frame, to_input_frame
from groma_core.data.instructions import (
    CAPTION_INSTRUCTIONS,
    DETAILED_REGION_INSTRUCTIONS,
    GROUNDING_INSTRUCTIONS,
    REC_INSTRUCTIONS,
    REGION_INSTRUCTIONS,
)
from groma_core.errors import GromaError, InputError
from groma_core.images import BOX_TOLERANCE_PX
from groma_core.processor import render_conversation
from groma_core.schema import (
    DatasetSpec,
    DetectionAugment,
    RecipeTraining,
    objective_of,
    resolve_path,
)

logger = logging.getLogger("groma_core.training")
ONCE = {"once": True}  #: marks a message every process would repeat (what opening a dataset found)

IGNORE_INDEX = T.IGNORE_INDEX
Box = tuple[float, float, float, float]
Preprocess = Callable[[Sequence[Image.Image]], Tensor]

REFER = T.ROI_OPEN + T.REFER_BOX + T.ROI_CLOSE + T.REFER_FEAT
MULTI_ROUND_MAX_REGIONS = 10  #: regions per image of the multi-round region captions (MultiRoundsVG)
MULTI_ROUND_NMS = 0.6  #: IoU of the random-score NMS over those regions


# -- rendering and masking -----------------------------------------------------------------------------------
def grounded(phrase: str, count: int) -> str:
    """``<p>phrase</p><roi><ground_box>...</roi>`` with ``count`` placeholders."""
    return T.P_OPEN + phrase + T.P_CLOSE + T.ROI_OPEN + T.GROUND_BOX * count + T.ROI_CLOSE


def normalized(boxes: Sequence[Box], width: int, height: int) -> Tensor:
    """Pixel xyxy boxes as normalized xyxy (n, 4), clamped to the image."""
    if not boxes:
        return torch.zeros(0, 4)
    scale = torch.tensor([width, height, width, height], dtype=torch.float32)
    return (torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4) / scale).clamp(0.0, 1.0)


# -- detection augmentation (stage 1, det_data.py) -----------------------------------------------------------
CROP_ATTEMPTS = 10


def augment_detection(
    image: Image.Image, boxes: Sequence[Box], size: tuple[int, int] | None, augment: DetectionAugment
) -> tuple[Image.Image, Tensor, list[int]]:
    """One draw of the stage-1 augmentation: the (W, H) = ``size`` image (``None``: the crop at its own size, for
    a tokenizer that keeps the aspect ratio), its boxes as normalized xyxy and the indices of the input boxes they
    come from. A crop that keeps no box is drawn again (the reference draws another image); after
    ``CROP_ATTEMPTS`` the whole image is kept."""
    w, h = image.size
    scale = min(random.choice(augment.scales) / min(w, h), augment.max_side / max(w, h))
    rw, rh = max(1, int(w * scale + 0.5)), max(1, int(h * scale + 0.5))
    image = image.resize((rw, rh), Image.BILINEAR)
    px = np.asarray(boxes, dtype=np.float64).reshape(-1, 4) * [rw / w, rh / h, rw / w, rh / h]
    crop_box, kept, cropped = (0, 0, rw, rh), np.arange(len(px)), px
    for _ in range(CROP_ATTEMPTS):
        ch = random.randint(min(rh, augment.crop[0]), min(rh, augment.crop[1]))
        cw = random.randint(min(rw, augment.crop[0]), min(rw, augment.crop[1]))
        oy, ox = random.randint(0, rh - ch), random.randint(0, rw - cw)
        moved = px - [ox, oy, ox, oy]
        moved[:, 0::2] = moved[:, 0::2].clip(0, cw)
        moved[:, 1::2] = moved[:, 1::2].clip(0, ch)
        inside = np.nonzero((moved[:, 2] > moved[:, 0]) & (moved[:, 3] > moved[:, 1]))[0]
        if len(inside) or not len(px):
            crop_box, kept, cropped = (ox, oy, ox + cw, oy + ch), inside, moved[inside]
            break
    image = image.crop(crop_box)
    cw, ch = crop_box[2] - crop_box[0], crop_box[3] - crop_box[1]
    out_w, out_h = size or (cw, ch)
    if (out_w, out_h) != (cw, ch):
        image = image.resize((out_w, out_h), Image.BILINEAR)
    cropped = cropped * [out_w / cw, out_h / ch, out_w / cw, out_h / ch]
    big = ((cropped[:, 2] - cropped[:, 0]) >= augment.min_box) & ((cropped[:, 3] - cropped[:, 1]) >= augment.min_box)
    cropped, kept = cropped[big], kept[big]
    if random.random() < augment.flip:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
        cropped = np.stack([out_w - cropped[:, 2], cropped[:, 1], out_w - cropped[:, 0], cropped[:, 3]], axis=1)
    boxes_out = normalized([tuple(b) for b in cropped.tolist()], out_w, out_h)
    return image, boxes_out, [int(k) for k in kept]


# -- checking boxes against their image ----------------------------------------------------------------------
NORMALIZED_BOX_TOLERANCE = 1e-3
"""How far a normalized box corner may lie outside [0, 1] before the box counts as clipped."""

DROP_REASONS = {
    "box_degenerate": ("degenerate box (no width or height, or not finite)",
                       "degenerate boxes (no width or height, or not finite)"),
    "box_outside_image": ("box outside the image", "boxes outside the image"),
    "image_size": ("sample whose image entry has no positive width and height",
                   "samples whose image entry has no positive width and height"),
    "expression_lost_box": ("expression that lost one of its boxes", "expressions that lost one of their boxes"),
    "sample_lost_box": ("sample that lost a box its text needs", "samples that lost a box their text needs"),
    "sample_no_box": ("sample left without any box", "samples left without any box"),
}  # fmt: skip
"""What a dataset drops when it is opened (the keys of ``dataset.dropped``), as its summary line says it."""


def fit_box(
    box: Sequence[float], width: float, height: float, tolerance: float = BOX_TOLERANCE_PX
) -> tuple[Box | None, str]:
    """``box`` (xyxy) clipped to a ``width`` x ``height`` image, and what happened to it: ``"kept"``,
    ``"clipped"`` (a corner lay more than ``tolerance`` outside the image), ``"degenerate"`` (a coordinate is not
    finite, or the box has no width or height: None) or ``"outside"`` (no area left inside the image: None)."""
    x1, y1, x2, y2 = (float(v) for v in box)
    if not all(math.isfinite(v) for v in (x1, y1, x2, y2)) or x2 <= x1 or y2 <= y1:
        return None, "degenerate"
    fitted = (min(max(x1, 0.0), width), min(max(y1, 0.0), height), min(max(x2, 0.0), width), min(max(y2, 0.0), height))
    if fitted[2] <= fitted[0] or fitted[3] <= fitted[1]:
        return None, "outside"
    moved = max(abs(a - b) for a, b in zip(fitted, (x1, y1, x2, y2)))
    return fitted, "clipped" if moved > tolerance else "kept"


def _plural(n: int, singular: str, plural: str) -> str:
    return f"{n} {singular if n == 1 else plural}"


class _UnreadableImage(Exception):
    """An image file that :func:`groma_core.images.load_image` refused (the message names the file and why)."""

    def __init__(self, file_name: str, reason: str):
        super().__init__(reason)
        self.file_name = file_name


# -- datasets ------------------------------------------------------------------------------------------------
class _ImageDataset(torch.utils.data.Dataset, ABC):
    """Records of an annotation file with an image file each; ``pixel_values`` come from the model's
    preprocessing.

    When opened, boxes partly outside their image are clipped to it, and boxes that are degenerate or entirely
    outside are dropped, with the records whose text needs them; ``dropped`` (reason -> count, the keys of
    :data:`DROP_REASONS`) and ``clipped`` keep the counts and one summary line goes to the
    ``groma_core.training`` logger (a warning when anything was dropped or clipped).

    A sample whose image cannot be read is replaced by the next one (deterministically, so a resumed run reads
    the same samples); the file is named once in a warning and kept in ``unreadable`` (file -> reason), and the
    sample that stands in for it has ``skipped`` 1 (else 0). Reading fails with :class:`GromaError` when
    ``max_unreadable_in_a_row`` images in a row, or more than ``max_unreadable_fraction`` of the records (and
    more than ``max_unreadable_in_a_row``), cannot be read."""

    max_unreadable_in_a_row = 20
    max_unreadable_fraction = 0.1
    #: where an image lies in the model's input (the image tokenizer's ``input_frame``; set by :func:`open_dataset`):
    #: the samples' boxes are normalized to the input, so a letterboxing tokenizer gets its padded frame
    frame: Callable[[int, int], Frame] = staticmethod(lambda width, height: IDENTITY_FRAME)
    #: whether a sample carries its (augmented) PIL image as ``image``, for a model with a stage that reads the
    #: original images (set by :func:`open_dataset` from ``model.needs_images``)
    keep_images: bool = False

    def __init__(self, ann: str | Path, images: str | Path, preprocess: Preprocess, name: str | None = None):
        self.ann = Path(ann)
        self.images = Path(images)
        self.preprocess = preprocess
        self.name = name or self.ann.stem
        self.dropped: dict[str, int] = {}
        self.clipped = 0
        self.unreadable: dict[str, str] = {}
        raw = self.read(self.ann)
        self.records = [c for c in map(self.clean, raw) if c is not None]
        self._report(len(raw))

    @abstractmethod
    def read(self, ann: Path) -> list[Any]:
        """The records of the annotation file."""

    def clean(self, record: Any) -> Any | None:
        """The record with its boxes fitted to its image, or None to drop it (counted in ``dropped``)."""
        return record

    @abstractmethod
    def item(self, record: Any) -> dict[str, Any]:
        """The sample of one record, with ``image_file`` (raises :class:`_UnreadableImage` through ``load``)."""

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict[str, Any]:
        tries = min(self.max_unreadable_in_a_row, len(self.records))
        last: _UnreadableImage | None = None
        for skipped in range(tries):
            try:
                sample = self.item(self.records[(i + skipped) % len(self.records)])
            except _UnreadableImage as exc:
                self._unreadable(exc)
                last = exc
                continue
            return {**sample, "skipped": int(skipped > 0)}
        raise GromaError(
            f"dataset {self.name!r}: {tries} images in a row cannot be read (the last: {last}); check the image "
            f"folder {self.images}"
        )

    def load(self, file_name: str) -> Image.Image:
        from groma_core.images import load_image

        try:
            return load_image(self.images / file_name)
        except InputError as exc:
            raise _UnreadableImage(file_name, str(exc)) from exc

    def pixels(self, image: Image.Image) -> Tensor:
        return self.preprocess([image])[0]

    def fit(
        self, boxes: Sequence[Sequence[float]], width: float, height: float, tolerance: float = BOX_TOLERANCE_PX
    ) -> list[Box | None]:
        """Each box clipped to the image, or None where it is dropped (counted)."""
        out = []
        for box in boxes:
            fitted, status = fit_box(box, width, height, tolerance)
            if fitted is None:
                self.count("box_degenerate" if status == "degenerate" else "box_outside_image")
            self.clipped += status == "clipped"
            out.append(fitted)
        return out

    def keep_fitted_boxes(self, r: Any) -> Any | None:
        """A record with ``image``, ``boxes`` and ``areas`` (detection, LVIS-Ground) with its boxes fitted to its
        image and the dropped ones left out; None (counted) when its image has no size or no box is left."""
        if not self.sized(r.image):
            return None
        fitted = self.fit(r.boxes, r.image.width, r.image.height)
        if all(b is None for b in fitted):
            self.count("sample_no_box")
            return None
        boxes = tuple(b for b in fitted if b is not None)
        kept = {"areas": tuple(a for a, b in zip(r.areas, fitted) if b is not None)}
        if getattr(r, "labels", ()):
            kept["labels"] = tuple(a for a, b in zip(r.labels, fitted) if b is not None)
        return replace(r, boxes=boxes, **kept)

    def sized(self, info: Any) -> bool:
        """Whether an image entry has a positive size (else the record is counted as dropped)."""
        if info.width > 0 and info.height > 0:
            return True
        self.count("image_size")
        return False

    def count(self, reason: str) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + 1

    def _report(self, total: int) -> None:
        where = f"dataset {self.name!r} ({self.ann})"
        parts = [_plural(self.dropped[k], *DROP_REASONS[k]) for k in DROP_REASONS if self.dropped.get(k)]
        if not parts and not self.clipped:
            logger.info("%s: %d samples, every box inside its image", where, len(self.records), extra=ONCE)
            return
        changes = (["dropped " + ", ".join(parts)] if parts else []) + (
            [f"clipped {_plural(self.clipped, 'box', 'boxes')} to the image"] if self.clipped else []
        )
        logger.warning(
            "%s: %s (%d of %d samples kept)", where, "; ".join(changes), len(self.records), total, extra=ONCE
        )

    def _unreadable(self, exc: _UnreadableImage) -> None:
        if exc.file_name in self.unreadable:
            return
        self.unreadable[exc.file_name] = str(exc)
        logger.warning("dataset %r: skipping an unreadable image, the next sample takes its place: %s", self.name, exc)
        limit = max(self.max_unreadable_in_a_row, self.max_unreadable_fraction * len(self.records))
        if len(self.unreadable) > limit:
            raise GromaError(
                f"dataset {self.name!r}: {len(self.unreadable)} of its {len(self.records)} samples' images cannot be "
                f"read (e.g. {exc}); check the image folder {self.images}"
            )


class DetectionDataset(_ImageDataset):
    """Class-agnostic COCO detection (stage 1): ``pixel_values`` and ``boxes``, augmented as the reference. An
    image that loses every one of its boxes is dropped (its objects would be taken for background)."""

    def __init__(
        self,
        ann: str | Path,
        images: str | Path,
        preprocess: Preprocess,
        image_size: tuple[int, int],
        augment: DetectionAugment | None = None,
        name: str | None = None,
    ):
        self.image_size = (int(image_size[0]), int(image_size[1]))  # (H, W)
        self.augment = augment or DetectionAugment().scaled(max(self.image_size))
        super().__init__(ann, images, preprocess, name)
        #: the last words of the file's category names (their head nouns: ``red_circle`` -> ``circle``), sorted, and
        #: each category's index among them: what a ``crops`` stage with ``crop_labels: head`` names (read from the
        #: file by :meth:`name_heads`, which :func:`open_dataset` calls for such a model)
        self.head_vocabulary: list[str] = []
        self._label_heads: dict[int, int] = {}

    def name_heads(self) -> None:
        """Give each sample ``box_heads``: the index of each box's category-name head word in
        :attr:`head_vocabulary` (-1 where the category has no name)."""
        from groma_core.data import category_words, read_category_names

        heads = {k: category_words(v)[-1:] for k, v in read_category_names(self.ann).items()}
        self.head_vocabulary = sorted({h[0] for h in heads.values() if h})
        index = {w: i for i, w in enumerate(self.head_vocabulary)}
        self._label_heads = {k: index[h[0]] for k, h in heads.items() if h}

    def read(self, ann):
        from groma_core.data import read_detection

        return read_detection(ann)

    def clean(self, r):
        return self.keep_fitted_boxes(r) if r.boxes else r

    def item(self, record):
        image = self.load(record.image.file_name)
        fills = self.frame(*image.size) == IDENTITY_FRAME
        size = (self.image_size[1], self.image_size[0]) if fills else None  # a letterbox keeps the crop's aspect
        image, boxes, kept = augment_detection(image, record.boxes, size, self.augment)
        sample = {
            "pixel_values": self.pixels(image),
            "boxes": to_input_frame(boxes, self.frame(*image.size)),
            "image_file": record.image.file_name,
        }
        if self.keep_images:
            sample["image"] = image
        if record.labels:
            sample["box_labels"] = torch.tensor([record.labels[k] for k in kept], dtype=torch.long)
            if self._label_heads:  # the head word of each box's category name, an index into head_vocabulary
                heads = [self._label_heads.get(record.labels[k], -1) for k in kept]
                sample["box_heads"] = torch.tensor(heads, dtype=torch.long)
        return sample


class _ConversationDataset(_ImageDataset):
    """Language samples: the subclass gives the turns and the boxes of one record."""

    def __init__(
        self,
        ann: str | Path,
        images: str | Path,
        preprocess: Preprocess,
        tokenizer,
        template: str = "default",
        name: str | None = None,
    ):
        self.tokenizer = tokenizer
        self.template = template
        super().__init__(ann, images, preprocess, name)

    @abstractmethod
    def sample(self, record: Any) -> tuple[str, list[tuple[str, str]], dict[str, Tensor]]:
        """(image file, turns, {"ground_boxes" or "refer_boxes": normalized xyxy})."""

    def item(self, record):
        file_name, turns, boxes = self.sample(record)
        ids, labels = render_conversation(self.tokenizer, self.template, turns)
        image = self.load(file_name)
        frame = self.frame(*image.size)
        boxes = {k: to_input_frame(v, frame) for k, v in boxes.items()}
        pixels = self.pixels(image)
        sample = {"pixel_values": pixels, "input_ids": ids, "labels": labels, **boxes, "image_file": file_name}
        return {**sample, "image": image} if self.keep_images else sample

    def fit_all(self, boxes: Sequence[Box], info: Any) -> list[Box] | None:
        """The boxes a record's text needs, clipped to its image; None (the record dropped, counted) when one of
        them is dropped."""
        if not self.sized(info):
            return None
        fitted = self.fit(boxes, info.width, info.height)
        if any(b is None for b in fitted):
            self.count("sample_lost_box")
            return None
        return fitted

    def fit_parts(self, parts: Sequence[Any], info: Any) -> tuple | None:
        """``parts`` (phrases, turns: each with ``boxes`` the text needs) with their boxes clipped to the image;
        None (the record dropped, counted) when one of them is dropped."""
        boxes = self.fit_all([b for p in parts for b in p.boxes], info)
        if boxes is None:
            return None
        out, start = [], 0
        for p in parts:
            out.append(replace(p, boxes=tuple(boxes[start : start + len(p.boxes)])))
            start += len(p.boxes)
        return tuple(out)


class RecDataset(_ConversationDataset):
    """Referring expression comprehension (RefCOCO-style file): ``Locate <p>expr</p> in the image.`` ->
    ``<roi><ground_box></roi>``. With ``turns`` > 1 the expressions of one image are asked together, up to
    ``turns`` per sample, as the turns of one conversation (in the file's order; the reference asks one)."""

    def __init__(self, *args, turns: int = 1, **kwargs):
        super().__init__(*args, **kwargs)
        self.turns = int(turns)
        if self.turns > 1:
            by_image: dict[str, list] = {}
            for r in self.records:
                by_image.setdefault(r.image.file_name, []).append(r)
            step = self.turns
            self.records = [tuple(g[k : k + step]) for g in by_image.values() for k in range(0, len(g), step)]

    def read(self, ann):
        from groma_core.data import read_rec

        return read_rec(ann)

    def clean(self, r):
        boxes = self.fit_all([r.box], r.image)
        return None if boxes is None else replace(r, box=boxes[0])

    def sample(self, r):
        group = r if isinstance(r, tuple) else (r,)
        answer = T.ROI_OPEN + T.GROUND_BOX + T.ROI_CLOSE
        turns = [
            (random.choice(REC_INSTRUCTIONS).format(T.P_OPEN + e.expression.strip() + T.P_CLOSE), answer) for e in group
        ]
        info = group[0].image
        return info.file_name, turns, {"ground_boxes": normalized([e.box for e in group], info.width, info.height)}


class GroundingDataset(_ConversationDataset):
    """Multi-object grounding (COCO/LVIS categories; LVIS-Ground file): ``Locate all <p>class</p> in this
    image.`` -> ``<roi><ground_box>...</roi>``, one per instance (a dropped box is left out of the answer)."""

    def read(self, ann):
        from groma_core.data import read_lvis_ground

        return read_lvis_ground(ann)

    def clean(self, r):
        return self.keep_fitted_boxes(r)

    def sample(self, r):
        question = random.choice(GROUNDING_INSTRUCTIONS).format(T.P_OPEN + r.category.strip().lower() + T.P_CLOSE)
        answer = T.ROI_OPEN + T.GROUND_BOX * len(r.boxes) + T.ROI_CLOSE
        return (
            r.image.file_name,
            [(question, answer)],
            {"ground_boxes": normalized(r.boxes, r.image.width, r.image.height)},
        )


class GroundedCaptionDataset(_ConversationDataset):
    """Grounded captions (Flickr30k Entities, MDETR style): ``[grounding]`` + a caption instruction -> the
    caption with ``<p>phrase</p><roi><ground_box>...</roi>`` at the phrase spans (with ``bare_phrases``:
    ``phrase<ground_box>...``)."""

    def __init__(self, *args, bare_phrases: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.bare_phrases = bool(bare_phrases)

    def read(self, ann):
        from groma_core.data import read_grounded_captions

        return [r for r in read_grounded_captions(ann) if r.phrases]  # the reference skips unannotated images

    def clean(self, r):
        phrases = self.fit_parts(r.phrases, r.image)
        return None if phrases is None else replace(r, phrases=phrases)

    def sample(self, r):
        text, end, boxes = "", 0, []
        for phrase in r.phrases:
            start, stop = phrase.span
            phrase_text = r.caption[start:stop]
            text += r.caption[end:start] + (
                phrase_text + T.GROUND_BOX * len(phrase.boxes)
                if self.bare_phrases
                else grounded(phrase_text, len(phrase.boxes))
            )
            boxes += phrase.boxes
            end = stop
        text += r.caption[end:]
        question = T.GROUNDING + random.choice(CAPTION_INSTRUCTIONS)
        return (
            r.image.file_name,
            [(question, text.strip())],
            {"ground_boxes": normalized(boxes, r.image.width, r.image.height)},
        )


class RegionCaptionDataset(_ConversationDataset):
    """Single-region captions (Visual Genome-style file, one sample per region): ``What is
    <roi><refer_box></roi><refer_feat>?`` -> the caption, lower-cased and capitalized."""

    instructions = REGION_INSTRUCTIONS

    def read(self, ann):
        from groma_core.data import read_region_captions

        return read_region_captions(ann)

    def clean(self, r):
        boxes = self.fit_all([r.box], r.image)
        return None if boxes is None else replace(r, box=boxes[0])

    def sample(self, r):
        question = random.choice(self.instructions).format(REFER)
        return (
            r.image.file_name,
            [(question, r.caption.strip().lower().capitalize())],
            {"refer_boxes": normalized([r.box], r.image.width, r.image.height)},
        )


class DetailedRegionCaptionDataset(RegionCaptionDataset):
    """Detailed region captions from a RefCOCOg-style REC file: ``Please describe <roi><refer_box></roi>
    <refer_feat> in details.`` -> the expression."""

    instructions = DETAILED_REGION_INSTRUCTIONS

    def read(self, ann):
        from groma_core.data import RegionCaption, read_rec

        return [RegionCaption(r.image, r.box, r.expression, (r.expression,)) for r in read_rec(ann)]


class MultiRoundRegionCaptionDataset(_ConversationDataset):
    """Multi-round region captions (MultiRoundsVG, one sample per image): the image's distinct regions thinned by
    a random-score NMS (IoU 0.6), at most 10, one question each (a dropped region is not asked about)."""

    def read(self, ann):
        from groma_core.data import read_region_captions

        by_image: dict[Any, list] = defaultdict(list)
        for r in read_region_captions(ann):
            if r.box not in [x.box for x in by_image[r.image.id]]:
                by_image[r.image.id].append(r)
        return list(by_image.values())

    def clean(self, regions):
        info = regions[0].image
        if not self.sized(info):
            return None
        fitted = self.fit([r.box for r in regions], info.width, info.height)
        kept = [replace(r, box=b) for r, b in zip(regions, fitted) if b is not None]
        if not kept:
            self.count("sample_no_box")
            return None
        return kept

    def sample(self, regions):
        from groma_core.boxes import nms

        boxes = torch.tensor([r.box for r in regions], dtype=torch.float32)
        keep = nms(boxes, torch.rand(len(regions)), MULTI_ROUND_NMS).tolist()[:MULTI_ROUND_MAX_REGIONS]
        chosen = [regions[k] for k in keep]
        turns = [
            (random.choice(REGION_INSTRUCTIONS).format(REFER), r.caption.strip().lower().capitalize()) for r in chosen
        ]
        info = regions[0].image
        return info.file_name, turns, {"refer_boxes": normalized([r.box for r in chosen], info.width, info.height)}


class GritDataset(_ConversationDataset):
    """GRIT-style REC (``[{filename, caption, ref_exps: [[start, end, x1, y1, x2, y2, ...], ...]}]``, normalized
    boxes): one random expression, with every box of its span (an expression that loses a box is dropped)."""

    def read(self, ann):
        return _read_grit(ann)

    def clean(self, r):
        fitted = self.fit([e[2:6] for e in r["ref_exps"]], 1.0, 1.0, NORMALIZED_BOX_TOLERANCE)
        lost = {tuple(e[:2]) for e, b in zip(r["ref_exps"], fitted) if b is None}
        for _ in lost:
            self.count("expression_lost_box")
        exps = [[*e[:2], *b, *e[6:]] for e, b in zip(r["ref_exps"], fitted) if tuple(e[:2]) not in lost]
        if not exps:
            self.count("sample_no_box")
            return None
        return {**r, "ref_exps": exps}

    def sample(self, r):
        chosen = random.choice(r["ref_exps"])
        boxes = [chosen[2:6]] + [e[2:6] for e in r["ref_exps"] if e[:2] == chosen[:2] and e != chosen]
        label = r["caption"][int(chosen[0]) : int(chosen[1])]
        question = random.choice(REC_INSTRUCTIONS).format(T.P_OPEN + label.strip() + T.P_CLOSE)
        answer = T.ROI_OPEN + T.GROUND_BOX * len(boxes) + T.ROI_CLOSE
        return (
            r["filename"],
            [(question, answer)],
            {"ground_boxes": torch.tensor(boxes, dtype=torch.float32).clamp(0.0, 1.0)},
        )


class ConversationDataset(_ConversationDataset):
    """Image-level conversations (LLaVA-Instruct, ShareGPT4V: ``[{image, conversations: [{from, value}]}]``):
    the original turns, ``<image>`` removed and newlines turned into spaces."""

    def read(self, ann):
        return _read_conversations(ann)

    def sample(self, r):
        values = [c["value"].replace(T.IMAGE, "").replace("\n", " ") for c in r["conversations"]]
        return r["image"], list(zip(values[0::2], values[1::2])), {}


class InstructDataset(_ConversationDataset):
    """Groma Instruct multi-turn grounded conversations: ``[grounding]`` + each human turn; the boxes of every
    gpt turn's ``box_inds`` in order."""

    def read(self, ann):
        from groma_core.data import read_instruct

        return read_instruct(ann)

    def clean(self, r):
        turns = self.fit_parts(r.turns, r.image)
        return None if turns is None else replace(r, turns=turns)

    def sample(self, r):
        turns = [(T.GROUNDING + t.question, t.answer) for t in r.turns]
        boxes = [b for t in r.turns for b in t.boxes]
        return r.image.file_name, turns, {"ground_boxes": normalized(boxes, r.image.width, r.image.height)}


def _read_json_list(path: str | Path, keys: Sequence[str]) -> list[dict]:
    import json

    from groma_core.errors import InputError

    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise InputError(f"{path}: cannot read the annotation file ({exc.strerror or exc})") from exc
    except ValueError as exc:
        raise InputError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(data, list):
        raise InputError(f"{path}: expected a list of records, got {type(data).__name__}")
    for i, record in enumerate(data):
        missing = [k for k in keys if not isinstance(record, dict) or k not in record]
        if missing:
            raise InputError(f"{path}: [{i}]: missing key(s) {', '.join(map(repr, missing))}")
    return data


def _read_conversations(path: str | Path) -> list[dict]:
    from groma_core.errors import InputError

    data = _read_json_list(path, ("image", "conversations"))
    for i, record in enumerate(data):
        turns = record["conversations"]
        if not isinstance(turns, list) or not turns or len(turns) % 2:
            raise InputError(f"{path}: [{i}].conversations: expected human/gpt pairs")
        for j, turn in enumerate(turns):
            if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
                raise InputError(f"{path}: [{i}].conversations[{j}]: expected {{from, value}} with a string value")
    return data


def _read_grit(path: str | Path) -> list[dict]:
    from groma_core.errors import InputError

    data = _read_json_list(path, ("filename", "caption", "ref_exps"))
    for i, record in enumerate(data):
        exps = record["ref_exps"]
        if not isinstance(exps, list) or not exps or any(not _is_ref_exp(e) for e in exps):
            raise InputError(f"{path}: [{i}].ref_exps: expected [[start, end, x1, y1, x2, y2, ...], ...] of numbers")
    return data


def _is_ref_exp(value: Any) -> bool:
    return (
        isinstance(value, list)
        and len(value) >= 6
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value[:6])
    )


LANGUAGE_FORMATS: dict[str, type[_ConversationDataset]] = {
    "rec": RecDataset,
    "grounding": GroundingDataset,
    "grounded-caption": GroundedCaptionDataset,
    "region-caption": RegionCaptionDataset,
    "region-caption-multi": MultiRoundRegionCaptionDataset,
    "refcocog-caption": DetailedRegionCaptionDataset,
    "grit": GritDataset,
    "conversation": ConversationDataset,
    "instruct": InstructDataset,
}


def open_dataset(
    spec: DatasetSpec, model, base_dir: Path | None = None, name: str | None = None
) -> torch.utils.data.Dataset:
    """The dataset ``spec`` describes (relative paths from ``base_dir``), rendered with ``model``'s tokenizer and
    image preprocessing; ``name`` (default: the annotation file's stem) is what its messages call it."""
    if spec.format == "recall":
        from groma_core.training.synthetic import RecallDataset

        return RecallDataset(
            model.tokenizer, spec.size, spec.regions, spec.queries, spec.copy_fraction, spec.template, name
        )
    ann, images = resolve_path(spec.ann, base_dir), resolve_path(spec.images, base_dir)
    tokenizer = model.image_tokenizer
    if spec.format == "detection":
        size = tuple(tokenizer.image_size)
        dataset = DetectionDataset(ann, images, tokenizer.preprocess, size, spec.augment(max(size)), name=name)
        if getattr(model.region_encoder, "crop_labels", None) == "head":
            dataset.name_heads()
    else:
        extra = {"turns": spec.turns} if spec.format == "rec" else {}
        if spec.format == "grounded-caption":
            extra = {"bare_phrases": spec.bare_phrases}
        dataset = LANGUAGE_FORMATS[spec.format](
            ann, images, tokenizer.preprocess, model.tokenizer, spec.template, name, **extra
        )
    dataset.frame = tokenizer.input_frame
    dataset.keep_images = bool(getattr(model, "needs_images", False))
    return dataset


def build_datasets(config: RecipeTraining, model, base_dir: Path | None = None) -> dict[str, Any]:
    """The datasets the stages of ``config`` use, by name (``base_dir``: the recipe file's folder)."""
    used = {d.name for s in config.stages for d in s.data}
    root = config.root(base_dir)
    return {name: open_dataset(spec, model, root, name) for name, spec in config.datasets.items() if name in used}


def dataset_text(config: RecipeTraining, base_dir: Path | None = None) -> list[str]:
    """The text of the language datasets the stages use (instructions, answers, prompts' fixed parts), one line
    per string, without Groma's special tokens: what a tokenizer for them is trained on."""
    from groma_core import data as D
    from groma_core.prompt import IMAGE_TURN, IMAGE_TURN_REPLY, SYSTEM

    lines = [SYSTEM, IMAGE_TURN, IMAGE_TURN_REPLY, "USER: ASSISTANT:"]
    lines += [t.format("") for t in REC_INSTRUCTIONS + GROUNDING_INSTRUCTIONS + REGION_INSTRUCTIONS]
    lines += list(CAPTION_INSTRUCTIONS) + [t.format("") for t in DETAILED_REGION_INSTRUCTIONS]
    used = {d.name for s in config.stages for d in s.data}
    root = config.root(base_dir)
    for name, spec in config.datasets.items():
        if name not in used or objective_of(spec.format) != "lm":
            continue
        ann = resolve_path(spec.ann, root)
        if spec.format in ("rec", "refcocog-caption"):
            lines += [r.expression for r in D.read_rec(ann)]
        elif spec.format == "grounding":
            lines += [r.category for r in D.read_lvis_ground(ann)]
        elif spec.format == "grounded-caption":
            lines += [r.caption for r in D.read_grounded_captions(ann)]
        elif spec.format in ("region-caption", "region-caption-multi"):
            lines += [r.caption.strip().lower().capitalize() for r in D.read_region_captions(ann)]
        elif spec.format == "grit":
            lines += [r["caption"] for r in _read_grit(ann)]
        elif spec.format == "conversation":
            lines += [c["value"] for r in _read_conversations(ann) for c in r["conversations"]]
        elif spec.format == "instruct":
            lines += [text for r in D.read_instruct(ann) for t in r.turns for text in (t.question, t.answer)]
    specials = sorted(T.NEW_TOKENS, key=len, reverse=True)
    out = []
    for line in dict.fromkeys(lines):
        for token in specials:
            line = line.replace(token, " ")
        out += [part.strip() for part in line.splitlines() if part.strip()]
    return out


def make_tokenizer(config: RecipeTraining, out: str | Path, base_dir: Path | None = None, vocab_size: int = 1000):
    """Train a LLaMA-style SentencePiece tokenizer (BPE with byte fallback; unk 0, bos 1, eos 2) of ``vocab_size``
    pieces on :func:`dataset_text` into ``out/tokenizer.model`` (for models trained from scratch)."""
    from groma_core.prompt import make_sentencepiece

    return make_sentencepiece(out, vocab_size, "\n".join(dataset_text(config, base_dir)))
