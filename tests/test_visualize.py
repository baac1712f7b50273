"""Drawing answers: boxes in each phrase's colour, and the proposer's masks tinted under them."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from groma_core.types import GroundedAnswer, GroundedPhrase
from groma_core.visualize import MASK_OPACITY, PALETTE, draw_answer


def _answer(masks) -> GroundedAnswer:
    phrase = GroundedPhrase("a disc", (0, 6), [0], [(0.1, 0.1, 0.9, 0.9)], [(8.0, 6.0, 72.0, 54.0)], masks)
    return GroundedAnswer("<p>a disc</p><roi><r0></roi>", "a disc", [phrase], image_size=(80, 60))


def test_masks_are_tinted_in_the_phrase_colour_and_boxes_still_drawn():
    image = Image.new("RGB", (80, 60), (255, 255, 255))
    mask = torch.zeros(60, 80, dtype=torch.bool)
    mask[20:40, 30:50] = True
    drawn = np.asarray(draw_answer(image, _answer([mask])), dtype=float)
    expected = (1 - MASK_OPACITY) * 255 + MASK_OPACITY * np.array(PALETTE[0])
    assert np.abs(drawn[30, 40] - expected).max() <= 1.5  # inside the mask: tinted (rounding of the blend)
    assert (drawn[44:50, 58:66] == 255).all()  # inside the box, outside the mask: untouched
    assert (drawn[6, 40] == PALETTE[0]).all()  # the box's top edge


def test_a_mask_at_another_resolution_is_resized_and_a_missing_one_skipped():
    image = Image.new("RGB", (80, 60), (255, 255, 255))
    small = np.zeros((30, 40), dtype=bool)
    small[10:20, 15:25] = True  # the same place at half the size
    drawn = np.asarray(draw_answer(image, _answer([small])), dtype=float)
    assert drawn[30, 40].min() < 250 and (drawn[44:50, 58:66] == 255).all()
    plain = np.asarray(draw_answer(image, _answer(None)))
    user_box = np.asarray(draw_answer(image, _answer([None])))  # a user box: no mask
    assert (plain == user_box).all() and (plain[30, 40] == 255).all()
