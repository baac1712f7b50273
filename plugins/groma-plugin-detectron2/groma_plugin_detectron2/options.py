"""Options of the ``detectron2`` region proposer."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator

from groma_core.config import StageOptions


class Detectron2Options(StageOptions):
    """A detectron2 model given by a YAML config (a model-zoo name or a file) and a checkpoint."""

    config_file: str = Field(
        default="COCO-Detection/faster_rcnn_R_50_FPN_3x.yaml",
        description="a YAML config file, or a model-zoo config name that detectron2.model_zoo.get_config_file "
        "resolves (e.g. COCO-Detection/faster_rcnn_R_50_FPN_3x.yaml)",
        json_schema_extra={"path": True},
    )
    weights: str | None = Field(
        default=None,
        description="checkpoint loaded with DetectionCheckpointer: a local .pth/.pkl file (detectron2:// and "
        "https:// URLs are downloaded by detectron2); None keeps the random initialisation",
        json_schema_extra={"path": True},
    )
    config_overrides: dict[str, Any] = Field(
        default_factory=dict,
        description="config keys set after the file, as detectron2's merge_from_list, e.g. "
        "{'MODEL.ROI_HEADS.SCORE_THRESH_TEST': 0.0, 'INPUT.MIN_SIZE_TEST': 600}",
    )
    source: Literal["instances", "rpn"] = Field(
        default="instances",
        description="'instances': the model's final detections (pred_boxes, scores); 'rpn': the region proposal "
        "network's proposals (proposal_boxes, sigmoid of objectness_logits), for models that have one",
    )
    top_k: int | None = Field(
        default=300,
        gt=0,
        description="at most this many proposals per image, best first, handed to Groma's selection (also sets "
        "TEST.DETECTIONS_PER_IMAGE); None: all the model returns",
    )

    @field_validator("config_file")
    @classmethod
    def _yaml_config(cls, value: str) -> str:
        if value.endswith(".py"):
            raise ValueError(
                f"config_file {value!r} is a LazyConfig (.py) file; this proposer builds models from YAML configs "
                "(get_cfg + merge_from_file)"
            )
        return value

    @field_validator("config_overrides")
    @classmethod
    def _dotted_keys(cls, value: dict[str, Any]) -> dict[str, Any]:
        bad = [key for key in value if not key.replace(".", "").replace("_", "").isalnum() or key != key.upper()]
        if bad:
            raise ValueError(
                f"config_overrides: {bad} are not detectron2 config keys (dotted upper case, e.g. MODEL.WEIGHTS)"
            )
        return value
