"""The ``mlvl-roialign`` region encoder: Groma's multi-level fuse + RoIAlign, one token per region."""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field, model_validator
from torch import Tensor

from groma_core.boxes import IDENTITY_FRAME, from_input_frame, xyxy_to_cxcywh
from groma_core.config import StageOptions
from groma_core.errors import InputError
from groma_core.stages import BuildContext, RegionEncoder, module_dtype
from groma_core.types import ImageFeatures
from groma_plugin_roialign.extractor import MlvlRoIExtractor
from groma_plugin_roialign.fuse import MLVLFuseModule, resize_bilinear
from groma_plugin_roialign.ops import Backend, roi_align

#: the region width that the reference hard-codes (the released checkpoint's ``flatten_linear`` output)
REFERENCE_REGION_DIM = 1024

#: reference sub-module prefixes (after ``region_encoder.``) -> this stage's own
_RENAMES = (("roi_align.pos_embedd.", "extractor.pos_embed."), ("roi_align.", "extractor."))


class RoIAlignEncoderOptions(StageOptions):
    """Options of the ``mlvl-roialign`` region encoder."""

    levels: list[str] = Field(
        default=["last-2", "last-1", "last"], description="image-feature levels to fuse, finest pyramid level first"
    )
    level_scales: list[float] = Field(
        default=[4.0, 2.0, 1.0], description="resize factor of each level before fusing (bilinear, align_corners)"
    )
    num_fuse: int = Field(default=5, ge=0, description="rounds of cross-level channel shuffle + conv")
    gn_groups: int = Field(default=64, ge=1, description="GroupNorm groups of the fuse convs")
    region_dim: int = Field(default=REFERENCE_REGION_DIM, ge=1, description="width of the pooled region vector")
    pos_embed_dim: int = Field(default=256, ge=1, description="hidden width of the box position MLP")
    roi_output_size: int = Field(default=14, ge=1, description="RoIAlign output bins per side")
    head_convs: int = Field(
        default=0,
        ge=0,
        description="not in the reference (0): extra 3x3 conv + ReLU layers on the pooled bins before the "
        "flattening linear layer, to read the shape of small objects",
    )
    log_box_size: bool = Field(
        default=False,
        description="not in the reference (false): the box position MLP reads (cx, cy, log w, log h) instead of "
        "(cx, cy, w, h), so that a box's aspect ratio (square or rectangle, circle or ellipse) is a linear feature",
    )
    image_crop: int = Field(
        default=0,
        ge=0,
        description="not in the reference (0): N > 0 also pools an N x N crop of each region from the original "
        "image (full resolution, not the encoder's input) through a small CNN added to the region's vector, so that "
        "the shape of a small object is seen; the crop is the square around the box's centre with the box's longer "
        "side, so its aspect is kept (a rectangle stays a rectangle, an ellipse is no circle); the stage then reads "
        "the original images",
    )
    crop_cnn: Literal["small", "wide"] = Field(
        default="small",
        description="image_crop: the crop's CNN: small (3 convs, 32-64 channels) or wide (5 convs, 32-128 channels, "
        "~0.2 M parameters), which names a shape from a box a little off as well as from its true box far more "
        "often when trained on moved boxes (a crops stage's box_jitter; benchmarks/README.md, session 24)",
    )
    crop_classes: int = Field(
        default=0,
        ge=0,
        description="not in the reference (0): with image_crop, C > 0 makes the crop's CNN a classifier of C classes "
        "(the detection file's category ids, trained by a `crops` stage on the true boxes) instead of a vector "
        "added to the region's; the token gains a code of the class probabilities (a C x hidden map of random "
        "unit columns, its norm set by crop_code_scale; a detection stage's attribute loss reads the token without "
        "it), so that what the region is becomes a clean, separable direction the "
        "language model reads",
    )
    crop_labels: Literal["category", "head"] = Field(
        default="category",
        description="crop_classes: what the crop classifier names: the box's category id, or the head word of its "
        "category's name (the last word: `red_circle` -> `circle`; the detection file's head words, sorted), so "
        "that the crop learns what the object is and leaves the modifiers (a colour the region features already "
        "read) out; naming the colour too slows the shape's learning (benchmarks/README.md, session 15)",
    )
    crop_code_scale: float = Field(
        default=1.0,
        gt=0.0,
        description="crop_classes: the code's norm as a multiple of the region's own token's norm (which training "
        "sets), so that the code keeps its share of the token whatever the size the rest grows to",
    )
    box_code_scale: float = Field(
        default=0.0,
        ge=0.0,
        description="not in the reference (0): > 0 adds to each token a code of where the region is (fixed random "
        "Fourier features of its normalized (cx, cy, w, h), unit length, no parameters), its norm this multiple of "
        "the token's own; the box's learned embedding alone stays a few percent of the token, too small for the "
        "language model to name the place (benchmarks/README.md, session 17); a detection stage's attribute loss "
        "reads the token without it",
    )
    sampling_ratio: int = Field(default=2, description="RoIAlign samples per bin and axis; <= 0 adapts to the box")
    corner_format_quirk: bool = Field(
        default=True,
        description="reference quirk 1: hand the (cx, cy, w, h) box to RoIAlign as (x1, y1, x2, y2); "
        "false pools the true box",
    )
    stride_quirk: bool = Field(
        default=True,
        description="reference quirk 2: RoIAlign spatial scales twice the geometric map/image ratio; "
        "false uses the geometric scale",
    )
    roi_align_backend: Backend = Field(
        default="torch", description="'torch' (pure PyTorch) or 'torchvision' (its kernel, when installed)"
    )
    in_channels: int | None = Field(
        default=None, ge=1, description="channels of the input levels; None reads them from the image tokenizer"
    )

    @model_validator(mode="after")
    def _scales_match_levels(self) -> RoIAlignEncoderOptions:
        if not self.levels:
            raise ValueError("levels must name at least one image-feature level")
        if len(self.level_scales) != len(self.levels):
            raise ValueError(
                f"level_scales has {len(self.level_scales)} entries but levels has {len(self.levels)}: "
                "give one scale per level"
            )
        if any(s <= 0 for s in self.level_scales):
            raise ValueError(f"level_scales must be positive, got {self.level_scales}")
        if self.crop_classes and not self.image_crop:
            raise ValueError("crop_classes names the class of each region's image crop: set image_crop > 0 too")
        return self

    @classmethod
    def from_reference_config(
        cls, groma_config: dict[str, Any], region_dim: int = REFERENCE_REGION_DIM
    ) -> RoIAlignEncoderOptions:
        """Options reproducing the reference region encoder of a ``GromaConfig.to_dict()``.

        The reference hard-codes every region-encoder size, so the config only confirms the model type;
        ``region_dim`` is the width of ``flatten_linear`` (1024 in the released model; the golden fixtures
        store theirs in ``meta.json["config"]["region_dim_patch"]["region_dim"]``).
        """
        model_type = groma_config.get("model_type")
        if model_type not in (None, "groma"):
            raise ValueError(f"from_reference_config: expected a Groma config (model_type 'groma'), got {model_type!r}")
        return cls(region_dim=region_dim)


class MlvlRoIAlignEncoder(RegionEncoder):
    """Groma's region encoder: resize the chosen levels into a pyramid, fuse it, RoIAlign each region on every
    level, and project to the language model width.

    ``forward(features, regions)``: ``regions`` is a list of B tensors (N_i, 4) of normalized xyxy boxes ->
    list of B tensors (N_i, hidden_size).
    """

    reference_prefixes = ("region_encoder.",)

    def __init__(self, options: RoIAlignEncoderOptions, channels: int, hidden_size: int, image_size: tuple[int, int]):
        super().__init__()
        if channels % options.gn_groups:
            raise ValueError(
                f"mlvl-roialign: gn_groups={options.gn_groups} must divide the level channels ({channels})"
            )
        self.options = options
        self.channels = channels
        self.hidden_size = hidden_size
        self.image_size = image_size
        self.mlvl_fuse = MLVLFuseModule(channels, len(options.levels), options.num_fuse, options.gn_groups)
        self.extractor = MlvlRoIExtractor(
            channels,
            len(options.levels),
            options.region_dim,
            hidden_size,
            output_size=options.roi_output_size,
            sampling_ratio=options.sampling_ratio,
            pos_embed_dim=options.pos_embed_dim,
            backend=options.roi_align_backend,
            head_convs=options.head_convs,
            log_box_size=options.log_box_size,
            image_crop=options.image_crop,
            crop_classes=options.crop_classes,
            crop_code_scale=options.crop_code_scale,
            crop_cnn=options.crop_cnn,
            box_code_scale=options.box_code_scale,
        )
        self.needs_images = options.image_crop > 0

    @property
    def crop_classes(self) -> int:
        """Classes of the crop classifier (option ``crop_classes``; 0: none), which a ``crops`` stage trains."""
        return self.options.crop_classes

    @property
    def box_code_scale(self) -> float:
        """The box code's share of the token's norm (option ``box_code_scale``; 0: no box code)."""
        return self.options.box_code_scale

    @property
    def crop_labels(self) -> str:
        """What the crop classifier names (option ``crop_labels``), read by a ``crops`` stage and its data."""
        return self.options.crop_labels

    def reference_key(self, key: str) -> str | None:
        own = super().reference_key(key)
        if own is None:
            return None
        for old, new in _RENAMES:
            if own.startswith(old):
                return new + own[len(old) :]
        return own

    # -- the steps of forward, public for stage-by-stage checks ---------------------------------------------
    def pyramid(self, features: ImageFeatures) -> list[Tensor]:
        """The fused maps, one per configured level, after resizing by ``level_scales``."""
        dtype = module_dtype(self)
        maps = []
        for name, scale in zip(self.options.levels, self.options.level_scales):
            if name not in features.levels:
                raise KeyError(
                    f"mlvl-roialign: option levels names {name!r} but the image features have {sorted(features.levels)}"
                )
            level = features.levels[name]
            if level.ndim != 4 or level.shape[1] != self.channels:
                raise ValueError(
                    f"mlvl-roialign: level {name!r} must have shape (B, {self.channels}, h, w), "
                    f"got {tuple(level.shape)}"
                )
            size = (round(level.shape[-2] * scale), round(level.shape[-1] * scale))
            maps.append(resize_bilinear(level, size).to(dtype))
        return self.mlvl_fuse(maps)

    def rois(self, regions: list[Tensor], device: torch.device) -> tuple[Tensor, Tensor]:
        """RoIAlign boxes (K, 5) = [image index, 4 coordinates in input pixels] and the cxcywh boxes (K, 4)."""
        height, width = self.image_size
        to_pixels = torch.tensor([width, height, width, height], dtype=torch.float32, device=device)
        rows, centres = [], []
        for index, boxes in enumerate(regions):
            boxes = boxes.to(device=device, dtype=torch.float32)
            cxcywh = xyxy_to_cxcywh(boxes)
            pooled_box = cxcywh if self.options.corner_format_quirk else boxes
            image = torch.full((boxes.shape[0], 1), float(index), device=device)
            rows.append(torch.cat([image, pooled_box * to_pixels], dim=1))
            centres.append(cxcywh)
        return torch.cat(rows), torch.cat(centres)

    def spatial_scales(self, fused: list[Tensor]) -> list[tuple[float, float]]:
        """(scale_h, scale_w) of each fused map relative to the input pixels (doubled with ``stride_quirk``)."""
        factor = 2 if self.options.stride_quirk else 1
        height, width = self.image_size
        return [(factor * f.shape[-2] / height, factor * f.shape[-1] / width) for f in fused]

    def _check_regions(self, features: ImageFeatures, regions: list[Tensor]) -> list[int]:
        if len(regions) != features.batch_size:
            raise ValueError(
                f"mlvl-roialign: regions has {len(regions)} entries for a batch of {features.batch_size} images"
            )
        for i, boxes in enumerate(regions):
            if not isinstance(boxes, Tensor) or boxes.ndim != 2 or boxes.shape[-1] != 4:
                shape = tuple(boxes.shape) if isinstance(boxes, Tensor) else type(boxes).__name__
                raise ValueError(f"mlvl-roialign: regions[{i}] must have shape (N, 4) (normalized xyxy), got {shape}")
        return [boxes.shape[0] for boxes in regions]

    def forward(
        self, features: ImageFeatures, regions: list[Tensor], crop_code: bool = True, box_code: bool = True
    ) -> list[Tensor]:
        """One token per region; ``crop_code=False`` leaves the crop classifier's code out (``crop_classes``) and
        ``box_code=False`` the box's (``box_code_scale``): the region's own token, which a detection stage's
        attribute loss trains."""
        counts = self._check_regions(features, regions)
        if sum(counts) == 0:
            weight = self.extractor.updims.weight
            return [weight.new_zeros(0, self.hidden_size) for _ in counts]
        fused = self.pyramid(features)
        rois, cxcywh = self.rois(regions, fused[0].device)
        crops = self.crops(features, regions, fused[0].device) if self.extractor.reads_crops(crop_code) else None
        tokens = self.extractor(
            fused, rois, cxcywh, self.spatial_scales(fused), crops, crop_code=crop_code, box_code=box_code
        )
        return list(tokens.split(counts))

    def crop_logits(self, features: ImageFeatures, regions: list[Tensor]) -> Tensor:
        """``crop_classes``: the class logits (K, crop_classes) of each region's crop, for a ``crops`` stage to train
        the crop classifier on the true boxes (only ``features.images`` and ``features.frames`` are read)."""
        if self.extractor.crop_classifier is None:
            raise InputError(
                "mlvl-roialign: crop_logits needs a crop classifier (options image_crop > 0 and crop_classes > 0)"
            )
        return self.extractor.crop_logits(self.crops(features, regions, self.extractor.crop_code.weight.device))

    def crops(self, features: ImageFeatures, regions: list[Tensor], device: torch.device) -> Tensor:
        """``image_crop``: each region's N x N crop of its original image (RGB in [-0.5, 0.5]), (K, 3, N, N): the
        square around the box's centre with the box's longer side (outside the image reads 0), the boxes taken from
        the input frame back to the image's pixels."""
        if features.images is None:
            raise InputError(
                "mlvl-roialign: image_crop needs the original images, but ImageFeatures.images is None (pass images= "
                "with the pixel values)"
            )
        frames = features.frames or [IDENTITY_FRAME] * len(features.images)
        size = self.options.image_crop
        out = []
        for image, frame, boxes in zip(features.images, frames, regions):
            pixels = torch.from_numpy(np.array(image.convert("RGB"), dtype=np.float32)).to(device)  # one copy, writable
            pixels = pixels.permute(2, 0, 1)[None] / 255.0 - 0.5
            height, width = pixels.shape[-2:]
            box = from_input_frame(boxes.to(device=device, dtype=torch.float32), frame)
            box = box * torch.tensor([width, height, width, height], dtype=torch.float32, device=device)
            rois = torch.cat([box.new_zeros(box.shape[0], 1), square_windows(box)], dim=1)
            out.append(roi_align(pixels, rois, size, spatial_scale=1.0, sampling_ratio=2, aligned=True))
        return torch.cat(out)


def square_windows(boxes: Tensor) -> Tensor:
    """The square around each xyxy box's centre with the box's longer side, (K, 4) xyxy: ``image_crop``'s window, in
    which a box's aspect stays visible."""
    centre, half = (boxes[:, :2] + boxes[:, 2:]) / 2, (boxes[:, 2:] - boxes[:, :2]).amax(1, keepdim=True) / 2
    return torch.cat([centre - half, centre + half], dim=1)


def build_region_encoder(options: RoIAlignEncoderOptions, context: BuildContext) -> MlvlRoIAlignEncoder:
    """Factory of ``mlvl-roialign``: channels, image size and hidden size come from the build context."""
    if options.in_channels is not None:
        channels = options.in_channels
    else:
        missing = [name for name in options.levels if name not in context.level_channels]
        if missing:
            raise ValueError(
                f"mlvl-roialign: the image tokenizer publishes no level {missing[0]!r} "
                f"(it has {sorted(context.level_channels)}); fix the option levels or set in_channels"
            )
        widths = {name: context.level_channels[name] for name in options.levels}
        if len(set(widths.values())) != 1:
            raise ValueError(f"mlvl-roialign: all fused levels need the same channel count, got {widths}")
        channels = widths[options.levels[0]]
    if context.hidden_size <= 0:
        raise ValueError("mlvl-roialign: the build context has no language-model hidden_size (got 0)")
    if min(context.image_size) <= 0:
        raise ValueError(
            f"mlvl-roialign: the build context has no image_size (got {context.image_size}); "
            "it converts normalized boxes to input pixels"
        )
    return MlvlRoIAlignEncoder(options, channels, context.hidden_size, tuple(context.image_size))
