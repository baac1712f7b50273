"""The task API: grounded captions, referring expressions, region captions and grounded chat.

:class:`Groma` holds a :class:`~groma_core.model.GromaModel` (it computes: proposals, region tokens, generation) and
its :class:`~groma_core.processor.GromaProcessor` (it formats prompts and parses answers); the task calls join the
two. Every call takes one image or a batch (a list); boxes from users are in pixels of the original image (x1, y1,
x2, y2). Answers are :class:`~groma_core.types.GroundedAnswer` objects.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from groma_core.errors import InputError, echo
from groma_core.processor import GromaProcessor, Request
from groma_core.types import GroundedAnswer

if TYPE_CHECKING:
    from groma_core.model import GromaModel

REFER = "<roi><refer_box></roi><refer_feat>"
CAPTION_PROMPT = "[grounding]Give me a concise description of the image."
DETAILED_CAPTION_PROMPT = "[grounding]Describe the image in detail."
LOCATE_PROMPT = "Locate <p>{}</p> in the image."
REGION_PROMPT = "What is " + REFER + "?"
DETAILED_REGION_PROMPT = "Please describe " + REFER + " in details."
#: ``<x1,y1,x2,y2>``; written without overlapping repeats, so a long unclosed ``<,,,,`` is rejected in linear time
BOX_IN_TEXT = re.compile(r"<([^<>,]*(?:,[^<>,]*)+)>")


@dataclass
class ChatSession:
    """A multi-turn grounded conversation about one image. ``boxes_px`` collects the user's boxes of every turn."""

    image: Any
    turns: list[tuple[str, str]] = field(default_factory=list)
    boxes_px: list[tuple[float, float, float, float]] = field(default_factory=list)


def boxes_from_text(text: str) -> tuple[str, list[tuple[float, float, float, float]]]:
    """Replace each ``<x1,y1,x2,y2>`` in a chat message by a referring placeholder; return the text and the boxes."""
    boxes: list[tuple[float, float, float, float]] = []

    def replace(match: re.Match) -> str:
        parts = [p.strip() for p in match.group(1).split(",")]
        if len(parts) != 4:
            raise InputError(f"box {echo(match.group(0))}: expected 4 numbers <x1,y1,x2,y2>, got {len(parts)}")
        try:
            numbers = tuple(float(p) for p in parts)
        except ValueError:
            raise InputError(f"box {echo(match.group(0))}: coordinates must be numbers") from None
        boxes.append(numbers)  # type: ignore[arg-type]
        return REFER

    return BOX_IN_TEXT.sub(replace, text), boxes


class Groma:
    """The task API over a model: ``Groma.load()`` (the embedded model), ``Groma.load("org/name")``, or
    ``Groma(model)`` around a :class:`~groma_core.model.GromaModel` built or trained elsewhere. ``model`` computes,
    ``processor`` formats and parses."""

    def __init__(self, model: GromaModel, processor: GromaProcessor | None = None):
        self.model = model
        self._processor = processor

    @property
    def processor(self) -> GromaProcessor:
        """The model's processor unless one was given (built on first use: a detector-only model has no
        tokenizer, and its detection evaluation needs none)."""
        if self._processor is None:
            self._processor = self.model.processor
        return self._processor

    @classmethod
    def load(cls, model: Any = None, overrides: Sequence[str] = (), **options: Any) -> Groma:
        """:func:`groma_core.api.load` (same arguments), wrapped in the task API."""
        from groma_core.api import load

        return cls(load(model, overrides, **options))

    def __repr__(self) -> str:
        recipe = self.recipe
        name = (recipe.core.name if recipe is not None else None) or type(self.model).__name__
        return f"Groma({name!r}, device={self.model.device})"

    @property
    def recipe(self) -> Any:
        """The recipe the model was built from (None for a model built by hand)."""
        return getattr(self.model, "recipe", None)

    def answer(self, requests: Sequence[Request], **generation: Any) -> list[GroundedAnswer]:
        """Run a batch of requests in one batched generation and parse each answer (the processor formats and
        parses, the model generates)."""
        if not requests:
            return []
        model, processor = self.model, self.processor
        batch = processor(requests).to(model.device, model.input_dtype)
        settings = self.generation_settings(**generation)
        out = model.generate(
            batch.pixel_values, batch.input_ids, refer_boxes=batch.refer_boxes, images=batch.images, **settings
        )
        return processor.post_process(out, batch)

    def generation_settings(self, **overrides: Any) -> dict[str, Any]:
        """The recipe's generation settings with per-call overrides."""
        settings = {}
        if self.recipe is not None:
            settings.update(self.recipe.core.generation.model_dump())
        settings.update({k: v for k, v in overrides.items() if v is not None})
        return settings

    def _single_or_batch(self, images, make, **generation):
        single = not isinstance(images, (list, tuple))
        batch = [images] if single else list(images)
        answers = self.answer([make(i, img) for i, img in enumerate(batch)], **generation)
        return answers[0] if single else answers

    def caption(self, images, detailed: bool = False, **generation: Any):
        """Grounded caption of each image (the ``[grounding]`` prompt): phrases with their boxes."""
        prompt = DETAILED_CAPTION_PROMPT if detailed else CAPTION_PROMPT
        return self._single_or_batch(images, lambda i, img: Request(img, [(prompt, None)]), **generation)

    def locate(self, images, expressions, **generation: Any):
        """Referring expression comprehension: where is "the man in a red shirt"? One expression per image."""
        exprs = [expressions] if isinstance(expressions, str) else list(expressions)
        n_images = 1 if not isinstance(images, (list, tuple)) else len(images)
        if len(exprs) != n_images:
            raise InputError(f"locate: {len(exprs)} expressions for {n_images} images")
        return self._single_or_batch(
            images, lambda i, img: Request(img, [(LOCATE_PROMPT.format(exprs[i]), None)]), **generation
        )

    def describe_region(self, images, boxes, detailed: bool = False, **generation: Any):
        """Region captioning: a caption for the user's box (pixels, x1 y1 x2 y2) on each image."""
        prompt = DETAILED_REGION_PROMPT if detailed else REGION_PROMPT
        single = not isinstance(images, (list, tuple))
        box_list = [boxes] if single else list(boxes)
        return self._single_or_batch(images, lambda i, img: Request(img, [(prompt, None)], [box_list[i]]), **generation)

    def chat(self, session: ChatSession, message: str, **generation: Any) -> GroundedAnswer:
        """One turn of grounded chat; boxes may be written in the message as ``<x1,y1,x2,y2>`` (pixels)."""
        text, boxes = boxes_from_text(message)
        all_boxes = session.boxes_px + boxes
        request = Request(session.image, [*session.turns, (text, None)], list(all_boxes))
        (answer,) = self.answer([request], **generation)
        session.turns.append((text, answer.raw_text))
        session.boxes_px = all_boxes
        return answer
