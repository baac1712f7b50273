"""Groma's multi-level RoI extractor: RoIAlign on every fused level, a 3x3 conv per level, sum, ReLU, a linear
layer over the flattened bins, plus an MLP embedding of the box, then the projection to the language model width."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from groma_plugin_roialign.ops import Backend, roi_align

CROP_FEATURES = 256
"""Width of :func:`crop_convs`'s output (the ``small`` CNN)."""
WIDE_CROP_FEATURES = 512
"""Width of :func:`crop_convs`'s output for the ``wide`` CNN."""
# box_code_scale: the seed of the box code's random frequencies, and their spread (cycles per image width): about 2
# tells the thirds of an image apart and still varies smoothly inside one
BOX_CODE_SEED = 1729
BOX_CODE_SIGMA = 2.0


def crop_convs(kind: str = "small") -> list[nn.Module]:
    """The CNN of ``image_crop`` (before its linear map to the region width or its classes), for any crop size.
    ``small``: two 3x3 conv + ReLU, max pool, a third conv + ReLU, average pooled to 2 x 2 and flattened -> (K,
    :data:`CROP_FEATURES`); ``wide``: after the third conv a fourth (64 channels), a second max pool and a fifth conv
    to 128 channels, average pooled to 2 x 2 -> (K, :data:`WIDE_CROP_FEATURES`)."""
    if kind not in ("small", "wide"):
        raise ValueError(f"mlvl-roialign: crop_cnn must be 'small' or 'wide', got {kind!r}")
    layers = [
        nn.Conv2d(3, 32, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1),
        nn.ReLU(),
    ]
    if kind == "wide":
        layers += [nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
        layers += [nn.Conv2d(64, 128, 3, padding=1), nn.ReLU()]
    return [*layers, nn.AdaptiveAvgPool2d(2), nn.Flatten()]


def crop_features(kind: str) -> int:
    """Width of :func:`crop_convs`'s output for ``kind``."""
    return WIDE_CROP_FEATURES if kind == "wide" else CROP_FEATURES


def crop_classifier(kind: str, classes: int) -> nn.Sequential:
    """The crop classifier of ``crop_classes``: :func:`crop_convs` of ``kind``, then a 128-wide ReLU layer and the
    class logits."""
    return nn.Sequential(*crop_convs(kind), nn.Linear(crop_features(kind), 128), nn.ReLU(), nn.Linear(128, classes))


def _add_code(tokens: Tensor, code: Tensor, scale: float) -> Tensor:
    """``tokens`` plus a unit ``code`` per token, its norm ``scale`` times the token's (not differentiated through),
    so that the code keeps its share of the token whatever size training gives the rest."""
    return tokens + code * (scale * tokens.detach().norm(dim=-1, keepdim=True))


class MlvlRoIExtractor(nn.Module):
    """Pools one vector per region from L fused maps (module names follow the reference ``roi_align``)."""

    def __init__(
        self,
        channels: int,
        num_levels: int,
        region_dim: int,
        hidden_size: int,
        output_size: int = 14,
        sampling_ratio: int = 2,
        pos_embed_dim: int = 256,
        backend: Backend = "torch",
        head_convs: int = 0,
        log_box_size: bool = False,
        image_crop: int = 0,
        crop_classes: int = 0,
        crop_code_scale: float = 1.0,
        box_code_scale: float = 0.0,
        crop_cnn: str = "small",
    ):
        super().__init__()
        self.output_size = output_size
        self.log_box_size = log_box_size
        self.sampling_ratio = sampling_ratio
        self.backend = backend
        self.pconvs = nn.ModuleList(nn.Conv2d(channels, channels, 3, padding=1) for _ in range(num_levels))
        # not in the reference (0 there): more 3x3 conv + ReLU layers on the pooled bins, so that the shape of a
        # small object inside its box is read non-linearly before the flattening linear layer
        self.head_convs = nn.ModuleList(nn.Conv2d(channels, channels, 3, padding=1) for _ in range(head_convs))
        self.pos_embed = nn.Sequential(
            nn.Linear(4, pos_embed_dim),
            nn.ReLU(),
            nn.LayerNorm(pos_embed_dim),
            nn.Linear(pos_embed_dim, region_dim),
            nn.ReLU(),
            nn.LayerNorm(region_dim),
        )
        self.flatten_linear = nn.Linear(channels * output_size * output_size, region_dim)
        self.updims = nn.Linear(region_dim, hidden_size)
        # not in the reference (image_crop 0): a small CNN over an N x N crop of the region from the original image,
        # either added to the region's vector or (crop_classes > 0) naming the region's class, whose probabilities
        # add a code to the token
        self.crop_stem = None
        self.crop_classifier = None
        self.crop_code = None
        if image_crop and crop_classes:
            self.crop_classifier = crop_classifier(crop_cnn, crop_classes)
            self.crop_code = nn.Linear(crop_classes, hidden_size, bias=False)
            self.crop_code_scale = crop_code_scale
            with torch.no_grad():  # one random unit direction per class (a column of the weight)
                self.crop_code.weight.copy_(F.normalize(torch.randn(hidden_size, crop_classes), dim=0))
        elif image_crop:
            self.crop_stem = nn.Sequential(*crop_convs(crop_cnn), nn.Linear(crop_features(crop_cnn), region_dim))
        # not in the reference (0 there): where the region is, as a code of fixed random Fourier features of its box
        # at a share of the token's norm; the frequencies come from their own generator (no parameters, and the
        # weights above start as they would without it) and are rebuilt with the module, not stored
        self.box_code_scale = box_code_scale
        if box_code_scale:
            generator = torch.Generator().manual_seed(BOX_CODE_SEED)
            frequencies = BOX_CODE_SIGMA * torch.randn(4, (hidden_size + 1) // 2, generator=generator)
            self.register_buffer("box_frequencies", frequencies, persistent=False)

    def pool(self, feats: list[Tensor], rois: Tensor, scales: list[tuple[float, float]]) -> list[Tensor]:
        """RoIAlign (float32, aligned) of ``rois`` (K, 5) on each level -> L tensors (K, C, S, S)."""
        return [
            roi_align(
                feat.float(),
                rois.float(),
                self.output_size,
                spatial_scale=scale,
                sampling_ratio=self.sampling_ratio,
                aligned=True,
                backend=self.backend,
            )
            for feat, scale in zip(feats, scales)
        ]

    def appearance(self, pooled: list[Tensor]) -> Tensor:
        """``flatten_linear(flatten(ReLU(sum_l pconvs[l](pooled[l]))))`` -> (K, region_dim), with each of
        ``head_convs`` (conv, ReLU) applied before the flattening."""
        dtype = self.flatten_linear.weight.dtype
        total = F.relu(sum(conv(p.to(dtype)) for conv, p in zip(self.pconvs, pooled)))
        for conv in self.head_convs:
            total = F.relu(conv(total))
        return self.flatten_linear(total.flatten(1))

    def forward(
        self,
        feats: list[Tensor],
        rois: Tensor,
        boxes_cxcywh: Tensor,
        scales: list[tuple[float, float]],
        crops: Tensor | None = None,
        crop_code: bool = True,
        box_code: bool = True,
    ) -> Tensor:
        """Region tokens (K, hidden_size) for ``rois`` (K, 5) and their normalized cxcywh boxes (K, 4); with
        ``crop_stem``, ``crops`` (K, 3, N, N) of the original images add their vector; with ``crop_classifier``,
        the code of the class probabilities it gives each crop, its norm ``crop_code_scale`` times the token's own
        (the classifier learns from its own loss alone, :meth:`crop_logits`, never from the token's);
        ``crop_code=False`` leaves the code out. With ``box_code_scale``, the box's code too (:meth:`box_code`;
        ``box_code=False`` leaves it out)."""
        plain_boxes = boxes_cxcywh
        if self.log_box_size:  # (cx, cy, log w, log h): the aspect ratio is a difference, readable by one linear map
            size = boxes_cxcywh[:, 2:].float().clamp(min=1e-4).log()
            boxes_cxcywh = torch.cat([boxes_cxcywh[:, :2].float(), size], dim=1)
        position = self.pos_embed(boxes_cxcywh.to(self.flatten_linear.weight.dtype))
        vector = self.appearance(self.pool(feats, rois, scales)) + position
        if crops is None and self.reads_crops(crop_code):
            raise ValueError("mlvl-roialign: this extractor reads image crops (image_crop) but was given no crops")
        if self.crop_stem is not None:
            vector = vector + self.crop_stem(crops.to(self.flatten_linear.weight.dtype))
        tokens = self.updims(vector)
        if self.crop_classifier is not None and crop_code:
            with torch.no_grad():
                probs = self.crop_logits(crops).float().softmax(-1)
            code = F.normalize(self.crop_code(probs.to(tokens.dtype)), dim=-1)
            tokens = _add_code(tokens, code, self.crop_code_scale)
        if self.box_code_scale and box_code:
            tokens = _add_code(tokens, self.box_code(plain_boxes).to(tokens.dtype), self.box_code_scale)
        return tokens

    def box_code(self, boxes_cxcywh: Tensor) -> Tensor:
        """``box_code_scale``: the unit code (K, hidden_size) of normalized (cx, cy, w, h) boxes: sines and cosines
        of fixed random projections of the box (Fourier features), so that a linear map reads where a region is and
        how large it is, at a size no training can shrink."""
        angles = 2 * math.pi * boxes_cxcywh.float() @ self.box_frequencies.float()
        code = torch.cat([angles.sin(), angles.cos()], dim=-1)[:, : self.updims.out_features]
        return F.normalize(code, dim=-1)

    def reads_crops(self, crop_code: bool = True) -> bool:
        """Whether :meth:`forward` reads image crops: for the crop stem, or for the crop classifier's code."""
        return self.crop_stem is not None or (self.crop_classifier is not None and crop_code)

    def crop_logits(self, crops: Tensor) -> Tensor:
        """The class logits (K, crop_classes) of ``crops`` (K, 3, N, N) (``crop_classes``)."""
        if self.crop_classifier is None:
            raise ValueError("mlvl-roialign: crop_logits needs image_crop > 0 and crop_classes > 0")
        return self.crop_classifier(crops.to(self.crop_code.weight.dtype))
