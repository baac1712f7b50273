"""Training of Groma pipelines: staged (detection, alignment, instruction tuning), resumable, multi-process.

``run_training(model, config, datasets, out_dir, resume=...)`` runs the stages of a :class:`TrainingConfig`
(the recipe's ``train:`` section); see :mod:`groma_core.training.data` for the sample format and
:class:`DetectionLoss` for what a region proposer implements to be trained by a ``detection`` stage;
:mod:`groma_core.training.datasets` turns the reference's annotation files into samples (a recipe's
``train.datasets``).
"""

from groma_core.schema import (
    DatasetSpec,
    DataSource,
    DetectionAugment,
    RecipeTraining,
    StageConfig,
    TrainingConfig,
    dataset_path_problems,
)
from groma_core.stages import DetectionLoss
from groma_core.training.data import MixtureSampler, collate
from groma_core.training.datasets import (
    augment_detection,
    build_datasets,
    dataset_text,
    make_tokenizer,
    open_dataset,
    render_conversation,
)
from groma_core.training.engine import StepInfo, TrainingResult, check_training, run_training
from groma_core.training.params import apply_trainable, param_groups, trainable_names

__all__ = [
    "DataSource",
    "DatasetSpec",
    "DetectionAugment",
    "DetectionLoss",
    "MixtureSampler",
    "RecipeTraining",
    "StageConfig",
    "StepInfo",
    "TrainingConfig",
    "TrainingResult",
    "apply_trainable",
    "augment_detection",
    "build_datasets",
    "check_training",
    "collate",
    "dataset_path_problems",
    "dataset_text",
    "make_tokenizer",
    "open_dataset",
    "param_groups",
    "render_conversation",
    "run_training",
    "trainable_names",
]
