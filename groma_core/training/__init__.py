"""Training of Groma pipelines: staged (detection, alignment, instruction tuning), resumable, multi-process.

``run_training(model, config, datasets, out_dir, resume=...)`` runs the stages of a :class:`TrainingConfig`
(the recipe's ``train:`` section); see :mod:`groma_core.training.data` for the sample format and
:class:`DetectionLoss` for what a region proposer implements to be trained by a ``detection`` stage.
"""

from groma_core.training.config import DataSource, StageConfig, TrainingConfig
from groma_core.training.data import MixtureSampler, collate
from groma_core.training.engine import StepInfo, TrainingResult, check_training, run_training
from groma_core.training.objectives import DetectionLoss
from groma_core.training.params import apply_trainable, param_groups, trainable_names

__all__ = [
    "DataSource",
    "DetectionLoss",
    "MixtureSampler",
    "StageConfig",
    "StepInfo",
    "TrainingConfig",
    "TrainingResult",
    "apply_trainable",
    "check_training",
    "collate",
    "param_groups",
    "run_training",
    "trainable_names",
]
