"""The four stage interfaces of a Groma pipeline.

Each stage is an ``nn.Module`` with a stated call contract. Every public box is normalized ``xyxy`` of the
original image; every call takes a batch (a single item is a batch of one); nothing calls ``.cuda()``: a stage
lives on whatever device and dtype the pipeline moves it to.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from groma_core.boxes import IDENTITY_FRAME, Frame
from groma_core.types import ImageFeatures, Proposals

if TYPE_CHECKING:
    from PIL import Image

    from groma_core.prompt import GromaTokenizer


@dataclass
class BuildContext:
    """What a stage factory may know about the stages built before it.

    Build order: image tokenizer, language backbone, region proposer, region encoder. ``level_channels`` maps each
    image-feature level name to its channel count; ``token_dim`` is the width of the image tokens;
    ``hidden_size`` the language model's width (0 before the backbone is built).
    """

    level_channels: dict[str, int] = field(default_factory=dict)
    level_sizes: dict[str, tuple[int, int]] = field(default_factory=dict)
    token_dim: int = 0
    image_size: tuple[int, int] = (0, 0)
    hidden_size: int = 0
    source: str = "<python>"
    extras: dict[str, Any] = field(default_factory=dict)


class Stage(nn.Module, ABC):
    """Behaviour shared by all stages: mapping keys of the reference Groma checkpoint onto this module."""

    #: prefixes of the reference ``GromaModel`` state dict that belong to this stage (for the converter),
    #: e.g. ``("perceiver.vis_encoder.",)``
    reference_prefixes: tuple[str, ...] = ()

    #: True for a stage that reads the original images (``ImageFeatures.images``, RGB ``PIL.Image``s) besides the
    #: features: inference, evaluation and training then load and pass them (training passes each sample's image
    #: after its augmentation, with the boxes that go with it); False (the default) lets training skip them
    needs_images: bool = False

    def reference_key(self, key: str) -> str | None:
        """This module's state-dict key for the full reference key ``key`` (which starts with one of
        :attr:`reference_prefixes`).

        Return None for a reference tensor that this stage deliberately does not keep (for example an unused
        final LayerNorm); the converter reports such keys as dropped. The default strips the matching prefix.
        """
        for prefix in self.reference_prefixes:
            if key.startswith(prefix):
                return key[len(prefix) :]
        return None


class ImageTokenizer(Stage):
    """Images -> image tokens and named multi-level feature maps.

    Contract:
      * ``preprocess(images)``: a sequence of B RGB ``PIL.Image`` of any sizes -> float tensor (B, 3, H, W) at
        :attr:`image_size`, normalized as the encoder expects. The aspect ratio need not be preserved: boxes are
        normalized to the original image, so an anisotropic resize keeps them valid.
      * ``input_frame(width, height)``: where a ``width`` x ``height`` image lies in the input (see
        :data:`groma_core.boxes.Frame`). The identity (the default) for a resize that fills the input; a tokenizer
        that keeps the aspect ratio (letterbox) returns the placed rectangle, and the core then maps boxes into the
        input frame for the proposer and region encoder, and back to the original image for the user.
      * ``forward(pixel_values)``: (B, 3, H, W) -> :class:`ImageFeatures` with ``tokens`` (B, num_tokens,
        token_dim) and ``levels`` name -> (B, C, h, w) as announced by :attr:`level_channels`.
    """

    image_size: tuple[int, int]
    token_dim: int
    num_tokens: int
    level_channels: dict[str, int]
    level_sizes: dict[str, tuple[int, int]]

    @abstractmethod
    def preprocess(self, images: Sequence[Image.Image]) -> Tensor:
        """Resize and normalize a batch of RGB images into pixel values."""

    @abstractmethod
    def forward(self, pixel_values: Tensor) -> ImageFeatures:
        """Encode a batch of preprocessed images."""

    def input_frame(self, width: int, height: int) -> Frame:
        """Where a ``width`` x ``height`` image lies in the preprocessed input; the identity by default."""
        return IDENTITY_FRAME


class RegionProposer(Stage):
    """Image features -> candidate boxes with objectness scores.

    Contract: ``forward(features)`` with :class:`ImageFeatures` of B images -> :class:`Proposals` with B entries,
    boxes (N_i, 4) normalized xyxy with x2 >= x1, y2 >= y1 and centres inside [0, 1] (corners may cross the border:
    the reference selects regions on unclipped boxes), scores (N_i,) in [0, 1]. The core then joins user boxes
    (score 1.0), applies NMS, the score threshold and the top-k cap (see :mod:`groma_core.selection`).
    A proposer may return zero boxes for an image. A proposer with ``needs_images`` reads ``features.images`` (the
    original RGB PIL images; None when the caller passed only pixel values) and gives boxes of those images; the core
    maps them into the image tokenizer's input frame. Optional: ``detection_loss(proposals, targets, source)``
    (:class:`DetectionLoss`), for training the proposer in a ``detection`` stage.
    """

    @abstractmethod
    def forward(self, features: ImageFeatures) -> Proposals:
        """Propose candidate regions for each image of the batch."""


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


class RegionEncoder(Stage):
    """Image features + selected regions -> one region token per region, at the language model's width.

    Contract: ``forward(features, regions)`` with ``regions`` a list of B tensors (N_i, 4) normalized xyxy of the
    image tokenizer's input -> list of B tensors (N_i, hidden_size). N_i may be 0. An encoder with ``needs_images``
    reads ``features.images`` (None when the caller passed only pixel values: say so with an InputError) and takes
    a region back to its original image through ``features.frames``.

    Optional, for a ``crops`` training stage: ``crop_classes`` (int > 0), ``crop_labels`` (``"category"``: the
    box's category id; ``"head"``: the index of its category name's last word among the file's sorted head words)
    and ``crop_logits(features, regions)`` -> (sum N_i, crop_classes) logits, read from ``features.images`` and
    ``features.frames`` alone (``mlvl-roialign`` with ``image_crop`` and ``crop_classes``); and
    ``forward(features, regions, crop_code=False)``: the tokens without the classifier's code, which the attribute
    loss of a detection stage reads (it trains the region's own features; the code is the classifier's). Likewise an
    encoder with ``box_code_scale`` > 0 (a fixed code of where each region is) takes ``box_code=False``.
    """

    hidden_size: int

    @abstractmethod
    def forward(self, features: ImageFeatures, regions: list[Tensor]) -> list[Tensor]:
        """Encode each region of each image into one vector."""


@dataclass
class BackboneOutput:
    """Result of a :class:`LanguageBackbone` forward: logits (B, L, V) over the full vocabulary (new tokens
    included), the last hidden states (B, L, H) and the key/value cache when asked for."""

    logits: Tensor
    hidden_states: Tensor
    past_key_values: Any = None


class LanguageBackbone(Stage):
    """A causal language model that reads embeddings and predicts the next token over the full vocabulary.

    Contract:
      * :attr:`tokenizer`: a :class:`~groma_core.prompt.GromaTokenizer` whose vocabulary includes Groma's new
        tokens; :attr:`vocab_size` counts them.
      * ``embed(ids)``: (B, L) int64 -> (B, L, hidden_size) input embeddings (new tokens included).
      * ``forward(inputs_embeds, attention_mask, position_ids, past_key_values, use_cache)`` -> :class:`BackboneOutput`.
        ``attention_mask`` (B, L_past + L) with 1 for real tokens; ``position_ids`` (B, L).
    """

    hidden_size: int
    vocab_size: int
    tokenizer: GromaTokenizer

    @abstractmethod
    def embed(self, ids: Tensor) -> Tensor:
        """Input embeddings of token ids."""

    @abstractmethod
    def forward(
        self,
        inputs_embeds: Tensor,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        past_key_values: Any = None,
        use_cache: bool = False,
    ) -> BackboneOutput:
        """Run the model on embeddings."""


STAGE_KINDS: dict[str, type[Stage]] = {
    "image_tokenizer": ImageTokenizer,
    "region_proposer": RegionProposer,
    "region_encoder": RegionEncoder,
    "language_backbone": LanguageBackbone,
}


def check_stage(kind: str, obj: object, plugin: str) -> Stage:
    """Raise a clear TypeError if a factory did not return the stage kind it was registered for."""
    expected = STAGE_KINDS[kind]
    if not isinstance(obj, expected):
        raise TypeError(
            f"plugin {plugin!r} registered as a {kind} returned {type(obj).__name__}, "
            f"which is not a {expected.__name__}"
        )
    return obj


def module_device(module: nn.Module) -> torch.device:
    """The device of a module's first parameter or buffer (CPU when it has none)."""
    for t in module.parameters():
        return t.device
    for t in module.buffers():
        return t.device
    return torch.device("cpu")


def module_dtype(module: nn.Module) -> torch.dtype:
    """The dtype of a module's first floating parameter (float32 when it has none)."""
    for t in module.parameters():
        if t.is_floating_point():
            return t.dtype
    return torch.float32


@contextlib.contextmanager
def empty_parameters() -> Iterator[None]:
    """Create parameters on the ``meta`` device (buffers stay real), so that weights loaded afterwards with
    ``load_state_dict(..., assign=True)`` are never initialised first."""
    original = nn.Module.register_parameter

    def register(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        original(module, name, param)
        if param is not None and param.device.type != "meta":
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = register  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = original  # type: ignore[method-assign]
