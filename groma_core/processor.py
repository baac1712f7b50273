"""The processor: everything between a user's request and the model's tensors, both ways. It formats (conversation
template, tokenizer, image preprocessing, user boxes into the model's input frame) and parses (generated ids into
text and grounded phrases with boxes in the original image's pixels, masks attached); the model only computes.

The task API (:class:`~groma_core.inference.Groma`), training (the conversations of
:mod:`groma_core.training.datasets`) and evaluation (through the task API) all go through one
:class:`GromaProcessor`, as transformers' processors do for its multimodal models (Kosmos-2's
``post_process_generation``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor

from groma_core import tokens as T
from groma_core.boxes import Frame, from_input_frame, to_input_frame
from groma_core.grounding import parse_grounded
from groma_core.prompt import GromaTokenizer, get_template
from groma_core.stages import ImageTokenizer
from groma_core.types import GroundedAnswer


@dataclass
class Request:
    """One sample: an image, the conversation turns so far and the user's boxes in pixels (one per ``<refer_feat>``,
    in order)."""

    image: Any
    turns: list[tuple[str, str | None]]
    boxes_px: list[Sequence[float]] = field(default_factory=list)


@dataclass
class ProcessedBatch:
    """A batch of requests as the model takes it."""

    pixel_values: Tensor  # (B, 3, H, W) float32, or the dtype and device of :meth:`to`
    input_ids: list[list[int]]  # one prompt per sample, unpadded
    refer_boxes: list[Tensor]  # per sample (n_i, 4): the user's boxes, normalized xyxy in the input frame
    images: list[Any]  # the decoded original images (PIL)
    frames: list[Frame]  # where each image lies in the input

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> ProcessedBatch:
        """The batch with its pixels on ``device`` in ``dtype`` and its boxes on ``device``."""
        return replace(
            self,
            pixel_values=self.pixel_values.to(device, dtype),
            refer_boxes=[b.to(device) for b in self.refer_boxes],
        )


class GromaProcessor:
    """Formats requests for a Groma pipeline and parses what it generates (see the module docstring)."""

    def __init__(self, tokenizer: GromaTokenizer, image_tokenizer: ImageTokenizer, template: str):
        self.tokenizer = tokenizer
        self.image_tokenizer = image_tokenizer
        self.template = template

    def frames(self, images: Sequence[Any]) -> list[Frame]:
        """Where each original (PIL) image lies in the image tokenizer's input (:data:`groma_core.boxes.Frame`)."""
        return [self.image_tokenizer.input_frame(*image.size) for image in images]

    def prompt_ids(self, turns: Sequence[tuple[str, str | None]], template: str | None = None) -> list[int]:
        """The ids of a conversation in the model's template (or ``template``), ready for generation."""
        return self.tokenizer.encode(get_template(template or self.template).render(turns))

    def __call__(self, requests: Sequence[Request]) -> ProcessedBatch:
        """Read the images and render the prompts of a batch of requests."""
        from groma_core.images import load_image, to_normalized_xyxy

        images = [load_image(r.image) for r in requests]
        frames = self.frames(images)
        boxes = []
        for r, image, frame in zip(requests, images, frames):
            given = to_normalized_xyxy(r.boxes_px, image.size) if r.boxes_px else torch.zeros(0, 4)
            boxes.append(to_input_frame(given, frame))
        prompts = [self.prompt_ids(r.turns) for r in requests]
        return ProcessedBatch(self.image_tokenizer.preprocess(images), prompts, boxes, images, frames)

    def post_process(self, output: Any, batch: ProcessedBatch) -> list[GroundedAnswer]:
        """The answers of a generation (:class:`~groma_core.model.GenerationOutput`) of ``batch``: clean text,
        grounded phrases with boxes in each original image's pixels and, where the proposer gives masks, each grounded
        box's mask."""
        answers = [
            parse_grounded(
                sequence,
                self.tokenizer,
                from_input_frame(output.regions.boxes[i], frame),
                image.size,
                output.regions.scores[i],
            )
            for i, (sequence, image, frame) in enumerate(zip(output.sequences, batch.images, batch.frames))
        ]
        masks = output.proposal_extras.get("masks")
        if masks is not None:
            for i, answer in enumerate(answers):
                attach_masks(answer, output.regions.source_index[i], masks[i])
        return answers

    def training_conversation(
        self, turns: Sequence[tuple[str, str]], template: str | None = None
    ) -> tuple[list[int], list[int]]:
        """Ids and labels of a training conversation in the model's template (or ``template``): see
        :func:`render_conversation`."""
        return render_conversation(self.tokenizer, template or self.template, turns)



def render_conversation(tokenizer, template: str, turns: Sequence[tuple[str, str]]) -> tuple[list[int], list[int]]:
    """Ids and labels of a conversation of (user, assistant) turns after the fixed first turn, masked as the
    reference does: only the answers and the ``</s>`` of every assistant turn but the fixed first one are
    supervised (a ``default`` template has no ``</s>``: nothing ends a turn)."""
    text = get_template(template).render([(user, T.SEP + answer + T.SEP) for user, answer in turns])
    ids = tokenizer.encode(text)
    sep, eos = tokenizer.token_id(T.SEP), tokenizer.eos_id
    labels = list(ids)
    marks = [j for j, t in enumerate(ids) if t == sep]
    if len(marks) != 2 * len(turns):
        raise ValueError(f"an answer holds {T.SEP}: {len(marks)} separators for {len(turns)} answers")
    for i in range(0, len(marks), 2):
        start = 0 if i == 0 else marks[i - 1]
        labels[start : marks[i]] = [T.IGNORE_INDEX] * (marks[i] - start)
    for j in [j for j, t in enumerate(ids) if t == eos][1:]:
        labels[j] = eos
    keep = [j for j, t in enumerate(ids) if t != sep]
    return [ids[j] for j in keep], [labels[j] for j in keep]


def attach_masks(answer: GroundedAnswer, source_index: Tensor, masks: Sequence[Any]) -> None:
    """Give each grounded box of ``answer`` the mask of the proposal its region came from (None for user boxes);
    ``source_index``: the regions' indices among the proposals (-1 for user boxes), ``masks``: one per proposal."""
    sources = source_index.tolist()
    for phrase in answer.phrases:
        phrase.masks = [masks[sources[k]] if sources[k] >= 0 else None for k in phrase.region_ids]
