"""Training objectives: the language-model loss of the whole pipeline, and the region proposer's detection loss."""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from groma_core.errors import InputError
from groma_core.model import GromaModel
from groma_core.types import Proposals


@runtime_checkable
class DetectionLoss(Protocol):
    """What a region proposer implements to be trained by a ``detection`` stage (stage 1 of the reference).

    ``detection_loss(proposals, targets, source)``: ``proposals`` is the proposer's own output for the batch (its
    ``extras`` carry whatever the loss needs, such as raw logits of every decoder layer); ``targets[i]`` (n_i, 4)
    are the ground-truth boxes of image i, normalized xyxy, class-agnostic; ``source`` tags the dataset the batch
    comes from (the reference trains its ``coco`` and ``sa1b`` objectness heads on their own data). Returns named
    loss terms: the training loss is the term ``loss`` when there is one (the others are then only logged), else
    the sum of the terms. Return the same names on every call (a zero where there is nothing to measure):
    processes average the terms for the logs name by name.
    """

    def detection_loss(self, proposals: Proposals, targets: list[Tensor], source: str) -> dict[str, Tensor]: ...


class Objective(nn.Module):
    """The loss of one micro-batch as a module (so that DDP/FSDP see one forward): ``forward(batch)`` ->
    (loss, {term: detached value})."""

    def __init__(self, model: GromaModel, kind: str, generator: torch.Generator | None = None):
        super().__init__()
        self.model = model
        self.kind = kind
        self.generator = generator

    def forward(self, batch: dict[str, Any]) -> tuple[Tensor, dict[str, Tensor]]:
        needed = ("boxes",) if self.kind == "detection" else ("input_ids", "labels")
        missing = [k for k in needed if batch.get(k) is None]
        if missing:
            raise InputError(
                f"dataset {batch.get('dataset')!r}: a {self.kind} stage needs samples with {', '.join(needed)}; "
                f"missing: {', '.join(missing)}"
            )
        if self.kind == "detection":
            return self._detection(batch)
        out = self.model(
            batch["pixel_values"],
            batch["input_ids"],
            refer_boxes=batch.get("refer_boxes"),
            ground_boxes=batch.get("ground_boxes"),
            labels=batch["labels"],
            generator=self.generator,
        )
        return out.loss, {}

    def _detection(self, batch: dict[str, Any]) -> tuple[Tensor, dict[str, Tensor]]:
        features = self.model.image_tokenizer(batch["pixel_values"])
        proposer = self.model.region_proposer
        proposals = proposer(features)
        terms = dict(proposer.detection_loss(proposals, batch["boxes"], batch["source"]))
        if not terms:
            raise ValueError(f"{type(proposer).__name__}.detection_loss returned no loss terms")
        total = terms.pop("loss", None)
        if total is None:
            total = torch.stack([v.float() for v in terms.values()]).sum()
        return total.float(), {k: v.detach().float() for k, v in terms.items()}
