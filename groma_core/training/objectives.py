"""Training objectives: the language-model loss of the whole pipeline, the region proposer's detection loss, and the
attribute loss of the region encoder's tokens (beside detection, or alone)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from groma_core.boxes import cxcywh_to_xyxy, from_input_frame, xyxy_to_cxcywh
from groma_core.errors import InputError
from groma_core.model import IGNORE_INDEX, GromaModel
from groma_core.types import ImageFeatures

ATTRIBUTE_SEED = 20240421
"""Seed of the attribute loss's fixed readout projections."""
ATTRIBUTE_SCALE = 16.0
"""Inverse temperature of the attribute loss's cosine logits."""


class Objective(nn.Module):
    """The loss of one micro-batch as a module (so that DDP/FSDP see one forward): ``forward(batch)`` ->
    (loss, {term: detached value})."""

    def __init__(
        self,
        model: GromaModel,
        kind: str,
        generator: torch.Generator | None = None,
        attribute_loss: float = 0.0,
        attribute_classes: int = 128,
        box_jitter: float = 0.0,
    ):
        super().__init__()
        self.model = model
        self.kind = kind
        self.generator = generator
        self.attribute_loss = attribute_loss
        self.attribute_classes = attribute_classes
        self.box_jitter = box_jitter
        self._readout: tuple[Tensor, Tensor] | None = None

    def forward(self, batch: dict[str, Any]) -> tuple[Tensor, dict[str, Tensor]]:
        needed = ("boxes",) if self.kind in ("detection", "attributes", "crops") else ("input_ids", "labels")
        if self.kind != "text":
            needed = ("pixel_values", *needed)
        missing = [k for k in needed if batch.get(k) is None]
        if missing:
            raise InputError(
                f"dataset {batch.get('dataset')!r}: a {self.kind} stage needs samples with {', '.join(needed)}; "
                f"missing: {', '.join(missing)}"
            )
        if self.kind == "detection":
            return self._detection(batch)
        if self.kind == "text":
            return self._text(batch)
        if self.kind == "crops":
            return self._crops(batch)
        if self.kind == "attributes":
            features = self.model.encode_images(batch["pixel_values"], batch.get("images"))
            terms = self._attributes(features, batch)
            return self._weighted(terms).float(), {k: v.detach().float() for k, v in terms.items()}
        out = self.model(
            batch["pixel_values"],
            batch["input_ids"],
            refer_boxes=batch.get("refer_boxes"),
            ground_boxes=batch.get("ground_boxes"),
            labels=batch["labels"],
            generator=self.generator,
            images=batch.get("images"),
        )
        return out.loss, {}

    def _text(self, batch: dict[str, Any]) -> tuple[Tensor, dict[str, Tensor]]:
        """The language backbone's next-token loss on token ids alone (right-padded; positions 0..L-1); the
        share of supervised tokens predicted right is logged as ``accuracy``."""
        backbone = self.model.language_backbone
        pad = self.model.tokenizer.pad_id
        rows, label_rows = batch["input_ids"], batch["labels"]
        length = max(len(r) for r in rows)
        device = self.model.device
        ids = torch.full((len(rows), length), pad, dtype=torch.long, device=device)
        labels = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long, device=device)
        mask = torch.zeros((len(rows), length), dtype=torch.long, device=device)
        for i, (r, lab) in enumerate(zip(rows, label_rows)):
            if len(lab) != len(r):
                raise InputError(f"dataset {batch.get('dataset')!r}: sample {i} has {len(lab)} labels for {len(r)} ids")
            ids[i, : len(r)] = torch.tensor(r, device=device)
            labels[i, : len(r)] = torch.tensor(lab, device=device)
            mask[i, : len(r)] = 1
        positions = torch.arange(length, device=device).expand(len(rows), length)
        logits = backbone(backbone.embed(ids), mask, positions).logits[:, :-1].float()
        target = labels[:, 1:]
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=IGNORE_INDEX)
        supervised = target != IGNORE_INDEX
        accuracy = (logits.detach().argmax(-1)[supervised] == target[supervised]).float().mean()
        return loss, {"accuracy": accuracy}

    def _detection(self, batch: dict[str, Any]) -> tuple[Tensor, dict[str, Tensor]]:
        features = self.model.encode_images(batch["pixel_values"], batch.get("images"))
        proposer = self.model.region_proposer
        proposals = proposer(features)
        targets = batch["boxes"]
        if getattr(proposer, "needs_images", False) and features.images is not None:
            # a proposer on the original images predicts boxes of those images, not of a letterboxed input
            frames = self.model.input_frames(features.images)
            targets = [from_input_frame(t, frame) for t, frame in zip(targets, frames)]
        terms = dict(proposer.detection_loss(proposals, targets, batch["source"]))
        if not terms:
            raise ValueError(f"{type(proposer).__name__}.detection_loss returned no loss terms")
        total = terms.pop("loss", None)
        if total is None:
            total = torch.stack([v.float() for v in terms.values()]).sum()
        if self.attribute_loss:
            attributes = self._attributes(features, batch)
            terms.update(attributes)
            total = total.float() + self._weighted(attributes)
        return total.float(), {k: v.detach().float() for k, v in terms.items()}

    def _crops(self, batch: dict[str, Any]) -> tuple[Tensor, dict[str, Tensor]]:
        """A region encoder's crop classifier names each true box from its crop of the original image (the image
        tokenizer and the proposer are not run): its category or, with the encoder's ``crop_labels == "head"``, the
        last word of its category's name (an index into the dataset's ``head_vocabulary``), by cross-entropy;
        ``accuracy`` is logged."""
        encoder = self.model.region_encoder
        head = getattr(encoder, "crop_labels", "category") == "head"
        labels, images = batch.get("box_heads" if head else "box_labels"), batch.get("images")
        if labels is None or images is None:
            what = "a named category (the file's categories)" if head else "a category_id"
            raise InputError(
                f"dataset {batch.get('dataset')!r}: a crops stage needs the original images and {what} for every "
                "box of the detection file"
            )
        boxes = self._jittered(batch["boxes"])
        if sum(int(b.shape[0]) for b in boxes) == 0:
            zero = batch["pixel_values"].new_zeros((), requires_grad=True)
            return zero, {"accuracy": zero.detach()}
        features = ImageFeatures(
            tokens=batch["pixel_values"], levels={}, images=images, frames=self.model.input_frames(images)
        )
        logits = encoder.crop_logits(features, boxes).float()
        target = torch.cat(labels).to(logits.device)
        if int(target.max()) >= logits.shape[-1]:
            what = "head word" if head else "category_id"
            raise InputError(
                f"dataset {batch.get('dataset')!r}: {what} {int(target.max())} is not below the crop classifier's "
                f"{logits.shape[-1]} classes; raise mlvl-roialign's crop_classes"
            )
        if int(target.min()) < 0:
            raise InputError(f"dataset {batch.get('dataset')!r}: a box's category has no name in the file's categories")
        loss = F.cross_entropy(logits, target)
        return loss, {"accuracy": (logits.detach().argmax(-1) == target).float().mean()}

    def _jittered(self, boxes: list[Tensor]) -> list[Tensor]:
        """The true boxes (normalised xyxy) as a proposer might give them (``box_jitter`` s > 0): each centre moved
        by N(0, s) of the box's width and height, each side scaled by exp(N(0, s)), drawn from the objective's
        generator; unchanged with s = 0."""
        if not self.box_jitter:
            return list(boxes)
        out = []
        for b in boxes:
            noise = torch.randn((b.shape[0], 4), generator=self.generator).to(b.device, torch.float32) * self.box_jitter
            centre, side = xyxy_to_cxcywh(b.float()).split(2, dim=1)
            moved = torch.cat([centre + noise[:, :2] * side, side * noise[:, 2:].exp()], dim=1)
            out.append(cxcywh_to_xyxy(moved).to(b.dtype))
        return out

    def _weighted(self, attributes: dict[str, Tensor]) -> Tensor:
        """The attribute terms as they enter the loss: ``attribute_loss`` x (category CE + box MSE)."""
        return self.attribute_loss * (attributes["attribute_ce"] + attributes["attribute_box"])

    def readout(self, width: int, device: torch.device) -> tuple[Tensor, Tensor]:
        """The fixed projections of :meth:`_attributes`: unit class directions (width, classes) and a box readout
        (width, 4), drawn from a fixed seed so that every process and every resumed run uses the same."""
        if self._readout is None or self._readout[0].shape[0] != width:
            g = torch.Generator().manual_seed(ATTRIBUTE_SEED)
            classes = F.normalize(torch.randn(width, self.attribute_classes, generator=g), dim=0)
            box = torch.randn(width, 4, generator=g)
            self._readout = (classes, box)
        return tuple(t.to(device) for t in self._readout)  # type: ignore[return-value]

    def _attributes(self, features, batch: dict[str, Any]) -> dict[str, Tensor]:
        """The attribute loss of a detection stage: the region encoder's token of each ground-truth box (without a
        crop classifier's code or a box code), made unit length, names the box's category (cosine logits x
        :data:`ATTRIBUTE_SCALE` over fixed random class directions, cross-entropy) and gives back its (cx, cy, w, h)
        through a fixed random linear readout (mean squared error); so the tokens the language model will read carry
        what and where each object is."""
        labels = batch.get("box_labels")
        if labels is None:
            raise InputError(
                f"dataset {batch.get('dataset')!r}: attribute_loss needs a category_id on every box of the detection "
                "file"
            )
        boxes = self._jittered(batch["boxes"])
        if sum(int(b.shape[0]) for b in boxes) == 0:
            zero = batch["pixel_values"].new_zeros(())
            return {"attribute_ce": zero, "attribute_box": zero}
        target = torch.cat(labels).to(self.model.device)
        if int(target.max()) >= self.attribute_classes:
            raise InputError(
                f"dataset {batch.get('dataset')!r}: category_id {int(target.max())} is not below attribute_classes "
                f"({self.attribute_classes}); raise the stage's attribute_classes"
            )
        encoder = self.model.region_encoder
        # a crop classifier's code is left out: it is the classifier's answer (trained by a crops stage), and at the
        # token's size it takes half the unit vector this loss reads (benchmarks/README.md, session 16)
        own = {"crop_code": False} if getattr(encoder, "crop_classes", 0) else {}
        if getattr(encoder, "box_code_scale", 0):  # a box code likewise: a fixed map, nothing for this loss to train
            own["box_code"] = False
        tokens = torch.cat(encoder(features, list(boxes), **own)).float()
        classes, readout = self.readout(tokens.shape[-1], tokens.device)
        unit = F.normalize(tokens, dim=-1)
        ce = F.cross_entropy(ATTRIBUTE_SCALE * unit @ classes, target)
        where = xyxy_to_cxcywh(torch.cat(list(boxes)).float())
        return {"attribute_ce": ce, "attribute_box": F.mse_loss(unit @ readout, where)}
