"""Groma's 114 new tokens, in the reference's order (ids 32000..32113 on a 32000-token LLaMA vocabulary)."""

from __future__ import annotations

PAD = "[PAD]"
SEP = "<sep>"
IMAGE = "<image>"
REGION = "<region>"
REFER_BOX = "<refer_box>"
GROUND_BOX = "<ground_box>"
REFER_FEAT = "<refer_feat>"
GROUNDING = "[grounding]"
ROI_OPEN, ROI_CLOSE = "<roi>", "</roi>"
P_OPEN, P_CLOSE = "<p>", "</p>"

MAX_REGIONS = 100

#: the order in which the reference adds its tokens (``DEFAULT_TOKENS`` then ``REGION_IDX_TOKENS``)
BASE_NEW_TOKENS: tuple[str, ...] = (
    PAD,
    SEP,
    "<img>",
    "</img>",
    ROI_OPEN,
    ROI_CLOSE,
    P_OPEN,
    P_CLOSE,
    IMAGE,
    REGION,
    REFER_BOX,
    GROUND_BOX,
    REFER_FEAT,
    GROUNDING,
)
REGION_INDEX_TOKENS: tuple[str, ...] = tuple(f"<r{k}>" for k in range(MAX_REGIONS))
NEW_TOKENS: tuple[str, ...] = BASE_NEW_TOKENS + REGION_INDEX_TOKENS
NUM_NEW_TOKENS = len(NEW_TOKENS)  # 114


def region_token(k: int) -> str:
    """The proxy token ``<rK>`` of region K."""
    if not 0 <= k < MAX_REGIONS:
        raise ValueError(f"region index {k} out of range 0..{MAX_REGIONS - 1}")
    return f"<r{k}>"

IGNORE_INDEX = -100
"""The label of a position the training loss skips (as torch's cross-entropy default)."""
