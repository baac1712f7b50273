"""The ``deformable-detr`` region proposer stage: fused image-feature levels -> scored candidate boxes."""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor, nn

from groma_core.boxes import cxcywh_to_xyxy, xyxy_to_cxcywh
from groma_core.reference import ALIASED_MODULES
from groma_core.stages import BuildContext, RegionProposer
from groma_core.types import ImageFeatures, Proposals
from groma_plugin_deformable_detr.options import DeformableDetrOptions
from groma_plugin_deformable_detr.transformer import DeformableDetrOutput, TwoStageDeformableTransformer

_INPUT_PROJ = "perceiver.input_proj."
_TRANSFORMER = "perceiver.ddetr_transformer."


class ChannelLayerNorm(nn.Module):
    """LayerNorm over the channel dimension of a (B, C, h, w) map."""

    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: Tensor) -> Tensor:
        mean = x.mean(1, keepdim=True)
        var = (x - mean).pow(2).mean(1, keepdim=True)
        x = (x - mean) / torch.sqrt(var + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


class InputProjection(nn.Module):
    """1x1 convolution from the image-feature width to d_model, then a channel LayerNorm (eps 1e-6)."""

    def __init__(self, in_channels: int, d_model: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, d_model, kernel_size=1)
        self.norm = ChannelLayerNorm(d_model)
        nn.init.xavier_uniform_(self.conv.weight)
        nn.init.zeros_(self.conv.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(self.conv(x))


class DeformableDetrProposer(RegionProposer):
    """Groma's region proposer: the mean of the configured feature levels, projected to d_model, through a
    class-agnostic two-stage Deformable DETR; ``num_queries`` boxes per image, scored by the fused objectness
    ``sigmoid(coco) ** a * sigmoid(sa1b) ** b``.

    Contract: ``forward(features)`` -> :class:`Proposals` with ``num_queries`` boxes per image, normalized xyxy
    (corners may lie past the image border unless ``clip_boxes``), scores in [0, 1], and ``extras`` with the
    training outputs (see :meth:`forward`).
    """

    reference_prefixes = (_INPUT_PROJ, _TRANSFORMER)

    def __init__(self, options: DeformableDetrOptions, in_channels: int):
        super().__init__()
        self.options = options
        self.in_channels = in_channels
        self.input_proj = InputProjection(in_channels, options.d_model)
        self.transformer = TwoStageDeformableTransformer(
            d_model=options.d_model,
            encoder_layers=options.encoder_layers,
            decoder_layers=options.decoder_layers,
            encoder_attention_heads=options.encoder_attention_heads,
            decoder_attention_heads=options.decoder_attention_heads,
            encoder_n_points=options.encoder_n_points,
            decoder_n_points=options.decoder_n_points,
            encoder_ffn_dim=options.encoder_ffn_dim,
            decoder_ffn_dim=options.decoder_ffn_dim,
            dropout=options.dropout,
            num_queries=options.num_queries,
            box_head_hidden=options.box_head_hidden,
        )
        if options.frozen:
            self.requires_grad_(False)

    def reference_key(self, key: str) -> str | None:
        """``perceiver.input_proj.0.{0,1}.*`` -> ``input_proj.{conv,norm}.*``; ``perceiver.ddetr_transformer.*`` ->
        ``transformer.*``, with the heads stored under ``decoder.`` in the reference moved to the top level."""
        if key.startswith(_INPUT_PROJ):
            level, index, rest = key[len(_INPUT_PROJ) :].split(".", 2)
            if level != "0" or index not in ("0", "1"):
                return None  # projections of further feature levels: the released model has a single level
            return f"input_proj.{'conv' if index == '0' else 'norm'}.{rest}"
        if key.startswith(_TRANSFORMER):
            rest = key[len(_TRANSFORMER) :]
            if rest.startswith("decoder.") and rest.split(".", 2)[1] in ALIASED_MODULES:
                rest = rest[len("decoder.") :]
            return f"transformer.{rest}"
        return None

    def fuse_levels(self, features: ImageFeatures) -> Tensor:
        """The mean (B, C, h, w) of the configured input levels."""
        maps = [features.level(name) for name in self.options.in_levels]
        for name, level_map in zip(self.options.in_levels, maps, strict=True):
            if level_map.ndim != 4 or level_map.shape[1] != self.in_channels:
                raise ValueError(
                    f"deformable-detr: level {name!r} must have shape (B, {self.in_channels}, h, w), "
                    f"got {tuple(level_map.shape)}"
                )
            if level_map.shape != maps[0].shape:
                raise ValueError(
                    f"deformable-detr: levels {self.options.in_levels[0]!r} {tuple(maps[0].shape)} and {name!r} "
                    f"{tuple(level_map.shape)} differ in shape; their mean needs equal shapes"
                )
        return torch.stack(maps, 0).mean(0)

    def project(self, features: ImageFeatures) -> Tensor:
        """The transformer's input map (B, d_model, h, w): the fused levels through the input projection."""
        return self.input_proj(self.fuse_levels(features))

    def detect(self, features: ImageFeatures) -> DeformableDetrOutput:
        """Every output of the Deformable DETR for a batch of images."""
        return self.transformer(self.project(features))

    def fused_scores(self, output: DeformableDetrOutput) -> Tensor:
        """(B, Q) ``sigmoid(coco) ** a * sigmoid(sa1b) ** b`` of the last decoder layer."""
        exponents = self.options.score_exponents
        coco = output.logits_coco[:, -1, :, 0].sigmoid()
        sa1b = output.logits_sa1b[:, -1, :, 0].sigmoid()
        return coco**exponents.coco * sa1b**exponents.sa1b

    def forward(self, features: ImageFeatures) -> Proposals:
        """Propose ``num_queries`` scored boxes per image.

        ``extras``: ``logits_coco``, ``logits_sa1b`` (B, L, Q, 1) per decoder layer; ``boxes_cxcywh`` (B, L, Q, 4)
        per decoder layer; ``encoder_logits`` (B, S, 1) and ``encoder_boxes_cxcywh`` (B, S, 4) of the S encoder
        proposals (what the detection losses need).
        """
        grad = torch.no_grad() if self.options.frozen else contextlib.nullcontext()
        with grad:
            output = self.detect(features)
            scores = self.fused_scores(output)
        boxes = cxcywh_to_xyxy(output.pred_boxes.float())
        if self.options.clip_boxes:
            boxes = boxes.clamp(0.0, 1.0)
        return Proposals(
            boxes=list(boxes.unbind(0)),
            scores=list(scores.float().unbind(0)),
            extras={
                "logits_coco": output.logits_coco,
                "logits_sa1b": output.logits_sa1b,
                "boxes_cxcywh": output.boxes,
                "encoder_logits": output.encoder_logits,
                "encoder_boxes_cxcywh": output.encoder_coord_logits.sigmoid(),
            },
        )

    def detection_loss(self, proposals: Proposals, targets: list[Tensor], source: str) -> dict[str, Tensor]:
        """Groma's stage-1 losses (:func:`~groma_plugin_deformable_detr.losses.detection_loss`) of this proposer's
        ``proposals`` against ``targets[i]`` (n_i, 4) normalized xyxy; ``source`` (coco or sa1b) picks the
        objectness head. Needs ``frozen: false`` (a frozen proposer runs without gradients)."""
        from groma_plugin_deformable_detr.losses import detection_loss

        if self.options.frozen:
            raise RuntimeError(
                "deformable-detr: the proposer is built with frozen: true (no gradients); set frozen: false to train it"
            )
        boxes = [{"boxes": xyxy_to_cxcywh(torch.as_tensor(t, dtype=torch.float32).reshape(-1, 4))} for t in targets]
        return detection_loss(proposals.extras, boxes, source)


def build_proposer(options: DeformableDetrOptions, context: BuildContext) -> DeformableDetrProposer:
    """Factory of the ``deformable-detr`` proposer: the input width comes from the image tokenizer's levels."""
    available = sorted(context.level_channels)
    missing = [name for name in options.in_levels if name not in context.level_channels]
    if missing:
        raise ValueError(
            f"deformable-detr: in_levels {missing} are not published by the image tokenizer; "
            f"available levels: {available or '(none)'}"
        )
    channels = {name: context.level_channels[name] for name in options.in_levels}
    if len(set(channels.values())) != 1:
        raise ValueError(f"deformable-detr: in_levels must share one channel count to be averaged, got {channels}")
    sizes = {name: context.level_sizes[name] for name in options.in_levels if name in context.level_sizes}
    if len(set(sizes.values())) > 1:
        raise ValueError(f"deformable-detr: in_levels must share one spatial size to be averaged, got {sizes}")
    return DeformableDetrProposer(options, in_channels=next(iter(channels.values())))
