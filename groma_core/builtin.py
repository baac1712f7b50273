"""Stages that ship with groma-core itself."""

from __future__ import annotations

import torch

from groma_core.config import StageOptions
from groma_core.hookspecs import hookimpl
from groma_core.stages import BuildContext, RegionProposer
from groma_core.types import ImageFeatures, Proposals


class UserBoxesOptions(StageOptions):
    """The ``user-boxes`` proposer has no options."""


class UserBoxesProposer(RegionProposer):
    """Proposes nothing by itself: the regions are exactly the boxes the user gives (joined at selection with
    score 1.0). Useful for region captioning, or for evaluating a model on given boxes."""

    def forward(self, features: ImageFeatures) -> Proposals:
        device = features.tokens.device
        batch = features.batch_size
        return Proposals(
            boxes=[torch.zeros(0, 4, device=device) for _ in range(batch)],
            scores=[torch.zeros(0, device=device) for _ in range(batch)],
        )


def _user_boxes(config: UserBoxesOptions, context: BuildContext) -> UserBoxesProposer:
    return UserBoxesProposer()


@hookimpl
def register_region_proposers(register):
    register(
        "user-boxes",
        _user_boxes,
        config=UserBoxesOptions,
        description="no proposals: the regions are exactly the user's boxes",
    )
