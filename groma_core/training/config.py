"""The ``train:`` section of a recipe: the training stages, what each trains, its data mixture and its schedule."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


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
    objective: Literal["lm", "detection", "text"] = Field(
        "lm",
        description="lm: the model's next-token loss; detection: the region proposer's detection_loss; text: the "
        "language backbone's next-token loss on text alone (no image; e.g. the synthetic `recall` format)",
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
        if self.attribute_loss and self.objective != "detection":
            raise ValueError(f"attribute_loss is for detection stages; this stage's objective is {self.objective}")
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
