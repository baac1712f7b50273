"""Drawing grounded answers: each phrase's boxes in a distinct colour, labelled with the phrase."""

from __future__ import annotations

from PIL import Image, ImageDraw, ImageFont

from groma_core.types import GroundedAnswer

PALETTE = [
    (230, 25, 75),
    (60, 180, 75),
    (0, 130, 200),
    (245, 130, 48),
    (145, 30, 180),
    (70, 240, 240),
    (240, 50, 230),
    (210, 245, 60),
    (250, 190, 190),
    (0, 128, 128),
    (170, 110, 40),
    (128, 0, 0),
    (128, 128, 0),
    (0, 0, 128),
]


def draw_answer(image: Image.Image, answer: GroundedAnswer, width: int | None = None) -> Image.Image:
    """A copy of ``image`` with every grounded phrase's boxes drawn and labelled (phrase, or ``<rK>`` when the
    answer has no phrase text), and its masks, where the proposer gave them, tinted in the phrase's colour."""
    canvas = image.convert("RGB").copy()
    for i, phrase in enumerate(answer.phrases):  # masks first, under every box and label
        for mask in phrase.masks or ():
            if mask is not None:
                _paint_mask(canvas, mask, PALETTE[i % len(PALETTE)])
    draw = ImageDraw.Draw(canvas)
    line = width or max(2, round(min(canvas.size) / 150))
    font = ImageFont.load_default(size=max(10, round(min(canvas.size) / 30)))
    w, h = canvas.size
    stacked: dict[tuple[float, ...], int] = {}  # labels already on a box: phrases sharing a box stack theirs
    for i, phrase in enumerate(answer.phrases):
        colour = PALETTE[i % len(PALETTE)]
        for k, box in zip(phrase.region_ids, phrase.boxes):
            x1, y1, x2, y2 = (max(0.0, min(1.0, v)) for v in box)
            rect = (x1 * w, y1 * h, x2 * w, y2 * h)
            draw.rectangle(rect, outline=colour, width=line)
            label = phrase.phrase or f"<r{k}>"
            left, top, right, bottom = draw.textbbox((0, 0), label, font=font)
            tag_h = bottom - top + 2 * line
            key = tuple(round(v, 4) for v in rect)
            below = stacked.get(key, 0)
            stacked[key] = below + 1
            ty = rect[1] - tag_h * (below + 1)
            if ty < 0:  # no room above the box: inside it, from its top down
                ty = rect[1] + tag_h * below
            tx = rect[0]
            draw.rectangle((tx, ty, tx + right - left + 2 * line, ty + tag_h), fill=colour)
            draw.text((tx + line, ty + line - top), label, fill=(255, 255, 255), font=font)
    return canvas


MASK_OPACITY = 0.45
"""How much of a phrase's colour a masked pixel takes."""


def _paint_mask(canvas: Image.Image, mask, colour: tuple[int, int, int]) -> None:
    """Tint the pixels of ``mask`` ((H, W) bool, tensor or array, at the image's size or resized to it) in place."""
    import numpy as np

    array = np.asarray(mask.detach().cpu() if hasattr(mask, "detach") else mask).astype(bool)
    if array.ndim != 2 or not array.any():
        return
    if array.shape != (canvas.height, canvas.width):
        array = np.asarray(Image.fromarray(array).resize(canvas.size, Image.NEAREST))
    tint = Image.new("RGB", canvas.size, colour)
    alpha = Image.fromarray((array * round(255 * MASK_OPACITY)).astype(np.uint8), "L")
    canvas.paste(tint, (0, 0), alpha)
