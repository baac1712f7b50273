"""What the detector proposers share: options, the original images, architecture checks, the top-k cut."""

from __future__ import annotations

import difflib
import json
import os
from pathlib import Path
from typing import Any

import torch
from pydantic import Field, model_validator
from torch import Tensor

from groma_core.config import StageOptions
from groma_core.errors import InputError
from groma_core.stages import RegionProposer
from groma_core.types import ImageFeatures

#: config keys that transformers accepts without listing them in ``to_dict()``
DERIVED_CONFIG_KEYS = frozenset({"num_labels"})


class DetectorOptions(StageOptions):
    """Options shared by the transformers detector proposers."""

    pretrained: str | None = Field(
        default=None,
        description="local directory written by save_pretrained (config.json + weights, and "
        "preprocessor_config.json when present); None builds a randomly initialised model from `architecture`",
    )
    architecture: dict[str, Any] = Field(
        default_factory=dict,
        description="config arguments of a randomly initialised detector (only without `pretrained`); "
        "empty: transformers' defaults (the full-size model)",
    )
    input_size: int | None = Field(
        default=None,
        gt=0,
        description="side in pixels of the square detector input; None: the checkpoint's own "
        "(preprocessor_config.json, else the model config)",
    )
    top_k: int | None = Field(
        default=300,
        gt=0,
        description="at most this many proposals per image, best first, handed to Groma's selection; None: all",
    )
    clip_boxes: bool = Field(
        default=False, description="clamp the box corners to the image (Groma's own proposer leaves them unclipped)"
    )

    @model_validator(mode="after")
    def _one_source(self) -> DetectorOptions:
        if self.pretrained is not None and self.architecture:
            raise ValueError(
                "give either `pretrained` (a saved model directory) or `architecture` (a random model's config), "
                "not both"
            )
        return self


def check_architecture(config_class: type, arguments: dict[str, Any], where: str = "architecture") -> None:
    """Raise a ValueError naming every key of ``arguments`` (recursively into sub-configs) that ``config_class``
    does not know; transformers would otherwise accept a misspelled key silently."""
    from transformers import PretrainedConfig

    default = config_class()
    known = set(default.to_dict()) | DERIVED_CONFIG_KEYS
    problems = []
    for key, value in arguments.items():
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.6)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            problems.append(f"{where}.{key}: not an argument of {config_class.__name__}{hint}")
            continue
        sub = getattr(default, key, None)
        if isinstance(value, dict) and isinstance(sub, PretrainedConfig):
            sub_class = type(sub)
            if "model_type" in value and value["model_type"] != sub.model_type:
                from transformers import AutoConfig

                sub_class = type(AutoConfig.for_model(value["model_type"]))
            try:
                check_architecture(sub_class, {k: v for k, v in value.items() if k != "model_type"}, f"{where}.{key}")
            except ValueError as exc:
                problems.append(str(exc))
    if problems:
        raise ValueError("; ".join(problems))


def saved_processor(pretrained: str | None) -> Path | None:
    """The ``preprocessor_config.json`` of a pretrained directory, when it has one."""
    if pretrained is None:
        return None
    path = Path(os.path.expanduser(pretrained)) / "preprocessor_config.json"
    return path if path.is_file() else None


def check_pretrained(pretrained: str, plugin: str) -> Path:
    """The pretrained directory as a path; a clear error when it is not a directory with a config.json."""
    path = Path(os.path.expanduser(pretrained))
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"{plugin}: pretrained={pretrained!r} is not a model directory (expected config.json and weights written "
            "by save_pretrained; hub names are not fetched)"
        )
    return path


def original_images(features: ImageFeatures, plugin: str) -> list[Any]:
    """The batch's original images as RGB PIL images; a clear error when the caller did not pass them."""
    images = features.images
    if images is None:
        raise InputError(
            f"the {plugin!r} region proposer runs its own detector on the original images, but "
            "ImageFeatures.images is None: call the model with the images (model.answer / caption / locate, "
            "or generate(..., images=[...])), or set features.images to the batch's PIL images"
        )
    if len(images) != features.batch_size:
        raise InputError(
            f"the {plugin!r} region proposer got {len(images)} original images for a batch of "
            f"{features.batch_size} feature maps"
        )
    return [image.convert("RGB") for image in images]


def best_first(boxes: Tensor, scores: Tensor, top_k: int | None) -> tuple[Tensor, Tensor]:
    """Boxes and scores sorted by descending score (ties keep their order), cut to ``top_k`` when given."""
    order = torch.sort(scores, descending=True, stable=True).indices
    if top_k is not None:
        order = order[:top_k]
    return boxes[order].contiguous(), scores[order].contiguous()


def saved_input_side(processor_file: Path | None) -> int | None:
    """The input height that a saved ``preprocessor_config.json`` resizes to, if it says."""
    if processor_file is None:
        return None
    size = json.loads(processor_file.read_text()).get("size") or {}
    return size.get("height") if isinstance(size, dict) else None


def load_processor(processor_class: type, processor_file: Path | None, side: int) -> Any:
    """The detector's image processor (the saved one when there is one) resizing to ``side`` x ``side``."""
    size = {"height": side, "width": side}
    if processor_file is None:
        return processor_class(size=size)
    return processor_class.from_pretrained(str(processor_file.parent), size=size)


class FrozenDetectorProposer(RegionProposer):
    """A proposer wrapping a transformers detector (``self.detector``) and its image processor
    (``self.processor``): the detector stays frozen in eval mode, and images go through the detector's own
    preprocessing."""

    detector: Any
    processor: Any
    needs_images = True

    def train(self, mode: bool = True):
        """Frozen detector: it stays in eval mode (BatchNorm statistics untouched) whatever the pipeline's mode."""
        super().train(mode)
        self.detector.eval()
        return self

    def preprocess(self, images: list[Any]) -> Tensor:
        """The detector's own preprocessing: (B, 3, input_size, input_size)."""
        return self.processor(images=images, return_tensors="pt")["pixel_values"]
