"""Typed containers passed between the stages of a pipeline.

Every box that crosses a stage boundary is ``xyxy`` (x1, y1, x2, y2), normalized to [0, 1] of the *original*
image, float32. Stages convert to their own internal formats (centre format, pixels) privately.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor


@dataclass
class ImageFeatures:
    """What an :class:`~groma_core.stages.ImageTokenizer` produces for a batch of B images.

    ``tokens``: (B, T, D) image tokens for the language model (before the image projector).
    ``levels``: named feature maps, each (B, C, h, w), read by the proposer and the region encoder by name.
    ``images``: the original RGB images (PIL) when the caller had them, for stages that work on pixels of their own
    (a proposer with its own detector); None otherwise. ``frames``: with them, where each lies in the tokenizer's
    input (:data:`groma_core.boxes.Frame`), to take a box of the input back to the original image.
    """

    tokens: Tensor
    levels: dict[str, Tensor]
    images: list[Any] | None = None
    frames: list[tuple[float, float, float, float]] | None = None

    @property
    def batch_size(self) -> int:
        return self.tokens.shape[0]

    def level(self, name: str) -> Tensor:
        """The feature map called ``name``; a KeyError lists the levels that exist."""
        try:
            return self.levels[name]
        except KeyError:
            raise KeyError(f"image features have no level {name!r}; available: {sorted(self.levels)}") from None


@dataclass
class Proposals:
    """Candidate boxes of a :class:`~groma_core.stages.RegionProposer`, one entry per image.

    ``boxes[i]``: (N_i, 4) normalized xyxy (centres inside the image; corners may cross its border, as the
    reference's unclipped proposals do); ``scores[i]``: (N_i,) in [0, 1]. ``extras`` carries stage-specific
    outputs (raw logits for training losses, masks) that the core passes through untouched.
    """

    boxes: list[Tensor]
    scores: list[Tensor]
    extras: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.boxes) != len(self.scores):
            raise ValueError(f"proposals: {len(self.boxes)} box lists but {len(self.scores)} score lists")
        for i, (b, s) in enumerate(zip(self.boxes, self.scores)):
            if b.ndim != 2 or b.shape[-1] != 4:
                raise ValueError(f"proposals: boxes[{i}] must have shape (N, 4), got {tuple(b.shape)}")
            if s.shape != b.shape[:1]:
                raise ValueError(f"proposals: scores[{i}] has shape {tuple(s.shape)}, boxes[{i}] {tuple(b.shape)}")


@dataclass
class Regions:
    """The selected regions of each image, in the order that defines ``<rK>``: region K is ``boxes[i][K]``.

    ``refer_index[i]``: (n_i,) index of each user box of image i among its regions (the K of its ``<rK>``).
    ``ground_index[i]``: the same for training ground-truth boxes (empty at inference).
    ``source_index[i]``: for each region, its index among the image's proposals, or -1 for a user or ground-truth
    box (so per-proposal extras such as masks can follow the regions).
    """

    boxes: list[Tensor]
    scores: list[Tensor]
    refer_index: list[Tensor]
    ground_index: list[Tensor]
    source_index: list[Tensor] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.boxes)

    def counts(self) -> list[int]:
        return [b.shape[0] for b in self.boxes]


@dataclass
class GroundedPhrase:
    """A phrase of the answer and the regions it was grounded to.

    ``span``: (start, end) character offsets in :attr:`GroundedAnswer.text`. ``boxes`` are normalized xyxy;
    ``boxes_px`` are in pixels of the original image. ``region_ids`` are the K of each ``<rK>``. ``masks``: one
    (H, W) bool mask per box when the proposer gives masks (None for a box without one, e.g. a user box), else None.
    """

    phrase: str
    span: tuple[int, int]
    region_ids: list[int]
    boxes: list[tuple[float, float, float, float]]
    boxes_px: list[tuple[float, float, float, float]]
    masks: list[Any] | None = None


@dataclass
class GroundedAnswer:
    """A parsed model answer: raw text with tags, clean text, grounded phrases and the regions it could refer to."""

    raw_text: str
    text: str
    phrases: list[GroundedPhrase]
    regions: Tensor = field(default_factory=lambda: torch.zeros(0, 4))
    region_scores: Tensor = field(default_factory=lambda: torch.zeros(0))
    image_size: tuple[int, int] | None = None
    warnings: list[str] = field(default_factory=list)

    @property
    def boxes(self) -> list[tuple[float, float, float, float]]:
        """Every grounded box of the answer (normalized xyxy), in order of appearance."""
        return [b for p in self.phrases for b in p.boxes]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable view of the answer."""
        return {
            "text": self.text,
            "raw_text": self.raw_text,
            "image_size": list(self.image_size) if self.image_size else None,
            "phrases": [
                {
                    "phrase": p.phrase,
                    "span": list(p.span),
                    "region_ids": p.region_ids,
                    "boxes": [list(b) for b in p.boxes],
                    "boxes_px": [list(b) for b in p.boxes_px],
                    "has_masks": p.masks is not None,
                }
                for p in self.phrases
            ],
            "regions": self.regions.tolist(),
            "region_scores": self.region_scores.tolist(),
            "warnings": list(self.warnings),
        }
