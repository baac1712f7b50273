"""The ``train:`` section of a recipe as data: the training stages (what each trains, its data mixture and schedule)
and the datasets they read (format and files). Plain pydantic models: loading or validating a recipe needs none of
the training code (:mod:`groma_core.training` builds datasets from these and runs the stages)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from groma_core.errors import did_you_mean


class DataSource(BaseModel):
    """One dataset of a stage's mixture."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(..., min_length=1, description="key of the dataset in the mapping given to run_training")
    ratio: float = Field(
        1.0,
        gt=0.0,
        le=1.0,
        description="keep this fraction of the dataset, drawn once (seeded) before the first epoch "
        "(the reference draws it unseeded)",
    )
    source: str | None = Field(
        None,
        description="tag handed to the proposer's detection_loss (the reference uses 'coco' or 'sa1b'); "
        "defaults to the dataset name",
    )


class StageConfig(BaseModel):
    """One training stage: the objective, the trained parameters, the data and the optimisation schedule."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(..., pattern=r"^[A-Za-z0-9_.-]+$", description="stage name (checkpoint folders and logs use it)")
    objective: Literal["lm", "detection", "text", "attributes", "crops"] = Field(
        "lm",
        description="lm: the model's next-token loss; detection: the region proposer's detection_loss; text: the "
        "language backbone's next-token loss on text alone (no image; e.g. the synthetic `recall` format); "
        "attributes (not in the reference): attribute_loss alone on a detection file's true boxes, the proposer "
        "not run (e.g. to train a region encoder's own layers after the detection stage); crops (not in the "
        "reference): a region encoder's crop classifier (mlvl-roialign crop_classes) names each true box's "
        "category_id (or its category name's head word) from the box's crop of the original image, cross-entropy "
        "alone, nothing else run",
    )
    train: list[str] = Field(
        ...,
        min_length=1,
        description="glob patterns over parameter names (a module path also matches everything below it), "
        "e.g. 'image_projector', 'language_backbone.llm.*'; every other parameter is frozen",
    )
    freeze: list[str] = Field(
        default_factory=lambda: ["image_tokenizer"],
        description="patterns frozen even when `train` matches them (the reference never trains the image tokenizer)",
    )
    data: list[DataSource] = Field(..., min_length=1, description="the datasets of this stage")
    batch_size: int = Field(..., ge=1, description="samples per device per micro-batch")
    grad_accum: int = Field(1, ge=1, description="micro-batches per optimizer step")
    epochs: float = Field(1.0, gt=0.0, description="passes over the (subsampled) mixture")
    max_steps: int | None = Field(None, ge=1, description="optimizer steps; overrides `epochs` when given")
    lr: float = Field(..., gt=0.0, description="peak learning rate")
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW weight decay")
    no_decay_bias_norm: bool = Field(
        True,
        description="no weight decay on biases and normalization weights (stages 2-3 of the reference); "
        "false decays every parameter (stage 1)",
    )
    lr_multipliers: dict[str, float] = Field(
        default_factory=dict,
        description="learning-rate factor for parameters whose name contains the key (first key that matches "
        "wins), e.g. {reference_points: 0.1, sampling_offsets: 0.1} in stage 1",
    )
    betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas")
    eps: float = Field(1e-8, gt=0.0, description="AdamW epsilon")
    schedule: Literal["cosine", "linear", "constant"] = Field(
        "cosine", description="learning-rate decay after the warmup"
    )
    warmup_steps: int = Field(0, ge=0, description="linear warmup from 0, in optimizer steps")
    warmup_ratio: float = Field(0.0, ge=0.0, lt=1.0, description="warmup as a fraction of the stage's steps")
    max_grad_norm: float | None = Field(1.0, gt=0.0, description="clip the gradient norm (null: no clipping)")
    bf16: bool = Field(False, description="run forward and loss under bfloat16 autocast")
    gradient_checkpointing: bool = Field(
        False, description="recompute activations in backward for modules that support it (the LLM)"
    )
    distributed: Literal["ddp", "fsdp"] = Field(
        "ddp",
        description="how several processes share the stage: ddp (replicated model) or fsdp (sharded parameters, "
        "for the reference's stage 3; only the last stage may use it)",
    )
    attribute_loss: float = Field(
        0.0,
        ge=0.0,
        description="detection stages: weight of an auxiliary loss that makes the region encoder's token of each "
        "ground-truth box name the box's category (the detection file's category_id) and give back its box, read "
        "out by fixed random projections (no parameters, nothing to drop after the stage); the stage must train "
        "region_encoder. 0: off (the reference)",
    )
    attribute_classes: int = Field(128, ge=2, description="attribute_loss: category ids must be below this")
    box_jitter: float = Field(
        0.0,
        ge=0.0,
        le=0.5,
        description="crops and attribute_loss (not in the reference): the true boxes they read are moved as a "
        "proposer's boxes are off: each box's centre by N(0, s) of its width and height, each side scaled by "
        "exp(N(0, s)), so that a crop classifier (or the region tokens) names a proposed box as well as a true one "
        "(measured for crops stages: benchmarks/README.md, session 24). 0: the true boxes",
    )
    fsdp_wrap: list[str] = Field(
        default_factory=lambda: ["LlamaDecoderLayer"],
        description="fsdp: module class names sharded as their own units",
    )

    @model_validator(mode="after")
    def _one_warmup(self) -> StageConfig:
        if self.warmup_steps and self.warmup_ratio:
            raise ValueError("give warmup_steps or warmup_ratio, not both")
        names = [d.name for d in self.data]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"dataset(s) listed twice in data: {', '.join(repeated)}")
        if self.attribute_loss and self.objective not in ("detection", "attributes"):
            raise ValueError(
                f"attribute_loss is for detection and attributes stages; this stage's objective is {self.objective}"
            )
        if self.box_jitter and self.objective != "crops" and not self.attribute_loss:
            raise ValueError(
                "box_jitter moves the true boxes of a crops stage or of attribute_loss; this stage has neither"
            )
        if self.objective == "attributes" and not self.attribute_loss:
            raise ValueError("an attributes stage trains on attribute_loss alone: give it a weight above 0")
        return self


class TrainingConfig(BaseModel):
    """Training of a Groma pipeline: stages run in order on the same model, with checkpoints and logs."""

    model_config = ConfigDict(extra="forbid")

    stages: list[StageConfig] = Field(..., min_length=1, description="the stages, run in this order")
    seed: int = Field(42, description="seed of the data order, the sampling and the initial RNG states")
    save_every: int = Field(0, ge=0, description="write a checkpoint every N optimizer steps (0: stage ends only)")
    keep_last: int = Field(1, ge=1, description="checkpoints kept on disk (older ones are removed)")
    checkpoint_weights: Literal["trained", "full"] = Field(
        "trained",
        description="trained: only parameters trained by the stages run so far (resuming needs the same "
        "initial model); full: every tensor of the model",
    )
    log_every: int = Field(1, ge=1, description="write a metrics line every N optimizer steps")
    progress: bool = Field(True, description="show a progress bar (rank 0 only)")
    tensorboard: bool = Field(True, description="also log to TensorBoard when torch.utils.tensorboard imports")
    num_workers: int = Field(0, ge=0, description="data-loader worker processes")
    device: str = Field("auto", description="auto (cuda:LOCAL_RANK when CUDA exists, else cpu), cpu, cuda:N")
    find_unused_parameters: bool = Field(False, description="DDP: allow trained parameters that a step does not use")

    @model_validator(mode="after")
    def _unique_stage_names(self) -> TrainingConfig:
        names = [s.name for s in self.stages]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"stage name(s) used twice: {', '.join(repeated)}")
        sharded = [s.name for s in self.stages[:-1] if s.distributed == "fsdp"]
        if sharded:
            raise ValueError(
                f"stage(s) {', '.join(sharded)}: only the last stage may use distributed: fsdp (a sharded model "
                "stays sharded); run earlier stages with ddp"
            )
        return self


# -- the datasets a recipe names ----------------------------------------------------------------------------
FORMATS = (
    "detection",
    "rec",
    "grounding",
    "grounded-caption",
    "region-caption",
    "region-caption-multi",
    "refcocog-caption",
    "grit",
    "conversation",
    "instruct",
    "recall",
)
#: formats generated on the fly (no files), read by ``text`` stages
SYNTHETIC_FORMATS = ("recall",)


@dataclass(frozen=True)
class DetectionAugment:
    """The stage-1 train pipeline at the reference's 448-pixel input: shorter side resized to one of ``scales``
    (longer side at most ``max_side``), a random crop of ``crop`` pixels per side (each side drawn in the range,
    at most the image's), an anisotropic resize to the square input, boxes under ``min_box`` pixels dropped, a
    horizontal flip with probability ``flip``."""

    scales: tuple[int, ...] = (400, 500, 600)
    crop: tuple[int, int] = (448, 896)
    max_side: int = 4200
    min_box: float = 2.0
    flip: float = 0.5
    reference_size: int = 448

    def scaled(self, input_size: int) -> DetectionAugment:
        """The same pipeline with pixel sizes scaled from ``reference_size`` to ``input_size``."""
        f = input_size / self.reference_size
        return DetectionAugment(
            tuple(max(1, round(s * f)) for s in self.scales),
            (max(1, round(self.crop[0] * f)), max(1, round(self.crop[1] * f))),
            max(1, round(self.max_side * f)),
            self.min_box,
            self.flip,
            input_size,
        )


class DatasetSpec(BaseModel):
    """One dataset of a recipe's ``train.datasets``: its format and files (paths relative to the recipe file)."""

    model_config = ConfigDict(extra="forbid")

    format: Literal[FORMATS] = Field(  # type: ignore[valid-type]
        ...,
        description="detection (COCO, class-agnostic; stage 1), rec (RefCOCO), grounding (COCO/LVIS categories, "
        "LVIS-Ground file), grounded-caption (Flickr30k Entities), region-caption (Visual Genome, one region), "
        "region-caption-multi (Visual Genome, up to 10 regions per image), refcocog-caption (RefCOCOg REC file as "
        "detailed region captions), grit (GRIT REC), conversation (LLaVA / ShareGPT4V), instruct (Groma Instruct), "
        "recall (synthetic text for a `text` stage: in-context copying and region binding, no files; see "
        "groma_core.training.synthetic)",
    )
    ann: str | None = Field(None, min_length=1, description="annotation file")
    images: str | None = Field(
        None, min_length=1, description="folder the annotation's image file names are relative to"
    )
    size: int = Field(20000, ge=1, description="recall: samples per epoch")
    regions: int = Field(16, ge=1, le=100, description="recall: a binding sample lists 1 to this many regions")
    queries: int = Field(8, ge=1, description="recall: REC turns per binding sample")
    copy_fraction: float = Field(0.5, ge=0.0, le=1.0, description="recall: fraction of copying samples")
    turns: int = Field(
        1, ge=1, le=64, description="rec: expressions of one image asked in one sample, as its turns (1: the reference)"
    )
    bare_phrases: bool = Field(
        False,
        description="grounded-caption: each phrase directly followed by its regions (`a red circle<r3>`), without "
        "<p></p><roi></roi> (not the reference: a curriculum step in which the answer follows its phrase at once)",
    )
    template: Literal["default", "llava"] = Field(
        "default", description="conversation template (the reference: default in stage 2, llava in stage 3)"
    )
    source: str | None = Field(
        None,
        description="tag handed to the proposer's detection loss (coco or sa1b for deformable-detr); the default "
        "of `source` in the stages' data entries",
    )
    scales: list[int] = Field(
        [400, 500, 600], min_length=1, description="detection: shorter sides drawn from, at a 448-pixel input"
    )
    crop: tuple[int, int] = Field((448, 896), description="detection: random crop side range, at a 448-pixel input")
    max_side: int = Field(4200, gt=0, description="detection: longest side after the multi-scale resize, at 448")
    min_box: float = Field(2.0, ge=0.0, description="detection: drop boxes narrower or lower than this, in pixels")
    flip: float = Field(0.5, ge=0.0, le=1.0, description="detection: probability of a horizontal flip")
    scale_to_input: bool = Field(
        True, description="detection: scale scales/crop/max_side from 448 pixels to the image tokenizer's input size"
    )

    @model_validator(mode="after")
    def _files(self) -> DatasetSpec:
        if self.turns > 1 and self.format != "rec":
            raise ValueError(f"turns is an option of the rec format, not of {self.format}")
        if self.bare_phrases and self.format != "grounded-caption":
            raise ValueError(f"bare_phrases is an option of the grounded-caption format, not of {self.format}")
        if self.format in SYNTHETIC_FORMATS:
            given = [k for k in ("ann", "images") if getattr(self, k) is not None]
            if given:
                raise ValueError(f"format {self.format} is generated, it reads no files: remove {', '.join(given)}")
        else:
            missing = [k for k in ("ann", "images") if getattr(self, k) is None]
            if missing:
                raise ValueError(f"format {self.format} needs {' and '.join(missing)}")
        return self

    def augment(self, input_size: int) -> DetectionAugment:
        """The detection augmentation of this dataset for a square input of ``input_size`` pixels."""
        base = DetectionAugment(tuple(self.scales), tuple(self.crop), self.max_side, self.min_box, self.flip)
        return base.scaled(input_size) if self.scale_to_input else base


class RecipeTraining(TrainingConfig):
    """A recipe's ``train`` section: the engine's :class:`TrainingConfig` plus the datasets its stages name."""

    data_root: str = Field(
        ".",
        description="folder that relative dataset paths start from; itself relative to the recipe file's folder",
    )
    datasets: dict[str, DatasetSpec] = Field(
        default_factory=dict, description="dataset name -> format and files (the names the stages' `data` use)"
    )

    def root(self, base_dir: Path | None) -> Path:
        """The folder relative dataset paths start from."""
        return resolve_path(self.data_root, base_dir)

    @model_validator(mode="after")
    def _datasets_match_the_stages(self) -> RecipeTraining:
        problems = []
        for i, stage in enumerate(self.stages):
            for j, source in enumerate(stage.data):
                spec = self.datasets.get(source.name)
                if spec is None:
                    hint = did_you_mean(source.name, self.datasets)
                    problems.append(f"stages.{i}.data.{j}.name: {source.name!r} is not in datasets{hint}")
                    continue
                if objective_of(spec.format) != DATA_OF.get(stage.objective, stage.objective):
                    problems.append(
                        f"stages.{i}.data.{j}.name: objective {stage.objective!r} cannot read {source.name!r} "
                        f"(format {spec.format})"
                    )
                if source.source is None and spec.source is not None:
                    source.source = spec.source
        if problems:
            raise ValueError("\n".join(problems))
        return self


DATA_OF = {"attributes": "detection", "crops": "detection"}
"""Objectives that read the data of another objective (attributes and crops stages read detection files)."""


def objective_of(format: str) -> str:
    """The stage objective that reads a dataset format: detection, text (synthetic text) or lm."""
    if format == "detection":
        return "detection"
    return "text" if format in SYNTHETIC_FORMATS else "lm"


def dataset_path_problems(config: RecipeTraining, base_dir: Path | None) -> list[str]:
    """Every dataset file or folder of the stages that does not exist, with its path in the recipe."""
    used = {d.name for s in config.stages for d in s.data}
    problems = []
    for name, spec in config.datasets.items():
        if name not in used or spec.format in SYNTHETIC_FORMATS:
            continue
        for key, kind in (("ann", "file"), ("images", "folder")):
            path = resolve_path(getattr(spec, key), config.root(base_dir))
            ok = path.is_file() if kind == "file" else path.is_dir()
            if not ok:
                problems.append(f"train.datasets.{name}.{key}: no such {kind}: {path}")
    return problems


def resolve_path(value: str, base_dir: Path | None) -> Path:
    """A recipe path: ``~`` expanded, relative paths taken from the recipe file's folder."""
    p = Path(os.path.expanduser(value))
    return p if p.is_absolute() or base_dir is None else base_dir / p
